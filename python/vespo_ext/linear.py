"""Fused linear head + policy loss: the loss straight from hidden states, never a T x V logits tensor.

The logits are produced chunk by chunk (`torch.addmm`/`torch.mm` into one reused (chunk, V) buffer:
cuBLAS on GPU, the CPU BLAS on CPU) and each chunk is handed to the compiled kernels of ops.py
(logprob_fwd, seq_reduce, logprob_bwd written in place over the chunk). The gradients w.r.t. hidden,
weight and bias are finished inside the forward (backward only scales them by the upstream gradient).

Paths (the plan is made from cu_seqlens on the host; chunk = chunk_tokens):
  * whole-sequence groups -- consecutive sequences that fit together in one chunk are processed in one
    go: logits (1 GEMM), logprob_fwd, seq_reduce of the group with the batch-wide aggregation
    denominator, logprob_bwd in place, grad_hidden = g @ W and grad_W += g^T h (2 GEMMs): 3 GEMMs.
  * long sequences (longer than a chunk) -- two passes: log-probs of all pieces (1 GEMM each), the
    sequence's seq_reduce, then per piece in reverse order a recompute (1 GEMM; skipped for the last
    piece, whose logits are still in the buffer) and the 2 gradient GEMMs: 3 GEMMs per piece + 1 per
    piece but the last, i.e. 4p - 1 for a p-piece sequence.
  * no gradient needed (no_grad / inputs not requiring grad): 1 GEMM per chunk, any chunking.
A final seq_reduce over all T tokens gives the loss and the metrics exactly as `policy_loss` does.

chunk_tokens=None: a chunk's logits take up to 16 MiB on CPU and 1 GiB on CUDA, and a chunk holds at
least 256 tokens: chunk_tokens = max(256, budget // (V * itemsize)) (V=32768 fp32 on CPU: 256 tokens,
32 MiB; V=151936 bf16 on CUDA: 3533 tokens). The floor is for time: the weight-gradient GEMM reads and
writes the whole (V, H) gradient once per chunk, and at 128 tokens per chunk (issue 13's CPU config) that
made the fused path 1.15-1.19x slower than matmul + op, at 256 tokens 0.87-1.04x (quiet 2-vCPU Xeon,
benchmarks/results/README.md). Larger chunks cost only memory.
Peak extra memory of linear_policy_loss: one (chunk, V) buffer in the compute dtype (the gradient of a
chunk's logits is written over it), the hidden and weight gradients, O(T) vectors. With a bf16/fp16
weight the weight gradient is accumulated in fp32 ((V, H) fp32, converted at the end once the buffer is
released): in the GEMM itself on CUDA (addmm/baddbmm with an fp32 out, _fp32_out_gemm); on CPU, where torch
has no mixed-dtype GEMM, slice by slice over V through reused temporaries of about 16 MiB in all
(_Head._gw_lowp: the low-precision product of a slice where the CPU has AMX tiles for the dtype, else
the chunk's gradient slice and hidden upcast to fp32), so no (V, H) temporary besides the accumulator.
At V=151936, H=4096 bf16 on CUDA the accumulator alone is 2.49 GB and the default buffer 1.07 GB.
Measured (benchmarks/bench_linear_loss.py, issue 13's CPU config T=2048, H=512, V=32768, chunk 256):
fp32 104.7 MB in all = 33.6 MB (the buffer and the O(T) vectors) + 71.3 MB of returned gradients;
bf16 106.4 MB = the 16.8 MB buffer + the 67.1 MB fp32 accumulator + 16.8 MB of slice temporaries + the
returned hidden gradient and O(T) vectors (it was 190.3 MB with a whole (V, H) bf16 product and its fp32
copy per chunk; benchmarks/results/linear_cpu_lowp_dw.md).
linear_token_logprobs' backward: the same, plus two (chunk, V) fp32 buffers when the entropy has a gradient.

Deterministic: fixed chunk order, fixed GEMM shapes, no atomics (bitwise for a given thread count).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import ops, reference
from ._inputs import _companions, check_cu_seqlens, check_norm, check_temperature
from ._spec import AGG_IDS, LOSS_IDS, METRIC_NAMES, resolve_loss

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}
_MIN_CHUNK_TOKENS = 256  # see the module docstring: fewer tokens per chunk and the dW GEMM dominates
_DW_SLICE_BYTES = 16 << 20  # CPU, low-precision weight: the weight-gradient temporaries per V slice (_Head._gw_lowp)
_DW_SLICE_BYTES_GPU = 64 << 20  # the same on a GPU whose torch can add into fp32 only via mm's fp32 out ("mm")
_MIN_DW_SLICE = 64
_FP32_OUT_GEMM: dict = {}  # (device type, dtype) -> "addmm" | "baddbmm" | "mm" | None (_fp32_out_gemm)
_CPU_DW_MODE: dict = {}
_AGG_TOKEN_MEAN, _AGG_SEQ_SUM, _AGG_SEQ_MEAN, _AGG_SUM_NORM = (AGG_IDS[a] for a in (
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"))


def _cpu_dw_mode(dtype: torch.dtype) -> str:
    """"product" where the CPU multiplies this dtype in AMX tiles (bf16: AMX-BF16, fp16: AMX-FP16), else "upcast"
    (see _Head._gw_lowp): with AMX tiles the low-precision product is the faster one, without them the fp32
    GEMM (benchmarks/results/linear_cpu_lowp_dw.md)."""
    mode = _CPU_DW_MODE.get(dtype)
    if mode is None:
        try:
            caps = torch._C._cpu._get_cpu_capability()  # private: absent or renamed -> the portable "upcast"
        except (AttributeError, RuntimeError):
            caps = {}
        flag = {torch.bfloat16: "amx_bf16", torch.float16: "amx_fp16"}.get(dtype)
        mode = _CPU_DW_MODE[dtype] = "product" if flag and caps.get(flag, False) else "upcast"
    return mode


def _fp32_out_gemm(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Which of torch's GEMMs with bf16/fp16 inputs and an fp32 output this device runs, found once per (device
    type, dtype) by a tiny self-check against the fp32 product (an exception or a wrong result rules one out):
      * "addmm": aten::addmm.dtype_out with self = out = the fp32 accumulator: the GEMM accumulates into it
        (beta = 1), no temporary. torch 2.11 allows an fp32 `self` ("self dtype must match either out_dtype
        or mat1 dtype"); other releases with the overload want `self` in the inputs' dtype and refuse it.
      * "baddbmm": aten::baddbmm.dtype_out on the (1, V, H) view of the accumulator: the same GEMM, and those
        releases do not check its `self` dtype.
      * "mm": aten::mm.dtype_out into an fp32 slice of at most _DW_SLICE_BYTES_GPU, then added.
      * None: neither (torch's CPU backend has no mixed-dtype GEMM): _Head._gw_lowp's CPU modes."""
    key = (device.type, dtype)
    if key in _FP32_OUT_GEMM:
        return _FP32_OUT_GEMM[key]
    found = None
    if device.type != "cpu":
        gen = torch.Generator().manual_seed(0)
        a, b, c = (torch.randn(shape, generator=gen) for shape in ((5, 3), (5, 4), (3, 4)))
        want = c + a.to(dtype).float().t() @ b.to(dtype).float()  # the fp32 product of the same rounded inputs
        a, b, c = a.to(device, dtype), b.to(device, dtype), c.to(device)
        for name in ("addmm", "baddbmm", "mm"):
            try:
                acc = c.clone()
                if name == "addmm":
                    torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
                elif name == "baddbmm":
                    torch.baddbmm(acc[None], a.t()[None], b[None], out_dtype=torch.float32, out=acc[None])
                else:
                    tmp = torch.empty_like(acc)
                    torch.mm(a.t(), b, out_dtype=torch.float32, out=tmp)
                    acc.add_(tmp)
                if torch.allclose(acc.cpu(), want, rtol=1e-5, atol=1e-5):
                    found = name
                    break
            except (TypeError, RuntimeError, NotImplementedError):
                continue
    _FP32_OUT_GEMM[key] = found
    return found


