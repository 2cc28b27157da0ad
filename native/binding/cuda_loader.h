// Finds and loads the CUDA backend at run time. The CPU addon never links CUDA: it dlopen()s
// liblora_cuda.so from beside the addon and the driver (libcuda.so.1) to see whether a GPU can be
// used at all, and creates the backend only when both are there. A library exporting
// lora_cuda_emulator (the CPU emulator of the kernels, cuda/emu/, chosen with LORA_NATIVE_CUDA_LIB)
// needs no driver. The library is a C ABI: lora_cuda_backend_abi() names the interface version it
// was built against and lora_cuda_backend_init() fills in a lora_backend table
// (native/backend/backend.h), which the loader copies into one of its own size. Every failure is
// kept as a reason string for features() and for the ERR_LORA_NO_CUDA error; nothing here aborts
// or prints.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../backend/backend.h"

namespace lora {

struct CudaDeviceInfo {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  size_t memory = 0;         // bytes
};

struct CudaState {
  bool tried = false;
  lora_backend* backend = nullptr;  // null when CUDA is unavailable; the addon's copy of the table
  lora_backend* library_table = nullptr;  // the table the library made (its destroy() frees it)
  std::string reason;          // why backend is null ("" when loaded)
  std::string library_path;    // the liblora_cuda.so that was (or would have been) loaded
  std::vector<CudaDeviceInfo> devices;
  bool emulated = false;       // the library is the CPU emulator of the CUDA kernels (cuda/emu/)
};

// Loads once per state; addon_dir is the folder holding the .node file. Later calls return at once.
void load_cuda(const std::string& addon_dir, CudaState* state);

// Destroys the backend (when loaded). Called when the addon instance is torn down.
void unload_cuda(CudaState* state);

}  // namespace lora
