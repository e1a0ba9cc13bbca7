"""vespo_ext.rollout_correction (vespo_ext/rollout_corr.py): IS weights, rejection masks and mismatch metrics against a plain
per-sequence float64 computation written out below, padded = packed, the masks' effect on the loss
and its gradient, VESPO's once-per-sequence weight, bad inputs; and (when veRL 0.9.1 is installed)
against veRL's own rollout-correction helpers on the same inputs."""
import math

import pytest
import torch

import vespo_ext
from vespo_ext import reference as R
from vespo_ext.rollout_corr import rollout_correction

LOWER_UPPER_RS = ["token_k1", "seq_sum_k1", "seq_mean_k1"]
UPPER_RS = ["token_k2", "token_k3", "seq_sum_k2", "seq_sum_k3", "seq_mean_k2", "seq_mean_k3", "seq_max_k2",
            "seq_max_k3"]


def _batch(B=6, L=9, spread=0.3, seed=0, empty=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    roll = old + torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[0] = True
    if empty:
        mask[1] = False  # an empty sequence
    mask[2, 1:] = False  # a one-token sequence
    roll = torch.where(mask, roll, torch.full_like(roll, float("nan")))  # padding holds garbage
    return old, roll, mask


def _plain(old, roll, mask, *, rollout_is=None, thr=2.0, rs=None, rs_lower=None, rs_upper=None):
    """Per sequence, in Python floats: the weights and the kept mask."""
    B, L = old.shape
    w = torch.zeros(B, L, dtype=torch.float64)
    keep = mask.clone()
    for b in range(B):
        toks = [t for t in range(L) if mask[b, t]]
        lr = {t: float(old[b, t] - roll[b, t]) for t in toks}
        clampl = {t: max(-20.0, min(20.0, v)) for t, v in lr.items()}
        if rollout_is == "token":
            for t in toks:
                w[b, t] = min(math.exp(clampl[t]), thr)
        elif rollout_is == "sequence":
            s = max(-20.0, min(20.0, sum(lr.values())))
            for t in toks:
                w[b, t] = min(math.exp(s), thr)
        if rs is None or not toks:
            continue
        k = rs.rsplit("_", 1)[1]
        div = {t: (v if k == "k1" else 0.5 * v * v if k == "k2" else math.expm1(v) - v) for t, v in clampl.items()}

        def ok(x):
            return math.log(rs_lower) <= x <= math.log(rs_upper) if k == "k1" else x <= rs_upper

        if rs.startswith("token"):
            for t in toks:
                keep[b, t] = ok(div[t])
        else:
            vals = list(div.values())
            stat = sum(vals) if rs.startswith("seq_sum") else sum(vals) / len(vals) if rs.startswith("seq_mean") \
                else max(vals)
            if not ok(stat):
                keep[b] = False
    return w, keep


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_is_weights_match_plain(level):
    old, roll, mask = _batch()
    corr = rollout_correction(old, roll, mask, rollout_is=level, rollout_is_threshold=1.5)
    want, _ = _plain(old, roll, mask, rollout_is=level, thr=1.5)
    torch.testing.assert_close(corr.rollout_is_weights.double(), want, rtol=1e-6, atol=0)
    assert torch.equal(corr.mask, mask)
    m = corr.metrics
    ww = want[mask]
    assert math.isclose(m["is_mean"].item(), ww.mean().item(), rel_tol=1e-6)
    assert math.isclose(m["ess"].item(), (ww.mean() ** 2 / (ww ** 2).mean()).item(), rel_tol=1e-5)
    assert 0 < m["ess"].item() <= 1


@pytest.mark.parametrize("rs", LOWER_UPPER_RS + UPPER_RS)
def test_rejection_masks_match_plain(rs):
    old, roll, mask = _batch(spread=0.4)
    if rs.endswith("k1"):
        lo, up = (0.7, 1.6) if rs.startswith("token") else (0.5, 2.0) if "sum" in rs else (0.9, 1.1)
        spec = f"{lo}_{up}"
    else:
        lo, up = None, (0.02 if rs.startswith("token") or "mean" in rs or "max" in rs else 0.1)
        spec = up
    corr = rollout_correction(old, roll, mask, rollout_rs=rs, rollout_rs_threshold=spec)
    _, keep = _plain(old, roll, mask, rs=rs, rs_lower=lo, rs_upper=up)
    assert torch.equal(corr.mask, keep), rs
    assert 0 < keep.sum() < mask.sum(), "the case must reject some tokens and keep some"
    frac = (mask & ~keep).sum().item() / mask.sum().item()
    assert math.isclose(corr.metrics["rs_masked_frac"].item(), frac, rel_tol=1e-6)


def test_aliases_and_lower_default():
    old, roll, mask = _batch(spread=0.4)
    a = rollout_correction(old, roll, mask, rollout_rs="token", rollout_rs_threshold=1.5)
    b = rollout_correction(old, roll, mask, rollout_rs="token_k1", rollout_rs_threshold=f"{1 / 1.5}_1.5")
    c = rollout_correction(old, roll, mask, rollout_rs="geometric", rollout_rs_threshold=1.05,
                           rollout_rs_threshold_lower=0.9)
    d = rollout_correction(old, roll, mask, rollout_rs="seq_mean_k1", rollout_rs_threshold="0.9_1.05")
    assert torch.equal(a.mask, b.mask) and torch.equal(c.mask, d.mask)
    # two options: both must pass
    e = rollout_correction(old, roll, mask, rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="0.5_2.0,0.05")
    f1 = rollout_correction(old, roll, mask, rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0").mask
    f2 = rollout_correction(old, roll, mask, rollout_rs="seq_max_k3", rollout_rs_threshold=0.05).mask
    assert torch.equal(e.mask, f1 & f2)


def test_icepop_band_and_batch_normalize():
    old, roll, mask = _batch(spread=0.5)
    corr = rollout_correction(old, roll, mask, rollout_is="token", rollout_is_threshold="0.8_1.25")
    r = torch.exp(old - roll)
    want = torch.where(mask & (r >= 0.8) & (r <= 1.25), r, torch.zeros_like(r))
    torch.testing.assert_close(corr.rollout_is_weights.double(), want, rtol=1e-6, atol=0)
    norm = rollout_correction(old, roll, mask, rollout_is="sequence", rollout_is_threshold=3.0,
                              rollout_is_batch_normalize=True)
    w = norm.rollout_is_weights.double()
    seq_w = torch.stack([w[b][mask[b]][0] for b in range(w.shape[0]) if mask[b].any()])
    assert math.isclose(seq_w.mean().item(), 1.0, rel_tol=1e-6)


def test_padded_equals_packed():
    old, roll, mask = _batch()
    B, L = old.shape
    cu = torch.arange(0, B * L + 1, L)
    kw = dict(rollout_is="sequence", rollout_rs="seq_mean_k2,token_k1", rollout_rs_threshold="0.02,0.6_1.7")
    a = rollout_correction(old, roll, mask, **kw)
    b = rollout_correction(old.reshape(-1), roll.reshape(-1), mask.reshape(-1), cu_seqlens=cu.to(torch.int32), **kw)
    assert torch.equal(a.mask.reshape(-1), b.mask)
    torch.testing.assert_close(a.rollout_is_weights.reshape(-1), b.rollout_is_weights, rtol=1e-6, atol=0)
    for k in a.metrics:
        torch.testing.assert_close(a.metrics[k], b.metrics[k], rtol=1e-5, atol=1e-7, msg=k)


def test_mismatch_metrics():
    old, roll, mask = _batch()
    m = rollout_correction(old, roll, mask).metrics
    lr = (old - roll)[mask]
    assert math.isclose(m["kl"].item(), (-lr).mean().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(m["k3_kl"].item(), (lr.exp() - 1 - lr).mean().item(), rel_tol=1e-5)
    ratios = [math.exp(((roll[b] - old[b])[mask[b]]).mean().item()) for b in range(old.shape[0]) if mask[b].any()]
    assert math.isclose(m["ppl_ratio"].item(), sum(ratios) / len(ratios), rel_tol=1e-5)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in m.values())
    same = rollout_correction(old, old, mask).metrics  # no mismatch
    assert same["kl"].item() == 0 and same["k3_kl"].item() == 0 and same["ppl_ratio"].item() == 1.0


def test_rejected_tokens_get_no_gradient():
    torch.manual_seed(0)
    B, L, V = 4, 7, 11
    logits = torch.randn(B, L, V, requires_grad=True)
    labels = torch.randint(0, V, (B, L))
    old = torch.log_softmax(logits.detach(), -1).gather(-1, labels[..., None])[..., 0].double()
    roll = old + torch.randn(B, L, dtype=torch.float64) * 0.5
    corr = rollout_correction(old, roll, rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.7_1.4")
    assert (~corr.mask).any() and corr.mask.any()
    for loss in ("vespo", "grpo"):
        w, m = corr.for_loss(loss)
        out = vespo_ext.policy_loss(logits, labels, old.float(), torch.randn(B), m, loss=loss, rollout_is_weights=w)
        (g,) = torch.autograd.grad(out, logits)
        assert g[~corr.mask].abs().max() == 0 and g[corr.mask].abs().max() > 0


def test_vespo_takes_a_sequence_weight_once():
    """for_loss('vespo') in sequence mode: the fused op's log W gains log w_i once per sequence."""
    torch.manual_seed(1)
    B, L, V = 5, 6, 13
    logits = torch.randn(B, L, V, dtype=torch.float64)
    labels = torch.randint(0, V, (B, L))
    mask = torch.rand(B, L) > 0.3
    mask[:, 0] = True
    old = (torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] + 0.1 * torch.randn(B, L))
    roll = old + 0.2 * torch.randn(B, L, dtype=torch.float64)
    adv = torch.randn(B)
    corr = rollout_correction(old, roll, mask, rollout_is="sequence", rollout_is_threshold=5.0)
    w, m = corr.for_loss("vespo")
    assert torch.equal(m, mask)
    # the per-sequence sum of log w is log of the sequence weight
    seq_w = corr.rollout_is_weights.double()[:, 0]
    torch.testing.assert_close(torch.where(m, w.double().log(), torch.zeros(())).sum(-1), seq_w.log(), rtol=1e-6,
                               atol=1e-7)
    got = vespo_ext.vespo_loss(logits.float(), labels, old.float(), adv, m, rollout_is_weights=w,
                               agg="seq-mean-token-sum")
    # reference with the sequence weight written explicitly into s_i
    want = R.vespo_loss(logits, labels, old, adv, m, rollout_is_weights=w.double(), agg="seq-mean-token-sum")
    assert math.isclose(got.item(), want.item(), rel_tol=2e-4, abs_tol=1e-6)
    # token-level losses see the weight on every token
    w2, _ = corr.for_loss("grpo")
    assert torch.equal(w2, corr.rollout_is_weights)


def test_masked_garbage_is_never_read():
    old, roll, mask = _batch()
    a = rollout_correction(old, roll, mask, rollout_is="sequence", rollout_rs="seq_max_k3", rollout_rs_threshold=0.05)
    roll2 = torch.where(mask, roll, torch.full_like(roll, -float("inf")))
    b = rollout_correction(old, roll2, mask, rollout_is="sequence", rollout_rs="seq_max_k3", rollout_rs_threshold=0.05)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.rollout_is_weights, b.rollout_is_weights)
    assert all(torch.isfinite(v) for v in a.metrics.values())


@pytest.mark.parametrize("kwargs, exc, text", [
    (dict(rollout_is="tokens"), ValueError, "rollout_is"),
    (dict(rollout_is="token", rollout_is_threshold=0), ValueError, "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_is_threshold="2_1"), ValueError, "rollout_is_threshold"),
    (dict(rollout_is="token", rollout_is_threshold=True), TypeError, "rollout_is_threshold"),
    (dict(rollout_rs="token_k4", rollout_rs_threshold=2.0), ValueError, "rollout_rs"),
    (dict(rollout_rs="token_k1"), ValueError, "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), ValueError, "token_k2"),
    (dict(rollout_rs="token_k1,token_k2", rollout_rs_threshold="1,2,3"), ValueError, "rollout_rs_threshold"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold=2.0, rollout_rs_threshold_lower=3.0), ValueError,
     "rollout_rs_threshold_lower"),
])
def test_bad_arguments(kwargs, exc, text):
    old, roll, mask = _batch()
    with pytest.raises(exc, match=text):
        rollout_correction(old, roll, mask, **kwargs)


def test_bad_tensors():
    old, roll, mask = _batch()
    with pytest.raises(ValueError, match="rollout_logp"):
        rollout_correction(old, roll[:, :-1], mask)
    with pytest.raises(ValueError, match="cu_seqlens"):
        rollout_correction(old.reshape(-1), roll.reshape(-1), cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="mask"):
        rollout_correction(old, roll, mask[:, :3])
    with pytest.raises(TypeError, match="old_logp"):
        rollout_correction(old.long(), roll, mask)


# ---- peer: veRL 0.9.1's own helpers -----------------------------------------------------------------
def _verl():
    try:
        from verl.trainer.ppo import rollout_corr_helper as h
    except Exception:  # noqa: BLE001 - any import failure means the peer is absent
        pytest.skip("veRL (with its rollout_corr_helper) is not installed")
    return h


@pytest.mark.parametrize("level, thr", [("token", 2.0), ("sequence", 2.0), ("token", "0.5_1.5"),
                                        ("sequence", "0.5_3.0")])
def test_peer_verl_is_weights(level, thr):
    h = _verl()
    # no empty sequence: veRL averages per-sequence statistics over every row, empty ones counting
    # as a perplexity ratio of 1; ours average over the non-empty sequences (intended difference)
    old, roll, mask = _batch(spread=0.3, empty=False)
    roll = torch.where(mask, roll, old)  # veRL multiplies by the mask: padding must be finite there
    vw, vm, vmet = h.compute_rollout_correction_and_rejection_mask(old, roll, mask.double(), rollout_is=level,
                                                                   rollout_is_threshold=thr)
    ours = rollout_correction(old, roll, mask, rollout_is=level, rollout_is_threshold=thr)
    torch.testing.assert_close(ours.rollout_is_weights.double(), vw.batch["rollout_is_weights"], rtol=1e-6, atol=0)
    m = ours.metrics
    for mine, theirs in (("is_mean", "rollout_is_mean"), ("ess", "rollout_is_eff_sample_size"), ("kl", "kl"),
                         ("k3_kl", "k3_kl"), ("ppl_ratio", "ppl_ratio"), ("training_ppl", "training_ppl"),
                         ("rollout_ppl", "rollout_ppl"), ("chi2_token", "chi2_token")):
        # veRL's ESS divides by (mean + 1e-8): a relative difference of ~1e-8
        assert math.isclose(m[mine].item(), vmet[f"rollout_corr/{theirs}"], rel_tol=1e-5, abs_tol=1e-7), mine


@pytest.mark.parametrize("rs, thr", [("token_k1", "0.7_1.4285714285714286"), ("seq_sum_k1", "0.5_2.0"),
                                     ("seq_mean_k1", "0.9_1.1111111111111112"), ("token_k3", 0.02),
                                     ("seq_max_k2", 0.05), ("seq_mean_k3", 0.01), ("seq_sum_k2", 0.1)])
def test_peer_verl_rejection(rs, thr):
    """veRL 0.9.1 applies a k1 option's [lower, upper] to 1/r (its statistic is −log r) while its
    docs call them ratio bounds; we bound r itself. With lower = 1/upper the two are the same test,
    which is what is compared here."""
    h = _verl()
    old, roll, mask = _batch(spread=0.4, empty=False)
    roll = torch.where(mask, roll, old)
    _, vm, vmet = h.compute_rollout_correction_and_rejection_mask(old, roll, mask.double(), rollout_is=None,
                                                                  rollout_rs=rs, rollout_rs_threshold=thr)
    ours = rollout_correction(old, roll, mask, rollout_rs=rs, rollout_rs_threshold=thr)
    assert torch.equal(ours.mask, vm.bool())
    assert math.isclose(ours.metrics["rs_masked_frac"].item(), vmet["rollout_corr/rollout_rs_masked_fraction"],
                        rel_tol=1e-6, abs_tol=1e-9)
