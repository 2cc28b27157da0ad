// The binding of the LoRA kernels (native/backend/backend.h: lora_forward, lora_backward,
// lora_merge). The frozen weight is float32 or bfloat16; the kernels are told which.
#include "args.h"

namespace lora {
namespace binding {

void register_lora(Registry& r) {
  r.kernel("loraForward", LORA_OP_LORA_FORWARD, &lora_backend::lora_forward,
           {tensor("y", kF32, "N*OC"), tensor("h", kF32, "N*R"), tensor("x", kF32, "N*C"),
            tensor("weight", kF32 | kBF16, "OC*C"), dtype_of("weight"), optional_tensor("bias", kF32, "OC"),
            tensor("loraA", kF32, "R*C"), tensor("loraB", kF32, "OC*R"), size("N"), size("C"), size("OC"),
            size("R"), number("scaling"), number_in("dropout", 0, 1, true), seed()});
  r.kernel("loraBackward", LORA_OP_LORA_BACKWARD, &lora_backend::lora_backward,
           {optional_tensor("dx", kF32, "N*C"), optional_tensor("dA", kF32, "R*C"),
            optional_tensor("dB", kF32, "OC*R"), tensor("dy", kF32, "N*OC"), tensor("x", kF32, "N*C"),
            tensor("h", kF32, "N*R"), tensor("weight", kF32 | kBF16, "OC*C"), dtype_of("weight"),
            tensor("loraA", kF32, "R*C"), tensor("loraB", kF32, "OC*R"), size("N"), size("C"), size("OC"),
            size("R"), number("scaling"), number_in("dropout", 0, 1, true), seed()});
  r.kernel("loraMerge", LORA_OP_LORA_MERGE, &lora_backend::lora_merge,
           {tensor("weight", kF32 | kBF16, "OC*C"), dtype_of("weight"), tensor("loraA", kF32, "R*C"),
            tensor("loraB", kF32, "OC*R"), size("OC"), size("C"), size("R"), number("scaling")},
           "loraMergeAsync");
}

}  // namespace binding
}  // namespace lora
