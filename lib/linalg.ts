// Small dense float64 linear algebra on the host: Householder QR, a one-sided Jacobi SVD, the top
// singular triplets through the Gram matrix's eigenproblem, and a randomized low-rank SVD, for
// combining adapters (rank-by-rank problems) and PiSSA/OLoRA's one-time inits of a layer
// (weight-sized problems: topSvd() and qr() take about a second for a 576 x 1536 weight).
// Matrices are row-major Float64Arrays. No blocking and no BLAS: not for use inside a training step.

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
 * With `keep` < min(m, n): the first `keep` columns of that Q and rows of that R, bit for bit.
 */
export function qr(a: Mat, keep = Math.min(a.rows, a.cols)): { q: Mat; r: Mat } {
  const m = a.rows;
  const n = a.cols;
  // the first `keep` columns of Q and rows of R need only the first `keep` reflections (the later
  // ones touch neither): OLoRA's rank-r factors cost m·n·r, not m·n·min(m, n)
  if (!Number.isInteger(keep) || keep < 0 || keep > Math.min(m, n)) throw new Error(`qr: keep = ${keep} outside 0..${Math.min(m, n)}`);
  const k = keep;
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

/**
 * The top k singular triplets of A (m x n), for weight-sized matrices (PiSSA): the symmetric
 * eigenproblem of the smaller Gram matrix (AᵀA, or AAᵀ when m < n) by Householder
 * tridiagonalization, bisection (Sturm counts) for its k largest eigenvalues and inverse iteration
 * for their vectors (each orthogonalized against the ones before, so equal singular values still
 * give an orthonormal basis), then U = A·V / σ. About (mn·p + 4/3·p³) flops for p = min(m, n),
 * against tens of p³ for svd()'s Jacobi sweeps. Squaring A costs accuracy in the small singular
 * values (an error near eps·σ₁²/σᵢ in σᵢ): for the leading triplets, not for a pseudo-inverse.
 * Returns U (m x k), s (k, descending), V (n x k); `normal` draws the inverse iteration's starts.
 */
export function topSvd(a: Mat, k: number, normal: () => number): { u: Mat; s: Float64Array; v: Mat } {
  if (a.rows < a.cols) {
    const t = topSvd(transposeMat(a), k, normal);
    return { u: t.v, s: t.s, v: t.u };
  }
  const m = a.rows;
  const n = a.cols;
  if (k > n) throw new Error(`topSvd: k = ${k} > min(${m}, ${n})`);
  const at = transposeMat(a); // row i is column i of A
  const G = new Float64Array(n * n); // AᵀA
  for (let i = 0; i < n; i++)
    for (let j = i; j < n; j++) {
      let acc = 0;
      for (let r = 0; r < m; r++) acc += at.data[i * m + r]! * at.data[j * m + r]!;
      G[i * n + j] = acc;
      G[j * n + i] = acc;
    }
  const { d, e, vs } = tridiagonalize(G, n);
  const V = mat(n, k);
  const s = new Float64Array(k);
  const found: Float64Array[] = [];
  for (let j = 0; j < k; j++) {
    const lambda = kthEigenvalue(d, e, n - 1 - j);
    const y = inverseIteration(d, e, lambda, found, normal);
    found.push(y);
    // back to G's basis: x = H_0·H_1·…·H_{n-3}·y
    const x = y.slice();
    for (let h = vs.length - 1; h >= 0; h--) reflect(x, h + 1, vs[h]!);
    s[j] = Math.sqrt(Math.max(lambda, 0));
    for (let i = 0; i < n; i++) V.data[i * k + j] = x[i]!;
  }
  const U = matmulMat(a, V);
  for (let j = 0; j < k; j++) {
    const inv = s[j]! > 0 ? 1 / s[j]! : 0;
    for (let i = 0; i < m; i++) U.data[i * k + j] *= inv;
  }
  return { u: U, s, v: V };
}

// G (n x n, symmetric, row-major, overwritten) = Q·T·Qᵀ, T tridiagonal (diagonal d, off-diagonal e),
// Q = H_0·…·H_{n-3} with H_j = I - 2·v_j·v_jᵀ acting on indices j+1..n-1 (v_j in vs[j]).
function tridiagonalize(G: Float64Array, n: number): { d: Float64Array; e: Float64Array; vs: Float64Array[] } {
  const vs: Float64Array[] = [];
  const e = new Float64Array(Math.max(n - 1, 0));
  for (let j = 0; j + 2 < n; j++) {
    const len = n - j - 1;
    const v = new Float64Array(len);
    let below = 0;
    for (let i = 0; i < len; i++) {
      v[i] = G[(j + 1 + i) * n + j]!;
      if (i > 0) below += v[i]! ** 2;
    }
    if (below === 0) {
      vs.push(v.fill(0));
      e[j] = G[(j + 1) * n + j]!;
      continue;
    }
    const norm = Math.sqrt(v[0]! ** 2 + below);
    e[j] = v[0]! >= 0 ? -norm : norm; // H·x = e_j·e₁
    v[0]! += v[0]! >= 0 ? norm : -norm;
    const vn = Math.sqrt(v[0]! ** 2 + below);
    for (let i = 0; i < len; i++) v[i]! /= vn;
    vs.push(v);
    // trailing block B ← H·B·H = B - 2·(v·qᵀ + q·vᵀ), w = B·v, q = w - (vᵀw)·v
    const o = j + 1;
    const w = new Float64Array(len);
    for (let r = 0; r < len; r++) {
      let acc = 0;
      const row = (o + r) * n + o;
      for (let c = 0; c < len; c++) acc += G[row + c]! * v[c]!;
      w[r] = acc;
    }
    let K = 0;
    for (let i = 0; i < len; i++) K += v[i]! * w[i]!;
    for (let i = 0; i < len; i++) w[i]! -= K * v[i]!;
    for (let r = 0; r < len; r++) {
      const row = (o + r) * n + o;
      const vr = 2 * v[r]!;
      const qr2 = 2 * w[r]!;
      for (let c = 0; c < len; c++) G[row + c] -= vr * w[c]! + qr2 * v[c]!;
    }
  }
  if (n >= 2) e[n - 2] = G[(n - 1) * n + n - 2]!;
  const d = new Float64Array(n);
  for (let i = 0; i < n; i++) d[i] = G[i * n + i]!;
  return { d, e, vs };
}

// the eigenvalue of T with `index` eigenvalues below it (0 = the smallest), by bisection on Sturm counts
function kthEigenvalue(d: Float64Array, e: Float64Array, index: number): number {
  const n = d.length;
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < n; i++) {
    const r = (i > 0 ? Math.abs(e[i - 1]!) : 0) + (i < n - 1 ? Math.abs(e[i]!) : 0);
    lo = Math.min(lo, d[i]! - r);
    hi = Math.max(hi, d[i]! + r);
  }
  const scale = Math.max(Math.abs(lo), Math.abs(hi), Number.MIN_VALUE);
  const pivmin = Number.MIN_VALUE * 1e10 * Math.max(1, scale);
  const below = (x: number) => {
    let count = 0;
    let q = 1;
    for (let i = 0; i < n; i++) {
      q = d[i]! - x - (i > 0 ? e[i - 1]! ** 2 / q : 0);
      if (Math.abs(q) < pivmin) q = -pivmin;
      if (q < 0) count++;
    }
    return count;
  };
  for (let it = 0; it < 200 && hi - lo > 4 * Number.EPSILON * scale; it++) {
    const mid = 0.5 * (lo + hi);
    if (below(mid) > index) hi = mid;
    else lo = mid;
  }
  return 0.5 * (lo + hi);
}

