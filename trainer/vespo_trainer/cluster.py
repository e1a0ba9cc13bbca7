"""Ray: join a cluster ($RAY_ADDRESS or ray.address) or start a local one; create the actors."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import List

from .errors import BackendMissing, ResourceError
from .learner.group import LearnerGroup
from .reward.pool import RewardWorker
from .rollout.base import backend_class, check_backend
from .runtime import kill_actor, use_cuda


def ray_address(cfg):
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def ray_address_file() -> str:
    """Where `ray start` records the head's address (what Ray joins when given no address)."""
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return os.path.join(tmp or "/tmp", "ray", "ray_current_cluster")


def check_reachable(address: str, timeout_s: float, source: str) -> None:
    """ResourceError naming `address` (host:port, ray://host:port or auto; given by `source`) unless something
    accepts a TCP connection there within timeout_s; Ray itself would retry for minutes."""
    import socket

    where = address
    if address == "auto":  # the address `ray start` wrote into Ray's address file
        path = ray_address_file()
        try:
            with open(path) as f:
                where = f.read().strip()
        except OSError:
            raise ResourceError(f"ray.address=auto: no running Ray found ({path} is missing); start one with "
                                "`ray start --head`, or leave ray.address and RAY_ADDRESS unset for a local Ray") \
                from None
    hostport = where.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ResourceError(f"Ray address {address!r}: expected host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ResourceError(
            f"Ray address {where} (from {source}) does not answer within "
            f"{timeout_s:g}s ({exc}); is the cluster up? Unset RAY_ADDRESS and ray.address to start a local Ray "
            "instead (ray.connect_timeout_s sets the wait)") from None


TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_NOTICE)


@contextmanager
def quiet_token_auth_notice():
    """Drop Ray's "Token authentication is enabled for this Ray cluster..." warning (printed on every local
    ray.init when RAY_AUTH_MODE is unset, across the progress bar). Only for a local Ray the trainer starts
    itself: the authentication stays as Ray sets it (token), only the notice goes."""
    log, drop = logging.getLogger(TOKEN_AUTH_LOGGER), _DropTokenAuthNotice()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


