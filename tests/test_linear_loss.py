"""vespo_ext.linear_policy_loss / linear_token_logprobs against the float64 reference built from the same
inputs (full logits in float64). Budgets as the core's (conftest): loss 2e-4 of its scale, gradients 2e-4 of
the reference gradient's largest element for fp32; bf16/fp16 see BUDGET below."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_grad_close, assert_loss_close, assert_metrics_close

import vespo_ext
from vespo_ext import AGGS, LOSSES, METRIC_NAMES
from vespo_ext import linear as _linear  # noqa: F401  (registers the vespo::linear_* ops)
from vespo_ext import reference as R

# (loss, gradient) budgets per dtype. Low precision: the logits chunk is a bf16/fp16 GEMM output, so it
# carries one rounding of the logits (as the unfused `matmul` + op path does), and the gradient GEMMs run
# in that dtype too.
BUDGET = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (1.5e-2, 1.5e-2)}


def make_linear(lengths=None, *, B=4, L=6, H=16, V=29, dtype=torch.float32, bias=True, tis=False, adv="seq",
                temperature=1.0, mask_p=0.85, device="cpu"):
    """Packed (lengths given) or padded inputs; logits ~ N(0, 2^2); old_logp near the true log-probs."""
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
        S, T = lengths.numel(), int(lengths.sum())
        shape = (T,)
        cu = torch.zeros(S + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(lengths, 0)
        seq = torch.repeat_interleave(torch.arange(S), lengths)
    else:
        S, shape, cu = B, (B, L), None
        seq = torch.arange(B).unsqueeze(1).expand(B, L)
    hidden = torch.randn(*shape, H)
    weight = torch.randn(V, H) * (2.0 / math.sqrt(H))
    b = torch.randn(V) * 0.5 if bias else None
    labels = torch.randint(0, V, shape)
    mask = torch.rand(shape) < mask_p
    with torch.no_grad():
        lp = R.linear_token_logprobs(hidden.to(dtype).double(), weight.to(dtype).double(), labels,
                                     bias=None if b is None else b.to(dtype).double(), temperature=temperature)
    spread = 0.3 / math.sqrt(max(shape[-1] if cu is None else 4, 1))
    old = (lp + spread * torch.randn(shape, dtype=torch.float64)).float()
    a = torch.randn(S)
    if S >= 2:
        a[0], a[1] = a[0].abs() + 0.1, -(a[1].abs() + 0.1)
    advantages = a[seq].clone() if adv == "token" else a
    inp = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), bias=None if b is None else b.to(dtype),
               labels=labels, old_logp=old, advantages=advantages, mask=mask)
    if cu is not None:
        inp["cu_seqlens"] = cu
    if tis:
        inp["rollout_is_weights"] = torch.exp(0.3 * torch.randn(shape))
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


_PARAMS = ("hidden", "weight", "bias")


def run_lin(inp, fn=None, **kw):
    """(loss, {hidden, weight, bias: grad}, metrics) of the fused op (or of `fn` with its signature)."""
    fn = fn or vespo_ext.linear_policy_loss
    p = {k: (inp[k].detach().clone().requires_grad_(True) if inp[k] is not None else None) for k in _PARAMS}
    rest = {k: v for k, v in inp.items() if k not in _PARAMS}
    loss, metrics = fn(p["hidden"], p["weight"], bias=p["bias"], return_metrics=True, **rest, **kw)
    loss.backward()
    return loss.detach(), {k: (v.grad if v is not None else None) for k, v in p.items()}, metrics


def run_lin_ref(inp, **kw):
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v) for k, v in inp.items()}
    kw.pop("chunk_tokens", None)
    return run_lin(d, fn=R.linear_policy_loss, **kw)


def loss_scale(inp, loss="vespo", temperature=1.0, **kw):
    """sum_t |dloss/dlogp_t * logp_t| of the float64 reference (what the absolute loss budget is relative to)."""
    d = {k: (v.double() if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v) for k, v in inp.items()}
    lp = R.linear_token_logprobs(d["hidden"], d["weight"], torch.where(d["mask"], d["labels"], 0), bias=d["bias"],
                                 temperature=temperature).detach().requires_grad_(True)
    kw.pop("chunk_tokens", None)
    out = vespo_ext.policy_loss_from_logp(lp, d["old_logp"], d["advantages"], d["mask"], loss=loss,
                                          cu_seqlens=d.get("cu_seqlens"),
                                          rollout_is_weights=d.get("rollout_is_weights"),
                                          **kw)
    (c,) = torch.autograd.grad(out, lp, allow_unused=True)
    return 0.0 if c is None else float((c * lp.detach()).abs().sum())


def check_lin(inp, *, metrics=True, **kw):
    dtype = inp["hidden"].dtype
    ltol, gtol = BUDGET[dtype]
    lf, gf, mf = run_lin(inp, **kw)
    lr, gr, mr = run_lin_ref(inp, **kw)
    assert lf.dim() == 0 and lf.dtype == torch.float32
    scale_kw = {k: v for k, v in kw.items() if k in ("loss", "agg", "norm", "temperature")}
    assert_loss_close(lf, lr, loss_scale(inp, **scale_kw), ltol)
    for k in _PARAMS:
        if inp[k] is None:
            assert gf[k] is None
            continue
        assert gf[k].dtype == dtype and gf[k].shape == inp[k].shape
        assert_grad_close(gf[k], gr[k], gtol, what=f"d {k}")
    if metrics and dtype == torch.float32:
        assert_metrics_close(mf, mr)
    return (lf, gf, mf), (lr, gr, mr)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_every_loss_and_agg(loss, agg, layout):
    lengths = [5, 1, 9, 0, 3, 6] if layout == "packed" else None
    inp = make_linear(lengths, B=4, L=7, tis=(agg == "token-mean"), adv="token" if loss == "grpo" else "seq")
    check_lin(inp, loss=loss, agg=agg, chunk_tokens=7, temperature=0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_dtypes(dtype, chunk):
    inp = make_linear([12, 3, 20, 1], H=32, V=37, dtype=dtype, tis=True, temperature=1.3)
    check_lin(inp, chunk_tokens=chunk, temperature=1.3, agg="seq-mean-token-mean")


@pytest.mark.parametrize("chunk", [1, 4, 7, 8, 12, 36, 1000])
def test_chunk_boundaries(chunk):
    """lengths 4, 4, 4, 24: chunk 4/8/12 cut exactly at sequence boundaries; 7 inside sequences; 24 > chunk
    for every chunk < 24 (the two-pass path); 36 and 1000 >= T (one chunk)."""
    inp = make_linear([4, 4, 4, 24], tis=True)
    for agg in AGGS:
        check_lin(inp, chunk_tokens=chunk, agg=agg, temperature=0.9)


def test_chunkings_agree_with_each_other():
    inp = make_linear([3, 17, 1, 0, 9, 30], H=24, V=41, tis=True)
    ref = run_lin(inp, chunk_tokens=1000)
    for chunk in (1, 2, 5, 16, 29):
        out = run_lin(inp, chunk_tokens=chunk)
        assert float(out[0]) == pytest.approx(float(ref[0]), rel=1e-5, abs=1e-7)
        for k in _PARAMS:
            assert_grad_close(out[1][k], ref[1][k], 1e-5, what=f"d {k} at chunk {chunk}")


@pytest.mark.parametrize("agg", AGGS)
def test_padded_equals_packed(agg):
    B, L = 4, 6
    inp = make_linear(None, B=B, L=L, tis=True, adv="token")
    packed = {k: (v.reshape(B * L, *v.shape[2:]) if isinstance(v, torch.Tensor) and k not in ("weight", "bias")
                  else v) for k, v in inp.items()}
    packed["cu_seqlens"] = torch.arange(B + 1) * L
    for chunk in (5, 6, 100):
        a, b = run_lin(inp, agg=agg, chunk_tokens=chunk), run_lin(packed, agg=agg, chunk_tokens=chunk)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1]["hidden"].reshape(B * L, -1), b[1]["hidden"])
        assert torch.equal(a[1]["weight"], b[1]["weight"]) and torch.equal(a[1]["bias"], b[1]["bias"])
        for k in METRIC_NAMES:
            assert torch.equal(a[2][k], b[2][k]), k


def test_single_token_and_odd_vocab():
    check_lin(make_linear([1], V=7, mask_p=1.0), chunk_tokens=1)
    check_lin(make_linear(None, B=1, L=1, V=5, mask_p=1.0))
    for V in (1, 2, 3, 257):
        check_lin(make_linear([3, 5], V=V, mask_p=1.0), chunk_tokens=3)


def test_all_masked_batch():
    inp = make_linear([4, 3, 5], mask_p=0.0)
    inp["labels"][:] = 10**6  # out of range everywhere: masked, so never read
    for agg in AGGS:
        lf, gf, mf = run_lin(inp, agg=agg, chunk_tokens=3)
        assert float(lf) == 0.0
        for k in _PARAMS:
            assert torch.count_nonzero(gf[k]) == 0, k
        assert float(mf["n_tokens"]) == 0 and float(mf["n_seq"]) == 0


def test_masked_out_of_range_labels_ignored_and_counted_ones_raise():
    inp = make_linear([6, 2, 9], tis=True)
    inp["mask"][[0, 7, 12]] = False
    bad = dict(inp, labels=inp["labels"].clone())
    bad["labels"][[0, 7]] = torch.tensor([-5, 10**6])
    bad["labels"][12] = -100
    for chunk in (4, 100):
        a, b = run_lin(inp, chunk_tokens=chunk), run_lin(bad, chunk_tokens=chunk)
        assert torch.equal(a[0], b[0])
        for k in _PARAMS:
            assert torch.equal(a[1][k], b[1][k]), k
    check_lin(bad, chunk_tokens=4)
    bad["mask"][7] = True
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match=r"labels\[7\] = 1000000"):
            vespo_ext.linear_policy_loss(bad["hidden"].requires_grad_(grad), bad["weight"], bad["labels"],
                                         bad["old_logp"], bad["advantages"], bad["mask"],
                                         cu_seqlens=bad["cu_seqlens"], chunk_tokens=4)


def test_first_bad_row_is_the_first_flagged_piece():
    """_first_bad_row (the per-piece flags reduced on their device, read at once on CPU and later on CUDA by
    ops._raise_bad_label) names the first flagged piece's row: 1 + its token; 0 when none."""
    from vespo_ext.linear import _first_bad_row

    assert _first_bad_row(torch.tensor([0, 0, 3, 2], dtype=torch.int64), 4).tolist() == [8 + 3]
    assert _first_bad_row(torch.tensor([1, 0, 5], dtype=torch.int64), 7).tolist() == [1]
    assert _first_bad_row(torch.zeros(3, dtype=torch.int64), 4).tolist() == [0]


