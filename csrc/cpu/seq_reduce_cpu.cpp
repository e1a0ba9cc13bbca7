// CPU sequence reduction (phases A-D of seq_reduce, see params.h): per-sequence statistics and
// per-token loss terms in parallel over sequences, then a serial, fixed-order combine.
#include <stdexcept>
#include <string>

#include "cpu_common.h"
#include "vespo/accum.h"
#include "vespo/kernels.h"

namespace vespo {
namespace cpu {
namespace {

// Phases A and B for one sequence: fills its record and writes the raw dL_t/dlogp_t.
void reduce_one(const SeqParams& p, int64_t i, double* rec) {
  for (int k = 0; k < kSeqStride; ++k) rec[k] = 0.0;
  const int64_t b = p.cu_seqlens[i], e = p.cu_seqlens[i + 1];
  bool first = true;
  for (int64_t t = b; t < e; ++t) {
    if (!counted(p.mask, t)) continue;
    const TokenStats st = token_stats(p.logp[t], p.old_logp[t], p.is_weights, t);
    rec[kSlotCount] += 1.0;
    rec[kSlotLogRatio] += st.log_ratio;
    rec[kSlotLogTis] += st.log_tis;
    rec[kSlotKl] += st.kl;
    if (first) {
      rec[kSlotAdvSign] = p.adv_per_token ? p.adv[t] : p.adv[i];
      first = false;
    }
  }
  seq_coef(p, rec);
  for (int64_t t = b; t < e; ++t) {
    if (!counted(p.mask, t)) {
      p.dlogp[t] = 0.f;
      continue;
    }
    const double adv = p.adv_per_token ? p.adv[t] : p.adv[i];
    const TokenLoss tl = token_loss(p, rec, p.logp[t], p.old_logp[t], adv, p.is_weights, t);
    p.dlogp[t] = (float)tl.grad;
    rec[kSlotLossSum] += tl.value;
    rec[kSlotClip] += (tl.clip & 1) ? 1.0 : 0.0;
    rec[kSlotClipLow] += (tl.clip & 2) ? 1.0 : 0.0;
    rec[kSlotClipHigh] += (tl.clip & 4) ? 1.0 : 0.0;
  }
}

}  // namespace

void seq_reduce(const SeqParams& p) {
  const std::string where = "vespo_ext._core.seq_reduce: ";
  if (p.T < 0 || p.S < 0) throw std::invalid_argument(where + "T and S must be >= 0");
  if (!p.cu_seqlens || !p.loss_out || !p.metrics || !p.seq_ws)
    throw std::invalid_argument(where + "cu_seqlens, loss, metrics and workspace are required");
  if (p.T > 0 && (!p.logp || !p.old_logp || !p.adv || !p.dlogp))
    throw std::invalid_argument(where + "logp, old_logp, advantages and dlogp are required");
  // Cheap structural check of cu_seqlens (the Python layer validated it already).
  if (p.cu_seqlens[0] != 0 || p.cu_seqlens[p.S] != p.T)
    throw std::invalid_argument(where + "cu_seqlens must start at 0 and end at T=" + std::to_string(p.T));
  for (int64_t i = 0; i < p.S; ++i)
    if (p.cu_seqlens[i + 1] < p.cu_seqlens[i])
      throw std::invalid_argument(where + "cu_seqlens must be non-decreasing (index " + std::to_string(i + 1) + ")");

  // Phases A + B, parallel over sequences (each sequence is owned by one thread).
  const int64_t avg_len = p.S > 0 ? p.T / p.S + 1 : 1;
  const int64_t grain = (int64_t(1) << 14) / avg_len + 1;  // >= ~16K tokens per thread
  parallel_for(p.S, p.num_threads, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) reduce_one(p, i, p.seq_ws + i * kSeqStride);
  });

  // Phase C: fixed-order combine.
  Accum acc;
  accum_init(acc);
  for (int64_t i = 0; i < p.S; ++i)
    accum_add(acc, p.seq_ws + i * kSeqStride, (double)(p.cu_seqlens[i + 1] - p.cu_seqlens[i]));
  const double denom = accum_finalize(p, acc);

  // Phase D: apply each sequence's aggregation weight.
  parallel_for(p.S, p.num_threads, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      double* rec = p.seq_ws + i * kSeqStride;
      const double a = agg_weight(p.agg, denom, rec[kSlotCount]);
      rec[kSlotAggWeight] = a;
      for (int64_t t = p.cu_seqlens[i]; t < p.cu_seqlens[i + 1]; ++t) p.dlogp[t] = (float)(p.dlogp[t] * a);
    }
  });
}

}  // namespace cpu
}  // namespace vespo
