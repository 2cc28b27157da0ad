// Float64 references for the LoRA kernels, written from the math (not from the kernels):
//   x̃ = dropout(x);  h = x̃·Aᵀ;  y = x·Wᵀ + b + s·h·Bᵀ
//   dB = s·dyᵀ·h;  dh = s·dy·B;  dA = dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)
//   merge: W' = W + s·B·A
// Matrices are row-major Float64Arrays. N rows, C in, OC out, R rank.
import type { ParityCase, Tol } from '../parity/suite';
import { bf16, seeded } from './dtype_ref';
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

/** h = x̃·Aᵀ (N, R), x̃ = dropout(x). */
export function loraHiddenRef(a: LoraInputs): Float64Array {
  const { x, A, N, C, R } = a;
  const xd = dropoutRef(x, a.p, a.seed);
  const h = new Float64Array(N * R);
  for (let n = 0; n < N; n++)
    for (let r = 0; r < R; r++) {
      let acc = 0;
      for (let c = 0; c < C; c++) acc += xd[n * C + c]! * A[r * C + c]!;
      h[n * R + r] = acc;
    }
  return h;
}

export function loraForwardRef(a: LoraInputs): { y: Float64Array; h: Float64Array } {
  const { x, W, b, B, N, C, OC, R, s } = a;
  const h = loraHiddenRef(a);
  const y = new Float64Array(N * OC);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < OC; o++) {
      let base = b ? b[o]! : 0;
      for (let c = 0; c < C; c++) base += x[n * C + c]! * W[o * C + c]!;  // rows of x and W: contiguous
      let low = 0;
      for (let r = 0; r < R; r++) low += h[n * R + r]! * B[o * R + r]!;
      y[n * OC + o] = base + s * low;
    }
  return { y, h };
}

