// The N-API binding: unwraps handles, checks everything that could corrupt memory (type tag,
// disposed flag, device, sizes against the allocation) once, and calls a lora::Backend. It does no
// arithmetic of its own. TypeScript (lib/) validates arguments first and owns user-facing
// messages; the checks here are the last line of defence and throw LoraError with a code too.
//
// Threads: the CPU backend's allocator and thread pool serve one caller at a time, so every
// binding call and every async op (loraMergeAsync, toHostAsync) holds the addon's mutex while it
// touches a backend. An async op holds a reference to the memory it uses: dispose() during the op
// marks the tensor disposed at once and the memory is freed when the op completes.
#include <napi.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
#include "cpu/backend_cpu.h"
#include "cpu/gemm_isa.h"
#include "cuda_loader.h"

namespace {

using lora::AttentionArgs;
using lora::Backend;
using lora::DType;
using lora::Layout;
using lora::Status;

enum Device : int32_t { kCpu = 0, kCuda = 1 };

// Per-addon-instance state, shared by every Storage through a shared_ptr so that whichever of
// the addon's teardown or the last tensor's finalizer runs last frees the backends.
struct AddonState {
  std::unique_ptr<lora::CpuBackendBase> cpu;
  lora::CudaState cuda;
  std::string addon_dir;
  int64_t live_storages[2] = {0, 0};
  int64_t live_bytes[2] = {0, 0};
  std::string addon_path;  // the .node file itself
  // Held by every binding call and async op while it uses a backend; recursive because a
  // finalizer may free memory during a call that already holds it.
  std::recursive_mutex mu;
  ~AddonState() { lora::unload_cuda(&cuda); }
};

struct InstanceData {
  std::shared_ptr<AddonState> state;
  Napi::FunctionReference storage_ctor;
  Napi::FunctionReference error_ctor;  // lib/errors.ts LoraError(code, message)
};

// Distinguishes our Storage objects from anything else a caller might pass.
const napi_type_tag kStorageTag = {0x6c6f72616e617469ull, 0x7665535452474531ull};

Napi::Value make_lora_error(Napi::Env env, const char* code, const std::string& message) {
  auto* data = env.GetInstanceData<InstanceData>();
  if (data && !data->error_ctor.IsEmpty())
    return data->error_ctor.New({Napi::String::New(env, code), Napi::String::New(env, message)});
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e.Value();
}

[[noreturn]] void throw_lora(Napi::Env env, const char* code, const std::string& message) {
  throw Napi::Error(env, make_lora_error(env, code, message));
}

// The JS error code for a backend status.
const char* status_code(Status s) {
  return s == Status::OutOfMemory ? "ERR_LORA_OUT_OF_MEMORY"
         : s == Status::DeviceError || s == Status::Unusable ? "ERR_LORA_CUDA"
         : s == Status::Unsupported ? "ERR_LORA_UNSUPPORTED"
                                    : "ERR_LORA_INTERNAL";
}

void check_status(Napi::Env env, Status s, Backend* backend, const char* op) {
  if (s == Status::Ok) return;
  std::string msg = std::string(op) + " failed on " + backend->name() + ": " + lora::status_name(s);
  const char* detail = backend->last_error();
  if (detail && *detail) msg += std::string(" (") + detail + ")";
  throw_lora(env, status_code(s), msg);
}

Backend* backend_for(Napi::Env env, AddonState& st, int32_t device) {
  if (device == kCpu) return st.cpu.get();
  if (device == kCuda) {
    if (!st.cuda.tried) lora::load_cuda(st.addon_dir, &st.cuda);
    if (!st.cuda.backend) throw_lora(env, "ERR_LORA_NO_CUDA", "CUDA is not available: " + st.cuda.reason);
    return st.cuda.backend;
  }
  throw_lora(env, "ERR_LORA_DEVICE", "unknown device id " + std::to_string(device));
}

// One allocation. Shared between its Storage and any async op using it; the last owner frees it
// (under the addon's mutex: an async op may be using the allocator on another thread).
struct Block {
  std::shared_ptr<AddonState> state;
  Backend* backend;
  int32_t device;
  size_t bytes;
  void* ptr;
  Block(std::shared_ptr<AddonState> st, Backend* b, int32_t dev, size_t n, void* p)
      : state(std::move(st)), backend(b), device(dev), bytes(n), ptr(p) {
    state->live_storages[device] += 1;
    state->live_bytes[device] += static_cast<int64_t>(bytes);
  }
  ~Block() {
    std::lock_guard<std::recursive_mutex> lock(state->mu);
    backend->free(ptr, bytes);
    state->live_storages[device] -= 1;
    state->live_bytes[device] -= static_cast<int64_t>(bytes);
  }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
};

// Native memory behind one tensor. JS never sees the pointer; data moves only by copy.
class Storage : public Napi::ObjectWrap<Storage> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Storage",
                       {InstanceAccessor<&Storage::GetNumel>("numel"),
                        InstanceAccessor<&Storage::GetDtype>("dtype"),
                        InstanceAccessor<&Storage::GetDevice>("device"),
                        InstanceAccessor<&Storage::GetDisposed>("disposed")});
  }

  explicit Storage(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Storage>(info) {
    // Only alloc() below constructs these (it passes an External with the state pointer).
    if (info.Length() != 1 || !info[0].IsExternal())
      throw_lora(info.Env(), "ERR_LORA_TYPE", "Storage cannot be constructed directly");
  }

  ~Storage() override { release(); }

  void init(std::shared_ptr<AddonState> state, Backend* backend, int32_t device, DType dtype,
            int64_t numel, void* ptr) {
    backend_ = backend;
    device_ = device;
    dtype_ = dtype;
    numel_ = numel;
    ptr_ = ptr;
    block_ = std::make_shared<Block>(std::move(state), backend, device, bytes(), ptr);
  }

  // Drops this storage's hold on the memory (idempotent): freed now, or when the last async op
  // using it completes. Finalizers call this too: it touches no JS.
  void release() {
    ptr_ = nullptr;
    disposed_ = true;
    block_.reset();
  }

  size_t bytes() const { return static_cast<size_t>(numel_) * lora::dtype_size(dtype_); }
  Napi::Value GetNumel(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), double(numel_)); }
  Napi::Value GetDtype(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), int(dtype_)); }
  Napi::Value GetDevice(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), device_); }
  Napi::Value GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed_); }

  std::shared_ptr<Block> block_;
  Backend* backend_ = nullptr;
  int32_t device_ = kCpu;
  DType dtype_ = DType::F32;
  int64_t numel_ = 0;
  void* ptr_ = nullptr;
  bool disposed_ = false;
};

InstanceData& data_of(Napi::Env env) { return *env.GetInstanceData<InstanceData>(); }

// ---- argument helpers ---------------------------------------------------------------------------

Storage* storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  Napi::Env env = info.Env();
  Napi::Value v = info[i];
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
    throw_lora(env, "ERR_LORA_TYPE", std::string("Expected a tensor storage for ") + name);
  Storage* s = Storage::Unwrap(v.As<Napi::Object>());
  if (s->disposed_) throw_lora(env, "ERR_LORA_DISPOSED", std::string(name) + " has been disposed");
  return s;
}

Storage* optional_storage_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info[i].IsNull() || info[i].IsUndefined()) return nullptr;
  return storage_arg(info, i, name);
}

double number_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsNumber())
    throw_lora(info.Env(), "ERR_LORA_TYPE", std::string("Expected a number for ") + name);
  return info[i].As<Napi::Number>().DoubleValue();
}

int64_t size_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  double d = number_arg(info, i, name);
  if (!(d >= 0) || d != std::floor(d) || d > 9007199254740991.0)
    throw_lora(info.Env(), "ERR_LORA_RANGE",
               std::string("Expected a non-negative integer for ") + name + " but received " + std::to_string(d));
  return static_cast<int64_t>(d);
}

int64_t int_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  double d = number_arg(info, i, name);
  if (d != std::floor(d) || std::fabs(d) > 9007199254740991.0)
    throw_lora(info.Env(), "ERR_LORA_RANGE", std::string("Expected an integer for ") + name);
  return static_cast<int64_t>(d);
}

float float_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  return static_cast<float>(number_arg(info, i, name));
}

bool bool_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsBoolean())
    throw_lora(info.Env(), "ERR_LORA_TYPE", std::string("Expected a boolean for ") + name);
  return info[i].As<Napi::Boolean>().Value();
}

