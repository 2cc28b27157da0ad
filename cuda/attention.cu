// Fused scaled-dot-product attention on CUDA, forward and backward, with the math and masks of
// lora_backend::attention (native/backend/backend.h; the sizes gathered in native/backend/attention.h):
// GQA (query head h reads kv head h / G without copying k, v), causal / padding / segment /
// sliding-window masks, queries at positions S - T + i (decode against a KV cache whose batch
// entries are kv_batch_stride apart). FlashAttention-2's blocking on
// CUDA cores in fp32 with shared-memory tiles: never a (T, S) matrix in memory, O(T) extra state.
//
// The query rows of one (batch b, kv head kvh) are the pairs (t, g), numbered ρ = t·G + g, so the
// G heads that share K and V sit in one block and read each K/V tile once.
//   forward (one block per 8·W rows): warp w owns 8 rows; lanes are keys for the scores (a tile of
//     32 keys) and head dims for the output (lane + 32·c); online softmax per row.
//   dq (one block per 8·W rows): the same layout, recomputing P and dP per key tile.
//   dk, dv (one block per 8·W keys): warp w owns 8 keys; lanes are query rows for the scores (a
//     tile of 32 rows) and head dims for dk, dv.
// Two backward kernels instead of FlashAttention-2's atomic dq: deterministic results for the
// price of recomputing S and dP once more. Not here: tensor cores, a split over keys for decode.
#include "../native/backend/attention.h"
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kTile = 32;  // keys per tile (forward, dq) or query rows per tile (dk, dv): one per lane
constexpr int kOwn = 8;    // rows (forward, dq) or keys (dk, dv) each warp owns
constexpr int kMaxWarps = 8;

// Key j is visible to the query at position p (j < S checked by the caller), given the key's
// padding flag and segment and the query's segment.
__device__ __forceinline__ bool visible(const AttentionArgs& a, int64_t p, int64_t j, int32_t key_ok,
                                        int32_t key_seg, int32_t query_seg) {
  return key_ok != 0 && (!a.causal || j <= p) && (a.window == 0 || j > p - a.window) &&
         (a.segment_ids == nullptr || key_seg == query_seg);
}
__device__ __forceinline__ int32_t key_ok(const AttentionArgs& a, int64_t b, int64_t j) {
  return a.key_mask ? a.key_mask[b * a.key_mask_stride + j] : 1;
}
__device__ __forceinline__ int32_t segment(const AttentionArgs& a, int64_t b, int64_t p) {
  return a.segment_ids ? a.segment_ids[b * a.segment_stride + p] : 0;
}

__device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
__device__ __forceinline__ int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The keys queries at positions [p_lo, p_hi] can see: [*lo, *hi].
__device__ __forceinline__ void key_range(const AttentionArgs& a, int64_t p_lo, int64_t p_hi, int64_t* lo,
                                          int64_t* hi) {
  *lo = a.window > 0 ? imax(0, p_lo - a.window + 1) : 0;
  *hi = a.causal ? imin(a.S - 1, p_hi) : a.S - 1;
}

// Rows [j0, j0 + n) of a (S, KVH, D) k or v into a tile with row stride ld (columns D..ld zero,
// rows past `last` zero).
__device__ __forceinline__ void load_kv(float* dst, int64_t ld, const float* src, int64_t src_ld, int64_t j0,
                                        int64_t n, int64_t last, int64_t D, int tid, int threads) {
  for (int64_t e = tid; e < n * ld; e += threads) {
    const int64_t r = e / ld, d = e % ld, j = j0 + r;
    dst[e] = (d < D && j <= last) ? src[j * src_ld + d] : 0.0f;
  }
}

// Query rows [rho0, rho0 + n) of (b, kvh) from a (B, T, H, D) tensor, times `mul`, into a tile with
// row stride ld (zeros past the last row and past D).
__device__ __forceinline__ void load_rows(float* dst, int64_t ld, const float* src, const AttentionArgs& a,
                                          int64_t b, int64_t kvh, int64_t G, int64_t rho0, int64_t n,
                                          float mul, int tid, int threads) {
  const int64_t rows = a.T * G;
  for (int64_t e = tid; e < n * ld; e += threads) {
    const int64_t r = e / ld, d = e % ld, rho = rho0 + r;
    float x = 0.0f;
    if (d < a.D && rho < rows) x = src[((b * a.T + rho / G) * a.H + kvh * G + rho % G) * a.D + d] * mul;
    dst[e] = x;
  }
}

