// CpuBackend: every lora::Backend op on the host. Elementwise, reduction and copy ops are plain
// loops split over the thread pool; matrix products go to sgemm (gemm.h) and the LoRA kernels to
// lora_kernels.cc. Memory comes from a caching allocator so that training steps reuse buffers
// instead of touching fresh pages (BUILD.md: first touch costs 7-50 µs per 4 KiB page here).
#include "backend_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "../elementwise_math.h"
#include "../half.h"
#include "../rng.h"
#include "attention.h"
#include "gemm.h"
#include "lora_kernels.h"
#include "nn_kernels.h"

namespace lora {
namespace {

constexpr size_t kAlign = 64;                       // a cache line; also AVX-512 alignment
constexpr size_t kMaxCached = size_t(1) << 30;      // cache at most 1 GiB of freed blocks
constexpr int64_t kGrain = 1 << 15;                 // elements worth waking a second thread for

// Rounds a request up to its bucket: 64-byte steps below 1 MiB, then 1/8 steps of the power of
// two above it, so a reused block wastes at most 12.5%.
size_t bucket_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes < (size_t(1) << 20)) return (bytes + kAlign - 1) & ~(kAlign - 1);
  size_t p = size_t(1) << (63 - __builtin_clzll(bytes));
  size_t step = p / 8;
  return (bytes + step - 1) / step * step;
}

class CachingAllocator {
 public:
  ~CachingAllocator() { release(); }
  void* alloc(size_t bytes) {
    const size_t size = bucket_size(bytes);
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= size;
      live_ += size;
      return p;
    }
    void* p = std::aligned_alloc(kAlign, size);
    if (!p) {
      release();  // give the cache back and try once more
      p = std::aligned_alloc(kAlign, size);
      if (!p) return nullptr;
    }
    live_ += size;
    return p;
  }
  void free(void* p, size_t bytes) {
    if (!p) return;
    const size_t size = bucket_size(bytes);
    live_ -= size;
    if (cached_ + size > kMaxCached) {
      std::free(p);
      return;
    }
    free_[size].push_back(p);
    cached_ += size;
  }
  void release() {
    for (auto& kv : free_)
      for (void* p : kv.second) std::free(p);
    free_.clear();
    cached_ = 0;
  }
  size_t cached() const { return cached_; }
  size_t live() const { return live_; }

 private:
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, live_ = 0;
};

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

int64_t layout_numel(const Layout& l) {
  int64_t n = 1;
  for (int d = 0; d < l.ndim; ++d) n *= l.shape[d];
  return n;
}

// Offset (in elements) of flat row-major index i of `shape` under `stride`.
inline int64_t strided_offset(int64_t i, const Layout& l) {
  int64_t off = 0;
  for (int d = l.ndim - 1; d >= 0; --d) {
    const int64_t q = i / l.shape[d];
    off += (i - q * l.shape[d]) * l.stride[d];
    i = q;
  }
  return off;
}

bool is_contiguous(const Layout& l) {
  int64_t expect = 1;
  for (int d = l.ndim - 1; d >= 0; --d) {
    if (l.shape[d] != 1 && l.stride[d] != expect) return false;
    expect *= l.shape[d];
  }
  return true;
}

