"""The fused ops as torch custom ops (torch.library): eager, autograd, torch.compile and opcheck.

Three kernels run per step (see csrc/include/vespo/params.h): logprob_fwd reads each logits row once,
seq_reduce does the per-sequence math on device, logprob_bwd reads each row once more and writes
the gradient once. Nothing of size T x V is allocated besides the gradient itself (or nothing at all
with grad_inplace=True).
"""
from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor

from . import _backend, reference
from ._inputs import (
    check_cu_seqlens,
    check_ignore_index,
    check_logits_labels,
    check_temperature,
    contiguous_rows,
    pack_inputs,
    pack_logp_inputs,
)
from ._spec import AGG_IDS, LOSS_IDS, METRIC_NAMES, resolve_loss

_NO_IGNORE = -(2**63)  # ignore_index that matches no label: every counted label must be in [0, V)
_SEQ_STRIDE = 13  # doubles per sequence record (kSeqStride in params.h; checked by the tests)


def _launch(t: Tensor) -> dict:
    if t.device.type == "cuda":
        return {"num_threads": 1, "stream": torch.cuda.current_stream(t.device).cuda_stream}
    return {"num_threads": torch.get_num_threads(), "stream": 0}


def _guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def _dl(t: Optional[Tensor]) -> Optional[Tensor]:
    """What crosses into C++: no autograd, bool as uint8 (a view)."""
    if t is None:
        return None
    t = t.detach()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _raise_bad_label(bad: Tensor, labels: Tensor, V: int, why: str) -> None:
    """Raise IndexError if the forward flagged a bad label. On CPU the flag is read at once (no sync
    to pay). On CUDA reading it would stall the host every step, so the flag is copied to pinned
    memory asynchronously and checked later (_pending_label_errors): at the next call of any vespo
    op, or of `check_errors()`, whichever comes first once the GPU has got that far; the error names
    the step's row. VESPO_SYNC_CHECKS=1 in the environment restores the immediate check."""
    if bad.device.type != "cuda" or _SYNC_CHECKS:
        row = int(bad.item())
        if row:
            raise IndexError(f"labels[{row - 1}] = {int(labels[row - 1])} is outside [0, {V}) {why}")
        return
    if torch.compiler.is_compiling():
        return
    host = torch.empty(1, dtype=torch.int64, pin_memory=True)
    host.copy_(bad, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(bad.device))
    with _pending_lock:
        _pending.append((event, host, labels, V, why))


_SYNC_CHECKS = os.environ.get("VESPO_SYNC_CHECKS", "") not in ("", "0")
_pending: list = []
_pending_lock = threading.Lock()


def _pending_label_errors(wait: bool = False) -> None:
    """Raise the first deferred bad-label error whose forward has finished (all of them if wait)."""
    if not _pending:
        return
    with _pending_lock:
        ready = []
        while _pending and (wait or _pending[0][0].query()):
            event, host, labels, V, why = _pending.pop(0)
            event.synchronize()
            ready.append((int(host[0]), labels, V, why))
    for row, labels, V, why in ready:
        if row:
            with _pending_lock:
                _pending.clear()  # one error reported; later steps of the same run are not trusted either
            raise IndexError(f"labels[{row - 1}] = {int(labels[row - 1])} is outside [0, {V}) {why} "
                             "(reported after the step that read it: CUDA label checks do not stall the GPU)")


def check_errors() -> None:
    """Wait for every CUDA forward launched so far and raise its deferred bad-label error, if any."""
    _pending_label_errors(wait=True)


