// CPU kernels for normalisation, embedding, cross-entropy and RoPE (the math is in
// native/backend/backend.h). Each parallelises over independent rows; reductions across rows
// (dw, db of the norms) use one partial buffer per thread, summed at the end, so results do not
// depend on timing. Attention has its own kernel (attention.cc).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../backend/half.h"
#include "cpu.h"
#include "vec_math.h"

namespace lora {
namespace {

constexpr int64_t kRowGrain = 1 << 14;  // elements of work worth waking a second thread for

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrain / std::max<int64_t>(cols, 1)); }

// Runs fn(tid, begin, end) over contiguous row chunks and then sums each thread's `width`
// doubles of partials into acc[0..width) (+=, float). A null acc[c] (a frozen weight) gets no
// partials: its part vectors stay empty.
template <typename Fn>
void rows_with_partials(ThreadPool& pool, int64_t N, int64_t width, int copies, float* const* acc, Fn fn) {
  const int nt = (N * width <= kRowGrain || pool.size() == 1) ? 1 : pool.size();
  std::vector<std::vector<double>> part(static_cast<size_t>(nt) * copies);
  for (size_t i = 0; i < part.size(); ++i)
    if (acc[i % static_cast<size_t>(copies)]) part[i].assign(static_cast<size_t>(width), 0.0);
  auto body = [&](int tid, int threads) {
    const int64_t chunk = (N + threads - 1) / threads;
    const int64_t b = std::min<int64_t>(N, tid * chunk), e = std::min<int64_t>(N, b + chunk);
    if (b < e) fn(b, e, &part[static_cast<size_t>(tid) * copies]);
  };
  if (nt == 1) body(0, 1);
  else pool.run(body);
  for (int c = 0; c < copies; ++c) {
    if (!acc[c]) continue;
    for (int64_t j = 0; j < width; ++j) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += part[static_cast<size_t>(t) * copies + c][j];
      acc[c][j] += static_cast<float>(s);
    }
  }
}

// Sums of a row in double over 8 independent lanes (a single double chain waits 4 cycles per
// element: 576 of them took most of an RMSNorm row); the lanes vectorise, the order is fixed.
constexpr int kLanes = 8;
double lanes_total(const double* s) {
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}
double row_sum(const float* x, int64_t C) {
  double s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes)
    for (int l = 0; l < kLanes; ++l) s[l] += double(x[j + l]);
  for (; j < C; ++j) s[j % kLanes] += double(x[j]);
  return lanes_total(s);
}
// sum over j of (x[j] - mu)²
double row_sum_sq(const float* x, int64_t C, double mu) {
  double s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = double(x[j + l]) - mu;
      s[l] += d * d;
    }
  for (; j < C; ++j) s[j % kLanes] += (double(x[j]) - mu) * (double(x[j]) - mu);
  return lanes_total(s);
}

bool ids_in_range(const int32_t* ids, int64_t N, int64_t V, bool allow_ignore, int32_t ignore) {
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = ids[n];
    if (allow_ignore && t == ignore) continue;
    if (t < 0 || t >= V) return false;
  }
  return true;
}

lora_status layer_norm(lora_backend* be, float* y, float* mean, float* rstd, const float* x,
                       const float* w, const float* b, int64_t N, int64_t C, float eps) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const double mu = row_sum(xr, C) / double(C);
      const double ss = row_sum_sq(xr, C, mu);
      const float rs = static_cast<float>(1.0 / std::sqrt(ss / double(C) + double(eps)));
      const float m = static_cast<float>(mu);
      float* yr = y + r * C;
      for (int64_t j = 0; j < C; ++j) {
        float v = (xr[j] - m) * rs;
        if (w) v *= w[j];
        if (b) v += b[j];
        yr[j] = v;
      }
      mean[r] = m;
      rstd[r] = rs;
    }
  });
  return LORA_OK;
}

