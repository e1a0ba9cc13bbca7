"""The framework adapters (vespo_ext.integrations) without the frameworks installed.

* `import vespo_ext` (and `vespo_ext.integrations`) must not import veRL or TRL.
* The veRL adapter's functions are plain callables: they are checked here against an independent
  float64 transcription of docs/spec.md's per-token losses, aggregated the way veRL 0.9's `agg_loss`
  aggregates (global token / sequence counts for data parallelism included). tests/test_peers.py
  compares the same functions with veRL's and TRL's own code when those are installed.

The SPEC helpers below (`spec_per_token`, `verl_agg`) are imported by tests/test_peers.py.
"""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import zlib

import pytest
import torch

LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")
VERL_AGGS = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
HAS_VERL = importlib.util.find_spec("verl") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None
# float64 SAPO agrees to ~5e-8 relative, not 1e-12: the op's gate is 4 / (tau + 1e-8) * sigmoid(...)
# (SPEC, veRL and TRL: 4 / tau), and reference.py (the float64 path) builds tau with
# torch.where(cond, tau_pos, tau_neg) on Python floats, which rounds tau to float32 (1.05 -> 1.0499999523).
SAPO_FP64_RTOL = 1e-6


# ---------------------------------------------------------------------------------------------
# docs/spec.md per-token losses (float64, padded (B, L)) and veRL 0.9's aggregation, written from the
# math, not from any framework's code.
def _first_counted(x, mask):
    """x at the first counted position of each row (0 for an empty row)."""
    B, L = mask.shape
    idx = torch.where(mask, torch.arange(L).expand(B, L), L).min(-1).values.clamp(max=L - 1)
    return torch.where(mask.any(-1), x.gather(1, idx.unsqueeze(1)).squeeze(1), torch.zeros((), dtype=x.dtype))


def _t(x, like):
    return torch.tensor(x, dtype=like.dtype)  # not torch.where(c, float, float): that rounds to float32


def spec_per_token(loss, logp, old, adv, mask, isw=None, **p):
    """docs/spec.md's per-token loss L_t (B, L); differentiable in logp where docs/spec.md says so."""
    m = mask.bool()
    z = torch.zeros((), dtype=logp.dtype)
    adv = adv.expand_as(logp) if adv.dim() == 2 else adv.unsqueeze(1).expand_as(logp)
    if loss == "vespo":
        k_pos, lam_pos, k_neg, lam_neg = (p.get(k, d) for k, d in (("k_pos", 2.0), ("lambda_pos", 3.0),
                                                                   ("k_neg", 3.0), ("lambda_neg", 2.0)))
        s = torch.where(m, (logp.detach() - old).clamp(-20, 20), z).sum(-1)
        if isw is not None:
            s = s + torch.where(m, torch.log(isw.clamp(min=1e-8)).clamp(-20, 20), z).sum(-1)
        W = torch.exp(s.clamp(-20, 20))
        pos = _first_counted(adv, m) >= 0
        k = torch.where(pos, _t(k_pos, logp), _t(k_neg, logp))
        lam = torch.where(pos, _t(lam_pos, logp), _t(lam_neg, logp)).clamp(min=1e-4)
        phi = torch.nan_to_num(torch.exp(lam + k * torch.log(W.clamp(min=1e-8)) - lam * W), nan=0.0, posinf=0.0,
                               neginf=0.0)
        return -phi.unsqueeze(1) * adv * logp  # TIS folded into W, not multiplied
    if loss == "grpo":
        lo, hi, c = p.get("clip_ratio_low", 0.2), p.get("clip_ratio_high", 0.2), p.get("clip_ratio_c", 3.0)
        r = torch.exp((logp - old).clamp(-20, 20))
        l1 = torch.maximum(-adv * r, -adv * r.clamp(1 - lo, 1 + hi))
        out = torch.where(adv < 0, torch.minimum(l1, -adv * c), l1)
    elif loss == "gspo":
        lo, hi = p.get("clip_ratio_low", 3e-4), p.get("clip_ratio_high", 4e-4)
        s_hat = torch.where(m, logp - old, z).sum(-1) / m.sum(-1).clamp(min=1)
        s = torch.exp((s_hat.detach().unsqueeze(1) + logp - logp.detach()).clamp(max=10))
        out = torch.maximum(-adv * s, -adv * s.clamp(1 - lo, 1 + hi))
    elif loss == "sapo":
        tp, tn = p.get("tau_pos", 1.0), p.get("tau_neg", 1.05)
        r = torch.exp((logp - old).clamp(-20, 20))
        tau = torch.where(adv > 0, _t(tp, logp), _t(tn, logp))  # per token, as veRL
        out = -(4.0 / tau) * torch.sigmoid(tau * (r - 1)) * adv
    elif loss == "cispo":
        lo, hi = p.get("clip_ratio_low", 0.2), p.get("clip_ratio_high", 0.2)
        r = torch.exp(logp.detach() - old)
        out = -r.clamp(1 - lo, 1 + hi) * adv * logp
    else:
        raise ValueError(loss)
    return out if isw is None else out * isw


