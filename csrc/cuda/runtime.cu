// CUDA runtime queries for _C.build_info() / _C.cuda.*. Static cudart: these
// work (and report "no device") on a machine without a GPU or driver.
#include <cuda_runtime.h>

#include "cuda/cuda_common.cuh"
#include "cuda/runtime.h"

namespace mk {
namespace cuda {

int runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return -1;
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace mk