uint64_t seed_arg(const Napi::CallbackInfo& info, size_t i) {
  double d = number_arg(info, i, "seed");
  if (!(d >= 0) || d != std::floor(d) || d > 9007199254740991.0)
    throw_lora(info.Env(), "ERR_LORA_RANGE", "Expected a non-negative integer seed");
  return static_cast<uint64_t>(d);
}

void need(const Napi::CallbackInfo& info, Storage* s, DType dtype, int64_t elements, const char* name) {
  if (!s) return;
  if (s->dtype_ != dtype)
    throw_lora(info.Env(), "ERR_LORA_DTYPE", std::string(name) + " has the wrong dtype");
  if (elements < 0 || s->numel_ < elements)
    throw_lora(info.Env(), "ERR_LORA_SHAPE",
               std::string(name) + " holds " + std::to_string(s->numel_) + " elements but the op needs " +
                   std::to_string(elements));
}

// Every storage of one call must live on one device; returns that device's backend.
Backend* same_backend(const Napi::CallbackInfo& info, std::initializer_list<Storage*> list) {
  Storage* first = nullptr;
  for (Storage* s : list) {
    if (!s) continue;
    if (!first) first = s;
    else if (s->device_ != first->device_)
      throw_lora(info.Env(), "ERR_LORA_DEVICE", "Expected every tensor of one op on the same device");
  }
  if (!first) throw_lora(info.Env(), "ERR_LORA_INTERNAL", "op called without tensors");
  return first->backend_;
}

template <typename T>
T* ptr(Storage* s) {
  return s ? static_cast<T*>(s->ptr_) : nullptr;
}

Napi::Object make_storage(Napi::Env env, int32_t device, DType dtype, int64_t numel) {
  InstanceData& d = data_of(env);
  Backend* backend = backend_for(env, *d.state, device);
  const size_t bytes = static_cast<size_t>(numel) * lora::dtype_size(dtype);
  void* p = backend->alloc(bytes == 0 ? 1 : bytes);
  if (!p && backend->unusable()) check_status(env, Status::Unusable, backend, "alloc");
  if (!p)
    throw_lora(env, "ERR_LORA_OUT_OF_MEMORY",
               "could not allocate " + std::to_string(bytes) + " bytes on " + backend->name() +
                   (backend->last_error()[0] ? std::string(" (") + backend->last_error() + ")" : std::string()));
  Napi::Object obj = d.storage_ctor.New({Napi::External<void>::New(env, nullptr)});
  obj.TypeTag(&kStorageTag);
  Storage* s = Storage::Unwrap(obj);
  s->init(d.state, backend, device, dtype, numel, p);
  return obj;
}

DType dtype_arg(const Napi::CallbackInfo& info, size_t i) {
  int64_t t = int_arg(info, i, "dtype");
  if (t < 0 || t > 3) throw_lora(info.Env(), "ERR_LORA_DTYPE", "unknown dtype id " + std::to_string(t));
  return static_cast<DType>(t);
}

int32_t device_arg(const Napi::CallbackInfo& info, size_t i) {
  int64_t d = int_arg(info, i, "device");
  if (d != kCpu && d != kCuda) throw_lora(info.Env(), "ERR_LORA_DEVICE", "unknown device id " + std::to_string(d));
  return static_cast<int32_t>(d);
}

// Sizes come from JS as integers up to 2^53; their products and extents saturate at INT64_MAX
// (which no allocation holds, so need() rejects it) instead of wrapping past a size check.
int64_t mul_sat(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_mul_overflow(a, b, &r) ? INT64_MAX : r;
}

int64_t add_sat(int64_t a, int64_t b) {
  int64_t r;
  return __builtin_add_overflow(a, b, &r) ? INT64_MAX : r;
}

// Reads a JS array of non-negative integers (dims or strides) into a Layout.
Layout layout_arg(const Napi::CallbackInfo& info, size_t shape_i, size_t stride_i, const char* name) {
  Napi::Env env = info.Env();
  if (!info[shape_i].IsArray() || !info[stride_i].IsArray())
    throw_lora(env, "ERR_LORA_TYPE", std::string("Expected shape and stride arrays for ") + name);
  Napi::Array shape = info[shape_i].As<Napi::Array>(), stride = info[stride_i].As<Napi::Array>();
  if (shape.Length() != stride.Length() || shape.Length() > lora::kMaxDims)
    throw_lora(env, "ERR_LORA_SHAPE", std::string("Expected at most 8 dims with one stride each for ") + name);
  Layout l{};
  l.ndim = static_cast<int32_t>(shape.Length());
  for (uint32_t k = 0; k < shape.Length(); ++k) {
    Napi::Value a = shape[k], b = stride[k];
    if (!a.IsNumber() || !b.IsNumber()) throw_lora(env, "ERR_LORA_TYPE", std::string("bad layout for ") + name);
    double dv = a.As<Napi::Number>().DoubleValue(), sv = b.As<Napi::Number>().DoubleValue();
    if (!(dv >= 0) || dv != std::floor(dv) || !(sv >= 0) || sv != std::floor(sv))
      throw_lora(env, "ERR_LORA_SHAPE", std::string("bad layout for ") + name);
    l.shape[k] = static_cast<int64_t>(dv);
    l.stride[k] = static_cast<int64_t>(sv);
  }
  return l;
}

int64_t layout_numel(const Layout& l) {
  int64_t n = 1;
  for (int k = 0; k < l.ndim; ++k) n = mul_sat(n, l.shape[k]);
  return n;
}

// One past the furthest element a layout touches from `offset` (0 when it touches none).
int64_t layout_extent(const Layout& l, int64_t offset) {
  int64_t last = offset;
  for (int k = 0; k < l.ndim; ++k) {
    if (l.shape[k] == 0) return 0;
    last = add_sat(last, mul_sat(l.shape[k] - 1, l.stride[k]));
  }
  return add_sat(last, 1);
}

// ---- memory and data movement ---------------------------------------------------------------

Napi::Value Alloc(const Napi::CallbackInfo& info) {
  return make_storage(info.Env(), device_arg(info, 0), dtype_arg(info, 1), size_arg(info, 2, "numel"));
}

// fromHost(device, dtype, typedArray): a new storage holding a copy of the array's bytes.
Napi::Value FromHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t device = device_arg(info, 0);
  DType dtype = dtype_arg(info, 1);
  if (!info[2].IsTypedArray()) throw_lora(env, "ERR_LORA_TYPE", "Expected a typed array of data");
  // The C API gives the data pointer for ArrayBuffer- and SharedArrayBuffer-backed arrays alike
  // (Napi::TypedArray::ArrayBuffer() throws a plain Error for a SharedArrayBuffer); a detached
  // array reports no data.
  napi_typedarray_type type;
  size_t length = 0, offset = 0;
  void* data = nullptr;
  napi_value ab;
  if (napi_get_typedarray_info(env, info[2], &type, &length, &data, &ab, &offset) != napi_ok)
    throw_lora(env, "ERR_LORA_TYPE", "Expected a typed array of data");
  const size_t bytes = info[2].As<Napi::TypedArray>().ByteLength();
  if (!data && bytes != 0) throw_lora(env, "ERR_LORA_TYPE", "the data's buffer is detached");
  const size_t es = lora::dtype_size(dtype);
  if (bytes % es) throw_lora(env, "ERR_LORA_SHAPE", "data length is not a whole number of elements");
  Napi::Object obj = make_storage(env, device, dtype, static_cast<int64_t>(bytes / es));
  Storage* s = Storage::Unwrap(obj);
  const uint8_t* src = static_cast<const uint8_t*>(data);
  check_status(env, s->backend_->upload(s->ptr_, src, bytes), s->backend_, "upload");
  return obj;
}

// toHost(storage): a copy of the raw bytes in a new ArrayBuffer (never an external buffer).
Napi::Value ToHost(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(info.Env(), s->bytes());
  check_status(info.Env(), s->backend_->download(buf.Data(), s->ptr_, s->bytes()), s->backend_, "download");
  return buf;
}

// copyInto(dst, src): same device, same dtype, same byte size.
Napi::Value CopyInto(const Napi::CallbackInfo& info) {
  Storage* dst = storage_arg(info, 0, "destination");
  Storage* src = storage_arg(info, 1, "source");
  Backend* b = same_backend(info, {dst, src});
  need(info, dst, src->dtype_, src->numel_, "destination");
  check_status(info.Env(), b->copy(dst->ptr_, src->ptr_, src->bytes()), b, "copy");
  return info.Env().Undefined();
}

