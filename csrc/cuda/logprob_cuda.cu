// CUDA forward and backward of the per-token log-prob (see params.h), first generation (v1, the
// default; logprob_fwd_v2.cu / logprob_bwd_v2.cu hold v2), and the entry points of both:
//   fwd: one block per row t, one streaming read of the row: online (max, sum-exp[, sum-exp*x])
//        per thread, then a fixed-shape block reduction -> logp[t], lse[t], entropy[t].
//   bwd: one block per row t, one read of the row and one write of the gradient row:
//        grad_v = -c * p_v, the label entry c * sum_{v != y} p_v (c = dlogp * grad_scale / tau).
// Rows are addressed with 64-bit offsets (T * V may exceed 2^31); in-row indices are int
// (V < 2^30 is checked on the host).
#include <string>

#include "common.cuh"
#include "logprob_host.cuh"
#include "softmax_state.cuh"
#include "vespo/kernels.h"
#include "vespo/math.h"

namespace vespo {
namespace cuda {
namespace {

using detail::Elem;
using detail::ex2;
using detail::exp2_poly;
using detail::kLog2e;
using detail::block_allreduce;
using detail::row_head;
using detail::zero_row;
using detail::SumOp;
using detail::SmState;
using detail::Scale2;
using detail::make_c2;
using detail::fold;
using detail::merge;

constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread per loop step

template <typename T, int BLOCK, bool ENT>
__global__ void __launch_bounds__(BLOCK) logprob_fwd_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  constexpr int NW = BLOCK / 32;
  __shared__ SmState sh[NW];

  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  if (!counted(p.mask, t)) {  // uniform over the block: nobody reaches a barrier
    if (tid == 0) detail::write_masked_row<ENT>(p, t);
    return;
  }
  const int V = static_cast<int>(p.V);
  const T* row = static_cast<const T*>(p.logits) + t * p.row_stride;
  const int64_t y = p.labels[t];
  const bool has_label = y != p.ignore_index && y >= 0 && y < V;
  const bool bad_label = y != p.ignore_index && !has_label;
  float zy = 0.f;
  if (tid == 0 && has_label) zy = E::load1(row + y);  // issued early, latency hidden by the loop

  const Scale2 c2 = make_c2(p.inv_temperature);
  SmState st{-INFINITY, 0.f, 0.f, 0.f};

  // Per-thread order is fixed (head, vectors ascending, tail), hence deterministic.
  const int head = row_head<T>(row, V);
  const int nvec = (V - head) / VEC;
  if (tid < head) {
    const float z[1] = {E::load1(row + tid)};
    fold<1, ENT>(st, z, c2);
  }
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);  // 16-byte aligned
  int i = tid;
  for (; i + (kUnroll - 1) * BLOCK < nvec; i += kUnroll * BLOCK) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(vrow + i + u * BLOCK);
    float z[kUnroll * VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) E::unpack(raw[u], z + u * VEC);
    fold<kUnroll * VEC, ENT>(st, z, c2);
  }
  for (; i < nvec; i += BLOCK) {
    float z[VEC];
    E::unpack(__ldcs(vrow + i), z);
    fold<VEC, ENT>(st, z, c2);
  }
  const int tail0 = head + nvec * VEC;
  if (tail0 + tid < V) {
    const float z[1] = {E::load1(row + tail0 + tid)};
    fold<1, ENT>(st, z, c2);
  }

  // Block reduction, fixed shape: shfl-down tree per warp, then thread 0 folds warps 0..NW-1.
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    SmState o2;
    o2.zmax = __shfl_down_sync(0xffffffffu, st.zmax, o);
    o2.n = __shfl_down_sync(0xffffffffu, st.n, o);
    o2.s = __shfl_down_sync(0xffffffffu, st.s, o);
    o2.r = ENT ? __shfl_down_sync(0xffffffffu, st.r, o) : 0.f;
    merge<ENT>(st, o2, c2);
  }
  if (lane == 0) sh[warp] = st;
  __syncthreads();
  if (tid != 0) return;
  SmState a = sh[0];
#pragma unroll
  for (int w = 1; w < NW; ++w) merge<ENT>(a, sh[w], c2);

  detail::write_row<ENT>(p, t, a, zy, has_label, bad_label);
}

// ------------------------------------------------------------------------------------------------
// Backward. p.grad may alias p.logits (same pointer and row stride, checked on the host): every
// element is loaded and then stored by the same thread, a thread only touches its own elements,
// and the label's term comes from the saved logp (z_y is never re-read), so no thread can read an
// element that was already overwritten.
// ------------------------------------------------------------------------------------------------

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) logprob_bwd_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  __shared__ float red[1][BLOCK / 32];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int V = static_cast<int>(p.V);
  T* grow = static_cast<T*>(p.grad) + t * p.grad_row_stride;
  const float dl = counted(p.mask, t) ? p.dlogp[t] : 0.f;
  if (dl == 0.f) {  // masked or zero upstream gradient (uniform over the block): zeros, read nothing
    zero_row<T, BLOCK>(grow, V);
    return;
  }
  const T* zrow = static_cast<const T*>(p.logits) + t * p.row_stride;
  const float scale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  const float inv_t = p.inv_temperature;
  const float nc = -(dl * scale * inv_t);  // -c
  // p_v = exp((z_v - m) / tau - ln s): with the forward's (row_max, log_sum), exact for nearby values
  // whatever the logits' offset; without them m = 0 and ln s = lse (the older form).
  const bool split = p.row_max != nullptr;
  const float m = split ? p.row_max[t] : 0.f;
  const float ls = split ? p.log_sum[t] : p.lse[t];
  const int64_t y = p.labels[t];
  const int yl = (y != p.ignore_index && y >= 0 && y < V) ? static_cast<int>(y) : -1;
  // The label's term c * (1 - p_y) is written last as c * sum_{v != y} p_v (block-reduced in a
  // fixed order): exact even when p_y rounds to 1 in fp32. In the main pass the label's slot gets
  // a placeholder 0 and its probability is left out of the sum.
  float rest[1] = {0.f};

  // x = (z - m) / tau - ln s rounded once by the FMA, then 2^(x log2 e).
