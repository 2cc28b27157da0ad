// Float64 references for adapters, written from the math (not from lib/):
//   delta = s·B·A (OC, C); Conv1D (fan_in_fan_out) and embeddings store W transposed, delta too
//   merge: W' = W + Σ delta;  DoRA: n = ||W + s·B·A||_row, c = m / n, W' = c ⊙ (W + s·B·A)
//   DoRA forward: y = b + c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ), n constant in the backward, so with G = dL/dy:
//   dm = Σ_rows G ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) / n;  dB = s·(G⊙c)ᵀ·(x·Aᵀ);  dA = (s·(G⊙c)·B)ᵀ·x
// Matrices are row-major Float64Arrays.

export function matmulRef(a: Float64Array, b: Float64Array, M: number, K: number, N: number): Float64Array {
  const out = new Float64Array(M * N);
  for (let i = 0; i < M; i++) for (let k = 0; k < K; k++) {
    const v = a[i * K + k]!;
    for (let j = 0; j < N; j++) out[i * N + j] += v * b[k * N + j]!;
  }
  return out;
}

export function transposeRef(a: Float64Array, rows: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = a[i * cols + j]!;
  return out;
}

/** s·B·A: B (OC, R), A (R, C) -> (OC, C). */
export function deltaRef(A: Float64Array, B: Float64Array, OC: number, R: number, C: number, s: number): Float64Array {
  return matmulRef(B, A, OC, R, C).map((v) => v * s);
}

export function addRef(a: Float64Array, b: Float64Array): Float64Array {
  return a.map((v, i) => v + b[i]!);
}

/** Row norms of an (OC, C) matrix. */
export function rowNormsRef(W: Float64Array, OC: number, C: number): Float64Array {
  const out = new Float64Array(OC);
  for (let o = 0; o < OC; o++) {
    let s = 0;
    for (let c = 0; c < C; c++) s += W[o * C + c]! ** 2;
    out[o] = Math.sqrt(s);
  }
  return out;
}

/** DoRA merge W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A), all (OC, C). */
export function doraMergeRef(W: Float64Array, A: Float64Array, B: Float64Array, m: Float64Array, OC: number, R: number, C: number, s: number): Float64Array {
  const V = addRef(W, deltaRef(A, B, OC, R, C, s));
  const n = rowNormsRef(V, OC, C);
  return V.map((v, i) => (m[Math.floor(i / C)]! / n[Math.floor(i / C)]!) * v);
}

export interface DoraInputs {
  x: Float64Array; W: Float64Array; b: Float64Array | null; A: Float64Array; B: Float64Array; m: Float64Array;
  N: number; C: number; OC: number; R: number; s: number;
  /** Norms to hold constant (default: computed from W, A, B). */
  norm?: Float64Array;
}

export function doraForwardRef(a: DoraInputs): Float64Array {
  const { x, W, b, A, B, m, N, C, OC, R, s } = a;
  const n = a.norm ?? rowNormsRef(addRef(W, deltaRef(A, B, OC, R, C, s)), OC, C);
  const base = matmulRef(x, transposeRef(W, OC, C), N, C, OC);
  const lora = matmulRef(matmulRef(x, transposeRef(A, R, C), N, C, R), transposeRef(B, OC, R), N, R, OC);
  const y = new Float64Array(N * OC);
  for (let i = 0; i < N; i++) for (let o = 0; o < OC; o++) {
    const k = i * OC + o;
    y[k] = (b ? b[o]! : 0) + (m[o]! / n[o]!) * (base[k]! + s * lora[k]!);
  }
  return y;
}

export function doraBackwardRef(a: DoraInputs, G: Float64Array): { dA: Float64Array; dB: Float64Array; dm: Float64Array } {
  const { x, W, A, B, m, N, C, OC, R, s } = a;
  const n = a.norm ?? rowNormsRef(addRef(W, deltaRef(A, B, OC, R, C, s)), OC, C);
  const base = matmulRef(x, transposeRef(W, OC, C), N, C, OC);
  const h = matmulRef(x, transposeRef(A, R, C), N, C, R);
  const lora = matmulRef(h, transposeRef(B, OC, R), N, R, OC);
  const dm = new Float64Array(OC);
  const gc = new Float64Array(N * OC); // s·G⊙c
  for (let i = 0; i < N; i++) for (let o = 0; o < OC; o++) {
    const k = i * OC + o;
    dm[o] += (G[k]! * (base[k]! + s * lora[k]!)) / n[o]!;
    gc[k] = (s * G[k]! * m[o]!) / n[o]!;
  }
  const dB = matmulRef(transposeRef(gc, N, OC), h, OC, N, R);
  const dh = matmulRef(gc, B, N, OC, R);
  const dA = matmulRef(transposeRef(dh, N, R), x, R, N, C);
  return { dA, dB, dm };
}
