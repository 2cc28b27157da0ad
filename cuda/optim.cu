// Multi-tensor optimizer steps on CUDA: one launch updates every parameter of an optimizer. The
// host packs, per block, the (tensor, first element) of a chunk of kOptimChunk elements and the
// pointer tables into device memory; each block walks its chunk. PyTorch's AdamW and SGD
// formulas (backend.h); no fused gradient clipping or AMP scaling here.
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kOptimThreads = 256;  // 64 elements per thread per chunk

// p -= lr·wd·p; m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²;
// p -= lr·(m / (1-b1^step)) / (sqrt(v / (1-b2^step)) + eps)
__global__ void __launch_bounds__(kOptimThreads)
    adamw_step_kernel(const int32_t* __restrict__ chunk_tensor,  // (chunks)
                      const int64_t* __restrict__ chunk_start,   // (chunks)
                      float* const* __restrict__ p,              // (count) -> (n[i]), updated
                      const float* const* __restrict__ g,        // (count) -> (n[i])
                      float* const* __restrict__ m,              // (count) -> (n[i]), updated
                      float* const* __restrict__ v,              // (count) -> (n[i]), updated
                      const int64_t* __restrict__ n,             // (count)
                      const AdamWArgs a) {
  const int t = chunk_tensor[blockIdx.x];
  const int64_t begin = chunk_start[blockIdx.x];
  const int64_t end = min(n[t], begin + kOptimChunk);
  float* __restrict__ pt = p[t];
  const float* __restrict__ gt = g[t];
  float* __restrict__ mt = m[t];
  float* __restrict__ vt = v[t];
  const float decay = 1.0f - a.lr * a.weight_decay;
  for (int64_t i = begin + threadIdx.x; i < end; i += kOptimThreads) {
    const float gi = gt[i];
    const float mi = a.beta1 * mt[i] + (1.0f - a.beta1) * gi;
    const float vi = a.beta2 * vt[i] + (1.0f - a.beta2) * gi * gi;
    mt[i] = mi;
    vt[i] = vi;
    const float denom = sqrtf(vi) / a.bias_correction2_sqrt + a.eps;
    pt[i] = pt[i] * decay - a.step_size * mi / denom;
  }
}

// g += wd·p; buf = g at step 1, else momentum·buf + (1-dampening)·g;
// g = nesterov ? g + momentum·buf : buf (when momentum != 0); p -= lr·g
__global__ void __launch_bounds__(kOptimThreads)
    sgd_step_kernel(const int32_t* __restrict__ chunk_tensor,  // (chunks)
                    const int64_t* __restrict__ chunk_start,   // (chunks)
                    float* const* __restrict__ p,              // (count) -> (n[i]), updated
                    const float* const* __restrict__ g,        // (count) -> (n[i])
                    float* const* __restrict__ buf,            // (count) -> (n[i]), or nullptrs
                    const int64_t* __restrict__ n,             // (count)
                    const SgdArgs a) {
  const int t = chunk_tensor[blockIdx.x];
  const int64_t begin = chunk_start[blockIdx.x];
  const int64_t end = min(n[t], begin + kOptimChunk);
  float* __restrict__ pt = p[t];
  const float* __restrict__ gt = g[t];
  float* __restrict__ bt = buf != nullptr ? buf[t] : nullptr;
  for (int64_t i = begin + threadIdx.x; i < end; i += kOptimThreads) {
    float gi = gt[i] + a.weight_decay * pt[i];
    if (a.momentum != 0.0f) {
      const float b = a.first_step ? gi : a.momentum * bt[i] + (1.0f - a.dampening) * gi;
      bt[i] = b;
      gi = a.nesterov ? gi + a.momentum * b : b;
    }
    pt[i] -= a.lr * gi;
  }
}

}  // namespace

cudaError_t launch_adamw_step(cudaStream_t stream, int64_t chunks, const int32_t* chunk_tensor,
                              const int64_t* chunk_start, float* const* p, const float* const* g,
                              float* const* m, float* const* v, const int64_t* n, AdamWArgs a) {
  if (chunks <= 0) return cudaSuccess;
  if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
  launch(adamw_step_kernel, static_cast<unsigned>(chunks), kOptimThreads, 0, stream,
      chunk_tensor, chunk_start, p, g, m, v, n, a);
  return cudaGetLastError();
}

cudaError_t launch_sgd_step(cudaStream_t stream, int64_t chunks, const int32_t* chunk_tensor,
                            const int64_t* chunk_start, float* const* p, const float* const* g,
                            float* const* buf, const int64_t* n, SgdArgs a) {
  if (chunks <= 0) return cudaSuccess;
  if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
  launch(sgd_step_kernel, static_cast<unsigned>(chunks), kOptimThreads, 0, stream,
      chunk_tensor, chunk_start, p, g, buf, n, a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora
