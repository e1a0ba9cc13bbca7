"""Reward scoring in a process pool with a time limit per call; model output is data, never code.

A reward function (`reward.function`) is a built-in name (BUILTIN: `arith`, `math`) or
'package.module:function', imported and called in a separate process (spawned, so it shares nothing
with the actor) with one of two signatures, chosen by its parameter names:

  - veRL's, when it has a parameter named `solution_str`:
        fn(data_source=..., solution_str=response, ground_truth=..., extra_info=...)
    (only the names it declares are passed, all four when it takes **kwargs);
  - otherwise fn(prompt, response, ground_truth), positionally (prompt: the plain prompt text; for
    chat prompts the last user message).

It returns a number, or a dict with a numeric "score" (veRL's richer return value).
Each call runs under an interval timer (SIGALRM): a call that takes longer than `timeout_s`
scores 0 and counts as a timeout; one that raises, or returns something that is not a finite
number, scores 0 and counts as an error. A call that cannot be interrupted (stuck in C code)
is caught by a backstop deadline for the whole batch: the pool is then killed and restarted and
the unfinished samples count as timeouts. Nothing here ever passes model output to eval/exec;
the built-in verifier compares strings.
"""
from __future__ import annotations

import importlib
import inspect
import math
import multiprocessing as mp
import signal
import time
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import ConfigError

_FN_CACHE: Dict[str, Callable] = {}
BUILTIN = {"arith": "vespo_trainer.data.arith:arith_reward", "math": "vespo_trainer.reward.math_reward:compute_score"}
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")


class _CallTimeout(Exception):
    pass


def resolve_fn(spec: str) -> Callable:
    """A built-in name or 'package.module:function' -> the function (imported, cached per process)."""
    fn = _FN_CACHE.get(spec)
    if fn is None:
        module, _, name = BUILTIN.get(spec, spec).partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"reward.function: {spec!r} cannot be imported: {exc}") from None
        if not callable(fn):
            raise ConfigError(f"reward.function: {spec!r} is not callable")
        _FN_CACHE[spec] = fn
    return fn


def make_caller(fn: Callable) -> Callable:
    """call(data_source, prompt, response, ground_truth, extra_info) in the function's own signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "solution_str" not in params:
        return lambda ds, prompt, response, truth, extra: fn(prompt, response, truth)
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    names = [n for n in VERL_ARGS if takes_all or n in params]

    def call(ds, prompt, response, truth, extra):
        values = {"data_source": ds, "solution_str": response, "ground_truth": truth, "extra_info": extra}
        return fn(**{n: values[n] for n in names})
    return call


def _as_score(value) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"reward dict has no 'score': {sorted(value)}")
        value = value["score"]
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"reward is not finite: {value}")
    return value


def _warm(spec: str) -> None:
    """Pool-process initializer: import the function (and what its module imports) before the first timed call."""
    try:
        resolve_fn(spec)
    except Exception:  # noqa: BLE001 - the first call reports it, scored as an error
        pass


def _on_alarm(signum, frame):
    raise _CallTimeout()


def _score_chunk(spec: str, items: List[tuple], timeout_s: float) -> List[tuple]:
    """Runs in a pool process: [(status, reward, detail)] with status ok | timeout | error."""
    call = make_caller(resolve_fn(spec))
    signal.signal(signal.SIGALRM, _on_alarm)
    out = []
    for ds, prompt, response, truth, extra in items:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                value = call(ds, prompt, response, truth, extra)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            out.append(("ok", _as_score(value), ""))
        except _CallTimeout:
            out.append(("timeout", 0.0, f"exceeded {timeout_s}s"))
        except BaseException as exc:  # noqa: BLE001 - any failure of the user's function scores 0
            out.append(("error", 0.0, f"{type(exc).__name__}: {exc}"[:300]))
    return out


class RewardPool:
    """Scores responses with `fn_spec` (a BUILTIN name or 'package.module:function') in `num_procs` processes."""

    def __init__(self, fn_spec: str, num_procs: int = 2, timeout_s: float = 5.0, grace_s: float = 10.0):
        resolve_fn(fn_spec)  # fail early, in the caller, if the function does not exist
        self.fn_spec, self.num_procs, self.timeout_s, self.grace_s = fn_spec, num_procs, timeout_s, grace_s
        self._pool: Optional[mp.pool.Pool] = None
        self.restarts = 0

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.num_procs, initializer=_warm, initargs=(self.fn_spec,))
        return self._pool

    def _kill_pool(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
            self.restarts += 1

    def score(self, prompts: Sequence[str], responses: Sequence[str], truths: Sequence, *,
              data_sources: Optional[Sequence[str]] = None, extra_infos: Optional[Sequence] = None) -> dict:
        t0 = time.perf_counter()
        n = len(prompts)
        items = list(zip(data_sources or [""] * n, prompts, responses, truths, extra_infos or [None] * n))
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


def reward_spec(cfg) -> str:
    """reward.function, or the task's own verifier: arith for task arith, math for task dataset."""
    return cfg.reward.function or ("math" if cfg.task.name == "dataset" else "arith")


class RewardWorker:
    """The Ray actor around a RewardPool (config: reward.*; the function defaults to the task's)."""

    def __init__(self, cfg):
        self.pool = RewardPool(reward_spec(cfg), cfg.reward.num_procs, cfg.reward.timeout_s)

    def score(self, prompts, responses, truths, data_sources=None, extra_infos=None) -> dict:
        return self.pool.score(prompts, responses, truths, data_sources=data_sources, extra_infos=extra_infos)

    def close(self):
        self.pool.close()