// toDevice(storage, device): a copy on another device, through host memory.
Napi::Value ToDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Storage* s = storage_arg(info, 0, "tensor");
  int32_t device = device_arg(info, 1);
  Napi::Object obj = make_storage(env, device, s->dtype_, s->numel_);
  Storage* d = Storage::Unwrap(obj);
  std::vector<uint8_t> host(s->bytes());
  check_status(env, s->backend_->download(host.data(), s->ptr_, s->bytes()), s->backend_, "download");
  check_status(env, d->backend_->upload(d->ptr_, host.data(), host.size()), d->backend_, "upload");
  return obj;
}

// convert(dst, src): elementwise dtype conversion, same device and element count.
Napi::Value Convert(const Napi::CallbackInfo& info) {
  Storage* dst = storage_arg(info, 0, "destination");
  Storage* src = storage_arg(info, 1, "source");
  Backend* b = same_backend(info, {dst, src});
  if (dst->numel_ < src->numel_) throw_lora(info.Env(), "ERR_LORA_SHAPE", "destination too small");
  check_status(info.Env(), b->convert(dst->ptr_, dst->dtype_, src->ptr_, src->dtype_, src->numel_), b, "convert");
  return info.Env().Undefined();
}

Napi::Value Dispose(const Napi::CallbackInfo& info) {
  Napi::Value v = info[0];
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
    throw_lora(info.Env(), "ERR_LORA_TYPE", "Expected a tensor storage");
  Storage::Unwrap(v.As<Napi::Object>())->release();
  return info.Env().Undefined();
}

Napi::Value Fill(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  need(info, s, DType::F32, 0, "tensor");
  check_status(info.Env(), s->backend_->fill(ptr<float>(s), float_arg(info, 1, "value"), s->numel_), s->backend_, "fill");
  return info.Env().Undefined();
}

Napi::Value Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& st = *data_of(env).state;
  Napi::Object o = Napi::Object::New(env);
  o.Set("numTensors", double(st.live_storages[kCpu] + st.live_storages[kCuda]));
  o.Set("numBytes", double(st.live_bytes[kCpu] + st.live_bytes[kCuda]));
  o.Set("cpuTensors", double(st.live_storages[kCpu]));
  o.Set("cpuBytes", double(st.live_bytes[kCpu]));
  o.Set("cpuCachedBytes", double(st.cpu->cached_bytes()));
  o.Set("cudaTensors", double(st.live_storages[kCuda]));
  o.Set("cudaBytes", double(st.live_bytes[kCuda]));
  o.Set("cudaCachedBytes", double(st.cuda.backend ? st.cuda.backend->cached_bytes() : 0));
  return o;
}

Napi::Value ReleaseCached(const Napi::CallbackInfo& info) {
  AddonState& st = *data_of(info.Env()).state;
  st.cpu->release_cached();
  if (st.cuda.backend) st.cuda.backend->release_cached();
  return info.Env().Undefined();
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  int64_t n = int_arg(info, 0, "threads");
  if (n < 1 || n > 1024) throw_lora(info.Env(), "ERR_LORA_RANGE", "threads must be between 1 and 1024");
  data_of(info.Env()).state->cpu->pool().resize(static_cast<int>(n));
  return info.Env().Undefined();
}

Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), data_of(info.Env()).state->cpu->pool().size());
}

// features({ probeCuda }): what this binary can do. Probing CUDA loads the driver once.
Napi::Value Features(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  AddonState& st = *data_of(env).state;
  if (!st.cuda.tried) lora::load_cuda(st.addon_dir, &st.cuda);
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
  o.Set("isa", lora::cpu_isa_name());
  o.Set("threads", st.cpu->pool().size());
  o.Set("addonDir", st.addon_dir);
  o.Set("addonPath", st.addon_path);
  o.Set("binary", st.addon_path.find("/prebuilds/") != std::string::npos ? "prebuild" : "build");
  return o;
}

// ---- kernels ------------------------------------------------------------------------------

// loraForward(y, h, x, W, b|null, A, B, N, C, OC, R, s, dropoutP, seed)
Napi::Value LoraForward(const Napi::CallbackInfo& info) {
  Storage *y = storage_arg(info, 0, "y"), *h = storage_arg(info, 1, "h"), *x = storage_arg(info, 2, "x"),
          *W = storage_arg(info, 3, "weight"), *b = optional_storage_arg(info, 4, "bias"),
          *A = storage_arg(info, 5, "loraA"), *B = storage_arg(info, 6, "loraB");
  int64_t N = size_arg(info, 7, "N"), C = size_arg(info, 8, "C"), OC = size_arg(info, 9, "OC"), R = size_arg(info, 10, "R");
  float s = float_arg(info, 11, "scaling"), p = float_arg(info, 12, "dropout");
  uint64_t seed = seed_arg(info, 13);
  Backend* be = same_backend(info, {y, h, x, W, b, A, B});
  need(info, y, DType::F32, mul_sat(N, OC), "y");
  need(info, h, DType::F32, mul_sat(N, R), "h");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  if (W->dtype_ != DType::F32 && W->dtype_ != DType::BF16) throw_lora(info.Env(), "ERR_LORA_DTYPE", "weight must be float32 or bfloat16");
  need(info, W, W->dtype_, mul_sat(OC, C), "weight");
  need(info, b, DType::F32, OC, "bias");
  need(info, A, DType::F32, mul_sat(R, C), "loraA");
  need(info, B, DType::F32, mul_sat(OC, R), "loraB");
  if (!(p >= 0.0f && p < 1.0f)) throw_lora(info.Env(), "ERR_LORA_RANGE", "dropout must be in [0, 1)");
  check_status(info.Env(),
               be->lora_forward(ptr<float>(y), ptr<float>(h), ptr<float>(x), W->ptr_, W->dtype_, ptr<float>(b),
                                ptr<float>(A), ptr<float>(B), N, C, OC, R, s, p, seed),
               be, "lora_forward");
  return info.Env().Undefined();
}

// loraBackward(dx|null, dA|null, dB|null, dy, x, h, W, A, B, N, C, OC, R, s, dropoutP, seed)
Napi::Value LoraBackward(const Napi::CallbackInfo& info) {
  Storage *dx = optional_storage_arg(info, 0, "dx"), *dA = optional_storage_arg(info, 1, "dA"),
          *dB = optional_storage_arg(info, 2, "dB"), *dy = storage_arg(info, 3, "dy"), *x = storage_arg(info, 4, "x"),
          *h = storage_arg(info, 5, "h"), *W = storage_arg(info, 6, "weight"), *A = storage_arg(info, 7, "loraA"),
          *B = storage_arg(info, 8, "loraB");
  int64_t N = size_arg(info, 9, "N"), C = size_arg(info, 10, "C"), OC = size_arg(info, 11, "OC"), R = size_arg(info, 12, "R");
  float s = float_arg(info, 13, "scaling"), p = float_arg(info, 14, "dropout");
  uint64_t seed = seed_arg(info, 15);
  Backend* be = same_backend(info, {dx, dA, dB, dy, x, h, W, A, B});
  need(info, dx, DType::F32, mul_sat(N, C), "dx");
  need(info, dA, DType::F32, mul_sat(R, C), "dA");
  need(info, dB, DType::F32, mul_sat(OC, R), "dB");
  need(info, dy, DType::F32, mul_sat(N, OC), "dy");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  need(info, h, DType::F32, mul_sat(N, R), "h");
  if (W->dtype_ != DType::F32 && W->dtype_ != DType::BF16) throw_lora(info.Env(), "ERR_LORA_DTYPE", "weight must be float32 or bfloat16");
  need(info, W, W->dtype_, mul_sat(OC, C), "weight");
  need(info, A, DType::F32, mul_sat(R, C), "loraA");
  need(info, B, DType::F32, mul_sat(OC, R), "loraB");
  if (!(p >= 0.0f && p < 1.0f)) throw_lora(info.Env(), "ERR_LORA_RANGE", "dropout must be in [0, 1)");
  check_status(info.Env(),
               be->lora_backward(ptr<float>(dx), ptr<float>(dA), ptr<float>(dB), ptr<float>(dy), ptr<float>(x),
                                 ptr<float>(h), W->ptr_, W->dtype_, ptr<float>(A), ptr<float>(B), N, C, OC, R, s, p, seed),
               be, "lora_backward");
  return info.Env().Undefined();
}