def default_chunk_tokens(V: int, dtype: torch.dtype, device) -> int:
    """Tokens per chunk when chunk_tokens=None: max(256, budget // (V * itemsize)), budget 16 MiB on
    CPU and 1 GiB on CUDA for the (chunk, V) logits buffer. See the module docstring for why."""
    kind = device.type if hasattr(device, "type") else str(device)
    return max(_MIN_CHUNK_TOKENS, _CHUNK_BYTES.get(kind, _CHUNK_BYTES["cpu"]) // (max(V, 1) * dtype.itemsize))


# ---------------------------------------------------------------------------------------------
# Validation
def _check_linear(hidden, weight, labels, bias, chunk_tokens) -> int:
    for x, name in ((hidden, "hidden"), (weight, "weight"), (labels, "labels")):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (T, H) packed or (B, L, H) padded, got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) as nn.Linear stores it, got shape {tuple(weight.shape)}")
    if weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, H={H}) to match hidden's last dim H={H}, "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have a non-empty vocabulary (V >= 1), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    V = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias must have shape (V,) = ({V},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias must be on hidden's device {hidden.device}, got {bias.device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's without H), "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on hidden's device {hidden.device}, got {labels.device}")
    if chunk_tokens is None:
        return default_chunk_tokens(V, hidden.dtype, hidden.device)
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int):
        raise TypeError(f"chunk_tokens must be an int or None, got {type(chunk_tokens).__name__}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return chunk_tokens


# ---------------------------------------------------------------------------------------------
# Chunk machinery shared by both ops
class _Head:
    """hidden (T, H), weight (V, H), bias: one reused (chunk, V) logits buffer and the gradient sinks."""

    def __init__(self, hidden, weight, bias, chunk, need_gh, need_gw, need_gb):
        self.h, self.w, self.b = hidden, weight, bias
        T, H = hidden.shape
        V = weight.shape[0]
        dev, dt = hidden.device, hidden.dtype
        self.buf = torch.empty((min(chunk, max(T, 1)), V), dtype=dt, device=dev)
        self.gh = torch.empty((T, H) if need_gh else (0,), dtype=dt, device=dev)
        if need_gh and T == 0:
            self.gh.zero_()
        acc = torch.float32 if dt != torch.float32 else dt
        self.gw = torch.zeros((V, H) if need_gw else (0,), dtype=acc, device=dev)
        self.gb = torch.zeros((V,) if need_gb else (0,), dtype=torch.float32, device=dev)
        self.need_gh, self.need_gw, self.need_gb = need_gh, need_gw, need_gb
        self.scratch = {}  # reused temporaries (entropy backward)

    def logits(self, s: int, e: int) -> Tensor:
        z = self.buf[: e - s]
        if self.b is None:
            torch.mm(self.h[s:e], self.w.t(), out=z)
        else:
            torch.addmm(self.b, self.h[s:e], self.w.t(), out=z)
        return z

    def accumulate(self, g: Tensor, s: int, e: int) -> None:
        """g (n, V) = dloss/dlogits of rows [s, e): the two gradient GEMMs and the bias sum."""
        if self.need_gh:
            torch.mm(g, self.w, out=self.gh[s:e])
        if self.need_gw:
            if self.gw.dtype == g.dtype:
                self.gw.addmm_(g.t(), self.h[s:e])
            else:
                self._gw_lowp(g, self.h[s:e])
        if self.need_gb:
            self.gb.add_(torch.sum(g, 0, dtype=torch.float32))

    def _gw_lowp(self, g: Tensor, h: Tensor) -> None:
        """gw (fp32, (V, H)) += g^T h for a low-precision chunk g (n, V), h (n, H): on a GPU one GEMM accumulating
        in fp32 (addmm or baddbmm with an fp32 out; or mm with an fp32 out slice by slice: _fp32_out_gemm); on
        CPU, where torch has no mixed-dtype GEMM, slice by slice over V's rows through reused temporaries of at
        most _DW_SLICE_BYTES (no (V, H) temporary):
          * "product" (bf16 where the CPU has AMX-BF16, fp16 with AMX-FP16): the slice's product in the low
            precision (oneDNN's AMX GEMM accumulates in fp32 and rounds the (rows, H) result once), copied to
            fp32 and added: one rounding of each chunk's partial product, about one ulp of the result;
          * "upcast" (otherwise): the chunk's gradient slice (n, rows) and hidden (n, H) upcast to fp32 and one
            fp32 addmm_ into gw: exact products, fp32 accumulation (as on CUDA).
        See benchmarks/results/ for the measured times of each against the former whole-(V, H) product."""
        gw = self.gw
        V, H = gw.shape
        n = g.shape[0]
        gpu = _fp32_out_gemm(g.device, g.dtype)
        if gpu == "addmm":
            torch.addmm(gw, g.t(), h, out_dtype=torch.float32, out=gw)
            return
        if gpu == "baddbmm":
            torch.baddbmm(gw[None], g.t()[None], h[None], out_dtype=torch.float32, out=gw[None])
            return
        if gpu == "mm":
            rows = max(_MIN_DW_SLICE, min(V, _DW_SLICE_BYTES_GPU // (H * 4)))
            hi_buf = self.empty("gw_hi", (rows, H), torch.float32)
            for a in range(0, V, rows):
                b = min(a + rows, V)
                hi = hi_buf[: b - a]
                torch.mm(g[:, a:b].t(), h, out_dtype=torch.float32, out=hi)
                gw[a:b].add_(hi)
            return
        if _cpu_dw_mode(g.dtype) == "product":
            rows = max(_MIN_DW_SLICE, min(V, _DW_SLICE_BYTES // (H * (g.element_size() + 4))))
            lo_buf = self.empty("gw_lo", (rows, H), g.dtype)
            hi_buf = self.empty("gw_hi", (rows, H), torch.float32)
            for a in range(0, V, rows):
                b = min(a + rows, V)
                lo, hi = lo_buf[: b - a], hi_buf[: b - a]
                torch.mm(g[:, a:b].t(), h, out=lo)
                hi.copy_(lo)  # a mixed-dtype add_ would allocate this fp32 copy itself, once per slice
                gw[a:b].add_(hi)
        else:
            rows = max(_MIN_DW_SLICE, min(V, _DW_SLICE_BYTES // (max(n, 1) * 4)))
            h32 = self.empty("gw_h32", (n, H), torch.float32)
            h32.copy_(h)
            g_buf = self.empty("gw_g32", (n, rows), torch.float32)
            for a in range(0, V, rows):
                b = min(a + rows, V)
                g32 = g_buf[:, : b - a]
                g32.copy_(g[:, a:b])
                gw[a:b].addmm_(g32.t(), h32)

    def empty(self, key: str, shape, dtype) -> Tensor:
        """A temporary of `shape` reused across chunks (allocated once, at its largest: the first chunk's)."""
        t = self.scratch.get(key)
        if t is None or t.numel() < math.prod(shape) or t.dtype != dtype:
            t = self.scratch[key] = torch.empty(math.prod(shape), dtype=dtype, device=self.h.device)
        return t[: math.prod(shape)].view(shape)

    def grads(self):
        """The finished gradients; the logits buffer and the temporaries are released first (the low-precision
        weight gradient's fp32 -> dtype conversion then does not coexist with them)."""
        self.buf, self.scratch = None, {}
        gw = self.gw.to(self.w.dtype) if self.need_gw else self.gw
        gb = self.gb.to(self.b.dtype) if self.need_gb else self.gb
        return self.gh, gw, gb


def _plan(cu: list, chunk: int):
    """[('group', s, e, i0, i1) | ('long', s, e, i, i + 1)]: sequence ranges [i0, i1) covering tokens [s, e)."""
    out, S = [], len(cu) - 1
    i = 0
    while i < S:
        s = cu[i]
        if cu[i + 1] - s > chunk:
            out.append(("long", s, cu[i + 1], i, i + 1))
            i += 1
            continue
        j = i + 1
        while j < S and cu[j + 1] - s <= chunk:
            j += 1
        if cu[j] > s:  # groups of empty sequences have no tokens to process
            out.append(("group", s, cu[j], i, j))
        i = j
    return out


def _first_bad_row(bad: Tensor, step: int) -> Tensor:
    """(1,) int64 on bad's device: 1 + the token of the first piece's flagged row (bad[k]: 1 + the row within
    the piece that starts at k * step, 0 = none), 0 when none is flagged; no host sync."""
    none = torch.iinfo(torch.int64).max
    at = torch.arange(0, bad.numel() * step, step, dtype=torch.int64, device=bad.device)
    first = torch.where(bad > 0, bad + at, none).amin().reshape(1)
    return torch.where(first == none, 0, first)


def _raise_bad(bad: Tensor, step: int, labels: Tensor, V: int, why: str) -> None:
    """Raise IndexError if a piece's forward flagged a bad label (bad[k] = 1 + the row within the piece that
    starts at k * step, 0 = none), through ops._raise_bad_label as the unfused ops do: read at once on CPU (or
    VESPO_SYNC_CHECKS=1), deferred on CUDA (reading here would stall the host until every chunk's GEMM has run)."""
    if bad.numel():
        ops._raise_bad_label(_first_bad_row(bad, step), labels, V, why)


# ---------------------------------------------------------------------------------------------
# vespo::linear_policy_loss — loss, metrics and the finished gradients in one forward
@torch.library.custom_op("vespo::linear_policy_loss", mutates_args=())
def _linear_policy_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, old_logp: Tensor,
                        advantages: Tensor, mask: Optional[Tensor], cu_seqlens: Tensor,
                        rollout_is_weights: Optional[Tensor], norm: Optional[Tensor], inv_temperature: float,
                        loss_type: int, params: list[float], agg: int, norm_len: float, chunk_tokens: int,
                        need_gh: bool, need_gw: bool, need_gb: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = {"dtype": torch.float32, "device": dev}
    need_grad = need_gh or need_gw or need_gb
    ops._pending_label_errors()
    logp, lse, dlogp = torch.empty(T, **f32), torch.empty(T, **f32), torch.zeros(T, **f32)
    # the backward forms p from (row max, log-sum), shift-invariantly, as policy_loss does
    row_max, log_sum = (torch.empty(T, **f32), torch.empty(T, **f32)) if need_grad else (None, None)
    cu_host = cu_seqlens.cpu().tolist()
    if need_grad:
        plan = _plan(cu_host, chunk_tokens)
        pieces = [(s0, min(s0 + chunk_tokens, e)) for _, s, e, _, _ in plan for s0 in range(s, e, chunk_tokens)]
    else:
        plan, pieces = [], [(s, min(s + chunk_tokens, T)) for s in range(0, T, chunk_tokens)]
    rows = max((e - s for s, e in pieces), default=1)  # the buffer holds the largest piece, not a whole chunk
    head = _Head(hidden, weight, bias, rows, need_gh, need_gw, need_gb and bias is not None)
    bad = torch.zeros(len(pieces), dtype=torch.int64, device=dev)
    k_piece = 0

    def fwd(s, e):
        nonlocal k_piece
        z = head.logits(s, e)
        ops.rows_logprob_fwd(z, labels[s:e], None if mask is None else mask[s:e], logp[s:e], lse[s:e], None,
                             bad[k_piece:k_piece + 1], inv_temperature,
                             row_max=None if row_max is None else row_max[s:e],
                             log_sum=None if log_sum is None else log_sum[s:e])
        k_piece += 1
        return z

    if need_grad:
        # logprob_bwd must never see an out-of-range counted label: check all of them up front (one sync).
        bad_all = (labels < 0) | (labels >= V)
        if mask is not None:
            bad_all &= mask
        if T and bool(bad_all.any()):
            t = int(torch.nonzero(bad_all)[0])
            raise IndexError(f"labels[{t}] = {int(labels[t])} is outside [0, {V}) at a counted position "
                             "(give such positions mask=0)")
        # The batch-wide aggregation denominator, so that each group's seq_reduce yields the final dlogp.
        if norm is not None:
            denom = norm
        elif agg == _AGG_SUM_NORM:
            lens = [b - a for a, b in zip(cu_host[:-1], cu_host[1:])]
            denom = torch.full((1,), norm_len if norm_len > 0 else float(max(max(lens, default=1), 1)), **f32)
        else:
            m = torch.ones(T, dtype=torch.int64, device=dev) if mask is None else mask.to(torch.int64)
            cm = torch.zeros(T + 1, dtype=torch.int64, device=dev)
            torch.cumsum(m, 0, out=cm[1:])
            if agg == _AGG_TOKEN_MEAN:
                denom = cm[-1:].to(torch.float32)
            else:
                denom = ((cm[cu_seqlens[1:]] - cm[cu_seqlens[:-1]]) > 0).sum().reshape(1).to(torch.float32)
            denom = denom.clamp_(min=1.0)
        S = len(cu_host) - 1
        per_token_adv = advantages.numel() != S

        def reduce(s, e, i0, i1):
            # on the device: torch.tensor(list, device="cuda") is a pageable copy and syncs the stream per group
            cu = cu_seqlens[i0:i1 + 1] - s
            adv = advantages[s:e] if per_token_adv else advantages[i0:i1]
            _, d, _ = ops.rows_seq_reduce(logp[s:e], old_logp[s:e], adv, None if mask is None else mask[s:e], cu,
                                          None if rollout_is_weights is None else rollout_is_weights[s:e], denom,
                                          loss_type, params, agg, norm_len)
            dlogp[s:e] = d

        def bwd(z, s, e):
            ops.rows_logprob_bwd(z, labels[s:e], None if mask is None else mask[s:e], logp[s:e], lse[s:e],
                                 dlogp[s:e], z, inv_temperature, row_max=row_max[s:e], log_sum=log_sum[s:e])
            head.accumulate(z, s, e)

        for kind, s, e, i0, i1 in plan:
            if kind == "group":
                z = fwd(s, e)
                reduce(s, e, i0, i1)
                bwd(z, s, e)
                continue
            cuts = [(a, min(a + chunk_tokens, e)) for a in range(s, e, chunk_tokens)]
            for a, b in cuts:
                z = fwd(a, b)
            reduce(s, e, i0, i1)
            for n, (a, b) in enumerate(reversed(cuts)):
                bwd(z if n == 0 else head.logits(a, b), a, b)
        z = None  # no view of the logits buffer left: grads() releases it
    else:
        for s, e in pieces:
            fwd(s, e)
        # (with gradients every counted label was checked up front: the flags cannot be set, no sync to read them)
        _raise_bad(bad, chunk_tokens, labels, V, "at a counted position (give such positions mask=0)")
    loss, _, metrics = ops.rows_seq_reduce(logp, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm,
                                           loss_type, params, agg, norm_len)
    return (loss, metrics) + head.grads()


@_linear_policy_loss.register_fake
def _(hidden, weight, bias, labels, old_logp, advantages, mask, cu_seqlens, rollout_is_weights, norm,
      inv_temperature, loss_type, params, agg, norm_len, chunk_tokens, need_gh, need_gw, need_gb):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((len(METRIC_NAMES),), dtype=torch.float32),
            hidden.new_empty(tuple(hidden.shape) if need_gh else (0,)),
            weight.new_empty(tuple(weight.shape) if need_gw else (0,)),
            hidden.new_empty((weight.shape[0],) if (need_gb and bias is not None) else (0,)))


def _lpl_setup(ctx, inputs, output):
    # The finished gradients ride on ctx (not save_for_backward) so that backward can hand them over
    # without a copy: scaled in place, then stolen by AccumulateGrad (saved tensors would stay referenced
    # by the graph, and autograd would clone each of them, weight-sized for the weight).
    # Detached aliases: no ctx -> output -> grad_fn -> ctx cycle, and a fresh TensorImpl to hand over.
    ctx.grads = [g.detach() for g in output[2:]]
    ctx.visible = [weakref.ref(g) for g in output[2:]]  # the op's own outputs: dead once the caller drops them
    ctx.flags = inputs[16:19]
    ctx.set_materialize_grads(False)  # else autograd allocates zeros for the unused outputs, weight-sized


def _lpl_backward(ctx, grad_loss, _g_metrics, _g_gh, _g_gw, _g_gb):
    if ctx.grads is None:
        raise RuntimeError("linear_policy_loss: backward through the same graph twice is not supported (its "
                           "gradients are computed in the forward and handed over once); call it again instead")
    grads, ctx.grads = ctx.grads, None
    if grad_loss is None:
        return (None,) * 19
    need = ctx.needs_input_grad
    out = []
    # In place (no gradient-sized copy) in eager mode once nobody holds the op's gradient outputs (the public
    # functions drop them); out of place under tracing (compile, AOT: the graph stays functional) or when a
    # direct caller of the op still holds them.
    eager = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and \
        all(r() is None for r in ctx.visible)
    for g, want in zip(grads, (need[i] and ctx.flags[i] for i in range(3))):
        out.append(None if not want else g.mul_(grad_loss.to(g.dtype)) if eager else g * grad_loss.to(g.dtype))
    del grads
    return tuple(out) + (None,) * 16


_linear_policy_loss.register_autograd(_lpl_backward, setup_context=_lpl_setup)


# ---------------------------------------------------------------------------------------------
# vespo::linear_token_logprobs — per-token log-probs (and entropy); backward recomputes the chunks
# The forward keeps each row's (row_max, log_sum) (lse = row_max / tau + log_sum): the backward forms
# p = exp((z - row_max) / tau - log_sum) from them, shift-invariantly as the rest of the core does (z / tau - lse
# would lose ulp(|z| / tau) of every logit: 4e-3 at |z| = 3e4 in fp32).
@torch.library.custom_op("vespo::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                           inv_temperature: float, with_entropy: bool, ignore_index: int,
                           chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    T, V = hidden.shape[0], weight.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    ops._pending_label_errors()
    head = _Head(hidden, weight, bias, chunk_tokens, False, False, False)
    logp, lse, ent = torch.empty(T, **f32), torch.empty(T, **f32), torch.empty(T if with_entropy else 0, **f32)
    row_max, log_sum = torch.empty(T, **f32), torch.empty(T, **f32)
    starts = list(range(0, T, chunk_tokens))
    bad = torch.zeros(len(starts), dtype=torch.int64, device=hidden.device)
    for k, s in enumerate(starts):
        e = min(s + chunk_tokens, T)
        ops.rows_logprob_fwd(head.logits(s, e), labels[s:e], None, logp[s:e], lse[s:e],
                             ent[s:e] if with_entropy else None, bad[k:k + 1], inv_temperature, ignore_index,
                             row_max=row_max[s:e], log_sum=log_sum[s:e])
    _raise_bad(bad, chunk_tokens, labels, V, f"and is not ignore_index={ignore_index}")
    return logp, row_max, log_sum, ent


@_linear_token_logprobs.register_fake
def _(hidden, weight, bias, labels, inv_temperature, with_entropy, ignore_index, chunk_tokens):
    T = hidden.shape[0]
    return (hidden.new_empty((T,), dtype=torch.float32), hidden.new_empty((T,), dtype=torch.float32),
            hidden.new_empty((T,), dtype=torch.float32),
            hidden.new_empty((T if with_entropy else 0,), dtype=torch.float32))


@torch.library.custom_op("vespo::linear_token_logprobs_bwd", mutates_args=())
def _linear_token_logprobs_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, logp: Tensor,
                               row_max: Tensor, log_sum: Tensor, entropy: Tensor, grad_logp: Tensor,
                               grad_entropy: Optional[Tensor], inv_temperature: float, ignore_index: int,
                               chunk_tokens: int, need_gh: bool, need_gw: bool,
                               need_gb: bool) -> tuple[Tensor, Tensor, Tensor]:
    T, V = hidden.shape[0], weight.shape[0]
    head = _Head(hidden, weight, bias, chunk_tokens, need_gh, need_gw, need_gb and bias is not None)
    valid = labels != ignore_index
    z = None
    dlogp = grad_logp.to(torch.float32).contiguous()
    for s in range(0, T, chunk_tokens):
        e = min(s + chunk_tokens, T)
        z = head.logits(s, e)
        extra = None
        if grad_entropy is not None:
            # dH/dz_v = -(1/tau) p_v (log p_v + H) (torch on the chunk: the kernel has no entropy backward), with
            # log p_v = (z_v - row_max) / tau - log_sum, shift-invariant like the kernel's p. In place in two
            # reused fp32 (chunk, V) buffers. Where p_v = 0 the term is 0: log p_v is clamped (after p is formed)
            # so that a -inf logit gives 0 * finite, not NaN.
            n = e - s
            extra, p = head.empty("ent_lp", (n, V), torch.float32), head.empty("ent_p", (n, V), torch.float32)
            torch.sub(z, row_max[s:e, None], out=extra)
            extra.mul_(inv_temperature).sub_(log_sum[s:e, None])
            torch.exp(extra, out=p)
            extra.clamp_(min=-1e30).add_(entropy[s:e, None]).mul_(p)
            extra.mul_((grad_entropy[s:e].to(torch.float32) * -inv_temperature)[:, None])
        # lse is not read when (row_max, log_sum) are given (log_sum stands in for the argument)
        ops.rows_logprob_bwd(z, labels[s:e], valid[s:e], logp[s:e], log_sum[s:e], dlogp[s:e], z, inv_temperature,
                             ignore_index, row_max=row_max[s:e], log_sum=log_sum[s:e])
        if extra is not None:
            if z.dtype == torch.float32:
                z.add_(extra)
            else:  # through the fp32 buffer p: a mixed-dtype add_ would copy z to fp32 first
                p.copy_(z)
                z.copy_(extra.add_(p))
            del extra, p
        head.accumulate(z, s, e)
    z = None  # no view of the logits buffer left: grads() releases it
    return head.grads()


@_linear_token_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, logp, row_max, log_sum, entropy, grad_logp, grad_entropy, inv_temperature,
      ignore_index, chunk_tokens, need_gh, need_gw, need_gb):
    return (hidden.new_empty(tuple(hidden.shape) if need_gh else (0,)),
            weight.new_empty(tuple(weight.shape) if need_gw else (0,)),
            hidden.new_empty((weight.shape[0],) if (need_gb and bias is not None) else (0,)))


def _ltl_setup(ctx, inputs, output):
    hidden, weight, bias, labels, inv_t, with_entropy, ignore_index, chunk = inputs
    logp, row_max, log_sum, ent = output
    ctx.save_for_backward(hidden, weight, bias, labels, logp, row_max, log_sum, ent)
    ctx.args = (inv_t, with_entropy, ignore_index, chunk)
    ctx.set_materialize_grads(False)  # an unused entropy gets None: its backward term is skipped


def _ltl_backward(ctx, g_logp, _g_row_max, _g_log_sum, g_ent):
    hidden, weight, bias, labels, logp, row_max, log_sum, ent = ctx.saved_tensors
    inv_t, with_entropy, ignore_index, chunk = ctx.args
    need = ctx.needs_input_grad
    if not (need[0] or need[1] or need[2]) or (g_logp is None and g_ent is None):
        return (None,) * 8
    if g_logp is None:
        g_logp = torch.zeros_like(logp)
    gh, gw, gb = torch.ops.vespo.linear_token_logprobs_bwd(
        hidden, weight, bias, labels, logp, row_max, log_sum, ent, g_logp, g_ent if with_entropy else None, inv_t,
        ignore_index, chunk, need[0], need[1], need[2] and bias is not None)
    return (gh if need[0] else None, gw if need[1] else None, gb if (need[2] and bias is not None) else None) + (None,) * 5


_linear_token_logprobs.register_autograd(_ltl_backward, setup_context=_ltl_setup)


# ---------------------------------------------------------------------------------------------
# Public API
def _flat(hidden: Tensor) -> Tensor:
    return hidden.reshape(-1, hidden.shape[-1]).contiguous()


def linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask=None, *, bias=None, loss="vespo",
                       cu_seqlens=None, rollout_is_weights=None, temperature=1.0, agg=None, norm=None,
                       return_metrics=False, chunk_tokens=None, **params):
    """policy_loss(hidden @ weight.T + bias, ...) without the T x V logits; gradients to hidden, weight, bias.

    hidden (B, L, H) padded or (T, H) packed (with cu_seqlens), weight (V, H) as nn.Linear stores it
    (tied embeddings work: autograd accumulates), bias (V,) optional; everything else as `policy_loss`.
    Each loss / agg / TIS / temperature / norm / metrics option means what it means there.

    GEMMs (chunk = chunk_tokens, None: see default_chunk_tokens): consecutive whole sequences that fit
    in a chunk are one group: 3 GEMMs per group (logits, then d hidden and d weight, the gradient
    finished in the forward). A sequence longer than a chunk runs two-pass over its p pieces:
    4p - 1 GEMMs. Without gradients: 1 GEMM per chunk. float64 inputs run the reference (which
    builds the full logits).
    """
    agg, values = resolve_loss(loss, agg, params)
    chunk = _check_linear(hidden, weight, labels, bias, chunk_tokens)
    temperature = check_temperature(temperature)
    if hidden.dtype == torch.float64 or ops._use_reference(hidden):
        return reference.linear_policy_loss(hidden, weight, labels, old_logp, advantages, mask, bias=bias, loss=loss,
                                            cu_seqlens=cu_seqlens, rollout_is_weights=rollout_is_weights,
                                            temperature=temperature, agg=agg, norm=norm,
                                            return_metrics=return_metrics, **params)
    who = "(T, H) hidden" if hidden.dim() == 2 else "(B, L, H) hidden"
    old, isw, m, adv, cu, norm_len = _companions(hidden, who, old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                                 rollout_is_weights=rollout_is_weights)
    grad_on = torch.is_grad_enabled()
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    out, metrics, _, _, _ = torch.ops.vespo.linear_policy_loss(
        _flat(hidden), weight.contiguous(), None if bias is None else bias.contiguous(),
        labels.reshape(-1).to(torch.int64).contiguous(), ops._f32(old), ops._f32(adv),
        None if m is None else m.contiguous(), cu, ops._f32(isw), check_norm(norm, hidden.device), 1.0 / temperature,
        LOSS_IDS[loss], values, AGG_IDS[agg], norm_len, chunk, need[0], need[1], need[2])
    if not return_metrics:
        return out
    return out, dict(zip(METRIC_NAMES, metrics.detach().unbind(0)))


def linear_token_logprobs(hidden, weight, labels, *, bias=None, cu_seqlens=None, temperature=1.0,
                          return_entropy=False, chunk_tokens=None, ignore_index=-100):
    """log softmax((hidden @ weight.T + bias) / temperature)[label] per token (float32), optionally the entropy.

    Differentiable in hidden, weight and bias (logp and entropy): backward recomputes each chunk's
    logits (1 GEMM) and runs the 2 gradient GEMMs, so forward is 1 GEMM per chunk and backward 3.
    Labels equal to ignore_index give 0 (and no gradient); other labels outside [0, V) raise IndexError.
    """
    chunk = _check_linear(hidden, weight, labels, bias, chunk_tokens)
    temperature = check_temperature(temperature)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, labels.numel(), hidden.device)
    if hidden.dtype == torch.float64 or ops._use_reference(hidden):
        return reference.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               return_entropy=return_entropy, ignore_index=ignore_index)
    shape = hidden.shape[:-1]
    logp, _, _, ent = torch.ops.vespo.linear_token_logprobs(
        _flat(hidden), weight.contiguous(), None if bias is None else bias.contiguous(),
        labels.reshape(-1).to(torch.int64).contiguous(), 1.0 / temperature, bool(return_entropy), int(ignore_index),
        chunk)
    if return_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)
