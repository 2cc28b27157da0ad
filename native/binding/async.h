// Async kernels: a job run on libuv's thread pool that settles a promise. The worker holds the
// Blocks the job uses, so dispose() (or the garbage collector) during the op cannot free memory
// under it. The job runs under the addon's mutex; a kernel that throws std::bad_alloc fails with
// LORA_OUT_OF_MEMORY instead of crossing into libuv.
#pragma once

#include <napi.h>

#include <functional>
#include <memory>
#include <vector>

#include "addon.h"

namespace lora {
namespace binding {

using Job = std::function<lora_status()>;
// The value the promise resolves with (undefined when not given), made on the main thread.
using Result = std::function<Napi::Value(Napi::Env)>;

Napi::Promise queue_kernel(Napi::Env env, const char* op, lora_backend* be,
                           std::vector<std::shared_ptr<Block>> blocks, Job job, Result result = nullptr);

}  // namespace binding
}  // namespace lora
