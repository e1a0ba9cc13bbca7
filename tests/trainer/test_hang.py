"""A hung actor ends the run instead of hanging it: every driver call waits at most trainer.actor_timeout_s,
then the run stops with an error naming the actor, the method and the key, and says whether there is a
checkpoint to continue from. Real Ray actors that sleep; small timeouts keep it fast (the end-to-end timeout,
8 s, leaves room for Ray starting a worker process for the learner group's merge tasks on a loaded machine)."""
from __future__ import annotations

import time

import pytest
from trainer_test_utils import load_tiny

from vespo_trainer.config import ConfigError, load_config


def test_get_within_names_the_calls_that_do_not_answer(ray_cluster):
    import ray

    from vespo_trainer.runtime import ActorTimeout, get_within

    @ray.remote(num_cpus=0)
    class Sleeper:
        def nap(self, s):
            time.sleep(s)
            return s

    a, b = Sleeper.remote(), Sleeper.remote()
    try:
        assert get_within([a.nap.remote(0), b.nap.remote(0)], ["a", "b"], 30) == [0, 0]  # actors up
        t0 = time.time()
        with pytest.raises(ActorTimeout, match=r"^b \(nap\) did not answer within trainer.actor_timeout_s=1s"):
            get_within([a.nap.remote(0), b.nap.remote(60)], ["a (nap)", "b (nap)"], 1)
        assert time.time() - t0 < 10
        assert get_within(a.nap.remote(0.5), "a", 0) == 0.5  # 0: no limit
    finally:
        ray.kill(a)
        ray.kill(b)


def test_async_driver_names_the_call_in_flight_too_long(ray_cluster):
    """The async loop's check (Inflight.check after every ray.wait), on a real sleeping actor."""
    import ray

    from vespo_trainer.loops.async_driver import Generating, Inflight, Scoring, Training
    from vespo_trainer.runtime import ActorTimeout

    @ray.remote(num_cpus=0)
    def nap(s):
        time.sleep(s)

    done = nap.remote(0)
    ray.get(done)
    inflight = Inflight()
    inflight[done] = Training(None, None, 0.0)
    inflight[nap.remote(60)] = Generating(1, [])
    inflight[nap.remote(60)] = Scoring(0, [], None)
    inflight.check(30)  # nothing is that old yet
    inflight.check(0)   # no limit
    time.sleep(1.2)
    inflight.pop(done)  # answered: no longer counted
    with pytest.raises(ActorTimeout, match=r"^rollout worker 1 \(generate\), reward worker 0 \(score\) did not"):
        inflight.check(1)
    for ref in list(inflight):
        ray.cancel(ref, force=True)
        del inflight[ref]
    assert not inflight.since


def test_actor_timeout_is_validated():
    with pytest.raises(ConfigError, match="trainer.actor_timeout_s: must be >= 0"):
        load_config(None, ["trainer.actor_timeout_s=-1"])
    assert load_config(None, []).trainer.actor_timeout_s == 3600


@pytest.mark.parametrize("mode", ["sync", pytest.param("async", marks=pytest.mark.slow)])
def test_hung_rollout_worker_ends_the_run_with_the_resume_hint(mode, tmp_path, ray_cluster, monkeypatch):
    from vespo_trainer.loops.interrupt import TrainingAborted
    from vespo_trainer.loops.run import train
    from vespo_trainer.rollout import base

    monkeypatch.setitem(base.BACKENDS, "hanging", ("rollout_doubles:HangingRolloutWorker", None, ""))
    extra = ["trainer.mode=async", "async.trigger_parameter_sync_step=1", "async.staleness_threshold=0"] \
        if mode == "async" else []
    cfg = load_tiny(tmp_path / "run", "trainer.total_steps=100", "trainer.save_every=1",
                    "trainer.actor_timeout_s=8", "task.warmup_steps=0", *extra)
    cfg.rollout.backend = "hanging"  # not a config choice: the driver resolves it through the registry
    t0 = time.time()
    with pytest.raises(TrainingAborted) as err:
        train(cfg)
    msg = str(err.value)
    assert "rollout worker 0 (generate) did not answer within trainer.actor_timeout_s=8s" in msg, msg
    assert "checkpoints/step_00000" in msg and "trainer.resume=true" in msg, msg  # checkpoints were written
    assert time.time() - t0 < 120
