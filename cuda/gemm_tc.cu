// The 16-bit-weight GEMM on tensor cores (mma.sync m16n8k16, fp32 accumulate, sm_80+) with the
// LoRA epilogue fused into its output tiles: y = x·Wᵀ + b + s·h·Bᵀ and dx = dy·W + dropout'(dh·A).
// The fp32 activations are rounded to W's type (bf16/f16): either once into a workspace (then a
// 4-stage cp.async pipeline) or as they are staged in shared memory (any shape). The LoRA term and
// the bias stay fp32. Not wgmma/TMA: Hopper's fastest path is future work.
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32;  // block tile: 8 warps of 64x32, 2 k16 steps/stage
constexpr int kTcThreads = 256;
constexpr int kPadK = kBK + 8;    // 80-byte rows: ldmatrix's 8 row reads hit distinct banks
constexpr int kPadN = kBN + 8;    // 272-byte rows, same reason for the (K, N) weight layout
constexpr int kRChunk = 32;       // rank columns staged per epilogue pass
constexpr int kRPad = kRChunk + 4;  // 144-byte rows: float4 reads of 8 rows are conflict-free
constexpr int kGroupM = 8;        // row-tiles per raster group (tile_origin)
constexpr int kSmemBytes = 2 * kBM * kPadK * 2 + 2 * kBN * kPadK * 2;  // 40 KiB, < 48 KiB static
static_assert(2 * kBK * kPadN * 2 <= 2 * kBN * kPadK * 2, "(K, N) weight stages must fit");
static_assert(2 * 128 * kRPad * 4 <= kSmemBytes, "epilogue staging must fit");

// Packs two fp32 values into one b32 of W's 16-bit type (an mma operand pair).
template <typename TW> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Grouped rasterisation of a 1-D grid: kGroupM row-tiles walk the column tiles together, so
// neighbouring blocks share W tiles in L2.
__device__ __forceinline__ void tile_origin(int64_t M, int64_t Nn, int64_t* m0, int64_t* n0) {
  const int64_t tiles_m = (M + kBM - 1) / kBM, tiles_n = (Nn + kBN - 1) / kBN;
  const int64_t pid = blockIdx.x;
  const int64_t in_group = kGroupM * tiles_n;
  const int64_t first_m = pid / in_group * kGroupM;
  const int64_t group_rows = min(tiles_m - first_m, static_cast<int64_t>(kGroupM));
  *m0 = (first_m + (pid % in_group) % group_rows) * kBM;
  *n0 = (pid % in_group) / group_rows * kBN;
}

// One kBK-deep step of the warp's 64x32 tile: 2 k16 slices, 4x4 mma each.
template <typename TW, bool W_NK>
__device__ __forceinline__ void mma_k32(float (&acc)[4][4][4], const TW* as, const TW* bs, int lane,
                                        int wm, int wn) {
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    uint32_t af[4][4], bf[4][2];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
      ldmatrix_x4(af[mi], as + (wm * 64 + mi * 16 + (lane & 15)) * kPadK + kk + (lane >> 4) * 8);
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      uint32_t r[4];
      if (W_NK) {
        ldmatrix_x4(r, bs + (wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * kPadK + kk +
                           ((lane >> 3) & 1) * 8);
      } else {
        ldmatrix_x4_trans(r, bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kPadN + wn * 32 +
                                 np * 16 + (lane >> 4) * 8);
      }
      bf[2 * np][0] = r[0];
      bf[2 * np][1] = r[1];
      bf[2 * np + 1][0] = r[2];
      bf[2 * np + 1][1] = r[3];
    }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) mma_m16n8k16<TW>(acc[mi][ni], af[mi], bf[ni]);
  }
}