def test_linear_bad_label_without_gradients_is_deferred_on_cuda(device, monkeypatch):
    """No gradient: on CUDA the pieces' bad-label flags are not read in the forward (no host sync); the error
    comes at check_errors() or the next op. On CPU it is immediate."""
    from vespo_ext import ops

    monkeypatch.setattr(ops, "_SYNC_CHECKS", False)
    inp = make_linear([5, 3, 6], device=device)
    labels = inp["labels"].clone()
    labels[9] = 10**6
    inp["mask"][9] = True

    calls = [  # (no input requires grad)
        lambda: vespo_ext.linear_token_logprobs(inp["hidden"], inp["weight"], labels, bias=inp["bias"], chunk_tokens=4),
        lambda: vespo_ext.linear_policy_loss(inp["hidden"], inp["weight"], labels, inp["old_logp"], inp["advantages"],
                                             inp["mask"], bias=inp["bias"], cu_seqlens=inp["cu_seqlens"],
                                             chunk_tokens=4)]
    for call in calls:
        if device.type == "cpu":
            with pytest.raises(IndexError, match=r"labels\[9\] = 1000000"):
                call()
            continue
        call()  # returns: nothing read on the host
        with pytest.raises(IndexError, match=r"labels\[9\] = 1000000"):
            vespo_ext.check_errors()
        vespo_ext.check_errors()  # reported once


