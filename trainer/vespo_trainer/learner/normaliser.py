"""The denominator of a mini-batch's loss when it is split over micro-batches and data-parallel ranks.

vespo_ext.policy_loss divides by its own batch's count unless it is given `norm`; a micro-batch on one
rank sees only part of the mini-batch, so the learner passes the count of the WHOLE mini-batch (all
ranks' rows), which makes the partial losses add up to the loss of the undivided mini-batch. The
aggregation is the library's: `agg=None` means the loss's own default, which vespo_ext resolves
(check_loss), so a changed default there changes the denominator here too.
"""
from __future__ import annotations

from typing import Optional

from vespo_ext import check_loss


def resolved_agg(loss: str, agg: Optional[str]) -> str:
    """`agg`, or the loss's default aggregation in vespo_ext."""
    return check_loss(loss, agg)[0]


def loss_normaliser(mb_mask, loss: str, agg: Optional[str]) -> float:
    """What the op divides the mini-batch's summed loss by, for a (rows, L) mask of the whole mini-batch:
    token-mean the counted tokens, seq-mean-* the non-empty sequences, seq-mean-token-sum-norm the padded
    length (each at least 1)."""
    agg = resolved_agg(loss, agg)
    if agg == "token-mean":
        return float(max(int(mb_mask.sum()), 1))
    if agg in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return float(max(int(mb_mask.any(1).sum()), 1))
    if agg == "seq-mean-token-sum-norm":
        return float(mb_mask.shape[1])
    raise ValueError(f"loss_normaliser: no rule for agg {agg!r}")