// loraMerge(W, A, B, OC, C, R, s)
Napi::Value LoraMerge(const Napi::CallbackInfo& info) {
  Storage *W = storage_arg(info, 0, "weight"), *A = storage_arg(info, 1, "loraA"), *B = storage_arg(info, 2, "loraB");
  int64_t OC = size_arg(info, 3, "OC"), C = size_arg(info, 4, "C"), R = size_arg(info, 5, "R");
  float s = float_arg(info, 6, "scaling");
  Backend* be = same_backend(info, {W, A, B});
  if (W->dtype_ != DType::F32 && W->dtype_ != DType::BF16) throw_lora(info.Env(), "ERR_LORA_DTYPE", "weight must be float32 or bfloat16");
  need(info, W, W->dtype_, mul_sat(OC, C), "weight");
  need(info, A, DType::F32, mul_sat(R, C), "loraA");
  need(info, B, DType::F32, mul_sat(OC, R), "loraB");
  check_status(info.Env(), be->lora_merge(W->ptr_, W->dtype_, ptr<float>(A), ptr<float>(B), OC, C, R, s), be, "lora_merge");
  return info.Env().Undefined();
}

// Reads parallel arrays of storages for the optimizer kernels; all must match in size.
std::vector<Storage*> storage_list(const Napi::CallbackInfo& info, size_t i, const char* name, bool allow_empty) {
  Napi::Env env = info.Env();
  std::vector<Storage*> out;
  if (allow_empty && (info[i].IsNull() || info[i].IsUndefined())) return out;
  if (!info[i].IsArray()) throw_lora(env, "ERR_LORA_TYPE", std::string("Expected an array of tensors for ") + name);
  Napi::Array arr = info[i].As<Napi::Array>();
  for (uint32_t k = 0; k < arr.Length(); ++k) {
    Napi::Value v = arr[k];
    if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kStorageTag))
      throw_lora(env, "ERR_LORA_TYPE", std::string("Expected tensor storages in ") + name);
    Storage* s = Storage::Unwrap(v.As<Napi::Object>());
    if (s->disposed_) throw_lora(env, "ERR_LORA_DISPOSED", std::string("a tensor in ") + name + " has been disposed");
    if (s->dtype_ != DType::F32) throw_lora(env, "ERR_LORA_DTYPE", std::string("optimizer tensors must be float32 in ") + name);
    out.push_back(s);
  }
  return out;
}

struct ParamGroup {
  Backend* backend = nullptr;
  std::vector<float*> p, m, v;
  std::vector<const float*> g;
  std::vector<int64_t> n;
};

ParamGroup param_group(const Napi::CallbackInfo& info, const std::vector<Storage*>& p,
                       const std::vector<Storage*>& g, const std::vector<Storage*>& m,
                       const std::vector<Storage*>& v) {
  Napi::Env env = info.Env();
  ParamGroup pg;
  if (g.size() != p.size() || (!m.empty() && m.size() != p.size()) || (!v.empty() && v.size() != p.size()))
    throw_lora(env, "ERR_LORA_SHAPE", "optimizer state lists differ in length");
  for (size_t k = 0; k < p.size(); ++k) {
    Backend* b = same_backend(info, {p[k], g[k], m.empty() ? nullptr : m[k], v.empty() ? nullptr : v[k]});
    if (pg.backend && b != pg.backend) throw_lora(env, "ERR_LORA_DEVICE", "optimizer parameters on different devices");
    pg.backend = b;
    const int64_t n = p[k]->numel_;
    if (g[k]->numel_ != n || (!m.empty() && m[k]->numel_ != n) || (!v.empty() && v[k]->numel_ != n))
      throw_lora(env, "ERR_LORA_SHAPE", "optimizer state does not match its parameter's size");
    pg.p.push_back(ptr<float>(p[k]));
    pg.g.push_back(ptr<float>(g[k]));
    if (!m.empty()) pg.m.push_back(ptr<float>(m[k]));
    if (!v.empty()) pg.v.push_back(ptr<float>(v[k]));
    pg.n.push_back(n);
  }
  return pg;
}

// adamwStep(params[], grads[], m[], v[], lr, beta1, beta2, eps, weightDecay, step)
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  auto p = storage_list(info, 0, "params", false), g = storage_list(info, 1, "grads", false),
       m = storage_list(info, 2, "expAvg", false), v = storage_list(info, 3, "expAvgSq", false);
  if (m.size() != p.size() || v.size() != p.size()) throw_lora(info.Env(), "ERR_LORA_SHAPE", "optimizer state lists differ in length");
  if (p.empty()) return info.Env().Undefined();
  ParamGroup pg = param_group(info, p, g, m, v);
  check_status(info.Env(),
               pg.backend->adamw_step(static_cast<int32_t>(p.size()), pg.p.data(), pg.g.data(), pg.m.data(), pg.v.data(),
                                      pg.n.data(), float_arg(info, 4, "lr"), float_arg(info, 5, "beta1"),
                                      float_arg(info, 6, "beta2"), float_arg(info, 7, "eps"),
                                      float_arg(info, 8, "weightDecay"), int_arg(info, 9, "step")),
               pg.backend, "adamw_step");
  return info.Env().Undefined();
}

// sgdStep(params[], grads[], buffers[]|null, lr, momentum, dampening, weightDecay, nesterov, step)
Napi::Value SgdStep(const Napi::CallbackInfo& info) {
  auto p = storage_list(info, 0, "params", false), g = storage_list(info, 1, "grads", false),
       buf = storage_list(info, 2, "momentumBuffers", true);
  if (p.empty()) return info.Env().Undefined();
  ParamGroup pg = param_group(info, p, g, buf, {});
  const float momentum = float_arg(info, 4, "momentum");
  if (momentum != 0.0f && buf.size() != p.size())
    throw_lora(info.Env(), "ERR_LORA_SHAPE", "momentum needs one buffer per parameter");
  check_status(info.Env(),
               pg.backend->sgd_step(static_cast<int32_t>(p.size()), pg.p.data(), pg.g.data(),
                                    buf.empty() ? nullptr : pg.m.data(), pg.n.data(), float_arg(info, 3, "lr"), momentum,
                                    float_arg(info, 5, "dampening"), float_arg(info, 6, "weightDecay"),
                                    bool_arg(info, 7, "nesterov"), int_arg(info, 8, "step")),
               pg.backend, "sgd_step");
  return info.Env().Undefined();
}

// The furthest element (exclusive) a batched row-major matrix op touches.
int64_t matrix_extent(int64_t rows, int64_t cols, int64_t ld, int64_t batch, int64_t stride) {
  if (rows == 0 || cols == 0 || batch == 0) return 0;
  return add_sat(add_sat(mul_sat(batch - 1, stride), mul_sat(rows - 1, ld)), cols);
}

// gemm(C, A, B, M, N, K, transA, transB, lda, ldb, ldc, alpha, beta, batch, strideA, strideB, strideC)
// B may be bfloat16 (a frozen weight): Backend::gemm_bf16, ERR_LORA_UNSUPPORTED where the backend
// lacks it (lib/ops.ts then widens B itself).
Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Storage *Cs = storage_arg(info, 0, "out"), *As = storage_arg(info, 1, "a"), *Bs = storage_arg(info, 2, "b");
  int64_t M = size_arg(info, 3, "M"), N = size_arg(info, 4, "N"), K = size_arg(info, 5, "K");
  bool ta = bool_arg(info, 6, "transA"), tb = bool_arg(info, 7, "transB");
  int64_t lda = size_arg(info, 8, "lda"), ldb = size_arg(info, 9, "ldb"), ldc = size_arg(info, 10, "ldc");
  float alpha = float_arg(info, 11, "alpha"), beta = float_arg(info, 12, "beta");
  int64_t batch = size_arg(info, 13, "batch"), sa = size_arg(info, 14, "strideA"), sb = size_arg(info, 15, "strideB"),
          sc = size_arg(info, 16, "strideC");
  Backend* be = same_backend(info, {Cs, As, Bs});
  // Stored shapes: A is (M, K) or (K, M) when transposed; B is (K, N) or (N, K).
  const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
  if (lda < ac || ldb < bc || ldc < N) throw_lora(info.Env(), "ERR_LORA_SHAPE", "gemm leading dimension too small");
  need(info, As, DType::F32, matrix_extent(ar, ac, lda, batch, sa), "a");
  const bool b_bf16 = Bs && Bs->dtype_ == DType::BF16;
  need(info, Bs, b_bf16 ? DType::BF16 : DType::F32, matrix_extent(br, bc, ldb, batch, sb), "b");
  need(info, Cs, DType::F32, matrix_extent(M, N, ldc, batch, sc), "out");
  if (b_bf16)
    check_status(info.Env(), be->gemm_bf16(ptr<float>(Cs), ptr<float>(As), ptr<uint16_t>(Bs), M, N, K, ta, tb, lda, ldb, ldc,
                                           alpha, beta, batch, sa, sb, sc),
                 be, "gemm_bf16");
  else
    check_status(info.Env(), be->gemm(ptr<float>(Cs), ptr<float>(As), ptr<float>(Bs), M, N, K, ta, tb, lda, ldb, ldc, alpha, beta,
                                      batch, sa, sb, sc),
                 be, "gemm");
  return info.Env().Undefined();
}

