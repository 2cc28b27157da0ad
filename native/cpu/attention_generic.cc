// The portable level of the CPU attention kernel: the block routines of attention_kernels_impl.h
// with 4-wide vector extensions (SSE2 on x86-64, NEON elsewhere), no FMA. The fallback every CPU
// runs.
#include <cstdint>

#include "attention_isa.h"

#define LN_VL 4
#define LN_FMA(a, b, c) ((a) * (b) + (c))
#define LN_SPLAT(x) (vf{(x), (x), (x), (x)})
// Tiles of 1..2 vectors: 8 xmm accumulators + the b vectors + a broadcast and a product (of 16).
#define AT_NVMAX 2
#define AT_MR1 6
#define AT_MR2 4
#define AT_MR3 1
#define AT_MR4 1
#include "attention_kernels_impl.h"

namespace {
const lora::AttnIsa kTable = {"generic", LN_VL, forward_block, backward_prepare, backward_keys};
}  // namespace

namespace lora {
const AttnIsa* attn_isa_generic() { return &kTable; }
}  // namespace lora
