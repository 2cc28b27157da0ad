// Elementwise CUDA ops: fill, matrix scale, binary (broadcasting lora_layout strides), binary_scalar,
// unary/unary_backward for every lora_unary_op (the same formulas as the CPU backend), the gated
// activation of GLU MLPs (act(g)·u and its backward in one pass), axpy,
// copy_strided, dtype conversion and dropout. Grid-stride loops; memory-bound by design, with a
// contiguous fast path where strides allow. No fusion across ops here.
#include "common.cuh"
#include "../native/backend/elementwise_math.h"

namespace lora {
namespace cuda {
namespace {

#define GRID_STRIDE(i, n)                                                             \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void fill_kernel(float* __restrict__ out,  // (n)
                            float value, int64_t n) {
  GRID_STRIDE(i, n) out[i] = value;
}

// C = beta·C for each batch entry (beta == 0 writes zeros, never reading C).
__global__ void scale_kernel(float* __restrict__ Cm,  // batch x (M, Nn), row stride ldc
                             int64_t ldc, int64_t M, int64_t Nn, int64_t batch, int64_t stride_c,
                             float beta) {
  const int64_t total = batch * M * Nn;
  GRID_STRIDE(i, total) {
    const int64_t b = i / (M * Nn), r = i % (M * Nn);
    float* c = Cm + b * stride_c + (r / Nn) * ldc + r % Nn;
    *c = beta == 0.0f ? 0.0f : beta * *c;
  }
}

// Offset of element `linear` (row-major over layout.shape) through layout.stride.
__device__ __forceinline__ int64_t strided_offset(int64_t linear, const lora_layout& l) {
  int64_t off = 0;
  for (int d = l.ndim - 1; d >= 0; --d) {
    const int64_t size = l.shape[d];
    off += (linear % size) * l.stride[d];
    linear /= size;
  }
  return off;
}

__global__ void binary_contiguous_kernel(float* __restrict__ out,      // (n)
                                         const float* __restrict__ a,  // (n)
                                         const float* __restrict__ b,  // (n)
                                         lora_binary_op op, int64_t n) {
  GRID_STRIDE(i, n) out[i] = binary_apply(op, a[i], b[i]);
}

__global__ void binary_strided_kernel(float* __restrict__ out,      // (numel(a_layout.shape))
                                      const float* __restrict__ a,  // through a_layout
                                      const float* __restrict__ b,  // through b_layout
                                      lora_binary_op op, const lora_layout al, const lora_layout bl, int64_t n) {
  GRID_STRIDE(i, n) out[i] = binary_apply(op, a[strided_offset(i, al)], b[strided_offset(i, bl)]);
}

__global__ void binary_scalar_kernel(float* __restrict__ out,      // (n)
                                     const float* __restrict__ a,  // (n)
                                     lora_binary_op op, float scalar, bool scalar_first, int64_t n) {
  GRID_STRIDE(i, n) out[i] = scalar_first ? binary_apply(op, scalar, a[i]) : binary_apply(op, a[i], scalar);
}

__global__ void unary_kernel(float* __restrict__ out,       // (n)
                             const float* __restrict__ in,  // (n)
                             lora_unary_op op, int64_t n) {
  GRID_STRIDE(i, n) out[i] = unary_apply(op, in[i]);
}

// dx = dy · f'(x), with y = f(x) for the ops whose derivative reads it.
__global__ void unary_backward_kernel(float* __restrict__ dx,        // (n)
                                      const float* __restrict__ dy,  // (n)
                                      const float* __restrict__ x,   // (n) or nullptr
                                      const float* __restrict__ y,   // (n) or nullptr
                                      lora_unary_op op, int64_t n) {
  GRID_STRIDE(i, n) {
    const float xv = x ? x[i] : 0.0f, yv = y ? y[i] : 0.0f;
    dx[i] = dy[i] * unary_grad(op, xv, yv);
  }
}

// y = act(g)⊙u; g and u rows ld apart (u == g + I for the halves of one [gate | up] row).
__global__ void gated_act_kernel(float* __restrict__ y,        // (N, I)
                                 const float* __restrict__ g,  // (N, ld)
                                 const float* __restrict__ u,  // (N, ld)
                                 int64_t N, int64_t I, int64_t ld, lora_unary_op act) {
  const int64_t n = N * I;
  GRID_STRIDE(i, n) {
    const int64_t r = i / I, j = i - r * I;
    y[i] = unary_apply(act, g[r * ld + j]) * u[r * ld + j];
  }
}

// dg = dy⊙u⊙act'(g), du = dy⊙act(g). dg and du may be halves of one row (never the same element),
// hence no __restrict__ on them.
__global__ void gated_act_backward_kernel(float* dg,                     // (N, ld)
                                          float* du,                     // (N, ld)
                                          const float* __restrict__ dy,  // (N, I)
                                          const float* __restrict__ g,   // (N, ld)
                                          const float* __restrict__ u,   // (N, ld)
                                          int64_t N, int64_t I, int64_t ld, lora_unary_op act) {
  const int64_t n = N * I;
  GRID_STRIDE(i, n) {
    const int64_t r = i / I, k = r * ld + (i - r * I);
    const float x = g[k], a = unary_apply(act, x), d = dy[i];
    dg[k] = d * u[k] * unary_grad(act, x, a);
    du[k] = d * a;
  }
}

__global__ void axpy_kernel(float* __restrict__ y,        // (n), +=
                            const float* __restrict__ x,  // (n)
                            float a, int64_t n) {
  GRID_STRIDE(i, n) y[i] = fmaf(a, x[i], y[i]);
}

__global__ void copy_strided_kernel(float* __restrict__ dst,        // through dl
                                    const float* __restrict__ src,  // through sl
                                    const lora_layout dl, const lora_layout sl, int64_t n) {
  GRID_STRIDE(i, n) dst[strided_offset(i, dl)] = src[strided_offset(i, sl)];
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32(float v) { return v; }
template <> __device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32(float v) { return __float2half_rn(v); }

template <typename TO, typename TI>
__global__ void convert_kernel(TO* __restrict__ out,       // (n)
                               const TI* __restrict__ in,  // (n)
                               int64_t n) {
  GRID_STRIDE(i, n) out[i] = from_f32<TO>(to_f32<TI>(in[i]));
}

// out = in·mask/(1-p), mask from the counter RNG at (seed, i): the same draws as the CPU.
__global__ void dropout_kernel(float* __restrict__ out,       // (n)
                               const float* __restrict__ in,  // (n)
                               float p, float scale, uint64_t seed, int64_t n) {
  GRID_STRIDE(i, n) out[i] = dropout_keep(seed, static_cast<uint64_t>(i), p) ? in[i] * scale : 0.0f;
}

int64_t layout_numel(const lora_layout& l) {
  int64_t n = 1;
  for (int d = 0; d < l.ndim; ++d) n *= l.shape[d];
  return n;
}

bool layout_contiguous(const lora_layout& l) {
  int64_t expect = 1;
  for (int d = l.ndim - 1; d >= 0; --d) {
    if (l.shape[d] != 1 && l.stride[d] != expect) return false;
    expect *= l.shape[d];
  }
  return true;
}

template <typename TO>
cudaError_t convert_from(cudaStream_t stream, TO* out, const void* in, lora_dtype in_dtype, int64_t n) {
  switch (in_dtype) {
    case LORA_F32:
      launch(convert_kernel<TO, float>, grid_for(n), kThreads, 0, stream, out, static_cast<const float*>(in), n);
      break;
    case LORA_BF16:
      launch(convert_kernel<TO, __nv_bfloat16>, grid_for(n), kThreads, 0, stream, out, static_cast<const __nv_bfloat16*>(in), n);
      break;
    case LORA_F16:
      launch(convert_kernel<TO, __half>, grid_for(n), kThreads, 0, stream, out, static_cast<const __half*>(in), n);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fill(cudaStream_t stream, float* out, float value, int64_t n) {
  if (n <= 0) return cudaSuccess;
  launch(fill_kernel, grid_for(n), kThreads, 0, stream, out, value, n);
  return cudaGetLastError();
}

cudaError_t launch_scale(cudaStream_t stream, float* Cm, int64_t ldc, int64_t M, int64_t Nn,
                         int64_t batch, int64_t stride_c, float beta) {
  const int64_t total = batch * M * Nn;
  if (total <= 0 || beta == 1.0f) return cudaSuccess;
  launch(scale_kernel, grid_for(total), kThreads, 0, stream, Cm, ldc, M, Nn, batch, stride_c, beta);
  return cudaGetLastError();
}

cudaError_t launch_binary(cudaStream_t stream, lora_binary_op op, float* out, const float* a,
                          const float* b, const lora_layout& a_layout, const lora_layout& b_layout) {
  const int64_t n = layout_numel(a_layout);
  if (n <= 0) return cudaSuccess;
  if (layout_contiguous(a_layout) && layout_contiguous(b_layout) &&
      layout_numel(b_layout) == n) {
    launch(binary_contiguous_kernel, grid_for(n), kThreads, 0, stream, out, a, b, op, n);
  } else {
    launch(binary_strided_kernel, grid_for(n), kThreads, 0, stream, out, a, b, op, a_layout, b_layout, n);
  }
  return cudaGetLastError();
}

cudaError_t launch_binary_scalar(cudaStream_t stream, lora_binary_op op, float* out, const float* a,
                                 float scalar, bool scalar_first, int64_t n) {
  if (n <= 0) return cudaSuccess;
  launch(binary_scalar_kernel, grid_for(n), kThreads, 0, stream, out, a, op, scalar, scalar_first, n);
  return cudaGetLastError();
}

cudaError_t launch_unary(cudaStream_t stream, lora_unary_op op, float* out, const float* in, int64_t n) {
  if (n <= 0) return cudaSuccess;
  launch(unary_kernel, grid_for(n), kThreads, 0, stream, out, in, op, n);
  return cudaGetLastError();
}

cudaError_t launch_unary_backward(cudaStream_t stream, lora_unary_op op, float* dx, const float* dy,
                                  const float* x, const float* y, int64_t n) {
  if (n <= 0) return cudaSuccess;
  launch(unary_backward_kernel, grid_for(n), kThreads, 0, stream, dx, dy, x, y, op, n);
  return cudaGetLastError();
}

cudaError_t launch_gated_act(cudaStream_t stream, float* y, const float* g, const float* u, int64_t N,
                             int64_t I, int64_t ld, lora_unary_op act) {
  if (N * I <= 0) return cudaSuccess;
  launch(gated_act_kernel, grid_for(N * I), kThreads, 0, stream, y, g, u, N, I, ld, act);
  return cudaGetLastError();
}

cudaError_t launch_gated_act_backward(cudaStream_t stream, float* dg, float* du, const float* dy,
                                      const float* g, const float* u, int64_t N, int64_t I, int64_t ld,
                                      lora_unary_op act) {
  if (N * I <= 0) return cudaSuccess;
  launch(gated_act_backward_kernel, grid_for(N * I), kThreads, 0, stream, dg, du, dy, g, u, N, I, ld, act);
  return cudaGetLastError();
}

cudaError_t launch_axpy(cudaStream_t stream, float* y, const float* x, float a, int64_t n) {
  if (n <= 0) return cudaSuccess;
  launch(axpy_kernel, grid_for(n), kThreads, 0, stream, y, x, a, n);
  return cudaGetLastError();
}

cudaError_t launch_copy_strided(cudaStream_t stream, float* dst, const lora_layout& dst_layout,
                                const float* src, const lora_layout& src_layout) {
  const int64_t n = layout_numel(src_layout);
  if (n <= 0) return cudaSuccess;
  if (layout_contiguous(dst_layout) && layout_contiguous(src_layout)) {
    return cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                           cudaMemcpyDeviceToDevice, stream);
  }
  // The destination's shape is the source's (the contract); walk both with the source's shape.
  lora_layout dl = dst_layout;
  dl.ndim = src_layout.ndim;
  for (int d = 0; d < src_layout.ndim; ++d) dl.shape[d] = src_layout.shape[d];
  launch(copy_strided_kernel, grid_for(n), kThreads, 0, stream, dst, src, dl, src_layout, n);
  return cudaGetLastError();
}

cudaError_t launch_convert(cudaStream_t stream, void* out, lora_dtype out_dtype, const void* in,
                           lora_dtype in_dtype, int64_t n) {
  if (n <= 0) return cudaSuccess;
  switch (out_dtype) {
    case LORA_F32: return convert_from(stream, static_cast<float*>(out), in, in_dtype, n);
    case LORA_BF16: return convert_from(stream, static_cast<__nv_bfloat16*>(out), in, in_dtype, n);
    case LORA_F16: return convert_from(stream, static_cast<__half*>(out), in, in_dtype, n);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_dropout(cudaStream_t stream, float* out, const float* in, int64_t n, float p,
                           uint64_t seed) {
  if (n <= 0) return cudaSuccess;
  const float scale = 1.0f / (1.0f - p);  // as the CPU computes it
  launch(dropout_kernel, grid_for(n), kThreads, 0, stream, out, in, p, scale, seed, n);
  return cudaGetLastError();
}

// ---- table entries ---------------------------------------------------------------------------
namespace {

bool valid(const lora_layout& l) {
  if (l.ndim < 0 || l.ndim > LORA_MAX_DIMS) return false;
  for (int d = 0; d < l.ndim; ++d)
    if (l.shape[d] < 0) return false;
  return true;
}

lora_status fill(lora_backend* be, float* out, float value, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_fill(c.stream(), out, value, n), "fill");
}

lora_status convert(lora_backend* be, void* out, lora_dtype out_dtype, const void* in,
                    lora_dtype in_dtype, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  if (out_dtype == LORA_I32 || in_dtype == LORA_I32) return LORA_UNSUPPORTED;
  return c.check(launch_convert(c.stream(), out, out_dtype, in, in_dtype, n), "convert");
}

lora_status binary(lora_backend* be, lora_binary_op op, float* out, const float* a, const float* b,
                   const lora_layout* a_layout, const lora_layout* b_layout) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (!valid(*a_layout) || !valid(*b_layout) || a_layout->ndim != b_layout->ndim)
    return LORA_INVALID_ARGUMENT;
  return c.check(launch_binary(c.stream(), op, out, a, b, *a_layout, *b_layout), "binary");
}

lora_status binary_scalar(lora_backend* be, lora_binary_op op, float* out, const float* a,
                          float scalar, bool scalar_first, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_binary_scalar(c.stream(), op, out, a, scalar, scalar_first, n), "binary_scalar");
}

lora_status unary(lora_backend* be, lora_unary_op op, float* out, const float* in, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_unary(c.stream(), op, out, in, n), "unary");
}

lora_status unary_backward(lora_backend* be, lora_unary_op op, float* dx, const float* dy,
                           const float* x, const float* y, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_unary_backward(c.stream(), op, dx, dy, x, y, n), "unary_backward");
}

// backend.h's layouts: ld >= I, and ld >= 2I when the up half lives in g's rows (u == NULL).
bool gated_layout_ok(const float* u, int64_t N, int64_t I, int64_t ld) {
  return N >= 0 && I >= 0 && ld >= I && (u != nullptr || ld >= 2 * I);
}

lora_status gated_act(lora_backend* be, float* y, const float* g, const float* u, int64_t N,
                      int64_t I, int64_t ld, lora_unary_op act) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (!gated_layout_ok(u, N, I, ld)) return LORA_INVALID_ARGUMENT;
  return c.check(launch_gated_act(c.stream(), y, g, u ? u : g + I, N, I, ld, act), "gated_act");
}

lora_status gated_act_backward(lora_backend* be, float* dg, float* du, const float* dy,
                               const float* g, const float* u, int64_t N, int64_t I, int64_t ld,
                               lora_unary_op act) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (!gated_layout_ok(u, N, I, ld) || (u == nullptr) != (du == nullptr)) return LORA_INVALID_ARGUMENT;
  return c.check(launch_gated_act_backward(c.stream(), dg, du ? du : dg + I, dy, g, u ? u : g + I, N, I, ld, act),
                 "gated_act_backward");
}

