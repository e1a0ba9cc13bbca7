"""End to end with real Ray and a real DeepSpeed learner on CPU, on examples/configs/tiny.yaml.

- `vespo train` as a user runs it (a subprocess joining the session's Ray through RAY_ADDRESS):
  run-directory contents, metrics keys present and finite, the lag of mini-batch k is exactly k
  (from the per-sample provenance the learner recorded), `vespo plot` writes PNGs.
- Resume: 4 steps straight and 2 steps + resume + 2 steps give the same metrics.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from trainer_test_utils import ROOT, TINY, assert_finite_record, load_tiny

TIMING = ("time/", "perf/tokens_per_s")


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def test_vespo_train_cli_end_to_end(tmp_path, ray_cluster):
    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cmd = [sys.executable, "-m", "vespo_trainer", "train", "--config", TINY, f"trainer.output_dir={run_dir}",
           "algorithm.behaviour_logp=recompute"]  # the learner recomputes old log-probs: checks the weight sync
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step     4/4" in proc.stdout and "done:" in proc.stdout

    # run directory
    names = set(os.listdir(run_dir))
    assert {"config.yaml", "metrics.jsonl", "provenance.jsonl", "tensorboard", "checkpoints"} <= names
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_000004"
    assert (ck / "step_000004" / "trainer_state.json").exists() and (ck / "step_000002").exists()
    from vespo_trainer.config import load_config

    assert load_config(str(run_dir / "config.yaml")).trainer.total_steps == 4  # the resolved config reloads

    # metrics: one record per step, required keys present and finite
    recs = _records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]  # as the bar and the checkpoints count
    for r in recs:
        assert_finite_record(r)
        assert r["staleness/mean"] == 1.5 and r["staleness/max"] == 3 and r["staleness/min"] == 0
        assert [r[f"staleness/hist_{k}"] for k in range(4)] == [4, 4, 4, 4]  # 1 prompt x 4 responses each
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["time/weight_sync_s"] > 0
        assert r["rollout/logp_abs_diff"] < 1e-5, "rollout and learner must hold the same weights (fp32 both)"

    # provenance: mini-batch k of every step was trained exactly k versions after generation
    N, per_step = 4, 16
    uids = []
    with open(run_dir / "provenance.jsonl") as f:
        for step, line in enumerate(f):  # step: 0-based here, 1-based in the file (as the bar and checkpoints)
            p = json.loads(line)
            assert p["step"] == step + 1 and len(p["uid"]) == per_step
            # the shape README's "The run directory" states: one line per step, one array per field
            assert set(p) == {"step", "uid", "prompt_id", "gen_version", "update_version", "minibatch", "lag",
                              "reward"}, sorted(p)
            assert all(len(p[k]) == per_step for k in p if k != "step")
            for k, gen, upd, lag in zip(p["minibatch"], p["gen_version"], p["update_version"], p["lag"]):
                assert gen == N * step, "every sample of a sync step comes from the version the step started with"
                assert upd - gen == lag == k
            assert sorted(set(p["minibatch"])) == list(range(N))
            uids += p["uid"]
    assert len(uids) == len(set(uids)) == 4 * per_step

    # vespo plot
    proc = subprocess.run([sys.executable, "-m", "vespo_trainer", "plot", str(run_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = sorted(os.listdir(run_dir / "plots"))
    assert {"reward.png", "loss.png", "phi.png", "w_seq.png", "lag_hist.png", "throughput.png"} <= set(pngs)
    assert all((run_dir / "plots" / p).stat().st_size > 1000 for p in pngs)


def test_refuses_to_overwrite_a_run(tmp_path, ray_cluster):
    from vespo_trainer.loops.common import resolve_run_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")
    import pytest

    with pytest.raises(FileExistsError, match="trainer.resume=true"):
        resolve_run_dir(load_tiny(tmp_path))


def _compare(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        keys = {k for k in ra if not k.startswith(TIMING)}
        assert keys == {k for k in rb if not k.startswith(TIMING)}
        for k in keys:
            va, vb = ra[k], rb[k]
            assert math.isclose(va, vb, rel_tol=1e-5, abs_tol=1e-6), f"step {ra['step']} {k}: {va} != {vb}"


def test_resume_gives_the_same_run(tmp_path, ray_cluster):
    from vespo_trainer.loops.run import train

    straight = train(load_tiny(tmp_path / "straight"))
    split = tmp_path / "split"
    train(load_tiny(split, "trainer.total_steps=2"))
    assert len(_records(split)) == 2
    train(load_tiny(split, "trainer.total_steps=4", "trainer.resume=true"))
    a, b = _records(straight), _records(split)
    assert len(a) == len(b) == 4
    assert any(r["actor/loss"] != 0 for r in a)  # the comparison covers real updates
    _compare(a, b)
    # provenance continues too: the resumed half has the same sample ids and versions
    with open(os.path.join(straight, "provenance.jsonl")) as f1, open(split / "provenance.jsonl") as f2:
        assert [json.loads(x) for x in f1] == [json.loads(x) for x in f2]


def test_variants_bf16_rollout_tis_grad_accum_zero2_grpo(tmp_path, ray_cluster):
    """The optional paths in one short run: bf16 rollout (a real mismatch), TIS with recomputed old
    log-probs, gradient accumulation over micro-batches, ZeRO-2, a baseline loss, 2 rollout workers."""
    from vespo_trainer.loops.run import train

    run = train(load_tiny(tmp_path / "v", "trainer.total_steps=2", "trainer.save_every=0", "rollout.dtype=bf16",
                          "algorithm.tis=true", "actor.micro_batch_size=2", "actor.zero_stage=2",
                          "algorithm.loss=grpo", "rollout.num_workers=2", "rollout.num_cpus=0.25",
                          "weight_sync.bucket_mb=0.01"))
    recs = _records(run)
    assert len(recs) == 2
    for r in recs:
        assert_finite_record(r)
        assert r["rollout/logp_abs_diff"] > 0  # bf16 sampling vs the fp32 learner
        assert r["rollout_corr/kl"] != 0 and "rollout/mismatch_kl" not in r  # the mismatch KL, reported once
        assert r["staleness/max"] == 3
    with open(os.path.join(run, "provenance.jsonl")) as f:
        for line in f:
            p = json.loads(line)
            assert all(u - g == k for u, g, k in zip(p["update_version"], p["gen_version"], p["minibatch"]))


def test_rollout_correction_sequence_is_token_rs_bf16(tmp_path, ray_cluster):
    """algorithm.rollout_correction on the default task with a bf16 rollout (a real mismatch):
    sequence IS + token rejection in one short run; the metrics.jsonl records carry the
    rollout_corr/* metrics, finite, with some tokens rejected and IS weights of mean near 1."""
    from vespo_trainer.loops.run import train

    run = train(load_tiny(tmp_path / "rc", "trainer.total_steps=2", "trainer.save_every=0", "rollout.dtype=bf16",
                          "algorithm.rollout_correction.rollout_is=sequence",
                          "algorithm.rollout_correction.rollout_rs=token",
                          "algorithm.rollout_correction.rollout_rs_threshold=1.001"))
    recs = _records(run)
    assert len(recs) == 2
    for r in recs:
        assert_finite_record(r)
        for k in ("kl", "k3_kl", "ppl_ratio", "is_mean", "is_max", "ess", "rs_masked_frac"):
            assert f"rollout_corr/{k}" in r, k
        assert 0 < r["rollout_corr/ess"] <= 1
        assert 0 < r["rollout_corr/rs_masked_frac"] < 1  # bf16 moves some tokens' ratio past 0.1 %
        assert r["rollout_corr/k3_kl"] > 0