def _logprob_fwd_kernel(logits: Tensor, labels: Tensor, mask: Optional[Tensor], inv_temperature: float,
                        ignore_index: int, with_entropy: bool = False):
    """THE forward kernel call (one read of the (T, V) logits rows, any row slice with unit stride along V).

    Returns (logp, lse, row_max, log_sum, entropy, bad), all float32 (T,) on the logits' device except
    bad (int64 (1,): 1 + a counted row whose label is outside [0, V) and not ignore_index, else 0;
    pass it to _raise_bad_label) and entropy (None unless with_entropy). row_max is the row's largest
    raw logit m_t and log_sum = log sum_v exp((z_v - m_t) * inv_temperature), so lse = m_t *
    inv_temperature + log_sum; the backward wants (row_max, log_sum), not lse (shift-invariant)."""
    mod = _backend.module_for(logits.device)
    T = logits.shape[0]
    f32 = {"dtype": torch.float32, "device": logits.device}
    logp, lse, row_max, log_sum = (torch.empty(T, **f32) for _ in range(4))
    entropy = torch.empty(T, **f32) if with_entropy else None
    bad = torch.zeros(1, dtype=torch.int64, device=logits.device)
    with _guard(logits):
        mod.logprob_fwd(_dl(logits), _dl(labels), _dl(mask), logp, lse, entropy, bad, inv_temperature=inv_temperature,
                        ignore_index=ignore_index, row_max=row_max, log_sum=log_sum, **_launch(logits))
    return logp, lse, row_max, log_sum, entropy, bad


def _logprob_bwd_kernel(grad: Tensor, logits: Tensor, labels: Tensor, mask: Optional[Tensor], logp: Tensor,
                        row_max: Tensor, log_sum: Tensor, dlogp: Tensor, grad_loss: Tensor, inv_temperature: float,
                        ignore_index: int = None) -> None:
    """THE backward kernel call: grad[t, v] = grad_loss * dlogp[t] * (1[v == y_t] - p_tv) * inv_temperature,
    p_tv = exp((z_tv - row_max[t]) * inv_temperature - log_sum[t]); grad may be the logits themselves."""
    mod = _backend.module_for(logits.device)
    scale = grad_loss.detach().reshape(1).to(torch.float32).contiguous()
    with _guard(logits):
        # lse is not read when (row_max, log_sum) are given; log_sum stands in for the required argument.
        mod.logprob_bwd(_dl(logits), _dl(labels), _dl(mask), _dl(logp), _dl(log_sum), _dl(dlogp), scale, _dl(grad),
                        inv_temperature=inv_temperature, ignore_index=_NO_IGNORE if ignore_index is None else ignore_index,
                        row_max=_dl(row_max), log_sum=_dl(log_sum), **_launch(logits))


def _seq_reduce(mod, la: dict, logp: Tensor, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm,
                loss_type: int, params: list, agg: int, norm_len: float):
    """Allocate the outputs and run seq_reduce: (loss 0-d, dlogp (T,), metrics)."""
    f32 = {"dtype": torch.float32, "device": logp.device}
    loss, dlogp = torch.empty(1, **f32), torch.empty(logp.shape[0], **f32)
    metrics = torch.empty(len(METRIC_NAMES), **f32)
    ws = torch.empty(cu_seqlens.numel() * _SEQ_STRIDE, dtype=torch.float64, device=logp.device)  # (S + 1) records
    mod.seq_reduce(_dl(cu_seqlens), _dl(logp), _dl(old_logp), _dl(advantages), _dl(mask), _dl(rollout_is_weights),
                   _dl(norm), loss, dlogp, metrics, ws, loss_type=loss_type, params=params, agg=agg,
                   norm_len=norm_len, **la)
    return loss.reshape(()), dlogp, metrics


# ---------------------------------------------------------------------------------------------
# Row-slice kernel calls for code that produces its logits piecewise (vespo_ext.linear). These two
# functions and _seq_reduce are the only places outside the custom ops below that call the binding.
def rows_logprob_fwd(logits: Tensor, labels: Tensor, mask: Optional[Tensor], logp: Tensor, lse: Tensor,
                     entropy: Optional[Tensor], bad: Tensor, inv_temperature: float,
                     ignore_index: int = _NO_IGNORE, row_max: Optional[Tensor] = None,
                     log_sum: Optional[Tensor] = None) -> None:
    """logprob_fwd on a (n, V) row slice: writes logp, lse (and entropy, and row_max/log_sum when
    given: both or neither) (n,) float32; bad (1,) int64 receives (row + 1) of a counted row with an
    out-of-range label (0 = none); no host sync."""
    with _guard(logits):
        _backend.module_for(logits.device).logprob_fwd(
            _dl(logits), _dl(labels), _dl(mask), logp, lse, entropy, bad, inv_temperature=inv_temperature,
            ignore_index=ignore_index, row_max=row_max, log_sum=log_sum, **_launch(logits))


