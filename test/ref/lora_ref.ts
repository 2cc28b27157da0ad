// Float64 references for the LoRA kernels, written from the math (not from the kernels):
//   x̃ = dropout(x);  h = x̃·Aᵀ;  y = x·Wᵀ + b + s·h·Bᵀ
//   dB = s·dyᵀ·h;  dh = s·dy·B;  dA = dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
//   merge: W' = W + s·B·A
// Matrices are row-major Float64Arrays. N rows, C in, OC out, R rank.
import { dropoutFactorRef } from './rng_ref';

export interface LoraInputs {
  x: Float64Array; // (N, C)
  W: Float64Array; // (OC, C)
  b: Float64Array | null; // (OC)
  A: Float64Array; // (R, C)
  B: Float64Array; // (OC, R)
  N: number;
  C: number;
  OC: number;
  R: number;
  s: number;
  p: number;
  seed: number;
}

export function dropoutRef(x: Float64Array, p: number, seed: number): Float64Array {
  if (p === 0) return x;
  return x.map((v, i) => v * dropoutFactorRef(seed, i, p));
}

export function loraForwardRef(a: LoraInputs): { y: Float64Array; h: Float64Array } {
  const { x, W, b, A, B, N, C, OC, R, s } = a;
  const xd = dropoutRef(x, a.p, a.seed);
  const h = new Float64Array(N * R);
  for (let n = 0; n < N; n++)
    for (let r = 0; r < R; r++) {
      let acc = 0;
      for (let c = 0; c < C; c++) acc += xd[n * C + c]! * A[r * C + c]!;
      h[n * R + r] = acc;
    }
  const y = new Float64Array(N * OC);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < OC; o++) {
      let base = b ? b[o]! : 0;
      for (let c = 0; c < C; c++) base += x[n * C + c]! * W[o * C + c]!;
      let low = 0;
      for (let r = 0; r < R; r++) low += h[n * R + r]! * B[o * R + r]!;
      y[n * OC + o] = base + s * low;
    }
  return { y, h };
}

export function loraBackwardRef(a: LoraInputs, dy: Float64Array): { dx: Float64Array; dA: Float64Array; dB: Float64Array } {
  const { x, W, A, B, N, C, OC, R, s, p, seed } = a;
  const { h } = loraForwardRef(a);
  const xd = dropoutRef(x, p, seed);
  const dB = new Float64Array(OC * R);
  for (let o = 0; o < OC; o++)
    for (let r = 0; r < R; r++) {
      let acc = 0;
      for (let n = 0; n < N; n++) acc += dy[n * OC + o]! * h[n * R + r]!;
      dB[o * R + r] = s * acc;
    }
  const dh = new Float64Array(N * R);
  for (let n = 0; n < N; n++)
    for (let r = 0; r < R; r++) {
      let acc = 0;
      for (let o = 0; o < OC; o++) acc += dy[n * OC + o]! * B[o * R + r]!;
      dh[n * R + r] = s * acc;
    }
  const dA = new Float64Array(R * C);
  for (let r = 0; r < R; r++)
    for (let c = 0; c < C; c++) {
      let acc = 0;
      for (let n = 0; n < N; n++) acc += dh[n * R + r]! * xd[n * C + c]!;
      dA[r * C + c] = acc;
    }
  const dx = new Float64Array(N * C);
  for (let n = 0; n < N; n++)
    for (let c = 0; c < C; c++) {
      let base = 0;
      for (let o = 0; o < OC; o++) base += dy[n * OC + o]! * W[o * C + c]!;
      let low = 0;
      for (let r = 0; r < R; r++) low += dh[n * R + r]! * A[r * C + c]!;
      const keep = p === 0 ? 1 : dropoutFactorRef(seed, n * C + c, p);
      dx[n * C + c] = base + keep * low;
    }
  return { dx, dA, dB };
}

export function loraMergeRef(W: Float64Array, A: Float64Array, B: Float64Array, OC: number, C: number, R: number, s: number): Float64Array {
  const out = Float64Array.from(W);
  for (let o = 0; o < OC; o++)
    for (let c = 0; c < C; c++) {
      let acc = 0;
      for (let r = 0; r < R; r++) acc += B[o * R + r]! * A[r * C + c]!;
      out[o * C + c] += s * acc;
    }
  return out;
}

/** Central finite difference of L(v) = sum(f(v) ⊙ G) with respect to v[i]. */
export function finiteDifference(f: (v: Float64Array) => Float64Array, v: Float64Array, G: Float64Array, i: number, eps = 1e-6): number {
  const plus = Float64Array.from(v);
  const minus = Float64Array.from(v);
  plus[i] += eps;
  minus[i] -= eps;
  const yp = f(plus);
  const ym = f(minus);
  let acc = 0;
  for (let k = 0; k < yp.length; k++) acc += (yp[k]! - ym[k]!) * G[k]!;
  return acc / (2 * eps);
}
