// Float64 references for the general ops, written from their definitions: NumPy broadcasting,
// batched matrix products, reductions over axes, permutations.

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
