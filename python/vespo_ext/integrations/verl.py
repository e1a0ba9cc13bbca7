"""veRL integration: the fused losses as veRL policy losses.

Importing this module registers five names in veRL's policy-loss registry
(``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``):

=============== ======================= ==========================================================
name            fused loss              replaces veRL's
=============== ======================= ==========================================================
``vespo_fused`` vespo                   ``vespo`` of the VESPO recipe (not in veRL core)
``grpo_fused``  grpo (PPO-clip, dual)   ``vanilla``
``gspo_fused``  gspo                    ``gspo``
``sapo_fused``  sapo                    ``sapo``
``cispo_fused`` cispo                   ``cispo``
=============== ======================= ==========================================================

so a veRL run switches with one config line::

    VERL_USE_EXTERNAL_MODULES=vespo_ext.integrations.verl \\
    python -m verl.trainer.main_ppo ... actor_rollout_ref.actor.policy_loss.loss_mode=vespo_fused

(``VERL_USE_EXTERNAL_MODULES`` makes every veRL process, Ray workers included, import this module
when it imports ``verl``; ``import vespo_ext.integrations.verl`` or ``register()`` does the same
in one process.) Every function has veRL's ``PolicyLossFn`` signature
``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
-> (pg_loss, metrics)`` with padded ``(B, L)`` tensors, reads the same config fields as the
veRL function it replaces, aggregates exactly as veRL's ``agg_loss`` does (including the global
token / sequence counts veRL puts in ``config.global_batch_info`` for data parallelism) and
returns veRL's metric keys as Python floats. The loss is ``vespo_ext.policy_loss_from_logp``:
differentiable in ``log_prob``, one fused pass (CPU or CUDA) instead of a dozen elementwise
kernels and temporaries.

Config fields read (veRL's ``ActorConfig`` names):

* grpo / gspo / cispo: ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high`` (``None`` falls
  back to ``clip_ratio``); grpo also ``clip_ratio_c`` (dual clip, default 3.0).
* sapo: ``tau_pos``, ``tau_neg``.
* vespo: ``policy_loss.vespo.{k_pos, lambda_pos, k_neg, lambda_neg}`` (the VESPO recipe's
  place; veRL's structured ``PolicyLossConfig`` has no ``vespo`` field, so with it use
  ``register(k_pos=..., ...)`` or ``set_vespo_params(...)`` to change the defaults
  2.0 / 3.0 / 3.0 / 2.0).
* all: ``loss_scale_factor`` and ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``), as veRL's ``agg_loss`` reads them.

Deliberate differences from veRL's own functions (each is exercised by tests/test_peers.py):

* The sign that picks VESPO's (k, λ) and SAPO's τ is the advantage of the sequence's first
  counted token (docs/spec.md); veRL's SAPO picks τ per token (``advantages > 0``) and the VESPO
  recipe takes column 0. All agree when the advantage is one value per sequence (GRPO,
  RLOO, ... outcome advantages); they differ for per-token advantages whose sign changes
  inside a sequence (GAE).
* GSPO clamps nothing but the exponent at 10 (as veRL); VESPO and PPO clamp the token
  log-ratio at ±20 (as veRL 0.9); CISPO's ratio is not clamped at ±20 before clipping, which
  changes nothing since the clipped ratio is bounded anyway.
* A batch whose mask is all zero gives a loss of 0 (veRL's token-mean gives 0/0 = NaN).
* ``actor/ppo_kl`` is the token mean of ``old - new`` without the ±20 clamp (equal unless a
  token's log-ratio exceeds 20 in size); the VESPO recipe's ``actor/approx_kl`` (a mean over
  sequences of the per-sequence mean) is not reproduced: ``vespo/approx_kl`` is the token mean.

Fused linear (``use_vespo_fused_linear()``): with ``actor_rollout_ref.model.use_fused_kernels=True``
veRL computes the log-probs and entropy from the last hidden states and ``lm_head.weight`` in a patched
model forward; ``use_vespo_fused_linear()`` makes that computation ``vespo_ext.linear_token_logprobs``
(chunked, never the (T, V) logits, exact and deterministic; tests/test_linear_verl.py) for veRL's
``torch``, ``liger`` and ``triton`` fused-kernel backends. ``VESPO_VERL_FUSED_LINEAR=1`` in the
environment does it at import (every Ray worker, with ``VERL_USE_EXTERNAL_MODULES``).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch

from .. import ops
from .._spec import LOSS_PARAMS

__all__ = ["LOSS_NAMES", "register", "set_vespo_params", "policy_loss_fn", "use_vespo_fused_linear",
           "VespoFusedLinearForPPO", "fused_linear_logprobs", "compute_policy_loss_vespo_fused",
           "compute_policy_loss_grpo_fused", "compute_policy_loss_gspo_fused", "compute_policy_loss_sapo_fused",
           "compute_policy_loss_cispo_fused"]

# registry name -> fused loss
LOSS_NAMES = {"vespo_fused": "vespo", "grpo_fused": "grpo", "gspo_fused": "gspo", "sapo_fused": "sapo",
              "cispo_fused": "cispo"}

_vespo_defaults: dict[str, float] = dict(LOSS_PARAMS["vespo"])
# veRL >= 0.6 aggregates "seq-mean-token-sum-norm" as a seq-mean divided by the horizon; older
# versions divided the plain token sum by the horizon. register() reads the installed agg_loss.
_seq_norm_is_seq_mean = True


def set_vespo_params(**params: float) -> None:
    """Change the VESPO (k, λ) used when the config has no ``policy_loss.vespo`` section."""
    unknown = sorted(set(params) - set(_vespo_defaults))
    if unknown:
        raise TypeError(f"unknown VESPO parameter(s) {unknown}; expected some of {sorted(_vespo_defaults)}")
    for k, v in params.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{k} must be a finite number, got {v!r}")
        _vespo_defaults[k] = float(v)


# ---------------------------------------------------------------------------------------------
# Config access: veRL passes an ActorConfig (a dataclass with a dict-like .get), a DictConfig, or a
# plain dict in tests; all of them answer .get(key, default).
def _get(config, key: str, default=None):
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - structured configs may raise on unknown keys
            return default
    return getattr(config, key, default)


def _clip_params(config, with_c: bool) -> dict[str, float]:
    clip = _get(config, "clip_ratio", 0.2)
    low, high = _get(config, "clip_ratio_low"), _get(config, "clip_ratio_high")
    out = {"clip_ratio_low": float(clip if low is None else low),
           "clip_ratio_high": float(clip if high is None else high)}
    if with_c:
        c = float(_get(config, "clip_ratio_c", 3.0))
        if not c > 1.0:  # veRL's own assertion
            raise ValueError(f"clip_ratio_c for dual-clip PPO must be > 1.0, got {c}")
        out["clip_ratio_c"] = c
    return out


def _loss_params(loss: str, config) -> dict[str, float]:
    if loss == "grpo":
        return _clip_params(config, with_c=True)
    if loss in ("gspo", "cispo"):
        return _clip_params(config, with_c=False)
    if loss == "sapo":
        return {"tau_pos": float(_get(config, "tau_pos", 1.0)), "tau_neg": float(_get(config, "tau_neg", 1.05))}
    section = _get(_get(config, "policy_loss"), "vespo") or {}
    return {k: float(_get(section, k, v)) for k, v in _vespo_defaults.items()}


def _as_norm(x, device) -> Any:
    """A normaliser for the op: a positive number or a 1-element tensor on the loss's device."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float32).reshape(())
    x = float(x)
    return x if x > 0 else 1.0  # a zero count means an empty batch, whose sum is 0 anyway


