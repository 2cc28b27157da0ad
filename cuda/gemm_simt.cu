// The fp32 GEMM on CUDA cores (plain FMA, no TF32): every gemm() call (a bf16 B, a frozen
// weight, is widened exactly as it is loaded), every fp32-weight LoRA GEMM and, with
// LORA_NATIVE_CUDA_SKINNY=simt, the adapter GEMMs (h, dh, dA, dB) run here. Register-tiled with a
// two-stage shared-memory pipeline, three tile shapes, split-K with atomics for long-K small outputs.
// It is not the bf16 tensor-core path (gemm_tc.cu) and makes no attempt at cuBLAS-level speed.
#include <type_traits>

#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kBK = 8;  // K per shared-memory stage: 8 keeps 2 stages of 128-wide tiles < 10 KiB

// C (M, Nn) = alpha·op(A)·op(B) [+ LoRA epilogue] (+ beta·C | atomic +=), for blockIdx.z's batch
// entry and K slice. Each thread owns a TM x TN micro-tile of float4 groups (row_of/col_of), read
// from shared memory 128 bits at a time.
template <int BM, int BN, int TM, int TN, bool TA, bool TB>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    gemm_simt_kernel(const GemmArgs g, const int64_t batch_offset) {
  constexpr int TX = BN / TN;  // threads across columns
  constexpr int TY = BM / TM;  // threads across rows
  constexpr int NT = TX * TY;
  constexpr int EA = BM * kBK / NT;
  constexpr int EB = BN * kBK / NT;
  static_assert(BM * kBK % NT == 0 && BN * kBK % NT == 0, "tile loads must divide evenly");
  __shared__ __align__(16) float As[2][kBK][BM + 4];  // +4: transposed stores hit 32 distinct banks
  __shared__ __align__(16) float Bs[2][kBK][BN + 4];

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int64_t bz = batch_offset + blockIdx.z / g.split_k;
  const int64_t sk = blockIdx.z % g.split_k;
  const float* __restrict__ A = g.Am + bz * g.stride_a;
  const float* __restrict__ B = g.Bm16 ? nullptr : g.Bm + bz * g.stride_b;
  const uint16_t* __restrict__ B16 = g.Bm16 ? g.Bm16 + bz * g.stride_b : nullptr;
  float* __restrict__ Cm = g.Cm + bz * g.stride_c;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t k_per = ((g.K + g.split_k - 1) / g.split_k + kBK - 1) / kBK * kBK;
  const int64_t k_begin = sk * k_per;
  const int64_t k_end = min(g.K, k_begin + k_per);

  float ra[EA], rb[EB];
  auto load_tiles = [&](int64_t k0) {
#pragma unroll
    for (int e = 0; e < EA; ++e) {
      const int idx = tid + e * NT;
      const int ml = TA ? idx % BM : idx / kBK;
      const int kl = TA ? idx / BM : idx % kBK;
      const int64_t m = m0 + ml, k = k0 + kl;
      float v = 0.0f;
      if (m < g.M && k < k_end) {
        v = TA ? A[k * g.lda + m] : A[m * g.lda + k];
        if (g.drop_a.p > 0.0f) v = apply_dropout(g.drop_a, v, TA ? k : m, TA ? m : k);
      }
      ra[e] = v;
    }
#pragma unroll
    for (int e = 0; e < EB; ++e) {
      const int idx = tid + e * NT;
      const int nl = TB ? idx / kBK : idx % BN;
      const int kl = TB ? idx % kBK : idx / BN;
      const int64_t n = n0 + nl, k = k0 + kl;
      float v = 0.0f;
      if (n < g.Nn && k < k_end) {
        const int64_t at = TB ? n * g.ldb + k : k * g.ldb + n;
        v = B16 ? __uint_as_float(static_cast<uint32_t>(B16[at]) << 16) : B[at];  // bf16: exact widening
        if (g.drop_b.p > 0.0f) v = apply_dropout(g.drop_b, v, TB ? n : k, TB ? k : n);
      }
      rb[e] = v;
    }
  };
  auto store_tiles = [&](int buf) {
#pragma unroll
    for (int e = 0; e < EA; ++e) {
      const int idx = tid + e * NT;
      As[buf][TA ? idx / BM : idx % kBK][TA ? idx % BM : idx / kBK] = ra[e];
    }
#pragma unroll
    for (int e = 0; e < EB; ++e) {
      const int idx = tid + e * NT;
      Bs[buf][TB ? idx % kBK : idx / BN][TB ? idx / kBK : idx % BN] = rb[e];
    }
  };

  // Thread (tx, ty) owns rows row_of(0..TM) and columns col_of(0..TN): groups of 4 adjacent
  // rows/columns (one float4 in shared memory), the groups BM/(TM/4) (BN/(TN/4)) apart.
  auto row_of = [&](int i) { return (i / 4) * (BM / (TM / 4)) + ty * 4 + (i % 4); };
  auto col_of = [&](int j) { return (j / 4) * (BN / (TN / 4)) + tx * 4 + (j % 4); };
  static_assert(TM % 4 == 0 && TN % 4 == 0, "micro-tiles are made of float4 groups");

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  auto multiply = [&](int buf, float (&c)[TM][TN]) {
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      __align__(16) float a[TM];
      __align__(16) float b[TN];
#pragma unroll
      for (int i = 0; i < TM; i += 4)  // 128-bit shared loads: 4 rows / columns at a time
        *reinterpret_cast<float4*>(a + i) = *reinterpret_cast<const float4*>(&As[buf][kk][row_of(i)]);
#pragma unroll
      for (int j = 0; j < TN; j += 4)
        *reinterpret_cast<float4*>(b + j) = *reinterpret_cast<const float4*>(&Bs[buf][kk][col_of(j)]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) c[i][j] = fmaf(a[i], b[j], c[i][j]);
    }
  };

  if (k_begin < k_end) {
    load_tiles(k_begin);
    store_tiles(0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
      const bool more = k0 + kBK < k_end;
      if (more) load_tiles(k0 + kBK);  // global loads in flight while we multiply
      multiply(buf, acc);
      if (more) store_tiles(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }

  // LoRA epilogue: lacc = Σ_r L[m][r]·Rt(n, r), staged through the same tiles (R in steps of kBK).
  const LoraEpilogue& lo = g.lora;
  float lacc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) lacc[i][j] = 0.0f;
  if (lo.L != nullptr) {
    for (int64_t r0 = 0; r0 < lo.R; r0 += kBK) {
      __syncthreads();
      for (int idx = tid; idx < BM * kBK; idx += NT) {
        const int ml = idx / kBK, kl = idx % kBK;
        const int64_t m = m0 + ml, r = r0 + kl;
        As[0][kl][ml] = (m < g.M && r < lo.R) ? lo.L[m * lo.ldl + r] : 0.0f;
      }
      for (int idx = tid; idx < BN * kBK; idx += NT) {
        const int nl = lo.rs_r == 1 ? idx / kBK : idx % BN;
        const int kl = lo.rs_r == 1 ? idx % kBK : idx / BN;
        const int64_t n = n0 + nl, r = r0 + kl;
        Bs[0][kl][nl] = (n < g.Nn && r < lo.R) ? lo.Rm[n * lo.rs_n + r * lo.rs_r] : 0.0f;
      }
      __syncthreads();
      multiply(0, lacc);
    }
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + row_of(i);
    if (m >= g.M) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t n = n0 + col_of(j);
      if (n >= g.Nn) continue;
      float v = g.alpha * acc[i][j];
      if (lo.L != nullptr) {
        float sc = lo.s;
        if (lo.drop.p > 0.0f) sc = dropout_keep(lo.drop.seed, m * lo.drop.ld + n, lo.drop.p)
                                       ? sc * lo.drop.scale
                                       : 0.0f;
        v = fmaf(sc, lacc[i][j], v);
      }
      if (lo.bias != nullptr) v += lo.bias[n];
      float* c = Cm + m * g.ldc + n;
      if (g.atomic) {
        atomicAdd(c, v);
      } else {
        *c = g.beta == 0.0f ? v : fmaf(g.beta, *c, v);
      }
    }
  }
}

