// The CPU LoRA kernels behind CpuBackend: fused low-rank forward/backward and adapter merge.
// Sizes and math are those of native/backend.h (N rows, C in, OC out, R rank).
#pragma once

#include <cstdint>

#include "../backend.h"
#include "thread_pool.h"

namespace lora {

Status cpu_lora_forward(ThreadPool& pool,
                        float* y,         // (N, OC)
                        float* h,         // (N, R)
                        const float* x,   // (N, C)
                        const void* W,    // (OC, C) in w_dtype
                        DType w_dtype,
                        const float* b,   // (OC) or nullptr
                        const float* A,   // (R, C)
                        const float* B,   // (OC, R)
                        int64_t N, int64_t C, int64_t OC, int64_t R, float s, float dropout_p,
                        uint64_t seed);

Status cpu_lora_backward(ThreadPool& pool,
                         float* dx,        // (N, C) or nullptr
                         float* dA,        // (R, C), += (or nullptr)
                         float* dB,        // (OC, R), += (or nullptr)
                         const float* dy,  // (N, OC)
                         const float* x,   // (N, C)
                         const float* h,   // (N, R)
                         const void* W,    // (OC, C) in w_dtype
                         DType w_dtype,
                         const float* A,   // (R, C)
                         const float* B,   // (OC, R)
                         int64_t N, int64_t C, int64_t OC, int64_t R, float s, float dropout_p,
                         uint64_t seed);

Status cpu_lora_merge(ThreadPool& pool,
                      void* W,         // (OC, C) in w_dtype, +=
                      DType w_dtype,
                      const float* A,  // (R, C)
                      const float* B,  // (OC, R)
                      int64_t OC, int64_t C, int64_t R, float s);

}  // namespace lora
