// Model-building kernels on CUDA, with the same math as native/cpu/nn_kernels.cc: layer_norm and
// rms_norm with Gemma's weight offset (+ backward, dw/db accumulated by column with atomics), embedding of an fp32, bf16 or fp16 table (+ backward with
// atomics for repeated ids), cross_entropy with label smoothing (+ backward) and RoPE. Row
// statistics accumulate in double like the CPU. Attention has its own file (attention.cu).
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kNnThreads = 256;  // one block per row: 8 warps stream the row
constexpr int kColRows = 64;     // rows per block in the column-reduction kernels (dw, db)

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T s = 0;
  for (int w = 0; w < warps; ++w) s += scratch[w];
  return s;
}

__device__ __forceinline__ float block_max(float v, float* scratch /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// y = (x - μ)·rstd·w + b over each row (rms: y = x·rstd·(offset + w)), μ and rstd kept.
template <bool RMS>
__global__ void __launch_bounds__(kNnThreads)
    norm_kernel(float* __restrict__ y,        // (N, C)
                float* __restrict__ mean,     // (N), layer norm only
                float* __restrict__ rstd,     // (N)
                const float* __restrict__ x,  // (N, C)
                const float* __restrict__ w,  // (C) or nullptr
                const float* __restrict__ b,  // (C) or nullptr, layer norm only
                int64_t C, float eps, float offset) {
  __shared__ double scratch[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * C;
  double mu = 0.0;
  if (!RMS) {
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) s += xr[j];
    mu = block_sum(s, scratch) / static_cast<double>(C);
  }
  double ss = 0.0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const double d = RMS ? static_cast<double>(xr[j]) : xr[j] - mu;
    ss += d * d;
  }
  ss = block_sum(ss, scratch);
  const float rs = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(C) + static_cast<double>(eps)));
  const float m = static_cast<float>(mu);
  float* yr = y + r * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    float v = RMS ? xr[j] * rs : (xr[j] - m) * rs;
    if (w) v *= offset + w[j];
    if (!RMS && b) v += b[j];
    yr[j] = v;
  }
  if (threadIdx.x == 0) {
    if (!RMS) mean[r] = m;
    rstd[r] = rs;
  }
}

// layer norm: x̂ = (x - μ)·rstd; g = dy⊙w;           dx = rstd·(g - mean(g) - x̂·mean(g⊙x̂))
// rms norm:   x̂ = x·rstd;       g = dy⊙(offset + w);  dx = rstd·(g - x̂·mean(g⊙x̂))
template <bool RMS>
__global__ void __launch_bounds__(kNnThreads)
    norm_backward_dx_kernel(float* __restrict__ dx,         // (N, C)
                            const float* __restrict__ dy,   // (N, C)
                            const float* __restrict__ x,    // (N, C)
                            const float* __restrict__ w,    // (C) or nullptr
                            const float* __restrict__ mean, // (N), layer norm only
                            const float* __restrict__ rstd, // (N)
                            int64_t C, float offset) {
  __shared__ double scratch[32];
  const int64_t r = blockIdx.x;
  const float* xr = x + r * C;
  const float* g = dy + r * C;
  const float m = RMS ? 0.0f : mean[r], rs = rstd[r];
  double sg = 0.0, sgx = 0.0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float xh = (xr[j] - m) * rs;
    const float gj = w ? g[j] * (offset + w[j]) : g[j];
    sg += gj;
    sgx += static_cast<double>(gj) * xh;
  }
  if (!RMS) sg = block_sum(sg, scratch);
  sgx = block_sum(sgx, scratch);
  const float mg = RMS ? 0.0f : static_cast<float>(sg / static_cast<double>(C));
  const float mgx = static_cast<float>(sgx / static_cast<double>(C));
  float* d = dx + r * C;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const float xh = (xr[j] - m) * rs;
    const float gj = w ? g[j] * (offset + w[j]) : g[j];
    d[j] = rs * (gj - mg - xh * mgx);
  }
}

