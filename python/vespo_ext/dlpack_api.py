"""Framework-free entry: the fused forward and backward on any DLPack arrays (NumPy, CuPy, torch).

Packed layout only (logits (T, V), per-token arrays (T,), cu_seqlens (S+1,) int64). Outputs are
allocated with the input's own array library. No torch import.

    import numpy as np
    from vespo_ext import dlpack_api
    fwd = dlpack_api.forward(logits, labels, old_logp, advantages, cu_seqlens, mask=mask)
    grad = dlpack_api.backward(logits, labels, fwd, mask=mask)   # d loss / d logits

Inputs must already have the kernels' dtypes: logits float32/bfloat16/float16 (C-contiguous rows),
labels and cu_seqlens int64, old_logp/advantages/rollout_is_weights float32, mask bool or uint8.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from ._spec import AGG_IDS, LOSS_IDS, METRIC_NAMES, resolve_loss

_NO_IGNORE = -(2**63)


def _xp(a) -> Any:
    """The array library of `a` (numpy, cupy or torch)."""
    root = type(a).__module__.split(".")[0]
    if root not in ("numpy", "cupy", "torch"):
        raise TypeError(f"unsupported array type {type(a).__name__}; pass NumPy, CuPy or torch arrays")
    return importlib.import_module(root)


def _on_gpu(a) -> bool:
    return a.__dlpack_device__()[0] in (2, 13)


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


def forward(logits, labels, old_logp, advantages, cu_seqlens, *, mask=None, rollout_is_weights=None,
            temperature: float = 1.0, loss: str = "vespo", agg: Optional[str] = None, norm=None,
            **params) -> dict:
    """Fused forward. Returns a dict: loss (1,), metrics {name: 0-d view}, and the saved state
    (logp, lse, dlogp) that `backward` needs."""
    agg, values = resolve_loss(loss, agg, params)
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mod, la = _module_and_stream(logits)
    T = logits.shape[0]
    S = cu_seqlens.shape[0] - 1
    logp, lse, dlogp = (_empty(logits, (T,), "float32") for _ in range(3))
    out = _empty(logits, (1,), "float32")
    metrics = _empty(logits, (len(METRIC_NAMES),), "float32")
    ws = _empty(logits, ((S + 1) * mod.seq_stride,), "float64")
    bad = _empty(logits, (1,), "int64")
    bad[0] = 0
    mod.logprob_fwd(logits, labels, mask, logp, lse, None, bad, inv_temperature=1.0 / temperature,
                    ignore_index=_NO_IGNORE, **la)
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
            "dlogp": dlogp, "temperature": temperature}


def backward(logits, labels, fwd: dict, *, mask=None, grad_scale=None, out=None):
    """Gradient of the forward's loss w.r.t. the logits (times grad_scale, a (1,) float32 array).
    `out` may be a preallocated array, or the logits themselves for an in-place gradient."""
    mod, la = _module_and_stream(logits)
    grad = out if out is not None else _empty(logits, tuple(logits.shape), str(logits.dtype).split(".")[-1])
    mod.logprob_bwd(logits, labels, mask, fwd["logp"], fwd["lse"], fwd["dlogp"], grad_scale, grad,
                    inv_temperature=1.0 / fwd["temperature"], ignore_index=_NO_IGNORE, **la)
    return grad
