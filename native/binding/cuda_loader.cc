// Finds and loads the CUDA backend at run time (cuda_loader.h). Compiled into the CPU
// addon with no CUDA headers: liblora_cuda.so is dlopen()ed from beside the addon, and the driver
// is probed through dlopen("libcuda.so.1") and a few driver-API prototypes declared here.
// Every failure is collected into one reason; nothing here aborts, prints or throws.
#include "cuda_loader.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace lora {
namespace {

// The driver API subset we call (cuda.h is deliberately not included: no CUDA headers here).
using CUresult = int;
using CUdevice = int;
constexpr CUresult kCudaSuccess = 0;
constexpr int kAttrComputeCapabilityMajor = 75;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
constexpr int kAttrComputeCapabilityMinor = 76;  // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
using cuInit_t = CUresult (*)(unsigned int);
using cuDeviceGetCount_t = CUresult (*)(int*);
using cuDeviceGet_t = CUresult (*)(CUdevice*, int);
using cuDeviceGetName_t = CUresult (*)(char*, int, CUdevice);
using cuDeviceGetAttribute_t = CUresult (*)(int*, int, CUdevice);
using cuDeviceTotalMem_t = CUresult (*)(size_t*, CUdevice);
using cuGetErrorString_t = CUresult (*)(CUresult, const char**);

// Exported only by the CPU emulator build (cuda/emu/): the device it stands for.
using lora_cuda_emulator_t = int (*)(char* name, size_t name_len, int* major, int* minor, size_t* memory);

std::string dl_error() {
  const char* e = dlerror();
  return e ? e : "unknown dlopen error";
}

template <typename F>
F symbol(void* lib, const char* name) {
  return reinterpret_cast<F>(dlsym(lib, name));
}

// Probes the driver and lists the devices. Returns "" on success, else the reason.
std::string probe_driver(CudaState* state) {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);  // kept open for the process
  if (lib == nullptr) return "no NVIDIA driver (libcuda.so.1 not found: " + dl_error() + ")";
  auto cu_init = symbol<cuInit_t>(lib, "cuInit");
  auto get_count = symbol<cuDeviceGetCount_t>(lib, "cuDeviceGetCount");
  auto get_device = symbol<cuDeviceGet_t>(lib, "cuDeviceGet");
  auto get_name = symbol<cuDeviceGetName_t>(lib, "cuDeviceGetName");
  auto get_attr = symbol<cuDeviceGetAttribute_t>(lib, "cuDeviceGetAttribute");
  auto total_mem = symbol<cuDeviceTotalMem_t>(lib, "cuDeviceTotalMem_v2");
  auto error_string = symbol<cuGetErrorString_t>(lib, "cuGetErrorString");
  if (!cu_init || !get_count || !get_device || !get_name || !get_attr || !total_mem)
    return "the NVIDIA driver's libcuda.so.1 lacks the driver API this library needs (driver too old?)";
  auto describe = [&](CUresult r) {
    const char* text = nullptr;
    if (error_string) error_string(r, &text);
    return std::string(text ? text : "unknown error") + " (CUresult " + std::to_string(r) + ")";
  };
  CUresult r = cu_init(0);
  if (r != kCudaSuccess) return "the NVIDIA driver failed to initialise: " + describe(r);
  int count = 0;
  r = get_count(&count);
  if (r != kCudaSuccess) return "the NVIDIA driver could not count devices: " + describe(r);
  if (count <= 0) return "no CUDA device (the driver is installed but reports no GPU)";
  for (int i = 0; i < count; ++i) {
    CUdevice dev = 0;
    if (get_device(&dev, i) != kCudaSuccess) continue;
    CudaDeviceInfo info;
    char name[256] = {0};
    if (get_name(name, sizeof name - 1, dev) == kCudaSuccess) info.name = name;
    get_attr(&info.major, kAttrComputeCapabilityMajor, dev);
    get_attr(&info.minor, kAttrComputeCapabilityMinor, dev);
    total_mem(&info.memory, dev);
    state->devices.push_back(info);
  }
  return "";
}

}  // namespace

