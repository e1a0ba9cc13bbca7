"""Shared fixtures and helpers for the vespo test-suite.

* `device` fixture: "cpu", plus "cuda" and "cuda-v2" (the second generation of the CUDA log-prob
  kernels) when a GPU is visible and vespo_ext._cuda imports (the CUDA parameters are always
  generated and skipped otherwise, so the test ids are stable).
* Random input builders for the padded (B, L, V) and packed (T, V) layouts.
* Runners for the fused op and for the float64 reference on the *same* values, and the error
  budgets of the issue (loss: 2e-4 of the loss's scale; gradient: 2e-4 of the reference gradient's
  largest element, 1e-2 for bf16/fp16 logits).
"""
from __future__ import annotations

import math
import os
import zlib

# The suite's bad-label tests expect the IndexError at the call; on CUDA the check is deferred by
# default (no host sync per step). test_fuzz_regressions.py covers the deferred path on its own.
os.environ.setdefault("VESPO_SYNC_CHECKS", "1")

import pytest
import torch

import vespo_ext
from vespo_ext import METRIC_NAMES
from vespo_ext import reference as R
from vespo_ext._inputs import pack_inputs


def _cuda_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import vespo_ext._cuda  # noqa: F401
    except ImportError:
        return False
    return True


CUDA_OK = _cuda_ok()
_NEEDS_CUDA = [pytest.mark.cuda,
               pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and the vespo_ext._cuda module")]
# "cuda" runs the kernels VESPO_CUDA_KERNELS names (v1 when unset), "cuda-v2" the second generation
# (vespo_ext._cuda.set_kernel_variant, in this process: no CUDA re-initialisation per variant).
DEVICES = ["cpu", pytest.param("cuda", marks=_NEEDS_CUDA), pytest.param("cuda-v2", marks=_NEEDS_CUDA)]
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
COUNT_METRICS = ("n_pos", "n_neg", "n_seq", "n_tokens")
TINY = 1e-30


@pytest.fixture(params=DEVICES)
def device(request):
    name = request.param
    if name.startswith("cuda-"):
        from vespo_ext import _cuda

        _cuda.set_kernel_variant(name[len("cuda-"):])
        request.addfinalizer(lambda: _cuda.set_kernel_variant(None))
        return torch.device("cuda")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed, per-test seed (stable across runs and independent of test order)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF)


