// Device discovery for the CUDA backend, and the run-time choice of the log-prob kernels'
// generation. Nothing here launches a kernel: both work (and are tested) without a GPU.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <stdexcept>
#include <string>

#include "logprob_host.cuh"
#include "vespo/kernels.h"

namespace vespo {
namespace cuda {

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error so later runtime calls do not report it
    return 0;
  }
  return n > 0 ? n : 0;
}

namespace {

constexpr const char* kNames[] = {"v1", "v2", "v2-mufu", "v2-split"};
constexpr const char* kAllowed = "v1, v2, v2-mufu or v2-split";

// -1: follow VESPO_CUDA_KERNELS; else a Kernels value set by set_kernel_variant.
std::atomic<int> g_override{-1};

int parse(const std::string& name, const char* what, const char* otherwise) {
  for (int i = 0; i < static_cast<int>(std::size(kNames)); ++i)
    if (name == kNames[i]) return i;
  throw std::invalid_argument(std::string(what) + " must be " + kAllowed + otherwise + ", got '" + name + "'");
}

}  // namespace

// Read at every launch (a getenv and a few compares), so that a process can switch between
// generations without reloading the module.
Kernels active_kernels() {
  const int o = g_override.load(std::memory_order_relaxed);
  if (o >= 0) return static_cast<Kernels>(o);
  const char* env = std::getenv("VESPO_CUDA_KERNELS");
  if (env == nullptr || *env == 0) return Kernels::kV1;
  return static_cast<Kernels>(parse(env, "VESPO_CUDA_KERNELS", " (or unset)"));
}

const char* kernel_variant() { return kNames[static_cast<int>(active_kernels())]; }

void set_kernel_variant(const char* name) {
  if (name == nullptr || *name == 0) {
    g_override.store(-1);
    return;
  }
  g_override.store(parse(name, "set_kernel_variant: name", " (or None: follow VESPO_CUDA_KERNELS)"));
}

}  // namespace cuda
}  // namespace vespo
