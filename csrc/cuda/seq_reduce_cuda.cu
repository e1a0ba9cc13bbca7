// CUDA sequence reduction (seq_reduce, see params.h), entirely on device and without host syncs:
//   kernel A (grid S): phases A + B of one sequence per block -> its record in seq_ws and the raw
//                      dL_t/dlogp_t of its tokens,
//   kernel C (1 block): fixed-order combine of all records (Accum tree) -> loss, metrics, the
//                      aggregation denominator, and each record's kSlotAggWeight,
//   kernel D (grid S): dlogp_t *= a_i.
// No float atomics: every sum has a fixed shape (strided per-thread order, then a fixed tree), so
// results are bitwise reproducible run to run.
#include <climits>
#include <string>

#include "common.cuh"
#include "vespo/accum.h"
#include "vespo/kernels.h"

namespace vespo {
namespace cuda {
namespace {

using detail::block_allreduce;
using detail::MinOp;
using detail::SumOp;

// Token range [b, e) of sequence i, clamped to [0, T] so that a malformed cu_seqlens cannot make a
// kernel read or write out of bounds (the caller validates it; this is only a guard).
__device__ __forceinline__ void seq_bounds(const SeqParams& p, int64_t i, int64_t& b, int64_t& e) {
  b = p.cu_seqlens[i];
  e = p.cu_seqlens[i + 1];
  b = b < 0 ? 0 : (b > p.T ? p.T : b);
  e = e < b ? b : (e > p.T ? p.T : e);
}

// ---- Kernel A: one block per sequence ----------------------------------------------------------
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) seq_stats_kernel(const SeqParams p) {
  static_assert(BLOCK >= kSeqStride, "the record is written by threads 0..kSeqStride-1");
  __shared__ double red[4][BLOCK / 32];
  __shared__ long long red_first[1][BLOCK / 32];
  __shared__ double rec[kSeqStride];

  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x;
  int64_t b, e;
  seq_bounds(p, i, b, e);

  // Phase A: count, sum log-ratio, sum log-TIS, sum KL; each thread walks t = b + tid, + BLOCK, ...
  double a[4] = {0.0, 0.0, 0.0, 0.0};
  long long first[1] = {LLONG_MAX};  // the thread's first counted token = its smallest one
  for (int64_t t = b + tid; t < e; t += BLOCK) {
    if (!counted(p.mask, t)) continue;
    if (first[0] == LLONG_MAX) first[0] = t;
    const TokenStats st = token_stats(p.logp[t], p.old_logp[t], p.is_weights, t);
    a[0] += 1.0;
    a[1] += st.log_ratio;
    a[2] += st.log_tis;
    a[3] += st.kl;
  }
  block_allreduce<BLOCK>(a, red, SumOp());
  block_allreduce<BLOCK>(first, red_first, MinOp());

  if (tid == 0) {
#pragma unroll
    for (int k = 0; k < kSeqStride; ++k) rec[k] = 0.0;
    rec[kSlotCount] = a[0];
    rec[kSlotLogRatio] = a[1];
    rec[kSlotLogTis] = a[2];
    rec[kSlotKl] = a[3];
    if (first[0] != LLONG_MAX)
      rec[kSlotAdvSign] = static_cast<double>(p.adv_per_token ? p.adv[first[0]] : p.adv[i]);
    seq_coef(p, rec);  // fills kSlotLogW and kSlotCoef
  }
  __syncthreads();  // rec is read by every thread below

  // Phase B: per-token loss terms and the raw gradient (before the aggregation weight).
  const double adv_seq = (!p.adv_per_token && a[0] > 0.0) ? static_cast<double>(p.adv[i]) : 0.0;
  double bsum[4] = {0.0, 0.0, 0.0, 0.0};  // loss, clip, clip low, clip high
  for (int64_t t = b + tid; t < e; t += BLOCK) {
    if (!counted(p.mask, t)) {
      p.dlogp[t] = 0.f;
      continue;
    }
    const double adv = p.adv_per_token ? static_cast<double>(p.adv[t]) : adv_seq;
    const TokenLoss tl = token_loss(p, rec, p.logp[t], p.old_logp[t], adv, p.is_weights, t);
    p.dlogp[t] = static_cast<float>(tl.grad);
    bsum[0] += tl.value;
    bsum[1] += (tl.clip & 1) ? 1.0 : 0.0;
    bsum[2] += (tl.clip & 2) ? 1.0 : 0.0;
    bsum[3] += (tl.clip & 4) ? 1.0 : 0.0;
  }
  block_allreduce<BLOCK>(bsum, red, SumOp());  // its barriers also end all reads of rec above

  if (tid == 0) {
    rec[kSlotLossSum] = bsum[0];
    rec[kSlotClip] = bsum[1];
    rec[kSlotClipLow] = bsum[2];
    rec[kSlotClipHigh] = bsum[3];
    rec[kSlotAggWeight] = 0.0;  // set by kernel C
  }
  __syncthreads();
  if (tid < kSeqStride) p.seq_ws[i * kSeqStride + tid] = rec[tid];
}

// ---- Kernel C: one block combines all records ---------------------------------------------------
constexpr int kCombineBlock = 128;  // 128 Accums of 29 doubles = 29.7 KB of shared memory

__global__ void __launch_bounds__(kCombineBlock) seq_combine_kernel(const SeqParams p) {
  __shared__ Accum acc[kCombineBlock];
  __shared__ double sh_denom;
  const int tid = threadIdx.x;

  // Thread j folds sequences j, j + 128, j + 256, ... in order.
  Accum a;
  accum_init(a);
  for (int64_t i = tid; i < p.S; i += kCombineBlock) {
    int64_t b, e;
    seq_bounds(p, i, b, e);
    accum_add(a, p.seq_ws + i * kSeqStride, static_cast<double>(e - b));
  }
  acc[tid] = a;
  __syncthreads();
  // Fixed tree: acc[j] <- acc[j] (+) acc[j + o] for o = 64, 32, ..., 1 (higher index into lower).
#pragma unroll
  for (int o = kCombineBlock / 2; o > 0; o >>= 1) {
    if (tid < o) accum_merge(acc[tid], acc[tid + o]);
    __syncthreads();
  }
  if (tid == 0) {
    const double denom = accum_finalize(p, acc[0]);  // writes *loss_out and metrics[]
    sh_denom = denom;
    p.seq_ws[p.S * kSeqStride + kSlotAggWeight] = denom;  // global record: the denominator (informative)
  }
  __syncthreads();
  const double denom = sh_denom;
  for (int64_t i = tid; i < p.S; i += kCombineBlock) {
    double* rec = p.seq_ws + i * kSeqStride;
    rec[kSlotAggWeight] = agg_weight(p.agg, denom, rec[kSlotCount]);
  }
}

// ---- Kernel D: apply the aggregation weight ----------------------------------------------------
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) seq_scale_kernel(const SeqParams p) {
  const int64_t i = blockIdx.x;
  const double* rec = p.seq_ws + i * kSeqStride;
  if (!(rec[kSlotCount] > 0.0)) return;  // no counted token: kernel A already wrote zeros
  const double w = rec[kSlotAggWeight];
  int64_t b, e;
  seq_bounds(p, i, b, e);
  for (int64_t t = b + threadIdx.x; t < e; t += BLOCK) {
    const float g = p.dlogp[t];
    // Uncounted tokens hold an exact 0 and stay 0 even if w is inf/NaN (e.g. norm = 0).
    if (g != 0.f) p.dlogp[t] = static_cast<float>(static_cast<double>(g) * w);
  }
}

// Threads per sequence block, from the average sequence length (any choice is deterministic for
// the given shapes; it only changes which fixed order the sums use).
int pick_seq_block(int64_t T, int64_t S) {
  const int64_t avg = S > 0 ? T / S : 0;
  return avg >= 2048 ? 512 : (avg >= 256 ? 256 : 64);
}

}  // namespace

