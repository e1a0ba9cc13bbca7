"""Finding the compiled modules: vespo_ext._core (CPU) and vespo_ext._cuda (CUDA, optional)."""
from __future__ import annotations

import importlib
from functools import lru_cache


@lru_cache(maxsize=None)
def _load(name: str):
    try:
        return importlib.import_module(f"vespo_ext.{name}"), None
    except ImportError as exc:  # not built, or built for another Python
        return None, exc


def core():
    """The CPU module, or None when the extension was not built."""
    return _load("_core")[0]


def cuda():
    """The CUDA module, or None when it was not built (no nvcc at build time)."""
    return _load("_cuda")[0]


def module_for(device) -> object:
    """The compiled module that runs on `device`; raises a clear error when there is none."""
    kind = device.type if hasattr(device, "type") else str(device)
    if kind == "cpu":
        mod, exc = _load("_core")
        if mod is None:
            raise RuntimeError(f"vespo_ext._core is not available ({exc}); reinstall with `pip install .`")
        return mod
    if kind == "cuda":
        mod, exc = _load("_cuda")
        if mod is None:
            raise RuntimeError(
                f"vespo_ext._cuda is not available ({exc}): the package was built without nvcc. "
                "Rebuild on a machine with the CUDA toolkit, or use vespo_ext.reference")
        return mod
    raise RuntimeError(f"vespo_ext has no kernels for device type {kind!r}")


def has_kernels(device) -> bool:
    kind = device.type if hasattr(device, "type") else str(device)
    return (kind == "cpu" and core() is not None) or (kind == "cuda" and cuda() is not None)
