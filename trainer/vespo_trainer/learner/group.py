"""The learner's W ranks (actor.num_workers) behind one object that looks like a Ray actor handle.

    group = LearnerGroup(cfg, {"num_cpus": 1.0, "num_gpus": 0.0})  # W Ray actors, one DeepSpeed world
    out = ray.get(group.train_batch.remote(batch))                   # as with a single Learner actor

The driver loops do not know how many ranks there are: `train_batch`, `publish_weights`, `info`,
`warmup`, `save` and `load` each go to EVERY rank (they all take part in DeepSpeed's collectives:
the gradient reduction, ZeRO-3's parameter gathers, the checkpoint barriers) and return ONE
ObjectRef, that of a small merging task (0 CPUs). The merge waits on the ranks' results as they
come in; the first rank that raises or dies fails it at once with a LearnerFailed naming the rank,
so the caller's ray.get raises instead of hanging behind the ranks still blocked in a collective.
The answers have the shapes of the 1-rank Learner's:

    train_batch  {"metrics", "provenance"}: metrics merged over ranks (metrics.py), provenance of
                 every row exactly once, in the batch's order
    publish_weights  rank 0's {"refs", "version", ...} (only rank 0 puts buckets in the object store)
    info, save   rank 0's answer (plus "world_size" in info);  load  the version all ranks agree on
    warmup       per-step losses summed over ranks

Calls may come from several driver threads: they reach every rank in the same order (a lock), as
the ranks' collectives require. A learner failure is fatal: nothing is restarted here; the driver
stops (cluster.stop_actors -> kill) and may resume the run from its last checkpoint. A rank that raises
a VespoUserError (a checkpoint of another world size) fails the call with that error itself, so the
CLI reports it as the user's to fix.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List

from ..errors import VespoUserError
from ..runtime import kill_actor, unwrap_ray_error
from .metrics import finish_train_metrics, merge_warmup
from .rank import Learner

METHODS = ("train_batch", "publish_weights", "info", "warmup", "save", "load")


class LearnerFailed(RuntimeError):
    """A learner rank raised or died; the learner group cannot go on."""


def _merge_provenance(provs: List[dict], n_mb: int) -> dict:
    """Rank r holds rows r*per..(r+1)*per of each mini-batch: interleave back to the batch's order."""
    out = {k: [] for k in provs[0]}
    for k in range(n_mb):
        for p in provs:
            per = len(p["uid"]) // n_mb
            for key in out:
                out[key] += p[key][k * per:(k + 1) * per]
    return out


def _merge_train(results: List[dict]) -> dict:
    n_mb = len(results[0]["parts"]["minibatches"])
    return {"metrics": finish_train_metrics([r["parts"] for r in results]),
            "provenance": _merge_provenance([r["provenance"] for r in results], n_mb)}


def _merge_publish(results: List[dict]) -> dict:
    out = dict(results[0])
    out["seconds"] = max(r["seconds"] for r in results)
    out["resident_peak_mb"] = max(r["resident_peak_mb"] for r in results)
    return out


def _merge_load(results: List[int]) -> int:
    if len(set(results)) != 1:
        raise LearnerFailed(f"learner ranks restored different policy versions: {results}")
    return results[0]


MERGE: Dict[str, Callable] = {"train_batch": _merge_train, "publish_weights": _merge_publish,
                              "info": lambda rs: rs[0], "warmup": merge_warmup, "save": lambda rs: rs[0],
                              "load": _merge_load}


def _collect(method: str, setup_refs: list, refs: list):
    """Body of the merging task: every rank's result, failing on the FIRST rank that fails."""
    import ray

    index = {r: i for i, r in enumerate(setup_refs)}
    index.update({r: i for i, r in enumerate(refs)})
    results: list = [None] * len(refs)
    pending = list(setup_refs) + list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ref = ready[0]
        try:
            value = ray.get(ref)
        except ray.exceptions.RayError as exc:  # RayTaskError (the rank raised) or RayActorError (it died)
            what = "set-up" if ref in setup_refs else method
            cause = unwrap_ray_error(exc)  # a RayTaskError carries the rank's own exception
            if isinstance(cause, VespoUserError):
                raise cause from None
            trace = f"\n--- the rank's traceback ---\n{exc}" if cause is not exc else ""
            raise LearnerFailed(f"learner rank {index[ref]} of {len(refs)} failed in {what}: "
                                f"{type(cause).__name__}: {cause}{trace}") from None
        if ref not in setup_refs:
            results[index[ref]] = value
    return MERGE[method](results)


_collect_task = None


def _collector():
    global _collect_task
    if _collect_task is None:
        import ray

        _collect_task = ray.remote(num_cpus=0, max_retries=0)(_collect)
    return _collect_task


class _Method:
    """`group.<name>.remote(*args)`: call every rank, return the merge's ObjectRef."""

    def __init__(self, group: "LearnerGroup", name: str):
        self.group, self.name = group, name

    def remote(self, *args):
        import ray

        g = self.group
        if len(g.ranks) > 1:
            args = tuple(ray.put(a) for a in args)  # one copy in the object store for all ranks
        with g.lock:  # every rank must see the calls in the same order (their collectives pair up)
            refs = [getattr(a, self.name).remote(*args) for a in g.ranks]
        return _collector().remote(self.name, g.setup_refs, refs)


class LearnerGroup:
    """W learner ranks (Ray actors) forming one DeepSpeed world; duck-types a Learner actor handle."""

    def __init__(self, cfg, options: dict):
        import ray

        world = cfg.actor.num_workers
        self.lock = threading.Lock()
        cls = ray.remote(Learner).options(**options)
        if world == 1:
            self.ranks = [cls.remote(cfg)]
            self.setup_refs: list = []
        else:
            self.ranks = [cls.remote(cfg, rank, world) for rank in range(world)]
            # rank 0's node hosts the rendezvous; DeepSpeed's init is collective, so all ranks at once
            try:
                addr, port = ray.get(self.ranks[0].endpoint.remote())
            except ray.exceptions.RayActorError as exc:
                raise LearnerFailed(f"learner rank 0 of {world} failed to start: {exc}") from None
            self.setup_refs = [a.setup.remote(addr, port) for a in self.ranks]
        for name in METHODS:
            setattr(self, name, _Method(self, name))

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def kill(self) -> None:
        """End every rank (a rank left blocked in a collective would never return)."""
        for a in self.ranks:
            kill_actor(a)