void seq_reduce(const SeqParams& p) {
  using detail::require;
  using std::to_string;
  const char* fn = "seq_reduce";
  require(p.T >= 0, fn, "T must be >= 0, got " + to_string(p.T));
  require(p.S >= 0, fn, "S must be >= 0, got " + to_string(p.S));
  require(p.S <= INT32_MAX, fn, "S must be < 2^31, got " + to_string(p.S));
  require(p.S > 0 || p.T == 0, fn, "S == 0 requires T == 0");
  require(p.loss_out != nullptr, fn, "loss_out is required");
  require(p.metrics != nullptr, fn, "metrics is required");
  require(p.seq_ws != nullptr, fn, "seq_ws (workspace of (S+1)*kSeqStride doubles) is required");
  if (p.S > 0) require(p.cu_seqlens != nullptr, fn, "cu_seqlens is required");
  if (p.T > 0) {  // with T == 0 no token is counted, so none of these is ever read
    require(p.adv != nullptr, fn, "adv is required");
    require(p.logp != nullptr, fn, "logp is required");
    require(p.old_logp != nullptr, fn, "old_logp is required");
    require(p.dlogp != nullptr, fn, "dlogp is required");
  }
  detail::ensure_device();
  const cudaStream_t stream = detail::as_stream(p.stream);

  const int block = pick_seq_block(p.T, p.S);
  const dim3 grid(static_cast<unsigned>(p.S));
  if (p.S > 0) {
    detail::with_block<512, 256, 64>(block, [&](auto b) {
      seq_stats_kernel<decltype(b)::value><<<grid, decltype(b)::value, 0, stream>>>(p);
    });
    detail::check_launch("seq_stats_kernel");
  }
  seq_combine_kernel<<<1, kCombineBlock, 0, stream>>>(p);
  detail::check_launch("seq_combine_kernel");
  if (p.S > 0) {
    detail::with_block<512, 256, 64>(block, [&](auto b) {
      seq_scale_kernel<decltype(b)::value><<<grid, decltype(b)::value, 0, stream>>>(p);
    });
    detail::check_launch("seq_scale_kernel");
  }
}

}  // namespace cuda
}  // namespace vespo