def test_without_bias_and_partial_requires_grad():
    inp = make_linear([5, 7], bias=False)
    check_lin(inp, chunk_tokens=5)
    h = inp["hidden"].clone().requires_grad_(True)
    rest = {k: v for k, v in inp.items() if k not in _PARAMS}
    vespo_ext.linear_policy_loss(h, inp["weight"], **rest).backward()  # weight needs no gradient
    ref = run_lin_ref(inp)[1]["hidden"]
    assert_grad_close(h.grad, ref, 2e-4)
    with torch.no_grad():  # 1 GEMM per chunk, same loss
        lo = vespo_ext.linear_policy_loss(inp["hidden"], inp["weight"], chunk_tokens=3, **rest)
    assert float(lo) == pytest.approx(float(run_lin(inp, chunk_tokens=3)[0]), rel=1e-6)


def test_upstream_gradient_scales_and_tied_weights_accumulate():
    inp = make_linear([5, 7, 4], tis=True)
    rest = {k: v for k, v in inp.items() if k not in _PARAMS}
    _, g1, _ = run_lin(inp, chunk_tokens=4)
    h = inp["hidden"].clone().requires_grad_(True)
    w = inp["weight"].clone().requires_grad_(True)
    (vespo_ext.linear_policy_loss(h, w, bias=inp["bias"], chunk_tokens=4, **rest) * -2.5).backward()
    torch.testing.assert_close(h.grad, -2.5 * g1["hidden"], rtol=1e-6, atol=0)
    torch.testing.assert_close(w.grad, -2.5 * g1["weight"], rtol=1e-6, atol=0)

    # Tied embeddings: the head's weight is the embedding table; the hidden states come from it.
    V, H = inp["weight"].shape
    ids = torch.randint(0, V, inp["labels"].shape)

    def tied(fn, emb):
        hid = torch.tanh(emb[ids] @ torch.eye(H, dtype=emb.dtype) * 1.5)
        return fn(hid, emb, inp["labels"], **{k: v for k, v in rest.items() if k != "labels"},
                  **({"chunk_tokens": 4} if fn is vespo_ext.linear_policy_loss else {}))

    e1 = inp["weight"].clone().requires_grad_(True)
    tied(vespo_ext.linear_policy_loss, e1).backward()
    e2 = inp["weight"].double().clone().requires_grad_(True)
    tied(R.linear_policy_loss, e2).backward()
    assert_grad_close(e1.grad, e2.grad, 2e-4, what="tied embedding gradient")


