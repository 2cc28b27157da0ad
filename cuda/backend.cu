// The CUDA backend's state and table (native/backend/backend.h) on one NVIDIA GPU: a size-bucketed
// caching device allocator, one non-blocking stream, host/device copies, and the assembly of the
// kernel entries each .cu file registers. After a sticky CUDA error (illegal address, launch
// failure, ...) every entry returns LORA_UNUSABLE and last_error() says why. The library exports
// two C functions, lora_cuda_backend_abi and lora_cuda_backend_init. Not multi-GPU: device 0.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "../native/backend/env.h"
#include "common.cuh"

namespace lora {
namespace cuda {
namespace {

bool is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorMisalignedAddress:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorUnknown:
      return true;
    default:
      return false;
  }
}

// Allocation size classes: 512 B minimum; powers of two up to 1 MiB; above that 16 steps per
// power of two (at most 1/8 wasted), so a training loop's recurring sizes hit the cache.
size_t bucket_size(size_t bytes) {
  constexpr size_t kMin = 512;           // cudaMalloc aligns to 256 B; smaller is not worth a class
  constexpr size_t kSmall = 1u << 20;    // below 1 MiB a power of two wastes little absolute memory
  if (bytes <= kMin) return kMin;
  size_t p = kMin;
  while (p < bytes) p <<= 1;
  if (p <= kSmall) return p;
  const size_t step = p / 16;
  return (bytes + step - 1) / step * step;
}

}  // namespace

Context::Context(int device, cudaStream_t stream, int sm_count)
    : device_(device), stream_(stream), sm_count_(sm_count) {
  cudaDeviceGetAttribute(&max_smem_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // "staged": benchmark the other tensor-core GEMM variant; "simt": adapter GEMMs on CUDA cores
  tc_pipelined_ = !env_is("LORA_NATIVE_CUDA_TC", "LORA_CUDA_TC", "staged");
  skinny_tc_ = !env_is("LORA_NATIVE_CUDA_SKINNY", "LORA_CUDA_SKINNY", "simt");
}

Context::~Context() {
  release_cached();
  optim_release(*this);
  if (stream_) cudaStreamDestroy(stream_);
}

// ---- memory ------------------------------------------------------------------------------
void* Context::alloc(size_t bytes) {
  if (unusable_) return nullptr;
  const size_t size = bucket_size(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = free_.find(size);
  if (it != free_.end() && !it->second.empty()) {
    void* p = it->second.back();
    it->second.pop_back();
    cached_ -= size;
    return p;
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, size);
  if (e == cudaErrorMemoryAllocation) {  // give the cache back and try once more
    cudaGetLastError();
    release_locked();
    e = cudaMalloc(&p, size);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    note_error(e, "alloc");
    return nullptr;
  }
  return p;
}

void Context::free(void* ptr, size_t bytes) {
  if (ptr == nullptr) return;
  const size_t size = bucket_size(bytes);
  std::lock_guard<std::mutex> lock(mu_);
  // Stream order makes reuse safe: every later use of this block is queued behind the work
  // already submitted that may still read it.
  free_[size].push_back(ptr);
  cached_ += size;
}

size_t Context::cached_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cached_;
}

void Context::release_cached() {
  std::lock_guard<std::mutex> lock(mu_);
  release_locked();
}

void Context::release_locked() {
  if (!free_.empty()) cudaStreamSynchronize(stream_);  // cudaFree syncs too; be explicit
  for (auto& kv : free_)
    for (void* p : kv.second) cudaFree(p);
  free_.clear();
  cached_ = 0;
}

// Turns a CUDA error into a Status, remembering its text; sticky errors poison the backend.
lora_status Context::check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return LORA_OK;
  cudaGetLastError();  // clear a non-sticky error so the next launch does not report it again
  return note_error(e, what);
}