// dw += Σ_rows dy⊙x̂;  db += Σ_rows dy   (a block per kColRows rows x 256 columns, atomics)
template <bool RMS>
__global__ void norm_backward_params_kernel(float* __restrict__ dw,          // (C), += or nullptr
                                            float* __restrict__ db,          // (C), += or nullptr
                                            const float* __restrict__ dy,    // (N, C)
                                            const float* __restrict__ x,     // (N, C)
                                            const float* __restrict__ mean,  // (N), layer norm only
                                            const float* __restrict__ rstd,  // (N)
                                            int64_t N, int64_t C) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kColRows;
  const int64_t r1 = min(N, r0 + kColRows);
  double pw = 0.0, pb = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const float g = dy[r * C + j];
    const float xh = RMS ? x[r * C + j] * rstd[r] : (x[r * C + j] - mean[r]) * rstd[r];
    pw += static_cast<double>(g) * xh;
    pb += g;
  }
  if (dw) atomicAdd(dw + j, static_cast<float>(pw));
  if (!RMS && db) atomicAdd(db + j, static_cast<float>(pb));
}

// *bad = 1 when any id is outside [0, V) (ids equal to `ignore` are allowed when allow_ignore).
__global__ void ids_check_kernel(int* __restrict__ bad, const int32_t* __restrict__ ids, int64_t N,
                                 int64_t V, bool allow_ignore, int32_t ignore) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t t = ids[n];
    if (allow_ignore && t == ignore) continue;
    if (t < 0 || t >= V) *bad = 1;
  }
}

__device__ __forceinline__ float table_f32(float v) { return v; }
__device__ __forceinline__ float table_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float table_f32(__half v) { return __half2float(v); }

// out[n] = float(table[ids[n]])   (T: float, __nv_bfloat16 or __half)
template <typename T>
__global__ void embedding_kernel(float* __restrict__ out,      // (N, C)
                                 const T* __restrict__ table,  // (V, C)
                                 const int32_t* __restrict__ ids,  // (N)
                                 int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    out[i] = table_f32(table[static_cast<int64_t>(ids[n]) * C + c]);
  }
}

// dtable[ids[n]] += dout[n]   (atomics: ids repeat)
__global__ void embedding_backward_kernel(float* __restrict__ dtable,      // (V, C), +=
                                          const float* __restrict__ dout,  // (N, C)
                                          const int32_t* __restrict__ ids, // (N)
                                          int64_t N, int64_t C) {
  const int64_t total = N * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = i / C, c = i % C;
    atomicAdd(dtable + static_cast<int64_t>(ids[n]) * C + c, dout[i]);
  }
}

// lse = log Σ exp(z);  q = (1-ε)·onehot(t) + ε/V;  loss = lse - Σ q⊙z  (0 where t == ignore)
__global__ void __launch_bounds__(kNnThreads)
    cross_entropy_kernel(float* __restrict__ loss,            // (N)
                         float* __restrict__ lse,             // (N)
                         const float* __restrict__ logits,    // (N, V)
                         const int32_t* __restrict__ targets, // (N)
                         int64_t V, int32_t ignore_index, float smoothing) {
  __shared__ float fscratch[32];
  __shared__ double dscratch[32];
  const int64_t r = blockIdx.x;
  const float* z = logits + r * V;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, z[j]);
  mx = block_max(mx, fscratch);
  double s = 0.0, sz = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    s += exp(static_cast<double>(z[j]) - mx);
    sz += z[j];
  }
  s = block_sum(s, dscratch);
  sz = block_sum(sz, dscratch);
  if (threadIdx.x != 0) return;
  const double l = static_cast<double>(mx) + log(s);
  lse[r] = static_cast<float>(l);
  const int32_t t = targets[r];
  loss[r] = t == ignore_index ? 0.0f
                              : static_cast<float>(l - (1.0 - smoothing) * z[t] -
                                                   (smoothing != 0.0f ? smoothing * sz / static_cast<double>(V) : 0.0));
}

// dlogits = dloss[n]·(softmax(z) - q)  (0 for ignored rows); dlogits may be logits (each thread
// reads its element before writing it), so those two are not __restrict__
__global__ void cross_entropy_backward_kernel(float* dlogits,                      // (N, V)
                                              const float* __restrict__ dloss,     // (N)
                                              const float* logits,                 // (N, V)
                                              const float* __restrict__ lse,       // (N)
                                              const int32_t* __restrict__ targets, // (N)
                                              int64_t V, int32_t ignore_index, float smoothing) {
  const int64_t r = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= V) return;
  const int32_t t = targets[r];
  float* d = dlogits + r * V;
  if (t == ignore_index) {
    d[j] = 0.0f;
    return;
  }
  const float g = dloss[r], u = smoothing / static_cast<float>(V);
  float v = g * (expf(logits[r * V + j] - lse[r]) - u);
  if (j == t) v -= g * (1.0f - smoothing);
  d[j] = v;
}

}  // namespace

