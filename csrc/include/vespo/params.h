// Plain, framework-free parameter structs shared by the CPU and CUDA kernels.
//
// Three launches make up one policy-loss forward + backward:
//   1. logprob_fwd  — one read of each logits row: log-softmax at the label (and entropy).
//   2. seq_reduce   — per-sequence reduction: s_i, W_i, phi_i (or the baseline losses' per-token
//                     terms), the aggregation weights, the scalar loss, dloss/dlogp and the metrics.
//   3. logprob_bwd  — one read of each logits row and one write of the gradient:
//                     dloss/dz_{t,v} = g * dlogp_t * (1[v = y_t] - p_{t,v}) / tau.
// All pointers are raw device (or host) pointers; no framework types cross this boundary.
#pragma once
#include <cstdint>

namespace vespo {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class Agg : int32_t {
  kTokenMean = 0,            // sum_t m L / max(sum m, 1)
  kSeqMeanTokenSum = 1,      // mean over non-empty sequences of sum_t m L
  kSeqMeanTokenMean = 2,     // mean over non-empty sequences of sum_t m L / (sum_t m + 1e-8)
  kSeqMeanTokenSumNorm = 3,  // sum_i sum_t m L / norm_len
};

enum class LossType : int32_t { kVespo = 0, kGrpo = 1, kGspo = 2, kSapo = 3, kCispo = 4 };

// Indices into the metrics vector written by seq_reduce (float32, kNumMetrics entries).
enum Metric : int32_t {
  kApproxKl = 0,     // token-mean of (old_logp - logp) over counted tokens
  kWSeqMean, kWSeqMax, kWSeqMin, kWSeqStd,  // W over non-empty sequences (std unbiased, 0 if < 2)
  kLogWSeqMean, kLogWSeqMax, kLogWSeqMin,   // clamped log W
  kPhiMean, kPhiMax, kPhiMin,               // the per-sequence coefficient (phi for VESPO)
  kPhiPosMean, kPhiNegMean, kWPosMean, kWNegMean,  // over sequences with A > 0 / A < 0
  kNPos, kNNeg,                             // counts of non-empty sequences with A > 0 / A < 0
  kFracWGt100,                              // fraction of non-empty sequences with W > 100
  kNSeq, kNTokens,                          // non-empty sequences, counted tokens
  kTisLogMean, kTisLogMax, kTisLogMin,      // per-sequence sum of clamped log TIS weights
  kClipFrac,                                // clipped losses: fraction of counted tokens clipped
  kClipFracLow, kClipFracHigh,              // ... below 1 - eps_low / above 1 + eps_high
  kNumMetrics
};

// Loss hyper-parameters, interpreted per loss type (see math.h):
//   vespo: p[0]=k_pos p[1]=lambda_pos p[2]=k_neg p[3]=lambda_neg
//   grpo : p[0]=clip_ratio_low p[1]=clip_ratio_high p[2]=clip_ratio_c
//   gspo : p[0]=clip_ratio_low p[1]=clip_ratio_high
//   sapo : p[0]=tau_pos p[1]=tau_neg
//   cispo: p[0]=clip_ratio_low p[1]=clip_ratio_high
constexpr int kMaxLossParams = 6;

struct LogprobParams {
  // Logits: T rows of V entries, unit stride along V, row_stride elements between rows.
  const void* logits = nullptr;
  DType dtype = DType::kFloat32;
  int64_t T = 0;
  int64_t V = 0;
  int64_t row_stride = 0;
  const int64_t* labels = nullptr;  // (T,)
  const uint8_t* mask = nullptr;    // (T,) optional; rows with mask 0 are skipped (fwd: 0, bwd: 0)
  int64_t ignore_index = -100;      // label value that yields logp 0 without error when unmasked
  float inv_temperature = 1.f;