// a unit eigenvector of T for the eigenvalue lambda, orthogonal to `others` (inverse iteration on
// T - lambda·I, LU with partial pivoting; a zero pivot becomes a tiny one)
function inverseIteration(d: Float64Array, e: Float64Array, lambda: number, others: readonly Float64Array[], normal: () => number): Float64Array {
  const n = d.length;
  let tnorm = 0;
  for (let i = 0; i < n; i++) tnorm = Math.max(tnorm, Math.abs(d[i]!) + (i > 0 ? Math.abs(e[i - 1]!) : 0) + (i < n - 1 ? Math.abs(e[i]!) : 0));
  const tiny = Number.EPSILON * Math.max(tnorm, Number.MIN_VALUE);
  // factor: dl (multipliers), dd (diagonal of U), du (first superdiagonal), du2 (second), swap[i]
  const dd = d.map((x) => x - lambda);
  const dl = e.slice();
  const du = e.slice();
  const du2 = new Float64Array(Math.max(n - 2, 0));
  const swap = new Uint8Array(Math.max(n - 1, 0));
  for (let i = 0; i + 1 < n; i++) {
    if (Math.abs(dd[i]!) >= Math.abs(dl[i]!)) {
      if (dd[i] === 0) dd[i] = tiny;
      const f = dl[i]! / dd[i]!;
      dl[i] = f;
      dd[i + 1]! -= f * du[i]!;
    } else {
      const f = dd[i]! / dl[i]!;
      dd[i] = dl[i]!;
      dl[i] = f;
      const t = du[i]!;
      du[i] = dd[i + 1]!;
      dd[i + 1] = t - f * dd[i + 1]!;
      if (i + 2 < n) {
        du2[i] = du[i + 1]!;
        du[i + 1] = -f * du[i + 1]!;
      }
      swap[i] = 1;
    }
  }
  if (n > 0 && dd[n - 1] === 0) dd[n - 1] = tiny;
  for (let i = 0; i < n; i++) if (Math.abs(dd[i]!) < tiny) dd[i] = dd[i]! < 0 ? -tiny : tiny;
  let y = new Float64Array(n);
  for (let i = 0; i < n; i++) y[i] = normal();
  const orthonormalize = (x: Float64Array) => {
    for (const o of others) {
      let dot = 0;
      for (let i = 0; i < n; i++) dot += o[i]! * x[i]!;
      for (let i = 0; i < n; i++) x[i]! -= dot * o[i]!;
    }
    let nn = 0;
    for (const v of x) nn += v * v;
    nn = Math.sqrt(nn);
    for (let i = 0; i < n; i++) x[i] = nn > 0 ? x[i]! / nn : 0;
  };
  orthonormalize(y);
  for (let it = 0; it < 4; it++) {
    const b = y.slice();
    for (let i = 0; i + 1 < n; i++) {
      if (swap[i]) {
        const t = b[i]!;
        b[i] = b[i + 1]!;
        b[i + 1] = t - dl[i]! * b[i]!;
      } else {
        b[i + 1]! -= dl[i]! * b[i]!;
      }
    }
    for (let i = n - 1; i >= 0; i--) {
      let acc = b[i]!;
      if (i + 1 < n) acc -= du[i]! * b[i + 1]!;
      if (i + 2 < n) acc -= du2[i]! * b[i + 2]!;
      b[i] = acc / dd[i]!;
    }
    y = b;
    orthonormalize(y);
  }
  return y;
}
