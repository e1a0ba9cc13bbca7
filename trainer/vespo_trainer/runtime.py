"""Small process-level helpers shared by the driver and the actors: the CUDA-or-not decision, threads, seeds,
log noise, a free port, Ray's task errors unwrapped."""
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
        except (ImportError, RuntimeError):  # no Ray here, or not inside a task/actor
            n = 0
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
