"""Adapters that plug the fused losses into RL frameworks (see docs/integrations.md).

* `vespo_ext.integrations.verl` — registers ``vespo_fused``, ``grpo_fused``, ``gspo_fused``,
  ``sapo_fused`` and ``cispo_fused`` in veRL's policy-loss registry (importing it registers them).
* `vespo_ext.integrations.trl` — ``FusedGRPOTrainer``, a drop-in TRL ``GRPOTrainer`` whose loss
  runs on the fused op.

Neither framework is imported here, nor by ``import vespo_ext``: each adapter imports its
framework only when it is itself imported.
"""
from __future__ import annotations

__all__ = ["verl", "trl"]


def __getattr__(name):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
