// The AVX-512 level of the CPU attention kernel: the block routines of attention_kernels_impl.h
// compiled for AVX-512F/BW/VL/DQ. Chosen at run time by attention.cc (with the GEMM engine's
// ISA level, gemm_isa.h); nothing here is visible outside but the table.
#include <cstdint>
#include <immintrin.h>

#include "attention_isa.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx2,bmi2")

#define LN_VL 16
#define LN_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define LN_SPLAT(x) _mm512_set1_ps(x)
// Tiles of 1..4 vectors: up to 24 zmm accumulators + the b vectors + 1 broadcast (of 32).
#define AT_NVMAX 4
#define AT_MR1 12
#define AT_MR2 12
#define AT_MR3 8
#define AT_MR4 6
#include "attention_kernels_impl.h"

namespace {
const lora::AttnIsa kTable = {"avx512", LN_VL, forward_block, backward_prepare, backward_keys};
}  // namespace

#pragma GCC pop_options

namespace lora {
const AttnIsa* attn_isa_avx512() { return &kTable; }
}  // namespace lora

#else
namespace lora {
const AttnIsa* attn_isa_avx512() { return nullptr; }
}  // namespace lora
#endif