// The block's (m0, n0) tile of `out` = acc + bias + scale·L·Rtᵀ (LoraEpilogue), with the LoRA
// term in fp32 staged through `smem` (at least kEpilogueSmem bytes; the caller is done with it).
__device__ __forceinline__ void lora_epilogue_store(float (&acc)[4][4][4], unsigned char* smem,
                                                    float* __restrict__ out, int64_t ldo,
                                                    int64_t M, int64_t Nn, int64_t m0, int64_t n0,
                                                    int tid, const LoraEpilogue& epi) {
  const int lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, t4 = lane & 3;
  // LoRA term in fp32: acc += scale(m, n) · Σ_r L[m][r]·Rt(n, r), R staged kRChunk at a time.
  if (epi.L != nullptr) {
    const bool drop = epi.drop.p > 0.0f;
    const float sc = drop ? epi.s * epi.drop.scale : epi.s;
    uint64_t keep = ~0ull;  // bit (mi*4 + ni)*4 + q: the dropout mask of this thread's outputs
    if (drop) {
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t m = m0 + wm * 64 + mi * 16 + g + (q >> 1) * 8;
            const int64_t n = n0 + wn * 32 + ni * 8 + t4 * 2 + (q & 1);
            if (!dropout_keep(epi.drop.seed, static_cast<uint64_t>(m * epi.drop.ld + n),
                              epi.drop.p))
              keep &= ~(1ull << ((mi * 4 + ni) * 4 + q));
          }
    }
    float* hs = reinterpret_cast<float*>(smem);  // [kBM][kRPad]: L rows of this tile
    float* rs = hs + kBM * kRPad;                // [kBN][kRPad]: Rt rows of this tile
    for (int64_t r0 = 0; r0 < epi.R; r0 += kRChunk) {
      __syncthreads();  // the previous pass (or the main loop) is done with shared memory
      for (int e = tid; e < kBM * kRChunk; e += kTcThreads) {
        const int i = e / kRChunk, j = e % kRChunk;
        const int64_t m = m0 + i, r = r0 + j;
        hs[i * kRPad + j] = (m < M && r < epi.R) ? epi.L[m * epi.ldl + r] : 0.0f;
      }
      const bool r_contig = epi.rs_r == 1;
      for (int e = tid; e < kBN * kRChunk; e += kTcThreads) {
        const int i = r_contig ? e / kRChunk : e % kBN;  // coalesce along whichever is contiguous
        const int j = r_contig ? e % kRChunk : e / kBN;
        const int64_t n = n0 + i, r = r0 + j;
        rs[i * kRPad + j] = (n < Nn && r < epi.R) ? epi.Rm[n * epi.rs_n + r * epi.rs_r] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        float lacc[4][4];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) lacc[ni][q] = 0.0f;
        const int row = wm * 64 + mi * 16 + g;
#pragma unroll 2
        for (int r = 0; r < kRChunk; r += 4) {
          const float4 h0 = *reinterpret_cast<const float4*>(hs + row * kRPad + r);
          const float4 h1 = *reinterpret_cast<const float4*>(hs + (row + 8) * kRPad + r);
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int col = wn * 32 + ni * 8 + t4 * 2;
            const float4 b0 = *reinterpret_cast<const float4*>(rs + col * kRPad + r);
            const float4 b1 = *reinterpret_cast<const float4*>(rs + (col + 1) * kRPad + r);
            lacc[ni][0] += h0.x * b0.x + h0.y * b0.y + h0.z * b0.z + h0.w * b0.w;
            lacc[ni][1] += h0.x * b1.x + h0.y * b1.y + h0.z * b1.z + h0.w * b1.w;
            lacc[ni][2] += h1.x * b0.x + h1.y * b0.y + h1.z * b0.z + h1.w * b0.w;
            lacc[ni][3] += h1.x * b1.x + h1.y * b1.y + h1.z * b1.z + h1.w * b1.w;
          }
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q)
            if ((keep >> ((mi * 4 + ni) * 4 + q)) & 1ull) acc[mi][ni][q] += sc * lacc[ni][q];
      }
    }
  }

  // Store, with the bias; float2 where the row stride and pointer allow it.
  const bool out_vec = (ldo % 2 == 0) && (reinterpret_cast<uintptr_t>(out) % 8 == 0);
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t m = m0 + wm * 64 + mi * 16 + g + half * 8;
        const int64_t n = n0 + wn * 32 + ni * 8 + t4 * 2;
        if (m >= M || n >= Nn) continue;
        float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
        if (epi.bias != nullptr) {
          v0 += epi.bias[n];
          if (n + 1 < Nn) v1 += epi.bias[n + 1];
        }
        float* p = out + m * ldo + n;
        if (out_vec && n + 1 < Nn) {
          *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
        } else {
          p[0] = v0;
          if (n + 1 < Nn) p[1] = v1;
        }
      }
}

