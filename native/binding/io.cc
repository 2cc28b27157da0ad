// The binding's data movement: host arrays in and out of storages (sync and async), copies
// between storages and devices, dtype conversion. Reads always copy; no external buffers.
#include <string>
#include <vector>

#include "args.h"

namespace lora {
namespace binding {
namespace {

// The data pointer and byte length of a typed array argument. The C API gives the data pointer for
// ArrayBuffer- and SharedArrayBuffer-backed arrays alike (Napi::TypedArray::ArrayBuffer() throws a
// plain Error for a SharedArrayBuffer); a detached array reports no data.
uint8_t* host_bytes_arg(const Napi::CallbackInfo& info, size_t i, const char* what, size_t* bytes) {
  Napi::Env env = info.Env();
  napi_typedarray_type type;
  size_t length = 0, offset = 0;
  void* data = nullptr;
  napi_value ab;
  if (!info[i].IsTypedArray() || napi_get_typedarray_info(env, info[i], &type, &length, &data, &ab, &offset) != napi_ok)
    throw_lora(env, "ERR_LORA_TYPE", std::string("Expected a typed array of ") + what);
  *bytes = info[i].As<Napi::TypedArray>().ByteLength();
  if (!data && *bytes != 0) throw_lora(env, "ERR_LORA_TYPE", "the data's buffer is detached");
  return static_cast<uint8_t*>(data);
}

// fromHost(device, dtype, typedArray): a new storage holding a copy of the array's bytes.
Napi::Value FromHost(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t device = device_arg(info, 0);
  const lora_dtype dtype = dtype_arg(info, 1);
  size_t bytes = 0;
  const uint8_t* data = host_bytes_arg(info, 2, "data", &bytes);
  const size_t es = lora_dtype_size(dtype);
  if (bytes % es) throw_lora(env, "ERR_LORA_SHAPE", "data length is not a whole number of elements");
  Napi::Object obj = make_storage(env, device, dtype, static_cast<int64_t>(bytes / es));
  Storage* s = Storage::Unwrap(obj);
  check_status(env, s->backend_->upload(s->backend_, s->ptr_, data, bytes), s->backend_, "upload");
  return obj;
}

// The storage's address at byteOffset, after checking that [byteOffset, byteOffset + bytes) lies
// inside the allocation.
uint8_t* storage_range(const Napi::CallbackInfo& info, Storage* s, int64_t byte_offset, size_t bytes) {
  const size_t total = s->bytes();
  if (static_cast<uint64_t>(byte_offset) > total || bytes > total - static_cast<size_t>(byte_offset))
    throw_lora(info.Env(), "ERR_LORA_RANGE",
               "byte range [" + std::to_string(byte_offset) + ", +" + std::to_string(bytes) + ") lies outside the " +
                   std::to_string(total) + "-byte tensor");
  return static_cast<uint8_t*>(s->ptr_) + byte_offset;
}

// writeBytes(storage, byteOffset, typedArray) copies the array's bytes into the storage at a byte
// offset; readBytes(storage, byteOffset, typedArray) copies bytes from that offset into the array.
// They move a tensor through a small staging buffer in pieces (lib/safetensors.ts): one
// ArrayBuffer view holds at most 2^32 elements, and a file tensor may be larger than that.
Napi::Value WriteBytes(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  const int64_t at = size_arg(info, 1, "byteOffset");
  size_t bytes = 0;
  const uint8_t* src = host_bytes_arg(info, 2, "bytes", &bytes);
  uint8_t* dst = storage_range(info, s, at, bytes);
  if (bytes) check_status(info.Env(), s->backend_->upload(s->backend_, dst, src, bytes), s->backend_, "upload");
  return info.Env().Undefined();
}

Napi::Value ReadBytes(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  const int64_t at = size_arg(info, 1, "byteOffset");
  size_t bytes = 0;
  uint8_t* dst = host_bytes_arg(info, 2, "bytes", &bytes);
  const uint8_t* src = storage_range(info, s, at, bytes);
  if (bytes) check_status(info.Env(), s->backend_->download(s->backend_, dst, src, bytes), s->backend_, "download");
  return info.Env().Undefined();
}

// toHost(storage): a copy of the raw bytes in a new ArrayBuffer.
Napi::Value ToHost(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(info.Env(), s->bytes());
  check_status(info.Env(), s->backend_->download(s->backend_, buf.Data(), s->ptr_, s->bytes()), s->backend_, "download");
  return buf;
}

// toHostAsync(storage): toHost off the main thread; resolves a new ArrayBuffer with a copy.
Napi::Value ToHostAsync(const Napi::CallbackInfo& info) {
  Storage* s = storage_arg(info, 0, "tensor");
  // The buffer is made here, on the main thread, and is unreachable from JS until the promise
  // settles, so the worker thread may fill its memory.
  Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(info.Env(), s->bytes());
  auto ref = std::make_shared<Napi::Reference<Napi::ArrayBuffer>>(Napi::Persistent(buf));
  lora_backend* be = s->backend_;
  void* dst = buf.Data();
  const void* src = s->ptr_;
  const size_t bytes = s->bytes();
  return queue_kernel(info.Env(), "download", be, {s->block_},
                      [be, dst, src, bytes]() { return be->download(be, dst, src, bytes); },
                      [ref](Napi::Env) -> Napi::Value { return ref->Value(); });
}

// copyInto(dst, src): same device, same dtype, same byte size.
Napi::Value CopyInto(const Napi::CallbackInfo& info) {
  Storage* dst = storage_arg(info, 0, "destination");
  Storage* src = storage_arg(info, 1, "source");
  lora_backend* be = same_backend(info, {dst, src});
  need(info, dst, src->dtype_, src->numel_, "destination");
  check_status(info.Env(), be->copy(be, dst->ptr_, src->ptr_, src->bytes()), be, "copy");
  return info.Env().Undefined();
}

// toDevice(storage, device): a copy on another device, through host memory.
Napi::Value ToDevice(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Storage* s = storage_arg(info, 0, "tensor");
  const int32_t device = device_arg(info, 1);
  Napi::Object obj = make_storage(env, device, s->dtype_, s->numel_);
  Storage* d = Storage::Unwrap(obj);
  std::vector<uint8_t> host(s->bytes());
  check_status(env, s->backend_->download(s->backend_, host.data(), s->ptr_, s->bytes()), s->backend_, "download");
  check_status(env, d->backend_->upload(d->backend_, d->ptr_, host.data(), host.size()), d->backend_, "upload");
  return obj;
}

// convert(dst, src): elementwise dtype conversion, same device and element count.
Napi::Value Convert(const Napi::CallbackInfo& info) {
  Storage* dst = storage_arg(info, 0, "destination");
  Storage* src = storage_arg(info, 1, "source");
  lora_backend* be = same_backend(info, {dst, src});
  if (dst->numel_ < src->numel_) throw_lora(info.Env(), "ERR_LORA_SHAPE", "destination too small");
  require_entry(info.Env(), be->convert != nullptr, be, "convert");
  check_status(info.Env(), be->convert(be, dst->ptr_, dst->dtype_, src->ptr_, src->dtype_, src->numel_), be, "convert");
  return info.Env().Undefined();
}

}  // namespace

void register_io(Registry& r) {
  r.fn("fromHost", FromHost, "(device: number, dtype: number, data: ArrayBufferView): S");
  r.fn("toHost", ToHost, "(s: S): ArrayBuffer");
  r.fn("toHostAsync", ToHostAsync, "(s: S): Promise<ArrayBuffer>");
  r.fn("writeBytes", WriteBytes, "(s: S, byteOffset: number, data: ArrayBufferView): void");
  r.fn("readBytes", ReadBytes, "(s: S, byteOffset: number, into: ArrayBufferView): void");
  r.fn("copyInto", CopyInto, "(dst: S, src: S): void");
  r.fn("toDevice", ToDevice, "(s: S, device: number): S");
  r.fn("convert", Convert, "(dst: S, src: S): void", LORA_OP_CONVERT, &lora_backend::convert);
}

}  // namespace binding
}  // namespace lora
