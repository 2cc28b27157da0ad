// lora::Backend on one NVIDIA GPU: a size-bucketed caching device allocator, one non-blocking
// stream, host/device copies, and every op of backend.h as launches of the kernels in this folder.
// After a sticky CUDA error (illegal address, launch failure, ...) every call returns
// Status::Unusable and last_error() says why. The library's only export is lora_cuda_create.
// Not multi-GPU: the backend uses device 0.
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <atomic>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorMisalignedAddress:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

// Allocation size classes: 512 B minimum; powers of two up to 1 MiB; above that 16 steps per
// power of two (at most 1/8 wasted), so a training loop's recurring sizes hit the cache.
size_t bucket_size(size_t bytes) {
  constexpr size_t kMin = 512;           // cudaMalloc aligns to 256 B; smaller is not worth a class
  constexpr size_t kSmall = 1u << 20;    // below 1 MiB a power of two wastes little absolute memory
  if (bytes <= kMin) return kMin;
  size_t p = kMin;
  while (p < bytes) p <<= 1;
  if (p <= kSmall) return p;
  const size_t step = p / 16;
  return (bytes + step - 1) / step * step;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, cudaStream_t stream, int sm_count)
      : device_(device), stream_(stream), sm_count_(sm_count) {
    cudaDeviceGetAttribute(&max_smem_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    const char* tc = std::getenv("LORA_CUDA_TC");  // "staged": benchmark the other GEMM variant
    tc_pipelined_ = !(tc != nullptr && std::strcmp(tc, "staged") == 0);
    const char* sk = std::getenv("LORA_CUDA_SKINNY");  // "simt": adapter GEMMs on CUDA cores
    skinny_tc_ = !(sk != nullptr && std::strcmp(sk, "simt") == 0);
  }

  ~CudaBackend() override {
    release_cached();
    std::lock_guard<std::mutex> lock(mu_);
    if (table_dev_) cudaFree(table_dev_);
    if (table_host_) cudaFreeHost(table_host_);
    if (table_event_) cudaEventDestroy(table_event_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  const char* name() const override { return "cuda"; }
  const char* last_error() const override { return error_; }
  bool unusable() const override { return unusable_; }

  // ---- memory ------------------------------------------------------------------------------
  void* alloc(size_t bytes) override {
    if (unusable_) return nullptr;
    const size_t size = bucket_size(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= size;
      return p;
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaErrorMemoryAllocation) {  // give the cache back and try once more
      cudaGetLastError();
      release_locked();
      e = cudaMalloc(&p, size);
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      note_error(e, "alloc");
      return nullptr;
    }
    return p;
  }

  void free(void* ptr, size_t bytes) override {
    if (ptr == nullptr) return;
    const size_t size = bucket_size(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    // Stream order makes reuse safe: every later use of this block is queued behind the work
    // already submitted that may still read it.
    free_[size].push_back(ptr);
    cached_ += size;
  }

  size_t cached_bytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  void release_cached() override {
    std::lock_guard<std::mutex> lock(mu_);
    release_locked();
  }

  Status upload(void* dst, const void* host_src, size_t bytes) override {
    if (unusable_) return Status::Unusable;
    if (bytes == 0) return Status::Ok;
    Status s = check(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
    if (s != Status::Ok) return s;
    return check(cudaStreamSynchronize(stream_), "upload");  // the caller may free host_src now
  }

  Status download(void* host_dst, const void* src, size_t bytes) override {
    if (unusable_) return Status::Unusable;
    if (bytes == 0) return Status::Ok;
    Status s = check(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
    if (s != Status::Ok) return s;
    return check(cudaStreamSynchronize(stream_), "download");
  }

  Status copy(void* dst, const void* src, size_t bytes) override {
    if (unusable_) return Status::Unusable;
    if (bytes == 0 || dst == src) return Status::Ok;
    return check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }

  Status fill(float* out, float value, int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    return check(launch_fill(stream_, out, value, n), "fill");
  }

  Status synchronize() override {
    if (unusable_) return Status::Unusable;
    return check(cudaStreamSynchronize(stream_), "synchronize");
  }

  Status convert(void* out, DType out_dtype, const void* in, DType in_dtype, int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    if (out_dtype == DType::I32 || in_dtype == DType::I32) return Status::Unsupported;
    return check(launch_convert(stream_, out, out_dtype, in, in_dtype, n), "convert");
  }

  // ---- LoRA ----------------------------------------------------------------------------------
  // h = x̃·Aᵀ (fp32, its own skinny GEMM);  y = x·Wᵀ + b + s·h·Bᵀ (one GEMM, LoRA in the epilogue)
  Status lora_forward(float* y, float* h, const float* x, const void* W, DType w_dtype,
                      const float* b, const float* A, const float* B, int64_t N, int64_t C,
                      int64_t OC, int64_t R, float s, float dropout_p, uint64_t seed) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C < 0 || OC < 0 || R < 0 || !(dropout_p >= 0.0f && dropout_p < 1.0f))
      return Status::InvalidArgument;
    if (w_dtype == DType::I32) return Status::Unsupported;
    if (R > 0) {
      GemmArgs hg;
      hg.Cm = h; hg.ldc = R;
      hg.Am = x; hg.lda = C;
      hg.Bm = A; hg.ldb = C;
      hg.M = N; hg.Nn = R; hg.K = C;
      hg.drop_a = make_dropout(dropout_p, seed, C);
      Status st = adapter_gemm(hg, false, true, "lora_forward (h)");
      if (st != Status::Ok) return st;
    }
    LoraEpilogue epi;
    epi.bias = b;
    if (R > 0) {
      epi.L = h; epi.ldl = R;
      epi.Rm = B; epi.rs_n = R; epi.rs_r = 1;
      epi.R = R;
      epi.s = s;
    }
    if (w_dtype == DType::F32) {
      GemmArgs yg;
      yg.Cm = y; yg.ldc = OC;
      yg.Am = x; yg.lda = C;
      yg.Bm = static_cast<const float*>(W); yg.ldb = C;
      yg.M = N; yg.Nn = OC; yg.K = C;
      yg.lora = epi;
      return check(launch_gemm_simt(stream_, yg, false, true, sm_count_), "lora_forward");
    }
    return base_gemm_tc(y, OC, x, W, w_dtype, C, true, N, OC, C, epi, "lora_forward");
  }

  // h = x̃·Aᵀ; y = x·Wᵀ + b + s·h·Bᵀ
  // dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)   (one GEMM for dx)
  Status lora_backward(float* dx, float* dA, float* dB, const float* dy, const float* x,
                       const float* h, const void* W, DType w_dtype, const float* A,
                       const float* B, int64_t N, int64_t C, int64_t OC, int64_t R, float s,
                       float dropout_p, uint64_t seed) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C < 0 || OC < 0 || R < 0 || !(dropout_p >= 0.0f && dropout_p < 1.0f))
      return Status::InvalidArgument;
    if (w_dtype == DType::I32) return Status::Unsupported;
    Status st = Status::Ok;
    if (dB != nullptr && R > 0) {
      GemmArgs g;
      g.Cm = dB; g.ldc = R;
      g.Am = dy; g.lda = OC;  // dyᵀ: stored (N, OC), used transposed
      g.Bm = h; g.ldb = R;
      g.M = OC; g.Nn = R; g.K = N;
      g.alpha = s; g.beta = 1.0f;
      st = adapter_gemm(g, true, false, "lora_backward (dB)");
      if (st != Status::Ok) return st;
    }
    float* dh = nullptr;
    const size_t dh_bytes = static_cast<size_t>(N * R) * sizeof(float);
    if ((dA != nullptr || dx != nullptr) && R > 0 && N > 0) {
      dh = static_cast<float*>(alloc(dh_bytes));
      if (dh == nullptr) return unusable_ ? Status::Unusable : Status::OutOfMemory;
      GemmArgs g;
      g.Cm = dh; g.ldc = R;
      g.Am = dy; g.lda = OC;
      g.Bm = B; g.ldb = R;
      g.M = N; g.Nn = R; g.K = OC;
      g.alpha = s;
      st = adapter_gemm(g, false, false, "lora_backward (dh)");
    }
    if (st == Status::Ok && dA != nullptr && dh != nullptr && skinny_tc_ && R <= 64) {
      // dAᵀ (C, R) = x̃ᵀ·dh on the tensor-core path, stored transposed into dA (R, C).
      GemmArgs g;
      g.Cm = dA; g.ldc = C;
      g.Am = x; g.lda = C;    // x̃ᵀ: stored (N, C), used transposed
      g.Bm = dh; g.ldb = R;
      g.M = C; g.Nn = R; g.K = N;
      g.beta = 1.0f;
      g.drop_a = make_dropout(dropout_p, seed, C);
      st = check(launch_gemm_skinny(stream_, g, true, false, true, sm_count_), "lora_backward (dA)");
    } else if (st == Status::Ok && dA != nullptr && dh != nullptr) {
      GemmArgs g;
      g.Cm = dA; g.ldc = C;
      g.Am = dh; g.lda = R;  // dhᵀ: stored (N, R), used transposed
      g.Bm = x; g.ldb = C;
      g.M = R; g.Nn = C; g.K = N;
      g.beta = 1.0f;
      g.drop_b = make_dropout(dropout_p, seed, C);
      st = check(launch_gemm_simt(stream_, g, true, false, sm_count_), "lora_backward (dA)");
    }
    if (st == Status::Ok && dx != nullptr) {
      LoraEpilogue epi;
      if (dh != nullptr) {
        epi.L = dh; epi.ldl = R;
        epi.Rm = A; epi.rs_n = 1; epi.rs_r = C;
        epi.R = R;
        epi.s = 1.0f;
        epi.drop = make_dropout(dropout_p, seed, C);
      }
      if (w_dtype == DType::F32) {
        GemmArgs g;
        g.Cm = dx; g.ldc = C;
        g.Am = dy; g.lda = OC;
        g.Bm = static_cast<const float*>(W); g.ldb = C;
        g.M = N; g.Nn = C; g.K = OC;
        g.lora = epi;
        st = check(launch_gemm_simt(stream_, g, false, false, sm_count_), "lora_backward (dx)");
      } else {
        st = base_gemm_tc(dx, C, dy, W, w_dtype, C, false, N, C, OC, epi, "lora_backward (dx)");
      }
    }
    if (dh != nullptr) free(dh, dh_bytes);
    return st;
  }

  Status lora_merge(void* W, DType w_dtype, const float* A, const float* B, int64_t OC, int64_t C,
                    int64_t R, float s) override {
    if (unusable_) return Status::Unusable;
    if (OC < 0 || C < 0 || R < 0) return Status::InvalidArgument;
    if (w_dtype == DType::I32) return Status::Unsupported;
    return check(launch_lora_merge(stream_, W, w_dtype, A, B, OC, C, R, s), "lora_merge");
  }

  // ---- optimizers ----------------------------------------------------------------------------
  Status adamw_step(int32_t count, float* const* p, const float* const* g, float* const* m,
                    float* const* v, const int64_t* n, float lr, float beta1, float beta2,
                    float eps, float weight_decay, int64_t step) override {
    if (unusable_) return Status::Unusable;
    if (count < 0 || step < 1) return Status::InvalidArgument;
    if (count == 0) return Status::Ok;
    // Bias corrections in double, as PyTorch (and the CPU backend) compute them on the host.
    const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
    const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
    AdamWArgs a;
    a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.weight_decay = weight_decay;
    a.step_size = static_cast<float>(lr / bc1);
    a.bias_correction2_sqrt = static_cast<float>(std::sqrt(bc2));
    Tables t;
    Status st = upload_tables(count, {reinterpret_cast<const void* const*>(p),
                                      reinterpret_cast<const void* const*>(g),
                                      reinterpret_cast<const void* const*>(m),
                                      reinterpret_cast<const void* const*>(v)},
                              n, &t);
    if (st != Status::Ok || t.chunks == 0) return st;
    return check(launch_adamw_step(stream_, t.chunks, t.chunk_tensor, t.chunk_start,
                                   reinterpret_cast<float* const*>(t.ptrs[0]),
                                   reinterpret_cast<const float* const*>(t.ptrs[1]),
                                   reinterpret_cast<float* const*>(t.ptrs[2]),
                                   reinterpret_cast<float* const*>(t.ptrs[3]), t.n, a),
                 "adamw_step");
  }

  Status sgd_step(int32_t count, float* const* p, const float* const* g, float* const* buf,
                  const int64_t* n, float lr, float momentum, float dampening, float weight_decay,
                  bool nesterov, int64_t step) override {
    if (unusable_) return Status::Unusable;
    if (count < 0) return Status::InvalidArgument;
    if (count == 0) return Status::Ok;
    if (momentum != 0.0f) {
      if (buf == nullptr) return Status::InvalidArgument;
      for (int32_t i = 0; i < count; ++i)
        if (buf[i] == nullptr && n[i] > 0) return Status::InvalidArgument;
    }
    SgdArgs a;
    a.lr = lr; a.momentum = momentum; a.dampening = dampening; a.weight_decay = weight_decay;
    a.nesterov = nesterov;
    a.first_step = step <= 1;
    std::vector<const void*> nulls;
    const void* const* bufs = reinterpret_cast<const void* const*>(buf);
    if (bufs == nullptr) {
      try {
        nulls.assign(static_cast<size_t>(count), nullptr);
      } catch (const std::bad_alloc&) {
        return Status::OutOfMemory;
      }
      bufs = nulls.data();
    }
    Tables t;
    Status st = upload_tables(count, {reinterpret_cast<const void* const*>(p),
                                      reinterpret_cast<const void* const*>(g), bufs, nullptr},
                              n, &t);
    if (st != Status::Ok || t.chunks == 0) return st;
    return check(launch_sgd_step(stream_, t.chunks, t.chunk_tensor, t.chunk_start,
                                 reinterpret_cast<float* const*>(t.ptrs[0]),
                                 reinterpret_cast<const float* const*>(t.ptrs[1]),
                                 reinterpret_cast<float* const*>(t.ptrs[2]), t.n, a),
                 "sgd_step");
  }

  // ---- general ops ---------------------------------------------------------------------------
  Status gemm(float* Cm, const float* Am, const float* Bm, int64_t M, int64_t Nn, int64_t K,
              bool trans_a, bool trans_b, int64_t lda, int64_t ldb, int64_t ldc, float alpha,
              float beta, int64_t batch, int64_t stride_a, int64_t stride_b,
              int64_t stride_c) override {
    GemmArgs g = plain_gemm(Cm, Am, M, Nn, K, lda, ldb, ldc, alpha, beta, batch, stride_a, stride_b, stride_c);
    g.Bm = Bm;
    return simt_gemm(g, trans_a, trans_b, "gemm");
  }

  // The same with B as bf16 (linear() on a frozen bf16 weight): read in place, widened exactly.
  Status gemm_bf16(float* Cm, const float* Am, const uint16_t* Bm, int64_t M, int64_t Nn, int64_t K,
                   bool trans_a, bool trans_b, int64_t lda, int64_t ldb, int64_t ldc, float alpha,
                   float beta, int64_t batch, int64_t stride_a, int64_t stride_b,
                   int64_t stride_c) override {
    GemmArgs g = plain_gemm(Cm, Am, M, Nn, K, lda, ldb, ldc, alpha, beta, batch, stride_a, stride_b, stride_c);
    g.Bm16 = Bm;
    return simt_gemm(g, trans_a, trans_b, "gemm_bf16");
  }

  Status binary(BinaryOp op, float* out, const float* a, const float* b, const Layout& a_layout,
                const Layout& b_layout) override {
    if (unusable_) return Status::Unusable;
    if (!valid(a_layout) || !valid(b_layout) || a_layout.ndim != b_layout.ndim)
      return Status::InvalidArgument;
    return check(launch_binary(stream_, op, out, a, b, a_layout, b_layout), "binary");
  }

  Status binary_scalar(BinaryOp op, float* out, const float* a, float scalar, bool scalar_first,
                       int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    return check(launch_binary_scalar(stream_, op, out, a, scalar, scalar_first, n), "binary_scalar");
  }

  Status unary(UnaryOp op, float* out, const float* in, int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    return check(launch_unary(stream_, op, out, in, n), "unary");
  }

  Status unary_backward(UnaryOp op, float* dx, const float* dy, const float* x, const float* y,
                        int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    return check(launch_unary_backward(stream_, op, dx, dy, x, y, n), "unary_backward");
  }

  Status axpy(float* y, const float* x, float a, int64_t n) override {
    if (unusable_) return Status::Unusable;
    if (n < 0) return Status::InvalidArgument;
    return check(launch_axpy(stream_, y, x, a, n), "axpy");
  }

  Status reduce(ReduceOp op, float* out, const float* in, int64_t outer, int64_t dim,
                int64_t inner) override {
    if (unusable_) return Status::Unusable;
    if (outer < 0 || dim < 0 || inner < 0) return Status::InvalidArgument;
    const int64_t splits = reduce_splits(outer, dim, inner, sm_count_);
    if (splits <= 1) return check(launch_reduce(stream_, op, out, in, outer, dim, inner, nullptr, 1), "reduce");
    const size_t bytes = static_cast<size_t>(outer * inner * splits) * sizeof(double);
    double* partial = static_cast<double*>(alloc(bytes));
    if (partial == nullptr) return unusable_ ? Status::Unusable : Status::OutOfMemory;
    Status st = check(launch_reduce(stream_, op, out, in, outer, dim, inner, partial, splits), "reduce");
    free(partial, bytes);
    return st;
  }

  Status copy_strided(float* dst, const Layout& dst_layout, const float* src,
                      const Layout& src_layout) override {
    if (unusable_) return Status::Unusable;
    if (!valid(dst_layout) || !valid(src_layout) || dst_layout.ndim != src_layout.ndim)
      return Status::InvalidArgument;
    return check(launch_copy_strided(stream_, dst, dst_layout, src, src_layout), "copy_strided");
  }

  Status softmax(float* out, const float* in, int64_t rows, int64_t cols, bool log) override {
    if (unusable_) return Status::Unusable;
    if (rows < 0 || cols < 0) return Status::InvalidArgument;
    return check(launch_softmax(stream_, out, in, rows, cols, log), "softmax");
  }

  Status softmax_backward(float* dx, const float* dy, const float* y, int64_t rows, int64_t cols,
                          bool log) override {
    if (unusable_) return Status::Unusable;
    if (rows < 0 || cols < 0) return Status::InvalidArgument;
    return check(launch_softmax_backward(stream_, dx, dy, y, rows, cols, log), "softmax_backward");
  }

  Status dropout(float* out, const float* in, int64_t n, float p, uint64_t seed) override {
    if (unusable_) return Status::Unusable;
    if (n < 0 || !(p >= 0.0f && p < 1.0f)) return Status::InvalidArgument;
    if (p == 0.0f) return copy(out, in, static_cast<size_t>(n) * sizeof(float));
    return check(launch_dropout(stream_, out, in, n, p, seed), "dropout");
  }

  // ---- normalisation, embedding, cross-entropy (nn.cu), attention (attention.cu) -----------
  Status layer_norm(float* y, float* mean, float* rstd, const float* x, const float* w,
                    const float* b, int64_t N, int64_t C, float eps) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C <= 0) return N == 0 ? Status::Ok : Status::InvalidArgument;
    return check(launch_layer_norm(stream_, y, mean, rstd, x, w, b, N, C, eps, false), "layer_norm");
  }
  Status layer_norm_backward(float* dx, float* dw, float* db, const float* dy, const float* x,
                             const float* w, const float* mean, const float* rstd, int64_t N,
                             int64_t C) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C < 0) return Status::InvalidArgument;
    return check(launch_layer_norm_backward(stream_, dx, dw, db, dy, x, w, mean, rstd, N, C, false),
                 "layer_norm_backward");
  }
  Status rms_norm(float* y, float* rstd, const float* x, const float* w, int64_t N, int64_t C,
                  float eps) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C <= 0) return N == 0 ? Status::Ok : Status::InvalidArgument;
    return check(launch_layer_norm(stream_, y, nullptr, rstd, x, w, nullptr, N, C, eps, true), "rms_norm");
  }
  Status rms_norm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w,
                           const float* rstd, int64_t N, int64_t C) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || C < 0) return Status::InvalidArgument;
    return check(launch_layer_norm_backward(stream_, dx, dw, nullptr, dy, x, w, nullptr, rstd, N, C, true),
                 "rms_norm_backward");
  }
  Status embedding(float* out, const float* table, const int32_t* ids, int64_t N, int64_t V,
                   int64_t C) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || V < 0 || C < 0) return Status::InvalidArgument;
    Status st = ids_valid(ids, N, V, false, 0, "embedding");
    if (st != Status::Ok) return st;
    return check(launch_embedding(stream_, out, table, ids, N, C, false), "embedding");
  }
  Status embedding_backward(float* dtable, const float* dout, const int32_t* ids, int64_t N,
                            int64_t V, int64_t C) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || V < 0 || C < 0) return Status::InvalidArgument;
    Status st = ids_valid(ids, N, V, false, 0, "embedding_backward");
    if (st != Status::Ok) return st;
    return check(launch_embedding(stream_, dtable, dout, ids, N, C, true), "embedding_backward");
  }
  Status cross_entropy(float* loss, float* lse, const float* logits, const int32_t* targets,
                       int64_t N, int64_t V, int32_t ignore_index, float smoothing) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || V <= 0) return N == 0 ? Status::Ok : Status::InvalidArgument;
    Status st = ids_valid(targets, N, V, true, ignore_index, "cross_entropy");
    if (st != Status::Ok) return st;
    return check(launch_cross_entropy(stream_, loss, lse, logits, targets, N, V, ignore_index, smoothing),
                 "cross_entropy");
  }
  Status cross_entropy_backward(float* dlogits, const float* dloss, const float* logits,
                                const float* lse, const int32_t* targets, int64_t N, int64_t V,
                                int32_t ignore_index, float smoothing) override {
    if (unusable_) return Status::Unusable;
    if (N < 0 || V < 0) return Status::InvalidArgument;
    Status st = ids_valid(targets, N, V, true, ignore_index, "cross_entropy_backward");
    if (st != Status::Ok) return st;
    return check(launch_cross_entropy_backward(stream_, dlogits, dloss, logits, lse, targets, N, V,
                                               ignore_index, smoothing),
                 "cross_entropy_backward");
  }
  Status attention(float* out, float* lse, const float* q, const float* k, const float* v,
                   const AttentionArgs& a) override {
    if (unusable_) return Status::Unusable;
    if (!attention_args_valid(a)) return Status::InvalidArgument;
    if (a.B * a.T * a.H == 0) return Status::Ok;
    if (!attention_supported(a, static_cast<size_t>(max_smem_optin_))) return Status::Unsupported;
    return check(launch_attention(stream_, out, lse, q, k, v, a, static_cast<size_t>(max_smem_optin_)),
                 "attention");
  }
  Status attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                            const float* k, const float* v, const float* out, const float* lse,
                            const AttentionArgs& a) override {
    if (unusable_) return Status::Unusable;
    if (!attention_args_valid(a)) return Status::InvalidArgument;
    if (a.B * a.H == 0) return Status::Ok;
    if (!attention_supported(a, static_cast<size_t>(max_smem_optin_))) return Status::Unsupported;
    const size_t bytes = static_cast<size_t>(a.B * a.H * a.T + 1) * sizeof(float);
    float* delta = static_cast<float*>(alloc(bytes));
    if (delta == nullptr) return unusable_ ? Status::Unusable : Status::OutOfMemory;
    Status st = check(launch_attention_backward(stream_, dq, dk, dv, delta, dout, q, k, v, out, lse, a,
                                                static_cast<size_t>(max_smem_optin_)),
                      "attention_backward");
    free(delta, bytes);  // stream order keeps it alive for the kernels
    return st;
  }

 private:
  // Device copies of an optimizer's pointer tables and its chunk list.
  struct Tables {
    int64_t chunks = 0;
    void* const* ptrs[4] = {nullptr, nullptr, nullptr, nullptr};
    const int64_t* n = nullptr;
    const int64_t* chunk_start = nullptr;
    const int32_t* chunk_tensor = nullptr;
  };

  static OperandDropout make_dropout(float p, uint64_t seed, int64_t ld) {
    OperandDropout d;
    if (p > 0.0f) {
      d.p = p;
      d.scale = 1.0f / (1.0f - p);  // as the CPU backend computes it
      d.seed = seed;
      d.ld = ld;
    }
    return d;
  }

  // The GemmArgs of a plain C = alpha·op(A)·op(B) + beta·C (B set by the caller).
  static GemmArgs plain_gemm(float* Cm, const float* Am, int64_t M, int64_t Nn, int64_t K, int64_t lda,
                             int64_t ldb, int64_t ldc, float alpha, float beta, int64_t batch,
                             int64_t stride_a, int64_t stride_b, int64_t stride_c) {
    GemmArgs g;
    g.Cm = Cm; g.Am = Am;
    g.M = M; g.Nn = Nn; g.K = K;
    g.lda = lda; g.ldb = ldb; g.ldc = ldc;
    g.alpha = alpha; g.beta = beta;
    g.batch = batch; g.stride_a = stride_a; g.stride_b = stride_b; g.stride_c = stride_c;
    return g;
  }

  Status simt_gemm(const GemmArgs& g, bool trans_a, bool trans_b, const char* what) {
    if (unusable_) return Status::Unusable;
    if (g.M < 0 || g.Nn < 0 || g.K < 0 || g.batch < 0) return Status::InvalidArgument;
    return check(launch_gemm_simt(stream_, g, trans_a, trans_b, sm_count_), what);
  }

  static bool valid(const Layout& l) {
    if (l.ndim < 0 || l.ndim > kMaxDims) return false;
    for (int d = 0; d < l.ndim; ++d)
      if (l.shape[d] < 0) return false;
    return true;
  }

  // The adapter GEMMs (h, dh, dB: at most 64 columns) on tensor cores in 3xTF32, or on the fp32
  // SIMT engine for wider ranks or with LORA_CUDA_SKINNY=simt.
  Status adapter_gemm(const GemmArgs& g, bool trans_a, bool trans_b, const char* what) {
    if (skinny_tc_ && g.Nn <= 64) return check(launch_gemm_skinny(stream_, g, trans_a, trans_b, false, sm_count_), what);
    return check(launch_gemm_simt(stream_, g, trans_a, trans_b, sm_count_), what);
  }

  // out (M, Nn) = X (M, K, contiguous) · op(W) + epi on tensor cores. When the shape allows, X is
  // rounded to W's type once into a workspace and the cp.async pipeline runs; else the
  // register-staged kernel rounds it tile by tile. LORA_CUDA_TC=staged forces the latter.
  Status base_gemm_tc(float* out, int64_t ldo, const float* X, const void* W, DType w_dtype,
                      int64_t ldw, bool w_nk, int64_t M, int64_t Nn, int64_t K,
                      const LoraEpilogue& epi, const char* what) {
    if (!tc_pipelined_ || M <= 0 || Nn <= 0 || K <= 0 ||
        !gemm_tc_pipelined_ok(K, Nn, ldw, W, w_nk)) {
      return check(launch_gemm_tc(stream_, out, ldo, X, K, nullptr, W, w_dtype, ldw, w_nk, M, Nn,
                                  K, epi),
                   what);
    }
    const size_t bytes = static_cast<size_t>(M * K) * 2;
    void* x16 = alloc(bytes);
    if (x16 == nullptr) return unusable_ ? Status::Unusable : Status::OutOfMemory;
    Status st = check(launch_convert(stream_, x16, w_dtype, X, DType::F32, M * K), what);
    if (st == Status::Ok)
      st = check(launch_gemm_tc(stream_, out, ldo, X, K, x16, W, w_dtype, ldw, w_nk, M, Nn, K, epi),
                 what);
    free(x16, bytes);  // stream order keeps it alive for the kernel
    return st;
  }


  // Checks ids on the device before a kernel writes anything (the contract): one flag, one sync.
  Status ids_valid(const int32_t* ids, int64_t N, int64_t V, bool allow_ignore, int32_t ignore,
                   const char* what) {
    if (N == 0) return Status::Ok;
    int* flag = static_cast<int*>(alloc(sizeof(int)));
    if (flag == nullptr) return unusable_ ? Status::Unusable : Status::OutOfMemory;
    int bad = 0;
    Status st = check(launch_ids_check(stream_, flag, ids, N, V, allow_ignore, ignore), what);
    if (st == Status::Ok) st = download(&bad, flag, sizeof(int));
    free(flag, sizeof(int));
    if (st != Status::Ok) return st;
    return bad ? Status::InvalidArgument : Status::Ok;
  }

  // Packs up to four pointer tables, n and the chunk list into pinned memory, copies them to the
  // device in one transfer and points `t` at the device copies. The pinned buffer is reused once
  // the previous transfer from it has finished (an event), so the host never waits on kernels.
  Status upload_tables(int32_t count, std::initializer_list<const void* const*> tables,
                       const int64_t* n, Tables* t) {
    int64_t chunks = 0;
    for (int32_t i = 0; i < count; ++i) {
      if (n[i] < 0) return Status::InvalidArgument;
      chunks += (n[i] + kOptimChunk - 1) / kOptimChunk;
    }
    t->chunks = chunks;
    if (chunks == 0) return Status::Ok;
    const size_t ptr_bytes = static_cast<size_t>(count) * sizeof(void*);
    const size_t bytes = 4 * ptr_bytes + static_cast<size_t>(count) * sizeof(int64_t) +
                         static_cast<size_t>(chunks) * (sizeof(int64_t) + sizeof(int32_t));
    std::lock_guard<std::mutex> lock(table_mu_);
    if (table_event_ == nullptr) {
      Status s = check(cudaEventCreateWithFlags(&table_event_, cudaEventDisableTiming), "optimizer tables");
      if (s != Status::Ok) return s;
    } else {
      Status s = check(cudaEventSynchronize(table_event_), "optimizer tables");
      if (s != Status::Ok) return s;
    }
    if (bytes > table_capacity_) {
      const size_t cap = bytes * 2;  // grow geometrically: optimizers rarely change size
      if (table_dev_) cudaFree(table_dev_);
      if (table_host_) cudaFreeHost(table_host_);
      table_dev_ = nullptr;
      table_host_ = nullptr;
      table_capacity_ = 0;
      cudaError_t e = cudaMalloc(&table_dev_, cap);
      if (e == cudaSuccess) e = cudaMallocHost(&table_host_, cap);
      if (e != cudaSuccess) {
        if (table_dev_) cudaFree(table_dev_);
        table_dev_ = nullptr;
        return check(e, "optimizer tables");
      }
      table_capacity_ = cap;
    }
    unsigned char* h = static_cast<unsigned char*>(table_host_);
    unsigned char* d = static_cast<unsigned char*>(table_dev_);
    size_t off = 0;
    int k = 0;
    for (const void* const* tab : tables) {
      if (tab != nullptr) std::memcpy(h + off, tab, ptr_bytes);
      else std::memset(h + off, 0, ptr_bytes);
      t->ptrs[k++] = reinterpret_cast<void* const*>(d + off);
      off += ptr_bytes;
    }
    off = 4 * ptr_bytes;
    std::memcpy(h + off, n, static_cast<size_t>(count) * sizeof(int64_t));
    t->n = reinterpret_cast<const int64_t*>(d + off);
    off += static_cast<size_t>(count) * sizeof(int64_t);
    int64_t* starts = reinterpret_cast<int64_t*>(h + off);
    t->chunk_start = reinterpret_cast<const int64_t*>(d + off);
    off += static_cast<size_t>(chunks) * sizeof(int64_t);
    int32_t* owners = reinterpret_cast<int32_t*>(h + off);
    t->chunk_tensor = reinterpret_cast<const int32_t*>(d + off);
    int64_t c = 0;
    for (int32_t i = 0; i < count; ++i)
      for (int64_t s = 0; s < n[i]; s += kOptimChunk, ++c) {
        starts[c] = s;
        owners[c] = i;
      }
    Status s = check(cudaMemcpyAsync(table_dev_, table_host_, bytes, cudaMemcpyHostToDevice, stream_),
                     "optimizer tables");
    if (s != Status::Ok) return s;
    return check(cudaEventRecord(table_event_, stream_), "optimizer tables");
  }

  void release_locked() {
    if (!free_.empty()) cudaStreamSynchronize(stream_);  // cudaFree syncs too; be explicit
    for (auto& kv : free_)
      for (void* p : kv.second) cudaFree(p);
    free_.clear();
    cached_ = 0;
  }

  // Turns a CUDA error into a Status, remembering its text; sticky errors poison the backend.
  Status check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return Status::Ok;
    cudaGetLastError();  // clear a non-sticky error so the next launch does not report it again
    return note_error(e, what);
  }

  Status note_error(cudaError_t e, const char* what) {
    char buf[512];
    if (is_sticky(e)) {
      unusable_ = true;
      std::snprintf(buf, sizeof buf,
                    "CUDA error in %s: %s (%s). The GPU context is unusable after this error; "
                    "restart the process to use CUDA again.",
                    what, cudaGetErrorString(e), cudaGetErrorName(e));
      set_error_text(buf);
      return Status::Unusable;
    }
    std::snprintf(buf, sizeof buf, "CUDA error in %s: %s (%s)", what, cudaGetErrorString(e),
                  cudaGetErrorName(e));
    set_error_text(buf);
    return e == cudaErrorMemoryAllocation ? Status::OutOfMemory : Status::DeviceError;
  }

  // Methods may run on libuv worker threads (the async binding calls) as well as the JS thread:
  // the stream is shared (the CUDA runtime is thread-safe), the error text is a fixed buffer
  // written under a lock, so a reader never sees freed memory.
  void set_error_text(const char* text) {
    std::lock_guard<std::mutex> lock(error_mu_);
    std::snprintf(error_, sizeof error_, "%s", text);
  }

  int device_;
  cudaStream_t stream_;
  int sm_count_;
  bool tc_pipelined_ = true;
  bool skinny_tc_ = true;
  int max_smem_optin_ = 48 * 1024;  // bytes of shared memory one block may opt into
  std::atomic<bool> unusable_{false};
  std::mutex error_mu_;
  char error_[512] = {0};

  mutable std::mutex mu_;  // allocator state
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;

  std::mutex table_mu_;  // optimizer table staging
  void* table_dev_ = nullptr;
  void* table_host_ = nullptr;
  size_t table_capacity_ = 0;
  cudaEvent_t table_event_ = nullptr;
};