export function loraBackwardRef(a: LoraInputs, dy: Float64Array): { dx: Float64Array; dA: Float64Array; dB: Float64Array } {
  const { x, W, A, B, N, C, OC, R, s, p, seed } = a;
  const h = loraHiddenRef(a);
  const xd = dropoutRef(x, p, seed);
  const dB = new Float64Array(OC * R);
  for (let n = 0; n < N; n++)
    for (let o = 0; o < OC; o++) {
      const g = s * dy[n * OC + o]!;
      for (let r = 0; r < R; r++) dB[o * R + r] += g * h[n * R + r]!;
    }
  const dh = new Float64Array(N * R);
  for (let n = 0; n < N; n++)
    for (let r = 0; r < R; r++) {
      let acc = 0;
      for (let o = 0; o < OC; o++) acc += dy[n * OC + o]! * B[o * R + r]!;
      dh[n * R + r] = s * acc;
    }
  const dA = new Float64Array(R * C);
  for (let n = 0; n < N; n++)
    for (let r = 0; r < R; r++) {
      const g = dh[n * R + r]!;
      for (let c = 0; c < C; c++) dA[r * C + c] += g * xd[n * C + c]!;
    }
  const dx = new Float64Array(N * C);
  const base = new Float64Array(C);
  for (let n = 0; n < N; n++) {
    // dy·W: row n accumulates dy[n, o]·W[o, :] over o (W read row by row)
    base.fill(0);
    for (let o = 0; o < OC; o++) {
      const g = dy[n * OC + o]!;
      for (let c = 0; c < C; c++) base[c] += g * W[o * C + c]!;
    }
    for (let c = 0; c < C; c++) {
      let low = 0;
      for (let r = 0; r < R; r++) low += dh[n * R + r]! * A[r * C + c]!;
      const keep = p === 0 ? 1 : dropoutFactorRef(seed, n * C + c, p);
      dx[n * C + c] = base[c]! + keep * low;
    }
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

// ---- parity cases (test/parity/suite.ts runs them on every backend) ------------------------------
// fp32 results of K-term sums taken in another order (tiles, split-K atomics) carry rounding error
// growing like sqrt(K) units of 2^-24 of the result's rms; 4 of them bound the worst of ~10^5
// elements. A bf16 weight may meet activations rounded to bf16 too (CUDA's tensor cores, the
// CPU's avx512_bf16 dot product).
const fp32Tol = (K: number): Tol => ({ atol: 1e-6, rms: Math.max(2e-6, 4 * 2 ** -24 * Math.sqrt(K)), rtol: 1e-4 });
const BF16_TOL: Tol = { atol: 1e-6, rms: 2e-2, rtol: 2e-2 };

function loraCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  let seed = 101;
  const data = (n: number, scale = 1) => seeded(n, seed++, scale);
  for (const [N, C, OC, R] of [[1, 1, 1, 1], [37, 61, 45, 3], [130, 257, 129, 16], [257, 520, 389, 64], [64, 1024, 2752, 8]] as const) {
    const x = data(N * C), w = data(OC * C, 1 / Math.sqrt(C)), bias = data(OC), A = data(R * C, 1 / Math.sqrt(C)),
      B = data(OC * R), dy = data(N * OC), dA0 = data(R * C), dB0 = data(OC * R);
    for (const wdt of ['float32', 'bfloat16'] as const) {
      const W = wdt === 'float32' ? w : bf16(w);
      const tol = wdt === 'bfloat16' ? BF16_TOL : fp32Tol(Math.max(N, C, OC));
      for (const p of [0, 0.2]) {
        const tag = `(${N}, ${C}, ${OC}, ${R}) W ${wdt} dropout ${p}`;
        const s = 2.0;
        const inputs = (b: Float64Array | null): LoraInputs => ({ x, W, b, A, B, N, C, OC, R, s, p, seed: 99 });
        cases.push({
          name: `loraForward ${tag}`, build: () => {
            const ref = loraForwardRef(inputs(bias));
            return {
              inputs: { x: { data: x }, W: { data: w, dtype: wdt }, bias: { data: bias }, A: { data: A }, B: { data: B } },
              outputs: { y: N * OC, h: N * R },
              calls: [['loraForward', '$y', '$h', '$x', '$W', '$bias', '$A', '$B', N, C, OC, R, s, p, 99]],
              expect: { y: ref.y, h: ref.h }, tol,
            };
          },
        });
        cases.push({
          name: `loraBackward ${tag}`, build: () => {
            const ref = loraBackwardRef(inputs(null), dy);
            const h = loraHiddenRef(inputs(null));
            return {
              inputs: { x: { data: x }, W: { data: w, dtype: wdt }, A: { data: A }, B: { data: B }, h: { data: h }, dy: { data: dy } },
              outputs: { dx: N * C, dA: dA0, dB: dB0 },
              calls: [['loraBackward', '$dx', '$dA', '$dB', '$dy', '$x', '$h', '$W', '$A', '$B', N, C, OC, R, s, p, 99]],
              expect: { dx: ref.dx, dA: ref.dA.map((v, i) => v + dA0[i]!), dB: ref.dB.map((v, i) => v + dB0[i]!) }, tol,
            };
          },
        });
      }
      cases.push({
        name: `loraMerge (${OC}, ${C}, ${R}) W ${wdt}`, build: () => {
          const merged = loraMergeRef(W, A, B, OC, C, R, 0.5);
          return {
            inputs: { W: { data: w, dtype: wdt }, A: { data: A }, B: { data: B } }, outputs: {},
            calls: [['loraMerge', '$W', '$A', '$B', OC, C, R, 0.5]],
            expect: { W: wdt === 'float32' ? merged : bf16(merged) },
            // one bf16 ulp: the fp32 sum is rounded once, in another order than the reference's
            tol: wdt === 'float32' ? fp32Tol(R) : { atol: 1e-6, rtol: 1 / 128 },
          };
        },
      });
    }
  }
  return cases;
}

/** The parity cases of the LoRA kernels. */
export const parityCases: ParityCase[] = loraCases();
