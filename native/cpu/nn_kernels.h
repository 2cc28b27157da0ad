// The CPU kernels for the training ops with their own kernels: layer/RMS normalisation,
// embedding and cross-entropy (attention: attention.h). Sizes and math are those of
// native/backend.h (N rows, C features, V vocabulary). Plain loops over the
// thread pool, double accumulators for row statistics; no SIMD intrinsics (the compiler's
// auto-vectorisation at -O3 is what they get).
#pragma once

#include <cstdint>

#include "../backend.h"
#include "thread_pool.h"

namespace lora {

Status cpu_layer_norm(ThreadPool& pool, float* y, float* mean, float* rstd, const float* x,
                      const float* w, const float* b, int64_t N, int64_t C, float eps);
Status cpu_layer_norm_backward(ThreadPool& pool, float* dx, float* dw, float* db, const float* dy,
                               const float* x, const float* w, const float* mean,
                               const float* rstd, int64_t N, int64_t C);
Status cpu_rms_norm(ThreadPool& pool, float* y, float* rstd, const float* x, const float* w,
                    int64_t N, int64_t C, float eps);
Status cpu_rms_norm_backward(ThreadPool& pool, float* dx, float* dw, const float* dy,
                             const float* x, const float* w, const float* rstd, int64_t N,
                             int64_t C);
Status cpu_embedding(ThreadPool& pool, float* out, const float* table, const int32_t* ids,
                     int64_t N, int64_t V, int64_t C);
Status cpu_embedding_backward(ThreadPool& pool, float* dtable, const float* dout,
                              const int32_t* ids, int64_t N, int64_t V, int64_t C);
Status cpu_cross_entropy(ThreadPool& pool, float* loss, float* lse, const float* logits,
                         const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                         float smoothing);
Status cpu_cross_entropy_backward(ThreadPool& pool, float* dlogits, const float* dloss,
                                  const float* logits, const float* lse, const int32_t* targets,
                                  int64_t N, int64_t V, int32_t ignore_index, float smoothing);

}  // namespace lora