// Where a block is: its (batch b, kv head kvh), the first of its 8·W rows (forward, dq) or keys
// (dk, dv) within that pair, and the thread's place in it. blocks_per_pair blocks cover one pair.
struct Place {
  int lane, warp, tid, threads;
  int64_t G, rows, ld, b, kvh, base, first;
};
__device__ __forceinline__ Place place(const AttentionArgs& a, int64_t blocks_per_pair, int dl) {
  Place p;
  p.lane = threadIdx.x;
  p.warp = threadIdx.y;
  p.threads = blockDim.y * kTile;
  p.tid = p.warp * kTile + p.lane;
  p.G = a.H / a.KVH;
  p.rows = a.T * p.G;
  p.ld = kTile * dl + 1;  // odd: lanes reading a column of a tile hit distinct banks
  const int64_t pair = blockIdx.x / blocks_per_pair;
  p.b = pair / a.KVH;
  p.kvh = pair % a.KVH;
  p.base = a.S - a.T;
  p.first = (blockIdx.x % blocks_per_pair) * kOwn * static_cast<int64_t>(blockDim.y);
  return p;
}

// s[i] += Σ_d rows[i·ld_rows + d] · col[d] for the kOwn rows a warp owns (rows: the same address
// in every lane, a broadcast; col: this lane's key or query row).
__device__ __forceinline__ void dot_rows(float (&s)[kOwn], const float* rows, int64_t ld_rows, const float* col,
                                         int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float x = col[d];
#pragma unroll
    for (int i = 0; i < kOwn; ++i) s[i] += rows[i * ld_rows + d] * x;
  }
}

// acc[i][c] += Σ_r w[i·ld_w + r] · tile[r·ld + 32·c + lane] over the kTile rows r of a tile: the
// warp's weights (broadcast) times the tile's rows, this lane's head dims.
template <int DL>
__device__ __forceinline__ void add_weighted(float (&acc)[kOwn][DL], const float* w, int64_t ld_w, const float* tile,
                                             int64_t ld, int lane) {
  for (int r = 0; r < kTile; ++r) {
    float x[DL];
#pragma unroll
    for (int c = 0; c < DL; ++c) x[c] = tile[r * ld + c * kTile + lane];
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const float wi = w[i * ld_w + r];
#pragma unroll
      for (int c = 0; c < DL; ++c) acc[i][c] += wi * x[c];
    }
  }
}

