// Float64 references for lib/nn_ops.ts, written from the math and independent of the kernels:
// each op has a forward and, where it has one, a backward that returns the gradients of
// sum(y ⊙ G). Also: a central finite-difference checker and the tolerance comparison the tests
// share. Not a test file itself (test/nn_ops.test.ts uses it).
export type F64 = Float64Array;

// ---- comparison and finite differences -------------------------------------------------------

export interface Mismatch {
  ok: boolean;
  worst: number;
  message: string;
}

/** |a - r| <= atol + rtol·|r| everywhere; reports the worst index, a few pairs and the normalised error. */
export function compare(a: ArrayLike<number>, r: ArrayLike<number>, atol: number, rtol: number): Mismatch {
  if (a.length !== r.length) return { ok: false, worst: -1, message: `length ${a.length} vs ${r.length}` };
  let worst = -1;
  let worstRatio = 0;
  let num = 0;
  let den = 0;
  for (let i = 0; i < r.length; i++) {
    const d = Math.abs(a[i]! - r[i]!);
    const ratio = Number.isNaN(d) ? Infinity : d / (atol + rtol * Math.abs(r[i]!));
    num += d * d;
    den += r[i]! * r[i]!;
    if (worst < 0 || ratio > worstRatio) { worstRatio = ratio; worst = i; }
  }
  const ok = worstRatio <= 1;
  const pairs = [worst, 0, r.length - 1].filter((i) => i >= 0).map((i) => `[${i}] ${a[i]} vs ${r[i]}`).join(', ');
  return { ok, worst, message: `worst ratio ${worstRatio.toExponential(2)} at ${pairs}; normalised error ${Math.sqrt(num / Math.max(den, 1e-300)).toExponential(2)}` };
}

/**
 * Central differences of L = Σ f(inputs) ⊙ G with respect to every element of inputs[which].
 * The references are smooth where the tests sample them, so h = 1e-6 leaves ~1e-9 error.
 */
export function finiteDiff(f: (inputs: F64[]) => F64, inputs: F64[], G: F64, which: number, h = 1e-6): F64 {
  const x = inputs[which]!;
  const out = new Float64Array(x.length);
  const dot = (y: F64) => { let s = 0; for (let i = 0; i < y.length; i++) s += y[i]! * G[i]!; return s; };
  for (let i = 0; i < x.length; i++) {
    const keep = x[i]!;
    x[i] = keep + h;
    const lp = dot(f(inputs));
    x[i] = keep - h;
    const lm = dot(f(inputs));
    x[i] = keep;
    out[i] = (lp - lm) / (2 * h);
  }
  return out;
}

// ---- a seeded generator for test data (independent of lib/random.ts) ---------------------------

export function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296;
  };
}

export function randArray(n: number, seed: number, scale = 1): F64 {
  const u = lcg(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    // Box-Muller
    const a = Math.max(u(), 1e-12), b = u();
    out[i] = scale * Math.sqrt(-2 * Math.log(a)) * Math.cos(2 * Math.PI * b);
  }
  return out;
}

/** Rounds to float32 and back, so references see exactly what the kernels see. */
export function f32(x: ArrayLike<number>): F64 {
  return Float64Array.from(Float32Array.from(x as ArrayLike<number>));
}

// ---- softmax family --------------------------------------------------------------------------

export function softmaxRef(x: F64, rows: number, cols: number, log: boolean): F64 {
  const y = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let mx = -Infinity;
    for (let j = 0; j < cols; j++) mx = Math.max(mx, x[r * cols + j]!);
    let s = 0;
    for (let j = 0; j < cols; j++) s += Math.exp(x[r * cols + j]! - mx);
    for (let j = 0; j < cols; j++) {
      const v = x[r * cols + j]! - mx - Math.log(s);
      y[r * cols + j] = log ? v : Math.exp(v);
    }
  }
  return y;
}

/** softmax: dx = y⊙(G - Σ G⊙y);  log-softmax: dx = G - softmax·Σ G */
export function softmaxBackwardRef(x: F64, G: F64, rows: number, cols: number, log: boolean): F64 {
  const p = softmaxRef(x, rows, cols, false);
  const dx = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    let dot = 0;
    for (let j = 0; j < cols; j++) dot += log ? G[r * cols + j]! : G[r * cols + j]! * p[r * cols + j]!;
    for (let j = 0; j < cols; j++) {
      const i = r * cols + j;
      dx[i] = log ? G[i]! - p[i]! * dot : p[i]! * (G[i]! - dot);
    }
  }
  return dx;
}

