"""The whole loss family through policy_loss, and policy_loss_from_logp, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import vespo_ext
from vespo_ext import AGGS, LOSSES, METRIC_NAMES
from vespo_ext import reference as R
from vespo_ext._spec import LOSS_PARAMS

from conftest import (KERNEL_DTYPES, assert_grad_close, assert_loss_close, assert_metrics_close, grad_tol_for,
                      make_packed, make_padded, run_fused, run_ref, to_double)

CUSTOM = {"vespo": dict(k_pos=1.5, lambda_pos=2.0, k_neg=2.5, lambda_neg=1.0),
          "grpo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0),
          "gspo": dict(clip_ratio_low=3e-3, clip_ratio_high=4e-3),
          "sapo": dict(tau_pos=1.0, tau_neg=1.05),
          "cispo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28)}


def loss_scale(inp, loss, **kw):
    """|reference loss| with every advantage of one sign: then all per-token terms share a sign and
    the aggregate is sum_t |L_t| a_t, the loss's natural scale."""
    out = 0.0
    for sign in (1.0, -1.0):
        d = dict(inp, advantages=sign * inp["advantages"].abs())
        out = max(out, abs(float(run_ref(d, fn=R.policy_loss, loss=loss, **kw)[0])))
    return out


def check_loss(inp, loss, **kw):
    lf, gf, mf = run_fused(inp, fn=vespo_ext.policy_loss, loss=loss, **kw)
    lr, gr, mr = run_ref(inp, fn=R.policy_loss, loss=loss, **kw)
    assert_loss_close(lf, lr, loss_scale(inp, loss, **kw))
    assert_grad_close(gf, gr, grad_tol_for(inp["logits"].dtype))
    assert_metrics_close(mf, mr)
    return (lf, gf, mf), (lr, gr, mr)


def test_every_loss_is_covered():
    assert set(CUSTOM) == set(LOSSES)
    assert all(set(CUSTOM[k]) == set(LOSS_PARAMS[k]) for k in LOSSES)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", (None,) + AGGS)
@pytest.mark.parametrize("tis", [False, True], ids=["notis", "tis"])
def test_loss_matches_reference(device, loss, agg, tis):
    inp = make_padded(5, 6, 13, device=device, tis=tis, adv="token", drift=1.0, temperature=0.9)
    check_loss(inp, loss, agg=agg, temperature=0.9, **CUSTOM[loss])


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_loss_packed_dtypes(device, loss, dtype):
    inp = make_packed([3, 7, 1, 0, 5], V=21, device=device, dtype=dtype, tis=True, drift=1.0)
    check_loss(inp, loss)  # default parameters and default aggregation


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_clipping_exercised(device, loss):
    """Ratios far from 1 (both ways): the clip branches and their metrics must agree too."""
    inp = make_padded(6, 8, 11, device=device, adv="seq", drift=0.0)
    inp["old_logp"] = inp["old_logp"] + 0.5 * torch.randn_like(inp["old_logp"])
    (_, _, mf), (_, _, mr) = check_loss(inp, loss)
    if loss in ("grpo", "cispo"):
        assert float(mr["clip_frac"]) > 0 and float(mr["clip_frac_low"]) > 0 and float(mr["clip_frac_high"]) > 0


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_all_masked(device, loss):
    inp = make_padded(3, 4, 7, device=device, tis=True)
    inp["mask"][:] = False
    lf, gf, mf = run_fused(inp, fn=vespo_ext.policy_loss, loss=loss)
    assert lf.item() == 0.0 and torch.count_nonzero(gf) == 0
    assert all(torch.isfinite(v) for v in mf.values())


# ---------------------------------------------------------------------------------------------
# policy_loss_from_logp
def _logp_inputs(inp):
    lp = vespo_ext.token_logprobs(inp["logits"], torch.where(inp["mask"], inp["labels"], 0))
    d = {k: v for k, v in inp.items() if k not in ("logits", "labels")}
    return lp, d


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_from_logp_matches_reference(device, loss, agg, layout):
    if layout == "padded":
        inp = make_padded(4, 6, 9, device=device, tis=True, adv="token", drift=1.0)
    else:
        inp = make_packed([4, 1, 6, 0, 3], V=9, device=device, tis=True, drift=1.0)
    lp, d = _logp_inputs(inp)
    x = lp.clone().requires_grad_(True)
    out, mf = vespo_ext.policy_loss_from_logp(x, loss=loss, agg=agg, return_metrics=True, **d)
    out.backward()
    xr = lp.double().requires_grad_(True)
    ref, mr = vespo_ext.policy_loss_from_logp(xr, loss=loss, agg=agg, return_metrics=True, **to_double(d))
    ref.backward()
    assert ref.dtype == torch.float64  # float64 routes to the reference
    assert float(out.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-7)
    assert_grad_close(x.grad, xr.grad, 1e-5)
    assert_metrics_close(mf, mr)