template <int DL>
__global__ void __launch_bounds__(kTile * kMaxWarps)
    attention_forward_kernel(float* __restrict__ out,      // (B, T, H, D)
                             float* __restrict__ lse,      // (B, H, T)
                             const float* __restrict__ q,  // (B, T, H, D)
                             const float* __restrict__ k,  // (B, S, KVH, D), batch stride kv_batch_stride
                             const float* __restrict__ v,  // (B, S, KVH, D)
                             const AttentionArgs a, int64_t row_blocks) {
  LORA_DYNAMIC_SMEM(float, sm);
  const Place P = place(a, row_blocks, DL);
  const int lane = P.lane, w = P.warp, tid = P.tid, threads = P.threads;
  const int64_t Br = kOwn * blockDim.y, G = P.G, D = a.D, rows = P.rows, ld = P.ld;
  const int64_t rho0 = P.first, b = P.b, kvh = P.kvh, base = P.base;
  float* qs = sm;               // (Br, D): q·scale
  float* ks = qs + Br * D;      // (kTile, ld)
  float* vs = ks + kTile * ld;  // (kTile, ld)
  float* ps = vs + kTile * ld;  // (Br, kTile): probabilities of the tile
  load_rows(qs, D, q, a, b, kvh, G, rho0, Br, a.scale, tid, threads);

  int64_t pos[kOwn];
  int32_t qseg[kOwn];
  float m[kOwn], l[kOwn], o[kOwn][DL];
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    pos[i] = base + imin(rho0 + w * kOwn + i, rows - 1) / G;
    qseg[i] = segment(a, b, pos[i]);
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < DL; ++c) o[i][c] = 0.0f;
  }
  int64_t jlo, jhi;
  key_range(a, base + rho0 / G, base + (imin(rho0 + Br, rows) - 1) / G, &jlo, &jhi);
  const int64_t kv_ld = a.KVH * D, kv_off = b * a.kv_batch_stride + kvh * D;
  for (int64_t j0 = jlo; j0 <= jhi; j0 += kTile) {
    __syncthreads();  // the previous tile is no longer read (and qs is written)
    load_kv(ks, ld, k + kv_off, kv_ld, j0, kTile, jhi, D, tid, threads);
    load_kv(vs, ld, v + kv_off, kv_ld, j0, kTile, jhi, D, tid, threads);
    __syncthreads();
    const int64_t j = j0 + lane;
    float s[kOwn] = {};
    dot_rows(s, qs + w * kOwn * D, D, ks + lane * ld, D);
    const int32_t kok = j <= jhi ? key_ok(a, b, j) : 0, kseg = j <= jhi ? segment(a, b, j) : 0;
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const bool vis = visible(a, pos[i], j, kok, kseg, qseg[i]);
      const float mn = fmaxf(m[i], warp_max(vis ? s[i] : -INFINITY));
      const float mu = mn == -INFINITY ? 0.0f : mn;  // no visible key yet: keep every term 0
      const float alpha = expf(m[i] - mu);
      const float p = vis ? expf(s[i] - mu) : 0.0f;
      l[i] = l[i] * alpha + p;  // this lane's share of the row sum
      m[i] = mn;
#pragma unroll
      for (int c = 0; c < DL; ++c) o[i][c] *= alpha;
      ps[(w * kOwn + i) * kTile + lane] = p;
    }
    __syncwarp();
    add_weighted(o, ps + w * kOwn * kTile, kTile, vs, ld, lane);
  }
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const float lt = warp_sum(l[i]);
    const int64_t rho = rho0 + w * kOwn + i;
    if (rho >= rows) continue;
    const int64_t t = rho / G, h = kvh * G + rho % G;
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    float* dst = out + ((b * a.T + t) * a.H + h) * D;
#pragma unroll
    for (int c = 0; c < DL; ++c)
      if (c * kTile + lane < D) dst[c * kTile + lane] = o[i][c] * inv;
    if (lane == 0) lse[(b * a.H + h) * a.T + t] = lt > 0.0f ? m[i] + logf(lt) : INFINITY;
  }
}

// δ = rowsum(dout ⊙ out), one thread per (b, h, t).
__global__ void attention_delta_kernel(float* __restrict__ delta,       // (B, H, T)
                                       const float* __restrict__ dout,  // (B, T, H, D)
                                       const float* __restrict__ out,   // (B, T, H, D)
                                       int64_t B, int64_t T, int64_t H, int64_t D) {
  const int64_t n = B * H * T;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < n;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = row % T, h = (row / T) % H, b = row / (T * H);
    const int64_t off = ((b * T + t) * H + h) * D;
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += dout[off + d] * out[off + d];
    delta[row] = s;
  }
}

// dq_i = scale·Σ_j p_ij·(dp_ij - δ_i)·k_j with p, dp recomputed per key tile.
template <int DL>
__global__ void __launch_bounds__(kTile * kMaxWarps)
    attention_dq_kernel(float* __restrict__ dq,           // (B, T, H, D)
                        const float* __restrict__ dout,   // (B, T, H, D)
                        const float* __restrict__ q,      // (B, T, H, D)
                        const float* __restrict__ k,      // (B, S, KVH, D)
                        const float* __restrict__ v,      // (B, S, KVH, D)
                        const float* __restrict__ lse,    // (B, H, T)
                        const float* __restrict__ delta,  // (B, H, T)
                        const AttentionArgs a, int64_t row_blocks) {
  LORA_DYNAMIC_SMEM(float, sm);
  const Place P = place(a, row_blocks, DL);
  const int lane = P.lane, w = P.warp, tid = P.tid, threads = P.threads;
  const int64_t Br = kOwn * blockDim.y, G = P.G, D = a.D, rows = P.rows, ld = P.ld;
  const int64_t rho0 = P.first, b = P.b, kvh = P.kvh, base = P.base;
  float* qs = sm;                // (Br, D)
  float* gs = qs + Br * D;       // (Br, D): dout
  float* ks = gs + Br * D;       // (kTile, ld)
  float* vs = ks + kTile * ld;   // (kTile, ld)
  float* dss = vs + kTile * ld;  // (Br, kTile): dS of the tile
  load_rows(qs, D, q, a, b, kvh, G, rho0, Br, 1.0f, tid, threads);
  load_rows(gs, D, dout, a, b, kvh, G, rho0, Br, 1.0f, tid, threads);

  int64_t pos[kOwn];
  int32_t qseg[kOwn];
  float rl[kOwn], rd[kOwn], acc[kOwn][DL];
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const int64_t rho = imin(rho0 + w * kOwn + i, rows - 1);
    const int64_t t = rho / G, h = kvh * G + rho % G;
    pos[i] = base + t;
    qseg[i] = segment(a, b, pos[i]);
    rl[i] = lse[(b * a.H + h) * a.T + t];
    rd[i] = delta[(b * a.H + h) * a.T + t];
#pragma unroll
    for (int c = 0; c < DL; ++c) acc[i][c] = 0.0f;
  }
  int64_t jlo, jhi;
  key_range(a, base + rho0 / G, base + (imin(rho0 + Br, rows) - 1) / G, &jlo, &jhi);
  const int64_t kv_ld = a.KVH * D, kv_off = b * a.kv_batch_stride + kvh * D;
  for (int64_t j0 = jlo; j0 <= jhi; j0 += kTile) {
    __syncthreads();
    load_kv(ks, ld, k + kv_off, kv_ld, j0, kTile, jhi, D, tid, threads);
    load_kv(vs, ld, v + kv_off, kv_ld, j0, kTile, jhi, D, tid, threads);
    __syncthreads();
    const int64_t j = j0 + lane;
    float s[kOwn] = {}, dp[kOwn] = {};
    dot_rows(s, qs + w * kOwn * D, D, ks + lane * ld, D);
    dot_rows(dp, gs + w * kOwn * D, D, vs + lane * ld, D);
    const int32_t kok = j <= jhi ? key_ok(a, b, j) : 0, kseg = j <= jhi ? segment(a, b, j) : 0;
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const float p = visible(a, pos[i], j, kok, kseg, qseg[i]) ? expf(s[i] * a.scale - rl[i]) : 0.0f;
      dss[(w * kOwn + i) * kTile + lane] = p * (dp[i] - rd[i]);
    }
    __syncwarp();
    add_weighted(acc, dss + w * kOwn * kTile, kTile, ks, ld, lane);
  }
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const int64_t rho = rho0 + w * kOwn + i;
    if (rho >= rows) continue;
    float* dst = dq + ((b * a.T + rho / G) * a.H + kvh * G + rho % G) * D;
#pragma unroll
    for (int c = 0; c < DL; ++c)
      if (c * kTile + lane < D) dst[c * kTile + lane] = acc[i][c] * a.scale;
  }
}

