// CUDA backward of the per-token log-prob, second generation (v2; chosen at run time, see
// logprob_host.cuh): grad_v = -c p_v, the label's entry c (1 - p_y), c = dlogp * grad_scale / tau.
// Against v1:
//   - the label's term is c * q with q = 1 - p_y = -expm1(logp_y) from the forward's own logp, written
//     by the thread that owns the label's element in the main pass: no end-of-row block reduction,
//     no shared memory, no barrier, no placeholder store. The forward computes log p_y with relative
//     accuracy for a near-certain label (-log1p of the tail, softmax_state.cuh: label_logp), and
//     p_y <= 1/2 when the label is not the max, so expm1 loses nothing (tests/cuda_host/
//     fwd_sum_check.cu compares both forms with float64 on rows up to p_y = 1 - 1e-7).
//   - the per-row scalars (mask, dlogp, label, row_max, log_sum, logp, grad_scale) are independent
//     loads issued together before the first branch, not a dependent chain;
//   - __launch_bounds__(BLOCK, 2048 / BLOCK): at most 32 registers, 4 blocks of 512 threads per SM.
// In place: p.grad may alias p.logits (same pointer and row stride, checked on the host). Every
// element is loaded and then stored by the same thread, a thread touches only its own elements, and
// z_y is never re-read, so no thread reads an element that was already overwritten.
#include "common.cuh"
#include "logprob_host.cuh"
#include "vespo/math.h"

namespace vespo {
namespace cuda {
namespace {

using detail::Elem;
using detail::ex2;
using detail::kLog2e;
using detail::row_head;
using detail::zero_row;

constexpr int kUnroll = 2;  // 16-byte vectors in flight per thread per loop step (4 blocks per SM)

// The row's constants: g_v = nc * p_v, p_v = 2^((z_v - m) * it * log2e - ls * log2e), the label's
// entry lab (= -nc * q) at element yl (-1: none).
struct RowC {
  float m, it, ls, nc, lab;
  int yl;
};

__device__ __forceinline__ float prob(float z, const RowC& r) {
  return ex2(fmaf(z - r.m, r.it, -r.ls) * kLog2e);  // x = (z - m) / tau - ln s, rounded once
}

template <typename T>
__device__ __forceinline__ void scalar_elem(const T* z, T* g, int v, const RowC& r) {
  using E = Elem<T>;
  const float gv = v == r.yl ? r.lab : r.nc * prob(E::load1(z + v), r);
  E::store1(g + v, gv);
}

template <typename T>
__device__ __forceinline__ uint4 vec_elems(uint4 raw, int v0, const RowC& r) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  float f[VEC];
  E::unpack(raw, f);
#pragma unroll
  for (int j = 0; j < VEC; ++j) f[j] = r.nc * prob(f[j], r);
  if (static_cast<unsigned>(r.yl - v0) < static_cast<unsigned>(VEC)) {  // the label is in this vector
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (v0 + j == r.yl) f[j] = r.lab;
  }
  return E::pack(f);
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 2048 / BLOCK) logprob_bwd_v2_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int V = static_cast<int>(p.V);
  T* grow = static_cast<T*>(p.grad) + t * p.grad_row_stride;

  // Independent loads, all in flight at once (every pointer is valid for row t: the vectors are
  // (T,), checked by the binding; what a masked row holds is never used).
  const bool split = p.row_max != nullptr;
  const bool cnt = counted(p.mask, t);
  const float dl0 = p.dlogp[t];
  const int64_t y = p.labels[t];
  const float lp = p.logp[t];
  const float m = split ? p.row_max[t] : 0.f;
  const float ls = split ? p.log_sum[t] : p.lse[t];
  const float scale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;

  const float dl = cnt ? dl0 : 0.f;
  if (dl == 0.f) {  // masked or zero upstream gradient (uniform over the block): zeros, read nothing
    zero_row<T, BLOCK>(grow, V);
    return;
  }
  RowC r;
  r.m = m;  // p_v = exp((z_v - m) / tau - ln s): without (row_max, log_sum), m = 0 and ln s = lse
  r.it = p.inv_temperature;
  r.ls = ls;
  r.nc = -(dl * scale * r.it);  // -c
  r.yl = (y != p.ignore_index && y >= 0 && y < V) ? static_cast<int>(y) : -1;
  r.lab = r.nc * expm1f(lp);  // c * (1 - p_y) = -c * expm1(log p_y)

  const T* zrow = static_cast<const T*>(p.logits) + t * p.row_stride;
  const uintptr_t az = reinterpret_cast<uintptr_t>(zrow), ag = reinterpret_cast<uintptr_t>(grow);
  if ((az & 15u) == (ag & 15u)) {
    // Same misalignment: one head/vector/tail split serves both rows.
    const int head = row_head<T>(zrow, V);
    const int nvec = (V - head) / VEC;
    if (tid < head) scalar_elem<T>(zrow, grow, tid, r);
    const uint4* vz = reinterpret_cast<const uint4*>(zrow + head);
    uint4* vg = reinterpret_cast<uint4*>(grow + head);
    int i = tid;
    for (; i + (kUnroll - 1) * BLOCK < nvec; i += kUnroll * BLOCK) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(vz + i + u * BLOCK);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        __stcs(vg + i + u * BLOCK, vec_elems<T>(raw[u], head + (i + u * BLOCK) * VEC, r));
    }
    for (; i < nvec; i += BLOCK) __stcs(vg + i, vec_elems<T>(__ldcs(vz + i), head + i * VEC, r));
    const int v = head + nvec * VEC + tid;
    if (v < V) scalar_elem<T>(zrow, grow, v, r);
  } else {
    // Different misalignment of the two rows (then they cannot overlap): scalar path.
#pragma unroll 4
    for (int v = tid; v < V; v += BLOCK) scalar_elem<T>(zrow, grow, v, r);
  }
}

}  // namespace

void launch_bwd_v2(const LogprobParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T));
  detail::by_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    detail::with_block<512, 256, 128>(detail::pick_block<T>(p.V), [&](auto b) {
      logprob_bwd_v2_kernel<T, decltype(b)::value><<<grid, decltype(b)::value, 0, stream>>>(p);
    });
  });
  detail::check_launch("logprob_bwd_v2_kernel");
}

}  // namespace cuda
}  // namespace vespo