// One row of layer_norm_backward: dx = rs·(gj - mean(gj) - x̂·mean(gj·x̂)) with gj = g·w and
// x̂ = (x - m)·rs, and pw[j] += g[j]·x̂[j], pb[j] += g[j] where dw and db are wanted (null for a
// frozen affine, as in LoRA training). The two sums in double over kLanes lanes; vectorised as
// rms_back_row is (it ran scalar, one double chain per sum).
LORA_VECTOR_CLONES
void layer_back_row(const float* __restrict xr, const float* __restrict g, const float* __restrict w, float m,
                    float rs, int64_t C, double* __restrict pw, double* __restrict pb, float* __restrict d) {
  double sg[kLanes] = {}, sgx[kLanes] = {};
  int64_t j = 0;
  if (w) {
    for (; j + kLanes <= C; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float gj = g[j + l] * w[j + l];
        sg[l] += gj;
        sgx[l] += double(gj) * ((xr[j + l] - m) * rs);
      }
    for (; j < C; ++j) {
      const float gj = g[j] * w[j];
      sg[j % kLanes] += gj;
      sgx[j % kLanes] += double(gj) * ((xr[j] - m) * rs);
    }
  } else {
    for (; j + kLanes <= C; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        sg[l] += g[j + l];
        sgx[l] += double(g[j + l]) * ((xr[j + l] - m) * rs);
      }
    for (; j < C; ++j) {
      sg[j % kLanes] += g[j];
      sgx[j % kLanes] += double(g[j]) * ((xr[j] - m) * rs);
    }
  }
  if (pw)
    for (j = 0; j < C; ++j) pw[j] += double(g[j]) * ((xr[j] - m) * rs);
  if (pb)
    for (j = 0; j < C; ++j) pb[j] += g[j];
  const float mg = static_cast<float>(lanes_total(sg) / double(C)), mgx = static_cast<float>(lanes_total(sgx) / double(C));
  if (w)
    for (j = 0; j < C; ++j) d[j] = rs * (g[j] * w[j] - mg - (xr[j] - m) * rs * mgx);
  else
    for (j = 0; j < C; ++j) d[j] = rs * (g[j] - mg - (xr[j] - m) * rs * mgx);
}

lora_status layer_norm_backward(lora_backend* be, float* dx, float* dw, float* db, const float* dy,
                                const float* x, const float* w, const float* mean,
                                const float* rstd, int64_t N, int64_t C) {
  ThreadPool& pool = cpu_pool(be);
  float* acc[2] = {dw, db};
  rows_with_partials(pool, N, C, 2, acc, [&](int64_t r0, int64_t r1, std::vector<double>* part) {
    double* pw = dw ? part[0].data() : nullptr;
    double* pb = db ? part[1].data() : nullptr;
    for (int64_t r = r0; r < r1; ++r) layer_back_row(x + r * C, dy + r * C, w, mean[r], rstd[r], C, pw, pb, dx + r * C);
  });
  return LORA_OK;
}

// One row of rms_norm: y = x·rstd·(offset + w), rstd returned (LORA_VECTOR_CLONES).
LORA_VECTOR_CLONES
float rms_row(const float* xr, const float* w, float offset, float eps, int64_t C, float* yr) {
  const double ss = row_sum_sq(xr, C, 0.0);
  const float rs = static_cast<float>(1.0 / std::sqrt(ss / double(C) + double(eps)));
  if (w)
    for (int64_t j = 0; j < C; ++j) yr[j] = xr[j] * rs * (offset + w[j]);
  else
    for (int64_t j = 0; j < C; ++j) yr[j] = xr[j] * rs;
  return rs;
}

lora_status rms_norm(lora_backend* be, float* y, float* rstd, const float* x, const float* w,
                     int64_t N, int64_t C, float eps, float offset) {
  ThreadPool& pool = cpu_pool(be);
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rstd[r] = rms_row(x + r * C, w, offset, eps, C, y + r * C);
  });
  return LORA_OK;
}

