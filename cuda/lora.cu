// The LoRA kernels on CUDA. lora_forward and lora_backward are launches of the GEMM engines
// (gemm_simt.cu, gemm_skinny.cu, gemm_tc.cu) with the adapter product in their epilogues.
// lora_merge: W += s·B·A for fp32, bf16 and f16 W, with the rank-R product in fp32 and the 16-bit
// weight rounded once. One read and one write of W in 4-element accesses; A and B are staged in
// shared memory per tile. Plain fp32 FMA: bandwidth-bound at small R, FMA-bound from R of about
// 32 on an H200 (tensor cores with 3xTF32 would lift that; not done).
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kMergeRows = 64, kMergeCols = 128;  // tile of W per block
constexpr int kMergeR = 16;                       // rank slice staged per pass
constexpr int kMergeThreads = 256;                // 16 x 16 threads, 4 rows x 8 columns each

// Four consecutive elements of W as float, and back (rounded once). Scalar fallbacks for
// unaligned rows.
template <typename T> struct Vec4;
template <> struct Vec4<float> {
  static __device__ __forceinline__ float4 load(const float* p) { return *reinterpret_cast<const float4*>(p); }
  static __device__ __forceinline__ void store(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
  static __device__ __forceinline__ float one(const float* p) { return *p; }
  static __device__ __forceinline__ void put(float* p, float v) { *p = v; }
};
template <> struct Vec4<__nv_bfloat16> {
  static __device__ __forceinline__ float4 load(const __nv_bfloat16* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float4 v) {
    __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t*>(&a);
    u.y = *reinterpret_cast<uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
  static __device__ __forceinline__ float one(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void put(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};
template <> struct Vec4<__half> {
  static __device__ __forceinline__ float4 load(const __half* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  static __device__ __forceinline__ void store(__half* p, float4 v) {
    __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<uint32_t*>(&a);
    u.y = *reinterpret_cast<uint32_t*>(&b);
    *reinterpret_cast<uint2*>(p) = u;
  }
  static __device__ __forceinline__ float one(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void put(__half* p, float v) { *p = __float2half_rn(v); }
};

// W[o][c] = round(W[o][c] + s·Σ_r B[o][r]·A[r][c]). Thread (tx, ty) owns rows ty·4 + 0..3 and
// columns tx·4 + 0..3 and 64 + tx·4 + 0..3: 128-bit shared loads, 4-element W accesses.
template <typename TW>
__global__ void __launch_bounds__(kMergeThreads)
    lora_merge_kernel(TW* __restrict__ W,           // (OC, C), +=
                      const float* __restrict__ A,  // (R, C)
                      const float* __restrict__ B,  // (OC, R)
                      int64_t OC, int64_t C, int64_t R, float s, bool vec) {
  __shared__ __align__(16) float Bt[kMergeR][kMergeRows + 4];  // B slice as (r, o); +4: 2-way stores
  __shared__ __align__(16) float As[kMergeR][kMergeCols];  // A slice: (r, c)
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kMergeRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kMergeCols;
  float acc[4][8] = {};
  for (int64_t r0 = 0; r0 < R; r0 += kMergeR) {
    __syncthreads();
    for (int e = threadIdx.x; e < kMergeRows * kMergeR; e += kMergeThreads) {
      const int i = e / kMergeR, j = e % kMergeR;  // coalesced along r in B's rows
      Bt[j][i] = (o0 + i < OC && r0 + j < R) ? B[(o0 + i) * R + r0 + j] : 0.0f;
    }
    for (int e = threadIdx.x; e < kMergeR * kMergeCols; e += kMergeThreads) {
      const int j = e / kMergeCols, i = e % kMergeCols;
      As[j][i] = (r0 + j < R && c0 + i < C) ? A[(r0 + j) * C + c0 + i] : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int r = 0; r < kMergeR; ++r) {
      const float4 b = *reinterpret_cast<const float4*>(&Bt[r][ty * 4]);
      const float4 a0 = *reinterpret_cast<const float4*>(&As[r][tx * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[r][64 + tx * 4]);
      const float bv[4] = {b.x, b.y, b.z, b.w};
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(bv[i], av[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t o = o0 + ty * 4 + i;
    if (o >= OC) continue;
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const int64_t c = c0 + g * 64 + tx * 4;
      TW* p = W + o * C + c;
      if (vec && c + 3 < C) {
        float4 w = Vec4<TW>::load(p);
        w.x = fmaf(s, acc[i][g * 4 + 0], w.x);
        w.y = fmaf(s, acc[i][g * 4 + 1], w.y);
        w.z = fmaf(s, acc[i][g * 4 + 2], w.z);
        w.w = fmaf(s, acc[i][g * 4 + 3], w.w);
        Vec4<TW>::store(p, w);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (c + e < C) Vec4<TW>::put(p + e, fmaf(s, acc[i][g * 4 + e], Vec4<TW>::one(p + e)));
      }
    }
  }
}

}  // namespace

cudaError_t launch_lora_merge(cudaStream_t stream, void* W, lora_dtype w_dtype, const float* A,
                              const float* B, int64_t OC, int64_t C, int64_t R, float s) {
  if (OC <= 0 || C <= 0) return cudaSuccess;
  const int64_t gy = (OC + kMergeRows - 1) / kMergeRows;
  if (gy > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((C + kMergeCols - 1) / kMergeCols), static_cast<unsigned>(gy));
  // 4-element W accesses need every row to start on a 4-element boundary (and W aligned for it).
  const bool vec = C % 4 == 0 && reinterpret_cast<uintptr_t>(W) % (4 * lora_dtype_size(w_dtype)) == 0;
  switch (w_dtype) {
    case LORA_F32:
      launch(lora_merge_kernel<float>, grid, kMergeThreads, 0, stream, static_cast<float*>(W), A, B, OC, C, R, s, vec);
      break;
    case LORA_BF16:
      launch(lora_merge_kernel<__nv_bfloat16>, grid, kMergeThreads, 0, stream, static_cast<__nv_bfloat16*>(W), A, B, OC, C, R, s, vec);
      break;
    case LORA_F16:
      launch(lora_merge_kernel<__half>, grid, kMergeThreads, 0, stream, static_cast<__half*>(W), A, B, OC, C, R, s, vec);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// ---- table entries ---------------------------------------------------------------------------
namespace {

OperandDropout make_dropout(float p, uint64_t seed, int64_t ld) {
  OperandDropout d;
  if (p > 0.0f) {
    d.p = p;
    d.scale = 1.0f / (1.0f - p);  // as the CPU backend computes it
    d.seed = seed;
    d.ld = ld;
  }
  return d;
}

// The adapter GEMMs (h, dh, dB: at most 64 columns) on tensor cores in 3xTF32, or on the fp32
// SIMT engine for wider ranks or with LORA_NATIVE_CUDA_SKINNY=simt.
lora_status adapter_gemm(Context& c, const GemmArgs& g, bool trans_a, bool trans_b,
                         const char* what) {
  if (c.skinny_tc() && g.Nn <= 64) return c.check(launch_gemm_skinny(c.stream(), g, trans_a, trans_b, false, c.sm_count()), what);
  return c.check(launch_gemm_simt(c.stream(), g, trans_a, trans_b, c.sm_count()), what);
}

// out (M, Nn) = X (M, K, contiguous) · op(W) + epi on tensor cores. When the shape allows, X is
// rounded to W's type once into a workspace and the cp.async pipeline runs; else the
// register-staged kernel rounds it tile by tile. LORA_NATIVE_CUDA_TC=staged forces the latter.
lora_status base_gemm_tc(Context& c, float* out, int64_t ldo, const float* X, const void* W,
                         lora_dtype w_dtype, int64_t ldw, bool w_nk, int64_t M, int64_t Nn,
                         int64_t K, const LoraEpilogue& epi, const char* what) {
  if (!c.tc_pipelined() || M <= 0 || Nn <= 0 || K <= 0 ||
      !gemm_tc_pipelined_ok(K, Nn, ldw, W, w_nk)) {
    return c.check(launch_gemm_tc(c.stream(), out, ldo, X, K, nullptr, W, w_dtype, ldw, w_nk, M, Nn,
                                K, epi),
                 what);
  }
  const size_t bytes = static_cast<size_t>(M * K) * 2;
  void* x16 = c.alloc(bytes);
  if (x16 == nullptr) return c.no_memory();
  lora_status st = c.check(launch_convert(c.stream(), x16, w_dtype, X, LORA_F32, M * K), what);
  if (st == LORA_OK)
    st = c.check(launch_gemm_tc(c.stream(), out, ldo, X, K, x16, W, w_dtype, ldw, w_nk, M, Nn, K, epi),
               what);
  c.free(x16, bytes);  // stream order keeps it alive for the kernel
  return st;
}

// h = x̃·Aᵀ (fp32, its own skinny GEMM);  y = x·Wᵀ + b + s·h·Bᵀ (one GEMM, LoRA in the epilogue)
lora_status lora_forward(lora_backend* be, float* y, float* h, const float* x, const void* W,
                         lora_dtype w_dtype, const float* b, const float* A, const float* B,
                         int64_t N, int64_t C, int64_t OC, int64_t R, float s, float dropout_p,
                         uint64_t seed) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C < 0 || OC < 0 || R < 0 || !(dropout_p >= 0.0f && dropout_p < 1.0f))
    return LORA_INVALID_ARGUMENT;
  if (w_dtype == LORA_I32) return LORA_UNSUPPORTED;
  if (R > 0) {
    GemmArgs hg;
    hg.Cm = h; hg.ldc = R;
    hg.Am = x; hg.lda = C;
    hg.Bm = A; hg.ldb = C;
    hg.M = N; hg.Nn = R; hg.K = C;
    hg.drop_a = make_dropout(dropout_p, seed, C);
    lora_status st = adapter_gemm(c, hg, false, true, "lora_forward (h)");
    if (st != LORA_OK) return st;
  }
  LoraEpilogue epi;
  epi.bias = b;
  if (R > 0) {
    epi.L = h; epi.ldl = R;
    epi.Rm = B; epi.rs_n = R; epi.rs_r = 1;
    epi.R = R;
    epi.s = s;
  }
  if (w_dtype == LORA_F32) {
    GemmArgs yg;
    yg.Cm = y; yg.ldc = OC;
    yg.Am = x; yg.lda = C;
    yg.Bm = static_cast<const float*>(W); yg.ldb = C;
    yg.M = N; yg.Nn = OC; yg.K = C;
    yg.lora = epi;
    return c.check(launch_gemm_simt(c.stream(), yg, false, true, c.sm_count()), "lora_forward");
  }
  return base_gemm_tc(c, y, OC, x, W, w_dtype, C, true, N, OC, C, epi, "lora_forward");
}

// h = x̃·Aᵀ; y = x·Wᵀ + b + s·h·Bᵀ
// dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)   (one GEMM for dx)
lora_status lora_backward(lora_backend* be, float* dx, float* dA, float* dB, const float* dy,
                          const float* x, const float* h, const void* W, lora_dtype w_dtype,
                          const float* A, const float* B, int64_t N, int64_t C, int64_t OC,
                          int64_t R, float s, float dropout_p, uint64_t seed) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (N < 0 || C < 0 || OC < 0 || R < 0 || !(dropout_p >= 0.0f && dropout_p < 1.0f))
    return LORA_INVALID_ARGUMENT;
  if (w_dtype == LORA_I32) return LORA_UNSUPPORTED;
  lora_status st = LORA_OK;
  if (dB != nullptr && R > 0) {
    GemmArgs g;
    g.Cm = dB; g.ldc = R;
    g.Am = dy; g.lda = OC;  // dyᵀ: stored (N, OC), used transposed
    g.Bm = h; g.ldb = R;
    g.M = OC; g.Nn = R; g.K = N;
    g.alpha = s; g.beta = 1.0f;
    st = adapter_gemm(c, g, true, false, "lora_backward (dB)");
    if (st != LORA_OK) return st;
  }
  float* dh = nullptr;
  const size_t dh_bytes = static_cast<size_t>(N * R) * sizeof(float);
  if ((dA != nullptr || dx != nullptr) && R > 0 && N > 0) {
    dh = static_cast<float*>(c.alloc(dh_bytes));
    if (dh == nullptr) return c.no_memory();
    GemmArgs g;
    g.Cm = dh; g.ldc = R;
    g.Am = dy; g.lda = OC;
    g.Bm = B; g.ldb = R;
    g.M = N; g.Nn = R; g.K = OC;
    g.alpha = s;
    st = adapter_gemm(c, g, false, false, "lora_backward (dh)");
  }
  if (st == LORA_OK && dA != nullptr && dh != nullptr && c.skinny_tc() && R <= 64) {
    // dAᵀ (C, R) = x̃ᵀ·dh on the tensor-core path, stored transposed into dA (R, C).
    GemmArgs g;
    g.Cm = dA; g.ldc = C;
    g.Am = x; g.lda = C;    // x̃ᵀ: stored (N, C), used transposed
    g.Bm = dh; g.ldb = R;
    g.M = C; g.Nn = R; g.K = N;
    g.beta = 1.0f;
    g.drop_a = make_dropout(dropout_p, seed, C);
    st = c.check(launch_gemm_skinny(c.stream(), g, true, false, true, c.sm_count()), "lora_backward (dA)");
  } else if (st == LORA_OK && dA != nullptr && dh != nullptr) {
    GemmArgs g;
    g.Cm = dA; g.ldc = C;
    g.Am = dh; g.lda = R;  // dhᵀ: stored (N, R), used transposed
    g.Bm = x; g.ldb = C;
    g.M = R; g.Nn = C; g.K = N;
    g.beta = 1.0f;
    g.drop_b = make_dropout(dropout_p, seed, C);
    st = c.check(launch_gemm_simt(c.stream(), g, true, false, c.sm_count()), "lora_backward (dA)");
  }
  if (st == LORA_OK && dx != nullptr) {
    LoraEpilogue epi;
    if (dh != nullptr) {
      epi.L = dh; epi.ldl = R;
      epi.Rm = A; epi.rs_n = 1; epi.rs_r = C;
      epi.R = R;
      epi.s = 1.0f;
      epi.drop = make_dropout(dropout_p, seed, C);
    }
    if (w_dtype == LORA_F32) {
      GemmArgs g;
      g.Cm = dx; g.ldc = C;
      g.Am = dy; g.lda = OC;
      g.Bm = static_cast<const float*>(W); g.ldb = C;
      g.M = N; g.Nn = C; g.K = OC;
      g.lora = epi;
      st = c.check(launch_gemm_simt(c.stream(), g, false, false, c.sm_count()), "lora_backward (dx)");
    } else {
      st = base_gemm_tc(c, dx, C, dy, W, w_dtype, C, false, N, C, OC, epi, "lora_backward (dx)");
    }
  }
  if (dh != nullptr) c.free(dh, dh_bytes);
  return st;
}

lora_status lora_merge(lora_backend* be, void* W, lora_dtype w_dtype, const float* A,
                       const float* B, int64_t OC, int64_t C, int64_t R, float s) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (OC < 0 || C < 0 || R < 0) return LORA_INVALID_ARGUMENT;
  if (w_dtype == LORA_I32) return LORA_UNSUPPORTED;
  return c.check(launch_lora_merge(c.stream(), W, w_dtype, A, B, OC, C, R, s), "lora_merge");
}

}  // namespace

void register_lora(lora_backend& t) {
  t.lora_forward = lora_forward;
  t.lora_backward = lora_backward;
  t.lora_merge = lora_merge;
}

}  // namespace cuda
}  // namespace lora