def rows_logprob_bwd(logits: Tensor, labels: Tensor, mask: Optional[Tensor], logp: Tensor, lse: Tensor,
                     dlogp: Tensor, grad: Tensor, inv_temperature: float, ignore_index: int = _NO_IGNORE,
                     scale: Optional[Tensor] = None, row_max: Optional[Tensor] = None,
                     log_sum: Optional[Tensor] = None) -> None:
    """logprob_bwd on a (n, V) row slice: grad = scale * dlogp * (onehot - p) / tau (grad may be logits).
    With the forward's (row_max, log_sum) p is formed shift-invariantly (as policy_loss does); from
    lse alone otherwise."""
    with _guard(logits):
        _backend.module_for(logits.device).logprob_bwd(
            _dl(logits), _dl(labels), _dl(mask), _dl(logp), _dl(lse), _dl(dlogp), scale, _dl(grad),
            inv_temperature=inv_temperature, ignore_index=ignore_index, row_max=_dl(row_max),
            log_sum=_dl(log_sum), **_launch(logits))


def rows_seq_reduce(logp, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm, loss_type: int,
                    params: list, agg: int, norm_len: float):
    """seq_reduce over packed per-token tensors: (loss 0-d, dlogp (T,), metrics)."""
    with _guard(logp):
        return _seq_reduce(_backend.module_for(logp.device), _launch(logp), logp, old_logp, advantages, mask,
                           cu_seqlens, rollout_is_weights, norm, loss_type, params, agg, norm_len)


# ---------------------------------------------------------------------------------------------
# vespo::policy_loss_fwd — logprob_fwd + seq_reduce
@torch.library.custom_op("vespo::policy_loss_fwd", mutates_args=())
def _policy_loss_fwd(logits: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor],
                     cu_seqlens: Tensor, rollout_is_weights: Optional[Tensor], norm: Optional[Tensor],
                     inv_temperature: float, loss_type: int, params: list[float], agg: int, norm_len: float,
                     grad_inplace: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    mod = _backend.module_for(logits.device)
    V = logits.shape[1]
    _pending_label_errors()
    logp, lse, row_max, log_sum, _, bad = _logprob_fwd_kernel(logits, labels, mask, inv_temperature, _NO_IGNORE)
    _raise_bad_label(bad, labels, V, "at a counted position (give such positions mask=0)")
    with _guard(logits):
        loss, dlogp, metrics = _seq_reduce(mod, _launch(logits), logp, old_logp, advantages, mask, cu_seqlens,
                                           rollout_is_weights, norm, loss_type, params, agg, norm_len)
    return loss, logp, lse, dlogp, metrics, row_max, log_sum


@_policy_loss_fwd.register_fake
def _(logits, labels, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm, inv_temperature, loss_type,
      params, agg, norm_len, grad_inplace):
    T = logits.shape[0]
    f32 = {"dtype": torch.float32, "device": logits.device}
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty((T,), **f32), logits.new_empty((T,), **f32),
            logits.new_empty((T,), **f32), logits.new_empty((len(METRIC_NAMES),), **f32), logits.new_empty((T,), **f32),
            logits.new_empty((T,), **f32))


