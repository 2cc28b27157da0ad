// One attention call's sizes and masks as both backends' attention kernels take them (the
// lora_backend entries pass them as flat parameters, so that the C ABI holds no struct layout and
// the binding's spec maps one argument to each), and the validity check both run before touching
// memory. C++ only: the CPU backend and the CUDA library (nvcc or the emulator) include it.
#pragma once

#include <cstdint>

namespace lora {

// B batch, T queries, S keys, H query heads, KVH key/value heads (H % KVH == 0: GQA/MQA without
// repeating k, v), D head dim. Query i sits at absolute position p_i = S - T + i (T new tokens
// after S - T cached ones), and key j is visible to it iff
//   (!causal || j <= p_i) && (window == 0 || j > p_i - window)    (transformers' sliding window)
//   && (key_mask == nullptr || key_mask[b][j] != 0)               (padding, left or right)
//   && (segment_ids == nullptr || segment_ids[b][j] == segment_ids[b][p_i])   (packed sequences)
// k, v (and dk, dv) may be the first S positions of a preallocated cache (B, Smax, KVH, D): their
// batch entries are kv_batch_stride = Smax·KVH·D elements apart. The masks are int32 device memory.
struct AttentionArgs {
  int64_t B = 0, T = 0, S = 0, H = 0, KVH = 0, D = 0;
  int64_t kv_batch_stride = 0;           // Smax·KVH·D (S·KVH·D when contiguous)
  const int32_t* key_mask = nullptr;     // (B, key_mask_stride), 1 attend / 0 padding, or nullptr
  int64_t key_mask_stride = 0;
  const int32_t* segment_ids = nullptr;  // (B, segment_stride), or nullptr
  int64_t segment_stride = 0;
  int64_t window = 0;                    // 0: no sliding window
  float scale = 1.0f;
  bool causal = true;
};

// True when the sizes describe a problem both backends accept: nothing negative, H a multiple of
// KVH, the queries the last T of the S positions (T <= S), positions within int32, the cache and
// mask rows at least S long. Backends return LORA_INVALID_ARGUMENT otherwise.
inline bool attention_args_valid(const AttentionArgs& a) {
  if (a.B < 0 || a.T < 0 || a.S < 0 || a.H < 0 || a.KVH < 0 || a.D < 0 || a.window < 0) return false;
  if (a.H > 0 && (a.KVH <= 0 || a.H % a.KVH != 0)) return false;
  if (a.T > a.S || a.S > 0x7fffffff) return false;
  int64_t row = 0, need = 0;  // k, v hold S positions of KVH·D floats per batch entry
  if (__builtin_mul_overflow(a.KVH, a.D, &row) || __builtin_mul_overflow(row, a.S, &need) || a.kv_batch_stride < need)
    return false;
  if (a.key_mask && a.key_mask_stride < a.S) return false;
  if (a.segment_ids && a.segment_stride < a.S) return false;
  return true;
}

// The arguments of the attention / attention_backward entries (their trailing parameters).
inline AttentionArgs attention_args(const int32_t* key_mask, int64_t key_mask_stride, const int32_t* segment_ids,
                                    int64_t segment_stride, int64_t B, int64_t T, int64_t S, int64_t Smax,
                                    int64_t H, int64_t KVH, int64_t D, float scale, bool causal,
                                    int64_t window) {
  AttentionArgs a;
  a.B = B;
  a.T = T;
  a.S = S;
  a.H = H;
  a.KVH = KVH;
  a.D = D;
  // Smax·KVH·D saturates (the binding has checked the tensors hold B·Smax·KVH·D elements)
  int64_t stride = 0;
  if (Smax < 0 || __builtin_mul_overflow(Smax, KVH, &stride) || __builtin_mul_overflow(stride, D, &stride))
    stride = -1;
  a.kv_batch_stride = stride;
  a.key_mask = key_mask;
  a.key_mask_stride = key_mask_stride;
  a.segment_ids = segment_ids;
  a.segment_stride = segment_stride;
  a.window = window;
  a.scale = scale;
  a.causal = causal;
  return a;
}

}  // namespace lora
