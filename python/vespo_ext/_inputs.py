"""Validation and layout canonicalisation shared by the fused ops and the reference.

Everything is checked once here, with messages that name the argument; the C++ side re-checks
cheaply. Padded inputs ((B, L, V) logits) are viewed as packed ones ((T, V) with T = B * L and
cu_seqlens = [0, L, 2L, ...]); per-token tensors become 1-D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Packed:
    logits: torch.Tensor  # (T, V), unit stride along V
    labels: torch.Tensor  # (T,) int64
    old_logp: Optional[torch.Tensor]  # (T,)
    advantages: Optional[torch.Tensor]  # (S,) or (T,)
    mask: Optional[torch.Tensor]  # (T,) bool, or None (all counted)
    rollout_is_weights: Optional[torch.Tensor]  # (T,)
    cu_seqlens: torch.Tensor  # (S+1,) int64, same device as logits
    norm: Optional[torch.Tensor]  # 1-element float32 tensor, or None
    norm_len: float  # seq-mean-token-sum-norm default: padded length L, or 0 = max sequence length
    temperature: float
    shape: tuple  # the caller's logits shape


def _is_tensor(x, name: str, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    inv = 1.0 / temperature
    if not (_F32_TINY <= inv <= _F32_MAX):
        raise ValueError(f"temperature must have a float32 inverse (about 3e-39 < 1/temperature < 3.4e38), got {temperature}")
    return float(temperature)


_F32_MAX = 3.4028234663852886e38
_F32_TINY = 1.1754943508222875e-38  # smallest normal float32


def check_logits_labels(logits, labels) -> None:
    _is_tensor(logits, "logits")
    _is_tensor(labels, "labels")
    if logits.dtype not in _FLOAT_LOGITS:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (T, V) packed or (B, L, V) padded, got shape {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty vocabulary (V >= 1), got shape {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (the logits' without V), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")


def _per_token(x, name: str, logits: torch.Tensor, floating: bool = True) -> Optional[torch.Tensor]:
    if x is None:
        return None
    _is_tensor(x, name)
    want = tuple(logits.shape[:-1])
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != logits.device:
        raise ValueError(f"{name} must be on the logits' device {logits.device}, got {x.device}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.reshape(-1)


def check_cu_seqlens(cu, T: int, device: torch.device) -> torch.Tensor:
    _is_tensor(cu, "cu_seqlens")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 1 entries, got shape {tuple(cu.shape)}")
    if torch.compiler.is_compiling():
        # Value checks read the tensor on the host (a graph break); the kernels re-check on CPU
        # and clamp sequence bounds on CUDA, so a traced call only checks dtype and rank.
        return cu.to(device=device, dtype=torch.int64)
    host = cu.detach().to("cpu", torch.int64)
    if int(host[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(host[0])}")
    if host.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        i = int(torch.nonzero(host[1:] < host[:-1])[0]) + 1
        raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i}] = {int(host[i])} < {int(host[i - 1])}")
    if int(host[-1]) != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (the number of tokens), got {int(host[-1])}")
    return cu.to(device=device, dtype=torch.int64)


def check_norm(norm, device) -> Optional[torch.Tensor]:
    if norm is None:
        return None
    if isinstance(norm, torch.Tensor):
        if norm.numel() != 1:
            raise ValueError(f"norm must be a number or a 1-element tensor, got shape {tuple(norm.shape)}")
        if norm.device != device:
            raise ValueError(f"norm must be on the logits' device {device}, got {norm.device}")
        if not torch.compiler.is_compiling():  # a value check reads the tensor (a sync on CUDA, as cu_seqlens' does)
            v = float(norm.detach().reshape(()).double())
            if not (math.isfinite(v) and _F32_TINY <= v <= _F32_MAX):
                raise ValueError(f"norm must be finite, > 0 and a normal float32 (>= 1.2e-38), got {v}")
        return norm.detach().reshape(1).to(torch.float32)
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise TypeError(f"norm must be a number or a tensor, got {type(norm).__name__}")
    if not (norm > 0 and math.isfinite(norm)) or not (_F32_TINY <= norm <= _F32_MAX):
        raise ValueError(f"norm must be a finite number > 0 representable in float32 (>= 1.2e-38), got {norm}")
    return torch.full((1,), float(norm), dtype=torch.float32, device=device)


_ADV_LAYOUTS = (None, "sequence", "token")


def _companions(stand_in, who: str, old_logp, advantages, mask, *, cu_seqlens, rollout_is_weights,
                advantages_per=None):
    """Check the per-token and per-sequence companions of `stand_in` (logits, or logp with a trailing
    unit dim): its leading dims are the token layout ((B, L) padded or (T,) packed). Returns
    (old, isw, mask, adv, cu, norm_len) in packed 1-D form."""
    _is_tensor(old_logp, "old_logp")
    _is_tensor(advantages, "advantages")
    if advantages_per not in _ADV_LAYOUTS:
        raise ValueError(f"advantages_per must be None, 'sequence' or 'token', got {advantages_per!r}")
    dev = stand_in.device
    old = _per_token(old_logp, "old_logp", stand_in)
    isw = _per_token(rollout_is_weights, "rollout_is_weights", stand_in)
    m = _per_token(mask, "mask", stand_in, floating=False)
    if m is not None and m.dtype != torch.bool:
        m = m != 0
    if advantages.device != dev:
        raise ValueError(f"advantages must be on the {who}' device {dev}, got {advantages.device}")
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
    if stand_in.dim() == 3:
        B, L = stand_in.shape[0], stand_in.shape[1]
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only for packed {who}; padded {who} imply it")
        if tuple(advantages.shape) not in ((B,), (B, L)):
            raise ValueError(f"advantages must have shape ({B},) or ({B}, {L}) for padded {who}, "
                             f"got {tuple(advantages.shape)}")
        cu = torch.arange(B + 1, device=dev, dtype=torch.int64) * L
        return old, isw, m, advantages.reshape(-1), cu, float(L)
    T = stand_in.shape[0]
    if cu_seqlens is None:
        raise ValueError(f"cu_seqlens (S+1,) is required with packed {who}")
    cu = check_cu_seqlens(cu_seqlens, T, dev)
    S = cu.numel() - 1
    if advantages.dim() != 1 or advantages.shape[0] not in (S, T):
        raise ValueError(f"advantages must have shape ({S},) (per sequence) or ({T},) (per token), "
                         f"got {tuple(advantages.shape)}")
    if S == T and T > 0:
        # One value per sequence and one per token have the same length. Unambiguous only when every
        # sequence holds exactly one token (both readings agree); otherwise the caller must say.
        if advantages_per is None:
            ambiguous = True if torch.compiler.is_compiling() else bool(((cu[1:] - cu[:-1]) != 1).any())
            if ambiguous:
                raise ValueError(f"advantages of shape ({T},) are ambiguous here: there are as many sequences as "
                                 f"tokens ({T}, some sequences empty); pass advantages_per='sequence' or 'token'")
        elif advantages_per == "token":
            # The kernels read a length-S vector per sequence: one more (empty) sequence makes S != T.
            cu = torch.cat([cu, cu[-1:]])
    return old, isw, m, advantages, cu, 0.0


def contiguous_rows(logits: torch.Tensor) -> torch.Tensor:
    """(T, V) view of the logits the kernels accept: unit stride along V and rows that do not overlap
    (an expanded / broadcast tensor, row stride 0, is copied)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] > 0 and (flat.stride(-1) != 1 or (flat.shape[0] > 1 and flat.stride(0) < flat.shape[-1])):
        flat = flat.contiguous()
    return flat


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        if isinstance(ignore_index, torch.Tensor) and ignore_index.numel() == 1 and not ignore_index.dtype.is_floating_point:
            return int(ignore_index)
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    return ignore_index


