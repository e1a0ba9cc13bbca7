// Device discovery for the CUDA backend. Never throws: a machine without a GPU or without a usable
// driver reports 0 devices.
#include <cuda_runtime.h>

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

}  // namespace cuda
}  // namespace vespo
