// The CPU attention kernel's driver: argument checks, the blocking plan, the ISA level (the GEMM
// engine's, gemm_isa.h), and the threading. The arithmetic is in attention_kernels_impl.h,
// compiled per ISA (attention_avx512.cc, attention_avx2.cc, attention_generic.cc).
//
// Forward: one task per (batch, kv head, query block), heaviest (latest queries) first, handed out
// dynamically; a decode step with too few (batch, kv head) groups for the threads splits each
// group's keys into chunks instead and combines their softmax states (split_keys). Backward
// (FlashAttention-2's order): the query panels are packed once, then one task per (batch, kv head,
// key block) computes that block's dk, dv completely (no two tasks share a key) and adds its dq
// contributions to its thread's partial sums, which a last pass adds up.
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "attention_isa.h"
#include "cpu.h"
#include "gemm_isa.h"

namespace lora {
namespace {

constexpr int64_t kLanes = 96;     // query rows per block (6 AVX-512 vectors): K, V read once per 96 rows
constexpr int64_t kKeyBlock = 96;  // keys per block: a multiple of the tiles' 6, 8 and 12 rows
constexpr int64_t kMinParallelWork = int64_t(1) << 18;  // T·S·D·H below this: one thread
// The forward's threshold is lower: a decode step of one row reads its KV cache from memory, and two
// threads read it faster from ~150 keys on (SmolLM2's 9/3 heads, D 64, K and V cold, alternating
// processes: 144 keys 17 -> 16 µs, 256 keys 28-29 -> 22, 400 keys 40-42 -> 25-27; 96 keys the same)
constexpr int64_t kMinParallelForward = int64_t(1) << 15;

const AttnIsa& attn_isa() {
  static const AttnIsa& t = [] () -> const AttnIsa& {
    const CpuIsa isa = cpu_isa();
    if (isa == CpuIsa::Avx512 && attn_isa_avx512()) return *attn_isa_avx512();
    if (isa >= CpuIsa::Avx2 && attn_isa_avx2()) return *attn_isa_avx2();
    return *attn_isa_generic();
  }();
  return t;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The blocking for a call and its inputs (q, k, v and, for the backward, out and lse).
AttnPlan make_plan(const AttentionArgs& a, int vl, const float* q = nullptr, const float* k = nullptr,
                   const float* v = nullptr) {
  AttnPlan p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.a = a;
  // a window at least as long as the sequence hides nothing (and keeps positions in int32)
  if (p.a.window >= a.S) p.a.window = 0;
  p.G = a.KVH > 0 ? a.H / a.KVH : 1;
  p.tq = std::max<int64_t>(1, std::min<int64_t>(kLanes / std::max<int64_t>(p.G, 1), a.T));
  p.R = round_up(std::max<int64_t>(p.tq * p.G, 1), vl);
  p.Dp = round_up(a.D, vl);
  p.bc = kKeyBlock;
  p.nqb = (a.T + p.tq - 1) / p.tq;
  return p;
}

int threads_for(const AttentionArgs& a, int pool_size, int64_t min_work = kMinParallelWork) {
  const double work = double(a.B) * a.T * a.S * a.D * a.H;
  return work < double(min_work) ? 1 : pool_size;
}

// Scratch for one thread's block routines, kept between calls (first touch of fresh pages is
// slow on these machines) and grown on demand.
float* thread_scratch(int64_t floats) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float, Free> buf;
  thread_local int64_t cap = 0;
  if (cap < floats) {
    buf.reset(static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(round_up(floats * 4, 64)))));
    cap = buf ? floats : 0;
  }
  return buf.get();
}

