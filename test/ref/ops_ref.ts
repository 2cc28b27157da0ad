// Float64 references for the general ops, written from their definitions: NumPy broadcasting,
// batched matrix products, reductions over axes, permutations; and the parity cases of the general
// kernels (at the end).
import type { ParityCase, Tol } from '../parity/suite';
import { bf16, f16, seeded } from './dtype_ref';
import { dropoutRef, geluBackwardRef, geluRef, softmaxBackwardRef, softmaxRef } from './nn_ops_ref';

export interface Arr {
  data: Float64Array;
  shape: number[];
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function strides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

/** Element of `a` at the multi-index `idx` of a broadcast shape (aligned right). */
function at(a: Arr, idx: number[]): number {
  const off = idx.length - a.shape.length;
  const st = strides(a.shape);
  let k = 0;
  for (let d = 0; d < a.shape.length; d++) k += (a.shape[d] === 1 ? 0 : idx[d + off]!) * st[d]!;
  return a.data[k]!;
}

function unravel(i: number, shape: readonly number[]): number[] {
  const idx = new Array<number>(shape.length);
  for (let d = shape.length - 1; d >= 0; d--) {
    idx[d] = i % shape[d]!;
    i = Math.floor(i / shape[d]!);
  }
  return idx;
}

export function broadcastShape(a: readonly number[], b: readonly number[]): number[] {
  const n = Math.max(a.length, b.length);
  return Array.from({ length: n }, (_, i) => {
    const da = a[a.length - n + i] ?? 1;
    const db = b[b.length - n + i] ?? 1;
    return da === 1 ? db : da;
  });
}

export function elementwise(a: Arr, b: Arr, f: (x: number, y: number) => number): Arr {
  const shape = broadcastShape(a.shape, b.shape);
  const out = new Float64Array(numel(shape));
  for (let i = 0; i < out.length; i++) {
    const idx = unravel(i, shape);
    out[i] = f(at(a, idx), at(b, idx));
  }
  return { data: out, shape };
}

/** (..., M, K) @ (..., K, N) with equal batch dims or a 2-D right side. */
export function matmulRef(a: Arr, b: Arr): Arr {
  const M = a.shape[a.shape.length - 2]!;
  const K = a.shape[a.shape.length - 1]!;
  const N = b.shape[b.shape.length - 1]!;
  const batchShape = b.shape.length > 2 ? b.shape.slice(0, -2) : a.shape.slice(0, -2);
  const batch = numel(batchShape);
  const aBatched = a.shape.length > 2;
  const bBatched = b.shape.length > 2;
  const out = new Float64Array(batch * M * N);
  for (let z = 0; z < batch; z++)
    for (let i = 0; i < M; i++)
      for (let j = 0; j < N; j++) {
        let acc = 0;
        for (let k = 0; k < K; k++)
          acc += a.data[(aBatched ? z * M * K : 0) + i * K + k]! * b.data[(bBatched ? z * K * N : 0) + k * N + j]!;
        out[z * M * N + i * N + j] = acc;
      }
  return { data: out, shape: [...batchShape, M, N] };
}

export function sumRef(a: Arr, axes: number[], keepDims: boolean): Arr {
  const kept = a.shape.map((d, i) => (axes.includes(i) ? 1 : d));
  const out = new Float64Array(numel(kept));
  const ks = strides(kept);
  for (let i = 0; i < a.data.length; i++) {
    const idx = unravel(i, a.shape);
    let k = 0;
    for (let d = 0; d < idx.length; d++) k += (axes.includes(d) ? 0 : idx[d]!) * ks[d]!;
    out[k] += a.data[i]!;
  }
  return { data: out, shape: keepDims ? kept : a.shape.filter((_, i) => !axes.includes(i)) };
}

export function permuteRef(a: Arr, perm: number[]): Arr {
  const shape = perm.map((p) => a.shape[p]!);
  const st = strides(a.shape);
  const out = new Float64Array(a.data.length);
  for (let i = 0; i < out.length; i++) {
    const idx = unravel(i, shape);
    let k = 0;
    for (let d = 0; d < idx.length; d++) k += idx[d]! * st[perm[d]!]!;
    out[i] = a.data[k]!;
  }
  return { data: out, shape };
}

// ---- kernel-level references and their parity cases ----------------------------------------------
// The general kernels of native/backend/backend.h at the binding, from their definitions: strided
// batched GEMM, broadcasting through strides, reductions over (outer, dim, inner), strided copies,
// the unary functions and their derivatives, dtype rounding. test/parity/suite.ts runs the cases
// on every backend.

/** C = alpha·op(A)·op(B) + beta·C0 over `batch` strided matrices (op(A) (M, K), op(B) (K, N)). */
export function gemmRef(g: {
  a: ArrayLike<number>; b: ArrayLike<number>; c0: ArrayLike<number>; M: number; N: number; K: number; ta: boolean; tb: boolean;
  lda: number; ldb: number; ldc: number; alpha: number; beta: number; batch: number; sa: number; sb: number; sc: number;
}): Float64Array {
  const out = Float64Array.from(g.c0);
  const arow = new Float64Array(g.K);
  const bt = new Float64Array(g.N * g.K);  // op(B) transposed: row j is column j of op(B)
  for (let z = 0; z < g.batch; z++) {
    for (let j = 0; j < g.N; j++)
      for (let k = 0; k < g.K; k++) bt[j * g.K + k] = g.b[z * g.sb + (g.tb ? j * g.ldb + k : k * g.ldb + j)]!;
    for (let i = 0; i < g.M; i++) {
      for (let k = 0; k < g.K; k++) arow[k] = g.a[z * g.sa + (g.ta ? k * g.lda + i : i * g.lda + k)]!;
      for (let j = 0; j < g.N; j++) {
        let acc = 0;
        for (let k = 0; k < g.K; k++) acc += arow[k]! * bt[j * g.K + k]!;
        const o = z * g.sc + i * g.ldc + j;
        out[o] = g.alpha * acc + (g.beta === 0 ? 0 : g.beta * g.c0[o]!);
      }
    }
  }
  return out;
}

/** Element i (row-major over `shape`) read through `strides` from `base`. */
function stridedAt(data: ArrayLike<number>, base: number, shape: readonly number[], strides: readonly number[], i: number): number {
  let off = base;
  for (let d = shape.length - 1; d >= 0; d--) {
    off += (i % shape[d]!) * strides[d]!;
    i = Math.floor(i / shape[d]!);
  }
  return data[off]!;
}

export const UNARY_REF: Record<string, { f: (x: number) => number; df: (x: number) => number; positive?: boolean }> = {
  neg: { f: (x) => -x, df: () => -1 },
  exp: { f: Math.exp, df: Math.exp },
  log: { f: Math.log, df: (x) => 1 / x, positive: true },
  sqrt: { f: Math.sqrt, df: (x) => 0.5 / Math.sqrt(x), positive: true },
  rsqrt: { f: (x) => 1 / Math.sqrt(x), df: (x) => -0.5 * x ** -1.5, positive: true },
  abs: { f: Math.abs, df: (x) => Math.sign(x) },
  square: { f: (x) => x * x, df: (x) => 2 * x },
  recip: { f: (x) => 1 / x, df: (x) => -1 / (x * x), positive: true },
  relu: { f: (x) => Math.max(x, 0), df: (x) => (x > 0 ? 1 : 0) },
  geluTanh: { f: (x) => geluRef(Float64Array.of(x), true)[0]!, df: (x) => geluBackwardRef(Float64Array.of(x), Float64Array.of(1), true)[0]! },
  geluErf: { f: (x) => geluRef(Float64Array.of(x), false)[0]!, df: (x) => geluBackwardRef(Float64Array.of(x), Float64Array.of(1), false)[0]! },
  silu: { f: (x) => x / (1 + Math.exp(-x)), df: (x) => { const s = 1 / (1 + Math.exp(-x)); return s * (1 + x * (1 - s)); } },
  tanh: { f: Math.tanh, df: (x) => 1 - Math.tanh(x) ** 2 },
  sigmoid: { f: (x) => 1 / (1 + Math.exp(-x)), df: (x) => { const s = 1 / (1 + Math.exp(-x)); return s * (1 - s); } },
};

const BINARY_REF: [string, (a: number, b: number) => number][] = [
  ['add', (a, b) => a + b], ['sub', (a, b) => a - b], ['mul', (a, b) => a * b], ['div', (a, b) => a / b],
  ['max', Math.max], ['min', Math.min],
];
const REDUCE_REF: [string, (v: number[]) => number][] = [
  ['sum', (v) => v.reduce((a, b) => a + b, 0)], ['max', (v) => v.reduce((a, b) => Math.max(a, b), -Infinity)],
  ['min', (v) => v.reduce((a, b) => Math.min(a, b), Infinity)],
];

const FP32: Tol = { atol: 1e-6, rms: 2e-6, rtol: 1e-4 };
const EXACT: Tol = { atol: 0, rtol: 0 };
const contiguous = (shape: readonly number[]) => strides(shape);
const prod = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

function opsCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  let seed = 1;
  const data = (n: number, scale = 1, positive = false) => seeded(n, seed++, scale, positive);