lora_status axpy(lora_backend* be, float* y, const float* x, float a, int64_t n) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0) return LORA_INVALID_ARGUMENT;
  return c.check(launch_axpy(c.stream(), y, x, a, n), "axpy");
}

lora_status copy_strided(lora_backend* be, float* dst, const lora_layout* dst_layout,
                         const float* src, const lora_layout* src_layout) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (!valid(*dst_layout) || !valid(*src_layout) || dst_layout->ndim != src_layout->ndim)
    return LORA_INVALID_ARGUMENT;
  return c.check(launch_copy_strided(c.stream(), dst, *dst_layout, src, *src_layout), "copy_strided");
}

lora_status dropout(lora_backend* be, float* out, const float* in, int64_t n, float p,
                    uint64_t seed) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (n < 0 || !(p >= 0.0f && p < 1.0f)) return LORA_INVALID_ARGUMENT;
  if (p == 0.0f) {
    if (n == 0 || out == in) return LORA_OK;
    return c.check(cudaMemcpyAsync(out, in, static_cast<size_t>(n) * sizeof(float), cudaMemcpyDeviceToDevice, c.stream()),
                   "dropout");
  }
  return c.check(launch_dropout(c.stream(), out, in, n, p, seed), "dropout");
}

}  // namespace

void register_elementwise(lora_backend& t) {
  t.fill = fill;
  t.convert = convert;
  t.binary = binary;
  t.binary_scalar = binary_scalar;
  t.unary = unary;
  t.unary_backward = unary_backward;
  t.gated_act = gated_act;
  t.gated_act_backward = gated_act_backward;
  t.axpy = axpy;
  t.copy_strided = copy_strided;
  t.dropout = dropout;
}

}  // namespace cuda
}  // namespace lora