def _aggregation(loss_agg_mode: str, response_mask: torch.Tensor, config):
    """(agg, norm) for the op so that the result equals veRL's agg_loss(..., **config.global_batch_info)."""
    info = _get(config, "global_batch_info") or {}
    dp_size = info.get("dp_size", 1) or 1
    batch_num_tokens = info.get("batch_num_tokens")
    global_batch_size = info.get("global_batch_size")
    scale = info.get("loss_scale_factor", _get(config, "loss_scale_factor"))
    dev = response_mask.device
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return "token-mean", None  # sum / max(count, 1): 0 (not NaN) for an empty batch
        return "token-mean", _as_norm(batch_num_tokens / dp_size, dev)
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        agg = "seq-mean-token-mean" if loss_agg_mode == "seq-mean-token-mean" else "seq-mean-token-sum"
        if global_batch_size is None and dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        if loss_agg_mode != "seq-mean-token-sum-norm":
            return agg, None if global_batch_size is None else _as_norm(global_batch_size / dp_size, dev)
        horizon = float(response_mask.shape[-1] if scale is None else scale)
        if not _seq_norm_is_seq_mean:  # older veRL: sum over the batch / horizon
            return "seq-mean-token-sum-norm", horizon
        if global_batch_size is None:  # local count of non-empty sequences (check_norm reads it: one sync)
            n_seq = (response_mask.reshape(response_mask.shape[0], -1) != 0).any(-1).sum().clamp(min=1)
            return agg, n_seq.to(torch.float32) * horizon
        return agg, _as_norm(global_batch_size / dp_size * horizon, dev)
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def _dual_clip_fraction(old_log_prob, log_prob, advantages, mask, lo, hi, c) -> torch.Tensor:
    """veRL's actor/pg_clipfrac_lower for PPO: share of tokens with A < 0 where the dual clip is active."""
    with torch.no_grad():
        adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)
        ratio = torch.exp(torch.clamp(log_prob.detach().float() - old_log_prob.float(), -20.0, 20.0))
        clip1 = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - lo, 1 + hi))
        hit = (clip1 > -adv * c) & (adv < 0) & (mask != 0)
        return hit.sum() / (mask.sum() + 1e-8)


