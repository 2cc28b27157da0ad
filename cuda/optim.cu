// Multi-tensor optimizer steps on CUDA: one launch updates every parameter of an optimizer. The
// host packs, per block, the (tensor, first element) of a chunk of kOptimChunk elements and the
// pointer tables into device memory; each block walks its chunk. PyTorch's AdamW and SGD
// formulas (backend.h); no fused gradient clipping or AMP scaling here.
#include <cstring>

#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int64_t kOptimChunk = 16384;  // elements per block: 64 KiB of fp32, enough to amortise
struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay;
  float step_size;              // lr / (1 - beta1^step), computed in double on the host
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step), likewise
};
struct SgdArgs {
  float lr, momentum, dampening, weight_decay;
  bool nesterov, first_step;
};
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

// ---- table entries ---------------------------------------------------------------------------
namespace {

// Device copies of an optimizer's pointer tables and its chunk list.
struct Tables {
  int64_t chunks = 0;
  void* const* ptrs[4] = {nullptr, nullptr, nullptr, nullptr};
  const int64_t* n = nullptr;
  const int64_t* chunk_start = nullptr;
  const int32_t* chunk_tensor = nullptr;
};

// Packs up to four pointer tables, n and the chunk list into pinned memory, copies them to the
// device in one transfer and points `t` at the device copies. The pinned buffer is reused once
// the previous transfer from it has finished (an event), so the host never waits on kernels.
lora_status upload_tables(Context& c, int32_t count,
                          std::initializer_list<const void* const*> tables, const int64_t* n,
                          Tables* t) {
  int64_t chunks = 0;
  for (int32_t i = 0; i < count; ++i) {
    if (n[i] < 0) return LORA_INVALID_ARGUMENT;
    chunks += (n[i] + kOptimChunk - 1) / kOptimChunk;
  }
  t->chunks = chunks;
  if (chunks == 0) return LORA_OK;
  const size_t ptr_bytes = static_cast<size_t>(count) * sizeof(void*);
  const size_t bytes = 4 * ptr_bytes + static_cast<size_t>(count) * sizeof(int64_t) +
                       static_cast<size_t>(chunks) * (sizeof(int64_t) + sizeof(int32_t));
  Context::Staging& st = c.staging;
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.event == nullptr) {
    lora_status s = c.check(cudaEventCreateWithFlags(&st.event, cudaEventDisableTiming), "optimizer tables");
    if (s != LORA_OK) return s;
  } else {
    lora_status s = c.check(cudaEventSynchronize(st.event), "optimizer tables");
    if (s != LORA_OK) return s;
  }
  if (bytes > st.capacity) {
    const size_t cap = bytes * 2;  // grow geometrically: optimizers rarely change size
    if (st.dev) cudaFree(st.dev);
    if (st.host) cudaFreeHost(st.host);
    st.dev = nullptr;
    st.host = nullptr;
    st.capacity = 0;
    cudaError_t e = cudaMalloc(&st.dev, cap);
    if (e == cudaSuccess) e = cudaMallocHost(&st.host, cap);
    if (e != cudaSuccess) {
      if (st.dev) cudaFree(st.dev);
      st.dev = nullptr;
      return c.check(e, "optimizer tables");
    }
    st.capacity = cap;
  }
  unsigned char* h = static_cast<unsigned char*>(st.host);
  unsigned char* d = static_cast<unsigned char*>(st.dev);
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
  int64_t chunk = 0;
  for (int32_t i = 0; i < count; ++i)
    for (int64_t s = 0; s < n[i]; s += kOptimChunk, ++chunk) {
      starts[chunk] = s;
      owners[chunk] = i;
    }
  lora_status s = c.check(cudaMemcpyAsync(st.dev, st.host, bytes, cudaMemcpyHostToDevice, c.stream()),
                          "optimizer tables");
  if (s != LORA_OK) return s;
  return c.check(cudaEventRecord(st.event, c.stream()), "optimizer tables");
}

lora_status adamw_step(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                       float* const* m, float* const* v, const int64_t* n, float lr, float beta1,
                       float beta2, float eps, float weight_decay, int64_t step) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (count < 0 || step < 1) return LORA_INVALID_ARGUMENT;
  if (count == 0) return LORA_OK;
  // Bias corrections in double, as PyTorch (and the CPU backend) compute them on the host.
  const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(step));
  AdamWArgs a;
  a.lr = lr; a.beta1 = beta1; a.beta2 = beta2; a.eps = eps; a.weight_decay = weight_decay;
  a.step_size = static_cast<float>(lr / bc1);
  a.bias_correction2_sqrt = static_cast<float>(std::sqrt(bc2));
  Tables t;
  lora_status st = upload_tables(c, count, {reinterpret_cast<const void* const*>(p),
                                    reinterpret_cast<const void* const*>(g),
                                    reinterpret_cast<const void* const*>(m),
                                    reinterpret_cast<const void* const*>(v)},
                            n, &t);
  if (st != LORA_OK || t.chunks == 0) return st;
  return c.check(launch_adamw_step(c.stream(), t.chunks, t.chunk_tensor, t.chunk_start,
                                 reinterpret_cast<float* const*>(t.ptrs[0]),
                                 reinterpret_cast<const float* const*>(t.ptrs[1]),
                                 reinterpret_cast<float* const*>(t.ptrs[2]),
                                 reinterpret_cast<float* const*>(t.ptrs[3]), t.n, a),
               "adamw_step");
}

lora_status sgd_step(lora_backend* be, int32_t count, float* const* p, const float* const* g,
                     float* const* buf, const int64_t* n, float lr, float momentum, float dampening,
                     float weight_decay, bool nesterov, int64_t step) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (count < 0) return LORA_INVALID_ARGUMENT;
  if (count == 0) return LORA_OK;
  if (momentum != 0.0f) {
    if (buf == nullptr) return LORA_INVALID_ARGUMENT;
    for (int32_t i = 0; i < count; ++i)
      if (buf[i] == nullptr && n[i] > 0) return LORA_INVALID_ARGUMENT;
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
      return LORA_OUT_OF_MEMORY;
    }
    bufs = nulls.data();
  }
  Tables t;
  lora_status st = upload_tables(c, count, {reinterpret_cast<const void* const*>(p),
                                    reinterpret_cast<const void* const*>(g), bufs, nullptr},
                            n, &t);
  if (st != LORA_OK || t.chunks == 0) return st;
  return c.check(launch_sgd_step(c.stream(), t.chunks, t.chunk_tensor, t.chunk_start,
                               reinterpret_cast<float* const*>(t.ptrs[0]),
                               reinterpret_cast<const float* const*>(t.ptrs[1]),
                               reinterpret_cast<float* const*>(t.ptrs[2]), t.n, a),
               "sgd_step");
}

}  // namespace

void register_optim(lora_backend& t) {
  t.adamw_step = adamw_step;
  t.sgd_step = sgd_step;
}

void optim_release(Context& c) {
  Context::Staging& st = c.staging;
  std::lock_guard<std::mutex> lock(st.mu);
  if (st.dev) cudaFree(st.dev);
  if (st.host) cudaFreeHost(st.host);
  if (st.event) cudaEventDestroy(st.event);
  st.dev = st.host = nullptr;
  st.event = nullptr;
  st.capacity = 0;
}

}  // namespace cuda
}  // namespace lora
