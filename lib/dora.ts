// DoRA's weight norm: the row norms ||W + s·B·A||_row of an adapted weight, on the weight's device,
// without forming B·A (a W-sized product) — from W's row norms, W·Aᵀ and A·Aᵀ.
import { typeError, LoraError, expectBoolean, expectNumber } from './errors';
import { add, linear, matmul, mul, relu, sqrt, square, sum, transpose } from './ops';
import { asFloat32, noGrad, shapeString, Tensor, tidy } from './tensor';

/**
 * Row norms ||W + s·B·A||_row (one per output) without forming B·A:
 * ||W_i||² + 2s·(B ⊙ (W·Aᵀ))_i·1 + s²·B_i·(A·Aᵀ)·B_iᵀ. W is (OC, C), or (C, OC) with fanInFanOut.
 * Returns a float32 tensor (OC) on W's device, with no gradient.
 */
export function doraWeightNorm(W: Tensor, A: Tensor, B: Tensor, s: number, fanInFanOut = false): Tensor {
  for (const [name, v] of [['W', W], ['A', A], ['B', B]] as const) {
    if (!(v instanceof Tensor)) throw typeError(name, 'a Tensor', v);
    v._live(name);
    if (v.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D ${name} for doraWeightNorm() but received ${shapeString(v.shape)}`);
  }
  expectNumber('s', s);
  expectBoolean('fanInFanOut', fanInFanOut);
  const rows = fanInFanOut ? W.shape[1]! : W.shape[0]!;
  const cols = fanInFanOut ? W.shape[0]! : W.shape[1]!;
  if (A.shape[1] !== cols || B.shape[0] !== rows || B.shape[1] !== A.shape[0])
    throw new LoraError('ERR_LORA_SHAPE', `Expected A [R, ${cols}] and B [${rows}, R] for doraWeightNorm() but received ${shapeString(A.shape)} and ${shapeString(B.shape)}`);
  return noGrad(() => tidy(() => {
    const w = asFloat32(W);
    const a = asFloat32(A);
    const b = asFloat32(B);
    const wn2 = sum(square(w), fanInFanOut ? 0 : 1);                  // (OC): ||W_i||²
    const P = fanInFanOut ? transpose(matmul(a, w)) : linear(w, a);     // (OC, R): row i = W_i·Aᵀ
    const G = linear(a, a);                                             // (R, R) = A·Aᵀ
    const cross = sum(mul(b, P), 1);                                    // (OC): B_i·(W_i·Aᵀ)
    const quad = sum(mul(matmul(b, G), b), 1);                          // (OC): B_i·(A·Aᵀ)·B_iᵀ
    // the sum is >= 0 in exact arithmetic; relu keeps rounding from making it negative
    return sqrt(relu(add(add(wn2, mul(cross, 2 * s)), mul(quad, s * s))));
  }));
}
