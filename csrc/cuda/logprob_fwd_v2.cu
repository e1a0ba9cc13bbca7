// CUDA forward of the per-token log-prob, second generation (v2; chosen at run time, see
// logprob_host.cuh). The same result definition and summation scheme as v1 (softmax_state.cuh: the
// max terms counted in n, a pairwise tree per fold batch), with:
//   - the first batch of logits, the mask byte and the label loaded together before any branch
//     (v1 waited for the mask, then the label, before its first logits load);
//   - two 16-byte vectors per fold batch (8 fp32 or 16 16-bit logits) and
//     __launch_bounds__(BLOCK, 2048 / BLOCK): at most 32 registers, 4 blocks of 512 threads per SM;
//   - the batch max of 16-bit logits taken on packed pairs (__hmax2), 1 instruction per 2 elements;
//   - the final merge of the NW warp states as a shuffle tree in warp 0 instead of a serial fold;
//   - the exponential as a template (PolyExp, MufuExp, SplitExp), picked per launch.
// tests/cuda_host/fwd_sum_check.cu replays this order (two vectors per batch, the warp-0 tree) on the host.
#include "common.cuh"
#include "logprob_host.cuh"
#include "softmax_state.cuh"
#include "vespo/math.h"

namespace vespo {
namespace cuda {
namespace {

using detail::Elem;
using detail::merge;
using detail::row_head;
using detail::Scale2;
using detail::SmState;

// Two 16-byte vectors per thread per step (a fold batch of 8 fp32 or 16 16-bit logits): with 4
// blocks of 512 threads that keeps 64 KB per SM in flight; four vectors (v1) do not fit 32 registers
// once the first batch is held across the mask/label checks.
constexpr int U2 = 2;

// max over the batch's raw 16-byte vectors, as fp32. 16-bit types: on packed pairs (__hmax2, NaNs
// ignored like fmaxf), then the two halves; the value is exactly the fp32 max of the unpacked batch.
template <typename T, int U>
__device__ __forceinline__ float batch_max(const uint4 (&raw)[U], const float* z) {
  if constexpr (std::is_same_v<T, float>) {
    float m = z[0];
#pragma unroll
    for (int j = 1; j < 4 * U; ++j) m = fmaxf(m, z[j]);
    return m;
  } else {
    using T2 = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(raw);
    T2 m = detail::bit_cast<T2>(w[0]);
#pragma unroll
    for (int k = 1; k < 4 * U; ++k) m = __hmax2(m, detail::bit_cast<T2>(w[k]));
    const float2 f = std::is_same_v<T, __half> ? __half22float2(detail::bit_cast<__half2>(m))
                                               : __bfloat1622float2(detail::bit_cast<__nv_bfloat162>(m));
    return fmaxf(f.x, f.y);
  }
}

template <typename T, int BLOCK, bool ENT, class X>
__global__ void __launch_bounds__(BLOCK, 2048 / BLOCK) logprob_fwd_v2_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec, U = U2, NW = BLOCK / 32;
  static_assert(NW <= 32, "the final merge is one warp");
  __shared__ SmState sh[NW];

  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int V = static_cast<int>(p.V);
  const T* row = static_cast<const T*>(p.logits) + t * p.row_stride;
  const int head = row_head<T>(row, V);
  const int nvec = (V - head) / VEC;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);  // 16-byte aligned

  // One round trip for everything the row needs first: the first batch, the mask byte, the label.
  // (A masked row thus reads one batch per thread it does not need: 16 elements of ~300 per thread
  // at V = 151936.)
  int i = tid;
  bool full = i + (U - 1) * BLOCK < nvec;
  uint4 raw[U];
  if (full) {
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = __ldcs(vrow + i + u * BLOCK);
  }
  const bool cnt = counted(p.mask, t);
  const int64_t y = p.labels[t];

  if (!cnt) {  // uniform over the block: nobody reaches a barrier
    if (tid == 0) detail::write_masked_row<ENT>(p, t);
    return;
  }
  const bool has_label = y != p.ignore_index && y >= 0 && y < V;
  float zy = 0.f;
  if (tid == 0 && has_label) zy = E::load1(row + y);  // latency hidden by the loop

  const Scale2 c2 = detail::make_c2(p.inv_temperature);
  SmState st{-INFINITY, 0.f, 0.f, 0.f};

  // Per-thread order is fixed (head, batches ascending, single vectors, tail): deterministic.
  if (tid < head) {
    const float z[1] = {E::load1(row + tid)};
    detail::fold<1, ENT, X>(st, z, c2);
  }
  while (full) {
    float z[U * VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) E::unpack(raw[u], z + u * VEC);
    const float zm = batch_max<T, U>(raw, z);
    detail::fold_max<U * VEC, ENT, X>(st, z, zm, c2);
    i += U * BLOCK;
    full = i + (U - 1) * BLOCK < nvec;
    if (full) {
#pragma unroll
      for (int u = 0; u < U; ++u) raw[u] = __ldcs(vrow + i + u * BLOCK);
    }
  }
  for (; i < nvec; i += BLOCK) {
    float z[VEC];
    E::unpack(__ldcs(vrow + i), z);
    detail::fold<VEC, ENT, X>(st, z, c2);
  }
  const int tail0 = head + nvec * VEC;
  if (tail0 + tid < V) {
    const float z[1] = {E::load1(row + tail0 + tid)};
    detail::fold<1, ENT, X>(st, z, c2);
  }

  // Fixed-shape reduction: shfl-down tree in every warp, then the NW warp states by a shfl-down
  // tree in warp 0 (lanes >= NW hold the empty state; only lanes < NW ever reach lane 0).
  const int lane = tid & 31, warp = tid >> 5;
  auto shfl_merge = [&](SmState& a, int o) {
    SmState b;
    b.zmax = __shfl_down_sync(0xffffffffu, a.zmax, o);
    b.n = __shfl_down_sync(0xffffffffu, a.n, o);
    b.s = __shfl_down_sync(0xffffffffu, a.s, o);
    b.r = ENT ? __shfl_down_sync(0xffffffffu, a.r, o) : 0.f;
    merge<ENT, X>(a, b, c2);
  };
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) shfl_merge(st, o);
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  SmState a = lane < NW ? sh[lane] : SmState{-INFINITY, 0.f, 0.f, 0.f};
#pragma unroll
  for (int o = NW / 2; o > 0; o >>= 1) shfl_merge(a, o);
  if (lane != 0) return;

  detail::write_row<ENT>(p, t, a, zy, has_label, y != p.ignore_index && !has_label);
}

template <typename T, bool ENT, class X>
void launch(const LogprobParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T));
  detail::with_block<512, 256, 128>(detail::pick_block<T>(p.V), [&](auto b) {
    logprob_fwd_v2_kernel<T, decltype(b)::value, ENT, X><<<grid, decltype(b)::value, 0, stream>>>(p);
  });
  detail::check_launch("logprob_fwd_v2_kernel");
}

template <typename T, class X>
void launch_x(const LogprobParams& p, cudaStream_t stream) {
  if (p.entropy != nullptr) launch<T, true, X>(p, stream);
  else launch<T, false, X>(p, stream);
}

}  // namespace

void launch_fwd_v2(const LogprobParams& p, Kernels k, cudaStream_t stream) {
  detail::by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (k == Kernels::kV2Mufu) launch_x<T, detail::MufuExp>(p, stream);
    else if (k == Kernels::kV2Split) launch_x<T, detail::SplitExp>(p, stream);
    else launch_x<T, detail::PolyExp>(p, stream);
  });
}

}  // namespace cuda
}  // namespace vespo
