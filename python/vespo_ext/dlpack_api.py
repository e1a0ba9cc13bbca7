"""Framework-free entry: the fused forward and backward on any DLPack arrays (NumPy, CuPy, torch).

Packed layout only (logits (T, V), per-token arrays (T,), cu_seqlens (S+1,) int64). Outputs are
allocated with the input's own array library. No torch import.

    import numpy as np
    from vespo_ext import dlpack_api
    fwd = dlpack_api.forward(logits, labels, old_logp, advantages, cu_seqlens, mask=mask)
    grad = dlpack_api.backward(logits, labels, fwd, mask=mask)   # d loss / d logits

Inputs must already have the kernels' dtypes: logits float32/bfloat16/float16 (C-contiguous rows),
labels int64, cu_seqlens int64 or int32, old_logp/advantages/rollout_is_weights float32, mask bool or uint8.
"""
from __future__ import annotations

import functools
import importlib
import math
from contextlib import nullcontext
from typing import Any, Optional

from ._spec import AGG_IDS, LOSS_IDS, METRIC_NAMES, resolve_loss

_NO_IGNORE = -(2**63)
_F32_MAX = 3.4028234663852886e38
_F32_TINY = 1.1754943508222875e-38


def _xp(a, name: str = "logits") -> Any:
    """The array library of `a` (numpy, cupy or torch)."""
    root = type(a).__module__.split(".")[0]
    if root not in ("numpy", "cupy", "torch") or not hasattr(a, "__dlpack__"):
        raise TypeError(f"argument '{name}' must be a NumPy, CuPy or torch array, got {type(a).__name__}")
    return importlib.import_module(root)


def _check_arrays(**arrays) -> None:
    for name, a in arrays.items():
        if a is not None:
            _xp(a, name)


def _check_rows(logits) -> None:
    """Expanded / broadcast logits (row stride 0; NumPy exports them read-only, which DLPack cannot say)."""
    st = getattr(logits, "strides", None)
    if _xp(logits).__name__ == "numpy" and logits.ndim == 2 and logits.shape[0] > 1 and st[0] < logits.shape[1] * logits.itemsize:
        raise ValueError(f"argument 'logits' has overlapping rows (strides {st}, e.g. np.broadcast_to): "
                         "pass np.ascontiguousarray(logits)")


def _dense(a):
    """An empty array's strides are whatever its library chose (NumPy: (0, V) rows of an empty batch);
    give the kernels a fresh compact one, which they accept whatever T is."""
    if a is not None and 0 in tuple(a.shape):
        return _empty(a, tuple(a.shape), str(a.dtype).split(".")[-1])
    return a


def _on_gpu(a) -> bool:
    return a.__dlpack_device__()[0] in (2, 13)


def _device_of(a):
    """A context that makes a GPU array's device the current one: the kernels launch on the current device
    (the stream passed is that device's current stream), the outputs are allocated there (CuPy allocates on
    the current device), and torch exports a CUDA tensor only from its own device ("Can't export tensors on a
    different CUDA device index"). Nothing for host arrays or non-arrays (their TypeError comes later)."""
    if not hasattr(a, "__dlpack_device__") or not _on_gpu(a):
        return nullcontext()
    root = type(a).__module__.split(".")[0]
    if root == "torch":
        return importlib.import_module("torch").cuda.device(a.device)
    if root == "cupy":
        return a.device  # a cupy.cuda.Device is a context manager
    return nullcontext()


def _on_logits_device(fn):
    @functools.wraps(fn)
    def run(logits, *args, **kwargs):
        with _device_of(logits):
            return fn(logits, *args, **kwargs)
    return run


def _module_and_stream(a):
    from . import _backend

    _xp(a)  # a TypeError naming the type for anything that is not a NumPy/CuPy/torch array
    if _on_gpu(a):
        mod = _backend.module_for("cuda")
        xp = _xp(a)
        if xp.__name__ == "cupy":
            stream = xp.cuda.get_current_stream().ptr
        elif xp.__name__ == "torch":
            stream = xp.cuda.current_stream(a.device).cuda_stream
        else:
            stream = 0
        return mod, {"num_threads": 1, "stream": stream}
    import os

    return _backend.module_for("cpu"), {"num_threads": os.cpu_count() or 1, "stream": 0}


def _empty(like, shape, dtype_name: str):
    xp = _xp(like)
    if xp.__name__ == "torch":
        return xp.empty(shape, dtype=getattr(xp, dtype_name), device=like.device)
    return xp.empty(shape, dtype=dtype_name)


