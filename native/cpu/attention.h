// The CPU attention kernel (FlashAttention-2 style, forward and backward, GQA, masks): the math is
// lora_backend::attention's in native/backend/backend.h, the arguments native/backend/attention.h's.
// The backward needs a workspace of cpu_attention_backward_workspace() bytes from the caller (the
// table entry takes it from the backend's caching allocator). The dev harness calls these directly.
#pragma once

#include <cstddef>

#include "../backend/attention.h"
#include "../backend/backend.h"
#include "thread_pool.h"

namespace lora {

// LORA_INVALID_ARGUMENT unless attention_args_valid(a) (native/backend/attention.h); Ok for an empty problem.
lora_status cpu_attention_check(const AttentionArgs& a);
// The ISA level the kernel runs at ("avx512", "avx2", "generic"), for the harness and the bench.
const char* cpu_attention_isa();

lora_status cpu_attention(ThreadPool& pool, float* out, float* lse, const float* q, const float* k,
                     const float* v, const AttentionArgs& a);
size_t cpu_attention_backward_workspace(const AttentionArgs& a, int threads);
lora_status cpu_attention_backward(ThreadPool& pool, void* workspace, float* dq, float* dk, float* dv,
                              const float* dout, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, const AttentionArgs& a);

}  // namespace lora