lora_status Context::note_error(cudaError_t e, const char* what) {
  char buf[512];
  if (is_sticky(e)) {
    unusable_ = true;
    std::snprintf(buf, sizeof buf,
                  "CUDA error in %s: %s (%s). The GPU context is unusable after this error; "
                  "restart the process to use CUDA again.",
                  what, cudaGetErrorString(e), cudaGetErrorName(e));
    set_error_text(buf);
    return LORA_UNUSABLE;
  }
  std::snprintf(buf, sizeof buf, "CUDA error in %s: %s (%s)", what, cudaGetErrorString(e),
                cudaGetErrorName(e));
  set_error_text(buf);
  return e == cudaErrorMemoryAllocation ? LORA_OUT_OF_MEMORY : LORA_DEVICE_ERROR;
}

// Methods may run on libuv worker threads (the async binding calls) as well as the JS thread:
// the stream is shared (the CUDA runtime is thread-safe), the error text is a fixed buffer
// written under a lock, so a reader never sees freed memory.
void Context::set_error_text(const char* text) {
  std::lock_guard<std::mutex> lock(error_mu_);
  std::snprintf(error_, sizeof error_, "%s", text);
}

lora_status Context::download(void* host_dst, const void* src, size_t bytes) {
  if (unusable_) return LORA_UNUSABLE;
  if (bytes == 0) return LORA_OK;
  lora_status s = check(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download");
  if (s != LORA_OK) return s;
  return check(cudaStreamSynchronize(stream_), "download");
}

namespace {

void destroy(lora_backend* be) {
  delete &ctx(be);
  delete be;
}

const char* last_error(lora_backend* be) { return ctx(be).last_error(); }
bool unusable(lora_backend* be) { return ctx(be).unusable(); }

// Every entry computes in fp32; the LoRA kernels and gemm also read a bf16 weight (and the LoRA
// kernels an f16 one, on tensor cores), the embedding lookup a bf16 or f16 table.
bool supports(lora_backend* be, int32_t op, int32_t dtype) {
  switch (op) {
    case LORA_OP_EMBEDDING: return dtype == LORA_F32 || dtype == LORA_BF16 || dtype == LORA_F16;
    case LORA_OP_LORA_FORWARD: case LORA_OP_LORA_BACKWARD: case LORA_OP_LORA_MERGE:
      return dtype == LORA_F32 || dtype == LORA_BF16 || dtype == LORA_F16;
    case LORA_OP_GEMM: return dtype == LORA_F32 ? be->gemm != nullptr : dtype == LORA_BF16 && be->gemm_bf16 != nullptr;
    case LORA_OP_CONVERT: return dtype != LORA_I32;
    default: return op >= 0 && op < LORA_OP_COUNT && dtype == LORA_F32;
  }
}

void* alloc(lora_backend* be, size_t bytes) { return ctx(be).alloc(bytes); }
void free_block(lora_backend* be, void* ptr, size_t bytes) { ctx(be).free(ptr, bytes); }
size_t cached_bytes(lora_backend* be) { return ctx(be).cached_bytes(); }
void release_cached(lora_backend* be) { ctx(be).release_cached(); }
lora_status download(lora_backend* be, void* host_dst, const void* src, size_t bytes) {
  return ctx(be).download(host_dst, src, bytes);
}

lora_status upload(lora_backend* be, void* dst, const void* host_src, size_t bytes) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (bytes == 0) return LORA_OK;
  lora_status s = c.check(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, c.stream()), "upload");
  if (s != LORA_OK) return s;
  return c.check(cudaStreamSynchronize(c.stream()), "upload");  // the caller may free host_src now
}

lora_status copy(lora_backend* be, void* dst, const void* src, size_t bytes) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  if (bytes == 0 || dst == src) return LORA_OK;
  return c.check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c.stream()), "copy");
}

lora_status synchronize(lora_backend* be) {
  Context& c = ctx(be);
  if (c.unusable()) return LORA_UNUSABLE;
  return c.check(cudaStreamSynchronize(c.stream()), "synchronize");
}

lora_backend* make_table(Context* c) {
  auto* t = new lora_backend();  // value-initialised: every entry starts null
  t->abi_version = LORA_BACKEND_ABI_VERSION;
  t->struct_size = sizeof(lora_backend);
  t->name = "cuda";
  t->ctx = c;
  t->destroy = destroy;
  t->last_error = last_error;
  t->unusable = unusable;
  t->supports = supports;
  t->alloc = alloc;
  t->free = free_block;
  t->upload = upload;
  t->download = download;
  t->copy = copy;
  t->synchronize = synchronize;
  t->cached_bytes = cached_bytes;
  t->release_cached = release_cached;
  register_elementwise(*t);
  register_reduce(*t);
  register_gemm(*t);
  register_lora(*t);
  register_optim(*t);
  register_nn(*t);
  register_attention(*t);
  return t;
}

