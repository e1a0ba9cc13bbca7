// CUDA forward and backward of the per-token log-prob (see params.h):
//   fwd: one block per row t, one streaming read of the row: online (max, sum-exp[, sum-exp*x])
//        per thread, then a fixed-shape block reduction -> logp[t], lse[t], entropy[t].
//   bwd: one block per row t, one read of the row and one write of the gradient row:
//        grad_v = -c * p_v, the label entry c * sum_{v != y} p_v (c = dlogp * grad_scale / tau).
// Rows are addressed with 64-bit offsets (T * V may exceed 2^31); in-row indices are int
// (V < 2^30 is checked on the host).
#include <string>

#include "common.cuh"
#include "vespo/kernels.h"

namespace vespo {
namespace cuda {
namespace {

using detail::Elem;
using detail::ex2;
using detail::exp2_poly;
using detail::kLn2;
using detail::kLog2e;
using detail::block_allreduce;
using detail::row_head;
using detail::SumOp;

constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread per loop step

// ------------------------------------------------------------------------------------------------
// Online softmax state of one thread (or a merged group of threads), in base 2:
//   zmax: the largest raw logit seen (-inf if none),
//   s   : sum_v 2^d_v with d_v = (z_v - ref) * c2, ref = max(zmax, -FLT_MAX), c2 = log2(e) / tau,
//   r   : sum_v 2^d_v * d_v (entropy only).
// The max element's d is exactly 0 (its term exactly 1), so a one-token vocabulary gives log-prob
// 0 and entropy 0 exactly, as torch does. The finite floor on ref keeps (-inf) - (-inf) = NaN out
// of rows that start with -inf logits. Exponentials use exp2_poly (no systematic error: these sums
// feed log W, summed over a whole sequence); only the rare rescales could use ex2, but take the
// same function for one error model.
// ------------------------------------------------------------------------------------------------
struct SmState {
  float zmax, s, r;
};

// c2 = log2(e) * inv_temperature as hi + lo (hi rounded toward zero, so lo > 0): x * c2 with one
// rounding. A plain fp32 c2 is off by ~1.3e-8 relative, the same way for every element: it scaled
// every d_v, biased ln(s) by ~6e-8 per token on random 151936-wide rows (emulated in numpy) and, summed
// over a 2048-token sequence, put a 6e-4 relative error on the loss (measured on an H200).
// With lo > 0, x = -inf gives -inf (never -inf + inf).
struct Scale2 {
  float hi, lo;
};

__device__ __forceinline__ Scale2 make_c2(float inv_temperature) {
  const double c = static_cast<double>(inv_temperature) * 1.4426950408889634;
  float hi = __double2float_rz(c);
  if (static_cast<double>(hi) == c) hi = nextafterf(hi, 0.f);
  return {hi, __double2float_rn(c - static_cast<double>(hi))};
}

__device__ __forceinline__ float scale2(float x, Scale2 c) { return fmaf(x, c.hi, x * c.lo); }

__device__ __forceinline__ float ref_of(float zmax) { return fmaxf(zmax, -FLT_MAX); }

// Folds N logits into the state: one rescale per call (if the max grew), then N exponentials.
template <int N, bool ENT>
__device__ __forceinline__ void fold(SmState& st, const float (&z)[N], Scale2 c2) {
  float zm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) zm = fmaxf(zm, z[j]);
  if (zm > st.zmax) {  // false for NaN: a NaN logit then reaches s below and propagates
    const float dm = scale2(ref_of(st.zmax) - ref_of(zm), c2);  // <= 0, possibly -inf
    const float sc = exp2_poly(dm);
    // r' = sum 2^(d + dm) (d + dm) = sc * (r + dm * s); guarded so -inf * 0 cannot occur.
    if (ENT) st.r = sc == 0.f ? 0.f : sc * fmaf(dm, st.s, st.r);
    st.s *= sc;
    st.zmax = zm;
  }
  const float ref = ref_of(st.zmax);
#pragma unroll
  for (int j = 0; j < N; ++j) {
    float d = scale2(z[j] - ref, c2);
    if (ENT) d = d < -256.f ? -256.f : d;  // -inf logit: e = 0 and e * d = 0, not 0 * -inf (NaN kept)
    const float e = exp2_poly(d);
    st.s += e;
    if (ENT) st.r = fmaf(e, d, st.r);
  }
}

// a <- a (+) (zmax2, s2, r2). Symmetric in its two operands (the sums commute exactly).
template <bool ENT>
__device__ __forceinline__ void merge(SmState& a, float zmax2, float s2, float r2, Scale2 c2) {
  const float M = fmaxf(a.zmax, zmax2);
  const float RM = ref_of(M);
  const float da = scale2(ref_of(a.zmax) - RM, c2), db = scale2(ref_of(zmax2) - RM, c2);
  const float fa = exp2_poly(da), fb = exp2_poly(db);
  if (ENT) {
    const float ra = fa == 0.f ? 0.f : fa * fmaf(da, a.s, a.r);
    const float rb = fb == 0.f ? 0.f : fb * fmaf(db, s2, r2);
    a.r = ra + rb;
  }
  a.s = a.s * fa + s2 * fb;
  a.zmax = M;
}

template <typename T, int BLOCK, bool ENT>
__global__ void __launch_bounds__(BLOCK) logprob_fwd_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  constexpr int NW = BLOCK / 32;
  __shared__ float sh_z[NW], sh_s[NW], sh_r[NW];

  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  if (p.mask != nullptr && p.mask[t] == 0) {  // uniform over the block: nobody reaches a barrier
    if (tid == 0) {
      p.logp[t] = 0.f;
      p.lse[t] = 0.f;
      if (ENT) p.entropy[t] = 0.f;
    }
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
  SmState st{-INFINITY, 0.f, 0.f};

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
    const float z2 = __shfl_down_sync(0xffffffffu, st.zmax, o);
    const float s2 = __shfl_down_sync(0xffffffffu, st.s, o);
    const float r2 = ENT ? __shfl_down_sync(0xffffffffu, st.r, o) : 0.f;
    merge<ENT>(st, z2, s2, r2, c2);
  }
  if (lane == 0) {
    sh_z[warp] = st.zmax;
    sh_s[warp] = st.s;
    sh_r[warp] = st.r;
  }
  __syncthreads();
  if (tid != 0) return;
  SmState a{sh_z[0], sh_s[0], sh_r[0]};
#pragma unroll
  for (int w = 1; w < NW; ++w) merge<ENT>(a, sh_z[w], sh_s[w], sh_r[w], c2);

