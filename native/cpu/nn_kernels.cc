// CPU kernels for normalisation, embedding and cross-entropy (see nn_kernels.h and the math in
// native/backend.h). Each parallelises over independent rows; reductions across rows (dw, db of
// the norms) use one partial buffer per thread, summed at the end, so results do not depend on
// timing. Attention has its own kernel (attention.h).
#include "nn_kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace lora {
namespace {

constexpr int64_t kRowGrain = 1 << 14;  // elements of work worth waking a second thread for

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kRowGrain / std::max<int64_t>(cols, 1)); }

// Runs fn(tid, begin, end) over contiguous row chunks and then sums each thread's `width`
// doubles of partials into acc[0..width) (+=, float).
template <typename Fn>
void rows_with_partials(ThreadPool& pool, int64_t N, int64_t width, int copies, float* const* acc, Fn fn) {
  const int nt = (N * width <= kRowGrain || pool.size() == 1) ? 1 : pool.size();
  std::vector<std::vector<double>> part(static_cast<size_t>(nt) * copies);
  for (auto& p : part) p.assign(static_cast<size_t>(width), 0.0);
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

bool ids_in_range(const int32_t* ids, int64_t N, int64_t V, bool allow_ignore, int32_t ignore) {
  for (int64_t n = 0; n < N; ++n) {
    const int32_t t = ids[n];
    if (allow_ignore && t == ignore) continue;
    if (t < 0 || t >= V) return false;
  }
  return true;
}

}  // namespace

Status cpu_layer_norm(ThreadPool& pool, float* y, float* mean, float* rstd, const float* x,
                      const float* w, const float* b, int64_t N, int64_t C, float eps) {
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      double s = 0.0;
      for (int64_t j = 0; j < C; ++j) s += xr[j];
      const double mu = s / double(C);
      double ss = 0.0;
      for (int64_t j = 0; j < C; ++j) ss += (xr[j] - mu) * (xr[j] - mu);
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
  return Status::Ok;
}

Status cpu_layer_norm_backward(ThreadPool& pool, float* dx, float* dw, float* db, const float* dy,
                               const float* x, const float* w, const float* mean,
                               const float* rstd, int64_t N, int64_t C) {
  float* acc[2] = {dw, db};
  rows_with_partials(pool, N, C, 2, acc, [&](int64_t r0, int64_t r1, std::vector<double>* part) {
    double* pw = part[0].data();
    double* pb = part[1].data();
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* g = dy + r * C;
      const float m = mean[r], rs = rstd[r];
      double sg = 0.0, sgx = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const float xh = (xr[j] - m) * rs;
        const float gj = w ? g[j] * w[j] : g[j];
        sg += gj;
        sgx += double(gj) * xh;
        pw[j] += double(g[j]) * xh;
        pb[j] += g[j];
      }
      const float mg = static_cast<float>(sg / double(C)), mgx = static_cast<float>(sgx / double(C));
      float* d = dx + r * C;
      for (int64_t j = 0; j < C; ++j) {
        const float xh = (xr[j] - m) * rs;
        const float gj = w ? g[j] * w[j] : g[j];
        d[j] = rs * (gj - mg - xh * mgx);
      }
    }
  });
  return Status::Ok;
}

Status cpu_rms_norm(ThreadPool& pool, float* y, float* rstd, const float* x, const float* w,
                    int64_t N, int64_t C, float eps) {
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      double ss = 0.0;
      for (int64_t j = 0; j < C; ++j) ss += double(xr[j]) * xr[j];
      const float rs = static_cast<float>(1.0 / std::sqrt(ss / double(C) + double(eps)));
      float* yr = y + r * C;
      for (int64_t j = 0; j < C; ++j) yr[j] = w ? xr[j] * rs * w[j] : xr[j] * rs;
      rstd[r] = rs;
    }
  });
  return Status::Ok;
}

