// Reductions and row-wise softmax on CUDA: reduce (Sum in double accumulators, as the CPU does,
// Max/Min with NaN propagation) over the middle axis of (outer, dim, inner), and softmax /
// log-softmax with their backward over the last axis. One block per row, or one thread per
// output column when the reduced axis is strided; when that leaves the GPU idle (a loss over a
// whole tensor, a bias gradient over many rows) the axis is split and reduced in two passes.
#include <cfloat>

#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;  // one block per row: 8 warps stream the row

__device__ __forceinline__ double combine(lora_reduce_op op, double a, double b) {
  switch (op) {
    case LORA_REDUCE_SUM: return a + b;
    case LORA_REDUCE_MAX: return (a != a || a > b) ? a : b;  // NaN propagates
    case LORA_REDUCE_MIN: return (a != a || a < b) ? a : b;
  }
  return a;
}

__device__ __forceinline__ double reduce_init(lora_reduce_op op) {
  return op == LORA_REDUCE_SUM ? 0.0 : (op == LORA_REDUCE_MAX ? -INFINITY : INFINITY);
}

// Block-wide combine of v; every thread gets the result.
template <typename T, typename F>
__device__ __forceinline__ T block_all_reduce(T v, F f, T* scratch /* [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = f(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < warps; ++w) v = f(v, scratch[w]);
  return v;
}

// out[row] = reduce(in[row][0..dim)): the reduced axis is contiguous (inner == 1).
__global__ void reduce_rows_kernel(float* __restrict__ out,       // (rows)
                                   const float* __restrict__ in,  // (rows, dim)
                                   lora_reduce_op op, int64_t dim) {
  __shared__ double scratch[32];
  const float* row = in + static_cast<int64_t>(blockIdx.x) * dim;
  double acc = reduce_init(op);
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) acc = combine(op, acc, row[d]);
  acc = block_all_reduce(acc, [op](double a, double b) { return combine(op, a, b); }, scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(acc);
}

// out[o][i] = reduce over d of in[o][d][i]: one thread per (o, i), coalesced along i.
__global__ void reduce_strided_kernel(float* __restrict__ out,       // (outer, inner)
                                      const float* __restrict__ in,  // (outer, dim, inner)
                                      lora_reduce_op op, int64_t outer, int64_t dim, int64_t inner) {
  const int64_t total = outer * inner;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / inner, i = t % inner;
    const float* p = in + o * dim * inner + i;
    double acc = reduce_init(op);
    for (int64_t d = 0; d < dim; ++d) acc = combine(op, acc, p[d * inner]);
    out[t] = static_cast<float>(acc);
  }
}

// Split-dim first pass, reduced axis contiguous: block (s, o) reduces in[o][s·chunk ..) into
// partial[o][s] (double, so a Sum keeps its accumulator precision across passes).
__global__ void reduce_rows_partial_kernel(double* __restrict__ partial,   // (outer, S)
                                           const float* __restrict__ in,   // (outer, dim)
                                           lora_reduce_op op, int64_t dim, int64_t chunk) {
  __shared__ double scratch[32];
  const int64_t o = blockIdx.y, sidx = blockIdx.x, S = gridDim.x;
  const float* row = in + o * dim;
  const int64_t d1 = min(dim, (sidx + 1) * chunk);
  double acc = reduce_init(op);
  for (int64_t d = sidx * chunk + threadIdx.x; d < d1; d += blockDim.x) acc = combine(op, acc, row[d]);
  acc = block_all_reduce(acc, [op](double a, double b) { return combine(op, a, b); }, scratch);
  if (threadIdx.x == 0) partial[o * S + sidx] = acc;
}

// Split-dim first pass, strided axis: thread (o, i) of slice s reduces its chunk of d.
__global__ void reduce_strided_partial_kernel(double* __restrict__ partial,  // (outer, inner, S)
                                              const float* __restrict__ in,  // (outer, dim, inner)
                                              lora_reduce_op op, int64_t dim, int64_t inner,
                                              int64_t chunk) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= inner) return;
  const int64_t o = blockIdx.y, sidx = blockIdx.z, S = gridDim.z;
  const float* p = in + o * dim * inner + i;
  const int64_t d1 = min(dim, (sidx + 1) * chunk);
  double acc = reduce_init(op);
  for (int64_t d = sidx * chunk; d < d1; ++d) acc = combine(op, acc, p[d * inner]);
  partial[(o * inner + i) * S + sidx] = acc;
}

// Second pass: out[t] = reduce of partial[t][0..S).
__global__ void reduce_partials_kernel(float* __restrict__ out,             // (outer·inner)
                                       const double* __restrict__ partial,  // (outer·inner, S)
                                       lora_reduce_op op, int64_t total, int64_t S) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double acc = reduce_init(op);
    for (int64_t s = 0; s < S; ++s) acc = combine(op, acc, partial[t * S + s]);
    out[t] = static_cast<float>(acc);
  }
}

// Softmax (or log-softmax) of each row, three passes over the row (max, sum, write).
__global__ void softmax_kernel(float* __restrict__ out,       // (rows, cols)
                               const float* __restrict__ in,  // (rows, cols)
                               int64_t cols, bool log) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) mx = fmaxf(mx, in[base + c]);
  mx = block_all_reduce(mx, [](float a, float b) { return fmaxf(a, b); }, scratch);
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) sum += expf(in[base + c] - mx);
  sum = block_all_reduce(sum, [](float a, float b) { return a + b; }, scratch);
  if (log) {
    const float lse = logf(sum);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) out[base + c] = in[base + c] - mx - lse;
  } else {
    const float inv = 1.0f / sum;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      out[base + c] = expf(in[base + c] - mx) * inv;
  }
}

// softmax: dx = y ⊙ (dy - Σ dy⊙y);  log-softmax: dx = dy - exp(y)·Σ dy
__global__ void softmax_backward_kernel(float* __restrict__ dx,        // (rows, cols)
                                        const float* __restrict__ dy,  // (rows, cols)
                                        const float* __restrict__ y,   // (rows, cols)
                                        int64_t cols, bool log) {
  __shared__ float scratch[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * cols;
  float dot = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
    dot += log ? dy[base + c] : dy[base + c] * y[base + c];
  dot = block_all_reduce(dot, [](float a, float b) { return a + b; }, scratch);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    dx[base + c] = log ? dy[base + c] - expf(y[base + c]) * dot : y[base + c] * (dy[base + c] - dot);
  }
}

}  // namespace

int64_t reduce_splits(int64_t outer, int64_t dim, int64_t inner, int sm_count) {
  if (dim < 4096) return 1;  // short axes: one pass is already cheap
  const int64_t blocks = inner == 1 ? outer : outer * ((inner + kThreads - 1) / kThreads);
  const int64_t want = 4 * static_cast<int64_t>(sm_count);  // enough blocks to pull full bandwidth
  if (blocks >= want) return 1;
  int64_t s = (want + blocks - 1) / blocks;
  s = s < dim / 1024 ? s : dim / 1024;  // keep >= 1024 elements per slice
  s = s < 256 ? s : 256;                // bound the partial buffer and the second pass
  if (outer > 65535 || (inner > 1 && s > 65535)) return 1;  // grid dimension limits
  return s < 1 ? 1 : s;
}

cudaError_t launch_reduce(cudaStream_t stream, lora_reduce_op op, float* out, const float* in,
                          int64_t outer, int64_t dim, int64_t inner, double* partial,
                          int64_t splits) {
  if (outer <= 0 || inner <= 0) return cudaSuccess;
  if (dim <= 0) return launch_fill(stream, out, op == LORA_REDUCE_SUM ? 0.0f
                                               : (op == LORA_REDUCE_MAX ? -INFINITY : INFINITY),
                                   outer * inner);
  if (partial != nullptr && splits > 1) {
    const int64_t chunk = (dim + splits - 1) / splits;
    if (inner == 1) {
      launch(reduce_rows_partial_kernel, dim3(static_cast<unsigned>(splits), static_cast<unsigned>(outer)), kRowThreads, 0, stream, partial, in, op, dim, chunk);
    } else {
      const dim3 grid(static_cast<unsigned>((inner + kThreads - 1) / kThreads),
                      static_cast<unsigned>(outer), static_cast<unsigned>(splits));
      launch(reduce_strided_partial_kernel, grid, kThreads, 0, stream, partial, in, op, dim, inner, chunk);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    launch(reduce_partials_kernel, grid_for(outer * inner), kThreads, 0, stream, out, partial, op,
                                                                            outer * inner, splits);
    return cudaGetLastError();
  }
  if (inner == 1 && outer <= 0x7fffffff) {
    launch(reduce_rows_kernel, static_cast<unsigned>(outer), kRowThreads, 0, stream, out, in, op, dim);
  } else {
    launch(reduce_strided_kernel, grid_for(outer * inner), kThreads, 0, stream, out, in, op, outer,
                                                                           dim, inner);
  }
  return cudaGetLastError();
}

cudaError_t launch_softmax(cudaStream_t stream, float* out, const float* in, int64_t rows,
                           int64_t cols, bool log) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  launch(softmax_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream, out, in, cols, log);
  return cudaGetLastError();
}

cudaError_t launch_softmax_backward(cudaStream_t stream, float* dx, const float* dy,
                                    const float* y, int64_t rows, int64_t cols, bool log) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  launch(softmax_backward_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream, dx, dy, y, cols,
                                                                                    log);
  return cudaGetLastError();
}

// ---- table entries ---------------------------------------------------------------------------
namespace {

lora_status reduce(lora_backend* be, lora_reduce_op op, float* out, const float* in, int64_t outer,
                   int64_t dim, int64_t inner) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (outer < 0 || dim < 0 || inner < 0) return LORA_INVALID_ARGUMENT;
  const int64_t splits = reduce_splits(outer, dim, inner, c.sm_count());
  if (splits <= 1) return c.check(launch_reduce(c.stream(), op, out, in, outer, dim, inner, nullptr, 1), "reduce");
  const size_t bytes = static_cast<size_t>(outer * inner * splits) * sizeof(double);
  double* partial = static_cast<double*>(c.alloc(bytes));
  if (partial == nullptr) return c.no_memory();
  lora_status st = c.check(launch_reduce(c.stream(), op, out, in, outer, dim, inner, partial, splits), "reduce");
  c.free(partial, bytes);
  return st;
}

lora_status softmax(lora_backend* be, float* out, const float* in, int64_t rows, int64_t cols,
                    bool log) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (rows < 0 || cols < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_softmax(c.stream(), out, in, rows, cols, log), "softmax");
}

lora_status softmax_backward(lora_backend* be, float* dx, const float* dy, const float* y,
                             int64_t rows, int64_t cols, bool log) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (rows < 0 || cols < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_softmax_backward(c.stream(), dx, dy, y, rows, cols, log), "softmax_backward");
}

}  // namespace

void register_reduce(lora_backend& t) {
  t.reduce = reduce;
  t.softmax = softmax;
  t.softmax_backward = softmax_backward;
}

}  // namespace cuda
}  // namespace lora