  // s = sum_v e^{(z_v - zmax)/tau}: lse = zmax / tau + ln(s), log p_y = (z_y - zmax) / tau - ln(s),
  // H = ln(s) - ln2 * r / s (r is in base 2).
  const float ln_s = logf(a.s);
  const float inv_t = p.inv_temperature;
  p.lse[t] = a.zmax * inv_t + ln_s;
  // a log-probability is <= 0 (rounding could leave +1 ulp here).
  p.logp[t] = has_label ? fminf((zy - a.zmax) * inv_t - ln_s, 0.f) : 0.f;
  if (ENT) p.entropy[t] = ln_s - kLn2 * a.r / a.s;
  if (bad_label && p.bad_label_row != nullptr)
    atomicMax(reinterpret_cast<unsigned long long*>(p.bad_label_row), static_cast<unsigned long long>(t + 1));
}

// ------------------------------------------------------------------------------------------------
// Backward. p.grad may alias p.logits (same pointer and row stride, checked on the host): every
// element is loaded and then stored by the same thread, a thread only touches its own elements,
// and the label's term comes from the saved logp (z_y is never re-read), so no thread can read an
// element that was already overwritten.
// ------------------------------------------------------------------------------------------------

template <typename T, int BLOCK>
__device__ __forceinline__ void zero_row(T* g, int V) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  const int tid = threadIdx.x;
  const int head = row_head<T>(g, V);
  const int nvec = (V - head) / VEC;
  if (tid < head) E::store1(g + tid, 0.f);
  uint4* vg = reinterpret_cast<uint4*>(g + head);
  for (int i = tid; i < nvec; i += BLOCK) __stcs(vg + i, make_uint4(0u, 0u, 0u, 0u));
  const int tail0 = head + nvec * VEC;
  if (tail0 + tid < V) E::store1(g + tail0 + tid, 0.f);
}