template <int BM, int BN, int TM, int TN>
cudaError_t launch_tiles(cudaStream_t stream, const GemmArgs& args, bool trans_a, bool trans_b,
                         int64_t batch_offset, int64_t batch_count) {
  const dim3 grid(static_cast<unsigned>((args.Nn + BN - 1) / BN),
                  static_cast<unsigned>((args.M + BM - 1) / BM),
                  static_cast<unsigned>(batch_count * args.split_k));
  const dim3 block((BM / TM) * (BN / TN));
  if (!trans_a && !trans_b)
    launch(gemm_simt_kernel<BM, BN, TM, TN, false, false>, grid, block, 0, stream, args, batch_offset);
  else if (!trans_a && trans_b)
    launch(gemm_simt_kernel<BM, BN, TM, TN, false, true>, grid, block, 0, stream, args, batch_offset);
  else if (trans_a && !trans_b)
    launch(gemm_simt_kernel<BM, BN, TM, TN, true, false>, grid, block, 0, stream, args, batch_offset);
  else
    launch(gemm_simt_kernel<BM, BN, TM, TN, true, true>, grid, block, 0, stream, args, batch_offset);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_simt(cudaStream_t stream, GemmArgs args, bool trans_a, bool trans_b,
                             int sm_count) {
  if (args.M <= 0 || args.Nn <= 0 || args.batch <= 0) return cudaSuccess;
  if (args.K <= 0 && args.lora.L == nullptr) {  // op(A)·op(B) is empty: C = beta·C (+ bias)
    if (args.lora.bias == nullptr) {
      return launch_scale(stream, args.Cm, args.ldc, args.M, args.Nn, args.batch, args.stride_c,
                          args.beta);
    }
  }
  // Tile shape: few output columns (h, dh, dB: R columns) or few rows (dA: R rows) get narrow
  // tiles (16 or 32 wide) so rank-8/16 problems do not waste most of a 128-wide tile.
  enum { kSquare, kCols16, kCols32, kRows16, kRows32 } shape = kSquare;
  int64_t bm = 128, bn = 128;
  if (args.Nn <= 16 && args.M > 64) {
    shape = kCols16;
    bn = 16;
  } else if (args.Nn <= 64 && args.M > 64) {
    shape = kCols32;
    bn = 32;
  } else if (args.M <= 16 && args.Nn > 64) {
    shape = kRows16;
    bm = 16;
  } else if (args.M <= 64 && args.Nn > 64) {
    shape = kRows32;
    bm = 32;
  }
  const int64_t tiles = ((args.M + bm - 1) / bm) * ((args.Nn + bn - 1) / bn);

  // A broadcast output (stride_c == 0) over a batch accumulates on the CPU when beta == 1; any
  // other beta makes each entry overwrite, so run entries in order.
  const bool shared_c = args.batch > 1 && args.stride_c == 0;
  if (shared_c && args.beta != 1.0f) {
    GemmArgs one = args;
    for (int64_t b = 0; b < args.batch; ++b) {
      one.Am = args.Am + b * args.stride_a;
      if (args.Bm16) one.Bm16 = args.Bm16 + b * args.stride_b;
      else one.Bm = args.Bm + b * args.stride_b;
      one.batch = 1;
      const cudaError_t e = launch_gemm_simt(stream, one, trans_a, trans_b, sm_count);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }

  // Split K when the grid would leave SMs idle and K is long (dA, dB: K = N rows).
  int split = 1;
  if (args.lora.L == nullptr && args.lora.bias == nullptr && !shared_c) {  // epilogues run once
    const int64_t blocks = tiles * args.batch;
    const int64_t want = 2 * static_cast<int64_t>(sm_count);  // two waves hide the tail
    if (blocks < want && args.K >= 512) {
      int64_t s = (want + blocks - 1) / blocks;
      s = s < args.K / 256 ? s : args.K / 256;  // keep >= 256 of K per slice
      s = s < 64 ? s : 64;                      // bound the atomic traffic per output
      split = static_cast<int>(s < 1 ? 1 : s);
    }
  }
  args.split_k = split;
  if (split > 1 || shared_c) {
    if (args.beta != 1.0f) {
      const cudaError_t e = launch_scale(stream, args.Cm, args.ldc, args.M, args.Nn, args.batch,
                                         args.stride_c, args.beta);
      if (e != cudaSuccess) return e;
    }
    args.atomic = true;
    args.beta = 1.0f;
  }

  const int64_t max_z = 65535 / split;  // gridDim.z limit
  for (int64_t b0 = 0; b0 < args.batch; b0 += max_z) {
    const int64_t count = args.batch - b0 < max_z ? args.batch - b0 : max_z;
    cudaError_t e;
    switch (shape) {
      case kCols16: e = launch_tiles<128, 16, 4, 4>(stream, args, trans_a, trans_b, b0, count); break;
      case kCols32: e = launch_tiles<128, 32, 4, 4>(stream, args, trans_a, trans_b, b0, count); break;
      case kRows16: e = launch_tiles<16, 128, 4, 4>(stream, args, trans_a, trans_b, b0, count); break;
      case kRows32: e = launch_tiles<32, 128, 4, 4>(stream, args, trans_a, trans_b, b0, count); break;
      default: e = launch_tiles<128, 128, 8, 8>(stream, args, trans_a, trans_b, b0, count); break;
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// ---- table entries ---------------------------------------------------------------------------
namespace {

// C = alpha·op(A)·op(B) + beta·C for each batch entry on the SIMT engine; B fp32 (gemm) or bf16
// bits (gemm_bf16: linear() on a frozen bf16 weight, read in place and widened exactly).
template <typename TB>
lora_status gemm_entry(lora_backend* be, float* Cm, const float* Am, const TB* Bm, int64_t M,
                       int64_t Nn, int64_t K, bool trans_a, bool trans_b, int64_t lda, int64_t ldb,
                       int64_t ldc, float alpha, float beta, int64_t batch, int64_t stride_a,
                       int64_t stride_b, int64_t stride_c) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (M < 0 || Nn < 0 || K < 0 || batch < 0) return LORA_INVALID_ARGUMENT;
  GemmArgs g;
  g.Cm = Cm; g.Am = Am;
  if constexpr (std::is_same<TB, float>::value) g.Bm = Bm;
  else g.Bm16 = Bm;
  g.M = M; g.Nn = Nn; g.K = K;
  g.lda = lda; g.ldb = ldb; g.ldc = ldc;
  g.alpha = alpha; g.beta = beta;
  g.batch = batch; g.stride_a = stride_a; g.stride_b = stride_b; g.stride_c = stride_c;
  return c.check(launch_gemm_simt(c.stream(), g, trans_a, trans_b, c.sm_count()),
                 std::is_same<TB, float>::value ? "gemm" : "gemm_bf16");
}

}  // namespace

void register_gemm(lora_backend& t) {
  t.gemm = gemm_entry<float>;
  t.gemm_bf16 = gemm_entry<uint16_t>;
}

}  // namespace cuda
}  // namespace lora
