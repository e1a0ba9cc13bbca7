// The per-sequence and per-token math of every policy loss, shared by the CPU and CUDA kernels.
// Everything here is double precision: it runs O(T) times, never O(T*V).
// The readable statement of the same math is python/vespo_ext/reference.py.
#pragma once
#include <cmath>
#include <cstdint>

#include "vespo/params.h"

#if defined(__CUDACC__)
#define VESPO_HD __host__ __device__ __forceinline__
#else
#define VESPO_HD inline
#endif

namespace vespo {

VESPO_HD double clampd(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
// Whether token t counts (mask absent = all count). Only counted tokens' inputs are ever read.
VESPO_HD bool counted(const uint8_t* mask, int64_t t) { return mask == nullptr || mask[t] != 0; }
VESPO_HD bool finited(double x) { return !(x != x) && x < INFINITY && x > -INFINITY; }

// Per-token contributions to the per-sequence statistics (phase A).
struct TokenStats {
  double log_ratio;  // clamp(logp - old, +-20)
  double log_tis;    // clamp(log max(w, 1e-8), +-20), 0 without TIS
  double kl;         // old - logp (unclamped)
};

VESPO_HD TokenStats token_stats(float logp, float old_logp, const float* is_w, int64_t t) {
  TokenStats s;
  const double d = (double)logp - (double)old_logp;
  s.log_ratio = clampd(d, -20.0, 20.0);
  s.kl = -d;
  s.log_tis = 0.0;
  if (is_w != nullptr) {
    const double w = (double)is_w[t];
    s.log_tis = clampd(log(w > 1e-8 ? w : 1e-8), -20.0, 20.0);
  }
  return s;
}

// Per-sequence quantities derived from phase A (written into the sequence's record).
// Named views of SeqParams::p, one per loss (the layout in params.h; the Python side's order is
// vespo_ext._spec.LOSS_PARAMS, checked against these names by tests/test_losses.py).
struct VespoParams { double k_pos, lambda_pos, k_neg, lambda_neg; };
struct ClipParams { double clip_ratio_low, clip_ratio_high, clip_ratio_c; };  // grpo, gspo, cispo
struct SapoParams { double tau_pos, tau_neg; };
VESPO_HD VespoParams vespo_params(const SeqParams& p) { return {p.p[0], p.p[1], p.p[2], p.p[3]}; }
VESPO_HD ClipParams clip_params(const SeqParams& p) { return {p.p[0], p.p[1], p.p[2]}; }
VESPO_HD SapoParams sapo_params(const SeqParams& p) { return {p.p[0], p.p[1]}; }

// rec must hold kSlotCount, kSlotLogRatio, kSlotLogTis, kSlotKl and kSlotAdvSign; this fills
// kSlotLogW (clamped log W), kSlotCoef (phi for VESPO, the sequence ratio exp(min(s_hat, 10)) for
// GSPO, else 1) and kSlotAux (s_hat for GSPO).
VESPO_HD void seq_coef(const SeqParams& p, double* rec) {
  const double s = clampd(rec[kSlotLogRatio] + rec[kSlotLogTis], -20.0, 20.0);
  rec[kSlotLogW] = s;
  double coef = 1.0;
  if (p.loss == LossType::kVespo) {
    const bool pos = rec[kSlotAdvSign] >= 0.0;
    const VespoParams vp = vespo_params(p);
    const double k = pos ? vp.k_pos : vp.k_neg;
    double lam = pos ? vp.lambda_pos : vp.lambda_neg;
    lam = lam > 1e-4 ? lam : 1e-4;
    const double w = exp(s);
    const double log_phi = lam + k * log(w > 1e-8 ? w : 1e-8) - lam * w;
    coef = exp(log_phi);
    if (!finited(coef)) coef = 0.0;
  }
  rec[kSlotAux] = 0.0;
  if (p.loss == LossType::kGspo) {
    const double cnt = rec[kSlotCount];
    const double s_hat = -rec[kSlotKl] / (cnt > 1.0 ? cnt : 1.0);  // mean of (logp - old), unclamped
    rec[kSlotAux] = s_hat;
    coef = exp(s_hat > 10.0 ? 10.0 : s_hat);  // a NaN s_hat stays NaN (never silently 10)
  }
  rec[kSlotCoef] = coef;
}

// The per-token loss term L_t, its derivative dL_t/dlogp_t (before the aggregation weight),
// and clip flags (bit 0: clipped, bit 1: clipped low, bit 2: clipped high). Derivatives follow
// torch's autograd conventions at the kinks (clamp passes the gradient at its bounds, inclusive).
struct TokenLoss {
  double value;
  double grad;
  int clip;
};

VESPO_HD TokenLoss token_loss(const SeqParams& p, const double* rec, float logp_f, float old_f,
                              double adv, const float* is_w, int64_t t) {
  TokenLoss out{0.0, 0.0, 0};
  const double logp = (double)logp_f;
  const double w_tis = is_w != nullptr ? (double)is_w[t] : 1.0;
  switch (p.loss) {
    case LossType::kVespo: {
      // L = -phi * A * logp, phi a detached coefficient of the whole sequence.
      const double phi = rec[kSlotCoef];
      out.value = -phi * adv * logp;
      out.grad = -phi * adv;
      break;
    }
    case LossType::kGrpo: {
      // PPO clip with dual clip; TIS weights multiply the per-token loss.
      const double d = logp - (double)old_f;
      const double r = exp(clampd(d, -20.0, 20.0));
      const double dr = (d >= -20.0 && d <= 20.0) ? r : 0.0;
      const ClipParams cp = clip_params(p);
      const double lo = 1.0 - cp.clip_ratio_low, hi = 1.0 + cp.clip_ratio_high;
      const double pg1 = -adv * r, pg2 = -adv * clampd(r, lo, hi);
      double v, g;
      if (pg2 > pg1) {  // the clipped branch is the max: constant in logp
        v = pg2;
        g = (r >= lo && r <= hi) ? -adv * dr : 0.0;
        out.clip |= 1 | (r < lo ? 2 : 0) | (r > hi ? 4 : 0);
      } else {
        v = pg1;
        g = -adv * dr;
      }
      if (adv < 0.0) {
        const double pg3 = -adv * cp.clip_ratio_c;
        if (v > pg3) {  // dual clip
          v = pg3;
          g = 0.0;
        }
      }
      out.value = v * w_tis;
      out.grad = g * w_tis;
      break;
    }
    case LossType::kGspo: {
      // Sequence ratio s = exp(min(sg(s_hat) + logp - sg(logp), 10)): value exp(min(s_hat, 10)),
      // d s / d logp = s while s_hat <= 10. Then PPO's clip on s.
      const double s_hat = rec[kSlotAux], s = rec[kSlotCoef];
      const double ds = s_hat > 10.0 ? 0.0 : s;  // NaN propagates
      const ClipParams cp = clip_params(p);
      const double lo = 1.0 - cp.clip_ratio_low, hi = 1.0 + cp.clip_ratio_high;
      const double pg1 = -adv * s, pg2 = -adv * clampd(s, lo, hi);
      if (pg2 > pg1) {
        out.value = pg2;
        out.grad = (s >= lo && s <= hi) ? -adv * ds : 0.0;
        out.clip |= 1 | (s < lo ? 2 : 0) | (s > hi ? 4 : 0);
      } else {
        out.value = pg1;
        out.grad = -adv * ds;
      }
      out.value *= w_tis;
      out.grad *= w_tis;
      break;
    }
    case LossType::kSapo: {
      // Soft gate f(r) = 4 sigma(tau (r - 1)) / tau, tau by the sign of this token's own advantage
      // (tau_pos if A_t > 0, else tau_neg), as veRL's compute_policy_loss_sapo.
      const double d = logp - (double)old_f;
      const double r = exp(clampd(d, -20.0, 20.0));
      const double dr = (d >= -20.0 && d <= 20.0) ? r : 0.0;
      const SapoParams sp = sapo_params(p);
      const double tau = adv > 0.0 ? sp.tau_pos : sp.tau_neg;
      const double sig = 1.0 / (1.0 + exp(-tau * (r - 1.0)));
      const double scale = 4.0 / tau;
      out.value = -scale * sig * adv * w_tis;
      out.grad = -scale * sig * (1.0 - sig) * tau * dr * adv * w_tis;
      break;
    }
    case LossType::kCispo: {
      // L = -sg(clamp(r, 1 - eps_low, 1 + eps_high)) * A * logp.
      const double d = logp - (double)old_f;
      const double r = exp(d);
      const ClipParams cp = clip_params(p);
      const double lo = 1.0 - cp.clip_ratio_low, hi = 1.0 + cp.clip_ratio_high;
      const double rc = clampd(r, lo, hi);
      if (r < lo || r > hi) out.clip |= 1 | (r < lo ? 2 : 0) | (r > hi ? 4 : 0);
      out.value = -rc * adv * logp * w_tis;
      out.grad = -rc * adv * w_tis;
      break;
    }
    default:
      break;
  }
  return out;
}

// Aggregation weight a_i of every token of sequence i (phase C). denom is the normaliser:
// counted tokens (token-mean), non-empty sequences (seq-mean-*), or norm_len (sum-norm),
// unless the caller's `norm` overrides it.
VESPO_HD double agg_weight(Agg agg, double denom, double count) {
  if (count <= 0.0) return 0.0;
  switch (agg) {
    case Agg::kSeqMeanTokenMean:
      return 1.0 / (denom * (count + 1e-8));
    default:
      return 1.0 / denom;
  }
}

}  // namespace vespo