// binary(op, out, a, b, shape, aStrides, bStrides)
Napi::Value Binary(const Napi::CallbackInfo& info) {
  int64_t op = int_arg(info, 0, "op");
  if (op < 0 || op > int(lora::BinaryOp::Min)) throw_lora(info.Env(), "ERR_LORA_RANGE", "unknown binary op");
  Storage *out = storage_arg(info, 1, "out"), *a = storage_arg(info, 2, "a"), *b = storage_arg(info, 3, "b");
  Layout al = layout_arg(info, 4, 5, "a"), bl = layout_arg(info, 4, 6, "b");
  Backend* be = same_backend(info, {out, a, b});
  need(info, out, DType::F32, layout_numel(al), "out");
  need(info, a, DType::F32, layout_extent(al, 0), "a");
  need(info, b, DType::F32, layout_extent(bl, 0), "b");
  check_status(info.Env(), be->binary(static_cast<lora::BinaryOp>(op), ptr<float>(out), ptr<float>(a), ptr<float>(b), al, bl),
               be, "binary");
  return info.Env().Undefined();
}

// binaryScalar(op, out, a, scalar, scalarFirst)
Napi::Value BinaryScalar(const Napi::CallbackInfo& info) {
  int64_t op = int_arg(info, 0, "op");
  if (op < 0 || op > int(lora::BinaryOp::Min)) throw_lora(info.Env(), "ERR_LORA_RANGE", "unknown binary op");
  Storage *out = storage_arg(info, 1, "out"), *a = storage_arg(info, 2, "a");
  Backend* be = same_backend(info, {out, a});
  need(info, out, DType::F32, a->numel_, "out");
  need(info, a, DType::F32, 0, "a");
  check_status(info.Env(),
               be->binary_scalar(static_cast<lora::BinaryOp>(op), ptr<float>(out), ptr<float>(a), float_arg(info, 3, "scalar"),
                                 bool_arg(info, 4, "scalarFirst"), a->numel_),
               be, "binary_scalar");
  return info.Env().Undefined();
}

lora::UnaryOp unary_op_arg(const Napi::CallbackInfo& info, size_t i) {
  int64_t op = int_arg(info, i, "op");
  if (op < 0 || op > int(lora::UnaryOp::Sigmoid)) throw_lora(info.Env(), "ERR_LORA_RANGE", "unknown unary op");
  return static_cast<lora::UnaryOp>(op);
}

// unary(op, out, in)
Napi::Value Unary(const Napi::CallbackInfo& info) {
  lora::UnaryOp op = unary_op_arg(info, 0);
  Storage *out = storage_arg(info, 1, "out"), *in = storage_arg(info, 2, "in");
  Backend* be = same_backend(info, {out, in});
  need(info, out, DType::F32, in->numel_, "out");
  need(info, in, DType::F32, 0, "in");
  check_status(info.Env(), be->unary(op, ptr<float>(out), ptr<float>(in), in->numel_), be, "unary");
  return info.Env().Undefined();
}

// unaryBackward(op, dx, dy, x|null, y|null)
Napi::Value UnaryBackward(const Napi::CallbackInfo& info) {
  lora::UnaryOp op = unary_op_arg(info, 0);
  Storage *dx = storage_arg(info, 1, "dx"), *dy = storage_arg(info, 2, "dy"), *x = optional_storage_arg(info, 3, "x"),
          *y = optional_storage_arg(info, 4, "y");
  Backend* be = same_backend(info, {dx, dy, x, y});
  const int64_t n = dy->numel_;
  need(info, dx, DType::F32, n, "dx");
  need(info, dy, DType::F32, n, "dy");
  need(info, x, DType::F32, n, "x");
  need(info, y, DType::F32, n, "y");
  check_status(info.Env(), be->unary_backward(op, ptr<float>(dx), ptr<float>(dy), ptr<float>(x), ptr<float>(y), n), be,
               "unary_backward");
  return info.Env().Undefined();
}

// axpy(y, x, a): y += a·x
Napi::Value Axpy(const Napi::CallbackInfo& info) {
  Storage *y = storage_arg(info, 0, "y"), *x = storage_arg(info, 1, "x");
  Backend* be = same_backend(info, {y, x});
  need(info, y, DType::F32, x->numel_, "y");
  need(info, x, DType::F32, 0, "x");
  check_status(info.Env(), be->axpy(ptr<float>(y), ptr<float>(x), float_arg(info, 2, "a"), x->numel_), be, "axpy");
  return info.Env().Undefined();
}

// reduce(op, out, in, outer, dim, inner)
Napi::Value Reduce(const Napi::CallbackInfo& info) {
  int64_t op = int_arg(info, 0, "op");
  if (op < 0 || op > int(lora::ReduceOp::Min)) throw_lora(info.Env(), "ERR_LORA_RANGE", "unknown reduce op");
  Storage *out = storage_arg(info, 1, "out"), *in = storage_arg(info, 2, "in");
  int64_t outer = size_arg(info, 3, "outer"), dim = size_arg(info, 4, "dim"), inner = size_arg(info, 5, "inner");
  Backend* be = same_backend(info, {out, in});
  need(info, out, DType::F32, mul_sat(outer, inner), "out");
  need(info, in, DType::F32, mul_sat(mul_sat(outer, dim), inner), "in");
  check_status(info.Env(), be->reduce(static_cast<lora::ReduceOp>(op), ptr<float>(out), ptr<float>(in), outer, dim, inner), be,
               "reduce");
  return info.Env().Undefined();
}

// copyStrided(dst, dstOffset, dstStrides, src, srcOffset, srcStrides, shape)
Napi::Value CopyStrided(const Napi::CallbackInfo& info) {
  Storage *dst = storage_arg(info, 0, "dst"), *src = storage_arg(info, 3, "src");
  int64_t doff = size_arg(info, 1, "dstOffset"), soff = size_arg(info, 4, "srcOffset");
  Layout dl = layout_arg(info, 6, 2, "dst"), sl = layout_arg(info, 6, 5, "src");
  Backend* be = same_backend(info, {dst, src});
  need(info, dst, DType::F32, layout_extent(dl, doff), "dst");
  need(info, src, DType::F32, layout_extent(sl, soff), "src");
  check_status(info.Env(), be->copy_strided(ptr<float>(dst) + doff, dl, ptr<float>(src) + soff, sl), be, "copy_strided");
  return info.Env().Undefined();
}

// softmax(out, in, rows, cols, log)
Napi::Value Softmax(const Napi::CallbackInfo& info) {
  Storage *out = storage_arg(info, 0, "out"), *in = storage_arg(info, 1, "in");
  int64_t rows = size_arg(info, 2, "rows"), cols = size_arg(info, 3, "cols");
  Backend* be = same_backend(info, {out, in});
  need(info, out, DType::F32, mul_sat(rows, cols), "out");
  need(info, in, DType::F32, mul_sat(rows, cols), "in");
  check_status(info.Env(), be->softmax(ptr<float>(out), ptr<float>(in), rows, cols, bool_arg(info, 4, "log")), be, "softmax");
  return info.Env().Undefined();
}