def test_deterministic():
    inp = make_linear([40, 3, 17], H=32, V=300, tis=True)
    a, b = run_lin(inp, chunk_tokens=16), run_lin(inp, chunk_tokens=16)
    assert torch.equal(a[0], b[0])
    for k in _PARAMS:
        assert torch.equal(a[1][k], b[1][k]), k


def test_realistic_vocab_confident_rows():
    """V = 32003 (odd), H = 64, 4 x 96 tokens, most counted labels at p > 0.999 (the 1 - p cancellation regime)."""
    lengths, V, H = [96] * 4, 32003, 64
    inp = make_linear(lengths, H=H, V=V, tis=True, mask_p=0.95)
    T = sum(lengths)
    conf = torch.rand(T) < 0.8
    # Push the label's logit ~32 up (the other logits spread with it: std ~4): add a multiple of its weight row.
    w = inp["weight"]
    lab = inp["labels"]
    boost = 32.0 / (w[lab] * w[lab]).sum(-1, keepdim=True)
    inp["hidden"] = torch.where(conf.unsqueeze(-1), inp["hidden"] * 0.2 + boost * w[lab], inp["hidden"])
    with torch.no_grad():
        lp = R.linear_token_logprobs(inp["hidden"].double(), w.double(), lab, bias=inp["bias"].double())
    assert float((lp[conf] > math.log(0.999)).float().mean()) > 0.5
    inp["old_logp"] = (lp + 0.3 * torch.randn(T, dtype=torch.float64) / math.sqrt(96)).float()
    check_lin(inp, chunk_tokens=None)  # default chunk: 256 tokens (two whole sequences per group)
    check_lin(inp, chunk_tokens=80, agg="seq-mean-token-mean", metrics=False)  # every sequence two-pass


