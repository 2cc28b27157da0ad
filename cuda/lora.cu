// lora_merge on CUDA: W += s·B·A for fp32, bf16 and f16 W, with the rank-R product in fp32 and
// the 16-bit weight rounded once. One read and one write of W in 4-element accesses; A and B are
// staged in shared memory per tile. Plain fp32 FMA: bandwidth-bound at small R, FMA-bound from
// R of about 32 on an H200 (tensor cores with 3xTF32 would lift that; not done). lora_forward and
// lora_backward live in backend.cu as GEMM launches.
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

cudaError_t launch_lora_merge(cudaStream_t stream, void* W, DType w_dtype, const float* A,
                              const float* B, int64_t OC, int64_t C, int64_t R, float s) {
  if (OC <= 0 || C <= 0) return cudaSuccess;
  const int64_t gy = (OC + kMergeRows - 1) / kMergeRows;
  if (gy > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((C + kMergeCols - 1) / kMergeCols), static_cast<unsigned>(gy));
  // 4-element W accesses need every row to start on a 4-element boundary (and W aligned for it).
  const bool vec = C % 4 == 0 && reinterpret_cast<uintptr_t>(W) % (4 * dtype_size(w_dtype)) == 0;
  switch (w_dtype) {
    case DType::F32:
      launch(lora_merge_kernel<float>, grid, kMergeThreads, 0, stream, static_cast<float*>(W), A, B, OC, C, R, s, vec);
      break;
    case DType::BF16:
      launch(lora_merge_kernel<__nv_bfloat16>, grid, kMergeThreads, 0, stream, static_cast<__nv_bfloat16*>(W), A, B, OC, C, R, s, vec);
      break;
    case DType::F16:
      launch(lora_merge_kernel<__half>, grid, kMergeThreads, 0, stream, static_cast<__half*>(W), A, B, OC, C, R, s, vec);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora
