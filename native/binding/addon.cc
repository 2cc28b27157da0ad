// The N-API addon's entry point: it only registers. Each file of native/binding/ registers the
// functions of its area (args.h: register_*); this file adds the three that describe the addon
// itself (supports, describe, enums), then exports every function under the addon's lock.
#include <dlfcn.h>

#include <cstdlib>
#include <thread>

#include "../cpu/cpu.h"
#include "args.h"

namespace lora {
namespace binding {
namespace {

const Registry& registry();

// supports(device, op, dtype): whether the device's backend has the kernel of `op` for `dtype`
// (false for cuda when CUDA is unavailable). lib/ asks instead of catching ERR_LORA_UNSUPPORTED.
Napi::Value Supports(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t device = device_arg(info, 0);
  const int64_t op = int_arg(info, 1, "op"), dtype = int_arg(info, 2, "dtype");
  AddonState& st = *data_of(env).state;
  if (device == kCuda && !st.cuda.tried) load_cuda(st.addon_dir, &st.cuda);
  lora_backend* be = device == kCpu ? st.cpu : st.cuda.backend;
  if (be == nullptr || op < 0 || op >= LORA_OP_COUNT || dtype < 0 || dtype >= LORA_DTYPE_COUNT)
    return Napi::Boolean::New(env, false);
  for (const Export& e : registry().exports()) {
    if (e.op != op) continue;
    const bool has = e.has_entry(be, static_cast<int32_t>(dtype));
    return Napi::Boolean::New(env, has && (be->supports ? be->supports(be, static_cast<int32_t>(op), static_cast<int32_t>(dtype))
                                                        : dtype == LORA_F32));
  }
  return Napi::Boolean::New(env, false);
}

// describe(): every exported function with its TypeScript signature (scripts/binding-types.js
// writes lib/binding_types.ts from it).
Napi::Value Describe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& list = registry().exports();
  Napi::Array out = Napi::Array::New(env, list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", list[i].name);
    o.Set("signature", list[i].ts_signature);
    if (list[i].op >= 0) o.Set("op", lora_op_name(list[i].op));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

Napi::Array names(Napi::Env env, int32_t count, const char* (*name)(int32_t)) {
  Napi::Array a = Napi::Array::New(env, static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) a.Set(static_cast<uint32_t>(i), name(i));
  return a;
}

const char* device_name(int32_t d) { return d == kCpu ? "cpu" : "cuda"; }

// enums(): the ids of native/backend/backend.h by name (test/binding.test.ts checks lib/'s copies).
Napi::Value Enums(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("abiVersion", LORA_BACKEND_ABI_VERSION);
  o.Set("dtype", names(env, LORA_DTYPE_COUNT, lora_dtype_name));
  o.Set("device", names(env, kDeviceCount, device_name));
  o.Set("unary", names(env, LORA_UNARY_COUNT, lora_unary_name));
  o.Set("binary", names(env, LORA_BINARY_COUNT, lora_binary_name));
  o.Set("reduce", names(env, LORA_REDUCE_COUNT, lora_reduce_name));
  o.Set("op", names(env, LORA_OP_COUNT, lora_op_name));
  return o;
}

// Built once per process (immutable; every addon instance exports the same functions). A spec
// that does not fit its entry throws here and the addon fails to load, naming it.
const Registry& registry() {
  static const Registry r = [] {
    Registry reg;
    register_storage(reg);
    register_io(reg);
    register_tensor_ops(reg);
    register_lora(reg);
    register_optim(reg);
    register_nn(reg);
    reg.fn("supports", Supports, "(device: number, op: number, dtype: number): boolean");
    reg.fn("describe", Describe, "(): BindingFunction[]");
    reg.fn("enums", Enums, "(): BindingEnums");
    return reg;
  }();
  return r;
}

// Every exported function runs under the addon's mutex (addon.h).
Napi::Value Locked(const Napi::CallbackInfo& info) {
  const Export* e = static_cast<const Export*>(info.Data());
  std::lock_guard<std::recursive_mutex> lock(data_of(info.Env()).state->mu);
  return e->fn(info);
}

// The path of this .node file (liblora_cuda.so sits beside it).
std::string own_path() {
  Dl_info dl{};
  if (dladdr(reinterpret_cast<void*>(&own_path), &dl) == 0 || !dl.dli_fname) return "";
  return dl.dli_fname;
}

int default_threads() {
  const char* env = std::getenv("LORA_NATIVE_THREADS");
  if (env && *env) {
    const int n = std::atoi(env);
    if (n >= 1 && n <= 1024) return n;
  }
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  const Registry* reg = nullptr;
  try {
    reg = &registry();
  } catch (const std::logic_error& e) {
    throw Napi::Error::New(env, std::string("lora-native's binding is inconsistent: ") + e.what());
  }
  auto* data = new InstanceData();
  data->state = std::make_shared<AddonState>();
  data->state->cpu = cpu_backend_create(default_threads());
  data->state->addon_path = own_path();
  const size_t slash = data->state->addon_path.rfind('/');
  data->state->addon_dir = slash == std::string::npos ? "." : data->state->addon_path.substr(0, slash);
  Napi::Function ctor = Storage::Define(env);
  data->storage_ctor = Napi::Persistent(ctor);
  env.SetInstanceData<InstanceData>(data);  // deleted (and the state released) at env teardown

  exports.Set("Storage", ctor);
  for (const Export& e : reg->exports())
    exports.Set(e.name, Napi::Function::New(env, Locked, e.name, const_cast<void*>(static_cast<const void*>(&e))));
  return exports;
}

}  // namespace
}  // namespace binding
}  // namespace lora

static Napi::Object InitLoraNative(Napi::Env env, Napi::Object exports) { return lora::binding::Init(env, exports); }

NODE_API_MODULE(lora_native, InitLoraNative)