// dv_j = Σ_i p_ij·dout_i, dk_j = scale·Σ_i p_ij·(dp_ij - δ_i)·q_i over every query row of the kv
// head (all G heads) that can see key j.
template <int DL>
__global__ void __launch_bounds__(kTile * kMaxWarps)
    attention_dkv_kernel(float* __restrict__ dk,          // (B, S, KVH, D), batch stride kv_batch_stride
                         float* __restrict__ dv,          // (B, S, KVH, D)
                         const float* __restrict__ dout,  // (B, T, H, D)
                         const float* __restrict__ q,     // (B, T, H, D)
                         const float* __restrict__ k,     // (B, S, KVH, D)
                         const float* __restrict__ v,     // (B, S, KVH, D)
                         const float* __restrict__ lse,   // (B, H, T)
                         const float* __restrict__ delta, // (B, H, T)
                         const AttentionArgs a, int64_t key_blocks) {
  LORA_DYNAMIC_SMEM(float, sm);
  const Place P = place(a, key_blocks, DL);
  const int lane = P.lane, w = P.warp, tid = P.tid, threads = P.threads;
  const int64_t Bk = kOwn * blockDim.y, G = P.G, D = a.D, rows = P.rows, ld = P.ld;
  const int64_t j0 = P.first, b = P.b, kvh = P.kvh, base = P.base;
  float* ks = sm;                // (Bk, D)
  float* vs = ks + Bk * D;       // (Bk, D)
  float* qs = vs + Bk * D;       // (kTile, ld)
  float* gs = qs + kTile * ld;   // (kTile, ld): dout
  float* ps = gs + kTile * ld;   // (Bk, kTile + 1)
  float* dss = ps + Bk * (kTile + 1);
  float* row_lse = dss + Bk * (kTile + 1);  // (kTile)
  float* row_delta = row_lse + kTile;       // (kTile)
  const int64_t kv_ld = a.KVH * D, kv_off = b * a.kv_batch_stride + kvh * D;
  const int64_t last = imin(j0 + Bk, a.S) - 1;
  for (int64_t e = tid; e < Bk * D; e += threads) {
    const int64_t r = e / D, d = e % D, j = j0 + r;
    ks[e] = j <= last ? k[kv_off + j * kv_ld + d] : 0.0f;
    vs[e] = j <= last ? v[kv_off + j * kv_ld + d] : 0.0f;
  }
  int32_t kok[kOwn], kseg[kOwn];
  float dka[kOwn][DL], dva[kOwn][DL];
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const int64_t j = j0 + w * kOwn + i;
    kok[i] = j <= last ? key_ok(a, b, j) : 0;
    kseg[i] = j <= last ? segment(a, b, j) : 0;
#pragma unroll
    for (int c = 0; c < DL; ++c) dka[i][c] = dva[i][c] = 0.0f;
  }
  // the query rows that can see a key of the block: positions p >= j0 (causal), p < last + window
  const int64_t t_lo = a.causal ? imax(0, j0 - base) : 0;
  const int64_t t_hi = a.window > 0 ? imin(a.T - 1, last + a.window - 1 - base) : a.T - 1;
  const int64_t rho_end = imin((t_hi + 1) * G, rows);
  for (int64_t rho0 = t_lo * G; rho0 < rho_end; rho0 += kTile) {
    __syncthreads();  // the previous row tile is no longer read (and ks, vs are written)
    load_rows(qs, ld, q, a, b, kvh, G, rho0, kTile, 1.0f, tid, threads);
    load_rows(gs, ld, dout, a, b, kvh, G, rho0, kTile, 1.0f, tid, threads);
    if (tid < kTile) {
      const int64_t rho = imin(rho0 + tid, rows - 1);
      const int64_t stat = (b * a.H + kvh * G + rho % G) * a.T + rho / G;
      row_lse[tid] = lse[stat];
      row_delta[tid] = delta[stat];
    }
    __syncthreads();
    const int64_t rho = rho0 + lane;
    const bool row_ok = rho < rows;
    const int64_t p = base + imin(rho, rows - 1) / G;
    const int32_t qseg = segment(a, b, p);
    float s[kOwn] = {}, dp[kOwn] = {};
    dot_rows(s, ks + w * kOwn * D, D, qs + lane * ld, D);
    dot_rows(dp, vs + w * kOwn * D, D, gs + lane * ld, D);
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const int64_t j = j0 + w * kOwn + i;
      const bool vis = row_ok && visible(a, p, j, kok[i], kseg[i], qseg);
      const float pij = vis ? expf(s[i] * a.scale - row_lse[lane]) : 0.0f;
      ps[(w * kOwn + i) * (kTile + 1) + lane] = pij;
      dss[(w * kOwn + i) * (kTile + 1) + lane] = pij * (dp[i] - row_delta[lane]);
    }
    __syncwarp();
    add_weighted(dva, ps + w * kOwn * (kTile + 1), kTile + 1, gs, ld, lane);
    add_weighted(dka, dss + w * kOwn * (kTile + 1), kTile + 1, qs, ld, lane);
  }
#pragma unroll
  for (int i = 0; i < kOwn; ++i) {
    const int64_t j = j0 + w * kOwn + i;
    if (j > last) continue;
#pragma unroll
    for (int c = 0; c < DL; ++c) {
      const int64_t d = c * kTile + lane;
      if (d < D) {
        dk[kv_off + j * kv_ld + d] = dka[i][c] * a.scale;
        dv[kv_off + j * kv_ld + d] = dva[i][c];
      }
    }
  }
}

// Head dims per lane (D <= 32·DL), or 0 above the largest instantiation.
int dims_per_lane(int64_t D) { return D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : D <= 256 ? 8 : 0; }