void set_error(char* err, size_t err_len, const std::string& text) {
  if (err == nullptr || err_len == 0) return;
  std::snprintf(err, err_len, "%s", text.c_str());
}

std::string cuda_failure(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
}

}  // namespace
}  // namespace cuda
}  // namespace lora

// The interface version this library was built against (native/backend.h); the addon's loader
// refuses a library whose version differs from its own.
extern "C" __attribute__((visibility("default"))) int32_t lora_cuda_abi() { return lora::kBackendAbiVersion; }

// Creates the backend on device 0, or returns nullptr with the reason in err. Checks that this
// library's kernels can run there (compute capability 8.0 or newer) by running one.
extern "C" __attribute__((visibility("default"))) lora::Backend* lora_cuda_create(char* err,
                                                                                  size_t err_len) {
  using namespace lora::cuda;
  try {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaErrorInsufficientDriver) {  // the likeliest failure on a GPU machine: say what to do
      int driver = 0;
      const bool known = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0;
      const std::string built = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                                std::to_string(CUDART_VERSION % 1000 / 10);
      set_error(err, err_len,
                (known ? "the NVIDIA driver supports CUDA " + std::to_string(driver / 1000) + "." +
                             std::to_string(driver % 1000 / 10) + " but liblora_cuda.so was built with " + built
                       : "the NVIDIA driver is too old for liblora_cuda.so, which was built with " + built) +
                    " (CUDA 13 needs a driver of the R580 series or newer). Update the driver, or "
                    "rebuild liblora_cuda.so with the CUDA toolkit your driver supports "
                    "(`node scripts/build-cuda.js`) (" + cuda_failure("cudaGetDeviceCount", e) + ")");
      return nullptr;
    }
    if (e != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaGetDeviceCount failed", e));
      return nullptr;
    }
    if (count < 1) {
      set_error(err, err_len, "no CUDA device visible (CUDA_VISIBLE_DEVICES?)");
      return nullptr;
    }
    const int device = 0;
    if ((e = cudaSetDevice(device)) != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaSetDevice(0) failed", e));
      return nullptr;
    }
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (major < 8) {
      set_error(err, err_len, "GPU compute capability " + std::to_string(major) + "." +
                                  std::to_string(minor) +
                                  " is older than 8.0 (Ampere), the oldest liblora_cuda.so supports");
      return nullptr;
    }
    cudaStream_t stream = nullptr;
    if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaStreamCreate failed", e));
      return nullptr;
    }
    CudaBackend* b = new CudaBackend(device, stream, sms > 0 ? sms : 1);
    // Smoke test: one tiny kernel, so a missing kernel image or broken driver shows up here.
    float* probe = static_cast<float*>(b->alloc(sizeof(float)));
    float value = 0.0f;
    lora::Status st = probe ? b->fill(probe, 42.0f, 1) : lora::Status::OutOfMemory;
    if (st == lora::Status::Ok) st = b->download(&value, probe, sizeof(float));
    if (probe) b->free(probe, sizeof(float));
    if (st != lora::Status::Ok || value != 42.0f) {
      set_error(err, err_len, std::string("CUDA smoke test failed: ") +
                                  (b->last_error()[0] ? b->last_error() : lora::status_name(st)));
      delete b;
      return nullptr;
    }
    return b;
  } catch (const std::exception& ex) {
    set_error(err, err_len, std::string("creating the CUDA backend failed: ") + ex.what());
    return nullptr;
  }
}