// out (M, Nn) = X (M, K) · op(W) + bias + scale·L·Rtᵀ, W (Nn, K) when W_NK else (K, Nn).
template <typename TW, bool W_NK>
__global__ void __launch_bounds__(kTcThreads)  // 174 regs, no spills; (256, 2) spills ~150 B
    gemm_tc_kernel(float* __restrict__ out,      // (M, Nn), row stride ldo
                   const float* __restrict__ X,  // (M, K), row stride ldx
                   const TW* __restrict__ W,     // (Nn, K) or (K, Nn), row stride ldw
                   int64_t ldo, int64_t ldx, int64_t ldw, int64_t M, int64_t Nn, int64_t K,
                   bool x_vec, bool w_vec, const LoraEpilogue epi) {
  __shared__ __align__(16) unsigned char smem[kSmemBytes];
  TW* As = reinterpret_cast<TW*>(smem);  // [2][kBM][kPadK]
  TW* Bs = As + 2 * kBM * kPadK;         // [2][kBN][kPadK] or [2][kBK][kPadN]
  constexpr int kBStage = W_NK ? kBN * kPadK : kBK * kPadN;

  int64_t m0, n0;
  tile_origin(M, Nn, &m0, &n0);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, each 64 rows x 32 columns

  float4 xr[4];  // this thread's next X tile slice: 4 rows x 4 k
  uint4 wr[2];   // this thread's next W tile slice: 2 x 8 halves
  auto load_tiles = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + tid / 8 + 32 * i, k = k0 + (tid % 8) * 4;
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (m < M) {
        const float* p = X + m * ldx + k;
        if (x_vec && k + 3 < K) {
          const float4 q = *reinterpret_cast<const float4*>(p);
          v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
        } else {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (k + e < K) v[e] = p[e];
        }
      }
      xr[i] = make_float4(v[0], v[1], v[2], v[3]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // (Nn, K): row n, 8 consecutive k.  (K, Nn): row k, 8 consecutive n.
      const int64_t row = W_NK ? n0 + tid / 4 + 64 * i : k0 + tid / 16 + 16 * i;
      const int64_t col = W_NK ? k0 + (tid % 4) * 8 : n0 + (tid % 16) * 8;
      const int64_t rows = W_NK ? Nn : K, cols = W_NK ? K : Nn;
      uint4 q = make_uint4(0, 0, 0, 0);
      if (row < rows) {
        const TW* p = W + row * ldw + col;
        if (w_vec && col + 7 < cols) {
          q = *reinterpret_cast<const uint4*>(p);
        } else {
          unsigned short h[8];
          const unsigned short* ps = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
          for (int e = 0; e < 8; ++e) h[e] = col + e < cols ? ps[e] : 0;
          q.x = h[0] | (static_cast<uint32_t>(h[1]) << 16);
          q.y = h[2] | (static_cast<uint32_t>(h[3]) << 16);
          q.z = h[4] | (static_cast<uint32_t>(h[5]) << 16);
          q.w = h[6] | (static_cast<uint32_t>(h[7]) << 16);
        }
      }
      wr[i] = q;
    }
  };
  auto store_tiles = [&](int buf) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      TW* p = As + buf * kBM * kPadK + (tid / 8 + 32 * i) * kPadK + (tid % 8) * 4;
      *reinterpret_cast<uint2*>(p) =
          make_uint2(pack2<TW>(xr[i].x, xr[i].y), pack2<TW>(xr[i].z, xr[i].w));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      TW* p = Bs + buf * kBStage +
              (W_NK ? (tid / 4 + 64 * i) * kPadK + (tid % 4) * 8
                    : (tid / 16 + 16 * i) * kPadN + (tid % 16) * 8);
      *reinterpret_cast<uint4*>(p) = wr[i];
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;

  const int64_t k_tiles = (K + kBK - 1) / kBK;
  if (k_tiles > 0) {
    load_tiles(0);
    store_tiles(0);
    __syncthreads();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    const bool more = kt + 1 < k_tiles;
    if (more) load_tiles((kt + 1) * kBK);  // global loads in flight during the mma's
    mma_k32<TW, W_NK>(acc, As + buf * kBM * kPadK, Bs + buf * kBStage, lane, wm, wn);
    if (more) store_tiles(buf ^ 1);
    __syncthreads();
  }

  lora_epilogue_store(acc, smem, out, ldo, M, Nn, m0, n0, tid, epi);
}