def _policy_loss(loss: str, old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                 rollout_is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, Any]]:
    params = _loss_params(loss, config)
    if loss == "sapo":
        loss_agg_mode = "seq-mean-token-mean"  # veRL's SAPO ignores loss_agg_mode and uses this one
    agg, norm = _aggregation(loss_agg_mode, response_mask, config)
    pg_loss, m = ops.policy_loss_from_logp(log_prob, old_log_prob, advantages, response_mask, loss=loss,
                                           rollout_is_weights=rollout_is_weights, agg=agg, norm=norm,
                                           return_metrics=True, **params)
    zero = torch.zeros((), device=pg_loss.device)
    clipfrac = zero if loss in ("sapo", "vespo") else m["clip_frac"]
    if loss == "grpo":
        lower = _dual_clip_fraction(old_log_prob, log_prob, advantages, response_mask, params["clip_ratio_low"],
                                    params["clip_ratio_high"], params["clip_ratio_c"])
    else:
        lower = zero
    names = ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"]
    values = [clipfrac, m["approx_kl"], lower]
    if loss == "vespo":
        extra = [k for k in m if not k.startswith("clip_frac")]
        names += [f"vespo/{k}" for k in extra]
        values += [m[k] for k in extra]
    host = torch.stack([v.detach().reshape(()).to(torch.float64) for v in values]).cpu().tolist()  # one sync
    metrics: dict[str, Any] = dict(zip(names, host))
    if loss == "vespo":
        metrics.update({f"vespo/{k}": v for k, v in params.items()})
    return pg_loss, metrics


def _make(loss: str) -> Callable:
    def fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
           loss_agg_mode: str = "token-mean", config=None,
           rollout_is_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, Any]]:
        return _policy_loss(loss, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)

    name = f"compute_policy_loss_{loss}_fused"
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (f"veRL PolicyLossFn for the fused {loss!r} loss (vespo_ext.policy_loss_from_logp); "
                  "see vespo_ext.integrations.verl.")
    return fn


compute_policy_loss_vespo_fused = _make("vespo")
compute_policy_loss_grpo_fused = _make("grpo")
compute_policy_loss_gspo_fused = _make("gspo")
compute_policy_loss_sapo_fused = _make("sapo")
compute_policy_loss_cispo_fused = _make("cispo")
_FUNCS = {"vespo_fused": compute_policy_loss_vespo_fused, "grpo_fused": compute_policy_loss_grpo_fused,
          "gspo_fused": compute_policy_loss_gspo_fused, "sapo_fused": compute_policy_loss_sapo_fused,
          "cispo_fused": compute_policy_loss_cispo_fused}


def policy_loss_fn(name: str) -> Callable:
    """The PolicyLossFn registered under `name` (e.g. "vespo_fused"), without touching veRL."""
    if name not in _FUNCS:
        raise ValueError(f"unknown fused policy loss {name!r}; expected one of {sorted(_FUNCS)}")
    return _FUNCS[name]


def register(names=None, **vespo_params: float) -> dict[str, Callable]:
    """Register the fused losses in veRL's policy-loss registry (idempotent); returns {name: fn}.

    names: which of LOSS_NAMES to register (default: all). vespo_params (k_pos, lambda_pos,
    k_neg, lambda_neg) change the VESPO defaults used when the config has no policy_loss.vespo.
    """
    try:
        from verl.trainer.ppo import core_algos
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "verl":
            raise ImportError("vespo_ext.integrations.verl.register() needs veRL (pip install verl)") from e
        raise
    global _seq_norm_is_seq_mean
    import inspect

    try:
        _seq_norm_is_seq_mean = "global_batch_size" in inspect.signature(core_algos.agg_loss).parameters
    except (TypeError, ValueError, AttributeError):
        _seq_norm_is_seq_mean = True
    if vespo_params:
        set_vespo_params(**vespo_params)
    chosen = list(_FUNCS) if names is None else ([names] if isinstance(names, str) else list(names))
    out = {}
    for name in chosen:
        fn = policy_loss_fn(name)
        core_algos.register_policy_loss(name)(fn)
        out[name] = fn
    return out


