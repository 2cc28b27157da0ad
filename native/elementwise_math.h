// The scalar formulas of the elementwise ops (BinaryOp, UnaryOp and the UnaryOp derivatives),
// written once for both backends: the CPU backend calls them in its loops, the CUDA backend in its
// kernels, so the two compute the same function. Plain float math from <math.h>; no vector code.
#pragma once

#include <math.h>

#include "backend.h"

#if !defined(LORA_HD)
#if defined(__CUDACC__)
#define LORA_HD __host__ __device__ __forceinline__
#else
#define LORA_HD inline
#endif
#endif

namespace lora {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/π), GELU tanh approximation
constexpr float kGeluCoef = 0.044715f;               // GELU tanh approximation's cubic term
constexpr float kInvSqrt2 = 0.7071067811865476f;     // 1/sqrt(2), exact GELU
constexpr float kInvSqrt2Pi = 0.3989422804014327f;   // 1/sqrt(2π), the normal density

LORA_HD float binary_apply(BinaryOp op, float a, float b) {
  switch (op) {
    case BinaryOp::Add: return a + b;
    case BinaryOp::Sub: return a - b;
    case BinaryOp::Mul: return a * b;
    case BinaryOp::Div: return a / b;
    case BinaryOp::Max: return (a != a || a > b) ? a : b;  // NaN propagates
    case BinaryOp::Min: return (a != a || a < b) ? a : b;
  }
  return 0.0f;
}

LORA_HD float unary_apply(UnaryOp op, float x) {
  switch (op) {
    case UnaryOp::Neg: return -x;
    case UnaryOp::Exp: return expf(x);
    case UnaryOp::Log: return logf(x);
    case UnaryOp::Sqrt: return sqrtf(x);
    case UnaryOp::Rsqrt: return 1.0f / sqrtf(x);
    case UnaryOp::Abs: return fabsf(x);
    case UnaryOp::Square: return x * x;
    case UnaryOp::Recip: return 1.0f / x;
    case UnaryOp::Relu: return x > 0.0f ? x : 0.0f;
    case UnaryOp::GeluTanh:
      return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x)));
    case UnaryOp::GeluErf: return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
    case UnaryOp::Silu: return x / (1.0f + expf(-x));
    case UnaryOp::Tanh: return tanhf(x);
    case UnaryOp::Sigmoid: return 1.0f / (1.0f + expf(-x));
  }
  return 0.0f;
}

// f'(x), given x and y = f(x).
LORA_HD float unary_grad(UnaryOp op, float x, float y) {
  switch (op) {
    case UnaryOp::Neg: return -1.0f;
    case UnaryOp::Exp: return y;
    case UnaryOp::Log: return 1.0f / x;
    case UnaryOp::Sqrt: return 0.5f / y;
    case UnaryOp::Rsqrt: return -0.5f * y * y * y;
    case UnaryOp::Abs: return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
    case UnaryOp::Square: return 2.0f * x;
    case UnaryOp::Recip: return -y * y;
    case UnaryOp::Relu: return x > 0.0f ? 1.0f : 0.0f;
    case UnaryOp::GeluTanh: {
      const float t = tanhf(kSqrt2OverPi * (x + kGeluCoef * x * x * x));
      const float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x * x);
      return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
    case UnaryOp::GeluErf:
      return 0.5f * (1.0f + erff(x * kInvSqrt2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    case UnaryOp::Silu: {
      const float sg = 1.0f / (1.0f + expf(-x));
      return sg * (1.0f + x * (1.0f - sg));
    }
    case UnaryOp::Tanh: return 1.0f - y * y;
    case UnaryOp::Sigmoid: return y * (1.0f - y);
  }
  return 0.0f;
}

}  // namespace lora
