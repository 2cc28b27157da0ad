// The CPU backend: the lora_backend table (native/backend/backend.h) over host memory, a
// size-bucketed caching allocator and a persistent thread pool. One instance per addon instance
// (worker threads get their own). Each source file of this folder fills in the entries of its own
// kernels (cpu_register_*), so an op's CPU kernel and its table entry sit together.
#pragma once

#include <cstdint>

#include "../backend/backend.h"
#include "thread_pool.h"

namespace lora {

constexpr int64_t kGrain = 1 << 15;  // elements worth waking a second thread for

// The new backend with `threads` workers; destroy it through its table (be->destroy(be)).
lora_backend* cpu_backend_create(int threads);
// The backend's thread pool (every CPU kernel runs on it; setNumThreads resizes it).
ThreadPool& cpu_pool(lora_backend* be);

void cpu_register_elementwise(lora_backend& t);  // elementwise.cc: binary, unary, reduce, copies, ...
void cpu_register_linalg(lora_backend& t);       // linalg.cc: gemm, gemm_bf16
void cpu_register_lora(lora_backend& t);         // lora_kernels.cc
void cpu_register_optim(lora_backend& t);        // optim.cc
void cpu_register_nn(lora_backend& t);           // nn_kernels.cc
void cpu_register_attention(lora_backend& t);    // attention.cc

}  // namespace lora