cudaError_t launch_layer_norm(cudaStream_t stream, float* y, float* mean, float* rstd,
                              const float* x, const float* w, const float* b, int64_t N, int64_t C,
                              float eps, bool rms, float offset) {
  if (N <= 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  if (rms)
    launch(norm_kernel<true>, static_cast<unsigned>(N), kNnThreads, 0, stream, y, nullptr, rstd, x, w,
                                                                            nullptr, C, eps, offset);
  else
    launch(norm_kernel<false>, static_cast<unsigned>(N), kNnThreads, 0, stream, y, mean, rstd, x, w, b,
                                                                             C, eps, 0.0f);
  return cudaGetLastError();
}

cudaError_t launch_layer_norm_backward(cudaStream_t stream, float* dx, float* dw, float* db,
                                       const float* dy, const float* x, const float* w,
                                       const float* mean, const float* rstd, int64_t N, int64_t C,
                                       bool rms, float offset) {
  if (N <= 0 || C <= 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  if (rms)
    launch(norm_backward_dx_kernel<true>, static_cast<unsigned>(N), kNnThreads, 0, stream, dx, dy, x, w,
                                                                                        nullptr, rstd, C, offset);
  else
    launch(norm_backward_dx_kernel<false>, static_cast<unsigned>(N), kNnThreads, 0, stream, dx, dy, x, w,
                                                                                         mean, rstd, C, 0.0f);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || (dw == nullptr && db == nullptr)) return e;
  // dw, db accumulate (atomics), so rows beyond one grid's gridDim.y limit go in further slices.
  constexpr int64_t kSliceRows = 65535 * static_cast<int64_t>(kColRows);
  for (int64_t r0 = 0; r0 < N; r0 += kSliceRows) {
    const int64_t n = N - r0 < kSliceRows ? N - r0 : kSliceRows;
    const int64_t gy = (n + kColRows - 1) / kColRows;
    const dim3 grid(static_cast<unsigned>((C + kNnThreads - 1) / kNnThreads), static_cast<unsigned>(gy));
    const float* dys = dy + r0 * C;
    const float* xs = x + r0 * C;
    if (rms)
      launch(norm_backward_params_kernel<true>, grid, kNnThreads, 0, stream, dw, nullptr, dys, xs, nullptr, rstd + r0, n, C);
    else
      launch(norm_backward_params_kernel<false>, grid, kNnThreads, 0, stream, dw, db, dys, xs, mean + r0, rstd + r0, n, C);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t launch_ids_check(cudaStream_t stream, int* bad, const int32_t* ids, int64_t N, int64_t V,
                             bool allow_ignore, int32_t ignore) {
  cudaError_t e = cudaMemsetAsync(bad, 0, sizeof(int), stream);
  if (e != cudaSuccess || N <= 0) return e;
  launch(ids_check_kernel, grid_for(N), kThreads, 0, stream, bad, ids, N, V, allow_ignore, ignore);
  return cudaGetLastError();
}

cudaError_t launch_embedding(cudaStream_t stream, float* out, const void* table, lora_dtype table_dtype,
                             const int32_t* ids, int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return cudaSuccess;
  if (table_dtype == LORA_BF16)
    launch(embedding_kernel<__nv_bfloat16>, grid_for(N * C), kThreads, 0, stream, out,
           static_cast<const __nv_bfloat16*>(table), ids, N, C);
  else if (table_dtype == LORA_F16)
    launch(embedding_kernel<__half>, grid_for(N * C), kThreads, 0, stream, out, static_cast<const __half*>(table),
           ids, N, C);
  else
    launch(embedding_kernel<float>, grid_for(N * C), kThreads, 0, stream, out, static_cast<const float*>(table),
           ids, N, C);
  return cudaGetLastError();
}

cudaError_t launch_embedding_backward(cudaStream_t stream, float* dtable, const float* dout, const int32_t* ids,
                                      int64_t N, int64_t C) {
  if (N <= 0 || C <= 0) return cudaSuccess;
  launch(embedding_backward_kernel, grid_for(N * C), kThreads, 0, stream, dtable, dout, ids, N, C);
  return cudaGetLastError();
}

cudaError_t launch_cross_entropy(cudaStream_t stream, float* loss, float* lse, const float* logits,
                                 const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                                 float smoothing) {
  if (N <= 0) return cudaSuccess;
  if (N > 0x7fffffff) return cudaErrorInvalidValue;
  launch(cross_entropy_kernel, static_cast<unsigned>(N), kNnThreads, 0, stream, loss, lse, logits, targets,
                                                                            V, ignore_index, smoothing);
  return cudaGetLastError();
}

cudaError_t launch_cross_entropy_backward(cudaStream_t stream, float* dlogits, const float* dloss,
                                          const float* logits, const float* lse,
                                          const int32_t* targets, int64_t N, int64_t V,
                                          int32_t ignore_index, float smoothing) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  if (N > 65535) {  // gridDim.y limit: walk the rows in slices
    for (int64_t r0 = 0; r0 < N; r0 += 65535) {
      const int64_t n = N - r0 < 65535 ? N - r0 : 65535;
      const cudaError_t e = launch_cross_entropy_backward(stream, dlogits + r0 * V, dloss + r0,
                                                          logits + r0 * V, lse + r0, targets + r0,
                                                          n, V, ignore_index, smoothing);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }
  const dim3 grid(static_cast<unsigned>((V + kNnThreads - 1) / kNnThreads), static_cast<unsigned>(N));
  launch(cross_entropy_backward_kernel, grid, kNnThreads, 0, stream, dlogits, dloss, logits, lse, targets, V,
                                                                 ignore_index, smoothing);
  return cudaGetLastError();
}

// ---- RoPE (backend.h: rope, rope_backward) ------------------------------------------------------
namespace {

// One thread per slot of a row (one head of one token: D features, slots 0..D-R/2-1): slot
// j < R/2 rotates the pair (j, j + R/2) by sign·θ_j; slot j >= R/2 copies the passed-through
// feature j + R/2 (>= R) when y is not x. y may alias x (each element is read and written by
// one thread), hence no __restrict__ on them.
__global__ void rope_kernel(float* y,                                  // (rows, D)
                            const float* x,                            // (rows, D)
                            const int32_t* __restrict__ positions,     // (rows / H)
                            const float* __restrict__ inv_freq,        // (half)
                            int64_t rows, int64_t H, int64_t D, int64_t half, float a, float sign) {
  const int64_t slots = D - half;
  const int64_t total = rows * slots;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / slots, j = k - row * slots;
    const float* xr = x + row * D;
    float* yr = y + row * D;
    if (j < half) {
      float s, c;
      sincosf(static_cast<float>(positions[row / H]) * inv_freq[j], &s, &c);  // θ in fp32
      c *= a;
      s *= sign * a;
      const float x1 = xr[j], x2 = xr[j + half];
      yr[j] = x1 * c - x2 * s;
      yr[j + half] = x2 * c + x1 * s;
    } else if (yr != xr) {
      yr[j + half] = xr[j + half];
    }
  }
}

lora_status rope_rotate(lora_backend* be, float* y, const float* x, const int32_t* positions,
                        const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D,
                        int64_t R, float a, float sign, const char* what) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (Bt < 0 || T < 0 || H < 0 || D < 0 || R < 0 || R > D || R % 2 != 0) return LORA_INVALID_ARGUMENT;
  const int64_t total = Bt * T * H * (D - R / 2);
  if (total == 0) return LORA_OK;
  launch(rope_kernel, grid_for(total), kThreads, 0, c.stream(), y, x, positions, inv_freq, Bt * T * H, H, D,
         R / 2, a, sign);
  return c.check(cudaGetLastError(), what);
}

lora_status rope(lora_backend* be, float* y, const float* x, const int32_t* positions,
                 const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D, int64_t R,
                 float a) {
  return rope_rotate(be, y, x, positions, inv_freq, Bt, T, H, D, R, a, 1.0f, "rope");
}

lora_status rope_backward(lora_backend* be, float* dx, const float* dy, const int32_t* positions,
                          const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D,
                          int64_t R, float a) {
  return rope_rotate(be, dx, dy, positions, inv_freq, Bt, T, H, D, R, a, -1.0f, "rope_backward");
}

}  // namespace

// ---- table entries ---------------------------------------------------------------------------
namespace {

// Checks ids on the device before a kernel writes anything (the contract): one flag, one sync.
lora_status ids_valid(Context& c, const int32_t* ids, int64_t N, int64_t V, bool allow_ignore,
                      int32_t ignore, const char* what) {
  if (N == 0) return LORA_OK;
  int* flag = static_cast<int*>(c.alloc(sizeof(int)));
  if (flag == nullptr) return c.no_memory();
  int bad = 0;
  lora_status st = c.check(launch_ids_check(c.stream(), flag, ids, N, V, allow_ignore, ignore), what);
  if (st == LORA_OK) st = c.download(&bad, flag, sizeof(int));
  c.free(flag, sizeof(int));
  if (st != LORA_OK) return st;
  return bad ? LORA_INVALID_ARGUMENT : LORA_OK;
}

lora_status layer_norm(lora_backend* be, float* y, float* mean, float* rstd, const float* x,
                       const float* w, const float* b, int64_t N, int64_t C, float eps) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C <= 0) return N == 0 ? LORA_OK : LORA_INVALID_ARGUMENT;
  return c.check(launch_layer_norm(c.stream(), y, mean, rstd, x, w, b, N, C, eps, false, 0.0f), "layer_norm");
}

