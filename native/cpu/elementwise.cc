// The CPU elementwise (including the fused gated activation of GLU MLPs), reduction, copy, softmax
// and dropout kernels: plain loops split over the thread pool, the scalar formulas from
// native/backend/elementwise_math.h (shared with CUDA).
#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include "../backend/elementwise_math.h"
#include "../backend/half.h"
#include "../backend/rng.h"
#include "cpu.h"
#include "vec_math.h"

namespace lora {
namespace {

int64_t layout_numel(const lora_layout& l) {
  int64_t n = 1;
  for (int d = 0; d < l.ndim; ++d) n *= l.shape[d];
  return n;
}

// Offset (in elements) of flat row-major index i of `shape` under `stride`.
inline int64_t strided_offset(int64_t i, const lora_layout& l) {
  int64_t off = 0;
  for (int d = l.ndim - 1; d >= 0; --d) {
    const int64_t q = i / l.shape[d];
    off += (i - q * l.shape[d]) * l.stride[d];
    i = q;
  }
  return off;
}

bool is_contiguous(const lora_layout& l) {
  int64_t expect = 1;
  for (int d = l.ndim - 1; d >= 0; --d) {
    if (l.shape[d] != 1 && l.stride[d] != expect) return false;
    expect *= l.shape[d];
  }
  return true;
}


lora_status fill(lora_backend* be, float* out, float value, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(n, kGrain, [&](int64_t b, int64_t e) { std::fill(out + b, out + e, value); });
  return LORA_OK;
}

lora_status convert(lora_backend* be, void* out, lora_dtype out_dtype, const void* in,
                    lora_dtype in_dtype, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  if (out_dtype == LORA_I32 || in_dtype == LORA_I32) return LORA_UNSUPPORTED;
  pool.parallel_for(n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float v;
      switch (in_dtype) {
        case LORA_F32: v = static_cast<const float*>(in)[i]; break;
        case LORA_BF16: v = bf16_to_float(static_cast<const uint16_t*>(in)[i]); break;
        default: v = f16_to_float(static_cast<const uint16_t*>(in)[i]); break;
      }
      switch (out_dtype) {
        case LORA_F32: static_cast<float*>(out)[i] = v; break;
        case LORA_BF16: static_cast<uint16_t*>(out)[i] = float_to_bf16(v); break;
        default: static_cast<uint16_t*>(out)[i] = float_to_f16(v); break;
      }
    }
  });
  return LORA_OK;
}

// Calls f with the op as a compile-time constant, so that each loop is specialised to one
// operation (a switch per element kept the loops scalar: ~6x slower on [256, 1536] products).
template <typename F>
void with_binary_op(lora_binary_op op, F&& f) {
  switch (op) {
    case LORA_BINARY_ADD: f(std::integral_constant<lora_binary_op, LORA_BINARY_ADD>()); break;
    case LORA_BINARY_SUB: f(std::integral_constant<lora_binary_op, LORA_BINARY_SUB>()); break;
    case LORA_BINARY_MUL: f(std::integral_constant<lora_binary_op, LORA_BINARY_MUL>()); break;
    case LORA_BINARY_DIV: f(std::integral_constant<lora_binary_op, LORA_BINARY_DIV>()); break;
    case LORA_BINARY_MAX: f(std::integral_constant<lora_binary_op, LORA_BINARY_MAX>()); break;
    default: f(std::integral_constant<lora_binary_op, LORA_BINARY_MIN>()); break;
  }
}

lora_status binary(lora_backend* be, lora_binary_op op, float* out, const float* a, const float* b,
                   const lora_layout* a_layout, const lora_layout* b_layout) {
  ThreadPool& pool = cpu_pool(be);
  const lora_layout& al = *a_layout;
  const lora_layout& bl = *b_layout;
  const int64_t n = layout_numel(al);
  if (is_contiguous(al) && is_contiguous(bl)) {
    with_binary_op(op, [&](auto k) {
      pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(k, a[i], b[i]);
      });
    });
    return LORA_OK;
  }
  const int64_t inner = al.ndim ? al.shape[al.ndim - 1] : 1;
  const int64_t as = al.ndim ? al.stride[al.ndim - 1] : 0, bs = bl.ndim ? bl.stride[bl.ndim - 1] : 0;
  const int64_t rows = inner ? n / inner : 0;
  with_binary_op(op, [&](auto k) {
    pool.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) {
                           const float* ar = a + strided_offset(r * inner, al);
                           const float* br = b + strided_offset(r * inner, bl);
                           float* o = out + r * inner;
                           // the common inner strides (1 and 0, a broadcast row or value) as their own loops
                           if (as == 1 && bs == 1)
                             for (int64_t j = 0; j < inner; ++j) o[j] = binary_apply(k, ar[j], br[j]);
                           else if (as == 1 && bs == 0)
                             for (int64_t j = 0; j < inner; ++j) o[j] = binary_apply(k, ar[j], br[0]);
                           else if (as == 0 && bs == 1)
                             for (int64_t j = 0; j < inner; ++j) o[j] = binary_apply(k, ar[0], br[j]);
                           else
                             for (int64_t j = 0; j < inner; ++j) o[j] = binary_apply(k, ar[j * as], br[j * bs]);
                         }
                       });
  });
  return LORA_OK;
}