#define VESPO_PROB(z) ex2(fmaf((z) - m, inv_t, -ls) * kLog2e)

  const uintptr_t az = reinterpret_cast<uintptr_t>(zrow), ag = reinterpret_cast<uintptr_t>(grow);
  if ((az & 15u) == (ag & 15u)) {
    // Same misalignment: one head/vector/tail split serves both rows.
    const int head = row_head<T>(zrow, V);
    const int nvec = (V - head) / VEC;
    if (tid < head) {
      const float pv = tid == yl ? 0.f : VESPO_PROB(E::load1(zrow + tid));
      rest[0] += pv;
      E::store1(grow + tid, nc * pv);
    }
    const uint4* vz = reinterpret_cast<const uint4*>(zrow + head);
    uint4* vg = reinterpret_cast<uint4*>(grow + head);
    int i = tid;
    for (; i + (kUnroll - 1) * BLOCK < nvec; i += kUnroll * BLOCK) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(vz + i + u * BLOCK);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float f[VEC];
        E::unpack(raw[u], f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = VESPO_PROB(f[j]);
        const int v0 = head + (i + u * BLOCK) * VEC;
        if (static_cast<unsigned>(yl - v0) < static_cast<unsigned>(VEC)) {  // label in this vector
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (v0 + j == yl) f[j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          rest[0] += f[j];
          f[j] *= nc;
        }
        __stcs(vg + i + u * BLOCK, E::pack(f));
      }
    }
    for (; i < nvec; i += BLOCK) {
      float f[VEC];
      E::unpack(__ldcs(vz + i), f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = VESPO_PROB(f[j]);
      const int v0 = head + i * VEC;
      if (static_cast<unsigned>(yl - v0) < static_cast<unsigned>(VEC)) {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (v0 + j == yl) f[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        rest[0] += f[j];
        f[j] *= nc;
      }
      __stcs(vg + i, E::pack(f));
    }
    const int v = head + nvec * VEC + tid;
    if (v < V) {
      const float pv = v == yl ? 0.f : VESPO_PROB(E::load1(zrow + v));
      rest[0] += pv;
      E::store1(grow + v, nc * pv);
    }
  } else {
    // Different misalignment of the two rows (then they cannot overlap): scalar path.
#pragma unroll 4
    for (int v = tid; v < V; v += BLOCK) {
      const float pv = v == yl ? 0.f : VESPO_PROB(E::load1(zrow + v));
      rest[0] += pv;
      E::store1(grow + v, nc * pv);
    }
  }
#undef VESPO_PROB
  if (yl < 0) return;  // uniform over the block
  // The barriers inside the reduction also order the placeholder store before the final one.
  block_allreduce<BLOCK>(rest, red, SumOp());
  if (tid == 0) E::store1(grow + yl, -nc * rest[0]);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

using detail::pick_block;

template <typename T, bool ENT>
void launch_fwd_t(const LogprobParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T));
  detail::with_block<512, 256, 128>(pick_block<T>(p.V), [&](auto b) {
    logprob_fwd_kernel<T, decltype(b)::value, ENT><<<grid, decltype(b)::value, 0, stream>>>(p);
  });
  detail::check_launch("logprob_fwd_kernel");
}

template <typename T>
void launch_fwd(const LogprobParams& p, cudaStream_t stream) {
  if (p.entropy != nullptr) launch_fwd_t<T, true>(p, stream);
  else launch_fwd_t<T, false>(p, stream);
}

template <typename T>
void launch_bwd(const LogprobParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T));
  detail::with_block<512, 256, 128>(pick_block<T>(p.V), [&](auto b) {
    logprob_bwd_kernel<T, decltype(b)::value><<<grid, decltype(b)::value, 0, stream>>>(p);
  });
  detail::check_launch("logprob_bwd_kernel");
}

}  // namespace

void logprob_fwd(const LogprobParams& p) {
  detail::check_params(p, "logprob_fwd", false);
  const Kernels k = active_kernels();
  if (p.T == 0) return;
  detail::ensure_device();
  if (k != Kernels::kV1) return launch_fwd_v2(p, k, detail::as_stream(p.stream));
  detail::by_dtype(p.dtype, [&](auto tag) { launch_fwd<decltype(tag)>(p, detail::as_stream(p.stream)); });
}

void logprob_bwd(const LogprobParams& p) {
  detail::check_params(p, "logprob_bwd", true);
  const Kernels k = active_kernels();
  if (p.T == 0) return;
  detail::ensure_device();
  if (k != Kernels::kV1) return launch_bwd_v2(p, detail::as_stream(p.stream));
  detail::by_dtype(p.dtype, [&](auto tag) { launch_bwd<decltype(tag)>(p, detail::as_stream(p.stream)); });
}

}  // namespace cuda
}  // namespace vespo