lora_status layer_norm_backward(lora_backend* be, float* dx, float* dw, float* db, const float* dy,
                                const float* x, const float* w, const float* mean,
                                const float* rstd, int64_t N, int64_t C) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_layer_norm_backward(c.stream(), dx, dw, db, dy, x, w, mean, rstd, N, C, false, 0.0f),
               "layer_norm_backward");
}

lora_status rms_norm(lora_backend* be, float* y, float* rstd, const float* x, const float* w,
                     int64_t N, int64_t C, float eps, float offset) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C <= 0) return N == 0 ? LORA_OK : LORA_INVALID_ARGUMENT;
  return c.check(launch_layer_norm(c.stream(), y, nullptr, rstd, x, w, nullptr, N, C, eps, true, offset), "rms_norm");
}

lora_status rms_norm_backward(lora_backend* be, float* dx, float* dw, const float* dy,
                              const float* x, const float* w, const float* rstd, int64_t N,
                              int64_t C, float offset) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_layer_norm_backward(c.stream(), dx, dw, nullptr, dy, x, w, nullptr, rstd, N, C, true, offset),
               "rms_norm_backward");
}

lora_status embedding(lora_backend* be, float* out, const void* table, lora_dtype table_dtype,
                      const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (table_dtype != LORA_F32 && table_dtype != LORA_BF16 && table_dtype != LORA_F16) return LORA_UNSUPPORTED;
  if (N < 0 || V < 0 || C < 0) return LORA_INVALID_ARGUMENT;
  lora_status st = ids_valid(c, ids, N, V, false, 0, "embedding");
  if (st != LORA_OK) return st;
  return c.check(launch_embedding(c.stream(), out, table, table_dtype, ids, N, C), "embedding");
}

