"""Fixtures of the trainer tests: one Ray instance for the session.

Everything runs for real on CPU (Ray actors, DeepSpeed engine with gloo, a process-pool reward);
only the reward tests use test doubles (reward functions that hang, raise or misbehave).
Nothing is compiled at start-up: on CPU the trainer tells DeepSpeed to skip its shared-memory comm op
(a 30 s - 2 min JIT build that only DeepSpeed's inference all-reduce uses), whatever the world size.
"""
from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytest.importorskip("transformers")
pytest.importorskip("omegaconf")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trainer_test_utils import TRAINER_SRC  # noqa: E402

# Prefer the working tree over an installed copy: a source checkout tests its own trainer.
if TRAINER_SRC not in sys.path:
    sys.path.insert(0, TRAINER_SRC)
# Ray workers and subprocesses import the same code, and the test doubles (reward_doubles) by name.
for _path in (os.path.dirname(os.path.abspath(__file__)), TRAINER_SRC):
    _pp = os.environ.get("PYTHONPATH", "")
    if _path not in _pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = _path + (os.pathsep + _pp if _pp else "")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray shared by the session's tests (the in-process runs use it; subprocesses join it)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
        started = True
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
