"""Checkpoint layout, discovery and pruning.

    RUN_DIR/checkpoints/step_000100/          DeepSpeed files of the learner (model + optimizer, its RNG)
    RUN_DIR/checkpoints/step_000100/trainer_state.json   step, policy version, data cursor, metrics count
    RUN_DIR/checkpoints/latest                the tag of the newest COMPLETE checkpoint (written last)

The rollout workers need no state of their own: their weights come from the learner and their
sampling is seeded from (seed, step, worker), so restoring the learner, the data cursor and the
step reproduces the run.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from .errors import CheckpointError


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def write_trainer_state(run_dir: str, tag: str, state: dict) -> None:
    """Write trainer_state.json, then point `latest` at the tag (atomically): the checkpoint is complete."""
    path = os.path.join(ckpt_root(run_dir), tag)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=1)
    tmp = os.path.join(ckpt_root(run_dir), "latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
    os.replace(tmp, os.path.join(ckpt_root(run_dir), "latest"))


def latest(run_dir: str) -> Optional[str]:
    """Tag of the newest complete checkpoint, or None."""
    try:
        with open(os.path.join(ckpt_root(run_dir), "latest")) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return None
    if not os.path.isfile(os.path.join(ckpt_root(run_dir), tag, "trainer_state.json")):
        raise CheckpointError(f"{ckpt_root(run_dir)}/latest names {tag!r}, which has no trainer_state.json")
    return tag


def read_trainer_state(run_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_root(run_dir), tag, "trainer_state.json")) as f:
        return json.load(f)


def prune(run_dir: str, keep: int) -> None:
    """Remove all but the `keep` newest checkpoints (never the one `latest` names)."""
    if keep <= 0:
        return
    root = ckpt_root(run_dir)
    tags = sorted(t for t in os.listdir(root) if t.startswith("step_") and os.path.isdir(os.path.join(root, t)))
    current = latest(run_dir)
    for tag in tags[:-keep]:
        if tag != current:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