lora_status binary_scalar(lora_backend* be, lora_binary_op op, float* out, const float* a,
                          float scalar, bool scalar_first, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  with_binary_op(op, [&](auto k) {
    pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
      if (scalar_first)
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(k, scalar, a[i]);
      else
        for (int64_t i = s; i < e; ++i) out[i] = binary_apply(k, a[i], scalar);
    });
  });
  return LORA_OK;
}

lora_status unary(lora_backend* be, lora_unary_op op, float* out, const float* in, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) out[i] = unary_apply(op, in[i]);
  });
  return LORA_OK;
}

lora_status unary_backward(lora_backend* be, lora_unary_op op, float* dx, const float* dy,
                           const float* x, const float* y, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i)
      dx[i] = dy[i] * unary_grad(op, x ? x[i] : 0.0f, y ? y[i] : 0.0f);
  });
  return LORA_OK;
}

// Whether gated_act's strides fit its layouts (backend.h): ld >= I, and ld >= 2I when the up
// half lives in g's rows (u == NULL).
bool gated_layout_ok(const float* u, int64_t N, int64_t I, int64_t ld) {
  return N >= 0 && I >= 0 && ld >= I && (u != nullptr || ld >= 2 * I);
}

// The gate rows of SiLU and tanh-GELU, the activations of nearly every GLU model, run vectorised
// (exp_vec and LORA_VECTOR_CLONES: vec_math.h).
// tanh-GELU as x·σ(2z), z = √(2/π)(x + 0.044715x³), since 0.5(1 + tanh z) = σ(2z): no 1 + tanh(z)
// cancellation for negative z, and its derivative σ + 2x·σ(1-σ)·dz/dx with 1-σ = e^{-2z}σ exact too.
// y = act(g)·u over one row, for act SiLU (gelu false) or tanh-GELU.
LORA_VECTOR_CLONES void gated_row(float* __restrict y, const float* __restrict g, const float* __restrict u, int64_t I, bool gelu) {
  if (gelu)
    for (int64_t j = 0; j < I; ++j) {
      const float x = g[j];
      y[j] = x / (1.0f + exp_vec(-2.0f * kSqrt2OverPi * (x + kGeluCoef * x * x * x))) * u[j];
    }
  else
    for (int64_t j = 0; j < I; ++j) y[j] = g[j] / (1.0f + exp_vec(-g[j])) * u[j];
}

// dg = dy·u·act'(g), du = dy·act(g) over one row (dg and du never overlap: separate tensors, or
// the two halves of one row).
LORA_VECTOR_CLONES void gated_row_backward(float* __restrict dg, float* __restrict du, const float* __restrict dy,
                                           const float* __restrict g, const float* __restrict u, int64_t I, bool gelu) {
  if (gelu)
    for (int64_t j = 0; j < I; ++j) {
      const float x = g[j];
      const float em = exp_vec(-2.0f * kSqrt2OverPi * (x + kGeluCoef * x * x * x));
      const float sg = 1.0f / (1.0f + em), rest = em * sg;  // σ(2z) and 1 - σ(2z)
      const float da = sg + 2.0f * x * sg * rest * kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x * x);
      dg[j] = dy[j] * u[j] * da;
      du[j] = dy[j] * x * sg;
    }
  else
    for (int64_t j = 0; j < I; ++j) {
      const float x = g[j];
      const float sg = 1.0f / (1.0f + exp_vec(-x));
      dg[j] = dy[j] * u[j] * sg * (1.0f + x * (1.0f - sg));
      du[j] = dy[j] * x * sg;
    }
}

lora_status gated_act(lora_backend* be, float* y, const float* g, const float* u, int64_t N,
                      int64_t I, int64_t ld, lora_unary_op act) {
  if (!gated_layout_ok(u, N, I, ld)) return LORA_INVALID_ARGUMENT;
  ThreadPool& pool = cpu_pool(be);
  const float* up = u ? u : g + I;
  const bool vec = act == LORA_UNARY_SILU || act == LORA_UNARY_GELU_TANH;
  pool.parallel_for(N, std::max<int64_t>(1, kGrain / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = g + r * ld;
      const float* ur = up + r * ld;
      float* yr = y + r * I;
      if (vec) gated_row(yr, gr, ur, I, act == LORA_UNARY_GELU_TANH);
      else
        for (int64_t j = 0; j < I; ++j) yr[j] = unary_apply(act, gr[j]) * ur[j];
    }
  });
  return LORA_OK;
}