def pack_inputs(logits, labels, old_logp, advantages, mask, *, cu_seqlens, rollout_is_weights, temperature, norm,
                advantages_per=None) -> Packed:
    """Validate a policy-loss call and return its packed form."""
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    old, isw, m, adv, cu, norm_len = _companions(logits, "(T, V) logits" if logits.dim() == 2 else "(B, L, V) logits",
                                                 old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                                 rollout_is_weights=rollout_is_weights, advantages_per=advantages_per)
    flat = contiguous_rows(logits)
    return Packed(
        logits=flat, labels=labels.reshape(-1).to(torch.int64), old_logp=old, advantages=adv, mask=m,
        rollout_is_weights=isw, cu_seqlens=cu, norm=check_norm(norm, logits.device), norm_len=norm_len,
        temperature=temperature, shape=tuple(logits.shape),
    )


def pack_logp_inputs(logp, old_logp, advantages, mask, *, cu_seqlens, rollout_is_weights, norm, advantages_per=None):
    """Validate a log-prob-level call: logp (B, L) padded or (T,) packed with cu_seqlens.

    Returns (logp, old, adv, mask, isw, cu, norm, norm_len) in packed 1-D form."""
    _is_tensor(logp, "logp")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a floating-point tensor, got {logp.dtype}")
    if logp.dim() not in (1, 2):
        raise ValueError(f"logp must be (T,) packed or (B, L) padded, got shape {tuple(logp.shape)}")
    # The companions are checked against a stand-in whose leading dims are logp's token layout.
    old, isw, m, adv, cu, norm_len = _companions(logp.unsqueeze(-1), "(T,) logp" if logp.dim() == 1 else "(B, L) logp",
                                                 old_logp, advantages, mask, cu_seqlens=cu_seqlens,
                                                 rollout_is_weights=rollout_is_weights, advantages_per=advantages_per)
    return logp.reshape(-1), old, adv, m, isw, cu, check_norm(norm, logp.device), norm_len
