"""The fused VESPO loss against the float64 reference on the same values (see conftest for budgets)."""
from __future__ import annotations

import math

import pytest
import torch

import vespo_ext
from vespo_ext import AGGS, METRIC_NAMES
from vespo_ext import reference as R

from conftest import (KERNEL_DTYPES, assert_grad_close, assert_metrics_close, check_vs_reference, make_packed,
                      make_padded, pack_padded, run_fused, run_ref, to_double)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("tis", [False, True], ids=["notis", "tis"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("adv", ["seq", "token"])
def test_padded_matches_reference(device, dtype, agg, tis, temperature, adv):
    inp = make_padded(5, 7, 19, device=device, dtype=dtype, adv=adv, tis=tis, temperature=temperature)
    check_vs_reference(inp, agg=agg, temperature=temperature)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv", ["seq", "token"])
@pytest.mark.parametrize("tis", [False, True], ids=["notis", "tis"])
def test_packed_matches_reference(device, agg, adv, tis):
    inp = make_packed([4, 1, 9, 0, 3, 6], V=23, device=device, adv=adv, tis=tis, temperature=1.3)
    check_vs_reference(inp, agg=agg, temperature=1.3)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_cu_seqlens_int32_and_int64_agree(device, cu_dtype):
    inp = make_packed([3, 5, 2], device=device, cu_dtype=cu_dtype)
    check_vs_reference(inp)
    other = dict(inp, cu_seqlens=inp["cu_seqlens"].to(torch.int64))
    a, b = run_fused(inp), run_fused(other)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_custom_k_lambda(device):
    inp = make_padded(4, 5, 11, device=device, tis=True)
    for params in (dict(k_pos=0.5, lambda_pos=0.0, k_neg=1.0, lambda_neg=5.0),   # lambda 0 -> clamped to 1e-4
                   dict(k_pos=4.0, lambda_pos=0.5, k_neg=0.0, lambda_neg=0.25),
                   dict(k_pos=1, lambda_pos=1, k_neg=1, lambda_neg=1)):          # ints accepted
        for agg in ("token-mean", "seq-mean-token-mean"):
            check_vs_reference(inp, agg=agg, **params)
    # The parameters matter: a different k changes the loss.
    assert float(run_fused(inp, k_pos=0.5)[0]) != float(run_fused(inp, k_pos=4.0)[0])


@pytest.mark.parametrize("agg", AGGS)
def test_norm_float_and_tensor(device, agg):
    inp = make_padded(4, 6, 9, device=device)
    a = check_vs_reference(inp, agg=agg, norm=3.5)[0]
    b = check_vs_reference(inp, agg=agg, norm=torch.tensor([3.5], device=device))[0]
    c = check_vs_reference(inp, agg=agg, norm=torch.tensor(3.5, device=device))[0]  # 0-d also 1 element
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[0], c[0])
    # norm overrides the denominator: the loss scales as 1/norm.
    d = run_fused(inp, agg=agg, norm=7.0)[0]
    assert float(d) == pytest.approx(float(a[0]) / 2, rel=1e-6, abs=1e-12)


def test_token_mean_norm_equals_token_count(device):
    inp = make_padded(4, 6, 9, device=device)
    n_tok = int(inp["mask"].sum())
    a, b = run_fused(inp), run_fused(inp, norm=float(n_tok))
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Layouts
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv", ["seq", "token"])
def test_padded_equals_packed_with_padding(device, agg, adv):
    inp = make_padded(4, 6, 17, device=device, adv=adv, tis=True)
    a, b = run_fused(inp, agg=agg), run_fused(pack_padded(inp), agg=agg)
    assert torch.equal(a[0], b[0]), (float(a[0]), float(b[0]))
    assert torch.equal(a[1].reshape(b[1].shape), b[1])
    for k in METRIC_NAMES:
        assert torch.equal(a[2][k], b[2][k]), k


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("adv", ["seq", "token"])
def test_variable_length_packed_equals_padded(device, agg, adv):
    lengths = [5, 1, 7, 3, 0, 7]
    B, L, V = len(lengths), max(lengths), 15
    pad = make_padded(B, L, V, device=device, adv=adv, tis=True)
    pad["mask"] &= (torch.arange(L, device=device).unsqueeze(0) < torch.tensor(lengths, device=device).unsqueeze(1))
    pad["logits"][~pad["mask"]] = 1e4  # padding garbage, never read
    packed = {k: torch.cat([v[i, :n] for i, n in enumerate(lengths)]) for k, v in pad.items() if v.dim() >= 2}
    packed["advantages"] = pad["advantages"] if adv == "seq" else packed["advantages"]
    packed["cu_seqlens"] = torch.tensor([sum(lengths[:i]) for i in range(B + 1)], device=device)
    lp_, gp_, mp_ = run_fused(pad, agg=agg)
    lk, gk, mk = run_fused(packed, agg=agg)
    assert float(lk) == pytest.approx(float(lp_), rel=1e-6, abs=1e-9)
    gp_flat = torch.cat([gp_[i, :n] for i, n in enumerate(lengths)])
    assert_grad_close(gk, gp_flat, 1e-6)
    assert torch.count_nonzero(gp_[~pad["mask"]]) == 0
    assert_metrics_close(mk, mp_, rtol=1e-6)
    check_vs_reference(packed, agg=agg)


def test_single_token_sequences(device):
    inp = make_packed([1] * 9, V=11, device=device, mask_p=1.0)
    for agg in AGGS:
        check_vs_reference(inp, agg=agg)
    check_vs_reference(make_padded(6, 1, 11, device=device), agg="seq-mean-token-sum-norm")


@pytest.mark.parametrize("agg", AGGS)
def test_single_token_batch(device, agg):
    inp = make_packed([1], V=7, device=device, mask_p=1.0)
    inp["advantages"] = torch.tensor([-0.7], device=device)
    (lf, gf, mf), _ = check_vs_reference(inp, agg=agg)
    assert float(mf["n_tokens"]) == 1 and float(mf["n_seq"]) == 1 and float(mf["w_seq_std"]) == 0.0
    assert lf != 0


def test_empty_batch_T0(device):
    inp = dict(logits=torch.zeros(0, 5, device=device), labels=torch.zeros(0, dtype=torch.long, device=device),
               old_logp=torch.zeros(0, device=device), advantages=torch.zeros(0, device=device),
               cu_seqlens=torch.zeros(1, dtype=torch.long, device=device))
    lf, gf, mf = run_fused(inp)
    assert float(lf) == 0.0 and gf.shape == (0, 5)
    assert all(math.isfinite(float(v)) for v in mf.values())


@pytest.mark.parametrize("length", [16384, pytest.param(65536, marks=pytest.mark.slow)])
def test_one_long_sequence(device, length):
    inp = make_packed([length], V=24, device=device, drift=0.5, mask_p=0.95)
    for agg in ("token-mean", "seq-mean-token-sum"):
        check_vs_reference(inp, agg=agg)


@pytest.mark.parametrize("V", [1, 3, 17, 1031])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_odd_vocab_sizes(device, V, dtype):
    inp = make_padded(3, 5, V, device=device, dtype=dtype, tis=True, temperature=0.7)
    (lf, gf, _), _ = check_vs_reference(inp, agg="seq-mean-token-mean", temperature=0.7)
    if V == 1:  # log pi = 0 exactly: no loss, no gradient (any temperature)
        assert float(lf) == 0.0 and torch.count_nonzero(gf) == 0


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_large_vocab(device, dtype):
    inp = make_padded(1, 3, 151937, device=device, dtype=dtype, holes=False, temperature=0.9)
    check_vs_reference(inp, temperature=0.9)


# ---------------------------------------------------------------------------------------------
# Edge cases
@pytest.mark.parametrize("agg", AGGS)
def test_empty_sequence_row(device, agg):
    inp = make_padded(4, 5, 9, device=device, tis=True)
    inp["mask"][1] = False
    (lf, gf, mf), _ = check_vs_reference(inp, agg=agg)
    assert float(mf["n_seq"]) == 3
    assert torch.count_nonzero(gf[1]) == 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("norm", [None, 2.0])
def test_all_masked_batch(device, agg, norm):
    inp = make_padded(3, 4, 7, device=device, tis=True)
    inp["mask"][:] = False
    lf, gf, mf = run_fused(inp, agg=agg, norm=norm)
    assert lf.item() == 0.0 and not torch.isnan(lf)
    assert torch.count_nonzero(gf) == 0 and not torch.isnan(gf).any()
    assert all(math.isfinite(float(v)) for v in mf.values())
    assert float(mf["n_seq"]) == 0 and float(mf["n_tokens"]) == 0
    lr, gr, mr = run_ref(inp, agg=agg, norm=norm)
    assert float(lr) == 0.0
    assert_metrics_close(mf, mr)


@pytest.mark.parametrize("direction", [+1, -1])
@pytest.mark.parametrize("tis", [False, True])
def test_extreme_weights_clamp(device, direction, tis):
    """W at e^{+-20}: old_logp far from log pi so every clamp engages; phi stays finite."""
    inp = make_padded(4, 6, 9, device=device, tis=tis)
    inp["old_logp"] = inp["old_logp"] - direction * 30.0
    if tis:
        inp["rollout_is_weights"] = torch.full_like(inp["rollout_is_weights"], 1e12 if direction > 0 else 1e-12)
    (lf, gf, mf), _ = check_vs_reference(inp, agg="seq-mean-token-mean")
    lw = float(mf["log_w_seq_max"])
    assert lw == pytest.approx(20.0 * direction, rel=1e-6) and float(mf["log_w_seq_min"]) == pytest.approx(lw)
    assert math.isfinite(float(mf["w_seq_max"])) and math.isfinite(float(mf["phi_max"]))
    if direction > 0:  # phi(e^20) = 0 exactly
        assert float(mf["phi_max"]) == 0.0 and float(mf["frac_w_gt_100"]) == 1.0 and float(lf) == 0.0


def test_single_sequence_std_is_zero(device):
    inp = make_padded(1, 8, 9, device=device)
    lf, gf, mf = run_fused(inp)
    assert float(mf["w_seq_std"]) == 0.0 and float(mf["n_seq"]) == 1.0
    inp2 = make_padded(3, 8, 9, device=device)
    inp2["mask"][1:] = False  # three rows, one non-empty
    assert float(run_fused(inp2)[2]["w_seq_std"]) == 0.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("tis", [False, True], ids=["notis", "tis"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_metrics_match_reference(device, agg, tis, dtype):
    inp = make_padded(6, 5, 13, device=device, dtype=dtype, tis=tis, drift=3.0)
    (lf, gf, mf), (lr, gr, mr) = check_vs_reference(inp, agg=agg)
    assert tuple(mf) == METRIC_NAMES
    assert float(mf["n_pos"]) >= 1 and float(mf["n_neg"]) >= 1  # both signs present; A = 0 in neither


def test_neg_inf_logits_off_label(device):
    inp = make_padded(3, 5, 12, device=device)
    bad = torch.rand(inp["logits"].shape, device=device) < 0.3
    bad.scatter_(-1, inp["labels"].unsqueeze(-1), False)
    inp["logits"][bad] = float("-inf")
    check_vs_reference(inp, agg="token-mean")


# ---------------------------------------------------------------------------------------------
# Masked positions never matter
@pytest.mark.parametrize("agg", AGGS)
def test_masked_garbage_is_ignored(device, agg):
    clean = make_padded(4, 6, 11, device=device, adv="token", tis=True)
    dirty = {k: v.clone() for k, v in clean.items()}
    off = ~clean["mask"]
    assert off.any()
    V = clean["logits"].shape[-1]
    dirty["logits"][off] = float("nan")
    dirty["old_logp"][off] = float("nan")
    dirty["advantages"][off] = float("nan")
    dirty["rollout_is_weights"][off] = float("nan")
    lab = dirty["labels"]
    lab[off] = torch.where(torch.rand(int(off.sum()), device=device) < 0.5, -100, V + 5)
    a, b = run_fused(clean, agg=agg), run_fused(dirty, agg=agg)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    for k in METRIC_NAMES:
        assert torch.equal(a[2][k], b[2][k]), k
    check_vs_reference(dirty, agg=agg)


# ---------------------------------------------------------------------------------------------
def test_deterministic(device):
    inp = make_packed([700, 3, 1500, 64, 0, 900], V=257, device=device, tis=True, adv="token")
    a, b = run_fused(inp, agg="seq-mean-token-mean"), run_fused(inp, agg="seq-mean-token-mean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for k in METRIC_NAMES:
        assert torch.equal(a[2][k], b[2][k]), k


def test_deterministic_across_cpu_thread_counts():
    """Rows are independent and the per-sequence records are combined serially in a fixed order,
    so the CPU results do not depend on the thread count either (reproducible across machines)."""
    inp = make_packed([7000, 3, 9000, 64, 0, 5000], V=300, tis=True, adv="token")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(run_fused(inp, agg="seq-mean-token-mean"))
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])
        assert all(torch.equal(r[2][k], runs[0][2][k]) for k in METRIC_NAMES)


def test_non_contiguous_inputs(device):
    B, L, V = 3, 5, 17
    base = make_padded(B, L, V, device=device, adv="token", tis=True)
    big = torch.randn(B, L, V + 9, device=device)
    big[:, :, :V] = base["logits"]
    old_t = base["old_logp"].t().contiguous().t()
    adv_t = base["advantages"].t().contiguous().t()
    lab = torch.empty(B, L * 2, dtype=torch.long, device=device)[:, ::2]
    lab.copy_(base["labels"])
    mask = torch.zeros(B, L * 3, dtype=torch.bool, device=device)[:, 1::3]
    mask.copy_(base["mask"])
    strided = dict(base, logits=big[:, :, :V], old_logp=old_t, advantages=adv_t, labels=lab, mask=mask)
    assert not strided["logits"].is_contiguous() and not old_t.is_contiguous() and not lab.is_contiguous()
    a, b = run_fused(base, agg="seq-mean-token-sum"), run_fused(strided, agg="seq-mean-token-sum")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a padded slice whose (B, L) strides cannot be merged: big2[:, :L, :V] of a (B, L+2, V+9) tensor
    big2 = torch.randn(B, L + 2, V + 9, device=device)
    big2[:, :L, :V] = base["logits"]
    c = run_fused(dict(base, logits=big2[:, :L, :V]), agg="seq-mean-token-sum")
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    # seq advantages strided too
    seq = make_padded(B, L, V, device=device)
    adv = torch.zeros(2 * B, device=device)[::2]
    adv.copy_(seq["advantages"])
    assert torch.equal(run_fused(seq)[0], run_fused(dict(seq, advantages=adv))[0])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_grad_inplace(device, dtype):
    inp = make_padded(3, 5, 19, device=device, dtype=dtype, tis=True)
    args = {k: v for k, v in inp.items() if k != "logits"}
    _, g_ref, _ = run_fused(inp, agg="seq-mean-token-mean")
    # Non-leaf logits (as behind an LM head): the gradient handed upstream is the logits' storage.
    x = inp["logits"].detach().clone().requires_grad_(True)
    logits = x * 1
    seen = []
    logits.register_hook(seen.append)
    loss = vespo_ext.vespo_loss(logits, agg="seq-mean-token-mean", grad_inplace=True, **args)
    loss.backward()
    assert seen[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert torch.equal(seen[0], g_ref)
    assert torch.equal(x.grad, g_ref)
    # Leaf logits: same values, and the logits' old values are gone (overwritten by the gradient).
    y = inp["logits"].detach().clone().requires_grad_(True)
    vespo_ext.vespo_loss(y, agg="seq-mean-token-mean", grad_inplace=True, **args).backward()
    assert torch.equal(y.grad, g_ref)
    assert torch.equal(y.detach(), g_ref)
    # Logits that are a strided view (row stride > V): the rest of the storage is left alone.
    V = inp["logits"].shape[-1]
    big = torch.randn(*inp["logits"].shape[:-1], V + 7, device=device).to(dtype)
    big[..., :V] = inp["logits"]
    pad = big[..., V:].clone()
    big.requires_grad_(True)
    view = big * 1
    vespo_ext.vespo_loss(view[..., :V], agg="seq-mean-token-mean", grad_inplace=True, **args).backward()
    if device.type == "cpu":
        assert torch.equal(big.grad[..., :V], g_ref)
    else:  # another row alignment: another order of the row sums on CUDA (see test_token_logprobs)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(big.grad[..., :V], g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())
    assert torch.count_nonzero(big.grad[..., V:]) == 0
    assert torch.equal(view[..., V:].detach(), pad)


def test_grad_scale_from_upstream(device):
    inp = make_padded(3, 4, 9, device=device)
    _, g, _ = run_fused(inp)
    x = inp["logits"].clone().requires_grad_(True)
    args = {k: v for k, v in inp.items() if k != "logits"}
    (vespo_ext.vespo_loss(x, **args) * -2.5).backward()
    torch.testing.assert_close(x.grad, g * -2.5, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# policy_loss
def test_policy_loss_vespo_is_vespo_loss(device):
    inp = make_padded(3, 4, 9, device=device, tis=True)
    a = run_fused(inp, agg="seq-mean-token-sum", k_pos=1.5)
    b = run_fused(inp, fn=vespo_ext.policy_loss, loss="vespo", agg="seq-mean-token-sum", k_pos=1.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_metrics_are_not_differentiable(device):
    """Metrics are detached statistics (as the reference's are): they must not carry a graph, or
    e.g. (loss + c * metrics['approx_kl']).backward() silently drops the second term's gradient."""
    inp = make_padded(2, 3, 5, device=device)
    x = inp["logits"].clone().requires_grad_(True)
    args = {k: v for k, v in inp.items() if k != "logits"}
    _, ref_metrics = R.vespo_loss(x.double(), return_metrics=True, **to_double(args))
    assert not any(v.requires_grad for v in ref_metrics.values())
    loss, metrics = vespo_ext.vespo_loss(x, return_metrics=True, **args)
    assert loss.requires_grad
    assert [k for k, v in metrics.items() if v.requires_grad] == []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_confident_tokens_keep_true_class_term(device, temperature):
    """SPEC: the true-class gradient term (1 - p) must survive for confident tokens (p ~ 1 - 1e-10):
    every row here is confident, so the reference gradient is ~1e-10 * c and losing (1 - p) to
    rounding (or getting its sign wrong) breaks the 2e-4 gradient budget. (The loss itself, with
    log pi ~ -1e-10, is only held to fp32's absolute accuracy of log pi.)"""
    inp = make_padded(4, 6, 8, device=device, holes=False, logit_scale=0.5)
    onehot = torch.nn.functional.one_hot(inp["labels"], 8).bool()
    inp["logits"] = inp["logits"] + 25.0 * temperature * onehot
    inp["old_logp"] = inp["old_logp"] * 0  # log pi ~ -1e-10: W ~ 1
    lf, gf, _ = run_fused(inp, temperature=temperature)
    lr, gr, mr = run_ref(inp, temperature=temperature)
    assert abs(float(lf) - float(lr)) <= 1e-6 * float(inp["advantages"].abs().max()) * max(float(mr["phi_max"]), 1)
    assert float(gr.abs().max()) > 0
    assert_grad_close(gf, gr, 2e-4)