Status cpu_rms_norm_backward(ThreadPool& pool, float* dx, float* dw, const float* dy,
                             const float* x, const float* w, const float* rstd, int64_t N,
                             int64_t C) {
  float* acc[1] = {dw};
  rows_with_partials(pool, N, C, 1, acc, [&](int64_t r0, int64_t r1, std::vector<double>* part) {
    double* pw = part[0].data();
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * C;
      const float* g = dy + r * C;
      const float rs = rstd[r];
      double sgx = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        const float xh = xr[j] * rs;
        const float gj = w ? g[j] * w[j] : g[j];
        sgx += double(gj) * xh;
        pw[j] += double(g[j]) * xh;
      }
      const float mgx = static_cast<float>(sgx / double(C));
      float* d = dx + r * C;
      for (int64_t j = 0; j < C; ++j) {
        const float gj = w ? g[j] * w[j] : g[j];
        d[j] = rs * (gj - xr[j] * rs * mgx);
      }
    }
  });
  return Status::Ok;
}

Status cpu_embedding(ThreadPool& pool, float* out, const float* table, const int32_t* ids,
                     int64_t N, int64_t V, int64_t C) {
  if (!ids_in_range(ids, N, V, false, 0)) return Status::InvalidArgument;
  pool.parallel_for(N, row_grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::copy(table + int64_t(ids[r]) * C, table + (int64_t(ids[r]) + 1) * C, out + r * C);
  });
  return Status::Ok;
}

Status cpu_embedding_backward(ThreadPool& pool, float* dtable, const float* dout,
                              const int32_t* ids, int64_t N, int64_t V, int64_t C) {
  if (!ids_in_range(ids, N, V, false, 0)) return Status::InvalidArgument;
  // each thread owns a range of columns, so repeated ids never race
  pool.parallel_for(C, std::max<int64_t>(1, kRowGrain / std::max<int64_t>(N, 1)), [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < N; ++r) {
      float* d = dtable + int64_t(ids[r]) * C;
      const float* g = dout + r * C;
      for (int64_t j = c0; j < c1; ++j) d[j] += g[j];
    }
  });
  return Status::Ok;
}

Status cpu_cross_entropy(ThreadPool& pool, float* loss, float* lse, const float* logits,
                         const int32_t* targets, int64_t N, int64_t V, int32_t ignore_index,
                         float smoothing) {
  if (!ids_in_range(targets, N, V, true, ignore_index)) return Status::InvalidArgument;
  pool.parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* z = logits + r * V;
      float mx = -INFINITY;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, z[j]);
      double s = 0.0, sz = 0.0;
      for (int64_t j = 0; j < V; ++j) {
        s += std::exp(double(z[j]) - mx);
        sz += z[j];
      }
      const double l = double(mx) + std::log(s);
      lse[r] = static_cast<float>(l);
      const int32_t t = targets[r];
      if (t == ignore_index) {
        loss[r] = 0.0f;
        continue;
      }
      // lse - Σ q·z with q = (1-ε)·onehot + ε/V
      loss[r] = static_cast<float>(l - (1.0 - smoothing) * z[t] - smoothing * sz / double(V));
    }
  });
  return Status::Ok;
}

Status cpu_cross_entropy_backward(ThreadPool& pool, float* dlogits, const float* dloss,
                                  const float* logits, const float* lse, const int32_t* targets,
                                  int64_t N, int64_t V, int32_t ignore_index, float smoothing) {
  if (!ids_in_range(targets, N, V, true, ignore_index)) return Status::InvalidArgument;
  pool.parallel_for(N, row_grain(V), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* d = dlogits + r * V;
      const int32_t t = targets[r];
      if (t == ignore_index) {
        std::fill(d, d + V, 0.0f);
        continue;
      }
      const float* z = logits + r * V;
      const float g = dloss[r], l = lse[r], u = smoothing / float(V);
      for (int64_t j = 0; j < V; ++j) d[j] = g * (std::exp(z[j] - l) - u);
      d[t] -= g * (1.0f - smoothing);
    }
  });
  return Status::Ok;
}

}  // namespace lora