// softmaxBackward(dx, dy, y, rows, cols, log)
Napi::Value SoftmaxBackward(const Napi::CallbackInfo& info) {
  Storage *dx = storage_arg(info, 0, "dx"), *dy = storage_arg(info, 1, "dy"), *y = storage_arg(info, 2, "y");
  int64_t rows = size_arg(info, 3, "rows"), cols = size_arg(info, 4, "cols");
  Backend* be = same_backend(info, {dx, dy, y});
  need(info, dx, DType::F32, mul_sat(rows, cols), "dx");
  need(info, dy, DType::F32, mul_sat(rows, cols), "dy");
  need(info, y, DType::F32, mul_sat(rows, cols), "y");
  check_status(info.Env(),
               be->softmax_backward(ptr<float>(dx), ptr<float>(dy), ptr<float>(y), rows, cols, bool_arg(info, 5, "log")), be,
               "softmax_backward");
  return info.Env().Undefined();
}

// dropout(out, in, p, seed)
Napi::Value Dropout(const Napi::CallbackInfo& info) {
  Storage *out = storage_arg(info, 0, "out"), *in = storage_arg(info, 1, "in");
  float p = float_arg(info, 2, "p");
  if (!(p >= 0.0f && p < 1.0f)) throw_lora(info.Env(), "ERR_LORA_RANGE", "dropout must be in [0, 1)");
  Backend* be = same_backend(info, {out, in});
  need(info, out, DType::F32, in->numel_, "out");
  need(info, in, DType::F32, 0, "in");
  check_status(info.Env(), be->dropout(ptr<float>(out), ptr<float>(in), in->numel_, p, seed_arg(info, 3)), be, "dropout");
  return info.Env().Undefined();
}

// ---- normalisation, embedding, cross-entropy, attention ------------------------------------

// Kernels that index by int32 ids return InvalidArgument for an id outside [0, V); say so.
void check_ids_status(Napi::Env env, Status s, Backend* be, const char* op, const char* what, int64_t V) {
  if (s == Status::InvalidArgument)
    throw_lora(env, "ERR_LORA_RANGE",
               std::string("Expected every ") + what + " between 0 and " + std::to_string(V - 1) + " for " + op);
  check_status(env, s, be, op);
}

// layerNorm(y, mean, rstd, x, w|null, b|null, N, C, eps)
Napi::Value LayerNorm(const Napi::CallbackInfo& info) {
  Storage *y = storage_arg(info, 0, "y"), *mean = storage_arg(info, 1, "mean"), *rstd = storage_arg(info, 2, "rstd"),
          *x = storage_arg(info, 3, "x"), *w = optional_storage_arg(info, 4, "weight"), *b = optional_storage_arg(info, 5, "bias");
  int64_t N = size_arg(info, 6, "N"), C = size_arg(info, 7, "C");
  Backend* be = same_backend(info, {y, mean, rstd, x, w, b});
  need(info, y, DType::F32, mul_sat(N, C), "y");
  need(info, mean, DType::F32, N, "mean");
  need(info, rstd, DType::F32, N, "rstd");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  need(info, w, DType::F32, C, "weight");
  need(info, b, DType::F32, C, "bias");
  check_status(info.Env(), be->layer_norm(ptr<float>(y), ptr<float>(mean), ptr<float>(rstd), ptr<float>(x), ptr<float>(w),
                                          ptr<float>(b), N, C, float_arg(info, 8, "eps")),
               be, "layer_norm");
  return info.Env().Undefined();
}

// layerNormBackward(dx, dw|null, db|null, dy, x, w|null, mean, rstd, N, C)
Napi::Value LayerNormBackward(const Napi::CallbackInfo& info) {
  Storage *dx = storage_arg(info, 0, "dx"), *dw = optional_storage_arg(info, 1, "dw"), *db = optional_storage_arg(info, 2, "db"),
          *dy = storage_arg(info, 3, "dy"), *x = storage_arg(info, 4, "x"), *w = optional_storage_arg(info, 5, "weight"),
          *mean = storage_arg(info, 6, "mean"), *rstd = storage_arg(info, 7, "rstd");
  int64_t N = size_arg(info, 8, "N"), C = size_arg(info, 9, "C");
  Backend* be = same_backend(info, {dx, dw, db, dy, x, w, mean, rstd});
  need(info, dx, DType::F32, mul_sat(N, C), "dx");
  need(info, dw, DType::F32, C, "dw");
  need(info, db, DType::F32, C, "db");
  need(info, dy, DType::F32, mul_sat(N, C), "dy");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  need(info, w, DType::F32, C, "weight");
  need(info, mean, DType::F32, N, "mean");
  need(info, rstd, DType::F32, N, "rstd");
  check_status(info.Env(),
               be->layer_norm_backward(ptr<float>(dx), ptr<float>(dw), ptr<float>(db), ptr<float>(dy), ptr<float>(x), ptr<float>(w),
                                       ptr<float>(mean), ptr<float>(rstd), N, C),
               be, "layer_norm_backward");
  return info.Env().Undefined();
}

// rmsNorm(y, rstd, x, w|null, N, C, eps)
Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
  Storage *y = storage_arg(info, 0, "y"), *rstd = storage_arg(info, 1, "rstd"), *x = storage_arg(info, 2, "x"),
          *w = optional_storage_arg(info, 3, "weight");
  int64_t N = size_arg(info, 4, "N"), C = size_arg(info, 5, "C");
  Backend* be = same_backend(info, {y, rstd, x, w});
  need(info, y, DType::F32, mul_sat(N, C), "y");
  need(info, rstd, DType::F32, N, "rstd");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  need(info, w, DType::F32, C, "weight");
  check_status(info.Env(), be->rms_norm(ptr<float>(y), ptr<float>(rstd), ptr<float>(x), ptr<float>(w), N, C, float_arg(info, 6, "eps")),
               be, "rms_norm");
  return info.Env().Undefined();
}

// rmsNormBackward(dx, dw|null, dy, x, w|null, rstd, N, C)
Napi::Value RmsNormBackward(const Napi::CallbackInfo& info) {
  Storage *dx = storage_arg(info, 0, "dx"), *dw = optional_storage_arg(info, 1, "dw"), *dy = storage_arg(info, 2, "dy"),
          *x = storage_arg(info, 3, "x"), *w = optional_storage_arg(info, 4, "weight"), *rstd = storage_arg(info, 5, "rstd");
  int64_t N = size_arg(info, 6, "N"), C = size_arg(info, 7, "C");
  Backend* be = same_backend(info, {dx, dw, dy, x, w, rstd});
  need(info, dx, DType::F32, mul_sat(N, C), "dx");
  need(info, dw, DType::F32, C, "dw");
  need(info, dy, DType::F32, mul_sat(N, C), "dy");
  need(info, x, DType::F32, mul_sat(N, C), "x");
  need(info, w, DType::F32, C, "weight");
  need(info, rstd, DType::F32, N, "rstd");
  check_status(info.Env(),
               be->rms_norm_backward(ptr<float>(dx), ptr<float>(dw), ptr<float>(dy), ptr<float>(x), ptr<float>(w), ptr<float>(rstd), N, C),
               be, "rms_norm_backward");
  return info.Env().Undefined();
}

// embedding(out, table, ids, N, V, C)
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  Storage *out = storage_arg(info, 0, "out"), *table = storage_arg(info, 1, "table"), *ids = storage_arg(info, 2, "ids");
  int64_t N = size_arg(info, 3, "N"), V = size_arg(info, 4, "V"), C = size_arg(info, 5, "C");
  Backend* be = same_backend(info, {out, table, ids});
  need(info, out, DType::F32, mul_sat(N, C), "out");
  need(info, table, DType::F32, mul_sat(V, C), "table");
  need(info, ids, DType::I32, N, "ids");
  check_ids_status(info.Env(), be->embedding(ptr<float>(out), ptr<float>(table), ptr<int32_t>(ids), N, V, C), be, "embedding",
                   "id", V);
  return info.Env().Undefined();
}

// embeddingBackward(dtable, dout, ids, N, V, C): dtable +=
Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
  Storage *dtable = storage_arg(info, 0, "dtable"), *dout = storage_arg(info, 1, "dout"), *ids = storage_arg(info, 2, "ids");
  int64_t N = size_arg(info, 3, "N"), V = size_arg(info, 4, "V"), C = size_arg(info, 5, "C");
  Backend* be = same_backend(info, {dtable, dout, ids});
  need(info, dtable, DType::F32, mul_sat(V, C), "dtable");
  need(info, dout, DType::F32, mul_sat(N, C), "dout");
  need(info, ids, DType::I32, N, "ids");
  check_ids_status(info.Env(), be->embedding_backward(ptr<float>(dtable), ptr<float>(dout), ptr<int32_t>(ids), N, V, C), be,
                   "embedding_backward", "id", V);
  return info.Env().Undefined();
}

