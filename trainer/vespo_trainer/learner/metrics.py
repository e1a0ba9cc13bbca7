"""Merging the learner's statistics across micro-batches and data-parallel ranks, exactly.

The fused op reports per-call statistics of the sequences it saw (means, max/min, std, counts).
A mini-batch is split over micro-batches and ranks, so each statistic is merged with the rule that
makes the merged value equal the statistic of the whole mini-batch: counts add, maxima take the
max, means are weighted by the count they average over (sequences, tokens, positive or negative
sequences), the std is pooled. The same rules serve one rank (micro-batches) and many (ranks).
"""
from __future__ import annotations

import math
from typing import Dict, List

COUNTS = ("n_pos", "n_neg", "n_seq", "n_tokens")
TOKEN_MEANS = ("approx_kl", "clip_frac", "clip_frac_low", "clip_frac_high")


def _weight(name: str) -> str:
    if name in TOKEN_MEANS:
        return "n_tokens"
    if name in ("phi_pos_mean", "w_pos_mean"):
        return "n_pos"
    if name in ("phi_neg_mean", "w_neg_mean"):
        return "n_neg"
    return "n_seq"  # per-sequence means (w_seq_mean, phi_mean, frac_w_gt_100, ...)


def merge_loss_metrics(parts: List[Dict[str, float]]) -> Dict[str, float]:
    """One dict of the op's metrics for the union of the parts' sequences."""
    if len(parts) == 1:
        return dict(parts[0])
    out: Dict[str, float] = {}
    seen = [p for p in parts if p.get("n_seq", 0) > 0]
    for name in parts[0]:
        if name in COUNTS:
            out[name] = sum(p[name] for p in parts)
        elif name.endswith("_max"):
            out[name] = max((p[name] for p in seen), default=0.0)
        elif name.endswith("_min"):
            out[name] = min((p[name] for p in seen), default=0.0)
        elif name == "w_seq_std":
            out[name] = _pooled_std([(p["n_seq"], p["w_seq_mean"], p["w_seq_std"]) for p in seen])
        else:
            w = _weight(name)
            total = sum(p.get(w, 0.0) for p in parts)
            out[name] = sum(p[name] * p.get(w, 0.0) for p in parts) / total if total > 0 else 0.0
    return out


def _pooled_std(groups) -> float:
    """Sample std (n - 1) of the union of groups given as (n, mean, sample std)."""
    n = sum(g[0] for g in groups)
    if n <= 1:
        return 0.0
    mean = sum(k * m for k, m, _ in groups) / n
    ss = sum((k - 1) * s * s + k * (m - mean) ** 2 for k, m, s in groups)
    return math.sqrt(max(ss, 0.0) / (n - 1))


def finish_train_metrics(rank_parts: List[dict]) -> Dict[str, float]:
    """The step's learner metrics from every rank's `parts` (Learner.train_batch), in rank order.

    Per mini-batch: the loss adds up over ranks (each rank's loss is already divided by the global
    normaliser), the op's statistics merge exactly; then the mini-batches are averaged, as before.
    """
    n_mb = len(rank_parts[0]["minibatches"])
    if any(len(p["minibatches"]) != n_mb for p in rank_parts):
        raise RuntimeError("learner ranks disagree on the number of mini-batches")
    sums: Dict[str, float] = {}
    grad_norms = []
    for k in range(n_mb):
        mbs = [p["minibatches"][k] for p in rank_parts]
        sums["actor/loss"] = sums.get("actor/loss", 0.0) + sum(mb["loss"] for mb in mbs)
        if mbs[0]["grad_norm"] is not None:
            grad_norms.append(mbs[0]["grad_norm"])  # the global norm: the same on every rank
        for name, v in merge_loss_metrics([mb["stats"] for mb in mbs]).items():
            sums[f"vespo/{name}"] = sums.get(f"vespo/{name}", 0.0) + v
    m = {name: v / n_mb for name, v in sums.items()}
    if grad_norms:
        m["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
    mis = [p["mismatch"] for p in rank_parts if p.get("mismatch")]
    if mis:
        tokens = sum(x["tokens"] for x in mis)
        m["rollout/logp_abs_diff"] = sum(x["abs_diff_sum"] for x in mis) / tokens if tokens else 0.0
    corr = next((p["rollout_corr"] for p in rank_parts if p.get("rollout_corr")), None)
    if corr:  # computed on the whole batch: the same on every rank; rollout_corr/kl is the mismatch's token-mean KL
        m.update(corr)
    versions = {p["version"] for p in rank_parts}
    if len(versions) != 1:
        raise RuntimeError(f"learner ranks disagree on the policy version: {sorted(versions)}")
    m["actor/approx_kl"] = m.get("vespo/approx_kl", 0.0)
    m["actor/lr"] = rank_parts[0]["lr"]
    m["actor/version"] = rank_parts[0]["version"]
    m["time/train_s"] = max(p["seconds"] for p in rank_parts)
    return m


def warmup_result(losses: List[float], seconds: float) -> dict:
    """Learner.warmup's answer; `warmup/losses` (per step) add up over ranks (merge_warmup)."""
    return {"warmup/loss_first": losses[0] if losses else float("nan"),
            "warmup/loss_last": losses[-1] if losses else float("nan"),
            "warmup/steps": len(losses), "warmup/seconds": seconds, "warmup/losses": list(losses)}


def merge_warmup(results: List[dict]) -> dict:
    """The warm-up answer of all ranks: each step's loss is the sum of the ranks' partial losses."""
    losses = [sum(x) for x in zip(*(r["warmup/losses"] for r in results))]
    return warmup_result(losses, max(r["warmup/seconds"] for r in results))
