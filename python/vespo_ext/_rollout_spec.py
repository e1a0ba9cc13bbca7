"""Names and argument checks of the rollout correction (vespo_ext.rollout_correction), torch-free so
that configs (the trainer's) validate with the same rules the function applies."""
from __future__ import annotations

import math
from typing import Optional

# |log r| is clamped here before exponentiating (veRL's SAFETY_BOUND; the op clamps log W at 20 too).
SAFETY_BOUND = 20.0
IS_LEVELS = ("token", "sequence")
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
# Short names (the and older veRL's): ratio bounds on the token, the sequence's product
# and the sequence's geometric mean.
RS_ALIASES = {"token": "token_k1", "sequence": "seq_sum_k1", "geometric": "seq_mean_k1"}


def parse_is_threshold(spec) -> tuple[float, Optional[float]]:
    """TIS: one upper bound; IcePop: "lower_upper" (weights outside the band become 0)."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_is_threshold must be a number or a 'lower_upper' string, got {spec!r}")
    lower = None
    if isinstance(spec, str):
        parts = spec.strip().split("_")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"rollout_is_threshold must be a number or 'lower_upper', got {spec!r}") from None
        if len(vals) not in (1, 2):
            raise ValueError(f"rollout_is_threshold must be a number or 'lower_upper', got {spec!r}")
        upper, lower = (vals[0], None) if len(vals) == 1 else (vals[1], vals[0])
    else:
        upper = float(spec)
    if not (math.isfinite(upper) and upper > 0):
        raise ValueError(f"rollout_is_threshold's upper bound must be finite and > 0, got {spec!r}")
    if lower is not None and not (0 < lower <= upper):
        raise ValueError(f"rollout_is_threshold's lower bound must be in (0, upper], got {spec!r}")
    return upper, lower


def parse_rs(rollout_rs, threshold, threshold_lower) -> list[tuple[str, Optional[float], float]]:
    """[(option, lower, upper)]: k1 options bound the ratio to [lower, upper]; k2/k3 bound the
    divergence from above."""
    if not isinstance(rollout_rs, str) or not rollout_rs.strip():
        raise ValueError(f"rollout_rs must be a non-empty string such as 'token_k1', got {rollout_rs!r}")
    opts = []
    for o in (s.strip() for s in rollout_rs.split(",")):
        o = RS_ALIASES.get(o, o)
        if o not in RS_OPTIONS:
            raise ValueError(f"rollout_rs option {o!r} is not one of {RS_OPTIONS + tuple(RS_ALIASES)}")
        if o not in opts:
            opts.append(o)
    if threshold is None:
        raise ValueError("rollout_rs_threshold is required when rollout_rs is set")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, str)):
        raise TypeError(f"rollout_rs_threshold must be a number or a string, got {threshold!r}")
    specs = [s.strip() for s in str(threshold).split(",")] if isinstance(threshold, str) else [threshold]
    if len(specs) == 1:
        specs = specs * len(opts)
    if len(specs) != len(opts):
        raise ValueError(f"rollout_rs_threshold has {len(specs)} entries for {len(opts)} rollout_rs options "
                         f"(give one shared threshold or one per option)")
    out = []
    for o, s in zip(opts, specs):
        parts = str(s).split("_")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"rollout_rs_threshold entry {s!r} (for {o}) is not a number or 'lower_upper'") from None
        if len(vals) > 2 or any(not (math.isfinite(v) and v > 0) for v in vals):
            raise ValueError(f"rollout_rs_threshold entry {s!r} (for {o}) must be positive: 'upper' or 'lower_upper'")
        upper = vals[-1]
        if o.endswith("k1"):
            lower = vals[0] if len(vals) == 2 else (threshold_lower if threshold_lower is not None else 1.0 / upper)
            if not (0 < lower <= upper):
                raise ValueError(f"rollout_rs_threshold_lower must be in (0, {upper}] for {o}, got {lower}")
        else:
            if len(vals) == 2:
                raise ValueError(f"{o} takes one upper bound, got {s!r}")
            lower = None
        out.append((o, lower, upper))
    return out


# Named combinations (veRL's preset names). "decoupled": old_logp recomputed by the learner and the
# correction applied between it and the engine's log-probs; "bypass": the engine's log-probs are old_logp.
_TOKEN_IS = dict(rollout_is="token", rollout_is_threshold=2.0)
_SEQ_IS = dict(rollout_is="sequence", rollout_is_threshold=2.0)
_GEO_RS = dict(rollout_rs="seq_mean_k1", rollout_rs_threshold="0.999_1.001")
_K3_RS = dict(rollout_rs="seq_mean_k3", rollout_rs_threshold=0.01)
PRESETS = {
    "bypass": dict(bypass_mode=True),
    "disabled": dict(bypass_mode=False),  # metrics only: old_logp recomputed, nothing corrected
    "decoupled_token_is": dict(bypass_mode=False, **_TOKEN_IS),
    "decoupled_seq_is": dict(bypass_mode=False, **_SEQ_IS),
    "decoupled_token_icepop": dict(bypass_mode=False, rollout_is="token", rollout_is_threshold="0.5_5.0"),
    "decoupled_seq_is_rs": dict(bypass_mode=False, **_SEQ_IS, rollout_rs="seq_sum_k1", rollout_rs_threshold="0.5_2.0"),
    "decoupled_geo_rs": dict(bypass_mode=False, **_GEO_RS),
    "decoupled_geo_rs_token_tis": dict(bypass_mode=False, **_TOKEN_IS, **_GEO_RS),
    "decoupled_geo_rs_seq_tis": dict(bypass_mode=False, **_SEQ_IS, **_GEO_RS),
    "decoupled_k3_rs": dict(bypass_mode=False, **_K3_RS),
    "decoupled_k3_rs_token_tis": dict(bypass_mode=False, **_TOKEN_IS, **_K3_RS),
    "decoupled_k3_rs_seq_tis": dict(bypass_mode=False, **_SEQ_IS, **_K3_RS),
}
