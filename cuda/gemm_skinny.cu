// The LoRA adapter GEMMs (h = x̃·Aᵀ, dh = s·dy·B, dB += s·dyᵀ·h, dA += dhᵀ·x̃) on tensor cores:
// outputs at most 64 wide (the rank), K long. 3xTF32 (a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with
// tf32 halves) keeps fp32 accuracy on mma.sync m16n8k8, sm_80+. Split-K with atomics when the grid
// is small. Not a general GEMM (gemm_simt.cu is); LORA_NATIVE_CUDA_SKINNY=simt routes these there.
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kSkBM = 128;  // rows per block: 4 warps of 32 rows
constexpr int kSkBK = 16;   // K per stage: two k8 mma steps
constexpr int kSkPad = kSkBK + 4;  // 80-byte rows: fragment reads of 8 rows x 4 k hit 32 banks
constexpr int kSkThreads = 256;    // 8 warps: 4 along M x 2 along N

// x = hi + lo with both halves tf32.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = cvt_rna_tf32(x);
  lo = cvt_rna_tf32(x - __uint_as_float(hi));
}

// out (M, Nn) = alpha·op(A)·op(B) (+ beta·out | atomic +=) for this block's K slice; out_trans
// stores element (m, n) at n*ldc + m (dA computed as (dhᵀ·x̃)ᵀ = x̃ᵀ·dh).
template <int BN, bool TA, bool TB>
__global__ void __launch_bounds__(kSkThreads)
    gemm_skinny_kernel(const GemmArgs g, const bool out_trans) {
  constexpr int NI = BN / 16;  // n8 tiles per warp (warp covers BN/2 columns)
  constexpr int EA = kSkBM * kSkBK / kSkThreads;
  constexpr int EB = BN * kSkBK / kSkThreads;
  static_assert(EB >= 1 && BN * kSkBK % kSkThreads == 0, "B tile loads must divide evenly");
  __shared__ __align__(16) float As[2][kSkBM][kSkPad];
  __shared__ __align__(16) float Bs[2][BN][kSkPad];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;
  const int gq = lane >> 2, t4 = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSkBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t sk = blockIdx.z;
  const int64_t k_per = ((g.K + g.split_k - 1) / g.split_k + kSkBK - 1) / kSkBK * kSkBK;
  const int64_t k_begin = sk * k_per;
  const int64_t k_end = min(g.K, k_begin + k_per);

  float ra[EA], rb[EB];
  auto load_tiles = [&](int64_t k0) {
#pragma unroll
    for (int e = 0; e < EA; ++e) {
      const int idx = tid + e * kSkThreads;
      const int ml = TA ? idx % kSkBM : idx / kSkBK;  // coalesce along the stored row
      const int kl = TA ? idx / kSkBM : idx % kSkBK;
      const int64_t m = m0 + ml, k = k0 + kl;
      float v = 0.0f;
      if (m < g.M && k < k_end) {
        v = TA ? g.Am[k * g.lda + m] : g.Am[m * g.lda + k];
        if (g.drop_a.p > 0.0f) v = apply_dropout(g.drop_a, v, TA ? k : m, TA ? m : k);
      }
      ra[e] = v;
    }
#pragma unroll
    for (int e = 0; e < EB; ++e) {
      const int idx = tid + e * kSkThreads;
      const int nl = TB ? idx / kSkBK : idx % BN;
      const int kl = TB ? idx % kSkBK : idx / BN;
      const int64_t n = n0 + nl, k = k0 + kl;
      float v = 0.0f;
      if (n < g.Nn && k < k_end) {
        v = TB ? g.Bm[n * g.ldb + k] : g.Bm[k * g.ldb + n];
        if (g.drop_b.p > 0.0f) v = apply_dropout(g.drop_b, v, TB ? n : k, TB ? k : n);
      }
      rb[e] = v;
    }
  };
  auto store_tiles = [&](int buf) {
#pragma unroll
    for (int e = 0; e < EA; ++e) {
      const int idx = tid + e * kSkThreads;
      As[buf][TA ? idx % kSkBM : idx / kSkBK][TA ? idx / kSkBM : idx % kSkBK] = ra[e];
    }
#pragma unroll
    for (int e = 0; e < EB; ++e) {
      const int idx = tid + e * kSkThreads;
      Bs[buf][TB ? idx / kSkBK : idx % BN][TB ? idx % kSkBK : idx / BN] = rb[e];
    }
  };

  float acc[2][NI][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.0f;

  if (k_begin < k_end) {
    load_tiles(k_begin);
    store_tiles(0);
    __syncthreads();
    int buf = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kSkBK) {
      const bool more = k0 + kSkBK < k_end;
      if (more) load_tiles(k0 + kSkBK);
#pragma unroll
      for (int kk = 0; kk < kSkBK; kk += 8) {
        uint32_t ahi[2][4], alo[2][4], bhi[NI][2], blo[NI][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int row = wm * 32 + mi * 16 + gq;
          split_tf32(As[buf][row][kk + t4], ahi[mi][0], alo[mi][0]);
          split_tf32(As[buf][row + 8][kk + t4], ahi[mi][1], alo[mi][1]);
          split_tf32(As[buf][row][kk + t4 + 4], ahi[mi][2], alo[mi][2]);
          split_tf32(As[buf][row + 8][kk + t4 + 4], ahi[mi][3], alo[mi][3]);
        }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int col = wn * (BN / 2) + ni * 8 + gq;
          split_tf32(Bs[buf][col][kk + t4], bhi[ni][0], blo[ni][0]);
          split_tf32(Bs[buf][col][kk + t4 + 4], bhi[ni][1], blo[ni][1]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            mma_m16n8k8_tf32(acc[mi][ni], alo[mi], bhi[ni]);  // small terms first
            mma_m16n8k8_tf32(acc[mi][ni], ahi[mi], blo[ni]);
            mma_m16n8k8_tf32(acc[mi][ni], ahi[mi], bhi[ni]);
          }
      }
      if (more) store_tiles(buf ^ 1);
      __syncthreads();
      buf ^= 1;
    }
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t m = m0 + wm * 32 + mi * 16 + gq + (q >> 1) * 8;
        const int64_t n = n0 + wn * (BN / 2) + ni * 8 + t4 * 2 + (q & 1);
        if (m >= g.M || n >= g.Nn) continue;
        const float v = g.alpha * acc[mi][ni][q];
        float* c = g.Cm + (out_trans ? n * g.ldc + m : m * g.ldc + n);
        if (g.atomic) atomicAdd(c, v);
        else *c = g.beta == 0.0f ? v : fmaf(g.beta, *c, v);
      }
}

