// The scalar formulas of the elementwise ops (binary, unary and the unary derivatives),
// written once for both backends: the CPU backend calls them in its loops, the CUDA backend in its
// kernels, so the two compute the same function. Plain float math from <math.h>; no vector code.
#pragma once

#include <math.h>

#include "backend.h"
#include "rng.h"  // LORA_HD

namespace lora {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/π), GELU tanh approximation
constexpr float kGeluCoef = 0.044715f;               // GELU tanh approximation's cubic term
constexpr float kInvSqrt2 = 0.7071067811865476f;     // 1/sqrt(2), exact GELU
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/sqrt(2π), the normal density

LORA_HD float binary_apply(lora_binary_op op, float a, float b) {
  switch (op) {
    case LORA_BINARY_ADD: return a + b;
    case LORA_BINARY_SUB: return a - b;
    case LORA_BINARY_MUL: return a * b;
    case LORA_BINARY_DIV: return a / b;
    case LORA_BINARY_MAX: return (a != a || a > b) ? a : b;  // NaN propagates
    case LORA_BINARY_MIN: return (a != a || a < b) ? a : b;
    default: break;
  }
  return 0.0f;
}

LORA_HD float unary_apply(lora_unary_op op, float x) {
  switch (op) {
    case LORA_UNARY_NEG: return -x;
    case LORA_UNARY_EXP: return expf(x);
    case LORA_UNARY_LOG: return logf(x);
    case LORA_UNARY_SQRT: return sqrtf(x);
    case LORA_UNARY_RSQRT: return 1.0f / sqrtf(x);
    case LORA_UNARY_ABS: return fabsf(x);
    case LORA_UNARY_SQUARE: return x * x;
    case LORA_UNARY_RECIP: return 1.0f / x;
    case LORA_UNARY_RELU: return x > 0.0f ? x : 0.0f;
    case LORA_UNARY_GELU_TANH:
      return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x)));
    case LORA_UNARY_GELU_ERF: return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
    case LORA_UNARY_SILU: return x / (1.0f + expf(-x));
    case LORA_UNARY_TANH: return tanhf(x);
    case LORA_UNARY_SIGMOID: return 1.0f / (1.0f + expf(-x));
    default: break;
  }
  return 0.0f;
}

// f'(x), given x and y = f(x).
LORA_HD float unary_grad(lora_unary_op op, float x, float y) {
  switch (op) {
    case LORA_UNARY_NEG: return -1.0f;
    case LORA_UNARY_EXP: return y;
    case LORA_UNARY_LOG: return 1.0f / x;
    case LORA_UNARY_SQRT: return 0.5f / y;
    case LORA_UNARY_RSQRT: return -0.5f * y * y * y;
    case LORA_UNARY_ABS: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
    case LORA_UNARY_SQUARE: return 2.0f * x;
    case LORA_UNARY_RECIP: return -y * y;
    case LORA_UNARY_RELU: return x > 0.0f ? 1.0f : 0.0f;
    case LORA_UNARY_GELU_TANH: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x));
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x * x);
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case LORA_UNARY_GELU_ERF:
      return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case LORA_UNARY_SILU: {
      const float sg = 1.0f / (1.0f + expf(-x));
      return sg * (1.0f + x * (1.0f - sg));
    }
    case LORA_UNARY_TANH: return 1.0f - y * y;
    case LORA_UNARY_SIGMOID: return y * (1.0f - y);
    default: break;
  }
  return 0.0f;
}

}  // namespace lora