// One row of rms_norm_backward: dx = rs·(gj - x̂·mean(gj·x̂)) with gj = g·(offset + w) and
// x̂ = x·rs, and pw[j] += g[j]·x̂[j] where dw is wanted (pw null: a frozen weight, as in LoRA
// training). Σ gj·x̂ in double over kLanes independent lanes (one double chain waits 4 cycles per
// element). LORA_VECTOR_CLONES: this file is built for baseline x86-64, where SSE2 widens two
// floats at a time. The pointers are __restrict and the weight's absence a loop of its own: with
// pw possibly aliasing the row, the AVX-512 clone ran every element in scalar (1024 rows of 576,
// one thread: 476 us for what the forward does in 162).
LORA_VECTOR_CLONES
void rms_back_row(const float* __restrict xr, const float* __restrict g, const float* __restrict w, float offset,
                  float rs, int64_t C, double* __restrict pw, float* __restrict d) {
  double sgx[kLanes] = {};
  int64_t j = 0;
  if (w) {
    for (; j + kLanes <= C; j += kLanes)
      for (int l = 0; l < kLanes; ++l) sgx[l] += double(g[j + l] * (offset + w[j + l])) * (xr[j + l] * rs);
    for (; j < C; ++j) sgx[j % kLanes] += double(g[j] * (offset + w[j])) * (xr[j] * rs);
  } else {
    for (; j + kLanes <= C; j += kLanes)
      for (int l = 0; l < kLanes; ++l) sgx[l] += double(g[j + l]) * (xr[j + l] * rs);
    for (; j < C; ++j) sgx[j % kLanes] += double(g[j]) * (xr[j] * rs);
  }
  if (pw)
    for (j = 0; j < C; ++j) pw[j] += double(g[j]) * (xr[j] * rs);
  const float mgx = static_cast<float>(lanes_total(sgx) / double(C));
  if (w)
    for (j = 0; j < C; ++j) d[j] = rs * (g[j] * (offset + w[j]) - xr[j] * rs * mgx);
  else
    for (j = 0; j < C; ++j) d[j] = rs * (g[j] - xr[j] * rs * mgx);
}

lora_status rms_norm_backward(lora_backend* be, float* dx, float* dw, const float* dy,
                              const float* x, const float* w, const float* rstd, int64_t N,
                              int64_t C, float offset) {
  ThreadPool& pool = cpu_pool(be);
  float* acc[1] = {dw};
  rows_with_partials(pool, N, C, 1, acc, [&](int64_t r0, int64_t r1, std::vector<double>* part) {
    double* pw = dw ? part[0].data() : nullptr;
    for (int64_t r = r0; r < r1; ++r) rms_back_row(x + r * C, dy + r * C, w, offset, rstd[r], C, pw, dx + r * C);
  });
  return LORA_OK;
}

lora_status embedding(lora_backend* be, float* out, const void* table, lora_dtype table_dtype,
                      const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  ThreadPool& pool = cpu_pool(be);
  if (table_dtype != LORA_F32 && table_dtype != LORA_BF16 && table_dtype != LORA_F16) return LORA_UNSUPPORTED;
  if (!ids_in_range(ids, N, V, false, 0)) return LORA_INVALID_ARGUMENT;
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = int64_t(ids[r]) * C;
      float* o = out + r * C;
      if (table_dtype == LORA_F32) {
        const float* t = static_cast<const float*>(table) + row;
        std::copy(t, t + C, o);
      } else if (table_dtype == LORA_BF16) {
        const uint16_t* t = static_cast<const uint16_t*>(table) + row;
        for (int64_t j = 0; j < C; ++j) o[j] = bf16_to_float(t[j]);
      } else {
        const uint16_t* t = static_cast<const uint16_t*>(table) + row;
        for (int64_t j = 0; j < C; ++j) o[j] = f16_to_float(t[j]);
      }
    }
  });
  return LORA_OK;
}

lora_status embedding_backward(lora_backend* be, float* dtable, const float* dout,
                               const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  ThreadPool& pool = cpu_pool(be);
  if (!ids_in_range(ids, N, V, false, 0)) return LORA_INVALID_ARGUMENT;
  // each thread owns a range of columns, so repeated ids never race
  pool.parallel_for(C, std::max<int64_t>(1, kRowGrain / std::max<int64_t>(N, 1)), [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < N; ++r) {
      float* d = dtable + int64_t(ids[r]) * C;
      const float* g = dout + r * C;
      for (int64_t j = c0; j < c1; ++j) d[j] += g[j];
    }
  });
  return LORA_OK;
}

// The cross-entropy rows run vectorised (exp_vec, vec_math.h): the max and the sums in 16 float
// lanes, the sums gathered into doubles every kCeBlock columns, so a row of 49152 logits keeps
// about fp32 accuracy. exp of anything below -87 (a logit far under the max, or -inf) is 0.
constexpr int kCeLanes = 16;
constexpr int64_t kCeBlock = 2048;  // columns per float partial sum: 128 terms a lane

inline float exp_or_zero(float x) { return x < -87.0f ? 0.0f : exp_vec(x); }