size_t forward_smem(int64_t D, int dl, int warps) {
  const int64_t br = kOwn * warps, ld = kTile * dl + 1;
  return static_cast<size_t>(br * D + 2 * kTile * ld + br * kTile) * sizeof(float);
}
size_t dq_smem(int64_t D, int dl, int warps) {
  const int64_t br = kOwn * warps, ld = kTile * dl + 1;
  return static_cast<size_t>(2 * br * D + 2 * kTile * ld + br * kTile) * sizeof(float);
}
size_t dkv_smem(int64_t D, int dl, int warps) {
  const int64_t bk = kOwn * warps, ld = kTile * dl + 1;
  return static_cast<size_t>(2 * bk * D + 2 * kTile * ld + 2 * bk * (kTile + 1) + 2 * kTile) * sizeof(float);
}

// The most warps per block (8, 4, 2 or 1) whose shared memory fits the limit; 0 if none does.
template <typename Smem>
int warps_for(Smem smem, int64_t D, int dl, size_t limit, int most) {
  for (int w = most; w >= 1; w /= 2)
    if (smem(D, dl, w) <= limit) return w;
  return 0;
}

cudaError_t set_smem(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;  // the default limit needs no opt-in
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename Kernel, typename... Args>
cudaError_t launch_blocks(Kernel kernel, int64_t blocks, int warps, size_t smem, cudaStream_t stream,
                          Args&&... args) {
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  cudaError_t e = set_smem(reinterpret_cast<const void*>(kernel), smem);
  if (e != cudaSuccess) return e;
  launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kTile, warps), smem, stream, std::forward<Args>(args)...);
  return cudaGetLastError();
}

template <int DL>
cudaError_t forward_dl(cudaStream_t stream, float* out, float* lse, const float* q, const float* k,
                       const float* v, const AttentionArgs& a, size_t smem_limit) {
  const int64_t rows = a.T * (a.H / a.KVH);
  // a decode step has few rows: fewer warps rather than idle ones
  const int64_t need = (rows + kOwn - 1) / kOwn;
  const int most = need >= 4 ? 4 : need >= 2 ? 2 : 1;
  const int warps = warps_for(forward_smem, a.D, DL, smem_limit, most);
  if (warps == 0) return cudaErrorInvalidConfiguration;
  const int64_t row_blocks = (rows + kOwn * warps - 1) / (kOwn * warps);
  return launch_blocks(attention_forward_kernel<DL>, a.B * a.KVH * row_blocks, warps, forward_smem(a.D, DL, warps),
                       stream, out, lse, q, k, v, a, row_blocks);
}

