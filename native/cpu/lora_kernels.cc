// CPU LoRA kernels composed from sgemm calls: correct and simple. The fused versions (h from the
// same packed x panels as x·Wᵀ, epilogue bias + s·h·Bᵀ, in-kernel dropout) replace these bodies
// behind the same signatures.
#include "lora_kernels.h"

#include <vector>

#include "../half.h"
#include "../rng.h"
#include "gemm.h"

namespace lora {
namespace {

// Dense fp32 copy of W (only for BF16 storage; F32 is used in place).
const float* weight_f32(const void* W, DType w_dtype, int64_t n, std::vector<float>& scratch) {
  if (w_dtype == DType::F32) return static_cast<const float*>(W);
  scratch.resize(static_cast<size_t>(n));
  const uint16_t* w = static_cast<const uint16_t*>(W);
  for (int64_t i = 0; i < n; ++i) scratch[i] = bf16_to_float(w[i]);
  return scratch.data();
}

// x̃ = dropout(x) with the counter RNG; index = row*C + col.
void apply_dropout(float* out, const float* in, int64_t n, float p, uint64_t seed) {
  const float scale = 1.0f / (1.0f - p);
  for (int64_t i = 0; i < n; ++i) out[i] = dropout_keep(seed, i, p) ? in[i] * scale : 0.0f;
}

}  // namespace

Status cpu_lora_forward(ThreadPool& pool, float* y, float* h, const float* x, const void* W,
                        DType w_dtype, const float* b, const float* A, const float* B, int64_t N,
                        int64_t C, int64_t OC, int64_t R, float s, float dropout_p,
                        uint64_t seed) {
  if (w_dtype != DType::F32 && w_dtype != DType::BF16) return Status::Unsupported;
  std::vector<float> wbuf, xbuf;
  const float* w = weight_f32(W, w_dtype, OC * C, wbuf);
  const float* xd = x;
  if (dropout_p > 0.0f) {
    xbuf.resize(static_cast<size_t>(N * C));
    apply_dropout(xbuf.data(), x, N * C, dropout_p, seed);
    xd = xbuf.data();
  }
  sgemm(pool, false, true, N, R, C, 1.0f, xd, C, A, C, 0.0f, h, R);       // h = x̃·Aᵀ
  sgemm(pool, false, true, N, OC, C, 1.0f, x, C, w, C, 0.0f, y, OC);      // y = x·Wᵀ
  sgemm(pool, false, true, N, OC, R, s, h, R, B, R, 1.0f, y, OC);         // y += s·h·Bᵀ
  if (b) {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t o = 0; o < OC; ++o) y[i * OC + o] += b[o];
  }
  return Status::Ok;
}

// h = x̃·Aᵀ; y = x·Wᵀ + b + s·h·Bᵀ
// dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
Status cpu_lora_backward(ThreadPool& pool, float* dx, float* dA, float* dB, const float* dy,
                         const float* x, const float* h, const void* W, DType w_dtype,
                         const float* A, const float* B, int64_t N, int64_t C, int64_t OC,
                         int64_t R, float s, float dropout_p, uint64_t seed) {
  if (w_dtype != DType::F32 && w_dtype != DType::BF16) return Status::Unsupported;
  if (dB) sgemm(pool, true, false, OC, R, N, s, dy, OC, h, R, 1.0f, dB, R);
  std::vector<float> dh(static_cast<size_t>(N * R));
  sgemm(pool, false, false, N, R, OC, s, dy, OC, B, R, 0.0f, dh.data(), R);
  std::vector<float> xbuf;
  if (dA) {
    const float* xd = x;
    if (dropout_p > 0.0f) {
      xbuf.resize(static_cast<size_t>(N * C));
      apply_dropout(xbuf.data(), x, N * C, dropout_p, seed);
      xd = xbuf.data();
    }
    sgemm(pool, true, false, R, C, N, 1.0f, dh.data(), R, xd, C, 1.0f, dA, C);
  }
  if (dx) {
    std::vector<float> wbuf;
    const float* w = weight_f32(W, w_dtype, OC * C, wbuf);
    sgemm(pool, false, false, N, C, OC, 1.0f, dy, OC, w, C, 0.0f, dx, C);
    if (dropout_p > 0.0f) {
      std::vector<float> t(static_cast<size_t>(N * C));
      sgemm(pool, false, false, N, C, R, 1.0f, dh.data(), R, A, C, 0.0f, t.data(), C);
      apply_dropout(t.data(), t.data(), N * C, dropout_p, seed);
      for (int64_t i = 0; i < N * C; ++i) dx[i] += t[i];
    } else {
      sgemm(pool, false, false, N, C, R, 1.0f, dh.data(), R, A, C, 1.0f, dx, C);
    }
  }
  return Status::Ok;
}

Status cpu_lora_merge(ThreadPool& pool, void* W, DType w_dtype, const float* A, const float* B,
                      int64_t OC, int64_t C, int64_t R, float s) {
  if (w_dtype == DType::F32) {
    sgemm(pool, false, false, OC, C, R, s, B, R, A, C, 1.0f, static_cast<float*>(W), C);
    return Status::Ok;
  }
  if (w_dtype != DType::BF16) return Status::Unsupported;
  std::vector<float> w;
  const float* wf = weight_f32(W, w_dtype, OC * C, w);
  std::vector<float> merged(wf, wf + OC * C);
  sgemm(pool, false, false, OC, C, R, s, B, R, A, C, 1.0f, merged.data(), C);
  uint16_t* out = static_cast<uint16_t*>(W);
  for (int64_t i = 0; i < OC * C; ++i) out[i] = float_to_bf16(merged[i]);
  return Status::Ok;
}

}  // namespace lora