# ---------------------------------------------------------------------------------------------
# The fused-linear path: veRL's use_fused_kernels computes the log-probs (and entropy) from the last hidden
# states and lm_head.weight in a patched model forward; these are drop-ins for the two functions it calls.
def fused_linear_logprobs(hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                          temperature=1.0, *, chunk_tokens: Optional[int] = None):
    """(log_probs float32, entropy float32) of softmax(hidden_states @ vocab_weights.T / temperature) at
    input_ids, shaped like input_ids: vespo_ext.linear_token_logprobs (chunked, never the (T, V) logits;
    differentiable in hidden_states and vocab_weights through both outputs)."""
    from .. import linear

    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError("temperature must be one number (veRL's fused kernels take no per-sample temperature), "
                             f"got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    return linear.linear_token_logprobs(hidden_states, vocab_weights, input_ids, temperature=temperature,
                                        return_entropy=True, chunk_tokens=chunk_tokens)


class VespoFusedLinearForPPO(torch.nn.Module):
    """Drop-in for veRL's ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (the ``torch`` and
    ``liger`` fused-kernel backends): same constructor and ``forward(hidden_states, vocab_weights, input_ids,
    temperature=1.0) -> (log_probs, entropy)``, log_probs float32 and entropy in the hidden states' dtype
    as veRL's torch backend returns them. ``chunk_size`` is accepted and ignored: the chunk follows
    ``vespo_ext.linear.default_chunk_tokens`` (or ``chunk_tokens``)."""

    chunk_tokens: Optional[int] = None  # set by use_vespo_fused_linear(chunk_tokens=...)

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size, self.impl_backend = chunk_size, impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        logp, entropy = fused_linear_logprobs(hidden_states, vocab_weights, input_ids, temperature,
                                              chunk_tokens=self.chunk_tokens)
        return logp, entropy.to(hidden_states.dtype)


def _world_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _make_linear_cross_entropy(original: Callable) -> Callable:
    def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        """Drop-in for veRL's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (the ``triton``
        backend and Megatron's fused forward): (log_probs, entropy), float32, flattened to (num_tokens,) as
        veRL's kernel returns them. reduction other than "none" and a vocabulary split over a process group
        of more than one rank (Megatron tensor parallelism) run veRL's own kernel."""
        if reduction != "none" or _world_size(dist_process_group) > 1:
            return original(hidden, weight, labels, temperature, reduction, dist_process_group)
        logp, entropy = fused_linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                              temperature, chunk_tokens=VespoFusedLinearForPPO.chunk_tokens)
        return logp, entropy

    linear_cross_entropy.vespo_original = original
    return linear_cross_entropy


# veRL modules that bind linear_cross_entropy at import (patched too when they are already imported)
_LCE_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_saved: dict = {}


def use_vespo_fused_linear(enable: bool = True, *, chunk_tokens: Optional[int] = None) -> list[str]:
    """Make veRL's ``use_fused_kernels`` path compute its log-probs and entropy with
    ``vespo_ext.linear_token_logprobs``; returns the names patched (or restored with ``enable=False``).

    Replaces ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (backends ``torch`` / ``liger``)
    by ``VespoFusedLinearForPPO`` and ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
    (backend ``triton``; also in veRL's Megatron forward modules when they are imported) by a drop-in that
    hands unsupported calls back to veRL's kernel. veRL's patched model forwards import both at call time,
    so models patched before or after this call use it. Idempotent. In a Ray job every worker must call
    it: set ``VESPO_VERL_FUSED_LINEAR=1`` together with ``VERL_USE_EXTERNAL_MODULES=vespo_ext.integrations.verl``.
    """
    import importlib
    import sys

    try:
        tf = importlib.import_module("verl.utils.experimental.torch_functional")
        lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "verl":
            raise ImportError("vespo_ext.integrations.verl.use_vespo_fused_linear() needs veRL (pip install verl)") \
                from e
        raise
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens <= 0):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    targets = [(tf, "FusedLinearForPPO"), (lce, "linear_cross_entropy")]
    targets += [(sys.modules[m], "linear_cross_entropy") for m in _LCE_IMPORTERS if m in sys.modules]
    done = []
    for mod, attr in targets:
        key = f"{mod.__name__}.{attr}"
        if enable:
            if key not in _saved:
                _saved[key] = getattr(mod, attr)
                original = _saved[key]
                setattr(mod, attr, VespoFusedLinearForPPO if attr == "FusedLinearForPPO"
                        else _make_linear_cross_entropy(original))
        elif key in _saved:
            setattr(mod, attr, _saved.pop(key))
        else:
            continue
        done.append(key)
    VespoFusedLinearForPPO.chunk_tokens = chunk_tokens if enable else None
    return done


# Importing the module registers the losses when veRL is installed. Without veRL the functions stay
# usable on their own (tests, other trainers); register() then says what is missing.
try:
    import verl  # noqa: F401
except ModuleNotFoundError as _e:
    if not (_e.name and _e.name.split(".")[0] == "verl"):
        raise
else:
    register()
    if os.environ.get("VESPO_VERL_FUSED_LINEAR", "") not in ("", "0"):
        use_vespo_fused_linear()