lora_status embedding_backward(lora_backend* be, float* dtable, const float* dout,
                               const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || V < 0 || C < 0) return LORA_INVALID_ARGUMENT;
  lora_status st = ids_valid(c, ids, N, V, false, 0, "embedding_backward");
  if (st != LORA_OK) return st;
  return c.check(launch_embedding_backward(c.stream(), dtable, dout, ids, N, C), "embedding_backward");
}

lora_status cross_entropy(lora_backend* be, float* loss, float* lse, const float* logits,
                          const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                          float smoothing) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || V <= 0) return N == 0 ? LORA_OK : LORA_INVALID_ARGUMENT;
  lora_status st = ids_valid(c, targets, N, V, true, ignore_index, "cross_entropy");
  if (st != LORA_OK) return st;
  return c.check(launch_cross_entropy(c.stream(), loss, lse, logits, targets, N, V, ignore_index, smoothing),
               "cross_entropy");
}

lora_status cross_entropy_backward(lora_backend* be, float* dlogits, const float* dloss,
                                   const float* logits, const float* lse, const int32_t* targets,
                                   int64_t N, int64_t V, int32_t ignore_index, float smoothing) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || V < 0) return LORA_INVALID_ARGUMENT;
  lora_status st = ids_valid(c, targets, N, V, true, ignore_index, "cross_entropy_backward");
  if (st != LORA_OK) return st;
  return c.check(launch_cross_entropy_backward(c.stream(), dlogits, dloss, logits, lse, targets, N, V,
                                             ignore_index, smoothing),
               "cross_entropy_backward");
}

}  // namespace

void register_nn(lora_backend& t) {
  t.layer_norm = layer_norm;
  t.layer_norm_backward = layer_norm_backward;
  t.rms_norm = rms_norm;
  t.rms_norm_backward = rms_norm_backward;
  t.embedding = embedding;
  t.embedding_backward = embedding_backward;
  t.cross_entropy = cross_entropy;
  t.cross_entropy_backward = cross_entropy_backward;
  t.rope = rope;
  t.rope_backward = rope_backward;
}

}  // namespace cuda
}  // namespace lora