LORA_VECTOR_CLONES float ce_row_max(const float* __restrict z, int64_t V) {
  float m[kCeLanes];
  for (int k = 0; k < kCeLanes; ++k) m[k] = -INFINITY;
  int64_t j = 0;
  for (; j + kCeLanes <= V; j += kCeLanes)
    for (int k = 0; k < kCeLanes; ++k) m[k] = z[j + k] > m[k] ? z[j + k] : m[k];
  float mx = -INFINITY;
  for (int k = 0; k < kCeLanes; ++k) mx = std::max(mx, m[k]);
  for (; j < V; ++j) mx = std::max(mx, z[j]);
  return mx;
}

// s = Σ exp(z - mx), sz = Σ z over one row
LORA_VECTOR_CLONES void ce_row_sums(const float* __restrict z, int64_t V, float mx, double* s, double* sz) {
  double es = 0.0, zs = 0.0;
  for (int64_t b = 0; b < V; b += kCeBlock) {
    const int64_t e = std::min(V, b + kCeBlock);
    float a[kCeLanes] = {}, c[kCeLanes] = {};
    int64_t j = b;
    for (; j + kCeLanes <= e; j += kCeLanes)
      for (int k = 0; k < kCeLanes; ++k) {
        a[k] += exp_or_zero(z[j + k] - mx);
        c[k] += z[j + k];
      }
    for (; j < e; ++j) {
      es += exp_or_zero(z[j] - mx);
      zs += z[j];
    }
    for (int k = 0; k < kCeLanes; ++k) {
      es += a[k];
      zs += c[k];
    }
  }
  *s = es;
  *sz = zs;
}

// d = g·(exp(z - l) - u) over one row; d = z in place has its own loop (a possible overlap would
// make the compiler fall back to scalar code)
LORA_VECTOR_CLONES void ce_row_grad(float* __restrict d, const float* __restrict z, int64_t V, float g, float l, float u) {
  for (int64_t j = 0; j < V; ++j) d[j] = g * (exp_or_zero(z[j] - l) - u);
}
LORA_VECTOR_CLONES void ce_row_grad_in_place(float* __restrict d, int64_t V, float g, float l, float u) {
  for (int64_t j = 0; j < V; ++j) d[j] = g * (exp_or_zero(d[j] - l) - u);
}

lora_status cross_entropy(lora_backend* be, float* loss, float* lse, const float* logits,
                          const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                          float smoothing) {
  ThreadPool& pool = cpu_pool(be);
  if (!ids_in_range(targets, N, V, true, ignore_index)) return LORA_INVALID_ARGUMENT;
  pool.parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* z = logits + r * V;
      const float mx = ce_row_max(z, V);
      double s = 0.0, sz = 0.0;
      ce_row_sums(z, V, mx, &s, &sz);
      const double l = double(mx) + std::log(s);
      lse[r] = static_cast<float>(l);
      const int32_t t = targets[r];
      if (t == ignore_index) {
        loss[r] = 0.0f;
        continue;
      }
      // lse - Σ q·z with q = (1-ε)·onehot + ε/V (no ε term when ε = 0: -inf logits stay finite)
      loss[r] = static_cast<float>(l - (1.0 - smoothing) * z[t] - (smoothing != 0.0f ? smoothing * sz / double(V) : 0.0));
    }
  });
  return LORA_OK;
}

lora_status cross_entropy_backward(lora_backend* be, float* dlogits, const float* dloss,
                                   const float* logits, const float* lse, const int32_t* targets,
                                   int64_t N, int64_t V, int32_t ignore_index, float smoothing) {
  ThreadPool& pool = cpu_pool(be);
  if (!ids_in_range(targets, N, V, true, ignore_index)) return LORA_INVALID_ARGUMENT;
  pool.parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* d = dlogits + r * V;
      const int32_t t = targets[r];
      if (t == ignore_index) {
        std::fill(d, d + V, 0.0f);
        continue;
      }
      const float g = dloss[r];
      if (d == logits + r * V) ce_row_grad_in_place(d, V, g, lse[r], smoothing / float(V));
      else ce_row_grad(d, logits + r * V, V, g, lse[r], smoothing / float(V));
      d[t] -= g * (1.0f - smoothing);
    }
  });
  return LORA_OK;
}

// a·cos θ and a·sin θ of every (row, frequency) of a call, θ = position·inv_freq in fp32 as
// transformers computes it: row r's half cosines, then its half sines. The table of the last call
// is kept (per calling thread) with the positions, inv_freq and a it was made from: a forward
// rotates q and k of every layer at the same positions, 2·layers calls that then share one table
// (the trig was most of the kernel's time). Any change of an input rebuilds it; it is returned
// only for calls whose inputs equal, bit for bit, the ones it was built from.
constexpr int64_t kRopeTableMax = int64_t(1) << 21;  // rows·half entries (16 MB of cos and sin)