def _rel_rows(x, ref):
    """(Frobenius relative error, worst row's relative error) of x against the float64 ref."""
    d = x.double() - ref
    rows = ref.norm(dim=1)
    big = rows >= 1e-3 * rows.max()  # rows far below the largest would underflow fp16's range, op or no op
    return float(d.norm() / ref.norm()), float((d.norm(dim=1)[big] / rows[big]).max())


@pytest.mark.parametrize("mode", ["product", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.slow)], ids=str)
def test_low_precision_weight_gradient_realistic_vocab(dtype, mode, monkeypatch):
    """V = 151936, H = 64, 2 x 64 tokens whose labels come from 50 frequent tokens (their weight rows gather
    gradient from every chunk), chunk_tokens = 8 (16 chunks), both CPU weight-gradient modes (_Head._gw_lowp), the
    V slices small enough to cut V into several. Reference: the float64 gradient given the same dtype-rounded
    logits (the one rounding the op shares with matmul + op), so what is left is the op's own error: the dtype's
    gradient of the logits, the accumulation, the final rounding. Budgets (relative, 4 seeds measured): Frobenius
    6e-3 (bf16 <= 3.2e-3, fp16 <= 9.1e-4), the worst weight row (of those within 1e-3 of the largest row's norm)
    1.5e-2 bf16 (<= 5.5e-3), 2e-2 fp16 (<= 8.4e-3)."""
    monkeypatch.setitem(_linear._CPU_DW_MODE, dtype, mode)
    monkeypatch.setattr(_linear, "_DW_SLICE_BYTES", 4 << 20)  # product: 10922 rows, upcast: 65536 rows per slice
    inp = make_linear([64, 64], H=64, V=151936, dtype=dtype, bias=False, mask_p=0.95)
    inp["labels"] = labels = inp["labels"] % 50
    h64, w64 = inp["hidden"].double(), inp["weight"].double()
    z = (h64 @ w64.T).to(dtype).double().requires_grad_(True)
    with torch.no_grad():  # old_logp near the new labels' log-probs
        inp["old_logp"] = (R.token_logprobs(z, labels) + 0.03 * torch.randn(labels.shape, dtype=torch.float64)).float()
    ref_loss = R.policy_loss(z, inp["labels"], inp["old_logp"], inp["advantages"], inp["mask"],
                             cu_seqlens=inp["cu_seqlens"])
    (gz,) = torch.autograd.grad(ref_loss, z)
    ref = gz.T @ h64
    w = inp["weight"].clone().requires_grad_(True)
    vespo_ext.linear_policy_loss(inp["hidden"], w, inp["labels"], inp["old_logp"], inp["advantages"], inp["mask"],
                                 cu_seqlens=inp["cu_seqlens"], chunk_tokens=8).backward()
    assert w.grad.dtype == dtype
    frob, row = _rel_rows(w.grad, ref)
    assert frob <= 6e-3, frob
    assert row <= (1.5e-2 if dtype == torch.bfloat16 else 2e-2), row


