// The CPU optimizer steps: PyTorch's AdamW and SGD over every parameter of an optimizer in one
// call, each tensor's range split over the thread pool.
#include <cmath>

#include "cpu.h"

namespace lora {
namespace {

struct AdamwScalars {
  float beta1, beta2, eps, step_size, inv_bc2_sqrt, decay;
};

// One AdamW update over a contiguous range. Memory-bound (28 bytes per element): compiled for
// AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC function multi-versioning); the
// build's -fno-math-errno lets the sqrt vectorise.
__attribute__((target_clones("avx512f", "avx2", "default")))
void adamw_range(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                 float* __restrict__ v, int64_t n, const AdamwScalars k) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = k.beta1 * m[i] + (1.0f - k.beta1) * gi;
    const float vi = k.beta2 * v[i] + (1.0f - k.beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * k.decay - k.step_size * mi / (std::sqrt(vi) * k.inv_bc2_sqrt + k.eps);
  }
}

lora_status adamw_step(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                       float* const* m, float* const* v, const int64_t* n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t step) {
  ThreadPool& pool = cpu_pool(be);
  // Bias corrections in double, as PyTorch computes them on the host.
  const double bc1 = 1.0 - std::pow(double(beta1), double(step));
  const double bc2 = 1.0 - std::pow(double(beta2), double(step));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = 1.0f - lr * weight_decay;
  const AdamwScalars k{beta1, beta2, eps, step_size, 1.0f / bc2_sqrt, decay};
  for (int32_t t = 0; t < count; ++t) {
    float* pp = p[t];
    const float* gg = g[t];
    float *mm = m[t], *vv = v[t];
    pool.parallel_for(n[t], kGrain, [&](int64_t b, int64_t e) {
      adamw_range(pp + b, gg + b, mm + b, vv + b, e - b, k);
    });
  }
  return LORA_OK;
}

lora_status sgd_step(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                     float* const* buf, const int64_t* n, float lr, float momentum, float dampening,
                     float weight_decay, bool nesterov, int64_t step) {
  ThreadPool& pool = cpu_pool(be);
  for (int32_t t = 0; t < count; ++t) {
    float* pp = p[t];
    const float* gg = g[t];
    float* bb = buf ? buf[t] : nullptr;
    if (momentum != 0.0f && !bb) return LORA_INVALID_ARGUMENT;
    pool.parallel_for(n[t], kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float d = gg[i] + weight_decay * pp[i];
        if (momentum != 0.0f) {
          const float bi = step <= 1 ? d : momentum * bb[i] + (1.0f - dampening) * d;
          bb[i] = bi;
          d = nesterov ? d + momentum * bi : bi;
        }
        pp[i] -= lr * d;
      }
    });
  }
  return LORA_OK;
}

}  // namespace

void cpu_register_optim(lora_backend& t) {
  t.adamw_step = adamw_step;
  t.sgd_step = sgd_step;
}

}  // namespace lora
