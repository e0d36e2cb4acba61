// CUDA runtime queries (cuda/runtime.cu), bound by module.cpp.
#pragma once

namespace mk {
namespace cuda {
int runtime_version();
int driver_version();  // 0 when no driver is installed
int device_count();    // 0 when no driver/GPU
}  // namespace cuda
}  // namespace mk