// ---- pipelined variant: both operands 16-bit in global memory, cp.async, kStages stages ---------
// Used when X has been converted to W's type beforehand (one pass over X) and every row starts
// 16-byte aligned; the register-staged kernel above serves every other shape.
#ifndef LORA_TC_MIN_BLOCKS
#define LORA_TC_MIN_BLOCKS 1  // 197 registers, no spills; 2 caps at 128 and spills ~30 bytes
#endif
constexpr int kStages = 4;  // 3 tiles in flight while one is multiplied (sm_80+ async copies)
constexpr int kStageA = kBM * kPadK;
template <bool W_NK> __host__ __device__ constexpr int stage_b() { return W_NK ? kBN * kPadK : kBK * kPadN; }
template <bool W_NK> __host__ __device__ constexpr int pipelined_smem() { return kStages * (kStageA + stage_b<W_NK>()) * 2; }
static_assert(pipelined_smem<true>() >= 2 * 128 * kRPad * 4, "epilogue staging must fit");


// out (M, Nn) = X16 (M, K) · op(W) + LoRA epilogue; K % 8 == 0 (and Nn % 8 == 0 for (K, Nn) W),
// rows 16-byte aligned.
template <typename TW, bool W_NK>
__global__ void __launch_bounds__(kTcThreads, LORA_TC_MIN_BLOCKS)
    gemm_tc_pipelined_kernel(float* __restrict__ out,   // (M, Nn), row stride ldo
                             const TW* __restrict__ X,  // (M, K), row stride ldx
                             const TW* __restrict__ W,  // (Nn, K) or (K, Nn), row stride ldw
                             int64_t ldo, int64_t ldx, int64_t ldw, int64_t M, int64_t Nn,
                             int64_t K, const LoraEpilogue epi) {
  LORA_DYNAMIC_SMEM(unsigned char, dsmem);
  TW* As = reinterpret_cast<TW*>(dsmem);  // [kStages][kBM][kPadK]
  TW* Bs = As + kStages * kStageA;        // [kStages][kBN][kPadK] or [kStages][kBK][kPadN]
  constexpr int kStageB = stage_b<W_NK>();
  int64_t m0, n0;
  tile_origin(M, Nn, &m0, &n0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;

  // Each thread copies 2 16-byte chunks of each operand per stage.
  auto load_stage = [&](int stage, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kTcThreads;
      const int row = c / 4, col = (c % 4) * 8;  // X: 128 rows x 4 chunks
      const int64_t m = m0 + row, k = k0 + col;
      const bool ok = m < M && k < K;
      cp_async16(As + stage * kStageA + row * kPadK + col, ok ? X + m * ldx + k : X, ok);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = tid + i * kTcThreads;
      if (W_NK) {  // 128 n-rows x 4 chunks of k
        const int row = c / 4, col = (c % 4) * 8;
        const int64_t n = n0 + row, k = k0 + col;
        const bool ok = n < Nn && k < K;
        cp_async16(Bs + stage * kStageB + row * kPadK + col, ok ? W + n * ldw + k : W, ok);
      } else {     // 32 k-rows x 16 chunks of n
        const int row = c / 16, col = (c % 16) * 8;
        const int64_t k = k0 + row, n = n0 + col;
        const bool ok = k < K && n < Nn;
        cp_async16(Bs + stage * kStageB + row * kPadN + col, ok ? W + k * ldw + n : W, ok);
      }
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;

  const int64_t k_tiles = (K + kBK - 1) / kBK;
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < k_tiles) load_stage(st, st * kBK);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread)...
    __syncthreads();               // ...and for everyone; stage (kt-1) % kStages is free again
    const int64_t next = kt + kStages - 1;
    if (next < k_tiles) load_stage(static_cast<int>(next % kStages), next * kBK);
    cp_async_commit();
    const int stage = static_cast<int>(kt % kStages);
    mma_k32<TW, W_NK>(acc, As + stage * kStageA, Bs + stage * kStageB, lane, wm, wn);
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused by the epilogue
  lora_epilogue_store(acc, dsmem, out, ldo, M, Nn, m0, n0, tid, epi);
}

