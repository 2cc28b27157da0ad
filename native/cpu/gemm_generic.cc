// The portable level of the GEMM engine: the shared leaf routines (gemm_kernels_impl.h) with
// 4-wide vector extensions (SSE2 on x86-64, NEON elsewhere), no FMA. The fallback every CPU runs.
#include <cstdint>

#include "../backend/rng.h"
#include "gemm_isa.h"

#define LN_VL 4
#define LN_FMA(a, b, c) ((a) * (b) + (c))
#define LN_SPLAT(x) (vf{(x), (x), (x), (x)})
#define LN_HSUM(v) (((v)[0] + (v)[2]) + ((v)[1] + (v)[3]))
#if defined(__x86_64__) && defined(__GNUC__)
#define LN_KEEP(v) __asm__("" : "+x"(v))
#endif
#include "gemm_kernels_impl.h"

namespace {

// 4 x 8: 8 xmm accumulators + 2 for b + 1 broadcast (of 16 registers).
constexpr int kWideMr = 4, kWideNv = 2;
constexpr int kNarrowMr = 8, kNarrowNv = 1;
constexpr int kShortMr = 4, kShortNv = 2;

const lora::IsaTable kTable = {
    "generic",
    fp32_kernel<kWideMr, kWideNv>(),
    fp32_kernel<kNarrowMr, kNarrowNv>(),
    fp32_kernel<kShortMr, kShortNv>(),
    pack_a,
    pack_b,
    8,  // small_rows: 8-16 accumulators of 16 registers
    small_m,
    {0, 0, nullptr, 0, nullptr, nullptr},
    nullptr,
    nullptr,
    micro_kernel_bf16_out<kWideMr, kWideNv>,
    nullptr,  // no FMA at this level
    nullptr,  // no bf16 dot product at this level
    reduce_k,
    side_panel,
    side_rows,
};

}  // namespace

namespace lora {
const IsaTable* isa_table_generic() { return &kTable; }
}  // namespace lora