@pytest.mark.parametrize("mode", ["product", "upcast"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_weight_gradient_accumulates_in_fp32(dtype, mode, monkeypatch):
    """The fp32 accumulator of the weight gradient over 64 chunks of positive (coherent) low-precision gradients
    against the float64 sum: "upcast" is exact but for fp32 rounding (<= 1e-5), "product" rounds each chunk's
    partial product once (<= the dtype's unit roundoff eps / 2 of the sum). Accumulating in the low
    precision itself would miss both (about 64 roundings)."""
    monkeypatch.setitem(_linear._CPU_DW_MODE, dtype, mode)
    monkeypatch.setattr(_linear, "_DW_SLICE_BYTES", 1 << 16)  # several V slices, a ragged last one
    T, H, V, chunk = 512, 48, 1001, 8
    hidden, weight = torch.rand(T, H).to(dtype), torch.randn(V, H).to(dtype)
    g = (torch.rand(T, V) / V).to(dtype)
    head = _linear._Head(hidden, weight, None, chunk, False, True, False)
    for s in range(0, T, chunk):
        head.accumulate(g[s:s + chunk].clone(), s, s + chunk)
    assert head.gw.dtype == torch.float32
    ref = g.double().T @ hidden.double()
    _, row = _rel_rows(head.gw, ref)
    bound = 1e-5 if mode == "upcast" else torch.finfo(dtype).eps / 2 * 1.01
    assert row <= bound, (row, bound)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    inp = make_linear([5, 9, 2], tis=True)
    rest = {k: v for k, v in inp.items() if k not in ("hidden", "weight", "bias")}

    def f(h, w, b):
        loss, m = vespo_ext.linear_policy_loss(h, w, bias=b, chunk_tokens=4, temperature=0.9, return_metrics=True,
                                               agg="seq-mean-token-mean", **rest)
        return loss * 2.0, m["w_seq_mean"]

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    pe = [inp[k].clone().requires_grad_(True) for k in _PARAMS]
    pc = [inp[k].clone().requires_grad_(True) for k in _PARAMS]
    oe, oc = f(*pe), compiled(*pc)
    oe[0].backward()
    oc[0].backward()
    for a, b in zip(oe, oc):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(pe, pc):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)

    def g(h, w):
        lp, ent = vespo_ext.linear_token_logprobs(h, w, inp["labels"], return_entropy=True, chunk_tokens=4)
        return (lp * 0.5 + ent * 0.1).sum()

    cg = torch.compile(g, fullgraph=True, backend=backend)
    he, hc = inp["hidden"].clone().requires_grad_(True), inp["hidden"].clone().requires_grad_(True)
    g(he, inp["weight"]).backward()
    cg(hc, inp["weight"]).backward()
    torch.testing.assert_close(he.grad, hc.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# linear_token_logprobs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_token_logprobs_values_entropy_gradients(dtype, chunk):
    inp = make_linear([7, 9], H=16, V=31, dtype=dtype)
    lab = inp["labels"].clone()
    lab[[2, 11]] = -100
    c1, c2 = torch.randn(16), torch.randn(16)
    p = {k: inp[k].clone().requires_grad_(True) for k in _PARAMS}
    lp, ent = vespo_ext.linear_token_logprobs(p["hidden"], p["weight"], lab, bias=p["bias"], temperature=0.7,
                                              return_entropy=True, chunk_tokens=chunk)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == (16,)
    assert float(lp[2]) == 0.0 and float(lp[11]) == 0.0
    ((lp * c1).sum() + (ent * c2).sum()).backward()
    q = {k: inp[k].double().clone().requires_grad_(True) for k in _PARAMS}
    lr, er = R.linear_token_logprobs(q["hidden"], q["weight"], lab, bias=q["bias"], temperature=0.7,
                                     return_entropy=True)
    ((lr * c1.double()).sum() + (er * c2.double()).sum()).backward()
    tol = BUDGET[dtype][1]
    assert_grad_close(lp, lr, tol, what="logp")
    assert_grad_close(ent, er, tol, what="entropy")
    for k in _PARAMS:
        assert p[k].grad.dtype == dtype
        assert_grad_close(p[k].grad, q[k].grad, tol, what=f"d {k}")
    # logp alone (no entropy requested): its gradient matches too; the padded layout keeps its shape.
    h = inp["hidden"].reshape(2, 8, -1).clone().requires_grad_(True)
    out = vespo_ext.linear_token_logprobs(h, inp["weight"], lab.reshape(2, 8), bias=inp["bias"], temperature=0.7,
                                          chunk_tokens=chunk)
    assert out.shape == (2, 8)
    (out.reshape(-1) * c1).sum().backward()
    h2 = inp["hidden"].double().clone().requires_grad_(True)
    (R.linear_token_logprobs(h2, inp["weight"].double(), lab, bias=inp["bias"].double(), temperature=0.7)
     * c1.double()).sum().backward()
    assert_grad_close(h.grad.reshape(16, -1), h2.grad, tol, what="d hidden (logp only)")


@pytest.mark.parametrize("offset", [3e4, -3e4])
def test_token_logprobs_backward_is_shift_invariant(offset):
    """A large constant in the bias changes nothing: the backward forms p = exp((z - row_max)/tau - log_sum)
    (as the rest of the core does), not exp(z/tau - lse), which loses ~ulp(3e4/tau) = 4e-3 in fp32. The
    inputs sit on a coarse binary grid so that the fp32 logits (|z| ~ 3e4) are exact and the float64
    reference sees the very same logits: any error left is the op's."""
    g = torch.Generator().manual_seed(5)
    T, H, V = 24, 16, 257
    hidden = torch.randint(-2, 3, (T, H), generator=g).float()
    weight = torch.randint(-8, 9, (V, H), generator=g).float() / 16
    bias = offset + torch.randint(-32, 33, (V,), generator=g).float() / 16
    lab = torch.randint(0, V, (T,), generator=g)
    lab[3] = -100
    c1, c2 = torch.randn(T, generator=g), torch.randn(T, generator=g)
    for chunk in (5, None):
        p = {"hidden": hidden.clone().requires_grad_(True), "weight": weight.clone().requires_grad_(True),
             "bias": bias.clone().requires_grad_(True)}
        lp, ent = vespo_ext.linear_token_logprobs(p["hidden"], p["weight"], lab, bias=p["bias"], temperature=0.7,
                                                  return_entropy=True, chunk_tokens=chunk)
        ((lp * c1).sum() + (ent * c2).sum()).backward()
        q = {k: v.detach().double().requires_grad_(True) for k, v in p.items()}
        lr, er = R.linear_token_logprobs(q["hidden"], q["weight"], lab, bias=q["bias"], temperature=0.7,
                                         return_entropy=True)
        ((lr * c1.double()).sum() + (er * c2.double()).sum()).backward()
        assert_grad_close(lp, lr, 2e-4, what="logp")
        assert_grad_close(ent, er, 2e-4, what="entropy")
        for k in _PARAMS:
            assert_grad_close(p[k].grad, q[k].grad, 2e-4, what=f"d {k} (offset {offset}, chunk {chunk})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_entropy_backward_with_minus_inf_logits(dtype):
    """A -inf logit (a banned token's bias) has p = 0: its entropy-gradient term is 0, not 0 * -inf = NaN;
    the rest matches the float64 reference with a very negative finite bias there."""
    g = torch.Generator().manual_seed(3)
    T, H, V = 9, 8, 37
    h, w = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    b = torch.zeros(V)
    b[[3, 5]] = float("-inf")
    lab = torch.randint(6, V, (T,), generator=g)
    p = {k: v.to(dtype).clone().requires_grad_(True) for k, v in (("hidden", h), ("weight", w), ("bias", b))}
    lp, ent = vespo_ext.linear_token_logprobs(p["hidden"], p["weight"], lab, bias=p["bias"], return_entropy=True,
                                              chunk_tokens=4)
    (lp.sum() + ent.sum()).backward()
    q = {k: v.to(dtype).detach().double().requires_grad_(True) for k, v in (("hidden", h), ("weight", w),
                                                                   ("bias", b.clamp(min=-1e4)))}
    lr, er = R.linear_token_logprobs(q["hidden"], q["weight"], lab, bias=q["bias"], return_entropy=True)
    (lr.sum() + er.sum()).backward()
    assert float(p["bias"].grad[3]) == float(p["bias"].grad[5]) == 0.0
    for k in _PARAMS:
        assert_grad_close(p[k].grad, q[k].grad, BUDGET[dtype][1], what=f"d {k}")


def test_token_logprobs_compose_with_policy_loss_from_logp():
    inp = make_linear([6, 10, 4], tis=True)
    rest = {k: inp[k] for k in ("old_logp", "advantages", "mask", "cu_seqlens", "rollout_is_weights")}
    p = {k: inp[k].clone().requires_grad_(True) for k in _PARAMS}
    lp = vespo_ext.linear_token_logprobs(p["hidden"], p["weight"], torch.where(inp["mask"], inp["labels"], -100),
                                         bias=p["bias"], chunk_tokens=6)
    vespo_ext.policy_loss_from_logp(lp, **rest).backward()
    _, g, _ = run_lin(inp, chunk_tokens=6)
    for k in _PARAMS:
        assert_grad_close(p[k].grad, g[k], 1e-5, what=f"d {k}")


# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    inp = make_linear([4, 5])
    h, w, b, lab = inp["hidden"], inp["weight"], inp["bias"], inp["labels"]
    rest = {k: inp[k] for k in ("old_logp", "advantages", "mask", "cu_seqlens")}

    def call(**over):
        a = dict(hidden=h, weight=w, labels=lab, bias=b, **rest)
        a.update(over)
        return vespo_ext.linear_policy_loss(a.pop("hidden"), a.pop("weight"), a.pop("labels"), a.pop("old_logp"),
                                            a.pop("advantages"), a.pop("mask"), **a)

    cases = [
        (dict(weight=w[:, :-1]), ValueError, r"weight must have shape \(V, H=16\)"),
        (dict(weight=w[0]), ValueError, r"weight must be \(V, H\)"),
        (dict(weight=w.double()), TypeError, "weight must have hidden's dtype"),
        (dict(weight=w.to("meta")), ValueError, "weight must be on hidden's device"),
        (dict(bias=b[:-1]), ValueError, r"bias must have shape \(V,\)"),
        (dict(bias=b.half()), TypeError, "bias must have hidden's dtype"),
        (dict(bias=b.to("meta")), ValueError, "bias must be on hidden's device"),
        (dict(bias=[1.0]), TypeError, "bias must be a torch.Tensor"),
        (dict(hidden=h.int()), TypeError, "hidden must be float32"),
        (dict(hidden=h[0]), ValueError, r"hidden must be \(T, H\) packed"),
        (dict(hidden=h.numpy()), TypeError, "hidden must be a torch.Tensor"),
        (dict(labels=lab[:-1]), ValueError, "labels must have shape"),
        (dict(labels=lab.float()), TypeError, "labels must be an integer tensor"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens must be >= 1"),
        (dict(chunk_tokens=-3), ValueError, "chunk_tokens must be >= 1"),
        (dict(chunk_tokens=2.0), TypeError, "chunk_tokens must be an int"),
        (dict(chunk_tokens=True), TypeError, "chunk_tokens must be an int"),
        (dict(old_logp=inp["old_logp"][:-1]), ValueError, "old_logp must have shape"),
        (dict(cu_seqlens=None), ValueError, "cu_seqlens"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(loss="ppo"), ValueError, "loss must be one of"),
        (dict(k_pos="x"), TypeError, "k_pos"),
    ]
    for over, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call(**over)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        vespo_ext.linear_token_logprobs(h, w, lab, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H=16\)"):
        vespo_ext.linear_token_logprobs(h, w[:, :3], lab)
    with pytest.raises(IndexError, match="ignore_index"):
        vespo_ext.linear_token_logprobs(h, w, torch.full_like(lab, 99))


def test_second_backward_through_the_same_graph_is_a_clear_error():
    inp = make_linear([4, 6])
    h = inp["hidden"].clone().requires_grad_(True)
    loss = vespo_ext.linear_policy_loss(h, inp["weight"], inp["labels"], inp["old_logp"], inp["advantages"],
                                        inp["mask"], cu_seqlens=inp["cu_seqlens"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()


def test_opcheck():
    """torch.library.opcheck of both ops (schema, autograd registration, fake tensors, AOT dispatch). The
    gradient outputs are still held by opcheck here, so the backward scales them out of place."""
    inp = make_linear([3, 4, 3])
    h, w, b = (inp[k].clone().requires_grad_(True) for k in _PARAMS)
    args = (h, w, b, inp["labels"], inp["old_logp"], inp["advantages"], inp["mask"], inp["cu_seqlens"], None, None,
            1.0, 0, [2.0, 3.0, 3.0, 2.0], 0, 0.0, 4, True, True, True)
    torch.library.opcheck(torch.ops.vespo.linear_policy_loss.default, args)
    torch.library.opcheck(torch.ops.vespo.linear_token_logprobs.default, (h, w, b, inp["labels"], 1.0, True, -100, 4))