# ---------------------------------------------------------------------------------------------
# vespo::logprob_bwd (new gradient) and vespo::logprob_bwd_ (gradient written over the logits)
class _CpuGradCache:
    """Reuses one large CPU gradient buffer across steps.

    CPU torch has no caching allocator: every new (T, V) gradient is fresh memory from the OS, and
    on the machines we measured its first touch (page faults + zeroing) costs as much as the
    backward kernel itself. The cache keeps the last large buffer and hands out a *view* of it
    (a new tensor sharing its storage) only when nothing but the cache still refers to that
    storage, i.e. when every gradient handed out before has been freed. Holds at most one buffer;
    `clear()` releases it.

    "Nothing else refers to it" is read from two counts: the storage's C++ use count (every tensor
    or view on it) and the refcount of its Python storage object (a kept `untyped_storage()` does
    not show in the first). Both are private details of torch, so the probe is calibrated once on
    a scratch tensor; if it cannot tell "free" from "a view is alive" and from "its storage object
    is kept", the cache stays off and every gradient is a fresh `torch.empty`.
    """

    MIN_BYTES = 16 << 20

    def __init__(self):
        self._lock = threading.Lock()
        self._buf: Optional[Tensor] = None
        self._free_probe = self._calibrate()

    @staticmethod
    def _probe(t: Tensor):
        s = t.untyped_storage()
        return torch._C._storage_Use_Count(s._cdata), sys.getrefcount(s)

    def _calibrate(self):
        try:
            t = torch.empty(4)
            free = self._probe(t)
            kept = t.untyped_storage()
            with_storage = self._probe(t)
            del kept
            view = t.view(2, 2)
            with_view = self._probe(t)
            del view
            if free not in (with_storage, with_view) and self._probe(t) == free:
                return free
        except Exception:  # a torch without these internals: no cache
            pass
        return None

    def empty(self, shape, dtype) -> Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._free_probe is None or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            buf = self._buf
            if (buf is None or buf.shape != torch.Size(shape) or buf.dtype != dtype
                    or self._probe(buf) != self._free_probe):
                buf = torch.empty(shape, dtype=dtype)
                self._buf = buf
            return buf.view(shape)

    def clear(self) -> None:
        with self._lock:
            self._buf = None


_cpu_grad_cache = _CpuGradCache()


def clear_cpu_buffer_cache() -> None:
    """Release the cached CPU gradient buffer (see _CpuGradCache)."""
    _cpu_grad_cache.clear()


@torch.library.custom_op("vespo::logprob_bwd", mutates_args=())
def _logprob_bwd(logits: Tensor, labels: Tensor, mask: Optional[Tensor], logp: Tensor, row_max: Tensor,
                 log_sum: Tensor, dlogp: Tensor, grad_loss: Tensor, inv_temperature: float) -> Tensor:
    if logits.device.type == "cpu":
        grad = _cpu_grad_cache.empty(tuple(logits.shape), logits.dtype)
    else:  # CUDA: torch's caching allocator already reuses memory
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _logprob_bwd_kernel(grad, logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss, inv_temperature)
    return grad


