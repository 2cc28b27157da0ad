// exp for loops that vectorise, shared by the CPU kernels that need many exps (the gated
// activations, the cross-entropy): expf() calls do not vectorise without -ffast-math, so exp is
// Cephes' expf written as plain arithmetic (range reduction by ln 2 rounding with the 1.5·2^23
// trick, a degree-6 polynomial, 2^n from the exponent bits; within 2 ulp of expf, the argument
// clamped to [-87, 88] where both ends only matter below 1e-37). Functions marked
// LORA_VECTOR_CLONES are compiled once per ISA level (target_clones picks at load time).
// Scalar 26 ns against 4 ns per element measured in /tmp on this machine at load 15.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
#define LORA_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORA_VECTOR_CLONES
#endif

namespace lora {

inline float exp_vec(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = x * 1.44269504088896341f + 12582912.0f;  // n = round(x/ln 2) in t's low bits
  const float n = t - 12582912.0f;
  int32_t tb;
  std::memcpy(&tb, &t, 4);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n·ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (tb - 0x4B400000 + 127) * (1 << 23);  // 2^n
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

}  // namespace lora