int32_t ignore_index_arg(const Napi::CallbackInfo& info, size_t i) {
  int64_t v = int_arg(info, i, "ignoreIndex");
  if (v < INT32_MIN || v > INT32_MAX) throw_lora(info.Env(), "ERR_LORA_RANGE", "ignoreIndex must fit in int32");
  return static_cast<int32_t>(v);
}

// crossEntropy(loss, lse, logits, targets, N, V, ignoreIndex, smoothing)
Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
  Storage *loss = storage_arg(info, 0, "loss"), *lse = storage_arg(info, 1, "lse"), *logits = storage_arg(info, 2, "logits"),
          *targets = storage_arg(info, 3, "targets");
  int64_t N = size_arg(info, 4, "N"), V = size_arg(info, 5, "V");
  int32_t ignore = ignore_index_arg(info, 6);
  float eps = float_arg(info, 7, "labelSmoothing");
  if (!(eps >= 0.0f && eps <= 1.0f)) throw_lora(info.Env(), "ERR_LORA_RANGE", "labelSmoothing must be in [0, 1]");
  Backend* be = same_backend(info, {loss, lse, logits, targets});
  need(info, loss, DType::F32, N, "loss");
  need(info, lse, DType::F32, N, "lse");
  need(info, logits, DType::F32, mul_sat(N, V), "logits");
  need(info, targets, DType::I32, N, "targets");
  check_ids_status(info.Env(),
                   be->cross_entropy(ptr<float>(loss), ptr<float>(lse), ptr<float>(logits), ptr<int32_t>(targets), N, V, ignore, eps),
                   be, "cross_entropy", "target (or ignoreIndex)", V);
  return info.Env().Undefined();
}

// crossEntropyBackward(dlogits, dloss, logits, lse, targets, N, V, ignoreIndex, smoothing)
Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
  Storage *dlogits = storage_arg(info, 0, "dlogits"), *dloss = storage_arg(info, 1, "dloss"),
          *logits = storage_arg(info, 2, "logits"), *lse = storage_arg(info, 3, "lse"), *targets = storage_arg(info, 4, "targets");
  int64_t N = size_arg(info, 5, "N"), V = size_arg(info, 6, "V");
  int32_t ignore = ignore_index_arg(info, 7);
  float eps = float_arg(info, 8, "labelSmoothing");
  if (!(eps >= 0.0f && eps <= 1.0f)) throw_lora(info.Env(), "ERR_LORA_RANGE", "labelSmoothing must be in [0, 1]");
  Backend* be = same_backend(info, {dlogits, dloss, logits, lse, targets});
  need(info, dlogits, DType::F32, mul_sat(N, V), "dlogits");
  need(info, dloss, DType::F32, N, "dloss");
  need(info, logits, DType::F32, mul_sat(N, V), "logits");
  need(info, lse, DType::F32, N, "lse");
  need(info, targets, DType::I32, N, "targets");
  check_ids_status(info.Env(),
                   be->cross_entropy_backward(ptr<float>(dlogits), ptr<float>(dloss), ptr<float>(logits), ptr<float>(lse),
                                              ptr<int32_t>(targets), N, V, ignore, eps),
                   be, "cross_entropy_backward", "target (or ignoreIndex)", V);
  return info.Env().Undefined();
}

// The trailing arguments of attention and attentionBackward, from info[i]: keyMask|null,
// keyMaskStride, segmentIds|null, segmentStride, B, T, S, Smax, H, KVH, D, scale, causal, window.
// k and v (dk, dv) hold Smax positions per batch entry, of which the first S take part.
struct AttentionCall {
  AttentionArgs a;
  Storage *mask, *segments;
  int64_t Smax;
};
AttentionCall attention_call(const Napi::CallbackInfo& info, size_t i) {
  AttentionCall c;
  AttentionArgs& a = c.a;
  c.mask = optional_storage_arg(info, i, "keyMask");
  a.key_mask_stride = size_arg(info, i + 1, "keyMaskStride");
  c.segments = optional_storage_arg(info, i + 2, "segmentIds");
  a.segment_stride = size_arg(info, i + 3, "segmentStride");
  a.B = size_arg(info, i + 4, "B");
  a.T = size_arg(info, i + 5, "T");
  a.S = size_arg(info, i + 6, "S");
  c.Smax = size_arg(info, i + 7, "Smax");
  a.H = size_arg(info, i + 8, "H");
  a.KVH = size_arg(info, i + 9, "KVH");
  a.D = size_arg(info, i + 10, "D");
  a.scale = float_arg(info, i + 11, "scale");
  a.causal = bool_arg(info, i + 12, "causal");
  a.window = size_arg(info, i + 13, "window");
  a.kv_batch_stride = mul_sat(mul_sat(c.Smax, a.KVH), a.D);
  if (c.Smax < a.S || (c.mask && a.key_mask_stride < a.S) || (c.segments && a.segment_stride < a.S) ||
      !lora::attention_args_valid(a))
    throw_lora(info.Env(), "ERR_LORA_SHAPE",
               "attention sizes do not fit together (B " + std::to_string(a.B) + ", T " + std::to_string(a.T) + ", S " +
                   std::to_string(a.S) + ", Smax " + std::to_string(c.Smax) + ", H " + std::to_string(a.H) + ", KVH " +
                   std::to_string(a.KVH) + ", D " + std::to_string(a.D) + ")");
  // a mask row b starts at b·stride and reads S entries
  const int64_t rows = a.B > 0 ? add_sat(mul_sat(a.B - 1, a.key_mask_stride), a.S) : 0;
  need(info, c.mask, DType::I32, rows, "keyMask");
  need(info, c.segments, DType::I32, a.B > 0 ? add_sat(mul_sat(a.B - 1, a.segment_stride), a.S) : 0, "segmentIds");
  a.key_mask = c.mask ? ptr<int32_t>(c.mask) : nullptr;
  a.segment_ids = c.segments ? ptr<int32_t>(c.segments) : nullptr;
  return c;
}

// attention(out, lse, q, k, v, keyMask|null, keyMaskStride, segmentIds|null, segmentStride, B, T, S, Smax, H, KVH,
//           D, scale, causal, window)
Napi::Value Attention(const Napi::CallbackInfo& info) {
  Storage *out = storage_arg(info, 0, "out"), *lse = storage_arg(info, 1, "lse"), *q = storage_arg(info, 2, "q"),
          *k = storage_arg(info, 3, "k"), *v = storage_arg(info, 4, "v");
  const AttentionCall c = attention_call(info, 5);
  const AttentionArgs& a = c.a;
  Backend* be = same_backend(info, {out, lse, q, k, v, c.mask, c.segments});
  const int64_t nq = mul_sat(mul_sat(mul_sat(a.B, a.T), a.H), a.D), nkv = mul_sat(a.B, a.kv_batch_stride);
  need(info, out, DType::F32, nq, "out");
  need(info, lse, DType::F32, mul_sat(mul_sat(a.B, a.H), a.T), "lse");
  need(info, q, DType::F32, nq, "q");
  need(info, k, DType::F32, nkv, "k");
  need(info, v, DType::F32, nkv, "v");
  check_status(info.Env(), be->attention(ptr<float>(out), ptr<float>(lse), ptr<float>(q), ptr<float>(k), ptr<float>(v), a),
               be, "attention");
  return info.Env().Undefined();
}

// attentionBackward(dq, dk, dv, dout, q, k, v, out, lse, <the trailing arguments of attention>)
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Storage *dq = storage_arg(info, 0, "dq"), *dk = storage_arg(info, 1, "dk"), *dv = storage_arg(info, 2, "dv"),
          *dout = storage_arg(info, 3, "dout"), *q = storage_arg(info, 4, "q"), *k = storage_arg(info, 5, "k"),
          *v = storage_arg(info, 6, "v"), *out = storage_arg(info, 7, "out"), *lse = storage_arg(info, 8, "lse");
  const AttentionCall c = attention_call(info, 9);
  const AttentionArgs& a = c.a;
  Backend* be = same_backend(info, {dq, dk, dv, dout, q, k, v, out, lse, c.mask, c.segments});
  const int64_t nq = mul_sat(mul_sat(mul_sat(a.B, a.T), a.H), a.D), nkv = mul_sat(a.B, a.kv_batch_stride);
  for (Storage* s : {dq, dout, q, out}) need(info, s, DType::F32, nq, "an attention query-side tensor");
  for (Storage* s : {dk, dv, k, v}) need(info, s, DType::F32, nkv, "an attention key-side tensor");
  need(info, lse, DType::F32, mul_sat(mul_sat(a.B, a.H), a.T), "lse");
  check_status(info.Env(),
               be->attention_backward(ptr<float>(dq), ptr<float>(dk), ptr<float>(dv), ptr<float>(dout), ptr<float>(q),
                                      ptr<float>(k), ptr<float>(v), ptr<float>(out), ptr<float>(lse), a),
               be, "attention_backward");
  return info.Env().Undefined();
}

