// Small dense float64 linear algebra on the host: Householder QR, a one-sided Jacobi SVD and a
// randomized low-rank SVD, for combining adapters (rank-by-rank problems) and for PiSSA/OLoRA's
// one-time inits of a layer (weight-sized problems: seconds for a 576 x 1536 weight). Matrices are
// row-major Float64Arrays. There is no blocking and no BLAS: not for use inside a training step.

/** A row-major matrix. */
export interface Mat {
  rows: number;
  cols: number;
  data: Float64Array;
}

export function mat(rows: number, cols: number, data?: ArrayLike<number>): Mat {
  const d = new Float64Array(rows * cols);
  if (data) d.set(data);
  return { rows, cols, data: d };
}

export function transposeMat(a: Mat): Mat {
  const out = mat(a.cols, a.rows);
  for (let i = 0; i < a.rows; i++) for (let j = 0; j < a.cols; j++) out.data[j * a.rows + i] = a.data[i * a.cols + j]!;
  return out;
}

export function matmulMat(a: Mat, b: Mat): Mat {
  if (a.cols !== b.rows) throw new Error(`matmulMat: ${a.rows}x${a.cols} by ${b.rows}x${b.cols}`);
  const out = mat(a.rows, b.cols);
  const n = b.cols;
  for (let i = 0; i < a.rows; i++) {
    const o = i * n;
    for (let k = 0; k < a.cols; k++) {
      const v = a.data[i * a.cols + k]!;
      if (v === 0) continue;
      const bo = k * n;
      for (let j = 0; j < n; j++) out.data[o + j] += v * b.data[bo + j]!;
    }
  }
  return out;
}

/**
 * Thin QR by Householder reflections: A (m x n) = Q (m x k) · R (k x n), k = min(m, n), Q with
 * orthonormal columns. Rank-deficient inputs are fine (R gets zero rows' worth of diagonal).
 */
export function qr(a: Mat): { q: Mat; r: Mat } {
  const m = a.rows;
  const n = a.cols;
  const k = Math.min(m, n);
  // column-major working copies: every reflection reads and writes contiguous column segments
  const R = transposeMat(a).data; // column c at R[c·m ..]
  const vs: Float64Array[] = [];
  for (let j = 0; j < k; j++) {
    const col = j * m;
    const v = R.slice(col + j, col + m);
    let below = 0;
    for (let i = 1; i < v.length; i++) below += v[i]! * v[i]!;
    if (below === 0) {
      // nothing to zero below the diagonal: no reflection (LAPACK's dlarfg takes tau = 0 here too,
      // so R's signs, and OLoRA's factors, match torch.linalg.qr's)
      vs.push(v.fill(0));
      continue;
    }
    const norm = Math.sqrt(v[0]! * v[0]! + below);
    v[0]! += v[0]! >= 0 ? norm : -norm;
    const vn = Math.sqrt(v[0]! * v[0]! + below);
    for (let i = 0; i < v.length; i++) v[i]! /= vn;
    vs.push(v);
    for (let c = j; c < n; c++) reflect(R, c * m + j, v);
  }
  // Q = H_0 ... H_{k-1} applied to the first k columns of the identity
  const Q = new Float64Array(k * m); // column-major
  for (let i = 0; i < k; i++) Q[i * m + i] = 1;
  for (let j = k - 1; j >= 0; j--) for (let c = 0; c < k; c++) reflect(Q, c * m + j, vs[j]!);
  const q = mat(m, k);
  for (let c = 0; c < k; c++) for (let i = 0; i < m; i++) q.data[i * k + c] = Q[c * m + i]!;
  const r = mat(k, n);
  for (let c = 0; c < n; c++) for (let i = 0; i <= Math.min(c, k - 1); i++) r.data[i * n + c] = R[c * m + i]!;
  return { q, r };
}

// x -= 2·v·(vᵀx) for the segment x = buf[at .. at + v.length)
function reflect(buf: Float64Array, at: number, v: Float64Array): void {
  let dot = 0;
  for (let i = 0; i < v.length; i++) dot += v[i]! * buf[at + i]!;
  if (dot === 0) return;
  dot *= 2;
  for (let i = 0; i < v.length; i++) buf[at + i] -= v[i]! * dot;
}

/**
 * Singular value decomposition A (m x n) = U · diag(s) · Vᵀ with p = min(m, n) singular values in
 * descending order, by one-sided Jacobi rotations (accurate to working precision, also for small
 * singular values). U is m x p, V is n x p.
 */