@_logprob_bwd.register_fake
def _(logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss, inv_temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("vespo::logprob_bwd_", mutates_args=("logits",))
def _logprob_bwd_inplace(logits: Tensor, labels: Tensor, mask: Optional[Tensor], logp: Tensor, row_max: Tensor,
                         log_sum: Tensor, dlogp: Tensor, grad_loss: Tensor, inv_temperature: float) -> None:
    _logprob_bwd_kernel(logits, logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss, inv_temperature)


@_logprob_bwd_inplace.register_fake
def _(logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss, inv_temperature):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, _, _, mask, _, _, _, inv_temperature, _, _, _, _, grad_inplace = inputs
    _, logp, _, dlogp, _, row_max, log_sum = output
    ctx.save_for_backward(logits, labels, mask, logp, row_max, log_sum, dlogp)
    ctx.inv_temperature = inv_temperature
    ctx.grad_inplace = grad_inplace


def _backward(ctx, grad_loss, _g_logp, _g_lse, _g_dlogp, _g_metrics, _g_row_max, _g_log_sum):
    logits, labels, mask, logp, row_max, log_sum, dlogp = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        if ctx.grad_inplace:
            torch.ops.vespo.logprob_bwd_(logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss,
                                         ctx.inv_temperature)
            grad = logits
        else:
            grad = torch.ops.vespo.logprob_bwd(logits, labels, mask, logp, row_max, log_sum, dlogp, grad_loss,
                                               ctx.inv_temperature)
    return (grad,) + (None,) * 13


_policy_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# vespo::token_logprobs — no-grad log-probs (and entropy) in one read of the logits
@torch.library.custom_op("vespo::token_logprobs", mutates_args=())
def _token_logprobs(logits: Tensor, labels: Tensor, inv_temperature: float, with_entropy: bool,
                    ignore_index: int) -> tuple[Tensor, Tensor]:
    V = logits.shape[1]
    _pending_label_errors()
    logp, _, _, _, entropy, bad = _logprob_fwd_kernel(logits, labels, None, inv_temperature, ignore_index, with_entropy)
    _raise_bad_label(bad, labels, V, f"and is not ignore_index={ignore_index}")
    return logp, entropy if with_entropy else logp.new_empty(0)


@_token_logprobs.register_fake
def _(logits, labels, inv_temperature, with_entropy, ignore_index):
    T = logits.shape[0]
    return (logits.new_empty((T,), dtype=torch.float32),
            logits.new_empty((T if with_entropy else 0,), dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# vespo::seq_loss — the sequence-level part alone, for trainers that already have log-probs
@torch.library.custom_op("vespo::seq_loss", mutates_args=())
def _seq_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor], cu_seqlens: Tensor,
              rollout_is_weights: Optional[Tensor], norm: Optional[Tensor], loss_type: int, params: list[float],
              agg: int, norm_len: float) -> tuple[Tensor, Tensor, Tensor]:
    with _guard(logp):
        return _seq_reduce(_backend.module_for(logp.device), _launch(logp), logp, old_logp, advantages, mask,
                           cu_seqlens, rollout_is_weights, norm, loss_type, params, agg, norm_len)


@_seq_loss.register_fake
def _(logp, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm, loss_type, params, agg, norm_len):
    T = logp.shape[0]
    return (logp.new_empty((), dtype=torch.float32), logp.new_empty((T,), dtype=torch.float32),
            logp.new_empty((len(METRIC_NAMES),), dtype=torch.float32))


def _seq_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _seq_loss_backward(ctx, grad_loss, _g_dlogp, _g_metrics):
    (dlogp,) = ctx.saved_tensors
    return (dlogp * grad_loss if ctx.needs_input_grad[0] else None,) + (None,) * 10


_seq_loss.register_autograd(_seq_loss_backward, setup_context=_seq_loss_setup)


# ---------------------------------------------------------------------------------------------
# Public API
_warned_fallback: set = set()
# Looked up once at import: torch.compile traces _use_reference, and cannot trace imports.
_HAS_KERNELS = {"cpu": _backend.core() is not None, "cuda": _backend.cuda() is not None}


def _use_reference(logits: Tensor) -> bool:
    if logits.dtype == torch.float64:
        return True  # the kernels compute in fp32; float64 inputs get the exact reference
    if _HAS_KERNELS.get(logits.device.type, False):
        return False
    key = logits.device.type
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        warnings.warn(f"vespo_ext: no compiled kernels for device {key!r}; using the pure-torch reference "
                      "(correct but slower, with T x V temporaries)", RuntimeWarning, stacklevel=3)
    return True


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(torch.float32).contiguous()


def policy_loss(logits, labels, old_logp, advantages, mask=None, *, loss="vespo", cu_seqlens=None,
                rollout_is_weights=None, temperature=1.0, agg=None, norm=None, return_metrics=False,
                grad_inplace=False, advantages_per=None, **params):
    """Any of the policy losses (vespo, grpo, ...) fused from logits to scalar loss.

    Layouts: padded logits (B, L, V) with (B, L) per-token tensors and advantages (B,) or (B, L);
    packed logits (T, V) with (T,) per-token tensors, cu_seqlens (S+1,) and advantages (S,) or (T,).
    Returns the 0-d loss, or (loss, metrics) with return_metrics=True (0-d tensors, no host sync).
    grad_inplace=True writes the gradient over the logits' own storage in backward (saves a T x V
    buffer; the logits' values are destroyed, so nothing else may need them after backward).
    advantages_per="sequence"|"token" says how to read packed (T,) advantages when there are as many
    sequences as tokens (required then, unless every sequence has exactly one token).
    """
    agg, values = resolve_loss(loss, agg, params)
    if not isinstance(grad_inplace, bool):
        raise TypeError(f"grad_inplace must be a bool, got {type(grad_inplace).__name__}")
    if isinstance(logits, torch.Tensor) and _use_reference(logits):
        return reference.policy_loss(logits, labels, old_logp, advantages, mask, loss=loss, cu_seqlens=cu_seqlens,
                                     rollout_is_weights=rollout_is_weights, temperature=temperature, agg=agg,
                                     norm=norm, return_metrics=return_metrics, advantages_per=advantages_per,
                                     **params)
    pk = pack_inputs(logits, labels, old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                     rollout_is_weights=rollout_is_weights, temperature=temperature, norm=norm,
                     advantages_per=advantages_per)
    out, _, _, _, metrics, _, _ = torch.ops.vespo.policy_loss_fwd(
        pk.logits, pk.labels.contiguous(), _f32(pk.old_logp), _f32(pk.advantages),
        None if pk.mask is None else pk.mask.contiguous(), pk.cu_seqlens, _f32(pk.rollout_is_weights), pk.norm,
        1.0 / pk.temperature, LOSS_IDS[loss], values, AGG_IDS[agg], pk.norm_len, grad_inplace)
    if not return_metrics:
        return out
    return out, dict(zip(METRIC_NAMES, metrics.detach().unbind(0)))


def vespo_loss(logits, labels, old_logp, advantages, mask=None, *, cu_seqlens=None, rollout_is_weights=None,
               temperature=1.0, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, agg="token-mean", norm=None,
               return_metrics=False, grad_inplace=False, advantages_per=None):
    """Fused VESPO loss: -phi(W_i) * A * log pi(y_t), phi(W) = W^k e^{lambda (1 - W)}, aggregated by `agg`."""
    return policy_loss(logits, labels, old_logp, advantages, mask, loss="vespo", cu_seqlens=cu_seqlens,
                       rollout_is_weights=rollout_is_weights, temperature=temperature, agg=agg, norm=norm,
                       return_metrics=return_metrics, grad_inplace=grad_inplace, advantages_per=advantages_per,
                       k_pos=k_pos,
                       lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg)


def token_logprobs(logits, labels, *, cu_seqlens=None, temperature=1.0, return_entropy=False, ignore_index=-100):
    """log softmax(logits / temperature)[label] per token (float32, no grad), optionally the entropy.

    One read of the logits. Labels equal to ignore_index give 0; any other label outside [0, V)
    raises IndexError. cu_seqlens is accepted (and validated) for symmetry with the loss ops.
    """
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    ignore_index = check_ignore_index(ignore_index)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, labels.numel(), logits.device)
    if _use_reference(logits):
        with torch.no_grad():
            return reference.token_logprobs(logits, labels, temperature=temperature, return_entropy=return_entropy,
                                            ignore_index=ignore_index)
    shape = logits.shape[:-1]
    flat = contiguous_rows(logits.detach())
    logp, entropy = torch.ops.vespo.token_logprobs(flat, labels.reshape(-1).to(torch.int64).contiguous(),
                                                   1.0 / temperature, bool(return_entropy), int(ignore_index))
    if return_entropy:
        return logp.reshape(shape), entropy.reshape(shape)
    return logp.reshape(shape)


