"""vespo_ext: fused VESPO (and baseline) policy-loss kernels for CPU and CUDA.

    from vespo_ext import vespo_loss
    loss = vespo_loss(logits, labels, old_logp, advantages, mask)

Importing this package is cheap: torch and the compiled modules load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["vespo_loss", "policy_loss", "policy_loss_from_logp", "token_logprobs", "linear_policy_loss",
           "linear_token_logprobs", "rollout_correction", "check_errors", "has_kernels", "check_loss",
           "check_rollout_correction", "ROLLOUT_CORRECTION_PRESETS", "reference", "dlpack_api", "METRIC_NAMES",
           "LOSSES", "AGGS"]

from ._backend import has_kernels  # noqa: E402  (no torch import)
from ._rollout_spec import PRESETS as ROLLOUT_CORRECTION_PRESETS  # noqa: E402  (no torch import)
from ._spec import AGGS, LOSSES, METRIC_NAMES  # noqa: E402  (no torch import)


def check_loss(loss: str, agg=None, **params):
    """Validate a loss name, its parameters and an aggregation mode without running anything.

    Returns (agg, {param: value}) with each loss's defaults filled in; raises ValueError/TypeError
    naming the offending argument (what `policy_loss` would raise)."""
    from ._spec import LOSS_PARAMS, resolve_loss

    agg, values = resolve_loss(loss, agg, params)
    return agg, dict(zip(LOSS_PARAMS[loss], values))


def check_rollout_correction(rollout_is=None, rollout_is_threshold=2.0, rollout_rs=None, rollout_rs_threshold=None,
                             rollout_rs_threshold_lower=None) -> None:
    """Validate `rollout_correction`'s mode and threshold arguments without torch (ValueError/TypeError
    naming the argument, as `rollout_correction` would raise)."""
    from ._rollout_spec import IS_LEVELS, parse_is_threshold, parse_rs

    if rollout_is is not None:
        if rollout_is not in IS_LEVELS:
            raise ValueError(f"rollout_is must be None, 'token' or 'sequence', got {rollout_is!r}")
        parse_is_threshold(rollout_is_threshold)
    if rollout_rs is not None:
        parse_rs(rollout_rs, rollout_rs_threshold, rollout_rs_threshold_lower)


def __getattr__(name):
    if name in ("vespo_loss", "policy_loss", "policy_loss_from_logp", "token_logprobs", "check_errors"):
        from . import ops

        return getattr(ops, name)
    if name in ("linear_policy_loss", "linear_token_logprobs"):
        from . import linear

        return getattr(linear, name)
    if name == "rollout_correction":
        from .rollout_corr import rollout_correction

        return rollout_correction
    if name in ("reference", "dlpack_api", "ops", "linear", "integrations"):
        import importlib

        return importlib.import_module(f"vespo_ext.{name}")
    raise AttributeError(f"module 'vespo_ext' has no attribute {name!r}")