// ---- gelu ------------------------------------------------------------------------------------

/** erf to ~1e-15: Taylor series below 3, Laplace's continued fraction for erfc above. */
export function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax < 3) {
    let term = x, s = x;
    for (let n = 1; n < 200; n++) {
      term *= (-x * x) / n;
      const add = term / (2 * n + 1);
      s += add;
      if (Math.abs(add) < 1e-17 * Math.abs(s)) break;
    }
    return (2 / Math.sqrt(Math.PI)) * s;
  }
  let k = ax;
  for (let n = 80; n >= 1; n--) k = ax + n / 2 / k;
  const erfc = Math.exp(-ax * ax) / (Math.sqrt(Math.PI) * k);
  return x > 0 ? 1 - erfc : erfc - 1;
}

export function geluRef(x: F64, tanhApprox: boolean): F64 {
  const c = Math.sqrt(2 / Math.PI);
  return x.map((v) => tanhApprox ? 0.5 * v * (1 + Math.tanh(c * (v + 0.044715 * v ** 3))) : 0.5 * v * (1 + erf(v / Math.SQRT2)));
}

export function geluBackwardRef(x: F64, G: F64, tanhApprox: boolean): F64 {
  const c = Math.sqrt(2 / Math.PI);
  return x.map((v, i) => {
    let d: number;
    if (tanhApprox) {
      const t = Math.tanh(c * (v + 0.044715 * v ** 3));
      d = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * 0.044715 * v * v);
    } else d = 0.5 * (1 + erf(v / Math.SQRT2)) + v * Math.exp(-0.5 * v * v) / Math.sqrt(2 * Math.PI);
    return d * G[i]!;
  });
}

// ---- losses ----------------------------------------------------------------------------------

/** Per-row loss lse - Σ q⊙z, q = (1-ε)·onehot + ε/V; ignored rows 0. Returns rows or the reduction. */
export function crossEntropyRef(z: F64, t: Int32Array, V: number, ignore: number, eps: number, reduction: 'mean' | 'sum' | 'none'): F64 {
  const N = t.length;
  const rows = new Float64Array(N);
  let count = 0;
  for (let n = 0; n < N; n++) {
    if (t[n] === ignore) continue;
    count++;
    const ls = softmaxRef(z.subarray(n * V, (n + 1) * V), 1, V, true);
    let l = -(1 - eps) * ls[t[n]!]!;
    for (let j = 0; j < V; j++) l -= (eps / V) * ls[j]!;
    rows[n] = l;
  }
  if (reduction === 'none') return rows;
  const s = rows.reduce((a, b) => a + b, 0);
  return Float64Array.of(reduction === 'sum' ? s : s / count);
}

export function crossEntropyBackwardRef(z: F64, t: Int32Array, V: number, ignore: number, eps: number, reduction: 'mean' | 'sum' | 'none', G: F64): F64 {
  const N = t.length;
  const count = Array.from(t).filter((v) => v !== ignore).length;
  const dz = new Float64Array(z.length);
  for (let n = 0; n < N; n++) {
    if (t[n] === ignore) continue;
    const g = reduction === 'none' ? G[n]! : reduction === 'sum' ? G[0]! : G[0]! / count;
    const p = softmaxRef(z.subarray(n * V, (n + 1) * V), 1, V, false);
    for (let j = 0; j < V; j++) dz[n * V + j] = g * (p[j]! - eps / V - (j === t[n] ? 1 - eps : 0));
  }
  return dz;
}

// ---- normalisation ---------------------------------------------------------------------------

export function layerNormRef(x: F64, w: F64 | null, b: F64 | null, N: number, C: number, eps: number): F64 {
  const y = new Float64Array(x.length);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const mu = row.reduce((a, v) => a + v, 0) / C;
    const vr = row.reduce((a, v) => a + (v - mu) ** 2, 0) / C;
    for (let j = 0; j < C; j++) y[r * C + j] = ((row[j]! - mu) / Math.sqrt(vr + eps)) * (w ? w[j]! : 1) + (b ? b[j]! : 0);
  }
  return y;
}