def policy_loss_from_logp(logp, old_logp, advantages, mask=None, *, loss="vespo", cu_seqlens=None,
                          rollout_is_weights=None, agg=None, norm=None, return_metrics=False, advantages_per=None,
                          **params):
    """Any policy loss from per-token log-probs (B, L) or packed (T,) with cu_seqlens; differentiable in logp.

    For trainers that already compute log pi (veRL, TRL): the sequence reduction, the weights and the
    aggregation run fused (CPU or CUDA); the gradient w.r.t. logp is exact.
    """
    agg, values = resolve_loss(loss, agg, params)
    lp, old, adv, m, isw, cu, nrm, norm_len = pack_logp_inputs(logp, old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                                               rollout_is_weights=rollout_is_weights, norm=norm,
                                                               advantages_per=advantages_per)
    if logp.dtype == torch.float64 or _use_reference(logp):
        out = reference.policy_loss_from_logp(lp, old, adv, m, loss=loss, cu_seqlens=cu, rollout_is_weights=isw, agg=agg,
                                              norm=nrm, norm_len=norm_len, return_metrics=return_metrics, **params)
        return out
    out, _, metrics = torch.ops.vespo.seq_loss(
        lp.to(torch.float32).contiguous(), _f32(old), _f32(adv), None if m is None else m.contiguous(), cu, _f32(isw),
        nrm, LOSS_IDS[loss], values, AGG_IDS[agg], norm_len)
    if not return_metrics:
        return out
    return out, dict(zip(METRIC_NAMES, metrics.detach().unbind(0)))