def verl_agg(per_token, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None):
    """veRL 0.9's agg_loss semantics (masked positions may hold anything)."""
    m = mask.to(per_token.dtype)
    masked = torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype))
    if mode == "token-mean":
        n = m.sum() if batch_num_tokens is None else batch_num_tokens
        return masked.sum() / n * dp_size
    if mode == "token-sum":
        return masked.sum() * dp_size
    nonempty = (m.sum(-1) > 0).to(per_token.dtype)
    gbs = nonempty.sum() if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        seq = masked.sum(-1) / (m.sum(-1) + 1e-8)
        return (seq * nonempty).sum() / gbs * dp_size
    loss = (masked.sum(-1) * nonempty).sum() / gbs * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def make_batch(B=6, L=9, *, seed=0, spread=0.35, adv="seq", empty_row=True, dtype=torch.float64, tis=False):
    """veRL-style padded batch: right padding, GRPO advantages broadcast over tokens (B, L)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logp + spread * torch.randn(B, L, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    if empty_row and B > 2:
        lengths[2] = 0
    mask = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    a = torch.randn(B, generator=g, dtype=torch.float64)
    a[0], a[1] = abs(a[0]) + 0.2, -abs(a[1]) - 0.2
    if B > 3:
        a[3] = 0.0
    advantages = a.unsqueeze(1).expand(B, L).clone()
    if adv == "token":  # per-token advantages whose sign changes inside a sequence
        advantages = advantages + torch.randn(B, L, generator=g, dtype=torch.float64)
    # garbage at uncounted positions must not matter
    old = torch.where(mask, old, torch.full_like(old, 123.0))
    out = dict(old_log_prob=old.to(dtype), log_prob=logp.to(dtype), advantages=advantages.to(dtype), response_mask=mask)
    if tis:
        w = torch.exp(0.3 * torch.randn(B, L, generator=g, dtype=torch.float64))
        out["rollout_is_weights"] = w.to(dtype)
    return out


class Cfg(dict):
    """A DictConfig-like config: .get and attribute access (what veRL's configs offer)."""

    __getattr__ = dict.__getitem__


def verl_cfg(loss, **kw):
    base = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0, "tau_pos": 1.0,
            "tau_neg": 1.05, "loss_scale_factor": None, "global_batch_info": {}, "policy_loss": Cfg(loss_mode=loss)}
    if loss == "gspo":
        base.update(clip_ratio_low=3e-4, clip_ratio_high=4e-4)
    base.update(kw)
    return Cfg(base)


def spec_params(loss, cfg):
    if loss == "grpo":
        return dict(clip_ratio_low=cfg["clip_ratio_low"], clip_ratio_high=cfg["clip_ratio_high"],
                    clip_ratio_c=cfg["clip_ratio_c"])
    if loss in ("gspo", "cispo"):
        return dict(clip_ratio_low=cfg["clip_ratio_low"], clip_ratio_high=cfg["clip_ratio_high"])
    if loss == "sapo":
        return dict(tau_pos=cfg["tau_pos"], tau_neg=cfg["tau_neg"])
    return dict(cfg["policy_loss"].get("vespo", {}))


def expected_verl_style(loss, batch, mode, cfg):
    """(loss, grad wrt log_prob) of SPEC's loss aggregated like veRL 0.9, float64."""
    lp = batch["log_prob"].double().detach().requires_grad_(True)
    isw = batch.get("rollout_is_weights")
    per = spec_per_token(loss, lp, batch["old_log_prob"].double(), batch["advantages"].double(),
                         batch["response_mask"], None if isw is None else isw.double(), **spec_params(loss, cfg))
    info = dict(cfg["global_batch_info"])
    info.setdefault("loss_scale_factor", cfg.get("loss_scale_factor"))
    if loss == "sapo":
        mode = "seq-mean-token-mean"
    out = verl_agg(per, batch["response_mask"], mode, **info)
    out.backward()
    return out.detach(), lp.grad


def run_adapter(name, batch, mode, cfg, dtype=torch.float32, device="cpu"):
    import vespo_ext.integrations.verl as V

    b = {k: (v.to(dtype) if v.dtype.is_floating_point else v).to(device) for k, v in batch.items()}
    lp = b.pop("log_prob").detach().clone().requires_grad_(True)
    loss, metrics = V.policy_loss_fn(name)(b["old_log_prob"], lp, b["advantages"], b["response_mask"], mode, cfg,
                                           b.get("rollout_is_weights"))
    loss.backward()
    assert loss.device.type == lp.grad.device.type == torch.device(device).type
    return loss.detach().cpu(), lp.grad.cpu(), metrics


def assert_close(got, want, rtol, what, atol=1e-12):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * scale + atol, f"{what}: max |err| {err:.3g} > {rtol} * {scale:.3g}"


