"""Reward scoring in a process pool with a time limit per call; model output is data, never code.

A reward function is named 'package.module:function' and called as fn(prompt, response,
ground_truth) -> float in a separate process (spawned, so it shares nothing with the actor).
Each call runs under an interval timer (SIGALRM): a call that takes longer than `timeout_s`
scores 0 and counts as a timeout; one that raises, or returns something that is not a finite
number, scores 0 and counts as an error. A call that cannot be interrupted (stuck in C code)
is caught by a backstop deadline for the whole batch: the pool is then killed and restarted and
the unfinished samples count as timeouts. Nothing here ever passes model output to eval/exec;
the built-in verifier compares strings.
"""
from __future__ import annotations

import importlib
import math
import multiprocessing as mp
import signal
import time
from typing import Callable, Dict, List, Optional, Sequence

_FN_CACHE: Dict[str, Callable] = {}


class _CallTimeout(Exception):
    pass


def resolve_fn(spec: str) -> Callable:
    """'package.module:function' -> the function (imported, cached per process)."""
    fn = _FN_CACHE.get(spec)
    if fn is None:
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"reward function {spec!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise ValueError(f"reward function {spec!r} is not callable")
        _FN_CACHE[spec] = fn
    return fn


def _on_alarm(signum, frame):
    raise _CallTimeout()


def _score_chunk(spec: str, items: List[tuple], timeout_s: float) -> List[tuple]:
    """Runs in a pool process: [(status, reward, detail)] with status ok | timeout | error."""
    fn = resolve_fn(spec)
    signal.signal(signal.SIGALRM, _on_alarm)
    out = []
    for prompt, response, truth in items:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                value = fn(prompt, response, truth)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"reward is not finite: {value}")
            out.append(("ok", value, ""))
        except _CallTimeout:
            out.append(("timeout", 0.0, f"exceeded {timeout_s}s"))
        except BaseException as exc:  # noqa: BLE001 - any failure of the user's function scores 0
            out.append(("error", 0.0, f"{type(exc).__name__}: {exc}"[:300]))
    return out


class RewardPool:
    """Scores (prompt, response, ground_truth) triples with `fn_spec` in `num_procs` processes."""

    def __init__(self, fn_spec: str, num_procs: int = 2, timeout_s: float = 5.0, grace_s: float = 10.0):
        resolve_fn(fn_spec)  # fail early, in the caller, if the function does not exist
        self.fn_spec, self.num_procs, self.timeout_s, self.grace_s = fn_spec, num_procs, timeout_s, grace_s
        self._pool: Optional[mp.pool.Pool] = None
        self.restarts = 0

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_procs)
        return self._pool

    def _kill_pool(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
            self.restarts += 1

    def score(self, prompts: Sequence[str], responses: Sequence[str], truths: Sequence[str]) -> dict:
        t0 = time.perf_counter()
        items = list(zip(prompts, responses, truths))
        n = len(items)
        if not n:
            return {"rewards": [], "timeouts": 0, "errors": 0, "error_examples": [], "seconds": 0.0}
        n_chunks = min(n, self.num_procs * 4)
        bounds = [round(i * n / n_chunks) for i in range(n_chunks + 1)]
        pool = self._get_pool()
        jobs = [pool.apply_async(_score_chunk, (self.fn_spec, items[a:b], self.timeout_s))
                for a, b in zip(bounds, bounds[1:])]
        # Backstop: every process may have to sit through timeout_s per item it was given.
        deadline = t0 + self.timeout_s * (math.ceil(n / self.num_procs) + math.ceil(n / n_chunks)) + self.grace_s
        results: List[tuple] = []
        broken = False
        for (a, b), job in zip(zip(bounds, bounds[1:]), jobs):
            if not broken:
                try:
                    results += job.get(timeout=max(0.0, deadline - time.perf_counter()))
                    continue
                except mp.TimeoutError:
                    broken = True
            results += [("timeout", 0.0, "uninterruptible call past the batch deadline; pool restarted")] * (b - a)
        if broken:
            self._kill_pool()
        rewards = [r for _, r, _ in results]
        return {"rewards": rewards,
                "timeouts": sum(s == "timeout" for s, _, _ in results),
                "errors": sum(s == "error" for s, _, _ in results),
                "error_examples": [d for s, _, d in results if s == "error"][:3],
                "seconds": time.perf_counter() - t0}

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class RewardWorker:
    """The Ray actor around a RewardPool (config: reward.*; the function defaults to the task's)."""

    def __init__(self, cfg):
        spec = cfg.reward.fn or "vespo_trainer.task:arith_reward"
        self.pool = RewardPool(spec, cfg.reward.num_procs, cfg.reward.timeout_s)

    def score(self, prompts, responses, truths) -> dict:
        return self.pool.score(prompts, responses, truths)

    def close(self):
        self.pool.close()
