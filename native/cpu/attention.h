// The CPU attention kernel (FlashAttention-2 style, forward and backward, GQA, masks): the math and
// the arguments are Backend::attention's in native/backend.h. The backward needs a workspace of
// cpu_attention_backward_workspace() bytes from the caller (the backend's caching allocator).
#pragma once

#include <cstddef>

#include "../backend.h"
#include "thread_pool.h"

namespace lora {

// InvalidArgument unless attention_args_valid(a) (backend.h); Ok for an empty problem.
Status cpu_attention_check(const AttentionArgs& a);
// The ISA level the kernel runs at ("avx512", "avx2", "generic"), for the harness and the bench.
const char* cpu_attention_isa();

Status cpu_attention(ThreadPool& pool, float* out, float* lse, const float* q, const float* k,
                     const float* v, const AttentionArgs& a);
size_t cpu_attention_backward_workspace(const AttentionArgs& a, int threads);
Status cpu_attention_backward(ThreadPool& pool, void* workspace, float* dq, float* dk, float* dv,
                              const float* dout, const float* q, const float* k, const float* v,
                              const float* out, const float* lse, const AttentionArgs& a);

}  // namespace lora
