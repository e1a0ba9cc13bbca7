"""Reward worker: time limit per call, errors score 0 and are counted, model output is never executed."""
from __future__ import annotations

import os
import time

import pytest

from vespo_trainer.data.arith import arith_reward
from vespo_trainer.reward.pool import RewardPool, RewardWorker


@pytest.fixture
def pools():
    made = []

    def make(fn, **kw):
        made.append(RewardPool(fn, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_builtin_verifier_is_string_comparison():
    assert arith_reward("3+4=", "7", "7") == 1.0
    assert arith_reward("3+4=", " 7 ", "7") == 1.0
    assert arith_reward("3+4=", "07", "7") == 0.0
    assert arith_reward("3+4=", "3+4", "7") == 0.0
    assert arith_reward("3+4=", "7<pad>", "7") == 0.0
    assert arith_reward("3+4=", None, "7") == 0.0


@pytest.mark.parametrize("fn", ["reward_doubles:hang", "reward_doubles:busy"])
def test_timeout_scores_zero_and_counts(pools, fn):
    pool = pools(fn, num_procs=2, timeout_s=0.3)
    t0 = time.perf_counter()
    out = pool.score(["p"] * 5, ["a", "hang", "b", "hang", "a"], ["a", "x", "x", "x", "a"])
    assert out["timeouts"] == 2 and out["errors"] == 0
    assert out["rewards"][1] == 0.0 and out["rewards"][3] == 0.0
    if fn.endswith("hang"):
        assert out["rewards"] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert time.perf_counter() - t0 < 20
    # the pool is still usable afterwards
    assert pool.score(["p"], ["a"], ["a"])["rewards"] == [1.0]


def test_errors_and_non_numbers_score_zero(pools):
    pool = pools("reward_doubles:boom", num_procs=1, timeout_s=2.0)
    out = pool.score(["p"] * 4, ["ok", "boom", "nan", "text"], ["", "", "", ""])
    assert out["rewards"] == [1.0, 0.0, 0.0, 0.0]
    assert out["errors"] == 3 and out["timeouts"] == 0
    assert any("exploded" in e for e in out["error_examples"])


def test_uninterruptible_call_hits_the_backstop_and_the_pool_restarts(pools):
    pool = pools("reward_doubles:deaf", num_procs=1, timeout_s=0.2, grace_s=1.0)
    t0 = time.perf_counter()
    out = pool.score(["p"] * 2, ["hang", "a"], ["", ""])
    assert time.perf_counter() - t0 < 15
    assert out["timeouts"] == 2 and out["rewards"] == [0.0, 0.0] and pool.restarts == 1
    assert pool.score(["p"], ["a"], [""])["rewards"] == [1.0]


def test_unknown_reward_function_fails_early():
    with pytest.raises(ValueError, match="cannot be imported"):
        RewardPool("reward_doubles:nope")


def test_model_output_is_never_executed(tmp_path, ray_cluster):
    """Responses that would create a file if eval'd/exec'd score 0 and create nothing (through the Ray actor)."""
    import ray
    from trainer_test_utils import load_tiny

    marker = tmp_path / "pwned"
    payloads = [f"__import__('pathlib').Path({str(marker)!r}).touch()",
                f"exec(\"open({str(marker)!r}, 'w').write('x')\")",
                f"7 if __import__('os').system('touch {marker}') else 7",
                "7"]
    worker = ray.remote(RewardWorker).options(num_cpus=0).remote(load_tiny(tmp_path / "run"))
    try:
        out = ray.get(worker.score.remote(["3+4="] * 4, payloads, ["7"] * 4), timeout=120)
    finally:
        ray.get(worker.close.remote())
        ray.kill(worker)
    assert out["rewards"] == [0.0, 0.0, 0.0, 1.0]
    assert out["errors"] == 0 and out["timeouts"] == 0
    time.sleep(0.2)
    assert not marker.exists() and not os.path.exists(str(marker))


def test_verl_signature_by_keyword_and_dict_scores(pools):
    pool = pools("reward_doubles:verl_style", num_procs=1, timeout_s=2.0)
    out = pool.score(["the prompt"] * 3, ["a", "a", "b"], ["a", "a", "a"], data_sources=["src", "other", "src"],
                     extra_infos=[{"index": 7}, {"index": 7}, {"index": 7}])
    assert out["rewards"] == [1.0, 0.5, 0.5] and out["errors"] == 0
    pool = pools("reward_doubles:verl_kwargs", num_procs=1, timeout_s=2.0)
    assert pool.score(["p", "p"], ["x", "y"], ["x", "x"])["rewards"] == [1.0, 0.0]


def test_builtin_math_through_the_pool(pools):
    pool = pools("math", num_procs=2, timeout_s=5.0)
    out = pool.score(["q"] * 5, ["\\boxed{0.5}", "\\boxed{3}", "72", "no idea", "\\boxed{1}"],
                     ["\\frac{1}{2}", "4", "72", "1", "}{"], data_sources=["m"] * 5)
    assert out["rewards"] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert out["errors"] == 1 and any("ground truth" in e for e in out["error_examples"])


def test_math_reward_keeps_the_pool_timer(pools):
    """math-verify's own signal.alarm timeouts are off, so a slow call after it still times out."""
    pool = pools("reward_doubles:math_then_hang", num_procs=1, timeout_s=2.0)
    t0 = time.perf_counter()
    out = pool.score(["q"] * 3, ["\\boxed{2}", "\\boxed{2} hang", "\\boxed{3}"], ["2", "2", "2"])
    assert out["rewards"] == [1.0, 0.0, 0.0] and out["timeouts"] == 1 and out["errors"] == 0
    assert pool.restarts == 0 and time.perf_counter() - t0 < 15  # the per-call timer, not the backstop


def test_builtin_reward_names_resolve():
    from vespo_trainer.config import load_config
    from vespo_trainer.reward.math_reward import compute_score
    from vespo_trainer.reward.pool import resolve_fn, reward_spec

    assert resolve_fn("arith") is arith_reward and resolve_fn("math") is compute_score
    assert reward_spec(load_config()) == "arith"
    assert reward_spec(load_config(None, ["reward.function=pkg.mod:f"])) == "pkg.mod:f"
