// The binding's memory and machine functions: allocate and dispose storages, live-memory counts,
// the allocator caches, CPU threads, and features() (what this binary and machine can do).
#include <cstdlib>
#include <thread>

#include "../cpu/cpu.h"
#include "../cpu/gemm_isa.h"
#include "args.h"

namespace lora {
namespace binding {
namespace {

Napi::Value Alloc(const Napi::CallbackInfo& info) {
  return make_storage(info.Env(), device_arg(info, 0), dtype_arg(info, 1), size_arg(info, 2, "numel"));
}

Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Value v = info[0];
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
    throw_lora(info.Env(), "ERR_LORA_TYPE", "Expected a tensor storage");
  Storage::Unwrap(v.As<Napi::Object>())->release();
  return info.Env().Undefined();
}

size_t cached(lora_backend* be) { return be && be->cached_bytes ? be->cached_bytes(be) : 0; }

Napi::Value Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& st = *data_of(env).state;
  Napi::Object o = Napi::Object::New(env);
  o.Set("numTensors", double(st.live_storages[kCpu] + st.live_storages[kCuda]));
  o.Set("numBytes", double(st.live_bytes[kCpu] + st.live_bytes[kCuda]));
  o.Set("cpuTensors", double(st.live_storages[kCpu]));
  o.Set("cpuBytes", double(st.live_bytes[kCpu]));
  o.Set("cpuCachedBytes", double(cached(st.cpu)));
  o.Set("cudaTensors", double(st.live_storages[kCuda]));
  o.Set("cudaBytes", double(st.live_bytes[kCuda]));
  o.Set("cudaCachedBytes", double(cached(st.cuda.backend)));
  o.Set("cpuPeakBytes", double(st.peak_bytes[kCpu]));
  o.Set("cudaPeakBytes", double(st.peak_bytes[kCuda]));
  return o;
}

// resetPeakMemory(): the peaks restart from the bytes live now.
Napi::Value ResetPeakMemory(const Napi::CallbackInfo& info) {
  AddonState& st = *data_of(info.Env()).state;
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  for (int d = 0; d < kDeviceCount; ++d) st.peak_bytes[d] = st.live_bytes[d];
  return info.Env().Undefined();
}

Napi::Value ReleaseCached(const Napi::CallbackInfo& info) {
  AddonState& st = *data_of(info.Env()).state;
  for (lora_backend* be : {st.cpu, st.cuda.backend})
    if (be && be->release_cached) be->release_cached(be);
  return info.Env().Undefined();
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  const int64_t n = int_arg(info, 0, "threads");
  if (n < 1 || n > 1024) throw_lora(info.Env(), "ERR_LORA_RANGE", "threads must be between 1 and 1024");
  cpu_pool(data_of(info.Env()).state->cpu).resize(static_cast<int>(n));
  return info.Env().Undefined();
}

Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), cpu_pool(data_of(info.Env()).state->cpu).size());
}

// features(): what this binary can do. Asking loads the CUDA library (once).
Napi::Value Features(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& st = *data_of(env).state;
  if (!st.cuda.tried) load_cuda(st.addon_dir, &st.cuda);
  Napi::Object o = Napi::Object::New(env);
  o.Set("cuda", st.cuda.backend != nullptr);
  if (!st.cuda.backend) o.Set("reason", st.cuda.reason);
  o.Set("cudaLibrary", st.cuda.library_path);
  if (st.cuda.emulated) o.Set("cudaEmulated", true);
  Napi::Array devs = Napi::Array::New(env, st.cuda.devices.size());
  for (size_t i = 0; i < st.cuda.devices.size(); ++i) {
    const auto& d = st.cuda.devices[i];
    Napi::Object od = Napi::Object::New(env);
    od.Set("name", d.name);
    od.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
    od.Set("memory", double(d.memory));
    devs.Set(static_cast<uint32_t>(i), od);
  }
  o.Set("devices", devs);
  o.Set("isa", cpu_isa_name());
  o.Set("bf16Dot", cpu_has_bf16_dot());
  o.Set("threads", cpu_pool(st.cpu).size());
  o.Set("addonDir", st.addon_dir);
  o.Set("addonPath", st.addon_path);
  o.Set("binary", st.addon_path.find("/prebuilds/") != std::string::npos ? "prebuild" : "build");
  return o;
}

// setErrorClass(LoraError): native errors are constructed as new LoraError(code, message).
Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "Expected the LoraError class");
  data_of(info.Env()).error_ctor = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

}  // namespace

void register_storage(Registry& r) {
  r.fn("setErrorClass", SetErrorClass, "(ctor: unknown): void");
  r.fn("alloc", Alloc, "(device: number, dtype: number, numel: number): S");
  r.fn("dispose", Dispose, "(s: S): void");
  r.fn("memory", Memory, "(): NativeMemory");
  r.fn("releaseCached", ReleaseCached, "(): void");
  r.fn("resetPeakMemory", ResetPeakMemory, "(): void");
  r.fn("setNumThreads", SetNumThreads, "(n: number): void");
  r.fn("getNumThreads", GetNumThreads, "(): number");
  r.fn("features", Features, "(): NativeFeatures");
}

}  // namespace binding
}  // namespace lora
