// Shared building blocks of the CUDA kernels: host-side error handling, fp32/bf16/fp16 element
// access (scalar and 16-byte vectors), a fast exp2, and fixed-shape (deterministic) block
// reductions. Header-only: everything is inline, a template, or a __device__ function.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "vespo/params.h"

namespace vespo {
namespace cuda {
namespace detail {

// ------------------------------------------------------------------------------------------------
// Host helpers
// ------------------------------------------------------------------------------------------------

// Throws std::runtime_error unless a CUDA device is usable (cudaGetDeviceCount succeeds and > 0).
// A failed cudaGetDeviceCount leaves a (non-sticky) error behind; it is cleared here.
inline void ensure_device() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("vespo_ext._cuda: no usable CUDA device (cudaGetDeviceCount: ") +
                             cudaGetErrorString(err) + ")");
  }
  if (n <= 0)
    throw std::runtime_error("vespo_ext._cuda: no usable CUDA device (cudaGetDeviceCount: 0 devices)");
}

// Call right after a <<<>>> launch.
// The one block-size dispatcher: calls f(std::integral_constant<int, B>{}) for the first B of the
// list equal to `block`, or the last B of the list when none is (the smallest, by convention).
template <int B, int... Rest, class F>
void with_block(int block, F&& f) {
  if constexpr (sizeof...(Rest) == 0) {
    f(std::integral_constant<int, B>{});
  } else {
    if (block == B) f(std::integral_constant<int, B>{});
    else with_block<Rest...>(block, static_cast<F&&>(f));
  }
}

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("vespo_ext._cuda: ") + kernel + " launch failed: " +
                             cudaGetErrorString(err));
}

inline void require(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("vespo_ext._cuda.") + fn + ": " + what);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// ------------------------------------------------------------------------------------------------
// Device math
// ------------------------------------------------------------------------------------------------

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x with one MUFU.EX2 (max rel. error ~2 ulp, subnormal results flushed to 0, ex2(-inf) = 0,
// ex2(+inf) = inf, NaN -> NaN).
__device__ __forceinline__ float ex2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);  // host pass (never executed; keeps the header usable by host-only tools)
#endif
}

// 2^x in software, for sums whose error must not pile up: round to an integer n, then a degree-7
// polynomial in the fraction (Horner, FMAs), then n added to the exponent. Error <= 0.87 ulp with
// no systematic sign (mean relative error -7e-10 over [-40, 0.5], checked on the CPU), unlike
// ex2.approx (MUFU): the forward's per-token log-probs are summed over a whole sequence into log W,
// so a consistent error grows with the length. On an H200, MUFU ex2 accounted for ~10 % of the
// forward's bias at 2048 tokens per sequence (the rest was the fp32 log2(e) scale, see
// logprob_cuda.cu). Domain x <= 127 (the forward only needs x <= 0): 2^x = 0 for x < -125 (and
// -inf), NaN -> NaN, exactly 1 at x = 0. ~17 instructions, all on the FMA/integer pipes (no MUFU,
// no conversion unit); the forward became arithmetic-bound with it (benchmarks/results/README.md).
// __host__ too, so it can be checked on a CPU.
// Reinterprets the bits of a value (memcpy: one register move in device code, as in Elem<> below).
template <class To, class From>
__host__ __device__ __forceinline__ To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To t;
  memcpy(&t, &v, sizeof(t));
  return t;
}

__host__ __device__ __forceinline__ float exp2_poly(float x) {
  const bool tiny = x < -125.f;        // false for NaN
  const float xc = tiny ? -125.f : x;  // NaN stays NaN
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: x + kMagic rounds x to an integer (ties to even)
  const float t = xc + kMagic;
  const float n = t - kMagic;
  const float f = xc - n;  // exact, |f| <= 0.5
  // sum_k (ln2)^k f^k / k!, k = 0..7: truncation < 6e-9 relative at |f| = 0.5 (0.05 ulp)
  float p = 1.5252733804059840e-05f;
  p = fmaf(p, f, 1.5403530393381608e-04f);
  p = fmaf(p, f, 1.3333558146428443e-03f);
  p = fmaf(p, f, 9.6181291076284772e-03f);
  p = fmaf(p, f, 5.5504108664821580e-02f);
  p = fmaf(p, f, 2.4022650695910071e-01f);
  p = fmaf(p, f, 6.9314718055994531e-01f);
  p = fmaf(p, f, 1.0f);
  // n is in the low mantissa bits of t; 2^n = bits (n + 127) << 23, a normal number for n >= -125.
  const uint32_t ni = bit_cast<uint32_t>(t) - bit_cast<uint32_t>(kMagic);
  const float y = p * bit_cast<float>((ni + 127u) << 23);
  return tiny ? 0.f : y;
}