@_on_logits_device
def forward(logits, labels, old_logp, advantages, cu_seqlens, *, mask=None, rollout_is_weights=None,
            temperature: float = 1.0, loss: str = "vespo", agg: Optional[str] = None, norm=None,
            **params) -> dict:
    """Fused forward. Returns a dict: loss (1,), metrics {name: 0-d view}, and the saved state
    (logp, lse, dlogp, row_max, log_sum) that `backward` needs (row_max: each row's largest logit;
    log_sum = lse - row_max / temperature; the backward uses these two, not lse)."""
    agg, values = resolve_loss(loss, agg, params)
    _check_arrays(logits=logits, labels=labels, old_logp=old_logp, advantages=advantages, cu_seqlens=cu_seqlens,
                  mask=mask, rollout_is_weights=rollout_is_weights)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)) or not (_F32_TINY <= 1.0 / temperature <= _F32_MAX):
        raise ValueError(f"temperature must be finite, > 0 and have a float32 inverse, got {temperature}")
    if norm is not None:
        if isinstance(norm, bool):
            raise TypeError("norm must be a number, got bool")
        try:
            norm = float(norm)
        except (TypeError, ValueError):
            raise TypeError(f"norm must be a number (or a 1-element array), got {type(norm).__name__}") from None
        if not (math.isfinite(norm) and _F32_TINY <= norm <= _F32_MAX):
            raise ValueError(f"norm must be finite, > 0 and a normal float32 (>= 1.2e-38), got {norm}")
    _check_rows(logits)
    logits, labels, old_logp, advantages, mask, rollout_is_weights = (
        _dense(a) for a in (logits, labels, old_logp, advantages, mask, rollout_is_weights))
    mod, la = _module_and_stream(logits)
    if str(cu_seqlens.dtype).split(".")[-1] == "int32":  # issue #17: int32 offsets, as flash-attn uses
        xp = _xp(cu_seqlens)
        cu_seqlens = cu_seqlens.to(xp.int64) if xp.__name__ == "torch" else cu_seqlens.astype(xp.int64)
    T = logits.shape[0]
    S = cu_seqlens.shape[0] - 1
    logp, lse, dlogp, row_max, log_sum = (_empty(logits, (T,), "float32") for _ in range(5))
    out = _empty(logits, (1,), "float32")
    metrics = _empty(logits, (len(METRIC_NAMES),), "float32")
    ws = _empty(logits, ((S + 1) * mod.seq_stride,), "float64")
    bad = _empty(logits, (1,), "int64")
    bad[0] = 0
    mod.logprob_fwd(logits, labels, mask, logp, lse, None, bad, inv_temperature=1.0 / temperature,
                    ignore_index=_NO_IGNORE, row_max=row_max, log_sum=log_sum, **la)
    row = int(bad[0])
    if row:
        raise IndexError(f"labels[{row - 1}] is outside [0, {logits.shape[1]}) at a counted position")
    nrm = None
    if norm is not None:
        nrm = _empty(logits, (1,), "float32")
        nrm[0] = float(norm)
    mod.seq_reduce(cu_seqlens, logp, old_logp, advantages, mask, rollout_is_weights, nrm, out, dlogp, metrics, ws,
                   loss_type=LOSS_IDS[loss], params=values, agg=AGG_IDS[agg], norm_len=0.0, **la)
    return {"loss": out, "metrics": {k: metrics[i] for i, k in enumerate(METRIC_NAMES)}, "logp": logp, "lse": lse,
            "dlogp": dlogp, "row_max": row_max, "log_sum": log_sum, "temperature": temperature}


@_on_logits_device
def backward(logits, labels, fwd: dict, *, mask=None, grad_scale=None, out=None):
    """Gradient of the forward's loss w.r.t. the logits (times grad_scale, a (1,) float32 array).
    `out` may be a preallocated array, or the logits themselves for an in-place gradient."""
    _check_arrays(logits=logits, labels=labels, mask=mask, grad_scale=grad_scale, out=out)
    logits, labels, mask = (_dense(a) for a in (logits, labels, mask))
    mod, la = _module_and_stream(logits)
    grad = out if out is not None else _empty(logits, tuple(logits.shape), str(logits.dtype).split(".")[-1])
    mod.logprob_bwd(logits, labels, mask, fwd["logp"], fwd["lse"], fwd["dlogp"], grad_scale, grad,
                    inv_temperature=1.0 / fwd["temperature"], ignore_index=_NO_IGNORE, row_max=fwd.get("row_max"),
                    log_sum=fwd.get("log_sum"), **la)
    return grad
