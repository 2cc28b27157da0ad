// The addon's core (addon.h): instance state, storages and their memory blocks, backends by
// device, and the one place a lora_status becomes a JS exception.
#include "addon.h"

namespace lora {
namespace binding {

const napi_type_tag kStorageTag = {0x6c6f72616e617469ull, 0x7665535452474531ull};

AddonState::~AddonState() {
  unload_cuda(&cuda);
  if (cpu) cpu->destroy(cpu);
}

InstanceData& data_of(Napi::Env env) { return *env.GetInstanceData<InstanceData>(); }

Napi::Value make_lora_error(Napi::Env env, const char* code, const std::string& message) {
  auto* data = env.GetInstanceData<InstanceData>();
  if (data && !data->error_ctor.IsEmpty())
    return data->error_ctor.New({Napi::String::New(env, code), Napi::String::New(env, message)});
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e.Value();
}

void throw_lora(Napi::Env env, const char* code, const std::string& message) {
  throw Napi::Error(env, make_lora_error(env, code, message));
}

const char* status_code(lora_status s) {
  return s == LORA_OUT_OF_MEMORY ? "ERR_LORA_OUT_OF_MEMORY"
         : s == LORA_DEVICE_ERROR || s == LORA_UNUSABLE ? "ERR_LORA_CUDA"
         : s == LORA_UNSUPPORTED ? "ERR_LORA_UNSUPPORTED"
                                 : "ERR_LORA_INTERNAL";
}

std::string status_message(lora_backend* be, const char* op, lora_status s, const std::string& detail) {
  std::string msg = std::string(op) + " failed on " + be->name + ": " + lora_status_name(s);
  if (!detail.empty()) msg += " (" + detail + ")";
  return msg;
}

void check_status(Napi::Env env, lora_status s, lora_backend* be, const char* op) {
  if (s == LORA_OK) return;
  const char* detail = be->last_error ? be->last_error(be) : "";
  throw_lora(env, status_code(s), status_message(be, op, s, detail ? detail : ""));
}

lora_backend* backend_for(Napi::Env env, AddonState& st, int32_t device) {
  if (device == kCpu) return st.cpu;
  if (device == kCuda) {
    if (!st.cuda.tried) load_cuda(st.addon_dir, &st.cuda);
    if (!st.cuda.backend) throw_lora(env, "ERR_LORA_NO_CUDA", "CUDA is not available: " + st.cuda.reason);
    return st.cuda.backend;
  }
  throw_lora(env, "ERR_LORA_DEVICE", "unknown device id " + std::to_string(device));
}

Block::Block(std::shared_ptr<AddonState> st, lora_backend* b, int32_t dev, size_t n, void* p)
    : state(std::move(st)), backend(b), device(dev), bytes(n), ptr(p) {
  state->live_storages[device] += 1;
  state->live_bytes[device] += static_cast<int64_t>(bytes);
  if (state->live_bytes[device] > state->peak_bytes[device]) state->peak_bytes[device] = state->live_bytes[device];
}

Block::~Block() {
  std::lock_guard<std::recursive_mutex> lock(state->mu);
  backend->free(backend, ptr, bytes);
  state->live_storages[device] -= 1;
  state->live_bytes[device] -= static_cast<int64_t>(bytes);
}

Napi::Function Storage::Define(Napi::Env env) {
  return DefineClass(env, "Storage",
                     {InstanceAccessor<&Storage::GetNumel>("numel"),
                      InstanceAccessor<&Storage::GetDtype>("dtype"),
                      InstanceAccessor<&Storage::GetDevice>("device"),
                      InstanceAccessor<&Storage::GetDisposed>("disposed")});
}

Storage::Storage(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Storage>(info) {
  // Only make_storage() constructs these (it passes an External).
  if (info.Length() != 1 || !info[0].IsExternal())
    throw_lora(info.Env(), "ERR_LORA_TYPE", "Storage cannot be constructed directly");
}

void Storage::init(std::shared_ptr<AddonState> state, lora_backend* backend, int32_t device,
                   lora_dtype dtype, int64_t numel, void* ptr) {
  backend_ = backend;
  device_ = device;
  dtype_ = dtype;
  numel_ = numel;
  ptr_ = ptr;
  block_ = std::make_shared<Block>(std::move(state), backend, device, bytes(), ptr);
}

void Storage::release() {
  ptr_ = nullptr;
  disposed_ = true;
  block_.reset();
}

Napi::Value Storage::GetNumel(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(numel_)); }
Napi::Value Storage::GetDtype(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), int(dtype_)); }
Napi::Value Storage::GetDevice(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
Napi::Value Storage::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed_); }

Napi::Object make_storage(Napi::Env env, int32_t device, lora_dtype dtype, int64_t numel) {
  InstanceData& d = data_of(env);
  lora_backend* be = backend_for(env, *d.state, device);
  const size_t bytes = static_cast<size_t>(numel) * lora_dtype_size(dtype);
  void* p = be->alloc(be, bytes == 0 ? 1 : bytes);
  if (!p && be->unusable && be->unusable(be)) check_status(env, LORA_UNUSABLE, be, "alloc");
  if (!p) {
    const char* detail = be->last_error ? be->last_error(be) : "";
    throw_lora(env, "ERR_LORA_OUT_OF_MEMORY",
               "could not allocate " + std::to_string(bytes) + " bytes on " + be->name +
                   (detail && detail[0] ? std::string(" (") + detail + ")" : std::string()));
  }
  Napi::Object obj = d.storage_ctor.New({Napi::External<void>::New(env, nullptr)});
  obj.TypeTag(&kStorageTag);
  Storage::Unwrap(obj)->init(d.state, be, device, dtype, numel, p);
  return obj;
}

}  // namespace binding
}  // namespace lora