export function svd(a: Mat): { u: Mat; s: Float64Array; v: Mat } {
  if (a.rows < a.cols) {
    const t = svd(transposeMat(a));
    return { u: t.v, s: t.s, v: t.u };
  }
  if (a.rows > a.cols) {
    // A = Q·R: the Jacobi sweeps then run on the n x n R (fewer flops per rotation), U = Q·U_R
    const { q, r } = qr(a);
    const t = svd(r);
    return { u: matmulMat(q, t.u), s: t.s, v: t.v };
  }
  const m = a.rows;
  const n = a.cols;
  // work on columns: W = A·V, rotate pairs of columns until they are orthogonal
  const W = transposeMat(a); // n x m: row j is column j of A
  const V = mat(n, n); // row j is column j of V (contiguous rotations)
  for (let i = 0; i < n; i++) V.data[i * n + i] = 1;
  const eps = 1e-15;
  const d = new Float64Array(n); // squared column norms, updated by each rotation, recomputed each sweep
  for (let sweep = 0; sweep < 60; sweep++) {
    let rotated = false;
    for (let j = 0; j < n; j++) {
      let acc = 0;
      for (let i = 0; i < m; i++) acc += W.data[j * m + i]! ** 2;
      d[j] = acc;
    }
    for (let p = 0; p < n - 1; p++) {
      for (let q = p + 1; q < n; q++) {
        const alpha = d[p]!;
        const beta = d[q]!;
        let gamma = 0;
        for (let i = 0; i < m; i++) gamma += W.data[p * m + i]! * W.data[q * m + i]!;
        if (gamma === 0 || Math.abs(gamma) <= eps * Math.sqrt(alpha * beta)) continue;
        rotated = true;
        const zeta = (beta - alpha) / (2 * gamma);
        const t = Math.sign(zeta || 1) / (Math.abs(zeta) + Math.sqrt(1 + zeta * zeta));
        const c = 1 / Math.sqrt(1 + t * t);
        const s = c * t;
        // the rotation that makes columns p and q orthogonal moves t·gamma of squared norm between them
        d[p] = alpha - t * gamma;
        d[q] = beta + t * gamma;
        for (let i = 0; i < m; i++) {
          const x = W.data[p * m + i]!;
          const y = W.data[q * m + i]!;
          W.data[p * m + i] = c * x - s * y;
          W.data[q * m + i] = s * x + c * y;
        }
        for (let i = 0; i < n; i++) {
          const x = V.data[p * n + i]!;
          const y = V.data[q * n + i]!;
          V.data[p * n + i] = c * x - s * y;
          V.data[q * n + i] = s * x + c * y;
        }
      }
    }
    if (!rotated) break;
  }
  const norms = Array.from({ length: n }, (_, j) => {
    let s = 0;
    for (let i = 0; i < m; i++) s += W.data[j * m + i]! ** 2;
    return Math.sqrt(s);
  });
  const order = norms.map((_, j) => j).sort((x, y) => norms[y]! - norms[x]!);
  const U = mat(m, n);
  const Vs = mat(n, n);
  const S = new Float64Array(n);
  order.forEach((j, k) => {
    S[k] = norms[j]!;
    for (let i = 0; i < m; i++) U.data[i * n + k] = norms[j]! > 0 ? W.data[j * m + i]! / norms[j]! : 0;
    for (let i = 0; i < n; i++) Vs.data[i * n + k] = V.data[j * n + i]!;
  });
  return { u: U, s: S, v: Vs };
}

/**
 * Randomized SVD (Halko, Martinsson and Tropp; torch.svd_lowrank's algorithm): Q an orthonormal
 * basis of A·G for a Gaussian G (n x k), refined by `niter` subspace iterations
 * (Q = qr(A·qr(Aᵀ·Q))), then the exact SVD of the small Qᵀ·A. Returns the top k triplets of A,
 * U (m x k), s (k), V (n x k): exact when rank(A) <= k, otherwise approximate, the closer the more
 * iterations. `normal` draws the Gaussian start. Requires k <= min(m, n).
 */
export function svdLowRank(a: Mat, k: number, niter: number, normal: () => number): { u: Mat; s: Float64Array; v: Mat } {
  if (k > Math.min(a.rows, a.cols)) throw new Error(`svdLowRank: k = ${k} > min(${a.rows}, ${a.cols})`);
  const g = mat(a.cols, k);
  for (let i = 0; i < g.data.length; i++) g.data[i] = normal();
  const at = transposeMat(a);
  let basis = qr(matmulMat(a, g)).q;
  for (let i = 0; i < niter; i++) basis = qr(matmulMat(a, qr(matmulMat(at, basis)).q)).q;
  const small = svd(matmulMat(transposeMat(basis), a)); // (k x n) = U_s·diag(s)·Vᵀ
  return { u: matmulMat(basis, small.u), s: small.s, v: small.v };
}
