// The PTX instructions our kernels use, each beside its emulator twin (cuda/emu/), and the launch
// helper: the one place that knows whether the .cu files are being compiled by nvcc for a GPU or
// as C++ for the CPU emulator (LORA_CUDA_EMU), so no kernel file needs an #ifdef.
//
// The emulator's instruction set is this list, frozen unless a kernel needs more:
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32   mma_m16n8k16<T>
//   mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32                  mma_m16n8k8_tf32
//   cvt.rna.tf32.f32                                                    cvt_rna_tf32
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16                    ldmatrix_x4, ldmatrix_x4_trans
//   cp.async.cg.shared.global (16 bytes), commit_group, wait_group      cp_async16, cp_async_commit, cp_async_wait<N>
// plus what CUDA C++ itself provides (shuffles, atomicAdd, __syncthreads), which emu.h supplies.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#ifdef LORA_CUDA_EMU
#include "emu/emu.h"  // the kernels compiled as C++ for the CPU emulator (cuda/emu/)
#endif

namespace lora {
namespace cuda {

#ifndef LORA_CUDA_EMU
// kernel<<<grid, block, smem, stream>>>(args...), written as a call so the emulator can supply its
// own (cuda/emu/emu.h). Errors surface through cudaGetLastError() as with the <<<>>> syntax.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}
// The kernel's dynamic shared memory as `type* name`.
#define LORA_DYNAMIC_SMEM(type, name) \
  extern __shared__ __align__(16) unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
#endif

// c (4 fp32 per lane) += a (4 x b32: 8 16-bit values) · b (2 x b32), fragment layouts of the PTX ISA.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::mma_m16n8k16(c, a, b, ::lora_emu::MmaType::BF16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float* c, const uint32_t* a, const uint32_t* b) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::mma_m16n8k16(c, a, b, ::lora_emu::MmaType::F16);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// c += a · b with tf32 operands (a 4 x b32, b 2 x b32, as produced by cvt_rna_tf32).
__device__ __forceinline__ void mma_m16n8k8_tf32(float* c, const uint32_t* a, const uint32_t* b) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::mma_m16n8k8_tf32(c, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// x rounded to tf32 (10 mantissa bits, to nearest, ties away from zero), as b32 bits.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#ifdef LORA_CUDA_EMU
  return ::lora_emu::cvt_rna_tf32(x);
#else
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
  return u;
#endif
}

// Four 8x8 b16 matrices from shared memory (lane l gives the address of row l % 8 of matrix l / 8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::ldmatrix_x4(r, p, false);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::ldmatrix_x4(r, p, true);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// 16 bytes global -> shared, asynchronously; pred false zero-fills them and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
#ifdef LORA_CUDA_EMU
  ::lora_emu::cp_async16(dst, src, pred);
#else
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef LORA_CUDA_EMU
  ::lora_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LORA_CUDA_EMU
  ::lora_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace cuda
}  // namespace lora
