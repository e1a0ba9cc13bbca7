"""Adapters that plug the fused losses into RL frameworks (see docs/integrations.md).

* `vespo_ext.integrations.verl` — registers ``vespo_fused``, ``grpo_fused``, ``gspo_fused``,
  ``sapo_fused`` and ``cispo_fused`` in veRL's policy-loss registry (importing it registers them);
  ``use_vespo_fused_linear()`` makes veRL's ``use_fused_kernels`` log-probs ``linear_token_logprobs``.
* `vespo_ext.integrations.trl` — ``FusedGRPOTrainer``, a drop-in TRL ``GRPOTrainer`` whose loss
  runs on the fused op.
* `vespo_ext.integrations.hf` — the fused linear + policy loss of a Hugging Face causal LM from its
  backbone's last hidden states and its head's weight (no logits tensor); the trainer's
  ``actor.fused_linear`` uses it.

Neither framework is imported here, nor by ``import vespo_ext``: each adapter imports its
framework only when it is itself imported.
"""
from __future__ import annotations

__all__ = ["verl", "trl", "hf"]


def __getattr__(name):
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