// Runs fn(tid, i, scratch) for i in [0, n) on `threads` threads, handing indices out one at a
// time; each thread first gets its scratch and runs start(tid). False when a scratch allocation
// failed.
template <typename Fn, typename Start>
bool run_tasks(ThreadPool& pool, int threads, int64_t n, int64_t scratch_floats, Fn fn, Start start) {
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  auto body = [&](int tid, int) {
    float* scratch = scratch_floats > 0 ? thread_scratch(scratch_floats) : nullptr;
    if (scratch_floats > 0 && !scratch) {
      failed = true;
      return;
    }
    start(tid);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(tid, i, scratch);
  };
  if (threads <= 1) body(0, 1);
  else pool.run(body);
  return !failed;
}
template <typename Fn>
bool run_tasks(ThreadPool& pool, int threads, int64_t n, int64_t scratch_floats, Fn fn) {
  return run_tasks(pool, threads, n, scratch_floats, fn, [](int) {});
}

// A decode step (one query block per group) has B·KVH tasks, fewer than the threads or not enough
// to even them out (3 kv heads on 2 threads: one thread does two), and each reads its group's
// whole KV cache from memory. Splitting each group's keys into chunks (FlashDecoding's split-K)
// gives every thread a share: about kWantTasksPerThread tasks per thread, each chunk at least
// kMinChunkBlocks key blocks long. Returns the chunks per group; 1: no split.
constexpr int64_t kWantTasksPerThread = 2;
constexpr int64_t kMinChunkBlocks = 1;
int64_t key_chunks(const AttnPlan& p, int64_t groups, int threads) {
  if (threads <= 1 || p.nqb != 1 || groups <= 0 || groups >= kWantTasksPerThread * threads) return 1;
  const int64_t want = (kWantTasksPerThread * threads + groups - 1) / groups;
  const int64_t most = p.a.S / (kMinChunkBlocks * p.bc);
  return std::max<int64_t>(1, std::min(want, most));
}

// The forward of a step with one query block per group, each group's keys split into `chunks`
// ranges run as separate tasks, each writing its unnormalised state (m, l, o per row); then per
// row m = max m_i, l = Σ l_i·2^(m_i - m), out = Σ o_i·2^(m_i - m) / l, lse = (m + log2 l)·ln 2,
// as the single pass would end.
lora_status split_keys(ThreadPool& pool, int threads, const AttnPlan& p, int64_t groups, int64_t chunks,
                       const AttnIsa& isa) {
  const AttentionArgs& a = p.a;
  const int64_t span = (a.S + chunks - 1) / chunks, pf = p.part_floats();
  std::unique_ptr<float[]> parts(new (std::nothrow) float[static_cast<size_t>(groups * chunks * pf)]);
  if (!parts) return LORA_OUT_OF_MEMORY;
  const bool ok = run_tasks(pool, threads, groups * chunks, p.scratch_floats(), [&](int, int64_t i, float* scratch) {
    AttnPlan q = p;
    const int64_t g = i / chunks, c = i % chunks;
    q.kc0 = c * span;
    q.kc1 = std::min(a.S, (c + 1) * span);
    q.part = parts.get() + i * pf;
    isa.forward_block(q, g / a.KVH, g % a.KVH, 0, scratch);
  });
  if (!ok) return LORA_OUT_OF_MEMORY;
  constexpr float kLn2 = 0.6931471805599453f;
  const int64_t rows = a.T * p.G, D = a.D, row_floats = p.part_row_floats();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = g / a.KVH, kvh = g % a.KVH;
    const float* gp = parts.get() + g * chunks * pf;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / p.G, h = kvh * p.G + r % p.G;
      float* dst = p.out + ((b * a.T + t) * a.H + h) * D;
      std::fill(dst, dst + D, 0.0f);
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* st = gp + c * pf + r * row_floats;
        if (st[1] > 0.0f) m = std::max(m, st[0]);
      }
      if (m == -INFINITY) {  // no visible key in any chunk: out stays 0
        p.lse[(b * a.H + h) * a.T + t] = INFINITY;
        continue;
      }
      float l = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        const float* st = gp + c * pf + r * row_floats;
        if (!(st[1] > 0.0f)) continue;
        const float w = std::exp2(st[0] - m);
        l += st[1] * w;
        for (int64_t d = 0; d < D; ++d) dst[d] += st[2 + d] * w;
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      p.lse[(b * a.H + h) * a.T + t] = (m + std::log2(l)) * kLn2;
    }
  }
  return LORA_OK;
}

}  // namespace