  // gemm: transposes, row strides longer than the rows, batches, beta, split-K shapes. One logical
  // op(A), op(B) per shape, stored four ways (transposed or not, in padded rows whose padding holds
  // other values), so the product is computed once and must come out of every layout.
  for (const [M, N, K] of [[1, 1, 1], [7, 13, 5], [129, 67, 33], [300, 257, 1000], [2000, 16, 3000], [16, 1500, 4000],
    [64, 64, 0], [33, 200, 7], [500, 40, 300], [40, 500, 9000]] as const) {
    const batch = M * N * K < 2e6 ? 3 : 1;
    const opA = data(batch * M * K), opB = data(batch * K * N);
    let product: Float64Array | undefined;  // op(A)·op(B) per batch entry, (batch, M, N)
    for (const ta of [false, true]) for (const tb of [false, true]) {
      const pad = 3;
      const lda = (ta ? M : K) + pad, ldb = (tb ? K : N) + pad, ldc = N + pad;
      const sa = (ta ? K : M) * lda + 5, sb = (tb ? N : K) * ldb + 7, sc = M * ldc + 2;
      const a = data(batch * sa), b = data(batch * sb), c0 = data(batch * sc);
      for (let z = 0; z < batch; z++) {
        for (let i = 0; i < M; i++) for (let k = 0; k < K; k++) a[z * sa + (ta ? k * lda + i : i * lda + k)] = opA[(z * M + i) * K + k]!;
        for (let k = 0; k < K; k++) for (let j = 0; j < N; j++) b[z * sb + (tb ? j * ldb + k : k * ldb + j)] = opB[(z * K + k) * N + j]!;
      }
      for (const beta of [0, 1.5]) {
        cases.push({
          name: `gemm M${M} N${N} K${K} ${ta ? 'T' : 'N'}${tb ? 'T' : 'N'} batch${batch} beta${beta}`,
          build: () => {
            product ??= gemmRef({ a: opA, b: opB, c0: new Float64Array(batch * M * N), M, N, K, ta: false, tb: false, lda: K, ldb: N, ldc: N,
              alpha: 1, beta: 0, batch, sa: M * K, sb: K * N, sc: M * N });
            const expect = Float64Array.from(c0);
            for (let z = 0; z < batch; z++) for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) {
              const o = z * sc + i * ldc + j;
              expect[o] = 0.75 * product[(z * M + i) * N + j]! + beta * c0[o]!;
            }
            return {
              inputs: { A: { data: a }, B: { data: b } }, outputs: { C: c0 },
              calls: [['gemm', '$C', '$A', '$B', M, N, K, ta, tb, lda, ldb, ldc, 0.75, beta, batch, sa, sb, sc]],
              expect: { C: expect }, tol: { ...FP32, atol: 1e-5 * Math.sqrt(K + 1) },
            };
          },
        });
      }
    }
  }
  // gemm with a bf16 B (linear() on a frozen bf16 weight), B widened exactly
  for (const [M, N, K] of [[1, 1, 1], [7, 13, 5], [129, 67, 33], [16, 1500, 4000], [300, 257, 1000]] as const) {
    for (const tb of [true, false]) {
      const ldb = tb ? K : N;
      const a = data(M * K), b = data(N * K, 1 / Math.sqrt(K)), c0 = data(M * N);
      cases.push({
        name: `gemm bf16 B M${M} N${N} K${K} N${tb ? 'T' : 'N'}`,
        build: () => ({
          inputs: { A: { data: a }, B: { data: b, dtype: 'bfloat16' } }, outputs: { C: c0 },
          calls: [['gemm', '$C', '$A', '$B', M, N, K, false, tb, K, ldb, N, 1, 0.5, 1, 0, 0, 0]],
          expect: { C: gemmRef({ a, b: bf16(b), c0, M, N, K, ta: false, tb, lda: K, ldb, ldc: N, alpha: 1, beta: 0.5, batch: 1, sa: 0, sb: 0, sc: 0 }) },
          tol: { ...FP32, atol: 1e-5 * Math.sqrt(K + 1) },
        }),
      });
    }
  }
  {  // a broadcast output accumulating over the batch (stride_c = 0, beta = 1)
    const M = 37, N = 45, K = 300, batch = 4;
    const a = data(batch * M * K), b = data(K * N), c0 = data(M * N);
    cases.push({
      name: 'gemm broadcast C over the batch (stride_c 0, beta 1)',
      build: () => {
        let expect: Float64Array = Float64Array.from(c0);
        for (let z = 0; z < batch; z++)
          expect = gemmRef({ a: a.subarray(z * M * K), b, c0: expect, M, N, K, ta: false, tb: false, lda: K, ldb: N, ldc: N, alpha: 1, beta: 1, batch: 1, sa: 0, sb: 0, sc: 0 });
        return {
          inputs: { A: { data: a }, B: { data: b } }, outputs: { C: c0 },
          calls: [['gemm', '$C', '$A', '$B', M, N, K, false, false, K, N, N, 1, 1, batch, M * K, 0, 0]],
          expect: { C: expect }, tol: { ...FP32, atol: 1e-5 * Math.sqrt(K * batch) },
        };
      },
    });
  }

  // binary with broadcasting strides, and with a scalar
  for (const [shape, aShape, bShape] of [
    [[1000003], [1000003], [1000003]], [[3, 4, 5], [3, 1, 5], [1, 4, 5]], [[7, 129, 33], [7, 129, 33], [1, 1, 33]],
    [[2, 3, 4, 5, 6], [2, 1, 4, 1, 6], [1, 3, 1, 5, 1]],
    // a broadcast along the last dim on the left (inner strides 0 and 1), and on both sides
    [[5, 3, 37], [5, 3, 1], [1, 3, 37]], [[4, 6, 5], [4, 1, 1], [1, 6, 1]],
  ] as const) {
    const bStrides = (s: readonly number[]) => { const c = contiguous(s); return s.map((d, i) => (d === 1 && (shape[i] as number) !== 1 ? 0 : c[i]!)); };
    const a = data(prod(aShape)), b = data(prod(bShape), 1, true);
    BINARY_REF.forEach(([op, f], id) => cases.push({
      name: `binary ${op} [${shape}] <- [${aShape}] [${bShape}]`,
      build: () => {
        const as = bStrides(aShape), bs = bStrides(bShape);
        const expect = Float64Array.from({ length: prod(shape) }, (_, i) => f(stridedAt(a, 0, shape, as, i), stridedAt(b, 0, shape, bs, i)));
        return {
          inputs: { a: { data: a }, b: { data: b } }, outputs: { out: prod(shape) },
          calls: [['binary', id, '$out', '$a', '$b', [...shape], as, bs]], expect: { out: expect }, tol: { atol: 0, rtol: 2 ** -23 },
        };
      },
    }));
  }
  {
    const n = 77777, a = data(n, 2);
    BINARY_REF.forEach(([op, f], id) => {
      for (const first of [false, true]) cases.push({
        name: `binaryScalar ${op} ${first ? 'scalar first' : 'scalar second'}`,
        build: () => ({
          inputs: { a: { data: a } }, outputs: { out: n }, calls: [['binaryScalar', id, '$out', '$a', 0.37, first]],
          expect: { out: Float64Array.from(a, (v) => (first ? f(Math.fround(0.37), v) : f(v, Math.fround(0.37)))) }, tol: { atol: 0, rtol: 2 ** -23 },
        }),
      });
    });
  }
  // unary functions and their derivatives (libm vs CUDA math: a few ulp)
  {
    const n = 100003;
    const signed = data(n, 3), positive = data(n, 3, true), dy = data(n);
    Object.entries(UNARY_REF).forEach(([op, u], id) => {
      const x = u.positive ? positive : signed;
      const tol = { atol: 1e-6, rms: 1e-6, rtol: 2e-6 };
      cases.push({
        name: `unary ${op}`,
        build: () => ({ inputs: { x: { data: x } }, outputs: { out: n }, calls: [['unary', id, '$out', '$x']], expect: { out: x.map(u.f) }, tol }),
      });
      cases.push({
        name: `unaryBackward ${op}`,
        build: () => ({
          inputs: { x: { data: x }, y: { data: x.map((v) => Math.fround(u.f(v))) }, dy: { data: dy } }, outputs: { dx: n },
          calls: [['unaryBackward', id, '$dx', '$dy', '$x', '$y']], expect: { dx: x.map((v, i) => dy[i]! * u.df(v)) }, tol,
        }),
      });
    });
  }
  {
    const n = 123457, x = data(n), y0 = data(n);
    cases.push({
      name: 'axpy', build: () => ({
        inputs: { x: { data: x } }, outputs: { y: y0 }, calls: [['axpy', '$y', '$x', -0.3]],
        expect: { y: y0.map((v, i) => v + Math.fround(-0.3) * x[i]!) }, tol: { atol: 1e-7, rtol: 1e-6 },
      }),
    });
    cases.push({ name: 'fill', build: () => ({ inputs: {}, outputs: { out: n }, calls: [['fill', '$out', 2.5]], expect: { out: new Float64Array(n).fill(2.5) }, tol: EXACT }) });
    for (const p of [0.1, 0.5]) cases.push({
      name: `dropout p=${p}`, build: () => ({
        inputs: { x: { data: x } }, outputs: { out: n }, calls: [['dropout', '$out', '$x', p, 12345]],
        expect: { out: dropoutRef(x, p, 12345) }, tol: { atol: 0, rtol: 2 ** -23 },
      }),
    });
    const big = data(n, 100);
    for (const [dtype, round] of [['bfloat16', bf16], ['float16', f16]] as const) cases.push({
      name: `convert ${dtype} round trip`, build: () => ({
        inputs: { x: { data: big }, h: { data: new Float64Array(n), dtype } }, outputs: { out: n },
        calls: [['convert', '$h', '$x'], ['convert', '$out', '$h']], expect: { out: round(big) }, tol: EXACT,
      }),
    });
  }
  for (const [outer, dim, inner] of [[3, 1000, 1], [5, 7, 13], [1, 300001, 1], [2, 1, 5], [64, 129, 1], [1, 5000, 3], [2, 10000, 300], [3, 70000, 1]] as const) {
    const x = data(outer * dim * inner);
    REDUCE_REF.forEach(([op, f], id) => cases.push({
      name: `reduce ${op} (${outer}, ${dim}, ${inner})`, build: () => {
        const expect = new Float64Array(outer * inner);
        for (let o = 0; o < outer; o++) for (let i = 0; i < inner; i++)
          expect[o * inner + i] = f(Array.from({ length: dim }, (_, d) => x[(o * dim + d) * inner + i]!));
        return {
          inputs: { x: { data: x } }, outputs: { out: outer * inner }, calls: [['reduce', id, '$out', '$x', outer, dim, inner]],
          expect: { out: expect }, tol: { atol: 1e-6, rms: 1e-6, rtol: 1e-5 },
        };
      },
    }));
  }
  {
    const R = 37, C = 53, x = data(R * C);
    cases.push({
      name: 'copyStrided transpose', build: () => ({
        inputs: { x: { data: x } }, outputs: { out: R * C }, calls: [['copyStrided', '$out', 0, [1, R], '$x', 0, [C, 1], [R, C]]],
        expect: { out: Float64Array.from({ length: R * C }, (_, i) => x[(i % R) * C + Math.floor(i / R)]!) }, tol: EXACT,
      }),
    });
    cases.push({
      name: 'copyStrided a strided slice into an offset', build: () => {
        const expect = new Float64Array(R * C);
        for (let i = 0; i < 10; i++) for (let j = 0; j < 20; j++) expect[7 + i * C + j] = x[3 + i * C + 2 * j]!;
        return {
          inputs: { x: { data: x } }, outputs: { out: new Float64Array(R * C) }, calls: [['copyStrided', '$out', 7, [C, 1], '$x', 3, [C, 2], [10, 20]]],
          expect: { out: expect }, tol: EXACT,
        };
      },
    });
  }
  for (const [rows, cols] of [[1, 1], [37, 1000], [5, 40000], [300, 33]] as const) {
    const x = data(rows * cols, 5), dy = data(rows * cols);
    for (const log of [false, true]) {
      const tol = { atol: 1e-6, rms: 1e-5, rtol: 1e-4 };
      cases.push({
        name: `softmax${log ? ' (log)' : ''} (${rows}, ${cols})`, build: () => ({
          inputs: { x: { data: x } }, outputs: { out: rows * cols }, calls: [['softmax', '$out', '$x', rows, cols, log]],
          expect: { out: softmaxRef(x, rows, cols, log) }, tol,
        }),
      });
      cases.push({
        name: `softmaxBackward${log ? ' (log)' : ''} (${rows}, ${cols})`, build: () => ({
          inputs: { y: { data: softmaxRef(x, rows, cols, log) }, dy: { data: dy } }, outputs: { dx: rows * cols },
          calls: [['softmaxBackward', '$dx', '$dy', '$y', rows, cols, log]], expect: { dx: softmaxBackwardRef(x, dy, rows, cols, log) }, tol,
        }),
      });
    }
  }
  return cases;
}

/** The parity cases of the general kernels. */
export const parityCases: ParityCase[] = opsCases();
