// The per-ISA block routines of the CPU attention kernel (attention_kernels_impl.h compiled once per
// instruction-set level) and the plan they share with the ISA-neutral driver in attention.cc
// (threads, work lists, workspace). Not a public header: the backend calls attention.h.
#pragma once

#include <cstdint>

#include "../backend/attention.h"
#include "../backend/backend.h"

namespace lora {

// One call's problem and blocking. Query rows are blocked per (batch b, kv head kvh): a block holds
// tq consecutive query positions for all G = H/KVH query heads of that kv head, as rows
// r = t·G + g (t the position in the block, g the head in the group), padded to R lanes (a
// multiple of the vector length): the heads sharing K and V go through the products together.
// Score tiles are kept transposed, keys as rows and query rows as vector lanes (S' = K·Qᵀ), so the
// softmax statistics are lane-wise and need no horizontal reductions.
struct AttnPlan {
  AttentionArgs a;
  int64_t G = 0;    // query heads per kv head
  int64_t tq = 0;   // query positions per block
  int64_t R = 0;    // lanes of a full block: tq·G rounded up to the vector length
  int64_t Dp = 0;   // D rounded up to the vector length (row length of the local D-wide buffers)
  int64_t bc = 0;   // keys per block
  int64_t nqb = 0;  // query blocks per (b, kvh): ceil(T / tq)
  // forward
  const float *q = nullptr, *k = nullptr, *v = nullptr;
  float *out = nullptr, *lse = nullptr;
  // forward over keys [kc0, kc1) only, its unnormalised state written to part instead of out and
  // lse: per row of the block part_row_floats() floats, m (log2 units), l, then Dp floats of o.
  // The driver splits a decode step's keys between threads this way and combines the parts.
  int64_t kc0 = 0, kc1 = INT64_MAX;
  float* part = nullptr;
  int64_t part_row_floats() const { return Dp + 2; }
  int64_t part_floats() const { return R * part_row_floats(); }
  // backward (out and lse are the forward's, read only)
  const float *dout = nullptr, *out_saved = nullptr, *lse_saved = nullptr;
  float *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* panels = nullptr;  // per (b, kvh, query block): panel_floats() floats (backward_prepare)

  int64_t panel_floats() const { return 2 * D() * R + 2 * R * Dp + 4 * R; }
  float* panel(int64_t b, int64_t kvh, int64_t qb) const {
    return panels + ((b * a.KVH + kvh) * nqb + qb) * panel_floats();
  }
  int64_t D() const { return a.D; }
  // Floats of one thread's dq partial sums: (B, KVH, nqb, R, Dp).
  int64_t dq_partial_floats() const { return a.B * a.KVH * nqb * R * Dp; }
  // Floats of scratch one thread needs for forward_block or backward_keys.
  int64_t scratch_floats() const { return 2 * bc * R + R * Dp + bc * Dp * 3 + D() * R + 8 * R + 64; }
};

struct AttnIsa {
  const char* name;
  int vl;  // floats per vector
  // Queries [t0, t0 + tq) of (b, kvh): out and lse rows, one pass over the visible keys.
  void (*forward_block)(const AttnPlan& p, int64_t b, int64_t kvh, int64_t t0, float* scratch);
  // Packs the panels of query block qb of (b, kvh) for the backward: q (scaled, transposed and
  // plain), dout (transposed and plain), lse, δ = rowsum(dout ⊙ out), positions and segments.
  void (*backward_prepare)(const AttnPlan& p, int64_t b, int64_t kvh, int64_t qb);
  // Keys [j0, j0 + bc) of (b, kvh): dk, dv rows written, dq contributions added to dq_partial
  // (this thread's (B, KVH, nqb, R, Dp) sums, unscaled).
  void (*backward_keys)(const AttnPlan& p, int64_t b, int64_t kvh, int64_t j0, float* dq_partial,
                        float* scratch);
};

const AttnIsa* attn_isa_generic();
const AttnIsa* attn_isa_avx2();    // nullptr when the compiler could not build it
const AttnIsa* attn_isa_avx512();  // nullptr when the compiler could not build it

}  // namespace lora
