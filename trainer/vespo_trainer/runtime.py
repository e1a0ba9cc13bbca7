"""Small process-level helpers shared by the driver and the actors: the CUDA-or-not decision, threads, seeds,
log noise, a free port, Ray's task errors unwrapped, a ray.get that gives up on a hung actor."""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import warnings


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, the same in every process and Python run."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def use_cuda(cfg) -> bool:
    """The one CUDA-or-not decision: trainer.device, and for `auto` a GPU visible to this process or, on the
    driver only (a CPU head node of a GPU cluster), a GPU in the Ray cluster. cluster.start_actors writes
    the answer into trainer.device before it starts the actors, so they all agree with the driver."""
    import torch

    if cfg.trainer.device != "auto":
        return cfg.trainer.device == "cuda"
    if torch.cuda.is_available():
        return True
    import ray

    in_driver = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is None
    return in_driver and ray.cluster_resources().get("GPU", 0) > 0


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The exception an actor or task raised, out of Ray's RayTaskError (itself for anything else)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ActorTimeout(RuntimeError):
    """Actor calls that did not answer within trainer.actor_timeout_s (`what` names each: actor and method)."""

    def __init__(self, what: str, timeout_s: float):
        super().__init__(f"{what} did not answer within trainer.actor_timeout_s={timeout_s:g}s (hung, or slower "
                         "than that: raise trainer.actor_timeout_s, 0 waits forever)")
        self.what, self.timeout_s = what, timeout_s


def get_within(refs, what, timeout_s: float):
    """ray.get(refs) (one ObjectRef or a list) that raises ActorTimeout naming the calls still unanswered after
    timeout_s seconds (0 or None: wait forever). `what`: one name, or one per ref ("rollout worker 0 (generate)").
    A call that failed is answered: ray.get raises its error as usual."""
    import ray

    many = isinstance(refs, list)
    lst = refs if many else [refs]
    if timeout_s and lst:
        _, waiting = ray.wait(lst, num_returns=len(lst), timeout=timeout_s, fetch_local=False)
        if waiting:
            names = what if isinstance(what, list) else [what] * len(lst)
            late = set(waiting)
            raise ActorTimeout(", ".join(dict.fromkeys(n for r, n in zip(lst, names) if r in late)), timeout_s)
    return ray.get(refs)


def kill_actor(handle) -> None:
    """ray.kill, for an actor that may be dead already (no error); a handle Ray no longer knows (another
    session, a cluster that lost it) has nothing left to kill either."""
    import ray

    try:
        ray.kill(handle)
    except ray.exceptions.RayError:
        pass


def set_threads(requested: int) -> int:
    """torch threads for this actor: `requested`, or the CPUs Ray assigned it (at least 1)."""
    import torch

    n = requested
    if n <= 0:
        n = 0
        try:
            import ray

            if ray.is_initialized():
                n = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
        except (ImportError, RuntimeError, AssertionError):  # no Ray here, or the driver (Ray asserts
            n = 0                                           # that only a worker asks), not a task/actor
        n = max(1, n)
    torch.set_num_threads(n)
    return n


def quiet_libraries() -> None:
    """Keep the actors' logs readable: DeepSpeed/transformers info lines and known warnings off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("DeepSpeed", "deepspeed", "transformers", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*generation flags are not valid.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
