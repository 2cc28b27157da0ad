// lora_merge on CUDA: W += s·B·A for fp32, bf16 and f16 W, with the rank-R product in fp32 and
// the 16-bit weight rounded once. Memory-bound (one read and one write of W); A and B are staged
// in shared memory per tile. lora_forward/lora_backward live in backend.cu as GEMM launches.
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

constexpr int kMergeRows = 32, kMergeCols = 128;  // tile: a warp writes 128 contiguous columns
constexpr int kMergeR = 16;                       // rank slice staged per pass
constexpr int kMergeThreads = 256;                // 32 columns-threads x 8 row-threads

template <typename T> __device__ __forceinline__ float load_w(const T* p);
template <> __device__ __forceinline__ float load_w(const float* p) { return *p; }
template <> __device__ __forceinline__ float load_w(const __nv_bfloat16* p) { return __bfloat162float(*p); }
template <> __device__ __forceinline__ float load_w(const __half* p) { return __half2float(*p); }
template <typename T> __device__ __forceinline__ void store_w(T* p, float v);
template <> __device__ __forceinline__ void store_w(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void store_w(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ void store_w(__half* p, float v) { *p = __float2half_rn(v); }

// W[o][c] = round(W[o][c] + s·Σ_r B[o][r]·A[r][c])
template <typename TW>
__global__ void __launch_bounds__(kMergeThreads)
    lora_merge_kernel(TW* __restrict__ W,           // (OC, C), +=
                      const float* __restrict__ A,  // (R, C)
                      const float* __restrict__ B,  // (OC, R)
                      int64_t OC, int64_t C, int64_t R, float s) {
  __shared__ float Bsh[kMergeRows][kMergeR + 1];  // +1: rows read down a column are conflict-free
  __shared__ float Ash[kMergeR][kMergeCols];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kMergeRows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kMergeCols;
  float acc[4][4] = {};
  for (int64_t r0 = 0; r0 < R; r0 += kMergeR) {
    __syncthreads();
    for (int e = threadIdx.x; e < kMergeRows * kMergeR; e += kMergeThreads) {
      const int i = e / kMergeR, j = e % kMergeR;
      Bsh[i][j] = (o0 + i < OC && r0 + j < R) ? B[(o0 + i) * R + r0 + j] : 0.0f;
    }
    for (int e = threadIdx.x; e < kMergeR * kMergeCols; e += kMergeThreads) {
      const int j = e / kMergeCols, i = e % kMergeCols;
      Ash[j][i] = (r0 + j < R && c0 + i < C) ? A[(r0 + j) * C + c0 + i] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kMergeR; ++r) {
      float b[4], a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) b[i] = Bsh[ty + 8 * i][r];
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = Ash[r][tx + 32 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(b[i], a[j], acc[i][j]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t o = o0 + ty + 8 * i;
    if (o >= OC) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 32 * j;
      if (c >= C) continue;
      TW* p = W + o * C + c;
      store_w(p, fmaf(s, acc[i][j], load_w(p)));
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
  switch (w_dtype) {
    case DType::F32:
      lora_merge_kernel<<<grid, kMergeThreads, 0, stream>>>(static_cast<float*>(W), A, B, OC, C, R, s);
      break;
    case DType::BF16:
      lora_merge_kernel<<<grid, kMergeThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(W), A, B, OC, C, R, s);
      break;
    case DType::F16:
      lora_merge_kernel<<<grid, kMergeThreads, 0, stream>>>(static_cast<__half*>(W), A, B, OC, C, R, s);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lora
