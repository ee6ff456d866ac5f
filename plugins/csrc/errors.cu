// The C ABI's error channel: a thread-local message behind vlmx_last_error(), plus launch checks.
#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

namespace {
thread_local char g_message[512] = "";
}

namespace vlmx {

vlmx_status fail(vlmx_status status, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(g_message, sizeof(g_message), fmt, args);
  va_end(args);
  return status;
}

void clear_error() { g_message[0] = '\0'; }

vlmx_status check_launch(const char* kernel_name) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return fail(VLMX_ERR_CUDA, "%s: CUDA launch failed: %s (%s)", kernel_name, cudaGetErrorString(err),
                cudaGetErrorName(err));
  }
  return VLMX_OK;
}

int sm_count() {
  // Cached per device: the attribute query costs microseconds and the launchers sit on the hot path.
  static thread_local int cached_device = -1;
  static thread_local int cached_count = 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  if (device != cached_device) {
    int count = 0;
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      count = 0;
    }
    cached_device = device;
    cached_count = count;
  }
  return cached_count;
}

}  // namespace vlmx

extern "C" const char* vlmx_last_error(void) { return g_message; }