// ------------------------------------------------------------------------------------------------
// Element access. T is the storage type (float, __nv_bfloat16, __half); all math is fp32.
// Loads/stores use the streaming cache hints (.cs): every logits/grad element is touched once.
// kVec elements make one 16-byte vector; element 0 sits in the low bits of raw.x (little endian).
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static __device__ __forceinline__ float load1(const float* p) { return __ldcs(p); }
  static __device__ __forceinline__ void store1(float* p, float v) { __stcs(p, v); }
  static __device__ __forceinline__ void unpack(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                      __float_as_uint(f[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __nv_bfloat16* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldcs(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static __device__ __forceinline__ void store1(__nv_bfloat16* p, float v) {
    __stcs(reinterpret_cast<unsigned short*>(p), __bfloat16_as_ushort(__float2bfloat16_rn(v)));
  }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x = a (low half), .y = b
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* f) {
    unpack2(r.x, f); unpack2(r.y, f + 2); unpack2(r.z, f + 4); unpack2(r.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float load1(const __half* p) {
    return __half2float(__ushort_as_half(__ldcs(reinterpret_cast<const unsigned short*>(p))));
  }
  static __device__ __forceinline__ void store1(__half* p, float v) {
    __stcs(reinterpret_cast<unsigned short*>(p), __half_as_ushort(__float2half_rn(v)));
  }
  static __device__ __forceinline__ void unpack2(uint32_t w, float* f) {
    __half2 h;
    memcpy(&h, &w, sizeof(w));
    const float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
  }
  static __device__ __forceinline__ uint32_t pack2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float* f) {
    unpack2(r.x, f); unpack2(r.y, f + 2); unpack2(r.z, f + 4); unpack2(r.w, f + 6);
  }
  static __device__ __forceinline__ uint4 pack(const float* f) {
    return make_uint4(pack2(f[0], f[1]), pack2(f[2], f[3]), pack2(f[4], f[5]), pack2(f[6], f[7]));
  }
};

// Split of one row of V elements starting at `row` (element-aligned, which the host checks):
//   [0, head)                       scalar, until the address is 16-byte aligned (head < kVec)
//   [head, head + nvec * kVec)      16-byte vectors
//   [head + nvec * kVec, V)         scalar tail (< kVec elements)
// Both scalar parts have fewer than kVec <= 8 elements, so threads 0..7 cover them in one step.
template <typename T>
__device__ __forceinline__ int row_head(const void* row, int V) {
  const uint32_t mis = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(row) & 15u);
  const int head = static_cast<int>(((16u - mis) & 15u) / sizeof(T));
  return head < V ? head : V;
}

// Zeros one gradient row of V elements (a masked row, or a zero upstream gradient): 16-byte streaming
// stores with the same head / vector / tail split as the loads.
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

// ------------------------------------------------------------------------------------------------
// Deterministic block all-reduce of N values per thread (result in every thread's v[]).
// Shape is fixed by BLOCK: shfl-down tree inside each warp (lane 0 gets the warp's value), then
// every thread folds the per-warp values 0..NW-1 left to right from shared memory. Must be reached
// by all BLOCK threads. Ends with __syncthreads(), so smem may be reused right after.
// ------------------------------------------------------------------------------------------------

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

template <int BLOCK, int N, typename T, typename Op>
__device__ __forceinline__ void block_allreduce(T (&v)[N], T (*smem)[BLOCK / 32], Op op) {
  static_assert(BLOCK % 32 == 0 && BLOCK >= 32 && BLOCK <= 1024, "bad block size");
  constexpr int NW = BLOCK / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] = op(v[k], __shfl_down_sync(0xffffffffu, v[k], o));
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) smem[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    T r = smem[k][0];
#pragma unroll
    for (int w = 1; w < NW; ++w) r = op(r, smem[k][w]);
    v[k] = r;
  }
  __syncthreads();
}

}  // namespace detail
}  // namespace cuda
}  // namespace vespo
