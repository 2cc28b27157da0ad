// The addon's shared core: per-instance state (the backends, live-memory counts, the lock), the
// Storage class behind every tensor, and the one place a lora_status becomes a JS exception.
// Every binding file includes it; none of it knows any particular kernel.
//
// Threads: the CPU backend's allocator and thread pool serve one caller at a time, so every
// binding call and every async op holds the addon's mutex while it touches a backend. An async
// op holds a reference to the memory it uses: dispose() during the op marks the tensor disposed
// at once and the memory is freed when the op completes.
#pragma once

#include <napi.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "../backend/backend.h"
#include "cuda_loader.h"

namespace lora {
namespace binding {

enum Device : int32_t { kCpu = 0, kCuda = 1, kDeviceCount };

// Per-addon-instance state, shared by every Storage through a shared_ptr so that whichever of
// the addon's teardown or the last tensor's finalizer runs last frees the backends.
struct AddonState {
  lora_backend* cpu = nullptr;
  CudaState cuda;
  std::string addon_dir;   // the folder holding the .node file (liblora_cuda.so sits beside it)
  std::string addon_path;  // the .node file itself
  int64_t live_storages[kDeviceCount] = {0, 0};
  int64_t live_bytes[kDeviceCount] = {0, 0};
  // the most live_bytes held at once since the addon loaded or resetPeakMemory() (memory().peakBytes)
  int64_t peak_bytes[kDeviceCount] = {0, 0};
  // Held by every binding call and async op while it uses a backend; recursive because a
  // finalizer may free memory during a call that already holds it.
  std::recursive_mutex mu;
  ~AddonState();
};

struct InstanceData {
  std::shared_ptr<AddonState> state;
  Napi::FunctionReference storage_ctor;
  Napi::FunctionReference error_ctor;  // lib/errors.ts LoraError(code, message)
};

InstanceData& data_of(Napi::Env env);

// A LoraError (or, before setErrorClass, an Error with a code) for JS.
Napi::Value make_lora_error(Napi::Env env, const char* code, const std::string& message);
[[noreturn]] void throw_lora(Napi::Env env, const char* code, const std::string& message);

// The JS error code and message for a failed kernel; check_status throws them unless s is LORA_OK.
const char* status_code(lora_status s);
std::string status_message(lora_backend* be, const char* op, lora_status s, const std::string& detail);
void check_status(Napi::Env env, lora_status s, lora_backend* be, const char* op);

// The backend of a device id; loads the CUDA library on first use. ERR_LORA_NO_CUDA says why not.
lora_backend* backend_for(Napi::Env env, AddonState& st, int32_t device);

// One allocation. Shared between its Storage and any async op using it; the last owner frees it
// (under the addon's mutex: an async op may be using the allocator on another thread).
struct Block {
  Block(std::shared_ptr<AddonState> st, lora_backend* b, int32_t dev, size_t n, void* p);
  ~Block();
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
  std::shared_ptr<AddonState> state;
  lora_backend* backend;
  int32_t device;
  size_t bytes;
  void* ptr;
};

// Native memory behind one tensor. JS never sees the pointer; data moves only by copy.
class Storage : public Napi::ObjectWrap<Storage> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit Storage(const Napi::CallbackInfo& info);
  ~Storage() override { release(); }

  void init(std::shared_ptr<AddonState> state, lora_backend* backend, int32_t device,
            lora_dtype dtype, int64_t numel, void* ptr);
  // Drops this storage's hold on the memory (idempotent): freed now, or when the last async op
  // using it completes. Finalizers call this too: it touches no JS.
  void release();
  size_t bytes() const { return static_cast<size_t>(numel_) * lora_dtype_size(dtype_); }

  std::shared_ptr<Block> block_;
  lora_backend* backend_ = nullptr;
  int32_t device_ = kCpu;
  lora_dtype dtype_ = LORA_F32;
  int64_t numel_ = 0;
  void* ptr_ = nullptr;
  bool disposed_ = false;

 private:
  Napi::Value GetNumel(const Napi::CallbackInfo& info);
  Napi::Value GetDtype(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
};

// Distinguishes our Storage objects from anything else a caller might pass.
extern const napi_type_tag kStorageTag;

// A new storage of numel elements on a device (memory not initialised).
Napi::Object make_storage(Napi::Env env, int32_t device, lora_dtype dtype, int64_t numel);

}  // namespace binding
}  // namespace lora
