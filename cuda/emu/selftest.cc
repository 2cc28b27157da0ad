// Checks of the CUDA emulator itself (test/cuda_emu.test.ts runs each case in its own process,
// since some leave a sticky error behind): warp shuffles, barriers, shared memory, the mma.sync
// and ldmatrix fragment layouts against matrices placed by the PTX ISA's tables, cp.async's
// landing at wait_group, and the errors a GPU would give (invalid launch, shared memory over the
// limit, out-of-bounds access, deadlock). Prints "ok <case>" or "FAIL <case>: why"; exit 0 or 1.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emu.h"

using lora::cuda::launch;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

template <typename T>
T* device_array(const std::vector<T>& host) {
  void* p = nullptr;
  cudaMalloc(&p, host.size() * sizeof(T));
  cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return static_cast<T*>(p);
}

template <typename T>
std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

// ---- kernels ------------------------------------------------------------------------------------
__global__ void warp_sum_kernel(float* out, const float* in) {
  float v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

__global__ void reverse_kernel(int* out, const int* in, int n) {
  __shared__ int s[1024];
  s[threadIdx.x] = in[blockIdx.x * n + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * n + threadIdx.x] = s[n - 1 - threadIdx.x];
}

__global__ void mma_bf16_kernel(float* d, const __nv_bfloat16* A, const __nv_bfloat16* B) {
  // A (16x16) and B (16x8) row-major in global memory; fragments placed by the PTX ISA's
  // figures for mma.m16n8k16: g = lane/4, t = lane%4.
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto pack = [](__nv_bfloat16 lo, __nv_bfloat16 hi) {
    uint16_t l, h;
    std::memcpy(&l, &lo, 2);
    std::memcpy(&h, &hi, 2);
    return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
  };
  uint32_t a[4], b[2];
  a[0] = pack(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pack(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pack(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pack(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  b[0] = pack(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  b[1] = pack(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  float c[4] = {1.0f, 1.0f, 1.0f, 1.0f};  // D = A·B + C
  ::lora_emu::mma_m16n8k16(c, a, b, ::lora_emu::MmaType::BF16);
  d[g * 8 + 2 * t] = c[0];
  d[g * 8 + 2 * t + 1] = c[1];
  d[(g + 8) * 8 + 2 * t] = c[2];
  d[(g + 8) * 8 + 2 * t + 1] = c[3];
}

__global__ void mma_tf32_kernel(float* d, const float* A, const float* B) {
  // A (16x8), B (8x8) row-major; the m16n8k8 .tf32 layout.
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  a[0] = ::lora_emu::cvt_rna_tf32(A[g * 8 + t]);
  a[1] = ::lora_emu::cvt_rna_tf32(A[(g + 8) * 8 + t]);
  a[2] = ::lora_emu::cvt_rna_tf32(A[g * 8 + t + 4]);
  a[3] = ::lora_emu::cvt_rna_tf32(A[(g + 8) * 8 + t + 4]);
  b[0] = ::lora_emu::cvt_rna_tf32(B[t * 8 + g]);
  b[1] = ::lora_emu::cvt_rna_tf32(B[(t + 4) * 8 + g]);
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  ::lora_emu::mma_m16n8k8_tf32(c, a, b);
  d[g * 8 + 2 * t] = c[0];
  d[g * 8 + 2 * t + 1] = c[1];
  d[(g + 8) * 8 + 2 * t] = c[2];
  d[(g + 8) * 8 + 2 * t + 1] = c[3];
}

__global__ void ldmatrix_kernel(uint32_t* out, const uint16_t* M, bool trans) {
  // Four 8x8 matrices of 16-bit values, M[j][r][c] = j*64 + r*8 + c, rows 16 bytes apart.
  __shared__ __align__(16) uint16_t s[4 * 64];
  for (int i = threadIdx.x; i < 256; i += 32) s[i] = M[i];
  __syncthreads();
  const int lane = threadIdx.x;
  uint32_t r[4];
  ::lora_emu::ldmatrix_x4(r, s + (lane / 8) * 64 + (lane % 8) * 8, trans);
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

__global__ void cp_async_kernel(float* out, const float* in) {
  __shared__ __align__(16) float s[8];
  if (threadIdx.x == 0) {
    for (int i = 0; i < 8; ++i) s[i] = -1.0f;
    ::lora_emu::cp_async16(s, in, true);
    ::lora_emu::cp_async_commit();
    ::lora_emu::cp_async16(s + 4, in + 4, false);  // zero-fill
    ::lora_emu::cp_async_commit();
    out[0] = s[0];  // before any wait: nothing has landed
    ::lora_emu::cp_async_wait(1);  // the older group lands, the newer one may not
    out[1] = s[0];
    out[2] = s[4];
    ::lora_emu::cp_async_wait(0);
    out[3] = s[4];
  }
}

__global__ void dynamic_smem_kernel(float* out) {
  LORA_DYNAMIC_SMEM(float, buf);
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void read_kernel(float* out, const float* in, long offset) { out[0] = in[offset]; }

__global__ void divergent_barrier_kernel(float* out) {
  // Lane 0 waits at the block barrier while the rest of its warp waits for it in a shuffle: a
  // GPU hangs. (Threads that exit do not hold a barrier up, on the GPU or here.)
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x == 0) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// ---- cases --------------------------------------------------------------------------------------
void case_warp_sum() {
  std::vector<float> in(64);
  for (int i = 0; i < 64; ++i) in[i] = static_cast<float>(i);
  float* d_in = device_array(in);
  float* d_out = device_array(std::vector<float>(64, 0.0f));
  launch(warp_sum_kernel, dim3(1), dim3(64), 0, nullptr, d_out, d_in);
  expect(cudaGetLastError() == cudaSuccess, "warp_sum launch");
  const std::vector<float> out = host_copy(d_out, 64);
  for (int i = 0; i < 64; ++i)
    expect(out[i] == (i < 32 ? 496.0f : 1520.0f), "warp_sum lane " + std::to_string(i));
}

void case_reverse() {
  const int n = 300, blocks = 5;
  std::vector<int> in(n * blocks);
  for (int i = 0; i < n * blocks; ++i) in[i] = i * 7 + 1;
  int* d_in = device_array(in);
  int* d_out = device_array(std::vector<int>(n * blocks, 0));
  launch(reverse_kernel, dim3(blocks), dim3(n), 0, nullptr, d_out, d_in, n);
  expect(cudaGetLastError() == cudaSuccess, "reverse launch");
  const std::vector<int> out = host_copy(d_out, n * blocks);
  for (int b = 0; b < blocks; ++b)
    for (int i = 0; i < n; ++i)
      expect(out[b * n + i] == in[b * n + n - 1 - i], "reverse block " + std::to_string(b));
}

void case_mma() {
  std::vector<__nv_bfloat16> A(256), B(128);
  std::vector<float> Af(256), Bf(128);
  for (int i = 0; i < 256; ++i) {
    A[i] = __float2bfloat16_rn(static_cast<float>((i * 37) % 23 - 11) / 8.0f);
    Af[i] = __bfloat162float(A[i]);
  }
  for (int i = 0; i < 128; ++i) {
    B[i] = __float2bfloat16_rn(static_cast<float>((i * 53) % 19 - 9) / 4.0f);
    Bf[i] = __bfloat162float(B[i]);
  }
  __nv_bfloat16* dA = device_array(A);
  __nv_bfloat16* dB = device_array(B);
  float* dD = device_array(std::vector<float>(128, 0.0f));
  launch(mma_bf16_kernel, dim3(1), dim3(32), 0, nullptr, dD, dA, dB);
  const std::vector<float> D = host_copy(dD, 128);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double ref = 1.0;
      for (int k = 0; k < 16; ++k) ref += static_cast<double>(Af[m * 16 + k]) * Bf[k * 8 + n];
      expect(D[m * 8 + n] == static_cast<float>(ref), "mma bf16 (" + std::to_string(m) + "," + std::to_string(n) + ")");
    }

  std::vector<float> At(128), Bt(64);
  for (int i = 0; i < 128; ++i) At[i] = static_cast<float>((i * 29) % 17 - 8) / 2.0f;  // exact in tf32
  for (int i = 0; i < 64; ++i) Bt[i] = static_cast<float>((i * 31) % 13 - 6);
  float* dAt = device_array(At);
  float* dBt = device_array(Bt);
  float* dDt = device_array(std::vector<float>(128, 0.0f));
  launch(mma_tf32_kernel, dim3(1), dim3(32), 0, nullptr, dDt, dAt, dBt);
  const std::vector<float> Dt = host_copy(dDt, 128);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double ref = 0.0;
      for (int k = 0; k < 8; ++k) ref += static_cast<double>(At[m * 8 + k]) * Bt[k * 8 + n];
      expect(Dt[m * 8 + n] == static_cast<float>(ref), "mma tf32 (" + std::to_string(m) + "," + std::to_string(n) + ")");
    }
  // cvt.rna: ties away from zero at the 13th bit; tf32 keeps 10 mantissa bits.
  expect(::lora_emu::cvt_rna_tf32(1.0f + 1.0f / 2048.0f) == 0x3f802000u, "cvt.rna.tf32 rounds a tie up");
  expect(::lora_emu::cvt_rna_tf32(-(1.0f + 1.0f / 2048.0f)) == 0xbf802000u, "cvt.rna.tf32 rounds a negative tie away from zero");
  expect(::lora_emu::cvt_rna_tf32(1.0f + 1.0f / 4096.0f) == 0x3f800000u, "cvt.rna.tf32 rounds below a tie down");
}

void case_ldmatrix() {
  std::vector<uint16_t> M(256);
  for (int i = 0; i < 256; ++i) M[i] = static_cast<uint16_t>(i);
  uint16_t* dM = device_array(M);
  for (bool trans : {false, true}) {
    uint32_t* dOut = device_array(std::vector<uint32_t>(128, 0));
    launch(ldmatrix_kernel, dim3(1), dim3(32), 0, nullptr, dOut, dM, trans);
    const std::vector<uint32_t> out = host_copy(dOut, 128);
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j) {
        const int g = lane / 4, t = lane % 4;
        // Without .trans lane holds row g, columns 2t and 2t+1; with .trans, column g, rows 2t, 2t+1.
        const uint32_t lo = trans ? j * 64 + (2 * t) * 8 + g : j * 64 + g * 8 + 2 * t;
        const uint32_t hi = trans ? j * 64 + (2 * t + 1) * 8 + g : j * 64 + g * 8 + 2 * t + 1;
        expect(out[lane * 4 + j] == (lo | (hi << 16)),
               std::string(trans ? "ldmatrix.trans" : "ldmatrix") + " lane " + std::to_string(lane) + " matrix " + std::to_string(j));
      }
  }
}

void case_cp_async() {
  std::vector<float> in = {1, 2, 3, 4, 5, 6, 7, 8};
  float* d_in = device_array(in);
  float* d_out = device_array(std::vector<float>(4, 0.0f));
  launch(cp_async_kernel, dim3(1), dim3(32), 0, nullptr, d_out, d_in);
  const std::vector<float> out = host_copy(d_out, 4);
  expect(out[0] == -1.0f, "cp.async has not landed before wait_group");
  expect(out[1] == 1.0f, "wait_group 1 lands the older group");
  expect(out[2] == -1.0f, "wait_group 1 leaves the newest group in flight");
  expect(out[3] == 0.0f, "wait_group 0 lands the zero-fill");
}

void case_dynamic_smem() {
  float* d_out = device_array(std::vector<float>(256, 0.0f));
  launch(dynamic_smem_kernel, dim3(1), dim3(256), 64 * 1024, nullptr, d_out);
  expect(cudaGetLastError() == cudaErrorInvalidValue, "64 KiB of dynamic shared memory without opting in is refused");
  expect(cudaGetLastError() == cudaSuccess, "that error is not sticky");
  expect(cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess,
         "opting in to 64 KiB");
  launch(dynamic_smem_kernel, dim3(1), dim3(256), 64 * 1024, nullptr, d_out);
  expect(cudaGetLastError() == cudaSuccess, "64 KiB after opting in");
  const std::vector<float> out = host_copy(d_out, 256);
  for (int i = 0; i < 256; ++i) expect(out[i] == static_cast<float>(255 - i), "dynamic shared memory value");
  launch(dynamic_smem_kernel, dim3(1), dim3(1025), 0, nullptr, d_out);
  expect(cudaGetLastError() == cudaErrorInvalidConfiguration, "1025 threads per block is an invalid configuration");
}

void case_out_of_bounds() {
  std::vector<float> in(100, 1.0f);
  float* d_in = device_array(in);
  float* d_out = device_array(std::vector<float>(1, 0.0f));
  launch(read_kernel, dim3(1), dim3(1), 0, nullptr, d_out, d_in, 99L);
  expect(cudaGetLastError() == cudaSuccess, "reading the last element is fine");
  // 100 floats take 512 bytes (allocations are 256-byte granular, as cudaMalloc's): float 128
  // is the first byte past the allocation.
  launch(read_kernel, dim3(1), dim3(1), 0, nullptr, d_out, d_in, 128L);
  expect(cudaGetLastError() == cudaErrorIllegalAddress, "reading past the allocation is an illegal address");
  void* p = nullptr;
  expect(cudaMalloc(&p, 16) == cudaErrorIllegalAddress, "the error is sticky, as a lost GPU context");
}

void case_deadlock() {
  float* d_out = device_array(std::vector<float>(64, 0.0f));
  launch(divergent_barrier_kernel, dim3(1), dim3(64), 0, nullptr, d_out);
  expect(cudaGetLastError() == cudaErrorLaunchFailure, "a barrier one thread never reaches is a launch failure");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "";
  struct Case {
    const char* name;
    void (*fn)();
  } cases[] = {
      {"warp_sum", case_warp_sum}, {"reverse", case_reverse},       {"mma", case_mma},
      {"ldmatrix", case_ldmatrix}, {"cp_async", case_cp_async},     {"dynamic_smem", case_dynamic_smem},
      {"out_of_bounds", case_out_of_bounds}, {"deadlock", case_deadlock},
  };
  bool ran = false;
  for (const Case& c : cases) {
    if (which != c.name) continue;
    ran = true;
    const int before = failures;
    c.fn();
    if (failures == before) std::printf("ok %s\n", c.name);
  }
  if (!ran) {
    std::printf("usage: selftest <case>; cases:");
    for (const Case& c : cases) std::printf(" %s", c.name);
    std::printf("\n");
    return 2;
  }
  return failures ? 1 : 0;
}
