// The CPU LoRA kernels (lora_forward, lora_backward, lora_merge of native/backend/backend.h), fused into the GEMM engine (gemm_fused.h): the adapter's
// product rides in the base GEMM's tile epilogue, dropout masks are regenerated from the counter
// RNG inside packing/epilogues (never stored), and no temporary is the size of W or of x. They are
// not a general autograd: W and b are frozen here.
//
//   h = x̃·Aᵀ;  y = x·Wᵀ + b + s·h·Bᵀ           (x̃ = dropout(x), mask index row*C + col of x)
//   dB += s·dyᵀ·h;  dh = s·dy·B;  dA += dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
#include <cstring>
#include <vector>

#include "../backend/rng.h"
#include "cpu.h"
#include "gemm.h"
#include "gemm_fused.h"

namespace lora {
namespace {

bool supported(lora_dtype t) { return t == LORA_F32 || t == LORA_BF16; }

DropoutMask make_mask(float p, uint64_t seed, int64_t ld) {
  DropoutMask d;
  d.p = p;
  d.scale = 1.0f / (1.0f - p);
  d.seed = seed;
  d.ld = ld;
  return d;
}

// Rows of dy up to which dB is one product into dB itself (dyᵀ packed: a few rows of it).
constexpr int64_t kDirectDbRows = 16;

// Per-thread scratch reused across calls (dh and dBᵀ are small: N·R, R·OC).
float* scratch(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

lora_status lora_forward(lora_backend* be, float* y, float* h, const float* x, const void* W,
                         lora_dtype w_dtype, const float* b, const float* A, const float* B,
                         int64_t N, int64_t C, int64_t OC, int64_t R, float s, float dropout_p,
                         uint64_t seed) {
  if (!supported(w_dtype)) return LORA_UNSUPPORTED;
  ThreadPool& pool = cpu_pool(be);
  const DropoutMask mask = make_mask(dropout_p, seed, C);
  const bool drop = dropout_p > 0.0f;

  // y = x·Wᵀ with b + s·h·Bᵀ accumulated into each tile in the last k block (y written once),
  // and h = x̃·Aᵀ computed from the same packed blocks of x (a masked copy of each block under
  // dropout), finished for a row block before its epilogue: x is read once.
  GemmArgs yg;
  yg.trans_b = true;
  yg.M = N; yg.N = OC; yg.K = C;
  yg.A = x; yg.lda = C;
  yg.B = W; yg.b_bf16 = w_dtype == LORA_BF16; yg.ldb = C;
  yg.C = y; yg.ldc = OC;
  yg.A2 = h; yg.lda2 = R;
  yg.B2 = B; yg.ldb2 = R; yg.trans_b2 = true;  // op(B2) = Bᵀ (R, OC)
  yg.K2 = R; yg.alpha2 = s;
  yg.bias = b;
  yg.HB = A; yg.ldhb = C; yg.trans_hb = true;  // op(HB) = Aᵀ (C, R)
  yg.NH = R;
  yg.H = h; yg.ldh = R;
  yg.drop_h = drop ? &mask : nullptr;
  gemm_ex(pool, yg);
  return LORA_OK;
}

lora_status lora_backward(lora_backend* be, float* dx, float* dA, float* dB, const float* dy,
                          const float* x, const float* h, const void* W, lora_dtype w_dtype,
                          const float* A, const float* B, int64_t N, int64_t C, int64_t OC,
                          int64_t R, float s, float dropout_p, uint64_t seed) {
  if (!supported(w_dtype)) return LORA_UNSUPPORTED;
  ThreadPool& pool = cpu_pool(be);
  const DropoutMask mask = make_mask(dropout_p, seed, C);
  const bool drop = dropout_p > 0.0f;
  static thread_local std::vector<float> dh_buf;

  // dB += s·dyᵀ·h: with dx (past a few rows), the dx GEMM's side product D (below: from its blocks
  // of dy at ranks 9-16); otherwise dBᵀ (R, OC) = s·hᵀ·dy, dy read in place row by row, added into dB.
  if (dB && R > 0 && OC > 0 && N <= kDirectDbRows) {
    // a few rows (decode-sized steps): dB += s·dyᵀ·h straight into dB, without dBᵀ's R x OC
    // scratch and its transpose (1 x 4096 x 4096 r16, 2 threads: dB 100 -> 30 us)
    sgemm(pool, true, false, OC, R, N, s, dy, OC, h, R, 1.0f, dB, R);
  } else if (dB && R > 0 && OC > 0 && !dx) {
    // without dx, a GEMM of no columns carries it: the side product D alone (dBᵀ = s·hᵀ·dy with dy
    // read in place, added into dB)
    GemmArgs bg;
    bg.M = N; bg.N = 0; bg.K = OC;
    bg.A = dy; bg.lda = OC;
    bg.D = dB; bg.ldd = R;
    bg.TD = h; bg.ldtd = R;
    bg.ND = R; bg.alpha_d = s;
    gemm_ex(pool, bg);
  }
  if (!dA && !dx) return LORA_OK;

  // dh = s·dy·B (N, R): with dx, from the same packed blocks of dy as dy·W (one pass over dy);
  // alone, the narrow path with B (OC, R) read in place.
  float* dh = scratch(dh_buf, static_cast<size_t>(N * R > 0 ? N * R : 1));
  if (!dx) sgemm(pool, false, false, N, R, OC, s, dy, OC, B, R, 0.0f, dh, R);

  // dx = dy·W + dropout'(dh·A): the adapter term accumulated in the tile epilogue (masked there
  // when dropout is on), so dx is written once; dh = s·dy·B rides along and is finished for each
  // row block before that block's epilogue reads it.
  if (dx) {
    GemmArgs xg;
    xg.M = N; xg.N = C; xg.K = OC;
    xg.A = dy; xg.lda = OC;
    xg.B = W; xg.b_bf16 = w_dtype == LORA_BF16; xg.ldb = C;
    xg.C = dx; xg.ldc = C;
    xg.A2 = dh; xg.lda2 = R;
    xg.B2 = A; xg.ldb2 = C;  // op(B2) = A (R, C)
    xg.K2 = R;
    xg.drop2 = drop ? &mask : nullptr;
    xg.HB = B; xg.ldhb = R;  // op(HB) = B (OC, R)
    xg.NH = R; xg.alpha_h = s;
    xg.H = dh; xg.ldh = R;
    if (dB && R > 0 && N > kDirectDbRows) {
      // dB += s·dyᵀ·h from the same packed blocks of dy (or, on the paths that cannot, as its own
      // product first, dBᵀ = s·hᵀ·dy with dy read in place)
      xg.D = dB; xg.ldd = R;
      xg.TD = h; xg.ldtd = R;
      xg.ND = R; xg.alpha_d = s;
    }
    gemm_ex(pool, xg);
  }

  // dA += dhᵀ·x̃: x read in place (rank rows of C), or packed with its mask regenerated.
  if (dA) {
    GemmArgs ag;
    ag.trans_a = true;
    ag.M = R; ag.N = C; ag.K = N;
    ag.A = dh; ag.lda = R;
    ag.B = x; ag.ldb = C;
    ag.beta = 1.0f;
    ag.C = dA; ag.ldc = C;
    ag.drop_b = drop ? &mask : nullptr;
    gemm_ex(pool, ag);
  }
  return LORA_OK;
}

lora_status lora_merge(lora_backend* be, void* W, lora_dtype w_dtype, const float* A,
                       const float* B, int64_t OC, int64_t C, int64_t R, float s) {
  ThreadPool& pool = cpu_pool(be);
  if (w_dtype == LORA_F32) {
    sgemm(pool, false, false, OC, C, R, s, B, R, A, C, 1.0f, static_cast<float*>(W), C);
    return LORA_OK;
  }
  if (w_dtype != LORA_BF16) return LORA_UNSUPPORTED;
  // BF16: W tile by tile widened, += s·B·A in fp32 and rounded once (nearest-even) in the GEMM
  // micro-kernel's epilogue, so W is read and written once.
  sgemm_bf16_update(pool, OC, C, R, s, B, R, A, C, static_cast<uint16_t*>(W), C);
  return LORA_OK;
}

}  // namespace

void cpu_register_lora(lora_backend& t) {
  t.lora_forward = lora_forward;
  t.lora_backward = lora_backward;
  t.lora_merge = lora_merge;
}

}  // namespace lora
