// The binding of the normalisation, embedding, cross-entropy, attention and RoPE kernels
// (native/backend/backend.h). Kernels that index by int32 ids report an id out of range as an
// invalid argument before writing anything; the binding names the ids in a range error.
#include "args.h"

namespace lora {
namespace binding {

void register_nn(Registry& r) {
  r.kernel("layerNorm", LORA_OP_LAYER_NORM, &lora_backend::layer_norm,
           {tensor("y", kF32, "N*C"), tensor("mean", kF32, "N"), tensor("rstd", kF32, "N"), tensor("x", kF32, "N*C"),
            optional_tensor("weight", kF32, "C"), optional_tensor("bias", kF32, "C"), size("N"), size("C"),
            number("eps")});
  r.kernel("layerNormBackward", LORA_OP_LAYER_NORM_BACKWARD, &lora_backend::layer_norm_backward,
           {tensor("dx", kF32, "N*C"), optional_tensor("dw", kF32, "C"), optional_tensor("db", kF32, "C"),
            tensor("dy", kF32, "N*C"), tensor("x", kF32, "N*C"), optional_tensor("weight", kF32, "C"),
            tensor("mean", kF32, "N"), tensor("rstd", kF32, "N"), size("N"), size("C")});
  r.kernel("rmsNorm", LORA_OP_RMS_NORM, &lora_backend::rms_norm,
           {tensor("y", kF32, "N*C"), tensor("rstd", kF32, "N"), tensor("x", kF32, "N*C"),
            optional_tensor("weight", kF32, "C"), size("N"), size("C"), number("eps"), number("offset")});
  r.kernel("rmsNormBackward", LORA_OP_RMS_NORM_BACKWARD, &lora_backend::rms_norm_backward,
           {tensor("dx", kF32, "N*C"), optional_tensor("dw", kF32, "C"), tensor("dy", kF32, "N*C"),
            tensor("x", kF32, "N*C"), optional_tensor("weight", kF32, "C"), tensor("rstd", kF32, "N"), size("N"),
            size("C"), number("offset")});

  const IdsCheck ids{"id", "V"}, targets{"target (or ignoreIndex)", "V"};
  r.kernel("embedding", LORA_OP_EMBEDDING, &lora_backend::embedding,
           {tensor("out", kF32, "N*C"), tensor("table", kF32 | kBF16 | kF16, "V*C"), dtype_of("table"),
            tensor("ids", kI32, "N"), size("N"), size("V"), size("C")},
           nullptr, ids);
  r.kernel("embeddingBackward", LORA_OP_EMBEDDING_BACKWARD, &lora_backend::embedding_backward,
           {tensor("dtable", kF32, "V*C"), tensor("dout", kF32, "N*C"), tensor("ids", kI32, "N"), size("N"),
            size("V"), size("C")},
           nullptr, ids);
  r.kernel("crossEntropy", LORA_OP_CROSS_ENTROPY, &lora_backend::cross_entropy,
           {tensor("loss", kF32, "N"), tensor("lse", kF32, "N"), tensor("logits", kF32, "N*V"),
            tensor("targets", kI32, "N"), size("N"), size("V"), int32("ignoreIndex"),
            number_in("labelSmoothing", 0, 1, false)},
           nullptr, targets);
  r.kernel("crossEntropyBackward", LORA_OP_CROSS_ENTROPY_BACKWARD, &lora_backend::cross_entropy_backward,
           {tensor("dlogits", kF32, "N*V"), tensor("dloss", kF32, "N"), tensor("logits", kF32, "N*V"),
            tensor("lse", kF32, "N"), tensor("targets", kI32, "N"), size("N"), size("V"), int32("ignoreIndex"),
            number_in("labelSmoothing", 0, 1, false)},
           nullptr, targets);

  // k, v (dk, dv) hold Smax positions per batch entry (a KV cache), of which the first S take part;
  // the backend checks that the sizes fit together (T <= S <= Smax, H % KVH == 0, strides >= S).
  r.kernel("attention", LORA_OP_ATTENTION, &lora_backend::attention,
           {tensor("out", kF32, "B*T*H*D"), tensor("lse", kF32, "B*H*T"), tensor("q", kF32, "B*T*H*D"),
            tensor("k", kF32, "B*Smax*KVH*D"), tensor("v", kF32, "B*Smax*KVH*D"),
            optional_tensor("keyMask", kI32, "B*keyMaskStride"), size("keyMaskStride"),
            optional_tensor("segmentIds", kI32, "B*segmentStride"), size("segmentStride"), size("B"), size("T"),
            size("S"), size("Smax"), size("H"), size("KVH"), size("D"), number("scale"), flag("causal"),
            size("window")});
  r.kernel("attentionBackward", LORA_OP_ATTENTION_BACKWARD, &lora_backend::attention_backward,
           {tensor("dq", kF32, "B*T*H*D"), tensor("dk", kF32, "B*Smax*KVH*D"), tensor("dv", kF32, "B*Smax*KVH*D"),
            tensor("dout", kF32, "B*T*H*D"), tensor("q", kF32, "B*T*H*D"), tensor("k", kF32, "B*Smax*KVH*D"),
            tensor("v", kF32, "B*Smax*KVH*D"), tensor("out", kF32, "B*T*H*D"), tensor("lse", kF32, "B*H*T"),
            optional_tensor("keyMask", kI32, "B*keyMaskStride"), size("keyMaskStride"),
            optional_tensor("segmentIds", kI32, "B*segmentStride"), size("segmentStride"), size("B"), size("T"),
            size("S"), size("Smax"), size("H"), size("KVH"), size("D"), number("scale"), flag("causal"),
            size("window")});

  r.kernel("rope", LORA_OP_ROPE, &lora_backend::rope,
           {tensor("y", kF32, "Bt*T*H*D"), tensor("x", kF32, "Bt*T*H*D"), tensor("positions", kI32, "Bt*T"),
            tensor("invFreq", kF32, "R/2"), size("Bt"), size("T"), size("H"), size("D"), size("R"), number("scaling")});
  r.kernel("ropeBackward", LORA_OP_ROPE_BACKWARD, &lora_backend::rope_backward,
           {tensor("dx", kF32, "Bt*T*H*D"), tensor("dy", kF32, "Bt*T*H*D"), tensor("positions", kI32, "Bt*T"),
            tensor("invFreq", kF32, "R/2"), size("Bt"), size("T"), size("H"), size("D"), size("R"), number("scaling")});
}

}  // namespace binding
}  // namespace lora
