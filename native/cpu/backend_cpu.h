// The CPU backend: lora::Backend over host memory, a size-bucketed caching allocator and a
// persistent thread pool. One instance per addon instance (worker threads get their own).
#pragma once

#include <memory>

#include "../backend.h"
#include "thread_pool.h"

namespace lora {

class CpuBackendBase : public Backend {
 public:
  virtual ThreadPool& pool() = 0;
  // Bytes currently handed out by the allocator.
  virtual size_t live_bytes() const = 0;
};

std::unique_ptr<CpuBackendBase> make_cpu_backend(int threads);

}  // namespace lora
