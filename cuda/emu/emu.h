// The CUDA emulator: lets the kernels of cuda/ run on the CPU, unchanged, so that every CUDA op
// can be checked on a machine without a GPU (ours have none). The .cu files are compiled as C++
// with LORA_CUDA_EMU defined; cuda/ptx.cuh then includes this header instead of relying on nvcc.
//
// The model, written from the CUDA programming guide and the PTX ISA (not from our kernels):
// - A launch runs synchronously. Blocks are spread over a few host threads; inside a block every
//   CUDA thread is a fiber with its own stack, switched only at __syncthreads and at warp
//   collectives (shuffles, ldmatrix, mma), so shared memory is a static thread_local array and
//   the order in which threads run between two barriers alternates (races show up).
// - Warp collectives exchange values through a per-warp buffer: mma.sync m16n8k16 (bf16, f16)
//   and m16n8k8 (tf32) and ldmatrix .x4 (plain and .trans) use the fragment layouts of the PTX
//   ISA; cp.async copies land only at cp.async.wait_group, as late as the ISA allows.
// - Device memory is host memory placed against a PROT_NONE page and filled with 0xFF bytes
//   (NaN as floats) when allocated: reading past the end faults at once, reading memory nobody
//   wrote gives NaN. A deadlock (threads of a block waiting at different barriers), an invalid
//   launch configuration or a fault in a kernel becomes a CUDA error as on a GPU (sticky when
//   the GPU's would be).
// Built with -ffp-contract=fast (and -march=native): a·b + c contracts to an FMA as nvcc does.
// Not modelled: timing, memory ordering between blocks beyond atomics, bank conflicts.
// Environment: LORA_NATIVE_CUDA_EMU_SMS (SM count reported, default 8), LORA_NATIVE_CUDA_EMU_MEMORY_MB
// (device memory, default 4096), LORA_NATIVE_CUDA_EMU_THREADS (host threads running blocks),
// LORA_NATIVE_CUDA_EMU_FAULT_AT (make launch number n fail with an illegal address, for tests of the
// error paths).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

// Host compilation of the CUDA headers defines these as attributes g++ does not know.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static thread_local  // one copy per host thread: blocks run one at a time there
#define __launch_bounds__(...)

namespace lora_emu {

extern thread_local uint3 thread_idx;
extern thread_local uint3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;

void syncthreads();
// Warp collective: every lane of the calling thread's warp gives `bytes` (<= 32) from `in`; once
// all have arrived, each receives into `out` what lane `src_lane` gave.
void warp_exchange(const void* in, void* out, size_t bytes, int src_lane);
int lane_id();

// The block's dynamic shared memory (the launch's third parameter), filled with 0xFF per block.
void* dynamic_smem();

// Tensor-core and async-copy instructions with the PTX ISA's per-lane fragment layouts.
enum class MmaType { BF16, F16 };
void mma_m16n8k16(float* c, const uint32_t* a, const uint32_t* b, MmaType type);
void mma_m16n8k8_tf32(float* c, const uint32_t* a, const uint32_t* b);
uint32_t cvt_rna_tf32(float x);
void ldmatrix_x4(uint32_t* r, const void* row_address, bool trans);
void cp_async16(void* dst, const void* src, bool fill);  // fill false: zero-fill, read nothing
void cp_async_commit();
void cp_async_wait(int newest_pending);

float atomic_add(float* p, float v);
double atomic_add(double* p, double v);
int atomic_add(int* p, int v);
unsigned atomic_add(unsigned* p, unsigned v);

// Runs grid x block copies of `body` (see launch below); errors go to cudaGetLastError.
void run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
              const std::function<void()>& body);

}  // namespace lora_emu

#define threadIdx (::lora_emu::thread_idx)
#define blockIdx (::lora_emu::block_idx)
#define blockDim (::lora_emu::block_dim)
#define gridDim (::lora_emu::grid_dim)

inline void __syncthreads() { ::lora_emu::syncthreads(); }
// A warp barrier (full mask only): every lane of the warp arrives before any goes on, as the
// warp collectives already make them (a one-byte exchange).
inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  const char token = 0;
  char ignored;
  ::lora_emu::warp_exchange(&token, &ignored, 1, ::lora_emu::lane_id());
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  static_assert(sizeof(T) <= 32 && std::is_trivially_copyable<T>::value, "shuffle of a small value");
  T r;
  ::lora_emu::warp_exchange(&v, &r, sizeof(T), ::lora_emu::lane_id() ^ lane_mask);
  return r;
}
template <typename T>
inline T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int /*width*/ = 32) {
  const int src = ::lora_emu::lane_id() + static_cast<int>(delta);
  T r;
  ::lora_emu::warp_exchange(&v, &r, sizeof(T), src < 32 ? src : ::lora_emu::lane_id());
  return r;
}
template <typename T>
inline T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int /*width*/ = 32) {
  T r;
  ::lora_emu::warp_exchange(&v, &r, sizeof(T), src_lane & 31);
  return r;
}

inline float atomicAdd(float* p, float v) { return ::lora_emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::lora_emu::atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return ::lora_emu::atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::lora_emu::atomic_add(p, v); }

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned>(i)); }
inline int __float_as_int(float f) { return static_cast<int>(__float_as_uint(f)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

// CUDA's device min/max are overloaded for every arithmetic type; one template does here.
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T max(T a, T b) { return a < b ? b : a; }

// cuda_runtime.h declares this overload for nvcc only.
template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

namespace lora {
namespace cuda {

// kernel<<<grid, block, smem, stream>>>(args...) on the emulator: each CUDA thread calls the
// kernel with its own copy of the converted arguments.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
  auto params = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(args)...);
  ::lora_emu::run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, stream,
                       [kernel, params]() { std::apply(kernel, *params); });
}

}  // namespace cuda
}  // namespace lora

#define LORA_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::lora_emu::dynamic_smem())
