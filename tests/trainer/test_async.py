"""Async mode with real Ray actors: equivalence with sync N=1, partial-rollout version tagging, a killed
rollout worker, Ctrl-C, and a learner crash followed by resume -- every started prompt group is trained
exactly once or is still accounted for (buffered / in flight) in the final checkpoint."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import torch
from trainer_test_utils import ROOT, TINY, assert_finite_record, load_tiny

ASYNC = ("trainer.mode=async",)


def _records(run_dir):
    """The complete records (a run still writing may have its last line half written)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip() and ln.endswith("\n")]


def _provenance(run_dir):
    with open(os.path.join(run_dir, "provenance.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _final_state(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(root, "latest")) as f:
        tag = f.read().strip()
    with open(os.path.join(root, tag, "trainer_state.json")) as f:
        return json.load(f)


def assert_every_sample_accounted(run_dir, n: int) -> list:
    """Trained uids are unique; with the groups the final checkpoint holds (buffered or in flight) they are
    exactly the uids of every group started. Returns the trained uids."""
    trained = [u for p in _provenance(run_dir) for u in p["uid"]]
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    a = _final_state(run_dir)["async"]
    left = {ub + j for _, ub in a["in_flight"] for j in range(n)} | {ub + j for ub in a["buffer_uids"] for j in range(n)}
    assert not left & set(trained), "a sample is both trained and still outstanding"
    assert set(trained) | left == set(range(a["next_group"] * n)), "a started sample was lost"
    return trained


def _popen(run_dir, ray_cluster, *overrides):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cmd = [sys.executable, "-m", "vespo_trainer", "train", "--config", TINY, f"trainer.output_dir={run_dir}",
           "trainer.progress=plain", *ASYNC, *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, run_dir, steps: int, timeout: float = 300) -> None:
    t0 = time.time()
    path = os.path.join(run_dir, "metrics.jsonl")
    while time.time() - t0 < timeout:
        if os.path.exists(path) and len(_records(run_dir)) >= steps:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {steps}: {out[-2000:]}{err[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {steps} after {timeout}s")


def test_async_threshold0_trigger1_is_sync_n1(tmp_path, ray_cluster):
    """staleness_threshold=0, push every step: lag 0 only, and the very same run as sync with N = 1."""
    from vespo_trainer.loops.run import train

    common = ("data.train_batch_size=1", "actor.ppo_mini_batch_size=1", "trainer.total_steps=4")
    sync = train(load_tiny(tmp_path / "sync", *common))
    asyn = train(load_tiny(tmp_path / "async", *common, *ASYNC, "async.staleness_threshold=0",
                           "async.trigger_parameter_sync_step=1"))
    a, b = _records(sync), _records(asyn)
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        assert_finite_record(rb)
        assert rb["staleness/max"] == 0 and rb["staleness/hist_0"] == 4
        for k in ("reward/mean", "actor/loss", "vespo/phi_mean", "vespo/w_seq_mean", "response/length_mean"):
            assert math.isclose(ra[k], rb[k], rel_tol=1e-5, abs_tol=1e-6), (k, ra[k], rb[k])
    pa, pb = _provenance(sync), _provenance(asyn)
    for x, y in zip(pa, pb):
        assert x["uid"] == y["uid"] and x["prompt_id"] == y["prompt_id"]
        assert y["gen_version"] == y["update_version"] == [y["step"] - 1] * 4  # lag 0, from the recorded versions
    assert_every_sample_accounted(asyn, 4)


def test_staleness_window_bounds_the_lag(tmp_path, ray_cluster):
    """threshold 1, push every 2 steps: lags reach 2 x trigger - 1 = 3 and never exceed it; no sample dropped."""
    from vespo_trainer.loops.run import train

    run = train(load_tiny(tmp_path / "w", *ASYNC, "trainer.total_steps=8", "data.train_batch_size=2",
                          "actor.ppo_mini_batch_size=2", "async.staleness_threshold=1",
                          "async.trigger_parameter_sync_step=2", "rollout.num_workers=2", "rollout.num_cpus=0.25"))
    recs = _records(run)
    assert max(r["staleness/max"] for r in recs) == 3
    assert all(r["async/outstanding_groups"] <= 8 and r["async/dropped_samples"] == 0 for r in recs)
    assert sum(r["async/weight_syncs"] for r in recs) == 3  # pushes after steps 2, 4, 6 (none after the last)
    assert_every_sample_accounted(run, 4)


def test_max_lag_drops_and_counts_older_samples(tmp_path, ray_cluster):
    """async.max_lag=0 with a window that lets the rollout run one step ahead: only lag 0 is trained, the
    rest is dropped and counted (and the run does not stall on the freed window slots)."""
    from vespo_trainer.loops.run import train

    run = train(load_tiny(tmp_path / "d", *ASYNC, "trainer.total_steps=6", "data.train_batch_size=1",
                          "actor.ppo_mini_batch_size=1", "async.staleness_threshold=1", "async.max_lag=0",
                          "async.trigger_parameter_sync_step=1"))
    recs = _records(run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["staleness/max"] == 0 for r in recs)
    assert recs[-1]["async/dropped_samples"] > 0 and recs[-1]["async/dropped_samples"] % 4 == 0


def test_partial_rollout_tags_each_token_with_its_version(ray_cluster):
    """A weight update lands mid-generation: the responses continue under the new weights; each token
    carries the version and the behaviour log-prob of the weights that sampled it."""
    import ray

    import vespo_ext
    from vespo_trainer.data.prompt import Prompt
    from vespo_trainer.model import build_model, max_positions
    from vespo_trainer.rollout.hf import HFRolloutWorker as RolloutWorker
    from vespo_trainer.tokenizer import make_tokenizer
    from vespo_trainer.weight_sync import pack_bucket

    cfg = load_tiny("/tmp/unused", *ASYNC, "async.partial_rollout=true", "rollout.max_new_tokens=200",
                    "rollout.n=8", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4")
    tok = make_tokenizer()
    models = [build_model(cfg.model, tok, seed=s, max_positions=max_positions(cfg)) for s in (1, 2)]
    refs = [[ray.put(pack_bucket(dict(m.state_dict())))] for m in models]
    worker = ray.remote(RolloutWorker).options(max_concurrency=4, num_cpus=0).remote(cfg, 0)
    ray.get(worker.update_weights.remote(refs[0], 10))
    prompts = [Prompt(i, f"{i}+{i}=", str(2 * i % 10)) for i in range(4)]
    fut = worker.generate.remote(prompts, 0, 0, interruptible=True)
    t0 = time.time()
    while ray.get(worker.status.remote())["tokens"] < 2:
        assert time.time() - t0 < 60
    ray.get(worker.update_weights.remote(refs[1], 11))
    out = ray.get(fut)
    assert out["stats"]["segments"] >= 2
    mask, ver = out["response_mask"], out["token_version"]
    spans = 0
    for i in range(ver.shape[0]):
        v = ver[i][mask[i]].tolist()
        assert v == sorted(v) and set(v) <= {10, 11}
        spans += len(set(v)) == 2
    assert spans >= 1, "no response spans the update"
    # the log-probs of each segment are those of the weights that sampled it (recomputed at the same T)
    L = out["responses"].shape[1]
    for m, version in zip(models, (10, 11)):
        with torch.no_grad():
            am = out["attention_mask"]
            logits = m(input_ids=out["input_ids"], attention_mask=am,
                       position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits[:, -L - 1:-1]
        lp = vespo_ext.token_logprobs(logits.float(), out["responses"], temperature=cfg.rollout.temperature)
        sel = mask & (ver == version)
        assert sel.any()
        assert (lp[sel] - out["old_logp"][sel]).abs().max() < 1e-4, version
    ray.kill(worker)


def test_killed_rollout_worker_is_replaced_and_no_sample_is_lost(tmp_path, ray_cluster):
    run = tmp_path / "kill"
    proc = _popen(run, ray_cluster, "trainer.total_steps=60", "trainer.save_every=0", "async.staleness_threshold=1",
                  "rollout.num_workers=2", "rollout.num_cpus=0.25")
    _wait_for_steps(proc, run, 5)
    pids = json.loads((run / "actors.json").read_text())
    os.kill(pids["rollout"][0], signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    recs = _records(run)
    assert len(recs) == 60 and recs[-1]["async/rollout_restarts"] >= 1
    assert "rollout worker 0 died" in out + err
    assert_every_sample_accounted(run, 4)


def test_ctrl_c_checkpoints_and_resume_trains_the_saved_samples(tmp_path, ray_cluster):
    run = tmp_path / "sigint"
    proc = _popen(run, ray_cluster, "trainer.total_steps=500", "trainer.save_every=0", "async.staleness_threshold=2",
                  "async.trigger_parameter_sync_step=2")
    _wait_for_steps(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:] + err[-3000:]
    assert "interrupted at step" in err and "trainer.resume=true" in err
    stopped = len(_records(run))
    state = _final_state(run)
    assert state["step"] == stopped < 500
    saved = state["async"]
    assert saved["buffer_groups"] + len(saved["in_flight"]) > 0, "the window holds samples: they must be saved"
    proc = _popen(run, ray_cluster, f"trainer.total_steps={stopped + 6}", "trainer.save_every=0",
                  "async.staleness_threshold=2", "async.trigger_parameter_sync_step=2", "trainer.resume=true")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert_every_sample_accounted(run, 4)  # the in-flight groups were re-issued (trained, or outstanding at the end)
    after = [u for p in _provenance(run) if p["step"] > stopped for u in p["uid"][::4]]
    assert after[:len(saved["buffer_uids"])] == saved["buffer_uids"], "the buffered groups are trained first"


def test_learner_crash_then_resume(tmp_path, ray_cluster):
    run = tmp_path / "crash"
    overrides = ("trainer.save_every=2", "async.staleness_threshold=1", "async.trigger_parameter_sync_step=2")
    proc = _popen(run, ray_cluster, "trainer.total_steps=400", *overrides)
    _wait_for_steps(proc, run, 5)
    os.kill(json.loads((run / "actors.json").read_text())["learner"], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:] + err[-3000:]
    assert "the learner died" in err and "trainer.resume=true" in err
    at = _final_state(run)["step"]
    proc = _popen(run, ray_cluster, f"trainer.total_steps={at + 4}", "trainer.resume=true", *overrides)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert [r["step"] for r in _records(run)] == list(range(1, at + 5))
    assert_every_sample_accounted(run, 4)
