"""Rollout correction: importance weights, rejection masks and mismatch metrics for the gap between
the rollout engine's log-probs (log μ) and the learner's (log π_old) — veRL's
`algorithm.rollout_correction`, on the small per-token tensors (no pass over logits).

    corr = rollout_correction(old_logp, rollout_logp, mask, rollout_is="sequence",
                              rollout_rs="token_k1", rollout_rs_threshold=2.0)
    w, m = corr.for_loss("vespo")
    loss = vespo_ext.vespo_loss(logits, labels, old_logp, adv, m, rollout_is_weights=w)

The ratio is r_t = π_old(y_t) / μ(y_t) = exp(old_logp_t − rollout_logp_t). The math, the modes and
how they compose with VESPO's own weight: docs/rollout_correction.md.

Layouts as for the loss: padded (B, L) per-token tensors, or packed (T,) with `cu_seqlens` (S+1,).
Metrics are 0-d tensors on the inputs' device (no host synchronisation). Deterministic.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ._rollout_spec import IS_LEVELS, SAFETY_BOUND, parse_is_threshold, parse_rs


class RolloutCorrection(NamedTuple):
    """What `rollout_correction` returns.

    rollout_is_weights: per-token IS weights (the caller's shape; 0 at masked positions; in sequence
        mode every token carries its sequence's weight, as in veRL), or None when `rollout_is` is None.
    mask: the response mask with the rejected tokens removed (bool, the caller's shape).
    metrics: 0-d tensors: kl, k3_kl, ppl_ratio, training_ppl, rollout_ppl, chi2_token, chi2_seq, and
        when enabled is_mean, is_max, is_min, is_std, ess, is_frac_high, is_frac_low, rs_masked_frac,
        rs_seq_masked_frac.
    level: the IS level ("token", "sequence" or None).
    cu_seqlens: the packed layout's boundaries (None when padded).
    """
    rollout_is_weights: Optional[torch.Tensor]
    mask: torch.Tensor
    metrics: dict
    level: Optional[str] = None
    cu_seqlens: Optional[torch.Tensor] = None

    def for_loss(self, loss: str):
        """(rollout_is_weights, mask) to hand to `policy_loss(..., loss=loss)`.

        The losses other than VESPO multiply each token's loss by its weight, which is what the
        weights are. VESPO folds Σ_t log w_t into log W instead, so a sequence weight must enter
        once, not once per token: in sequence mode the sequence's first counted token carries w_i
        and the others 1. A weight of 0 (IcePop's band) cannot be folded into log W: for VESPO those
        tokens leave the mask instead (they are rejected)."""
        w, m = self.rollout_is_weights, self.mask
        if w is None or loss != "vespo":
            return w, m
        m = m & (w > 0)
        if self.level == "sequence":
            seq, _ = _segments(m, self.cu_seqlens)
            flat_m = m.reshape(-1)
            pos = torch.arange(flat_m.numel(), device=m.device)
            big = torch.full((seq.n,), flat_m.numel(), dtype=torch.long, device=m.device)
            first = big.scatter_reduce(0, seq.ids, torch.where(flat_m, pos, flat_m.numel()), "amin")
            is_first = (pos == first[seq.ids]) & flat_m
            w = torch.where(is_first.reshape(w.shape), w, torch.ones_like(w))
        return torch.where(m, w, torch.ones_like(w)), m


class _Seq(NamedTuple):
    ids: torch.Tensor  # (T,) sequence index of each token
    n: int             # number of sequences
    cu: Optional[torch.Tensor]  # packed boundaries, or None for padded rows


def _segments(mask: torch.Tensor, cu_seqlens) -> tuple[_Seq, torch.Tensor]:
    if cu_seqlens is None:
        B, L = mask.shape
        ids = torch.arange(B, device=mask.device).repeat_interleave(L)
        return _Seq(ids, B, None), mask.reshape(-1)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    ids = torch.repeat_interleave(torch.arange(lens.numel(), device=mask.device), lens)
    return _Seq(ids, lens.numel(), cu_seqlens), mask


def _seg_sum(x: torch.Tensor, seq: _Seq) -> torch.Tensor:
    """Per-sequence sums of a flat (T,) tensor in float64, in a fixed order (no float atomics)."""
    x = x.double()
    if seq.cu is None:
        return x.reshape(seq.n, -1).sum(-1)
    c = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
    cu = seq.cu.to(torch.long)
    return c[cu[1:]] - c[cu[:-1]]


def _seg_max(x: torch.Tensor, seq: _Seq, fill: float) -> torch.Tensor:
    out = torch.full((seq.n,), fill, dtype=x.dtype, device=x.device)
    return out.scatter_reduce(0, seq.ids, x, "amax")  # max is order-independent: deterministic


def _mean(x, m, n):
    return torch.where(m, x, torch.zeros_like(x)).sum() / n


def rollout_correction(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                       cu_seqlens: Optional[torch.Tensor] = None, rollout_is: Optional[str] = None,
                       rollout_is_threshold=2.0, rollout_is_batch_normalize: bool = False,
                       rollout_rs: Optional[str] = None, rollout_rs_threshold=None,
                       rollout_rs_threshold_lower: Optional[float] = None, dist_reduce: bool = True,
                       group=None) -> RolloutCorrection:
    """IS weights, rejection mask and metrics from the learner's and the engine's log-probs.

    rollout_is: None | "token" | "sequence" — w_t = min(r_t, threshold) per token, or the sequence's
        w_i = min(Π_t r_t, threshold) on each of its tokens (log-ratio sums clamped at ±20);
        `rollout_is_threshold="lower_upper"` zeroes weights outside the band instead (IcePop).
    rollout_is_batch_normalize: divide the weights by their mean (over counted tokens for "token",
        over non-empty sequences for "sequence"; across the data-parallel `group` when
        torch.distributed is initialised and `dist_reduce`, as veRL does: each rank holds a shard).
    rollout_rs: None, or comma-separated options (veRL's): token_k1 / seq_sum_k1 / seq_mean_k1 keep
        tokens (sequences) whose ratio r_t (Π r_t, geometric mean of r_t) lies in [lower, upper];
        *_k2 (½ log² r) and *_k3 (r − 1 − log r) keep those whose divergence (token, sequence sum,
        mean or max) is <= upper. Aliases: token, sequence, geometric. A rejected sequence loses
        all its tokens. Every option must pass.
    rollout_rs_threshold: one bound shared by all options or one per option (comma-separated);
        k1 options take "lower_upper" or an upper bound with lower = `rollout_rs_threshold_lower`
        (default 1 / upper).
    """
    for name, x in (("old_logp", old_logp), ("rollout_logp", rollout_logp)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if rollout_logp.shape != old_logp.shape or rollout_logp.device != old_logp.device:
        raise ValueError(f"rollout_logp must match old_logp's shape {tuple(old_logp.shape)} and device, got "
                         f"{tuple(rollout_logp.shape)} on {rollout_logp.device}")
    if cu_seqlens is None and old_logp.dim() != 2:
        raise ValueError(f"old_logp must be (B, L) padded, or (T,) packed with cu_seqlens; got {tuple(old_logp.shape)}")
    if cu_seqlens is not None:
        if old_logp.dim() != 1:
            raise ValueError(f"with cu_seqlens, old_logp must be (T,) packed, got {tuple(old_logp.shape)}")
        if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
                or cu_seqlens.dtype not in (torch.int32, torch.int64)):
            raise ValueError("cu_seqlens must be a 1-D int32/int64 tensor (S+1,) from 0 to T")
        cu_seqlens = cu_seqlens.to(old_logp.device)
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != old_logp.numel() or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to T={old_logp.numel()}")
    if mask is None:
        mask = torch.ones_like(old_logp, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != old_logp.shape:
        raise ValueError(f"mask must be a tensor of old_logp's shape {tuple(old_logp.shape)}")
    mask = mask.to(device=old_logp.device) != 0
    if rollout_is is not None and rollout_is not in IS_LEVELS:
        raise ValueError(f"rollout_is must be None, 'token' or 'sequence', got {rollout_is!r}")
    is_upper, is_lower = parse_is_threshold(rollout_is_threshold) if rollout_is is not None else (None, None)
    rs = parse_rs(rollout_rs, rollout_rs_threshold, rollout_rs_threshold_lower) if rollout_rs is not None else []

    shape = old_logp.shape
    seq, m = _segments(mask, cu_seqlens)
    m = m.reshape(-1)
    # Masked positions may hold anything (NaN, -inf): they are never read into a result.
    lr = torch.where(m, (old_logp.double() - rollout_logp.double()).reshape(-1), torch.zeros((), dtype=torch.float64,
                                                                                           device=m.device))
    lr_c = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    n_tok = m.sum().clamp(min=1).double()
    seq_len = _seg_sum(m, seq)
    seq_ok = seq_len > 0
    n_seq = seq_ok.sum().clamp(min=1).double()
    lr_sum = _seg_sum(lr, seq)
    dev = old_logp.device
    metrics = _mismatch_metrics(old_logp.double().reshape(-1), rollout_logp.double().reshape(-1), lr, lr_c, m,
                                seq, seq_len, seq_ok, n_tok, n_seq, lr_sum)

    weights = None
    if rollout_is is not None:
        raw = torch.exp(lr_c) if rollout_is == "token" else torch.exp(lr_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND))[seq.ids]
        raw = torch.where(m, raw, torch.zeros_like(raw))
        if is_lower is None:
            weights = raw.clamp(max=is_upper)
        else:
            weights = torch.where((raw >= is_lower) & (raw <= is_upper), raw, torch.zeros_like(raw))
        lo = is_lower if is_lower is not None else 1.0 / is_upper
        if rollout_is == "token":
            metrics["is_max"] = torch.where(m, raw, torch.zeros_like(raw)).max()
            metrics["is_min"] = torch.where(m, raw, torch.full_like(raw, math.inf)).min()
            metrics["is_frac_high"] = _mean((raw > is_upper).double(), m, n_tok)
            metrics["is_frac_low"] = _mean((raw < lo).double(), m, n_tok)
        else:
            seq_raw = torch.exp(lr_sum.clamp(max=SAFETY_BOUND))
            metrics["is_max"] = torch.where(seq_ok, seq_raw, torch.zeros_like(seq_raw)).max()
            metrics["is_min"] = torch.where(seq_ok, seq_raw, torch.full_like(seq_raw, math.inf)).min()
            metrics["is_frac_high"] = (seq_ok & (seq_raw > is_upper)).double().sum() / n_seq
            metrics["is_frac_low"] = (seq_ok & (seq_raw < lo)).double().sum() / n_seq
        w_mean = _mean(weights, m, n_tok)
        metrics["is_mean"] = w_mean
        w2 = _mean(weights * weights, m, n_tok)
        metrics["is_std"] = (w2 - w_mean * w_mean).clamp(min=0).sqrt()
        # Effective sample size over the counted tokens' weights, normalised to (0, 1]: (E w)^2 / E w^2.
        metrics["ess"] = torch.where(w2 > 0, w_mean * w_mean / w2, torch.zeros_like(w2))
        if rollout_is_batch_normalize:
            weights = weights / _batch_mean(weights, m, seq, seq_ok, rollout_is, group if dist_reduce else False)
    rs_keep = torch.ones_like(m)
    for opt, lower, upper in rs:
        rs_keep &= _rs_keep(opt, lower, upper, lr, lr_c, m, seq, seq_len)
    if rs:
        kept = m & rs_keep
        metrics["rs_masked_frac"] = (m & ~kept).double().sum() / n_tok
        rejected_seq = _seg_sum(m & ~kept, seq) > 0
        metrics["rs_seq_masked_frac"] = rejected_seq.double().sum() / n_seq
        m = kept
    out_w = None if weights is None else torch.where(m, weights, torch.zeros_like(weights)).to(
        torch.float32).reshape(shape)
    metrics = {k: v.to(device=dev, dtype=torch.float32) for k, v in metrics.items()}
    return RolloutCorrection(out_w, m.reshape(shape), metrics, rollout_is, cu_seqlens)


def _mismatch_metrics(old, roll, lr, lr_c, m, seq, seq_len, seq_ok, n_tok, n_seq, lr_sum) -> dict:
    """KL estimators, perplexities and χ² of the engine-vs-learner mismatch (veRL's definitions)."""
    zero = torch.zeros((), dtype=torch.float64, device=m.device)
    lr_neg = -lr  # log μ − log π_old
    out = {"kl": _mean(lr_neg, m, n_tok), "k3_kl": _mean(torch.expm1(lr_c) - lr_c, m, n_tok)}
    den = seq_len.clamp(min=1)
    mean_old = _seg_sum(torch.where(m, old, zero), seq) / den
    mean_roll = _seg_sum(torch.where(m, roll, zero), seq) / den

    def seq_mean(x):
        return torch.where(seq_ok, x, torch.zeros_like(x)).sum() / n_seq

    out["training_ppl"] = seq_mean(torch.exp(-mean_old))
    out["rollout_ppl"] = seq_mean(torch.exp(-mean_roll))
    out["ppl_ratio"] = seq_mean(torch.exp(mean_roll - mean_old))
    out["chi2_token"] = _mean(torch.exp(2 * lr_c), m, n_tok) - 1.0
    out["chi2_seq"] = seq_mean(torch.exp(2 * lr_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND))) - 1.0
    return out


def _batch_mean(weights, m, seq, seq_ok, level, group):
    if level == "token":
        s, n = torch.where(m, weights, torch.zeros_like(weights)).sum(), m.sum().double()
    else:
        seq_w = _seg_sum(torch.where(m, weights, torch.zeros_like(weights)), seq) / _seg_sum(m, seq).clamp(min=1)
        s, n = torch.where(seq_ok, seq_w, torch.zeros_like(seq_w)).sum(), seq_ok.sum().double()
    if group is not False and torch.distributed.is_available() and torch.distributed.is_initialized():
        both = torch.stack([s, n])
        torch.distributed.all_reduce(both, group=group)
        s, n = both[0], both[1]
    mean = s / n.clamp(min=1)
    return torch.where(mean > 1e-8, mean, torch.ones_like(mean))


def _rs_keep(opt, lower, upper, lr, lr_c, m, seq, seq_len) -> torch.Tensor:
    """Token-level keep mask of one rejection option."""
    kind = opt.rsplit("_", 1)[1]
    if kind == "k1":
        stat = lr_c
    elif kind == "k2":
        stat = 0.5 * lr_c * lr_c
    else:
        stat = torch.expm1(lr_c) - lr_c
    zero = torch.zeros_like(stat)
    if opt.startswith("token"):
        v = stat
    elif opt.startswith("seq_max"):
        v = _seg_max(torch.where(m, stat, torch.full_like(stat, -math.inf)), seq, -math.inf)
        v = torch.where(torch.isinf(v), torch.zeros_like(v), v)[seq.ids]
    else:
        s = _seg_sum(torch.where(m, stat, zero), seq)
        v = (s if opt.startswith("seq_sum") else s / seq_len.clamp(min=1))[seq.ids]
    if kind == "k1":
        return (v >= math.log(lower)) & (v <= math.log(upper))
    return v <= upper
