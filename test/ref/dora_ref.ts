// Float64 reference for DoRA on a layer as PEFT's DoRA variant computes it, dropout included
// (written from the math and PEFT's variants.py, not from lib/):
//   x̃ = dropout(x);  n = ||W + s·B·A||_row (a constant in the backward);  c = m / n
//   y = x·Wᵀ + b + (c - 1) ⊙ (x̃·Wᵀ) + c ⊙ s·x̃·Aᵀ·Bᵀ         (p = 0: y = c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b)
// With G = dL/dy, h = x̃·Aᵀ, Gc = G ⊙ c:
//   dm = Σ_rows G ⊙ (x̃·Wᵀ + s·h·Bᵀ) / n;  dB = s·Gcᵀ·h;  dh = s·Gc·B;  dA = dhᵀ·x̃
//   dx = G·W + dropout'((Gc - G)·W + dh·A)
import { dropoutRef } from './lora_ref';
import { addRef, deltaRef, matmulRef, rowNormsRef, transposeRef } from './merge_ref';

export interface DoraLayerInputs {
  x: Float64Array; W: Float64Array; b: Float64Array | null; A: Float64Array; B: Float64Array; m: Float64Array;
  N: number; C: number; OC: number; R: number; s: number; p: number; seed: number;
  /** Norms to hold constant (default: computed from W, A, B). */
  norm?: Float64Array;
}

function normOf(a: DoraLayerInputs): Float64Array {
  return a.norm ?? rowNormsRef(addRef(a.W, deltaRef(a.A, a.B, a.OC, a.R, a.C, a.s)), a.OC, a.C);
}

export function doraLayerForwardRef(a: DoraLayerInputs): Float64Array {
  const { x, W, b, A, B, m, N, C, OC, R, s } = a;
  const n = normOf(a);
  const xd = dropoutRef(x, a.p, a.seed);
  const Wt = transposeRef(W, OC, C);
  const base = matmulRef(x, Wt, N, C, OC);
  const baseD = matmulRef(xd, Wt, N, C, OC);
  const low = matmulRef(matmulRef(xd, transposeRef(A, R, C), N, C, R), transposeRef(B, OC, R), N, R, OC);
  const y = new Float64Array(N * OC);
  for (let i = 0; i < N; i++) for (let o = 0; o < OC; o++) {
    const k = i * OC + o;
    const c = m[o]! / n[o]!;
    y[k] = base[k]! + (b ? b[o]! : 0) + (c - 1) * baseD[k]! + c * s * low[k]!;
  }
  return y;
}

export function doraLayerBackwardRef(a: DoraLayerInputs, G: Float64Array): { dx: Float64Array; dA: Float64Array; dB: Float64Array; dm: Float64Array } {
  const { x, W, A, B, m, N, C, OC, R, s, p, seed } = a;
  const n = normOf(a);
  const xd = dropoutRef(x, p, seed);
  const baseD = matmulRef(xd, transposeRef(W, OC, C), N, C, OC);
  const h = matmulRef(xd, transposeRef(A, R, C), N, C, R);
  const low = matmulRef(h, transposeRef(B, OC, R), N, R, OC);
  const dm = new Float64Array(OC);
  const Gc = new Float64Array(N * OC);
  const Gd = new Float64Array(N * OC); // Gc - G: what x̃·Wᵀ receives
  for (let i = 0; i < N; i++) for (let o = 0; o < OC; o++) {
    const k = i * OC + o;
    dm[o] += (G[k]! * (baseD[k]! + s * low[k]!)) / n[o]!;
    Gc[k] = (G[k]! * m[o]!) / n[o]!;
    Gd[k] = Gc[k]! - G[k]!;
  }
  const dB = matmulRef(transposeRef(Gc, N, OC), h, OC, N, R).map((v) => v * s);
  const dh = matmulRef(Gc, B, N, OC, R).map((v) => v * s);
  const dA = matmulRef(transposeRef(dh, N, R), xd, R, N, C);
  const dxd = addRef(matmulRef(Gd, W, N, OC, C), matmulRef(dh, A, N, R, C));
  const dx = addRef(matmulRef(G, W, N, OC, C), dropoutRef(dxd, p, seed));
  return { dx, dA, dB, dm };
}