template <int BN>
cudaError_t launch_bn(cudaStream_t stream, const GemmArgs& g, bool trans_a, bool trans_b,
                      bool out_trans, dim3 grid) {
  if (!trans_a && trans_b)
    launch(gemm_skinny_kernel<BN, false, true>, grid, kSkThreads, 0, stream, g, out_trans);
  else if (trans_a && !trans_b)
    launch(gemm_skinny_kernel<BN, true, false>, grid, kSkThreads, 0, stream, g, out_trans);
  else if (!trans_a && !trans_b)
    launch(gemm_skinny_kernel<BN, false, false>, grid, kSkThreads, 0, stream, g, out_trans);
  else
    return cudaErrorInvalidValue;  // TT is not an adapter shape
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gemm_skinny(cudaStream_t stream, GemmArgs args, bool trans_a, bool trans_b,
                               bool out_trans, int sm_count) {
  if (args.M <= 0 || args.Nn <= 0) return cudaSuccess;
  if (args.batch != 1 || args.lora.L != nullptr || args.lora.bias != nullptr || (trans_a && trans_b))
    return cudaErrorInvalidValue;
  const int bn = args.Nn <= 16 ? 16 : (args.Nn <= 32 ? 32 : 64);
  const int64_t tiles = ((args.M + kSkBM - 1) / kSkBM) * ((args.Nn + bn - 1) / bn);
  int64_t split = 1;
  const int64_t want = 2 * static_cast<int64_t>(sm_count);  // two waves hide the tail
  if (tiles < want && args.K >= 512) {
    split = (want + tiles - 1) / tiles;
    split = split < args.K / 256 ? split : args.K / 256;  // keep >= 256 of K per slice
    split = split < 64 ? split : 64;                      // bound the atomic traffic per output
    if (split < 1) split = 1;
  }
  if ((args.M + kSkBM - 1) / kSkBM > 65535) return cudaErrorInvalidValue;
  args.split_k = static_cast<int>(split);
  if (split > 1 || args.K <= 0) {
    if (args.beta != 1.0f) {  // apply beta once, then every slice adds
      const cudaError_t e = out_trans
                                ? launch_scale(stream, args.Cm, args.ldc, args.Nn, args.M, 1, 0, args.beta)
                                : launch_scale(stream, args.Cm, args.ldc, args.M, args.Nn, 1, 0, args.beta);
      if (e != cudaSuccess) return e;
    }
    if (args.K <= 0) return cudaSuccess;
    args.atomic = true;
    args.beta = 1.0f;
  }
  const dim3 grid(static_cast<unsigned>((args.Nn + bn - 1) / bn),
                  static_cast<unsigned>((args.M + kSkBM - 1) / kSkBM), static_cast<unsigned>(split));
  switch (bn) {
    case 16: return launch_bn<16>(stream, args, trans_a, trans_b, out_trans, grid);
    case 32: return launch_bn<32>(stream, args, trans_a, trans_b, out_trans, grid);
    default: return launch_bn<64>(stream, args, trans_a, trans_b, out_trans, grid);
  }
}

}  // namespace cuda
}  // namespace lora
