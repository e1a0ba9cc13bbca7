"""Names, defaults and validation shared by the fused ops and the reference (no torch import)."""
from __future__ import annotations

LOSSES = ("vespo", "grpo", "gspo", "sapo", "cispo")
LOSS_IDS = {name: i for i, name in enumerate(LOSSES)}

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
AGG_IDS = {name: i for i, name in enumerate(AGGS)}

# Each loss's hyper-parameters in kernel order, with defaults (veRL's names where veRL has them).
LOSS_PARAMS: dict[str, dict[str, float]] = {
    "vespo": {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
    "grpo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0},
    "gspo": {"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "cispo": {"clip_ratio_low": 0.2, "clip_ratio_high": 0.2},
}
DEFAULT_AGG = {"vespo": "token-mean", "grpo": "token-mean", "cispo": "token-mean",
               "gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean"}
IMPLEMENTED_LOSSES = LOSSES

# Order of the metrics vector (csrc/include/vespo/params.h, enum Metric).
METRIC_NAMES = (
    "approx_kl",
    "w_seq_mean", "w_seq_max", "w_seq_min", "w_seq_std",
    "log_w_seq_mean", "log_w_seq_max", "log_w_seq_min",
    "phi_mean", "phi_max", "phi_min",
    "phi_pos_mean", "phi_neg_mean", "w_pos_mean", "w_neg_mean",
    "n_pos", "n_neg",
    "frac_w_gt_100",
    "n_seq", "n_tokens",
    "tis_log_mean", "tis_log_max", "tis_log_min",
    "clip_frac", "clip_frac_low", "clip_frac_high",
)


def resolve_loss(loss: str, agg: str | None, params: dict) -> tuple[str, list[float]]:
    """Validate the loss name, its parameters and the aggregation mode; return (agg, param list)."""
    if not isinstance(loss, str) or loss not in LOSS_PARAMS:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss not in IMPLEMENTED_LOSSES:
        raise NotImplementedError(f"loss {loss!r} is not implemented yet (available: {IMPLEMENTED_LOSSES})")
    known = LOSS_PARAMS[loss]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"loss {loss!r} got unexpected parameter(s) {unknown}; it takes {sorted(known)}")
    values = []
    for name, default in known.items():
        v = params.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(v).__name__}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {v}")
        if name.startswith("clip_ratio_") and name != "clip_ratio_c" and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
        if name == "clip_ratio_c" and v <= 1:
            raise ValueError(f"clip_ratio_c (dual-clip bound) must be > 1, got {v}")
        if name.startswith("tau_") and v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
        values.append(float(v))
    agg = DEFAULT_AGG[loss] if agg is None else agg
    if agg not in AGG_IDS:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    return agg, values
