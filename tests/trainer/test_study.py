"""experiments/staleness_study.py: collapse detection on synthetic curves; the smoke grid end to end
(2 tiny runs through `vespo train`, a rerun that skips them, the summariser's table, JSON and PNGs)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from trainer_test_utils import ROOT

SCRIPT = os.path.join(ROOT, "experiments", "staleness_study.py")


def _module():
    spec = importlib.util.spec_from_file_location("staleness_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_collapse_detection():
    st = _module()
    xs = list(range(100))
    rise_fall = [0.1 + 0.6 * min(x, 40) / 40 for x in range(60)] + [0.12] * 40  # peaks at 0.7, falls at x=60
    c = st.collapse(xs, rise_fall)
    assert c["learned"] and c["collapsed"] and c["collapse_x"] == 60 and c["peak"] == pytest.approx(0.7)
    stable = [0.1 + 0.6 * min(x, 40) / 40 for x in range(100)]
    c = st.collapse(xs, stable)
    assert c["learned"] and not c["collapsed"] and c["collapse_x"] is None
    dip_and_recover = rise_fall[:80] + [0.7] * 20  # below half of the gain for a while, then back: not a collapse
    assert not st.collapse(xs, dip_and_recover)["collapsed"]
    flat = [0.1] * 50 + [0.15] * 50  # never rose by MIN_GAIN
    c = st.collapse(xs, flat)
    assert not c["learned"] and not c["collapsed"]
    dies = [0.1] * 30 + [0.0] * 70  # never learned, fell to 0 below its chance level: a collapse too
    c = st.collapse(xs, dies)
    assert not c["learned"] and c["collapsed"] and c["collapse_x"] == 30
    assert not st.collapse(xs, [0.1] * 30 + [0.07] * 70)["collapsed"]  # above half the start level
    # trailing-window mean in x units
    assert st.smooth([0, 1, 2, 3], [1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    # x = the policy version that generated a record's samples: sync N=4 rollout step s -> 4s
    rows = [{"actor/version": 4 * (s + 1), "staleness/mean": 1.5} for s in range(3)]
    assert st.gen_versions(rows, 4) == [0.0, 4.0, 8.0]


def test_task_answer_sum():
    """task.answer=sum, the harder arith variant the study may use: whole sums, a wider format warm-up."""
    import random

    from vespo_trainer.config import ConfigError, load_config
    from vespo_trainer.data.arith import arith_prompts, arith_reward, task_prompts, warmup_max_answer, warmup_texts

    cfg = load_config(None, ["task.answer=sum"])
    ps = task_prompts(cfg.task)
    assert len(ps) == 100 and {p.text: p.ground_truth for p in ps}["7+8="] == "15"
    assert arith_reward("7+8=", "15", "15") == 1.0 and arith_reward("7+8=", "5", "15") == 0.0
    default = load_config(None, [])
    assert default.task.answer == "last_digit" and {p.text: p.ground_truth for p in task_prompts(default.task)}[
        "7+8="] == "5"
    assert warmup_max_answer(cfg.task) == 18 and warmup_max_answer(default.task) == 9
    answers = {int(r) for _, r in warmup_texts(ps, 2000, random.Random(0), warmup_max_answer(cfg.task))}
    assert answers == set(range(19))
    with pytest.raises(ConfigError, match="task.answer"):
        load_config(None, ["task.answer=product"])
    with pytest.raises(ConfigError, match="rollout.max_new_tokens"):
        load_config(None, ["task.answer=sum", "rollout.max_new_tokens=2"])
    with pytest.raises(ValueError):
        arith_prompts(9, 9, "difference")


def test_grid_design():
    st = _module()
    runs = st.make_grid([1, 4, 16, 64], list(st.LOSSES), [0, 1, 2], 4096, 8, True, [])
    assert len(runs) == 60 and len({r.name for r in runs}) == 60
    for r in runs:  # every setting: the same optimizer steps on the same number of samples
        ov = dict(o.split("=", 1) for o in r.overrides)
        assert ov["actor.ppo_mini_batch_size"] == "8" and ov["rollout.dtype"] == "bf16"
        if r.setting == "async":
            assert ov["trainer.mode"] == "async" and int(ov["trainer.total_steps"]) == 4096
        else:
            n = int(r.setting[1:])
            assert int(ov["data.train_batch_size"]) == 8 * n and int(ov["trainer.total_steps"]) * n == 4096
    with pytest.raises(SystemExit):
        st.make_grid([3], ["vespo"], [0], 64, 8, False, [])


def test_smoke_grid_and_summary(tmp_path, ray_cluster):
    out, docs = tmp_path / "study", tmp_path / "docs"
    doc = tmp_path / "page.md"
    doc.write_text("intro\n<!-- RESULTS_BEGIN (written by staleness_study.py summarise) -->\nold\n"
                   "<!-- RESULTS_END -->\noutro\n")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)  # join the session's Ray: no Ray start per run
    grid = ["--out", str(out), "--smoke", "--N", "1,4", "--losses", "vespo", "--seeds", "0", "--no-async",
            "--mini-batch", "1"]
    base = [sys.executable, SCRIPT, "run", *grid, "--steps", "8", "--jobs", "1"]
    # N1-vespo-s0 was interrupted half way (its first 4 of 8 steps and a checkpoint exist): the script resumes it
    st = _module()
    n1 = [r for r in st.make_grid([1], ["vespo"], [0], 8, 1, False, st.SMOKE) if r.name == "N1-vespo-s0"][0]
    half = subprocess.run([sys.executable, "-m", "vespo_trainer", "train", *n1.overrides, "trainer.total_steps=4",
                           f"trainer.output_dir={out / n1.name}"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert half.returncode == 0, half.stdout[-3000:] + half.stderr[-3000:]
    proc = subprocess.run(base, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 N4-vespo-s0 done" in proc.stdout
    assert "resumed" in (out / "N1-vespo-s0" / "train.log").read_text()
    for name, steps in (("N1-vespo-s0", 8), ("N4-vespo-s0", 2)):
        with open(out / name / "metrics.jsonl") as f:
            rows = [json.loads(ln) for ln in f]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert rows[-1]["actor/version"] == 8  # the same optimizer steps in both settings
    # a second run skips what is done; another design in the same --out is refused
    again = subprocess.run(base + ["--dry-run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "2 done, 0 to run" in again.stdout and again.stdout.count(" done ") == 2, again.stdout
    other = subprocess.run([sys.executable, SCRIPT, "run", *grid, "--steps", "16"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "another design" in other.stderr, other.stdout + other.stderr

    summ = subprocess.run([sys.executable, SCRIPT, "summarise", *grid, "--steps", "8", "--docs", str(docs),
                           "--doc", str(doc)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert summ.returncode == 0, summ.stdout[-3000:] + summ.stderr[-3000:]
    assert {"results.md", "summary.json", "reward_N1.png", "reward_N4.png"} <= set(os.listdir(docs))
    summary = {r["run"]: r for r in json.load(open(docs / "summary.json"))}
    with open(out / "N4-vespo-s0" / "metrics.jsonl") as f:
        rows = [json.loads(ln) for ln in f]
    s = summary["N4-vespo-s0"]
    assert s["complete"] and s["lag_max"] == 3 and s["lag_mean"] == pytest.approx(1.5)
    assert s["final_reward"] == pytest.approx(rows[-1]["reward/mean"])  # last 10% of 8 steps: the last record
    assert s["phi_mean"] == pytest.approx(sum(r["vespo/phi_mean"] for r in rows) / len(rows))
    assert summary["N1-vespo-s0"]["lag_max"] == 0
    page = doc.read_text()
    assert page.startswith("intro\n") and page.endswith("outro\n") and "old" not in page
    assert "| N4 | vespo | 1 |" in page and "](docs/reward_N4.png)" in page
