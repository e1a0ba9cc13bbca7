"""Small process-level helpers shared by the actors: threads, seeds, log noise, a free port."""
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
        except Exception:
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