lora_status cpu_attention_check(const AttentionArgs& a) {
  return attention_args_valid(a) ? LORA_OK : LORA_INVALID_ARGUMENT;
}

const char* cpu_attention_isa() { return attn_isa().name; }

lora_status cpu_attention(ThreadPool& pool, float* out, float* lse, const float* q, const float* k,
                     const float* v, const AttentionArgs& a) {
  const lora_status st = cpu_attention_check(a);
  if (st != LORA_OK) return st;
  if (a.B == 0 || a.T == 0 || a.H == 0) return LORA_OK;
  const AttnIsa& isa = attn_isa();
  AttnPlan p = make_plan(a, isa.vl, q, k, v);
  p.out = out;
  p.lse = lse;
  const int64_t groups = a.B * a.KVH;
  const int threads = threads_for(a, pool.size(), kMinParallelForward);
  const int64_t chunks = key_chunks(p, groups, threads);
  if (chunks > 1) return split_keys(pool, threads, p, groups, chunks, isa);
  const bool ok = run_tasks(pool, threads, groups * p.nqb, p.scratch_floats(),
                            [&](int, int64_t i, float* scratch) {
                              // heaviest first: under the causal rule later queries see more keys
                              const int64_t qb = p.nqb - 1 - i / groups, bk = i % groups;
                              isa.forward_block(p, bk / a.KVH, bk % a.KVH, qb * p.tq, scratch);
                            });
  return ok ? LORA_OK : LORA_OUT_OF_MEMORY;
}

size_t cpu_attention_backward_workspace(const AttentionArgs& a, int threads) {
  if (a.B <= 0 || a.H <= 0 || a.KVH <= 0 || a.T <= 0) return 0;
  const AttnPlan p = make_plan(a, attn_isa().vl);
  const int64_t panels = a.B * a.KVH * p.nqb * p.panel_floats();
  const int64_t nt = threads_for(a, threads);
  return static_cast<size_t>(panels + nt * p.dq_partial_floats()) * sizeof(float);
}

