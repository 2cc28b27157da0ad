// The AVX2+FMA level of the CPU attention kernel: the block routines of attention_kernels_impl.h
// compiled for AVX2 and FMA3. Chosen at run time by attention.cc; nothing here is visible outside
// but the table.
#include <cstdint>
#include <immintrin.h>

#include "attention_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#define LN_VL 8
#define LN_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define LN_SPLAT(x) _mm256_set1_ps(x)
// Tiles of 1..2 vectors: up to 12 ymm accumulators + the b vectors + 1 broadcast (of 16).
#define AT_NVMAX 2
#define AT_MR1 8
#define AT_MR2 6
#define AT_MR3 1
#define AT_MR4 1
#include "attention_kernels_impl.h"

namespace {
const lora::AttnIsa kTable = {"avx2", LN_VL, forward_block, backward_prepare, backward_keys};
}  // namespace

#pragma GCC pop_options

namespace lora {
const AttnIsa* attn_isa_avx2() { return &kTable; }
}  // namespace lora

#else
namespace lora {
const AttnIsa* attn_isa_avx2() { return nullptr; }
}  // namespace lora
#endif