  // Forward outputs (float32, (T,)): logp at the label, logsumexp of z/tau, optional entropy.
  float* logp = nullptr;
  float* lse = nullptr;
  float* entropy = nullptr;  // optional
  // Optional, both or neither: the row's max raw logit m_t and log s_t, s_t = sum_v e^{(z_v - m_t)/tau}
  // (so lse = m_t / tau + log s_t). Given to the backward, it forms p_v = exp((z_v - m_t)/tau - log s_t),
  // which keeps full accuracy when all logits are shifted by a large constant (lse alone does not).
  float* row_max = nullptr;
  float* log_sum = nullptr;
  // Forward error report: set to (row index + 1) of a counted row whose label is outside [0, V)
  // (and not ignore_index); the smallest such row on CPU, some such row on CUDA. 0 = no error.
  int64_t* bad_label_row = nullptr;

  // Backward inputs/outputs. The backward also reads what the forward wrote: row_max and log_sum
  // when given (else lse); the label's own logit is never re-read (its term is computed as the sum
  // of the other probabilities).
  // The CUDA v2 backward (VESPO_CUDA_KERNELS=v2*) takes the label's term c (1 - p_y) from logp
  // instead, as -c expm1(logp[t]): logp must be the forward's own, at the same temperature and mask.
  const float* dlogp = nullptr;       // (T,) dloss/dlogp_t (already includes mask and agg weight)
  const float* grad_scale = nullptr;  // optional 0-d upstream gradient (device scalar); 1 if null
  void* grad = nullptr;               // (T, V) with grad_row_stride, dtype == dtype; may alias logits
  int64_t grad_row_stride = 0;

  int num_threads = 1;     // CPU only
  void* stream = nullptr;  // CUDA only: cudaStream_t
};

struct SeqParams {
  int64_t T = 0;  // tokens
  int64_t S = 0;  // sequences
  const int64_t* cu_seqlens = nullptr;  // (S+1,), 0 = cu[0] <= ... <= cu[S] = T
  const float* logp = nullptr;          // (T,)
  const float* old_logp = nullptr;      // (T,)
  const float* adv = nullptr;           // (S,) or (T,)
  bool adv_per_token = false;
  const uint8_t* mask = nullptr;        // (T,) optional, nonzero = counted
  const float* is_weights = nullptr;    // (T,) optional TIS weights

  LossType loss = LossType::kVespo;
  double p[kMaxLossParams] = {0, 0, 0, 0, 0, 0};
  Agg agg = Agg::kTokenMean;
  const float* norm = nullptr;  // optional 0-d normaliser overriding the agg denominator
  double norm_len = 0;          // seq-mean-token-sum-norm default; <= 0 means max sequence length

  // Outputs.
  float* loss_out = nullptr;  // 0-d
  float* dlogp = nullptr;     // (T,) dloss/dlogp_t
  float* metrics = nullptr;   // (kNumMetrics,)
  // Scratch: kSeqStride doubles per sequence plus one global record
  // (caller allocates (S + 1) * kSeqStride doubles; contents on entry do not matter).
  double* seq_ws = nullptr;

  int num_threads = 1;
  void* stream = nullptr;
};

// Per-sequence scratch record layout (doubles).
enum SeqSlot : int32_t {
  kSlotCount = 0,   // counted tokens
  kSlotLogRatio,    // sum m * clamp(logp - old, +-20)
  kSlotLogTis,      // sum m * clamp(log max(w, 1e-8), +-20)
  kSlotKl,          // sum m * (old - logp)
  kSlotAdvSign,     // advantage of the first counted token (sign picks the parameters)
  kSlotLossSum,     // sum m * L_t (before aggregation)
  kSlotCoef,        // per-sequence coefficient (phi for VESPO, exp(min(s_hat, 10)) for GSPO, else 1)
  kSlotLogW,        // clamped log W = clamp(sum log-ratio + sum log-TIS, +-20), every loss
  kSlotClip, kSlotClipLow, kSlotClipHigh,  // clipped-token counts
  kSlotAggWeight,   // a_i: the aggregation weight of this sequence's tokens
  kSlotAux,         // GSPO: s_hat, the unclamped mean of (logp - old) over the sequence
  kSeqStride
};

}  // namespace vespo