lora_status cpu_attention_backward(ThreadPool& pool, void* workspace, float* dq, float* dk, float* dv,
                              const float* dout, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, const AttentionArgs& a) {
  const lora_status st = cpu_attention_check(a);
  if (st != LORA_OK) return st;
  if (a.B == 0 || a.H == 0) return LORA_OK;
  const int64_t ld = a.KVH * a.D;
  if (a.T == 0) {  // no query sees any key: dk, dv are 0
    for (int64_t b = 0; b < a.B; ++b)
      for (int64_t j = 0; j < a.S; ++j) {
        std::memset(dk + b * a.kv_batch_stride + j * ld, 0, static_cast<size_t>(ld) * sizeof(float));
        std::memset(dv + b * a.kv_batch_stride + j * ld, 0, static_cast<size_t>(ld) * sizeof(float));
      }
    return LORA_OK;
  }
  if (!workspace) return LORA_INVALID_ARGUMENT;
  const AttnIsa& isa = attn_isa();
  AttnPlan p = make_plan(a, isa.vl, q, k, v);
  p.out_saved = out;
  p.lse_saved = lse;
  p.dout = dout;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.panels = static_cast<float*>(workspace);
  const int nt = threads_for(a, pool.size());
  const int64_t groups = a.B * a.KVH;
  float* partials = p.panels + groups * p.nqb * p.panel_floats();
  const int64_t part = p.dq_partial_floats();

  run_tasks(pool, nt, groups * p.nqb, 0, [&](int, int64_t i, float*) {
    isa.backward_prepare(p, i / p.nqb / a.KVH, (i / p.nqb) % a.KVH, i % p.nqb);
  });
  const int64_t nkb = (a.S + p.bc - 1) / p.bc;
  const bool ok = run_tasks(
      pool, nt, groups * nkb, p.scratch_floats(),
      [&](int tid, int64_t i, float* scratch) {
        // key block order: under the causal rule the first keys are seen by the most queries
        const int64_t kb = i / groups, bk = i % groups;
        isa.backward_keys(p, bk / a.KVH, bk % a.KVH, kb * p.bc, partials + tid * part, scratch);
      },
      // each thread's dq sums start at 0 (its tasks add)
      [&](int tid) { std::memset(partials + tid * part, 0, static_cast<size_t>(part) * sizeof(float)); });
  if (!ok) return LORA_OUT_OF_MEMORY;

  // dq = scale·Σ_threads partial, from the (b, kvh, qb, r, d) layout back to (b, t, h, d)
  const float scale = a.scale;
  const int64_t G = p.G, D = a.D, Dp = p.Dp, R = p.R;
  pool.parallel_for(a.B * a.T, std::max<int64_t>(1, 4096 / std::max<int64_t>(a.H * D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t bt = r0; bt < r1; ++bt) {
      const int64_t b = bt / a.T, t = bt % a.T, qb = t / p.tq, tl = t - qb * p.tq;
      for (int64_t h = 0; h < a.H; ++h) {
        const int64_t kvh = h / G, r = tl * G + h % G;
        const float* src = partials + (((b * a.KVH + kvh) * p.nqb + qb) * R + r) * Dp;
        float* dst = dq + (bt * a.H + h) * D;
        // thread by thread over the row (the same sums, in the same order, as a sum per element
        // over the threads; loops the compiler vectorizes: the per-element form was 6% of a
        // training-shape backward)
        for (int64_t d = 0; d < D; ++d) dst[d] = 0.0f + src[d];
        for (int th = 1; th < nt; ++th) {
          const float* part_th = src + th * part;
          for (int64_t d = 0; d < D; ++d) dst[d] += part_th[d];
        }
        for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
      }
    }
  });
  return LORA_OK;
}

namespace {

// The table entries (native/backend/backend.h): the flat parameters gathered into AttentionArgs.
lora_status attention(lora_backend* be, float* out, float* lse, const float* q, const float* k, const float* v,
                      const int32_t* key_mask, int64_t key_mask_stride, const int32_t* segment_ids,
                      int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax, int64_t H,
                      int64_t KVH, int64_t D, float scale, bool causal, int64_t window) {
  const AttentionArgs a = attention_args(key_mask, key_mask_stride, segment_ids, segment_stride, B, T, S, Smax, H,
                                         KVH, D, scale, causal, window);
  return cpu_attention(cpu_pool(be), out, lse, q, k, v, a);
}

lora_status attention_backward(lora_backend* be, float* dq, float* dk, float* dv, const float* dout, const float* q,
                               const float* k, const float* v, const float* out, const float* lse,
                               const int32_t* key_mask, int64_t key_mask_stride, const int32_t* segment_ids,
                               int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax, int64_t H,
                               int64_t KVH, int64_t D, float scale, bool causal, int64_t window) {
  const AttentionArgs a = attention_args(key_mask, key_mask_stride, segment_ids, segment_stride, B, T, S, Smax, H,
                                         KVH, D, scale, causal, window);
  if (!attention_args_valid(a)) return LORA_INVALID_ARGUMENT;
  ThreadPool& pool = cpu_pool(be);
  const size_t bytes = cpu_attention_backward_workspace(a, pool.size());
  void* ws = bytes ? be->alloc(be, bytes) : nullptr;
  if (bytes && !ws) return LORA_OUT_OF_MEMORY;
  const lora_status st = cpu_attention_backward(pool, ws, dq, dk, dv, dout, q, k, v, out, lse, a);
  if (ws) be->free(be, ws, bytes);
  return st;
}

}  // namespace

void cpu_register_attention(lora_backend& t) {
  t.attention = attention;
  t.attention_backward = attention_backward;
}

}  // namespace lora
