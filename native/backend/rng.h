// The counter-based random numbers lora-native's dropout uses: the value at (seed, index) is a pure
// function of both, so a kernel regenerates any mask element instead of storing the mask, and the
// CPU and CUDA backends draw the same masks. Not a cryptographic generator.
#pragma once

#include <cstdint>

// Functions both backends compile: host and device code under nvcc, plain inline elsewhere.
#if !defined(LORA_HD)
#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif
#endif

namespace lora {

// splitmix64's finaliser (Stafford's Mix13): a bijective mix with full avalanche, cheap on both
// CPU and GPU. Counter = seed-scrambled index.
LORA_HD uint64_t rng_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform float in [0, 1) with 24 random bits, for element `index` of stream `seed`.
LORA_HD float rng_uniform(uint64_t seed, uint64_t index) {
  uint64_t z = rng_mix(seed * 0x9E3779B97F4A7C15ull + index + 0x632BE59BD9B4E019ull);
  return (float)(z >> 40) * (1.0f / 16777216.0f);
}

// Dropout keeps element `index` with probability 1-p.
LORA_HD bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  return rng_uniform(seed, index) >= p;
}

}  // namespace lora
