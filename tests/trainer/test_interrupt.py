"""Ctrl-C in sync mode (async: test_async.py): the first saves a checkpoint at the step boundary and
exits 130 with the resume command, and the run resumes from it; two in a row stop at once (checked in-process)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from trainer_test_utils import ROOT, TINY


def _popen(run_dir, ray_cluster, *overrides):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cmd = [sys.executable, "-m", "vespo_trainer", "train", "--config", TINY, f"trainer.output_dir={run_dir}",
           "trainer.progress=plain", "trainer.save_every=0", *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for ln in f if ln.strip())


def _wait_for_steps(proc, run_dir, steps: int, timeout: float = 300) -> None:
    t0 = time.time()
    while _steps(run_dir) < steps:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"no step {steps} after {timeout}s"
        time.sleep(0.02)


def test_sync_ctrl_c_saves_then_resumes(tmp_path, ray_cluster):
    run = tmp_path / "run"
    proc = _popen(run, ray_cluster, "trainer.total_steps=1000")
    _wait_for_steps(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "interrupted at step" in err and "trainer.resume=true" in err
    done = _steps(run)
    assert 2 <= done < 1000
    with open(run / "checkpoints" / "latest") as f:
        tag = f.read().strip()
    with open(run / "checkpoints" / tag / "trainer_state.json") as f:
        assert json.load(f)["step"] == done  # the checkpoint is at the last recorded step
    proc = _popen(run, ray_cluster, f"trainer.total_steps={done + 2}", "trainer.resume=true")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert f"resumed {run} from {tag}" in out and _steps(run) == done + 2


def test_ctrl_c_before_the_first_step_says_nothing_was_saved(tmp_path, ray_cluster):
    """Ctrl-C while the run is still loading / starting its actors: it says so at once, stops before the
    first step, and the final message says that no checkpoint exists (exit 130)."""
    run = tmp_path / "early"
    proc = _popen(run, ray_cluster, "trainer.total_steps=1000")
    t0 = time.time()
    while not (run / "config.yaml").exists():  # written once the Ctrl-C handler is in place
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Ctrl-C before the first step: nothing to save" in out, out  # printed when it arrived
    assert "interrupted before the first step" in err and "no checkpoint was written yet" in err, err
    assert _steps(run) == 0 and not (run / "checkpoints").exists()


def test_second_ctrl_c_stops_at_once(capsys, monkeypatch):
    """The handler itself, in-process (a subprocess cannot time two signals inside one step reliably: two
    SIGINTs that arrive before Python runs the handler are one)."""
    import pytest

    from vespo_trainer import cli
    from vespo_trainer.loops.interrupt import GracefulInterrupt

    # Start from Python's default handler whatever this process inherited (under nohup or as a
    # background job of a non-interactive shell, SIGINT arrives ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        seen = []
        with GracefulInterrupt(seen.append) as stop:
            stop.started = True  # the loop's first step has begun
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested and "saving a checkpoint" in seen[0]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit
    finally:
        signal.signal(signal.SIGINT, inherited)

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr("vespo_trainer.loops.run.train", interrupted)
    assert cli.main(["train", "trainer.output_dir=/tmp/unused-run"]) == 130
    assert "stopped at once" in capsys.readouterr().err
