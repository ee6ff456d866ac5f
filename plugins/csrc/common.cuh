// Shared helpers for the vlmx kernels: error reporting for the C ABI and the sm_75 tensor-core instructions.
//
// Only the Turing instruction set is used here (mma.sync m16n8k8 fp16, mma.sync m8n8k16 int8, ldmatrix), so the
// compute_75 PTX embedded in every build runs unchanged on any later GPU through the driver JIT.
#ifndef VLMX_COMMON_CUH_
#define VLMX_COMMON_CUH_

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "vlmx_kernels.h"

namespace vlmx {

// Records a printf-style message for vlmx_last_error() and returns `status` (defined in errors.cu).
vlmx_status fail(vlmx_status status, const char* fmt, ...);
// Resets the message; launchers call it on entry so a success never reports a stale error.
void clear_error();
// Turns a pending launch error into VLMX_ERR_CUDA with the kernel's name in the message.
vlmx_status check_launch(const char* kernel_name);
// Streaming multiprocessors of the current device (cached per device); 0 when the query fails.
int sm_count();

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ----------------------------------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i holds its fragment.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

// Same, transposed: the fragment a thread gets is a column pair of the stored rows (V as a K-major operand).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_addr)));
}

// D[16x8] += A[16x8] * B[8x8], fp16 operands, fp32 accumulators (the Turing fp16 tensor-core shape).
__device__ __forceinline__ void mma_m16n8k8(float (&d)[4], const uint32_t (&a)[2], uint32_t b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b));
}

// D[8x8] += A[8x16] * B[16x8], int8 operands, exact int32 accumulators (the Turing IMMA shape).
__device__ __forceinline__ void mma_m8n8k16(int32_t (&d)[2], uint32_t a, uint32_t b) {
  asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+r"(d[0]), "+r"(d[1])
               : "r"(a), "r"(b));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

}  // namespace vlmx

#endif  // VLMX_COMMON_CUH_