@contextmanager
def ray_session(cfg):
    """Use the Ray already initialised in this process, join ray.address / $RAY_ADDRESS (after checking that
    it answers), or start a local Ray of our own (address="local": never the one in Ray's address file,
    which may name a head that is long gone; without Ray's token-authentication notice). Shuts down only
    what it started."""
    import ray

    started = False
    if not ray.is_initialized():
        address = ray_address(cfg)
        kw = {"include_dashboard": False, "log_to_driver": cfg.ray.log_to_driver}
        if address is None:
            with quiet_token_auth_notice():
                ray.init(address="local", num_cpus=cfg.ray.num_cpus, **kw)
        else:
            check_reachable(address, cfg.ray.connect_timeout_s, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
            ray.init(address=address, **kw)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def plan_resources(cfg, cluster: dict, check: bool = True) -> dict:
    """CPUs/GPUs per actor (the learner's: per rank); -1 GPUs means: 1 each when the cluster has
    enough, else share (a learner of W > 1 ranks takes 0.6 of a GPU per rank: more than half, so
    that Ray never packs two NCCL ranks onto one GPU; the rollout workers share the rest)."""
    cuda = use_cuda(cfg)
    r, w = cfg.rollout.num_workers, cfg.actor.num_workers
    gpus = cluster.get("GPU", 0.0)
    share = gpus < w + r
    learner_gpu = cfg.actor.num_gpus if cfg.actor.num_gpus >= 0 else (
        0.0 if not cuda else 1.0 if not share else 0.5 if w == 1 else 0.6)
    rollout_gpu = cfg.rollout.num_gpus if cfg.rollout.num_gpus >= 0 else (
        0.0 if not cuda else 1.0 if not share else 0.5 / r if w == 1 else 0.4 / -(-r // w))
    if cuda and w > 1 and learner_gpu <= 0.5:
        raise ResourceError(f"actor.num_gpus={learner_gpu:g} with {w} learner ranks: NCCL needs one GPU per rank, "
                           "so each rank must ask for more than half a GPU")
    plan = {"learner": {"num_cpus": cfg.actor.num_cpus, "num_gpus": learner_gpu},
            "rollout": {"num_cpus": cfg.rollout.num_cpus, "num_gpus": rollout_gpu},
            "reward": {"num_cpus": cfg.reward.num_cpus, "num_gpus": 0.0}}
    need_cpu = w * cfg.actor.num_cpus + r * cfg.rollout.num_cpus + cfg.reward.num_workers * cfg.reward.num_cpus
    need_gpu = w * learner_gpu + r * rollout_gpu
    local = ray_address(cfg) is None  # a remote cluster may autoscale: only a local Ray is checked
    if check and local and (need_cpu > cluster.get("CPU", 0.0) + 1e-9 or need_gpu > gpus + 1e-9):
        raise ResourceError(
            f"the actors need {need_cpu:g} CPUs and {need_gpu:g} GPUs but the Ray cluster has "
            f"{cluster.get('CPU', 0):g} CPUs and {gpus:g} GPUs: lower actor/rollout/reward.num_cpus or num_gpus, "
            "or the number of workers (Ray would otherwise wait forever)")
    return plan


@dataclass
class Actors:
    learner: object  # a LearnerGroup: actor-handle-like, every call goes to all actor.num_workers ranks
    rollout: List[object]
    reward: List[object]


def start_actors(cfg) -> Actors:
    import ray

    if ray_address(cfg) is None:
        check_backend(cfg.rollout.backend)  # a local Ray's workers share this environment: fail before starting
    else:
        check_backend_on_cluster(cfg.rollout.backend)
    cfg.trainer.device = "cuda" if use_cuda(cfg) else "cpu"  # decided once, here: the actors read the answer
    res = plan_resources(cfg, ray.cluster_resources())
    learner = LearnerGroup(cfg, res["learner"])
    rollout = [_new_rollout(cfg, res, rank) for rank in range(cfg.rollout.num_workers)]
    reward = [_new_reward(cfg, res) for _ in range(cfg.reward.num_workers)]
    return Actors(learner, rollout, reward)


def check_backend_on_cluster(name: str) -> None:
    """check_backend in a Ray worker of the joined cluster (its environment may lack what this one has): the
    BackendMissing itself, not an actor that dies in __init__ (whose error reaches the driver only as text)."""
    import ray

    from .runtime import unwrap_ray_error

    try:
        ray.get(ray.remote(num_cpus=0, max_retries=0)(check_backend).remote(name))
    except ray.exceptions.RayTaskError as exc:
        cause = unwrap_ray_error(exc)
        raise (cause if isinstance(cause, BackendMissing) else exc) from None


def _new_rollout(cfg, res: dict, rank: int):
    import ray

    worker_cls = backend_class(cfg.rollout.backend)
    # partial rollout: a weight update must reach the worker while it generates (a threaded actor)
    threaded = cfg.trainer.mode == "async" and cfg.async_.partial_rollout
    return ray.remote(worker_cls).options(max_concurrency=4 if threaded else 1, **res["rollout"]).remote(cfg, rank)


def restart_rollout(cfg, actors: Actors, rank: int):
    """Replace rollout worker `rank` (dead) by a fresh one; it needs weights before it generates."""
    import ray

    kill_actor(actors.rollout[rank])
    actors.rollout[rank] = _new_rollout(cfg, plan_resources(cfg, ray.cluster_resources(), check=False), rank)
    return actors.rollout[rank]


def _new_reward(cfg, res: dict):
    import ray

    return ray.remote(RewardWorker).options(**res["reward"]).remote(cfg)


def restart_reward(cfg, actors: Actors, index: int):
    """Replace reward worker `index` (dead) by a fresh one."""
    import ray

    kill_actor(actors.reward[index])
    actors.reward[index] = _new_reward(cfg, plan_resources(cfg, ray.cluster_resources(), check=False))
    return actors.reward[index]


def stop_actors(actors: Actors) -> None:
    import ray

    for a in actors.reward:
        try:
            ray.get(a.close.remote(), timeout=10)  # ends its process pool
        except ray.exceptions.RayError:  # dead, or stuck past the timeout: killed below either way
            pass
    actors.learner.kill()
    for a in [*actors.rollout, *actors.reward]:
        kill_actor(a)