# ---------------------------------------------------------------------------------------------
# Input builders
def grad_tol_for(dtype) -> float:
    return 2e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def _logits(shape, V, dtype, device, scale=2.0):
    return (torch.randn(*shape, V, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def _true_logp(logits, labels, temperature):
    """float64 log pi at the labels (labels clamped into range), for building old_logp near it."""
    x = logits.double() / temperature
    return x.gather(-1, labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, -1)


def _advantages_seq(n, device):
    a = torch.randn(n, dtype=torch.float32)
    if n >= 2:
        a[0], a[1] = a[0].abs() + 0.1, -(a[1].abs() + 0.1)  # both signs present
    if n >= 3:
        a[2] = 0.0  # exactly zero
    return a.to(device)


def make_padded(B=4, L=6, V=13, *, device="cpu", dtype=torch.float32, adv="seq", tis=False, temperature=1.0,
                drift=0.3, holes=True, logit_scale=2.0):
    """Padded batch: right padding (each row keeps >= 1 token) plus a few random holes.

    old_logp = log pi + noise with sum-of-noise ~ N(0, drift) per sequence, so W stays near 1 and
    phi is far from 0 (the interesting regime for error budgets).
    """
    device = torch.device(device)
    logits = _logits((B, L), V, dtype, device, logit_scale)
    labels = torch.randint(0, V, (B, L), device=device)
    lengths = torch.randint(1, L + 1, (B,))
    lengths[0] = L
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    if holes and L > 2:
        hole = torch.rand(B, L) < 0.15
        hole[:, 0] = False
        mask &= ~hole
    mask = mask.to(device)
    lp = _true_logp(logits, labels, temperature)
    old = (lp + drift * torch.randn(B, L, dtype=torch.float64, device=device) / math.sqrt(L)).float()
    if adv == "seq":
        advantages = _advantages_seq(B, device)
    else:  # per token: a per-sequence value with a few different (and mixed-sign, and zero) tokens
        advantages = _advantages_seq(B, device).unsqueeze(1).repeat(1, L)
        advantages += (torch.rand(B, L, device=device) < 0.3) * torch.randn(B, L, device=device)
        advantages[-1, -1] = 0.0
    inp = dict(logits=logits, labels=labels, old_logp=old, advantages=advantages, mask=mask)
    if tis:
        w = torch.exp(0.3 * torch.randn(B, L))
        w[-1, -1] = 0.0  # log clamps at 1e-8
        inp["rollout_is_weights"] = w.to(device)
    return inp


def make_packed(lengths, V=13, *, device="cpu", dtype=torch.float32, adv="seq", tis=False, temperature=1.0,
                drift=0.3, mask_p=0.9, cu_dtype=torch.int64):
    device = torch.device(device)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    S, T = lengths.numel(), int(lengths.sum())
    cu = torch.zeros(S + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    logits = _logits((T,), V, dtype, device)
    labels = torch.randint(0, V, (T,), device=device)
    mask = (torch.rand(T) < mask_p).to(device)
    lp = _true_logp(logits, labels, temperature)
    seq = torch.repeat_interleave(torch.arange(S), lengths).to(device)
    per_len = lengths.clamp(min=1).double().to(device)[seq]
    old = (lp + drift * torch.randn(T, dtype=torch.float64, device=device) / per_len.sqrt()).float()
    advantages = _advantages_seq(S, device)
    if adv == "token":
        advantages = advantages[seq].clone()
    inp = dict(logits=logits, labels=labels, old_logp=old, advantages=advantages, mask=mask,
               cu_seqlens=cu.to(device=device, dtype=cu_dtype))
    if tis:
        inp["rollout_is_weights"] = torch.exp(0.3 * torch.randn(T)).to(device)
    return inp


def pack_padded(inp):
    """The padded batch as a packed one, padding positions included (cu = arange * L)."""
    B, L, V = inp["logits"].shape
    out = {k: v.reshape(B * L, *v.shape[2:]) for k, v in inp.items() if k != "advantages"}
    adv = inp["advantages"]
    out["advantages"] = adv.reshape(-1) if adv.dim() == 2 else adv
    out["cu_seqlens"] = torch.arange(B + 1, device=inp["logits"].device) * L
    return out


# ---------------------------------------------------------------------------------------------
# Runners
def to_double(inp):
    return {k: (v.double() if v.dtype.is_floating_point else v) if isinstance(v, torch.Tensor) else v
            for k, v in inp.items()}


def run_fused(inp, fn=None, **kw):
    """(loss, grad, metrics) of the fused op; the logits are cloned so `inp` stays intact."""
    fn = fn or vespo_ext.vespo_loss
    logits = inp["logits"].detach().clone().requires_grad_(True)
    args = {k: v for k, v in inp.items() if k != "logits"}
    loss, metrics = fn(logits, return_metrics=True, **args, **kw)
    loss.backward()
    # (whether metrics carry autograd history is tested on its own: test_metrics_are_not_differentiable)
    return loss.detach(), logits.grad, {k: v.detach() for k, v in metrics.items()}


def run_ref(inp, fn=None, **kw):
    """(loss, grad, metrics) of the reference in float64 on the same values (inputs upcast)."""
    fn = fn or R.vespo_loss
    d = to_double(inp)
    logits = d.pop("logits").requires_grad_(True)
    loss, metrics = fn(logits, return_metrics=True, **d, **kw)
    loss.backward()
    return loss.detach(), logits.grad, metrics


def vespo_loss_scale(inp, *, temperature=1.0, agg="token-mean", norm=None, **params):
    """sum_t |c_t * log pi_t| where loss = sum_t c_t log pi_t (c_t = -phi_i A_t m_t a_t, phi detached).

    The scale the loss's absolute error budget is relative to; c_t is the reference's own
    dloss/dlogp (the loss is linear in log pi once phi is fixed).
    """
    d = to_double(inp)
    pk = pack_inputs(d["logits"], d["labels"], d["old_logp"], d["advantages"], d.get("mask"),
                     cu_seqlens=d.get("cu_seqlens"), rollout_is_weights=d.get("rollout_is_weights"),
                     temperature=temperature, norm=norm)
    V = pk.logits.shape[-1]
    m = pk.mask if pk.mask is not None else torch.ones_like(pk.labels, dtype=torch.bool)
    x = torch.where(m.unsqueeze(-1), pk.logits, 0.0) / temperature
    lp = (x.gather(-1, torch.where(m, pk.labels, 0).clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
          - torch.logsumexp(x, -1)).detach().requires_grad_(True)
    loss = R.policy_loss_from_logp(lp, pk.old_logp, pk.advantages, m, loss="vespo", cu_seqlens=pk.cu_seqlens,
                                   rollout_is_weights=pk.rollout_is_weights, agg=agg,
                                   norm=None if pk.norm is None else pk.norm.double(), norm_len=pk.norm_len, **params)
    (c,) = torch.autograd.grad(loss, lp, allow_unused=True)
    if c is None:
        return 0.0
    return float((c * lp.detach()).abs().sum())


def assert_loss_close(fused_loss, ref_loss, scale, tol=2e-4, what="loss"):
    f, r = float(torch.as_tensor(fused_loss).detach()), float(torch.as_tensor(ref_loss).detach())
    assert math.isfinite(f), f"{what} is not finite: {f}"
    budget = tol * max(abs(r), scale, TINY)
    assert abs(f - r) <= budget, f"{what}: fused {f!r} vs reference {r!r} (|err| {abs(f - r):.3g} > budget {budget:.3g})"


def assert_grad_close(fused_grad, ref_grad, tol, what="gradient"):
    assert fused_grad is not None, f"{what} is None"
    assert fused_grad.shape == ref_grad.shape
    fg = fused_grad.detach().double().cpu()
    rg = ref_grad.detach().double().cpu()
    assert torch.isfinite(fg).all(), f"{what} has non-finite entries"
    gmax = float(rg.abs().max()) if rg.numel() else 0.0
    err = float((fg - rg).abs().max()) if rg.numel() else 0.0
    assert err <= tol * max(gmax, TINY), f"{what}: max |err| {err:.3g} > {tol} * max|ref| {gmax:.3g}"


def assert_metrics_close(fm, rm, rtol=1e-4, atol=None):
    """Every key present, 0-d, finite; counts exact; the rest within rtol relative plus an absolute
    floor for sums that cancel to near 0 (approx_kl, log W): fp32 log-probs carry ~1e-7 relative
    rounding each, which random-walks as sqrt(n) over n counted tokens."""
    if atol is None:
        atol = 2e-6 * math.sqrt(max(float(rm["n_tokens"].detach()), 1.0))
    assert set(fm) == set(METRIC_NAMES), f"metric keys {sorted(set(fm) ^ set(METRIC_NAMES))} differ"
    for name in METRIC_NAMES:
        f, r = fm[name], rm[name]
        assert isinstance(f, torch.Tensor) and f.dim() == 0, f"metric {name} is not a 0-d tensor"
        fv, rv = float(f.detach()), float(r.detach())
        assert math.isfinite(fv), f"metric {name} = {fv} is not finite"
        if name in COUNT_METRICS:
            assert fv == rv, f"metric {name}: fused {fv} vs reference {rv}"
        else:
            assert abs(fv - rv) <= rtol * abs(rv) + atol, f"metric {name}: fused {fv!r} vs reference {rv!r}"


def check_vs_reference(inp, *, grad_tol=None, loss_tol=2e-4, metrics=True, **kw):
    """Run fused and float64 reference on the same values and check every budget; returns both."""
    grad_tol = grad_tol if grad_tol is not None else grad_tol_for(inp["logits"].dtype)
    lf, gf, mf = run_fused(inp, **kw)
    lr, gr, mr = run_ref(inp, **kw)
    assert lf.dim() == 0 and lf.dtype == torch.float32
    assert gf.dtype == inp["logits"].dtype and gf.device == inp["logits"].device
    assert_loss_close(lf, lr, vespo_loss_scale(inp, **kw), loss_tol)
    assert_grad_close(gf, gr, grad_tol)
    if metrics:
        assert_metrics_close(mf, mr)
    return (lf, gf, mf), (lr, gr, mr)
