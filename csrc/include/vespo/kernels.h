// Entry points of the CPU and CUDA backends. Each throws std::invalid_argument on bad parameters
// and std::runtime_error on a backend failure; the binding turns these into Python exceptions.
#pragma once
#include "vespo/params.h"

namespace vespo {
namespace cpu {
void logprob_fwd(const LogprobParams& p);
void logprob_bwd(const LogprobParams& p);
void seq_reduce(const SeqParams& p);
// The instruction set the CPU kernels run on now: "avx512", "avx2" or "generic" (the best this CPU
// has, capped by the environment variable VESPO_CPU_ISA).
const char* active_isa();
}  // namespace cpu

namespace cuda {
void logprob_fwd(const LogprobParams& p);
void logprob_bwd(const LogprobParams& p);
void seq_reduce(const SeqParams& p);
// Device count; 0 (never an exception) on a machine without a usable CUDA driver.
int device_count();
// The log-prob kernels' generation the next launches use: "v1" (default), "v2", "v2-mufu" or
// "v2-split" (v2 with the forward's exponential in software, MUFU, or MUFU on a split argument).
// set_kernel_variant(name) overrides the environment variable VESPO_CUDA_KERNELS, which is read at
// every launch otherwise; nullptr or "" returns to it. Both throw std::invalid_argument on a name
// (or an environment value) that is none of these. Neither needs a GPU.
const char* kernel_variant();
void set_kernel_variant(const char* name);
}  // namespace cuda
}  // namespace vespo