/** x̂ = (x-μ)·rstd, g = G⊙w: dx = rstd·(g - mean(g) - x̂·mean(g⊙x̂)); dw = Σ G⊙x̂; db = Σ G */
export function layerNormBackwardRef(x: F64, w: F64 | null, N: number, C: number, eps: number, G: F64): { dx: F64; dw: F64; db: F64 } {
  const dx = new Float64Array(x.length), dw = new Float64Array(C), db = new Float64Array(C);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const mu = row.reduce((a, v) => a + v, 0) / C;
    const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + (v - mu) ** 2, 0) / C + eps);
    let mg = 0, mgx = 0;
    for (let j = 0; j < C; j++) {
      const xh = (row[j]! - mu) * rstd, g = G[r * C + j]! * (w ? w[j]! : 1);
      mg += g / C;
      mgx += (g * xh) / C;
      dw[j] += G[r * C + j]! * xh;
      db[j] += G[r * C + j]!;
    }
    for (let j = 0; j < C; j++) {
      const xh = (row[j]! - mu) * rstd, g = G[r * C + j]! * (w ? w[j]! : 1);
      dx[r * C + j] = rstd * (g - mg - xh * mgx);
    }
  }
  return { dx, dw, db };
}

export function rmsNormRef(x: F64, w: F64 | null, N: number, C: number, eps: number): F64 {
  const y = new Float64Array(x.length);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + v * v, 0) / C + eps);
    for (let j = 0; j < C; j++) y[r * C + j] = row[j]! * rstd * (w ? w[j]! : 1);
  }
  return y;
}

/** x̂ = x·rstd, g = G⊙w: dx = rstd·(g - x̂·mean(g⊙x̂)); dw = Σ G⊙x̂ */
export function rmsNormBackwardRef(x: F64, w: F64 | null, N: number, C: number, eps: number, G: F64): { dx: F64; dw: F64 } {
  const dx = new Float64Array(x.length), dw = new Float64Array(C);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + v * v, 0) / C + eps);
    let mgx = 0;
    for (let j = 0; j < C; j++) {
      mgx += (G[r * C + j]! * (w ? w[j]! : 1) * row[j]! * rstd) / C;
      dw[j] += G[r * C + j]! * row[j]! * rstd;
    }
    for (let j = 0; j < C; j++) dx[r * C + j] = rstd * (G[r * C + j]! * (w ? w[j]! : 1) - row[j]! * rstd * mgx);
  }
  return { dx, dw };
}

// ---- embedding, dropout -------------------------------------------------------------------

export function embeddingRef(table: F64, ids: Int32Array, C: number): F64 {
  const out = new Float64Array(ids.length * C);
  ids.forEach((id, n) => out.set(table.subarray(id * C, (id + 1) * C), n * C));
  return out;
}

export function embeddingBackwardRef(ids: Int32Array, V: number, C: number, G: F64): F64 {
  const d = new Float64Array(V * C);
  ids.forEach((id, n) => { for (let j = 0; j < C; j++) d[id * C + j] += G[n * C + j]!; });
  return d;
}

/** native/rng.h's counter RNG in BigInt: uniform in [0, 1) for (seed, index). */
export function rngUniform(seed: number, index: number): number {
  const M = (1n << 64n) - 1n;
  let z = (BigInt(seed) * 0x9E3779B97F4A7C15n + BigInt(index) + 0x632BE59BD9B4E019n) & M;
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & M;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & M;
  z = z ^ (z >> 31n);
  return Number(z >> 40n) / 16777216;
}

export function dropoutRef(x: F64, p: number, seed: number): F64 {
  const pf = Math.fround(p);
  const scale = Math.fround(1 / Math.fround(1 - pf));
  return x.map((v, i) => (rngUniform(seed, i) >= pf ? v * scale : 0));
}

// ---- slice, concat, mse -----------------------------------------------------------------------

/** x viewed as (outer, n, inner): elements start..end-1 of the middle axis. */
export function sliceRef(x: F64, outer: number, n: number, inner: number, start: number, end: number): F64 {
  const out = new Float64Array(outer * (end - start) * inner);
  let k = 0;
  for (let o = 0; o < outer; o++) for (let i = start; i < end; i++) for (let j = 0; j < inner; j++) out[k++] = x[(o * n + i) * inner + j]!;
  return out;
}

/** Parts viewed as (outer, n_p, inner), joined along the middle axis. */
export function concatRef(parts: F64[], outer: number, ns: number[], inner: number): F64 {
  const total = ns.reduce((a, b) => a + b, 0);
  const out = new Float64Array(outer * total * inner);
  let k = 0;
  for (let o = 0; o < outer; o++) parts.forEach((p, pi) => { for (let i = 0; i < ns[pi]! * inner; i++) out[k++] = p[o * ns[pi]! * inner + i]!; });
  return out;
}

export function mseRef(a: F64, b: F64): F64 {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i]! - b[i]!) ** 2;
  return Float64Array.of(s / a.length);
}
