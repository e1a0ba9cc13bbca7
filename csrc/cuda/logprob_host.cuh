// Host side shared by the log-prob kernels of both generations (logprob_cuda.cu: v1 and the entry
// points; logprob_fwd_v2.cu, logprob_bwd_v2.cu): parameter checks, the block-size rule, the dtype
// dispatch, and the run-time choice of the kernel generation.
#pragma once
#include <string>

#include "common.cuh"
#include "vespo/params.h"

namespace vespo {
namespace cuda {

// Which kernels a launch uses (VESPO_CUDA_KERNELS, or set_kernel_variant; see kernels.h). v1 is the
// default until a GPU run shows v2 faster and within the float64 budgets. The v2 names choose the
// forward's exponential: poly (software exp2_poly), mufu (ex2.approx), split (ex2.approx on a
// 1/256-rounded argument times a short polynomial); the backward is the same for all three.
enum class Kernels : int { kV1 = 0, kV2 = 1, kV2Mufu = 2, kV2Split = 3 };
Kernels active_kernels();  // device.cu; throws std::invalid_argument on a bad VESPO_CUDA_KERNELS

void launch_fwd_v2(const LogprobParams& p, Kernels k, cudaStream_t stream);  // logprob_fwd_v2.cu
void launch_bwd_v2(const LogprobParams& p, cudaStream_t stream);             // logprob_bwd_v2.cu

namespace detail {

inline void check_params(const LogprobParams& p, const char* fn, bool bwd) {
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
  const int64_t es = elem_size(p.dtype);
  require(p.row_stride >= p.V, fn, "logits row_stride " + to_string(p.row_stride) + " < V=" + to_string(p.V));
  require(p.logits != nullptr, fn, "logits is required");
  require(p.labels != nullptr, fn, "labels is required");
  require(p.logp != nullptr, fn, "logp is required");
  require(p.lse != nullptr, fn, "lse is required");
  require((p.row_max == nullptr) == (p.log_sum == nullptr), fn, "row_max and log_sum go together (both or neither)");
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

// Calls f with a value of the logits' element type (float, __nv_bfloat16 or __half).
template <typename F>
void by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: f(__half{}); break;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace vespo