@pytest.mark.parametrize("loss", LOSSES)
def test_from_logp_chain_rule_equals_policy_loss(device, loss):
    """policy_loss_from_logp(log_softmax(z)) and policy_loss(z) are the same function of z."""
    inp = make_padded(3, 5, 12, device=device, tis=True, drift=1.0)
    z = inp["logits"].clone().requires_grad_(True)
    lp = torch.log_softmax(z, -1).gather(-1, inp["labels"].unsqueeze(-1)).squeeze(-1)
    d = {k: v for k, v in inp.items() if k not in ("logits", "labels")}
    a = vespo_ext.policy_loss_from_logp(lp, loss=loss, agg="seq-mean-token-mean", **d)
    a.backward()
    lf, gf, _ = run_fused(inp, fn=vespo_ext.policy_loss, loss=loss, agg="seq-mean-token-mean")
    assert float(a.detach()) == pytest.approx(float(lf), rel=1e-5, abs=1e-7)
    assert_grad_close(z.grad, gf, 1e-4)


def test_from_logp_metrics_are_not_differentiable(device):
    inp = make_padded(2, 3, 5, device=device)
    lp, d = _logp_inputs(inp)
    _, metrics = vespo_ext.policy_loss_from_logp(lp.requires_grad_(True), return_metrics=True, **d)
    assert [k for k in METRIC_NAMES if metrics[k].requires_grad] == []


@pytest.mark.parametrize("case, exc, needle", [
    ("logp-int", TypeError, "logp"), ("logp-3d", ValueError, "logp"), ("old-shape", ValueError, "old_logp"),
    ("adv-shape", ValueError, "advantages"), ("cu-padded", ValueError, "cu_seqlens"),
    ("cu-missing", ValueError, "cu_seqlens"), ("loss", ValueError, "loss"), ("agg", ValueError, "agg")])
def test_from_logp_bad_inputs(case, exc, needle):
    lp, d = torch.randn(2, 3), dict(old_logp=torch.randn(2, 3), advantages=torch.randn(2))
    kw = {}
    if case == "logp-int":
        lp = lp.long()
    elif case == "logp-3d":
        lp = lp.unsqueeze(-1)
    elif case == "old-shape":
        d["old_logp"] = d["old_logp"][:, :2]
    elif case == "adv-shape":
        d["advantages"] = torch.randn(3)
    elif case == "cu-padded":
        kw["cu_seqlens"] = torch.tensor([0, 3, 6])
    elif case == "cu-missing":
        lp, d = lp.reshape(-1), dict(old_logp=d["old_logp"].reshape(-1), advantages=d["advantages"])
    elif case == "loss":
        kw["loss"] = "ppo"
    elif case == "agg":
        kw["agg"] = "mean"
    with pytest.raises(exc, match=needle):
        vespo_ext.policy_loss_from_logp(lp, **d, **kw)


def test_loss_param_order_matches_the_kernels_named_views():
    """vespo_ext._spec.LOSS_PARAMS's order is how the binding fills SeqParams::p; the kernels read it through
    the named views in csrc/include/vespo/math.h. The two must name the same parameters in the same order."""
    import re
    from pathlib import Path

    from vespo_ext._spec import LOSS_PARAMS

    src = (Path(__file__).resolve().parents[1] / "csrc" / "include" / "vespo" / "math.h").read_text()
    views = {name: [f.strip() for f in body.replace("double", "").split(",")]
             for name, body in re.findall(r"struct (\w+Params) \{ double ([^;]+); \};", src)}
    view_of = {"vespo": "VespoParams", "grpo": "ClipParams", "gspo": "ClipParams", "cispo": "ClipParams",
               "sapo": "SapoParams"}
    assert set(view_of) == set(LOSS_PARAMS)
    for loss, params in LOSS_PARAMS.items():
        fields = views[view_of[loss]]
        assert list(params) == fields[:len(params)], (loss, list(params), fields)
