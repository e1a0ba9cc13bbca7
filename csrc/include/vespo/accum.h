// Combine per-sequence records into the scalar loss, the aggregation denominator and the metrics
// (phase C of seq_reduce). `add` folds one record in, `merge` joins two partial results; both are
// used in a fixed order by the CPU (a loop) and CUDA (a fixed-shape tree) so results are bitwise
// reproducible run to run.
#pragma once
#include "vespo/math.h"

namespace vespo {

struct Accum {
  double n_tok, n_seq, kl, loss_sum, loss_sum_len, max_len;
  double w_mean, w_m2, w_max, w_min;  // Welford over non-empty sequences
  double logw_sum, logw_max, logw_min;
  double coef_sum, coef_max, coef_min;
  double coef_pos, coef_neg, w_pos, w_neg, n_pos, n_neg, n_w_gt_100;
  double tis_sum, tis_max, tis_min;
  double clip, clip_low, clip_high;
};

VESPO_HD void accum_init(Accum& a) {
  a.n_tok = a.n_seq = a.kl = a.loss_sum = a.loss_sum_len = a.max_len = 0.0;
  a.w_mean = a.w_m2 = 0.0;
  a.w_max = a.logw_max = a.coef_max = a.tis_max = -INFINITY;
  a.w_min = a.logw_min = a.coef_min = a.tis_min = INFINITY;
  a.logw_sum = a.coef_sum = 0.0;
  a.coef_pos = a.coef_neg = a.w_pos = a.w_neg = a.n_pos = a.n_neg = a.n_w_gt_100 = 0.0;
  a.tis_sum = a.clip = a.clip_low = a.clip_high = 0.0;
}

VESPO_HD double dmax(double a, double b) { return a > b ? a : b; }
VESPO_HD double dmin(double a, double b) { return a < b ? a : b; }

VESPO_HD void accum_add(Accum& a, const double* rec, double seq_len) {
  a.max_len = dmax(a.max_len, seq_len);
  const double cnt = rec[kSlotCount];
  if (cnt <= 0.0) return;
  a.n_tok += cnt;
  a.kl += rec[kSlotKl];
  a.loss_sum += rec[kSlotLossSum];
  a.loss_sum_len += rec[kSlotLossSum] / (cnt + 1e-8);
  a.clip += rec[kSlotClip];
  a.clip_low += rec[kSlotClipLow];
  a.clip_high += rec[kSlotClipHigh];
  const double logw = rec[kSlotLogW], w = exp(logw), coef = rec[kSlotCoef];
  a.n_seq += 1.0;
  const double delta = w - a.w_mean;
  a.w_mean += delta / a.n_seq;
  a.w_m2 += delta * (w - a.w_mean);
  a.w_max = dmax(a.w_max, w);
  a.w_min = dmin(a.w_min, w);
  a.logw_sum += logw;
  a.logw_max = dmax(a.logw_max, logw);
  a.logw_min = dmin(a.logw_min, logw);
  a.coef_sum += coef;
  a.coef_max = dmax(a.coef_max, coef);
  a.coef_min = dmin(a.coef_min, coef);
  const double adv = rec[kSlotAdvSign];
  if (adv > 0.0) { a.n_pos += 1.0; a.coef_pos += coef; a.w_pos += w; }
  if (adv < 0.0) { a.n_neg += 1.0; a.coef_neg += coef; a.w_neg += w; }
  if (w > 100.0) a.n_w_gt_100 += 1.0;
  const double tis = rec[kSlotLogTis];
  a.tis_sum += tis;
  a.tis_max = dmax(a.tis_max, tis);
  a.tis_min = dmin(a.tis_min, tis);
}

VESPO_HD void accum_merge(Accum& a, const Accum& b) {
  a.max_len = dmax(a.max_len, b.max_len);
  if (b.n_seq <= 0.0) return;
  if (a.n_seq <= 0.0) {
    const double ml = a.max_len;
    a = b;
    a.max_len = ml;
    return;
  }
  const double n = a.n_seq + b.n_seq, delta = b.w_mean - a.w_mean;
  a.w_m2 += b.w_m2 + delta * delta * (a.n_seq * b.n_seq / n);
  a.w_mean += delta * (b.n_seq / n);
  a.n_seq = n;
  a.n_tok += b.n_tok; a.kl += b.kl; a.loss_sum += b.loss_sum; a.loss_sum_len += b.loss_sum_len;
  a.clip += b.clip; a.clip_low += b.clip_low; a.clip_high += b.clip_high;
  a.w_max = dmax(a.w_max, b.w_max); a.w_min = dmin(a.w_min, b.w_min);
  a.logw_sum += b.logw_sum;
  a.logw_max = dmax(a.logw_max, b.logw_max); a.logw_min = dmin(a.logw_min, b.logw_min);
  a.coef_sum += b.coef_sum;
  a.coef_max = dmax(a.coef_max, b.coef_max); a.coef_min = dmin(a.coef_min, b.coef_min);
  a.coef_pos += b.coef_pos; a.coef_neg += b.coef_neg; a.w_pos += b.w_pos; a.w_neg += b.w_neg;
  a.n_pos += b.n_pos; a.n_neg += b.n_neg; a.n_w_gt_100 += b.n_w_gt_100;
  a.tis_sum += b.tis_sum;
  a.tis_max = dmax(a.tis_max, b.tis_max); a.tis_min = dmin(a.tis_min, b.tis_min);
}

// The aggregation denominator: the caller's norm if given, else the mode's natural one.
VESPO_HD double agg_denominator(const SeqParams& p, const Accum& a) {
  if (p.norm != nullptr) return (double)*p.norm;
  switch (p.agg) {
    case Agg::kTokenMean: return dmax(a.n_tok, 1.0);
    case Agg::kSeqMeanTokenSumNorm: return p.norm_len > 0.0 ? p.norm_len : dmax(a.max_len, 1.0);
    default: return dmax(a.n_seq, 1.0);
  }
}

// Writes the loss and the metrics; returns the aggregation denominator.
VESPO_HD double accum_finalize(const SeqParams& p, const Accum& a) {
  const double denom = agg_denominator(p, a);
  const double num = p.agg == Agg::kSeqMeanTokenMean ? a.loss_sum_len : a.loss_sum;
  *p.loss_out = a.n_seq > 0.0 ? (float)(num / denom) : 0.0f;
  float* m = p.metrics;
  const double ns = a.n_seq, has = ns > 0.0 ? 1.0 : 0.0, nsd = dmax(ns, 1.0);
  const double nt = dmax(a.n_tok, 1.0);
  m[kApproxKl] = (float)(a.kl / nt);
  m[kWSeqMean] = (float)(a.w_mean * has);
  m[kWSeqMax] = (float)(has > 0.0 ? a.w_max : 0.0);
  m[kWSeqMin] = (float)(has > 0.0 ? a.w_min : 0.0);
  m[kWSeqStd] = (float)(ns > 1.0 ? sqrt(dmax(a.w_m2, 0.0) / (ns - 1.0)) : 0.0);
  m[kLogWSeqMean] = (float)(a.logw_sum / nsd);
  m[kLogWSeqMax] = (float)(has > 0.0 ? a.logw_max : 0.0);
  m[kLogWSeqMin] = (float)(has > 0.0 ? a.logw_min : 0.0);
  m[kPhiMean] = (float)(a.coef_sum / nsd);
  m[kPhiMax] = (float)(has > 0.0 ? a.coef_max : 0.0);
  m[kPhiMin] = (float)(has > 0.0 ? a.coef_min : 0.0);
  m[kPhiPosMean] = (float)(a.coef_pos / dmax(a.n_pos, 1.0));
  m[kPhiNegMean] = (float)(a.coef_neg / dmax(a.n_neg, 1.0));
  m[kWPosMean] = (float)(a.w_pos / dmax(a.n_pos, 1.0));
  m[kWNegMean] = (float)(a.w_neg / dmax(a.n_neg, 1.0));
  m[kNPos] = (float)a.n_pos;
  m[kNNeg] = (float)a.n_neg;
  m[kFracWGt100] = (float)(a.n_w_gt_100 / nsd);
  m[kNSeq] = (float)ns;
  m[kNTokens] = (float)a.n_tok;
  m[kTisLogMean] = (float)(a.tis_sum / nsd);
  m[kTisLogMax] = (float)(has > 0.0 ? a.tis_max : 0.0);
  m[kTisLogMin] = (float)(has > 0.0 ? a.tis_min : 0.0);
  m[kClipFrac] = (float)(a.clip / nt);
  m[kClipFracLow] = (float)(a.clip_low / nt);
  m[kClipFracHigh] = (float)(a.clip_high / nt);
  return denom;
}

}  // namespace vespo