void load_cuda(const std::string& addon_dir, CudaState* state) {
  if (state->tried) return;
  state->tried = true;
  state->backend = nullptr;
  state->devices.clear();
  state->emulated = false;

  const char* override_path = std::getenv("LORA_NATIVE_CUDA_LIB");
  state->library_path = (override_path && *override_path)
                            ? std::string(override_path)
                            : (addon_dir.empty() ? std::string(".") : addon_dir) + "/liblora_cuda.so";
  std::string library_reason;
  lora_cuda_backend_init_fn init = nullptr;
  lora_cuda_emulator_t emulator = nullptr;
  // RTLD_LOCAL: its symbols (static cudart included) never meet anyone else's. Never dlclose()d:
  // static cudart registers exit handlers that must still find their code.
  void* lib = dlopen(state->library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    library_reason = "the CUDA backend library could not be loaded (" + dl_error() +
                     "); build it with `node scripts/build-cuda.js` on a machine with nvcc, "
                     "or set LORA_NATIVE_CUDA_LIB to its path";
  } else {
    dlerror();
    init = symbol<lora_cuda_backend_init_fn>(lib, "lora_cuda_backend_init");
    const auto abi = symbol<lora_cuda_backend_abi_fn>(lib, "lora_cuda_backend_abi");
    if (init == nullptr || abi == nullptr) {
      library_reason = state->library_path + " is not a lora-native CUDA backend (no lora_cuda_backend_init/abi: " +
                       dl_error() + ")";
      init = nullptr;
    } else if (abi() != LORA_BACKEND_ABI_VERSION) {
      // Another version of the interface: its table would not line up with ours.
      library_reason = state->library_path + " was built for backend interface version " +
                       std::to_string(abi()) + " but this addon needs version " +
                       std::to_string(LORA_BACKEND_ABI_VERSION) + "; rebuild it (`node scripts/build-cuda.js`)";
      init = nullptr;
    }
    emulator = symbol<lora_cuda_emulator_t>(lib, "lora_cuda_emulator");
  }

  // Both checks run even when one fails, so one message says everything that is missing. The
  // emulator (cuda/emu/, a test tool) runs on the CPU: no driver to probe.
  std::string driver_reason;
  if (emulator != nullptr) {
    CudaDeviceInfo info;
    char name[256] = {0};
    emulator(name, sizeof name, &info.major, &info.minor, &info.memory);
    info.name = name;
    state->devices.push_back(info);
    state->emulated = true;
  } else {
    driver_reason = probe_driver(state);
  }

  if (!driver_reason.empty() || !library_reason.empty()) {
    state->reason = driver_reason;
    if (!library_reason.empty())
      state->reason += (state->reason.empty() ? "" : "; also, ") + library_reason;
    return;
  }

  char err[1024] = {0};
  lora_backend* table = init(err, sizeof err);
  if (table == nullptr) {
    state->reason = std::string("the CUDA backend failed to start: ") +
                    (err[0] ? err : "no reason given");
    return;
  }
  const bool complete = table->destroy && table->alloc && table->free && table->upload && table->download && table->copy;
  if (table->abi_version != LORA_BACKEND_ABI_VERSION || table->struct_size < LORA_BACKEND_MIN_SIZE || !complete) {
    state->reason = state->library_path + " filled in a backend table of version " +
                    std::to_string(table->abi_version) + " and " + std::to_string(table->struct_size) +
                    " bytes; this addon needs version " + std::to_string(LORA_BACKEND_ABI_VERSION) +
                    " and at least " + std::to_string(LORA_BACKEND_MIN_SIZE) + " bytes with every memory entry";
    if (table->destroy) table->destroy(table);
    return;
  }
  // Our own copy at our size: entries past the library's table (an older library) stay null and
  // read as unsupported. The library reaches its state through ctx, never through the table's
  // address, so the copy serves as well as the original.
  auto* copy = new lora_backend();
  std::memcpy(static_cast<void*>(copy), table, std::min<size_t>(table->struct_size, sizeof(lora_backend)));
  copy->struct_size = sizeof(lora_backend);
  state->library_table = table;
  state->backend = copy;
  state->reason.clear();
}

void unload_cuda(CudaState* state) {
  if (state == nullptr || state->backend == nullptr) return;
  lora_backend* table = state->library_table;
  delete state->backend;
  state->backend = nullptr;
  state->library_table = nullptr;
  table->destroy(table);  // runs inside liblora_cuda.so: frees its state and its table
}

}  // namespace lora