// setErrorClass(LoraError): native errors are constructed as new LoraError(code, message).
Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "Expected the LoraError class");
  data_of(info.Env()).error_ctor = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

// ---- async ops ------------------------------------------------------------------------------
// A kernel run on libuv's thread pool, settling a promise. The worker holds the Blocks it uses,
// so dispose() (or the garbage collector) during the op cannot free memory under it. Execute()
// runs under the addon's mutex; kernels may throw std::bad_alloc, which becomes a status.
class KernelWorker : public Napi::AsyncWorker {
 public:
  KernelWorker(Napi::Env env, const char* op, Backend* backend, std::vector<std::shared_ptr<Block>> blocks)
      : Napi::AsyncWorker(env, op),
        deferred_(Napi::Promise::Deferred::New(env)),
        op_(op),
        backend_(backend),
        state_(data_of(env).state),
        blocks_(std::move(blocks)) {}

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    std::lock_guard<std::recursive_mutex> lock(state_->mu);
    try {
      status_ = run();
      if (status_ != Status::Ok) {
        const char* d = backend_->last_error();
        detail_ = d ? d : "";
      }
    } catch (const std::bad_alloc&) {
      status_ = Status::OutOfMemory;
    } catch (const std::exception& e) {
      status_ = Status::InvalidArgument;
      detail_ = e.what();
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (status_ == Status::Ok) {
      deferred_.Resolve(result(env));
      return;
    }
    std::string msg = std::string(op_) + " failed on " + backend_->name() + ": " + lora::status_name(status_);
    if (!detail_.empty()) msg += " (" + detail_ + ")";
    deferred_.Reject(make_lora_error(env, status_code(status_), msg));
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 protected:
  virtual Status run() = 0;
  virtual Napi::Value result(Napi::Env env) { return env.Undefined(); }

  Napi::Promise::Deferred deferred_;
  const char* op_;
  Backend* backend_;
  std::shared_ptr<AddonState> state_;
  std::vector<std::shared_ptr<Block>> blocks_;
  Status status_ = Status::Ok;
  std::string detail_;
};

// loraMergeAsync(W, A, B, OC, C, R, s): loraMerge off the main thread; resolves undefined.
Napi::Value LoraMergeAsync(const Napi::CallbackInfo& info) {
  Storage *W = storage_arg(info, 0, "weight"), *A = storage_arg(info, 1, "loraA"), *B = storage_arg(info, 2, "loraB");
  int64_t OC = size_arg(info, 3, "OC"), C = size_arg(info, 4, "C"), R = size_arg(info, 5, "R");
  float s = float_arg(info, 6, "scaling");
  Backend* be = same_backend(info, {W, A, B});
  if (W->dtype_ != DType::F32 && W->dtype_ != DType::BF16) throw_lora(info.Env(), "ERR_LORA_DTYPE", "weight must be float32 or bfloat16");
  need(info, W, W->dtype_, mul_sat(OC, C), "weight");
  need(info, A, DType::F32, mul_sat(R, C), "loraA");
  need(info, B, DType::F32, mul_sat(OC, R), "loraB");
  struct Merge : KernelWorker {
    using KernelWorker::KernelWorker;
    void* W;
    DType wt;
    const float *A, *B;
    int64_t OC, C, R;
    float s;
    Status run() override { return backend_->lora_merge(W, wt, A, B, OC, C, R, s); }
  };
  auto* w = new Merge(info.Env(), "lora_merge", be, {W->block_, A->block_, B->block_});
  w->W = W->ptr_;
  w->wt = W->dtype_;
  w->A = ptr<float>(A);
  w->B = ptr<float>(B);
  w->OC = OC;
  w->C = C;
  w->R = R;
  w->s = s;
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

// toHostAsync(storage): toHost off the main thread; resolves a new ArrayBuffer with a copy.
Napi::Value ToHostAsync(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  struct Download : KernelWorker {
    using KernelWorker::KernelWorker;
    Napi::Reference<Napi::ArrayBuffer> buf;
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
    Status run() override { return backend_->download(dst, src, bytes); }
    Napi::Value result(Napi::Env) override { return buf.Value(); }
  };
  // The buffer is made here, on the main thread, and is unreachable from JS until the promise
  // settles, so the worker thread may fill its memory.
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(info.Env(), s->bytes());
  auto* w = new Download(info.Env(), "download", s->backend_, {s->block_});
  w->buf = Napi::Persistent(buf);
  w->dst = buf.Data();
  w->src = s->ptr_;
  w->bytes = s->bytes();
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

// The path of this .node file (liblora_cuda.so sits beside it).
std::string own_path() {
  Dl_info dl{};
  if (dladdr(reinterpret_cast<void*>(&own_path), &dl) == 0 || !dl.dli_fname) return "";
  return dl.dli_fname;
}

std::string directory_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// Every exported function runs under the addon's mutex (see the top of this file).
using Entry = std::pair<const char*, Napi::Function::Callback>;

Napi::Value Locked(const Napi::CallbackInfo& info) {
  const Entry* e = static_cast<const Entry*>(info.Data());
  std::lock_guard<std::recursive_mutex> lock(data_of(info.Env()).state->mu);
  return e->second(info);
}

int default_threads() {
  const char* env = std::getenv("LORA_NATIVE_THREADS");
  if (env && *env) {
    int n = std::atoi(env);
    if (n >= 1 && n <= 1024) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : static_cast<int>(hc);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new InstanceData();
  data->state = std::make_shared<AddonState>();
  data->state->cpu = lora::make_cpu_backend(default_threads());
  data->state->addon_path = own_path();
  data->state->addon_dir = directory_of(data->state->addon_path);
  Napi::Function ctor = Storage::Define(env);
  data->storage_ctor = Napi::Persistent(ctor);
  env.SetInstanceData<InstanceData>(data);  // deleted (and the state released) at env teardown

  exports.Set("Storage", ctor);
  static const Entry fns[] = {
      {"setErrorClass", SetErrorClass}, {"alloc", Alloc}, {"fromHost", FromHost}, {"toHost", ToHost},
      {"copyInto", CopyInto}, {"toDevice", ToDevice}, {"convert", Convert}, {"dispose", Dispose},
      {"fill", Fill}, {"memory", Memory}, {"releaseCached", ReleaseCached}, {"setNumThreads", SetNumThreads},
      {"getNumThreads", GetNumThreads}, {"features", Features}, {"loraForward", LoraForward},
      {"loraBackward", LoraBackward}, {"loraMerge", LoraMerge}, {"adamwStep", AdamwStep}, {"sgdStep", SgdStep},
      {"gemm", Gemm}, {"binary", Binary}, {"binaryScalar", BinaryScalar}, {"unary", Unary},
      {"unaryBackward", UnaryBackward}, {"axpy", Axpy}, {"reduce", Reduce}, {"copyStrided", CopyStrided},
      {"softmax", Softmax}, {"softmaxBackward", SoftmaxBackward}, {"dropout", Dropout},
      {"layerNorm", LayerNorm}, {"layerNormBackward", LayerNormBackward}, {"rmsNorm", RmsNorm},
      {"rmsNormBackward", RmsNormBackward}, {"embedding", Embedding}, {"embeddingBackward", EmbeddingBackward},
      {"crossEntropy", CrossEntropy}, {"crossEntropyBackward", CrossEntropyBackward}, {"attention", Attention},
      {"attentionBackward", AttentionBackward}, {"loraMergeAsync", LoraMergeAsync}, {"toHostAsync", ToHostAsync},
  };
  for (const auto& f : fns)
    exports.Set(f.first, Napi::Function::New(env, Locked, f.first, const_cast<void*>(static_cast<const void*>(&f))));
  return exports;
}

}  // namespace

NODE_API_MODULE(lora_native, Init)
