"""Helpers shared by the trainer tests (a plain module: `conftest` is ambiguous next to tests/conftest.py)."""
from __future__ import annotations

import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "examples", "configs", "tiny.yaml")
TRAINER_SRC = os.path.join(ROOT, "trainer")

REQUIRED_KEYS = ("step", "reward/mean", "staleness/mean", "staleness/max", "actor/loss", "actor/approx_kl",
                 "vespo/phi_mean", "vespo/w_seq_mean", "perf/tokens_per_s", "time/step_s", "time/weight_sync_s")


def tiny_overrides(out_dir, *extra) -> list:
    return [f"trainer.output_dir={out_dir}", "trainer.progress=none", *extra]


def load_tiny(out_dir, *extra):
    from vespo_trainer.config import load_config

    return load_config(TINY, tiny_overrides(out_dir, *extra))


def assert_finite_record(rec: dict) -> None:
    for key in REQUIRED_KEYS:
        assert key in rec, f"metrics.jsonl record lacks {key!r}: {sorted(rec)}"
    for key, v in rec.items():
        if isinstance(v, (int, float)):
            assert math.isfinite(v), f"{key} = {v} at step {rec['step']}"
        else:
            assert v is not None, f"{key} is null (non-finite) at step {rec['step']}"