# ---------------------------------------------------------------------------------------------
def test_import_does_not_pull_frameworks():
    code = ("import sys, vespo_ext, vespo_ext.integrations\n"
            "vespo_ext.policy_loss_from_logp\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('verl', 'trl', 'ray', 'transformers'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_integrations_package_lists_adapters():
    import vespo_ext

    assert set(vespo_ext.integrations.__all__) == {"verl", "trl", "hf"}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", VERL_AGGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_verl_adapter_matches_spec(loss, mode, dtype, device):
    batch = make_batch(seed=zlib.crc32(f"{loss}{mode}".encode()) % 1000, tis=(mode == "token-mean"))
    cfg = verl_cfg(loss)
    got, grad, metrics = run_adapter(f"{loss}_fused", batch, mode, cfg, dtype, device)
    want, want_grad = expected_verl_style(loss, batch, mode, cfg)
    tol = (SAPO_FP64_RTOL if loss == "sapo" else 1e-10) if dtype == torch.float64 else 2e-5
    assert_close(got, want, tol, "loss", atol=1e-7 if dtype == torch.float32 else 1e-12)
    assert_close(grad, want_grad, tol, "grad")
    assert grad.dtype == dtype
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", VERL_AGGS)
def test_verl_adapter_global_batch_info(loss, mode):
    """Data parallelism: veRL normalises by the global token / sequence counts times dp_size."""
    batch = make_batch(seed=7)
    info = {"dp_size": 4, "batch_num_tokens": torch.tensor(137), "global_batch_size": 23, "loss_scale_factor": 11}
    cfg = verl_cfg(loss, global_batch_info=info, loss_scale_factor=11)
    got, grad, _ = run_adapter(f"{loss}_fused", batch, mode, cfg, torch.float64)
    want, want_grad = expected_verl_style(loss, batch, mode, cfg)
    tol = SAPO_FP64_RTOL if loss == "sapo" else 1e-10
    assert_close(got, want, tol, "loss")
    assert_close(grad, want_grad, tol, "grad")


def test_verl_adapter_reads_config_fields():
    import vespo_ext.integrations.verl as V

    batch = make_batch(seed=3, spread=0.8)
    # clip_ratio_low/high None fall back to clip_ratio
    cfg = verl_cfg("grpo", clip_ratio=0.1, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=2.0)
    got, _, _ = run_adapter("grpo_fused", batch, "token-mean", cfg, torch.float64)
    want, _ = expected_verl_style("grpo", batch, "token-mean", dict(cfg, clip_ratio_low=0.1, clip_ratio_high=0.1))
    assert_close(got, want, 1e-10, "grpo loss")
    # the VESPO recipe's policy_loss.vespo section
    vespo = {"k_pos": 1.5, "lambda_pos": 2.5, "k_neg": 4.0, "lambda_neg": 1.0}
    cfg = verl_cfg("vespo", policy_loss=Cfg(loss_mode="vespo_fused", vespo=vespo))
    got, _, metrics = run_adapter("vespo_fused", batch, "token-mean", cfg, torch.float64)
    want, _ = expected_verl_style("vespo", batch, "token-mean", cfg)
    assert_close(got, want, 1e-10, "vespo loss")
    assert metrics["vespo/k_neg"] == 4.0 and metrics["vespo/lambda_neg"] == 1.0
    # set_vespo_params changes the defaults used without a section
    try:
        V.set_vespo_params(k_pos=1.5, lambda_pos=2.5, k_neg=4.0, lambda_neg=1.0)
        got2, _, _ = run_adapter("vespo_fused", batch, "token-mean", verl_cfg("vespo"), torch.float64)
        assert_close(got2, want, 1e-12, "vespo loss with set_vespo_params")
    finally:
        V.set_vespo_params(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    with pytest.raises(TypeError):
        V.set_vespo_params(kpos=1.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        run_adapter("grpo_fused", batch, "token-mean", verl_cfg("grpo", clip_ratio_c=1.0))


def test_verl_adapter_errors_and_edge_cases():
    batch = make_batch(seed=5)
    with pytest.raises(ValueError, match="batch_num_tokens"):
        run_adapter("grpo_fused", batch, "token-mean", verl_cfg("grpo", global_batch_info={"dp_size": 2}))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        run_adapter("grpo_fused", batch, "token-meen", verl_cfg("grpo"))
    empty = dict(batch, response_mask=torch.zeros_like(batch["response_mask"]))
    for loss in LOSSES:
        got, grad, metrics = run_adapter(f"{loss}_fused", empty, "token-mean", verl_cfg(loss))
        assert float(got) == 0.0 and bool((grad == 0).all())  # veRL's token-mean gives 0/0 = NaN here
        assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.skipif(HAS_VERL, reason="veRL is installed (tests/test_peers.py covers registration)")
def test_verl_register_without_verl():
    import vespo_ext.integrations.verl as V

    with pytest.raises(ImportError, match="veRL"):
        V.register()
    with pytest.raises(ValueError):
        V.policy_loss_fn("vanilla")


@pytest.mark.skipif(HAS_TRL, reason="TRL is installed (tests/test_peers.py covers the TRL adapter)")
def test_trl_adapter_without_trl():
    with pytest.raises(ImportError, match="TRL"):
        import vespo_ext.integrations.trl  # noqa: F401
