// The CPU backend's table, memory and lifetime: a caching allocator so that training steps reuse
// buffers instead of touching fresh pages (BUILD.md: first touch costs 7-50 µs per 4 KiB page
// here), host copies, and the assembly of the kernel entries each file of native/cpu/ registers.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu.h"

namespace lora {
namespace {

constexpr size_t kAlign = 64;                       // a cache line; also AVX-512 alignment
// Freed blocks are cached up to the most bytes ever live at once (at least 1 GiB): a training step
// that repeats the previous one's allocations finds every block in the cache. With a fixed 1 GiB
// cap, a step holding 3 GB of activations handed 2 GB back to the system at its end and faulted it
// in again in the next step (~0.5 M pages at 7-50 µs each).
constexpr size_t kMinCacheLimit = size_t(1) << 30;

// Rounds a request up to its bucket: 64-byte steps below 1 MiB, then 1/8 steps of the power of
// two above it, so a reused block wastes at most 12.5%.
size_t bucket_size(size_t bytes) {
  if (bytes == 0) bytes = 1;
  if (bytes < (size_t(1) << 20)) return (bytes + kAlign - 1) & ~(kAlign - 1);
  size_t p = size_t(1) << (63 - __builtin_clzll(bytes));
  size_t step = p / 8;
  return (bytes + step - 1) / step * step;
}

// Fresh memory for a block of `size` bytes. From one huge page on, aligned to a huge page and
// marked for transparent huge pages where the kernel offers them (Linux with THP "madvise" or
// "always"; "never" ignores the advice): first touch faults in 2 MiB at a time rather than 4 KiB.
// On the Zen 5 VM a 256 MiB buffer took 300-580 ms to first touch against 710-970, and the first
// LoRA training step on SmolLM2 (4 x 256 tokens, 2 threads) 4.7-6.1 s against 6.2-7.7 with fp32
// weights, 4.0-4.2 against 5.6 with bf16 (later steps even to 4% faster; peak RSS the same). The advice covers the block's own bytes, so only
// whole 2 MiB ranges inside it can become huge pages: the rounding past its end is never resident.
constexpr size_t kHugePage = size_t(2) << 20;
void* fresh(size_t size) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (size >= kHugePage) {
    void* p = std::aligned_alloc(kHugePage, (size + kHugePage - 1) / kHugePage * kHugePage);
    if (p) madvise(p, size, MADV_HUGEPAGE);  // advice only: a refusal leaves 4 KiB pages
    return p;
  }
#endif
  return std::aligned_alloc(kAlign, size);
}

class CachingAllocator {
 public:
  ~CachingAllocator() { release(); }
  void* alloc(size_t bytes) {
    const size_t size = bucket_size(bytes);
    auto it = free_.find(size);
    if (it != free_.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      cached_ -= size;
      live_ += size;
      peak_live_ = std::max(peak_live_, live_);
      return p;
    }
    void* p = fresh(size);
    if (!p) {
      release();  // give the cache back and try once more
      p = fresh(size);
      if (!p) return nullptr;
    }
    live_ += size;
    peak_live_ = std::max(peak_live_, live_);
    return p;
  }
  void free(void* p, size_t bytes) {
    if (!p) return;
    const size_t size = bucket_size(bytes);
    live_ -= size;
    if (cached_ + size > std::max(kMinCacheLimit, peak_live_)) {
      std::free(p);
      return;
    }
    free_[size].push_back(p);
    cached_ += size;
  }
  void release() {
    for (auto& kv : free_)
      for (void* p : kv.second) std::free(p);
    free_.clear();
    cached_ = 0;
    peak_live_ = live_;  // releaseCachedMemory() also lowers the cap to what is live now
  }
  size_t cached() const { return cached_; }
  size_t live() const { return live_; }

 private:
  std::map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0, live_ = 0, peak_live_ = 0;
};

struct CpuContext {
  explicit CpuContext(int threads) : pool(threads) {}
  ThreadPool pool;
  CachingAllocator alloc;
};

CpuContext& ctx(lora_backend* be) { return *static_cast<CpuContext*>(be->ctx); }

void destroy(lora_backend* be) {
  delete static_cast<CpuContext*>(be->ctx);
  delete be;
}

const char* last_error(lora_backend*) { return ""; }
bool unusable(lora_backend*) { return false; }

// Every entry computes in fp32; the weight-reading ones (LoRA kernels, gemm's B) also read bf16,
// the embedding lookup bf16 and f16 tables.
bool supports(lora_backend* be, int32_t op, int32_t dtype) {
  switch (op) {
    case LORA_OP_EMBEDDING: return dtype == LORA_F32 || dtype == LORA_BF16 || dtype == LORA_F16;
    case LORA_OP_LORA_FORWARD: case LORA_OP_LORA_BACKWARD: case LORA_OP_LORA_MERGE:
      return dtype == LORA_F32 || dtype == LORA_BF16;
    case LORA_OP_GEMM: return dtype == LORA_F32 ? be->gemm != nullptr : dtype == LORA_BF16 && be->gemm_bf16 != nullptr;
    case LORA_OP_GEMM_SHARED_A: return (dtype == LORA_F32 || dtype == LORA_BF16) && be->gemm_shared_a != nullptr;
    case LORA_OP_CONVERT: return dtype != LORA_I32;
    default: return op >= 0 && op < LORA_OP_COUNT && dtype == LORA_F32;
  }
}

void* alloc(lora_backend* be, size_t bytes) { return ctx(be).alloc.alloc(bytes); }
void free_block(lora_backend* be, void* ptr, size_t bytes) { ctx(be).alloc.free(ptr, bytes); }
size_t cached_bytes(lora_backend* be) { return ctx(be).alloc.cached(); }
void release_cached(lora_backend* be) { ctx(be).alloc.release(); }

lora_status copy_bytes(lora_backend*, void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
  return LORA_OK;
}

}  // namespace

ThreadPool& cpu_pool(lora_backend* be) { return ctx(be).pool; }

lora_backend* cpu_backend_create(int threads) {
  auto* t = new lora_backend();  // value-initialised: every entry starts null
  t->abi_version = LORA_BACKEND_ABI_VERSION;
  t->struct_size = sizeof(lora_backend);
  t->name = "cpu";
  t->ctx = new CpuContext(threads);
  t->destroy = destroy;
  t->last_error = last_error;
  t->unusable = unusable;
  t->supports = supports;
  t->alloc = alloc;
  t->free = free_block;
  t->upload = copy_bytes;  // host memory both sides: a copy
  t->download = copy_bytes;
  t->copy = copy_bytes;
  t->cached_bytes = cached_bytes;
  t->release_cached = release_cached;
  cpu_register_elementwise(*t);
  cpu_register_linalg(*t);
  cpu_register_lora(*t);
  cpu_register_optim(*t);
  cpu_register_nn(*t);
  cpu_register_attention(*t);
  return t;
}

}  // namespace lora