void set_error(char* err, size_t err_len, const std::string& text) {
  if (err == nullptr || err_len == 0) return;
  std::snprintf(err, err_len, "%s", text.c_str());
}

std::string cuda_failure(const char* what, cudaError_t e) {
  return std::string(what) + ": " + cudaGetErrorString(e) + " (" + cudaGetErrorName(e) + ")";
}

}  // namespace
}  // namespace cuda
}  // namespace lora

// The interface version this library was built against (native/backend/backend.h); the addon's
// loader refuses a library whose version differs from its own before calling anything else.
extern "C" __attribute__((visibility("default"))) uint32_t lora_cuda_backend_abi() { return LORA_BACKEND_ABI_VERSION; }

// Creates the backend on device 0 and fills in its table, or returns nullptr with the reason in
// err. Checks that this library's kernels can run there (compute capability 8.0 or newer) by
// running one.
extern "C" __attribute__((visibility("default"))) lora_backend* lora_cuda_backend_init(char* err, size_t err_len) {
  using namespace lora::cuda;
  try {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e == cudaErrorInsufficientDriver) {  // the likeliest failure on a GPU machine: say what to do
      int driver = 0;
      const bool known = cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0;
      const std::string built = "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
                                std::to_string(CUDART_VERSION % 1000 / 10);
      set_error(err, err_len,
                (known ? "the NVIDIA driver supports CUDA " + std::to_string(driver / 1000) + "." +
                             std::to_string(driver % 1000 / 10) + " but liblora_cuda.so was built with " + built
                       : "the NVIDIA driver is too old for liblora_cuda.so, which was built with " + built) +
                    " (CUDA 13 needs a driver of the R580 series or newer). Update the driver, or "
                    "rebuild liblora_cuda.so with the CUDA toolkit your driver supports "
                    "(`node scripts/build-cuda.js`) (" + cuda_failure("cudaGetDeviceCount", e) + ")");
      return nullptr;
    }
    if (e != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaGetDeviceCount failed", e));
      return nullptr;
    }
    if (count < 1) {
      set_error(err, err_len, "no CUDA device visible (CUDA_VISIBLE_DEVICES?)");
      return nullptr;
    }
    const int device = 0;
    if ((e = cudaSetDevice(device)) != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaSetDevice(0) failed", e));
      return nullptr;
    }
    int major = 0, minor = 0, sms = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (major < 8) {
      set_error(err, err_len, "GPU compute capability " + std::to_string(major) + "." +
                                  std::to_string(minor) +
                                  " is older than 8.0 (Ampere), the oldest liblora_cuda.so supports");
      return nullptr;
    }
    cudaStream_t stream = nullptr;
    if ((e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking)) != cudaSuccess) {
      set_error(err, err_len, cuda_failure("cudaStreamCreate failed", e));
      return nullptr;
    }
    lora_backend* b = make_table(new Context(device, stream, sms > 0 ? sms : 1));
    // Smoke test: one tiny kernel, so a missing kernel image or broken driver shows up here.
    Context& c = ctx(b);
    float* probe = static_cast<float*>(c.alloc(sizeof(float)));
    float value = 0.0f;
    lora_status st = probe ? b->fill(b, probe, 42.0f, 1) : LORA_OUT_OF_MEMORY;
    if (st == LORA_OK) st = c.download(&value, probe, sizeof(float));
    if (probe) c.free(probe, sizeof(float));
    if (st != LORA_OK || value != 42.0f) {
      set_error(err, err_len, std::string("CUDA smoke test failed: ") +
                                  (c.last_error()[0] ? c.last_error() : lora_status_name(st)));
      b->destroy(b);
      return nullptr;
    }
    return b;
  } catch (const std::exception& ex) {
    set_error(err, err_len, std::string("creating the CUDA backend failed: ") + ex.what());
    return nullptr;
  }
}