class CpuBackend final : public CpuBackendBase {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}
  const char* name() const override { return "cpu"; }
  ThreadPool& pool() override { return pool_; }
  size_t live_bytes() const override { return alloc_.live(); }

  void* alloc(size_t bytes) override { return alloc_.alloc(bytes); }
  void free(void* ptr, size_t bytes) override { alloc_.free(ptr, bytes); }
  size_t cached_bytes() const override { return alloc_.cached(); }
  void release_cached() override { alloc_.release(); }

  Status upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return Status::Ok;
  }
  Status download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
    return Status::Ok;
  }
  Status copy(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memmove(dst, src, bytes);
    return Status::Ok;
  }
  Status fill(float* out, float value, int64_t n) override {
    pool_.parallel_for(n, kGrain, [&](int64_t b, int64_t e) { std::fill(out + b, out + e, value); });
    return Status::Ok;
  }

  Status convert(void* out, DType out_dtype, const void* in, DType in_dtype, int64_t n) override {
    if (out_dtype == DType::I32 || in_dtype == DType::I32) return Status::Unsupported;
    pool_.parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        float v;
        switch (in_dtype) {
          case DType::F32: v = static_cast<const float*>(in)[i]; break;
          case DType::BF16: v = bf16_to_float(static_cast<const uint16_t*>(in)[i]); break;
          default: v = f16_to_float(static_cast<const uint16_t*>(in)[i]); break;
        }
        switch (out_dtype) {
          case DType::F32: static_cast<float*>(out)[i] = v; break;
          case DType::BF16: static_cast<uint16_t*>(out)[i] = float_to_bf16(v); break;
          default: static_cast<uint16_t*>(out)[i] = float_to_f16(v); break;
        }
      }
    });
    return Status::Ok;
  }

  Status lora_forward(float* y, float* h, const float* x, const void* W, DType w_dtype,
                      const float* b, const float* A, const float* B, int64_t N, int64_t C,
                      int64_t OC, int64_t R, float s, float dropout_p, uint64_t seed) override {
    return cpu_lora_forward(pool_, y, h, x, W, w_dtype, b, A, B, N, C, OC, R, s, dropout_p, seed);
  }
  Status lora_backward(float* dx, float* dA, float* dB, const float* dy, const float* x,
                       const float* h, const void* W, DType w_dtype, const float* A,
                       const float* B, int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                       float dropout_p, uint64_t seed) override {
    return cpu_lora_backward(pool_, dx, dA, dB, dy, x, h, W, w_dtype, A, B, N, C, OC, R, s,
                             dropout_p, seed);
  }
  Status lora_merge(void* W, DType w_dtype, const float* A, const float* B, int64_t OC,
                    int64_t C, int64_t R, float s) override {
    return cpu_lora_merge(pool_, W, w_dtype, A, B, OC, C, R, s);
  }

  Status adamw_step(int32_t count, float* const* p, const float* const* g, float* const* m,
                    float* const* v, const int64_t* n, float lr, float beta1, float beta2,
                    float eps, float weight_decay, int64_t step) override {
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
      pool_.parallel_for(n[t], kGrain, [&](int64_t b, int64_t e) {
        adamw_range(pp + b, gg + b, mm + b, vv + b, e - b, k);
      });
    }
    return Status::Ok;
  }

  Status sgd_step(int32_t count, float* const* p, const float* const* g, float* const* buf,
                  const int64_t* n, float lr, float momentum, float dampening, float weight_decay,
                  bool nesterov, int64_t step) override {
    for (int32_t t = 0; t < count; ++t) {
      float* pp = p[t];
      const float* gg = g[t];
      float* bb = buf ? buf[t] : nullptr;
      if (momentum != 0.0f && !bb) return Status::InvalidArgument;
      pool_.parallel_for(n[t], kGrain, [&](int64_t b, int64_t e) {
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
    return Status::Ok;
  }

  Status gemm(float* Cm, const float* Am, const float* Bm, int64_t M, int64_t Nn, int64_t K,
              bool trans_a, bool trans_b, int64_t lda, int64_t ldb, int64_t ldc, float alpha,
              float beta, int64_t batch, int64_t stride_a, int64_t stride_b,
              int64_t stride_c) override {
    for (int64_t i = 0; i < batch; ++i)
      sgemm(pool_, trans_a, trans_b, M, Nn, K, alpha, Am + i * stride_a, lda, Bm + i * stride_b,
            ldb, beta, Cm + i * stride_c, ldc);
    return Status::Ok;
  }

  Status gemm_bf16(float* Cm, const float* Am, const uint16_t* Bm, int64_t M, int64_t Nn,
                   int64_t K, bool trans_a, bool trans_b, int64_t lda, int64_t ldb, int64_t ldc,
                   float alpha, float beta, int64_t batch, int64_t stride_a, int64_t stride_b,
                   int64_t stride_c) override {
    for (int64_t i = 0; i < batch; ++i)
      sgemm_bf16(pool_, trans_a, trans_b, M, Nn, K, alpha, Am + i * stride_a, lda,
                 Bm + i * stride_b, ldb, beta, Cm + i * stride_c, ldc);
    return Status::Ok;
  }

  Status binary(BinaryOp op, float* out, const float* a, const float* b, const Layout& al,
                const Layout& bl) override {
    const int64_t n = layout_numel(al);
    if (is_contiguous(al) && is_contiguous(bl)) {
      pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(op, a[i], b[i]);
      });
      return Status::Ok;
    }
    const int64_t inner = al.ndim ? al.shape[al.ndim - 1] : 1;
    const int64_t as = al.ndim ? al.stride[al.ndim - 1] : 0, bs = bl.ndim ? bl.stride[bl.ndim - 1] : 0;
    const int64_t rows = inner ? n / inner : 0;
    pool_.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const float* ar = a + strided_offset(r * inner, al);
                           const float* br = b + strided_offset(r * inner, bl);
                           float* o = out + r * inner;
                           for (int64_t j = 0; j < inner; ++j)
                             o[j] = binary_apply(op, ar[j * as], br[j * bs]);
                         }
                       });
    return Status::Ok;
  }

  Status binary_scalar(BinaryOp op, float* out, const float* a, float scalar, bool scalar_first,
                       int64_t n) override {
    pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      if (scalar_first)
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(op, scalar, a[i]);
      else
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(op, a[i], scalar);
    });
    return Status::Ok;
  }

  Status unary(UnaryOp op, float* out, const float* in, int64_t n) override {
    pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) out[i] = unary_apply(op, in[i]);
    });
    return Status::Ok;
  }

  Status unary_backward(UnaryOp op, float* dx, const float* dy, const float* x, const float* y,
                        int64_t n) override {
    pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i)
        dx[i] = dy[i] * unary_grad(op, x ? x[i] : 0.0f, y ? y[i] : 0.0f);
    });
    return Status::Ok;
  }

  Status axpy(float* y, const float* x, float a, int64_t n) override {
    pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) y[i] += a * x[i];
    });
    return Status::Ok;
  }

  Status reduce(ReduceOp op, float* out, const float* in, int64_t outer, int64_t dim,
                int64_t inner) override {
    const float init = op == ReduceOp::Sum ? 0.0f : (op == ReduceOp::Max ? -INFINITY : INFINITY);
    const BinaryOp combine =
        op == ReduceOp::Sum ? BinaryOp::Add : (op == ReduceOp::Max ? BinaryOp::Max : BinaryOp::Min);
    pool_.parallel_for(outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, dim * inner)),
                       [&](int64_t o0, int64_t o1) {
                         std::vector<double> acc;
                         for (int64_t o = o0; o < o1; ++o) {
                           float* dst = out + o * inner;
                           const float* src = in + o * dim * inner;
                           if (op == ReduceOp::Sum) {
                             // double accumulators: sums over long axes stay accurate
                             acc.assign(static_cast<size_t>(inner), 0.0);
                             for (int64_t d = 0; d < dim; ++d)
                               for (int64_t i = 0; i < inner; ++i) acc[i] += src[d * inner + i];
                             for (int64_t i = 0; i < inner; ++i) dst[i] = static_cast<float>(acc[i]);
                           } else {
                             std::fill(dst, dst + inner, init);
                             for (int64_t d = 0; d < dim; ++d)
                               for (int64_t i = 0; i < inner; ++i)
                                 dst[i] = binary_apply(combine, dst[i], src[d * inner + i]);
                           }
                         }
                       });
    return Status::Ok;
  }

  Status copy_strided(float* dst, const Layout& dl, const float* src, const Layout& sl) override {
    const int64_t n = layout_numel(sl);
    const int64_t inner = sl.ndim ? sl.shape[sl.ndim - 1] : 1;
    const int64_t ss = sl.ndim ? sl.stride[sl.ndim - 1] : 1, ds = dl.ndim ? dl.stride[dl.ndim - 1] : 1;
    const int64_t rows = inner ? n / inner : 0;
    pool_.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const float* s = src + strided_offset(r * inner, sl);
                           float* d = dst + strided_offset(r * inner, dl);
                           for (int64_t j = 0; j < inner; ++j) d[j * ds] = s[j * ss];
                         }
                       });
    return Status::Ok;
  }

  Status softmax(float* out, const float* in, int64_t rows, int64_t cols, bool log) override {
    pool_.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const float* x = in + r * cols;
                           float* y = out + r * cols;
                           float mx = -INFINITY;
                           for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, x[j]);
                           double sum = 0.0;
                           for (int64_t j = 0; j < cols; ++j) sum += std::exp(double(x[j] - mx));
                           if (log) {
                             const float lse = mx + static_cast<float>(std::log(sum));
                             for (int64_t j = 0; j < cols; ++j) y[j] = x[j] - lse;
                           } else {
                             const float inv = static_cast<float>(1.0 / sum);
                             for (int64_t j = 0; j < cols; ++j) y[j] = std::exp(x[j] - mx) * inv;
                           }
                         }
                       });
    return Status::Ok;
  }

  // softmax: dx = y ⊙ (dy - Σ dy⊙y);  log-softmax: dx = dy - exp(y)·Σ dy
  Status softmax_backward(float* dx, const float* dy, const float* y, int64_t rows, int64_t cols,
                          bool log) override {
    pool_.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const float* g = dy + r * cols;
                           const float* yy = y + r * cols;
                           float* d = dx + r * cols;
                           double dot = 0.0;
                           if (log) {
                             for (int64_t j = 0; j < cols; ++j) dot += g[j];
                             for (int64_t j = 0; j < cols; ++j)
                               d[j] = g[j] - std::exp(yy[j]) * static_cast<float>(dot);
                           } else {
                             for (int64_t j = 0; j < cols; ++j) dot += double(g[j]) * yy[j];
                             for (int64_t j = 0; j < cols; ++j)
                               d[j] = yy[j] * (g[j] - static_cast<float>(dot));
                           }
                         }
                       });
    return Status::Ok;
  }

  Status dropout(float* out, const float* in, int64_t n, float p, uint64_t seed) override {
    const float scale = 1.0f / (1.0f - p);
    pool_.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) out[i] = dropout_keep(seed, i, p) ? in[i] * scale : 0.0f;
    });
    return Status::Ok;
  }

  Status layer_norm(float* y, float* mean, float* rstd, const float* x, const float* w,
                    const float* b, int64_t N, int64_t C, float eps) override {
    return cpu_layer_norm(pool_, y, mean, rstd, x, w, b, N, C, eps);
  }
  Status layer_norm_backward(float* dx, float* dw, float* db, const float* dy, const float* x,
                             const float* w, const float* mean, const float* rstd, int64_t N,
                             int64_t C) override {
    return cpu_layer_norm_backward(pool_, dx, dw, db, dy, x, w, mean, rstd, N, C);
  }
  Status rms_norm(float* y, float* rstd, const float* x, const float* w, int64_t N, int64_t C,
                  float eps) override {
    return cpu_rms_norm(pool_, y, rstd, x, w, N, C, eps);
  }
  Status rms_norm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, int64_t N, int64_t C) override {
    return cpu_rms_norm_backward(pool_, dx, dw, dy, x, w, rstd, N, C);
  }
  Status embedding(float* out, const float* table, const int32_t* ids, int64_t N, int64_t V,
                   int64_t C) override {
    return cpu_embedding(pool_, out, table, ids, N, V, C);
  }
  Status embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N,
                            int64_t V, int64_t C) override {
    return cpu_embedding_backward(pool_, dtable, dout, ids, N, V, C);
  }
  Status cross_entropy(float* loss, float* lse, const float* logits, const int32_t* targets,
                       int64_t N, int64_t V, int32_t ignore_index, float smoothing) override {
    return cpu_cross_entropy(pool_, loss, lse, logits, targets, N, V, ignore_index, smoothing);
  }
  Status cross_entropy_backward(float* dlogits, const float* dloss, const float* logits,
                                const float* lse, const int32_t* targets, int64_t N, int64_t V,
                                int32_t ignore_index, float smoothing) override {
    return cpu_cross_entropy_backward(pool_, dlogits, dloss, logits, lse, targets, N, V,
                                      ignore_index, smoothing);
  }
  Status attention(float* out, float* lse, const float* q, const float* k, const float* v,
                   const AttentionArgs& a) override {
    return cpu_attention(pool_, out, lse, q, k, v, a);
  }
  Status attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                            const float* k, const float* v, const float* out, const float* lse,
                            const AttentionArgs& a) override {
    if (!attention_args_valid(a)) return Status::InvalidArgument;
    const size_t bytes = cpu_attention_backward_workspace(a, pool_.size());
    void* ws = bytes ? alloc_.alloc(bytes) : nullptr;
    if (bytes && !ws) return Status::OutOfMemory;
    const Status st = cpu_attention_backward(pool_, ws, dq, dk, dv, dout, q, k, v, out, lse, a);
    if (ws) alloc_.free(ws, bytes);
    return st;
  }

 private:
  ThreadPool pool_;
  CachingAllocator alloc_;
};

}  // namespace

std::unique_ptr<CpuBackendBase> make_cpu_backend(int threads) {
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace lora