template <typename T, int BLOCK>
__global__ void __launch_bounds__(BLOCK) logprob_bwd_kernel(const LogprobParams p) {
  using E = Elem<T>;
  constexpr int VEC = E::kVec;
  __shared__ float red[1][BLOCK / 32];
  const int64_t t = blockIdx.x;
  const int tid = threadIdx.x;
  const int V = static_cast<int>(p.V);
  T* grow = static_cast<T*>(p.grad) + t * p.grad_row_stride;
  const float dl = (p.mask == nullptr || p.mask[t] != 0) ? p.dlogp[t] : 0.f;
  if (dl == 0.f) {  // masked or zero upstream gradient (uniform over the block): zeros, read nothing
    zero_row<T, BLOCK>(grow, V);
    return;
  }
  const T* zrow = static_cast<const T*>(p.logits) + t * p.row_stride;
  const float scale = p.grad_scale != nullptr ? *p.grad_scale : 1.f;
  const float inv_t = p.inv_temperature;
  const float nc = -(dl * scale * inv_t);  // -c
  const float lse = p.lse[t];
  const int64_t y = p.labels[t];
  const int yl = (y != p.ignore_index && y >= 0 && y < V) ? static_cast<int>(y) : -1;
  // The label's term c * (1 - p_y) is written last as c * sum_{v != y} p_v (block-reduced in a
  // fixed order): exact even when p_y rounds to 1 in fp32. In the main pass the label's slot gets
  // a placeholder 0 and its probability is left out of the sum.
  float rest[1] = {0.f};

  // p_v = exp(z / tau - lse): x rounded once by the FMA, then 2^(x log2 e).
#define VESPO_PROB(z) ex2(fmaf((z), inv_t, -lse) * kLog2e)

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

using detail::require;

void check_params(const LogprobParams& p, const char* fn, bool bwd) {
  using std::to_string;
  require(p.T >= 0, fn, "T must be >= 0, got " + to_string(p.T));
  require(p.T <= INT32_MAX, fn, "T must be < 2^31 (one CUDA block per row), got " + to_string(p.T));
  require(p.V >= 1, fn, "vocabulary size V must be >= 1, got " + to_string(p.V));
  require(p.V <= (int64_t(1) << 30), fn, "vocabulary size V must be <= 2^30, got " + to_string(p.V));
  require(p.dtype == DType::kFloat32 || p.dtype == DType::kBFloat16 || p.dtype == DType::kFloat16, fn,
          "unsupported logits dtype " + to_string(static_cast<int>(p.dtype)));
  require(p.inv_temperature > 0.f && p.inv_temperature <= FLT_MAX, fn,
          "inv_temperature must be finite and > 0");
  if (p.T == 0) return;
  const int64_t es = detail::elem_size(p.dtype);
  require(p.row_stride >= p.V, fn, "logits row_stride " + to_string(p.row_stride) + " < V=" + to_string(p.V));
  require(p.logits != nullptr, fn, "logits is required");
  require(p.labels != nullptr, fn, "labels is required");
  require(p.logp != nullptr, fn, "logp is required");
  require(p.lse != nullptr, fn, "lse is required");
  require(reinterpret_cast<uintptr_t>(p.logits) % es == 0, fn, "logits must be element-aligned");
  if (!bwd) return;
  require(p.dlogp != nullptr, fn, "dlogp is required");
  require(p.grad != nullptr, fn, "grad is required");
  require(p.grad_row_stride >= p.V, fn,
          "grad_row_stride " + to_string(p.grad_row_stride) + " < V=" + to_string(p.V));
  require(reinterpret_cast<uintptr_t>(p.grad) % es == 0, fn, "grad must be element-aligned");
  // In-place is supported only as an exact alias (same pointer and row stride): otherwise a block
  // could overwrite logits another block still has to read.
  const uintptr_t z0 = reinterpret_cast<uintptr_t>(p.logits), g0 = reinterpret_cast<uintptr_t>(p.grad);
  const uintptr_t z1 = z0 + static_cast<uintptr_t>(((p.T - 1) * p.row_stride + p.V) * es);
  const uintptr_t g1 = g0 + static_cast<uintptr_t>(((p.T - 1) * p.grad_row_stride + p.V) * es);
  const bool overlap = z0 < g1 && g0 < z1;
  require(!overlap || (z0 == g0 && p.row_stride == p.grad_row_stride), fn,
          "grad may alias logits only exactly (same pointer and row stride)");
}

// Threads per row: enough 16-byte vectors per thread to amortise the block reduction.
template <typename T>
int pick_block(int64_t V) {
  const int64_t nv = V / Elem<T>::kVec;
  return nv >= 8192 ? 512 : (nv >= 512 ? 256 : 128);
}

template <typename T, bool ENT>
void launch_fwd_t(const LogprobParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.T));
  switch (pick_block<T>(p.V)) {
    case 512: logprob_fwd_kernel<T, 512, ENT><<<grid, 512, 0, stream>>>(p); break;
    case 256: logprob_fwd_kernel<T, 256, ENT><<<grid, 256, 0, stream>>>(p); break;
    default: logprob_fwd_kernel<T, 128, ENT><<<grid, 128, 0, stream>>>(p); break;
  }
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
  switch (pick_block<T>(p.V)) {
    case 512: logprob_bwd_kernel<T, 512><<<grid, 512, 0, stream>>>(p); break;
    case 256: logprob_bwd_kernel<T, 256><<<grid, 256, 0, stream>>>(p); break;
    default: logprob_bwd_kernel<T, 128><<<grid, 128, 0, stream>>>(p); break;
  }
  detail::check_launch("logprob_bwd_kernel");
}

}  // namespace

// Calls f with a value of the logits' element type (float, __nv_bfloat16 or __half).
template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
}

void logprob_fwd(const LogprobParams& p) {
  check_params(p, "logprob_fwd", false);
  if (p.T == 0) return;
  detail::ensure_device();
  by_dtype(p.dtype, [&](auto tag) { launch_fwd<decltype(tag)>(p, detail::as_stream(p.stream)); });
}

void logprob_bwd(const LogprobParams& p) {
  check_params(p, "logprob_bwd", true);
  if (p.T == 0) return;
  detail::ensure_device();
  by_dtype(p.dtype, [&](auto tag) { launch_bwd<decltype(tag)>(p, detail::as_stream(p.stream)); });
}

}  // namespace cuda
}  // namespace vespo
