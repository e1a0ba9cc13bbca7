"""benchmarks/gpu/trainer_gpu_check.py (the trainer's GPU path without Ray, a step of benchmarks/run_gpu.sh)
runs here on CPU with gloo: the script the GPU machine runs is the script that was tested. ~15-30 s."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from trainer_test_utils import ROOT, TRAINER_SRC

pytestmark = pytest.mark.slow


def test_trainer_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), TRAINER_SRC,
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "trainer_gpu_check.py"),
                        "--device", "cpu", "--steps", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "trainer_gpu_check: ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["learner_info"]["device"] == "cpu" and rep["learner_info"]["loss_kernels"] == "fused"
    losses = rep["steps"][0]["losses"]
    assert len(losses) == 2 and any(abs(v) > 1e-6 for v in losses)  # seeded advantages: a real loss
    assert rep["fused_linear_losses"][0] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