template <int DL>
cudaError_t backward_dl(cudaStream_t stream, float* dq, float* dk, float* dv, float* delta,
                        const float* dout, const float* q, const float* k, const float* v,
                        const float* out, const float* lse, const AttentionArgs& a, size_t smem_limit) {
  const int64_t n = a.B * a.H * a.T;
  if (n > 0) {
    launch(attention_delta_kernel, dim3(grid_for(n)), dim3(kThreads), 0, stream, delta, dout, out, a.B, a.T, a.H, a.D);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  const int64_t rows = a.T * (a.H / a.KVH);
  const int wq = warps_for(dq_smem, a.D, DL, smem_limit, 4);
  const int wk = warps_for(dkv_smem, a.D, DL, smem_limit, kMaxWarps);
  if (wq == 0 || wk == 0) return cudaErrorInvalidConfiguration;
  const int64_t row_blocks = (rows + kOwn * wq - 1) / (kOwn * wq);
  cudaError_t e = rows == 0 ? cudaSuccess
                            : launch_blocks(attention_dq_kernel<DL>, a.B * a.KVH * row_blocks, wq, dq_smem(a.D, DL, wq),
                                            stream, dq, dout, q, k, v, lse, delta, a, row_blocks);
  if (e != cudaSuccess) return e;
  const int64_t key_blocks = (a.S + kOwn * wk - 1) / (kOwn * wk);
  return launch_blocks(attention_dkv_kernel<DL>, a.B * a.KVH * key_blocks, wk, dkv_smem(a.D, DL, wk), stream,
                       dk, dv, dout, q, k, v, lse, delta, a, key_blocks);
}

// ---- launchers -------------------------------------------------------------------------------

// D <= 256 and tiles that fit smem_limit bytes of shared memory per block (the device's opt-in
// maximum).
bool attention_supported(const AttentionArgs& a, size_t smem_limit) {
  const int dl = dims_per_lane(a.D);
  if (dl == 0) return false;
  return warps_for(forward_smem, a.D, dl, smem_limit, 1) && warps_for(dq_smem, a.D, dl, smem_limit, 1) &&
         warps_for(dkv_smem, a.D, dl, smem_limit, 1);
}

cudaError_t launch_attention(cudaStream_t stream, float* out, float* lse, const float* q, const float* k,
                             const float* v, const AttentionArgs& a, size_t smem_limit) {
  if (a.B == 0 || a.T == 0 || a.H == 0) return cudaSuccess;
  switch (dims_per_lane(a.D)) {
    case 1: return forward_dl<1>(stream, out, lse, q, k, v, a, smem_limit);
    case 2: return forward_dl<2>(stream, out, lse, q, k, v, a, smem_limit);
    case 4: return forward_dl<4>(stream, out, lse, q, k, v, a, smem_limit);
    case 8: return forward_dl<8>(stream, out, lse, q, k, v, a, smem_limit);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_attention_backward(cudaStream_t stream, float* dq, float* dk, float* dv, float* delta,
                                      const float* dout, const float* q, const float* k, const float* v,
                                      const float* out, const float* lse, const AttentionArgs& a,
                                      size_t smem_limit) {
  if (a.B == 0 || a.H == 0) return cudaSuccess;
  switch (dims_per_lane(a.D)) {
    case 1: return backward_dl<1>(stream, dq, dk, dv, delta, dout, q, k, v, out, lse, a, smem_limit);
    case 2: return backward_dl<2>(stream, dq, dk, dv, delta, dout, q, k, v, out, lse, a, smem_limit);
    case 4: return backward_dl<4>(stream, dq, dk, dv, delta, dout, q, k, v, out, lse, a, smem_limit);
    case 8: return backward_dl<8>(stream, dq, dk, dv, delta, dout, q, k, v, out, lse, a, smem_limit);
    default: return cudaErrorInvalidValue;
  }
}

// ---- table entries ---------------------------------------------------------------------------

lora_status attention(lora_backend* be, float* out, float* lse, const float* q, const float* k, const float* v,
                      const int32_t* key_mask, int64_t key_mask_stride, const int32_t* segment_ids,
                      int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax, int64_t H,
                      int64_t KVH, int64_t D, float scale, bool causal, int64_t window) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  const AttentionArgs a = attention_args(key_mask, key_mask_stride, segment_ids, segment_stride, B, T, S, Smax, H,
                                         KVH, D, scale, causal, window);
  if (!attention_args_valid(a)) return LORA_INVALID_ARGUMENT;
  if (a.B * a.T * a.H == 0) return LORA_OK;
  const size_t smem = static_cast<size_t>(c.max_smem_optin());
  if (!attention_supported(a, smem)) return LORA_UNSUPPORTED;
  return c.check(launch_attention(c.stream(), out, lse, q, k, v, a, smem), "attention");
}

lora_status attention_backward(lora_backend* be, float* dq, float* dk, float* dv, const float* dout, const float* q,
                               const float* k, const float* v, const float* out, const float* lse,
                               const int32_t* key_mask, int64_t key_mask_stride, const int32_t* segment_ids,
                               int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax, int64_t H,
                               int64_t KVH, int64_t D, float scale, bool causal, int64_t window) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  const AttentionArgs a = attention_args(key_mask, key_mask_stride, segment_ids, segment_stride, B, T, S, Smax, H,
                                         KVH, D, scale, causal, window);
  if (!attention_args_valid(a)) return LORA_INVALID_ARGUMENT;
  if (a.B * a.H == 0) return LORA_OK;
  const size_t smem = static_cast<size_t>(c.max_smem_optin());
  if (!attention_supported(a, smem)) return LORA_UNSUPPORTED;
  const size_t bytes = static_cast<size_t>(a.B * a.H * a.T + 1) * sizeof(float);
  float* delta = static_cast<float*>(c.alloc(bytes));
  if (delta == nullptr) return c.no_memory();
  const lora_status st =
      c.check(launch_attention_backward(c.stream(), dq, dk, dv, delta, dout, q, k, v, out, lse, a, smem),
              "attention_backward");
  c.free(delta, bytes);  // stream order keeps it alive for the kernels
  return st;
}

}  // namespace

void register_attention(lora_backend& t) {
  t.attention = attention;
  t.attention_backward = attention_backward;
}

}  // namespace cuda
}  // namespace lora
