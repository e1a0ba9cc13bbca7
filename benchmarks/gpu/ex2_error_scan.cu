// The error of the hardware exp2 (MUFU: ex2.approx.ftz.f32) against exact exp2, measured on the GPU
// over every fp32 input in [lo, -2^-24) (default lo = -32: 29 binades, ~2.4e8 inputs; below 2^-24 in magnitude
// 2^x rounds to 1), beside the software exp2_poly
// the forward uses today (csrc/cuda/common.cuh). NVIDIA documents a maximum error for ex2.approx, not
// its mean; what decides whether the forward may use it is the mean signed relative error (log W sums
// a per-token bias over the whole sequence), so that is what this prints, per binade and overall.
//
//   nvcc -O3 -std=c++17 -arch=native -I csrc/include benchmarks/gpu/ex2_error_scan.cu -o /tmp/ex2_scan
//   /tmp/ex2_scan [lo]        # e.g. /tmp/ex2_scan -32 ; prints one "binade" line per power of two
//
// Each input's relative error (y - ref) / ref is accumulated in double (ref from exp2 in double, which
// is correctly rounded far beyond fp32's precision). Also the same for the v2 forward's split exponential
// (csrc/cuda/softmax_state.cuh: SplitExp, VESPO_CUDA_KERNELS=v2-split): ex2(h) * (1 + l ln2 + (l ln2)^2 / 2),
// h = x rounded to 1/256, l = x - h, the form issue #18 proposes for a hardware-exp forward with a
// controlled bias (the kernel's own code, so the scan measures exactly what v2-split computes).
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <cmath>

#include "../../csrc/cuda/softmax_state.cuh"

using vespo::cuda::detail::exp2_poly;

__device__ __forceinline__ float mufu_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float split_ex2(float x) { return vespo::cuda::detail::SplitExp::ex2(x); }

constexpr int kVariants = 3;  // 0: MUFU ex2, 1: exp2_poly, 2: SplitExp (v2-split)

struct Acc {
  double sum[kVariants];
  double max_abs[kVariants];  // max |rel err| in units of 2^-24
  unsigned long long n;
};

__global__ void scan(uint32_t first, uint32_t count, Acc* out) {
  double s[kVariants] = {0, 0, 0}, m[kVariants] = {0, 0, 0};
  unsigned long long n = 0;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const float x = __uint_as_float(first + i);  // negative floats: bits rise as x falls
    const double ref = exp2(static_cast<double>(x));
    if (ref < 1.1754943508222875e-38) continue;  // results below FLT_MIN are flushed by .ftz
    const float y[kVariants] = {mufu_ex2(x), exp2_poly(x), split_ex2(x)};
#pragma unroll
    for (int k = 0; k < kVariants; ++k) {
      const double e = (static_cast<double>(y[k]) - ref) / ref;
      s[k] += e;
      m[k] = fmax(m[k], fabs(e) * 16777216.0);
    }
    ++n;
  }
#pragma unroll
  for (int k = 0; k < kVariants; ++k) {
    for (int o = 16; o > 0; o >>= 1) {
      s[k] += __shfl_down_sync(0xffffffffu, s[k], o);
      m[k] = fmax(m[k], __shfl_down_sync(0xffffffffu, m[k], o));
    }
  }
  for (int o = 16; o > 0; o >>= 1) n += __shfl_down_sync(0xffffffffu, n, o);
  if ((threadIdx.x & 31) == 0) {
    for (int k = 0; k < kVariants; ++k) {
      atomicAdd(&out->sum[k], s[k]);  // a scan, not a kernel of the library: order does not matter
      unsigned long long* mp = reinterpret_cast<unsigned long long*>(&out->max_abs[k]);
      atomicMax(mp, static_cast<unsigned long long>(__double_as_longlong(m[k])));  // m >= 0: bits order
    }
    atomicAdd(&out->n, n);
  }
}

static uint32_t bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

int main(int argc, char** argv) {
  const float lo = argc > 1 ? std::strtof(argv[1], nullptr) : -32.f;
  Acc* d;
  cudaMalloc(&d, sizeof(Acc));
  Acc total{};
  std::printf("variant: 0 = ex2.approx.ftz.f32 (MUFU), 1 = exp2_poly (software), 2 = SplitExp (v2-split: MUFU on a 1/256-split argument, degree-2 factor)\n");
  std::printf("binade [a, b): n  mean_rel_err[0..2]  max_abs_err_ulp[0..2] (ulp = 2^-24 relative)\n");
  // One binade [a, b) = [-2^(e+1), -2^e) at a time, from lo towards 0.
  for (float a = lo; a < -1e-30f; a *= 0.5f) {
    const float b = a * 0.5f;  // the binade [a, b) with a < b < 0
    const uint32_t first = bits(b) + 1, last = bits(a);  // negative floats: these bits are [a, b)
    const uint32_t count = last - first + 1;
    Acc h{};
    cudaMemcpy(d, &h, sizeof(Acc), cudaMemcpyHostToDevice);
    scan<<<4096, 256>>>(first, count, d);
    if (cudaDeviceSynchronize() != cudaSuccess) { std::printf("CUDA error\n"); return 1; }
    cudaMemcpy(&h, d, sizeof(Acc), cudaMemcpyDeviceToHost);
    if (h.n) {
      std::printf("binade [%g, %g): %llu  %.3e %.3e %.3e  %.3f %.3f %.3f\n", a, b, h.n, h.sum[0] / h.n, h.sum[1] / h.n,
                  h.sum[2] / h.n, h.max_abs[0], h.max_abs[1], h.max_abs[2]);
    }
    for (int k = 0; k < kVariants; ++k) {
      total.sum[k] += h.sum[k];
      total.max_abs[k] = std::fmax(total.max_abs[k], h.max_abs[k]);
    }
    total.n += h.n;
    if (b > -6e-8f) break;  // |x| < 2^-24: 2^x rounds to 1 in fp32
  }
  std::printf("total [%g, 0): %llu  mean_rel_err %.3e %.3e %.3e  max_ulp %.3f %.3f %.3f\n", lo, total.n,
              total.sum[0] / total.n, total.sum[1] / total.n, total.sum[2] / total.n, total.max_abs[0],
              total.max_abs[1], total.max_abs[2]);
  cudaFree(d);
  return 0;
}