template <typename TW>
cudaError_t launch_typed(cudaStream_t stream, float* out, int64_t ldo, const float* X, int64_t ldx,
                         const void* X16, const TW* W, int64_t ldw, bool w_nk, int64_t M,
                         int64_t Nn, int64_t K, const LoraEpilogue& epi) {
  const int64_t tiles = ((M + kBM - 1) / kBM) * ((Nn + kBN - 1) / kBN);
  if (tiles > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles));
  if (X16 != nullptr) {  // the caller checked gemm_tc_pipelined_ok
    const TW* x16 = static_cast<const TW*>(X16);
    if (w_nk) {
      auto kernel = gemm_tc_pipelined_kernel<TW, true>;
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           pipelined_smem<true>());
      if (e != cudaSuccess) return e;
      launch(kernel, grid, kTcThreads, pipelined_smem<true>(), stream, out, x16, W, ldo, K, ldw, M, Nn,
                                                                   K, epi);
    } else {
      auto kernel = gemm_tc_pipelined_kernel<TW, false>;
      cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           pipelined_smem<false>());
      if (e != cudaSuccess) return e;
      launch(kernel, grid, kTcThreads, pipelined_smem<false>(), stream, out, x16, W, ldo, K, ldw, M,
                                                                    Nn, K, epi);
    }
    return cudaGetLastError();
  }
  const bool x_vec = ldx % 4 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0;
  const bool w_vec = ldw % 8 == 0 && reinterpret_cast<uintptr_t>(W) % 16 == 0;
  if (w_nk)
    launch(gemm_tc_kernel<TW, true>, grid, kTcThreads, 0, stream, out, X, W, ldo, ldx, ldw, M, Nn, K,
                                                              x_vec, w_vec, epi);
  else
    launch(gemm_tc_kernel<TW, false>, grid, kTcThreads, 0, stream, out, X, W, ldo, ldx, ldw, M, Nn, K,
                                                               x_vec, w_vec, epi);
  return cudaGetLastError();
}

}  // namespace

bool gemm_tc_pipelined_ok(int64_t K, int64_t Nn, int64_t ldw, const void* W, bool w_nk) {
  if (K % 8 != 0 || ldw % 8 != 0 || reinterpret_cast<uintptr_t>(W) % 16 != 0) return false;
  return w_nk || Nn % 8 == 0;
}

cudaError_t launch_gemm_tc(cudaStream_t stream, float* out, int64_t ldo, const float* X,
                           int64_t ldx, const void* X16, const void* W, lora_dtype w_dtype, int64_t ldw,
                           bool w_nk, int64_t M, int64_t Nn, int64_t K, const LoraEpilogue& epi) {
  if (M <= 0 || Nn <= 0) return cudaSuccess;
  if (w_dtype == LORA_BF16)
    return launch_typed(stream, out, ldo, X, ldx, X16, static_cast<const __nv_bfloat16*>(W), ldw,
                        w_nk, M, Nn, K, epi);
  if (w_dtype == LORA_F16)
    return launch_typed(stream, out, ldo, X, ldx, X16, static_cast<const __half*>(W), ldw, w_nk, M,
                        Nn, K, epi);
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lora