lora_status gated_act_backward(lora_backend* be, float* dg, float* du, const float* dy,
                               const float* g, const float* u, int64_t N, int64_t I, int64_t ld,
                               lora_unary_op act) {
  if (!gated_layout_ok(u, N, I, ld) || (u == nullptr) != (du == nullptr)) return LORA_INVALID_ARGUMENT;
  ThreadPool& pool = cpu_pool(be);
  const float* up = u ? u : g + I;
  float* dup = du ? du : dg + I;
  const bool vec = act == LORA_UNARY_SILU || act == LORA_UNARY_GELU_TANH;
  pool.parallel_for(N, std::max<int64_t>(1, kGrain / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gr = g + r * ld;
      const float* ur = up + r * ld;
      const float* d = dy + r * I;
      float* dgr = dg + r * ld;
      float* dur = dup + r * ld;
      if (vec) {
        gated_row_backward(dgr, dur, d, gr, ur, I, act == LORA_UNARY_GELU_TANH);
        continue;
      }
      for (int64_t j = 0; j < I; ++j) {
        const float x = gr[j], a = unary_apply(act, x), uj = ur[j];
        dgr[j] = d[j] * uj * unary_grad(act, x, a);
        dur[j] = d[j] * a;
      }
    }
  });
  return LORA_OK;
}

lora_status axpy(lora_backend* be, float* y, const float* x, float a, int64_t n) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) y[i] += a * x[i];
  });
  return LORA_OK;
}

lora_status reduce(lora_backend* be, lora_reduce_op op, float* out, const float* in, int64_t outer,
                   int64_t dim, int64_t inner) {
  ThreadPool& pool = cpu_pool(be);
  const float init = op == LORA_REDUCE_SUM ? 0.0f : (op == LORA_REDUCE_MAX ? -INFINITY : INFINITY);
  const lora_binary_op combine =
      op == LORA_REDUCE_SUM ? LORA_BINARY_ADD : (op == LORA_REDUCE_MAX ? LORA_BINARY_MAX : LORA_BINARY_MIN);
  pool.parallel_for(outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, dim * inner)),
                     [&](int64_t o0, int64_t o1) {
                       std::vector<double> acc;
                       for (int64_t o = o0; o < o1; ++o) {
                         float* dst = out + o * inner;
                         const float* src = in + o * dim * inner;
                         if (op == LORA_REDUCE_SUM) {
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
  return LORA_OK;
}

lora_status copy_strided(lora_backend* be, float* dst, const lora_layout* dst_layout,
                         const float* src, const lora_layout* src_layout) {
  ThreadPool& pool = cpu_pool(be);
  const lora_layout& dl = *dst_layout;
  const lora_layout& sl = *src_layout;
  const int64_t n = layout_numel(sl);
  const int64_t inner = sl.ndim ? sl.shape[sl.ndim - 1] : 1;
  const int64_t ss = sl.ndim ? sl.stride[sl.ndim - 1] : 1, ds = dl.ndim ? dl.stride[dl.ndim - 1] : 1;
  const int64_t rows = inner ? n / inner : 0;
  pool.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t r = r0; r < r1; ++r) {
                         const float* s = src + strided_offset(r * inner, sl);
                         float* d = dst + strided_offset(r * inner, dl);
                         for (int64_t j = 0; j < inner; ++j) d[j * ds] = s[j * ss];
                       }
                     });
  return LORA_OK;
}

lora_status softmax(lora_backend* be, float* out, const float* in, int64_t rows, int64_t cols,
                    bool log) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
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
  return LORA_OK;
}

// softmax: dx = y ⊙ (dy - Σ dy⊙y);  log-softmax: dx = dy - exp(y)·Σ dy
lora_status softmax_backward(lora_backend* be, float* dx, const float* dy, const float* y,
                             int64_t rows, int64_t cols, bool log) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)),
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
  return LORA_OK;
}

lora_status dropout(lora_backend* be, float* out, const float* in, int64_t n, float p,
                    uint64_t seed) {
  ThreadPool& pool = cpu_pool(be);
  const float scale = 1.0f / (1.0f - p);
  pool.parallel_for(n, kGrain, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) out[i] = dropout_keep(seed, i, p) ? in[i] * scale : 0.0f;
  });
  return LORA_OK;
}

}  // namespace

void cpu_register_elementwise(lora_backend& t) {
  t.fill = fill;
  t.convert = convert;
  t.binary = binary;
  t.binary_scalar = binary_scalar;
  t.unary = unary;
  t.unary_backward = unary_backward;
  t.gated_act = gated_act;
  t.gated_act_backward = gated_act_backward;
  t.axpy = axpy;
  t.reduce = reduce;
  t.copy_strided = copy_strided;
  t.softmax = softmax;
  t.softmax_backward = softmax_backward;
  t.dropout = dropout;
}

}  // namespace lora