const float* rope_table(ThreadPool& pool, const int32_t* positions, const float* inv_freq, int64_t rows,
                        int64_t half, float a) {
  struct Table {
    std::vector<int32_t> pos;
    std::vector<float> inv_freq, cs;
    float a = 0.0f;
  };
  thread_local Table t;
  if (rows * half > kRopeTableMax) return nullptr;
  const bool same = static_cast<int64_t>(t.pos.size()) == rows && static_cast<int64_t>(t.inv_freq.size()) == half &&
                    std::memcmp(&t.a, &a, sizeof a) == 0 &&
                    std::memcmp(t.pos.data(), positions, static_cast<size_t>(rows) * sizeof(int32_t)) == 0 &&
                    std::memcmp(t.inv_freq.data(), inv_freq, static_cast<size_t>(half) * sizeof(float)) == 0;
  if (same) return t.cs.data();
  t.pos.assign(positions, positions + rows);
  t.inv_freq.assign(inv_freq, inv_freq + half);
  t.a = a;
  t.cs.resize(static_cast<size_t>(rows * 2 * half));
  float* cs = t.cs.data();
  pool.parallel_for(rows, row_grain(16 * half), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float p = static_cast<float>(positions[r]);
      float* c = cs + r * 2 * half;
      for (int64_t i = 0; i < half; ++i) {
        const float theta = p * inv_freq[i];
        c[i] = a * std::cos(theta);
        c[half + i] = a * std::sin(theta);
      }
    }
  });
  return cs;
}

// RoPE (rotate_half pairs (i, i + R/2) of each head's first R features) by +θ (forward, sign 1)
// or -θ (backward, sign -1); the angles of a token are computed once for its H heads (and once
// for the calls that share a table, above).
lora_status rope_rotate(lora_backend* be, float* y, const float* x, const int32_t* positions,
                        const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D,
                        int64_t R, float a, float sign) {
  if (Bt < 0 || T < 0 || H < 0 || D < 0 || R < 0 || R > D || R % 2 != 0) return LORA_INVALID_ARGUMENT;
  ThreadPool& pool = cpu_pool(be);
  const int64_t half = R / 2;
  const float* table = half > 0 ? rope_table(pool, positions, inv_freq, Bt * T, half, a) : nullptr;
  pool.parallel_for(Bt * T, row_grain(H * D), [&](int64_t r0, int64_t r1) {
    std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
    for (int64_t r = r0; r < r1; ++r) {
      if (table) {
        // sign·(a·sin θ) has the bits of (sign·a)·sin θ: sign is ±1
        const float* tr = table + r * 2 * half;
        for (int64_t i = 0; i < half; ++i) {
          c[i] = tr[i];
          s[i] = sign * tr[half + i];
        }
      } else {
        const float p = static_cast<float>(positions[r]);
        for (int64_t i = 0; i < half; ++i) {
          const float theta = p * inv_freq[i];  // fp32, as transformers computes it
          c[i] = a * std::cos(theta);
          s[i] = sign * a * std::sin(theta);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = x + (r * H + h) * D;
        float* yr = y + (r * H + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = xr[i], x2 = xr[i + half];
          yr[i] = x1 * c[i] - x2 * s[i];
          yr[i + half] = x2 * c[i] + x1 * s[i];
        }
        if (yr != xr) std::copy(xr + R, xr + D, yr + R);
      }
    }
  });
  return LORA_OK;
}

lora_status rope(lora_backend* be, float* y, const float* x, const int32_t* positions,
                 const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D, int64_t R,
                 float a) {
  return rope_rotate(be, y, x, positions, inv_freq, Bt, T, H, D, R, a, 1.0f);
}

lora_status rope_backward(lora_backend* be, float* dx, const float* dy, const int32_t* positions,
                          const float* inv_freq, int64_t Bt, int64_t T, int64_t H, int64_t D,
                          int64_t R, float a) {
  return rope_rotate(be, dx, dy, positions, inv_freq, Bt, T, H, D, R, a, -1.0f);
}

}  // namespace

void cpu_register_nn(lora_backend& t) {
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

}  // namespace lora
