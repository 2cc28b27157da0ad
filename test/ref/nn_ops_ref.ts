// Float64 references for lib/ops/ (nn.ts, loss.ts), written from the math and independent of the kernels:
// each op has a forward and, where it has one, a backward that returns the gradients of
// sum(y ⊙ G). Also: a central finite-difference checker and the tolerance comparison the tests
// share, and the kernels' parity cases (at the end; the RoPE ones also check rope() itself, its
// autograd and its argument errors). Not a test file itself.
import { rope, tensor, tidy, zeros } from '../../lib/index';
import type { Device, Input, ParityCase, Tol } from '../parity/suite';
import { bf16, f16, seeded } from './dtype_ref';

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
    const ratio = d === 0 ? 0 : Number.isNaN(d) ? Infinity : d / (atol + rtol * Math.abs(r[i]!));
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
    if (eps !== 0) for (let j = 0; j < V; j++) l -= (eps / V) * ls[j]!;
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

/** y = x·rstd·(offset + w) (w null: y = x·rstd); offset 1 is Gemma's (1 + w) */
export function rmsNormRef(x: F64, w: F64 | null, N: number, C: number, eps: number, offset = 0): F64 {
  const y = new Float64Array(x.length);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + v * v, 0) / C + eps);
    for (let j = 0; j < C; j++) y[r * C + j] = row[j]! * rstd * (w ? offset + w[j]! : 1);
  }
  return y;
}

/** x̂ = x·rstd, g = G⊙(offset + w): dx = rstd·(g - x̂·mean(g⊙x̂)); dw = Σ G⊙x̂ */
export function rmsNormBackwardRef(x: F64, w: F64 | null, N: number, C: number, eps: number, G: F64, offset = 0): { dx: F64; dw: F64 } {
  const dx = new Float64Array(x.length), dw = new Float64Array(C);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + v * v, 0) / C + eps);
    let mgx = 0;
    for (let j = 0; j < C; j++) {
      mgx += (G[r * C + j]! * (w ? offset + w[j]! : 1) * row[j]! * rstd) / C;
      dw[j] += G[r * C + j]! * row[j]! * rstd;
    }
    for (let j = 0; j < C; j++) dx[r * C + j] = rstd * (G[r * C + j]! * (w ? offset + w[j]! : 1) - row[j]! * rstd * mgx);
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

/** native/backend/rng.h's counter RNG in BigInt: uniform in [0, 1) for (seed, index). */
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

// ---- rotary position embedding ----------------------------------------------------------------

// Maps every rotated pair (v_i, v_{i+R/2}) of every head of v (B, T, H, D) through f with
// c = a·cos θ_i, s = a·sin θ_i, θ_i = pos·invFreq[i] as the float32 product (transformers computes
// inv_freq @ positions in float32); everything after θ is float64. Features R.. are copied.
function ropePairs(v: F64, pos: ArrayLike<number>, invFreq: ArrayLike<number>, B: number, T: number, H: number, D: number, a: number,
  f: (c: number, s: number, v1: number, v2: number) => [number, number]): F64 {
  const half = invFreq.length;
  const out = Float64Array.from(v);
  for (let bt = 0; bt < B * T; bt++)
    for (let i = 0; i < half; i++) {
      const theta = Math.fround(Math.fround(pos[bt]!) * Math.fround(invFreq[i]!));
      const c = a * Math.cos(theta), sn = a * Math.sin(theta);
      for (let h = 0; h < H; h++) {
        const o = (bt * H + h) * D;
        [out[o + i], out[o + i + half]] = f(c, sn, v[o + i]!, v[o + i + half]!);
      }
    }
  return out;
}

/**
 * transformers' apply_rotary_pos_emb with rotate_half on x (B, T, H, D): x·cos + rotate_half(x)·sin
 * on the first R = 2·invFreq.length features of each head, the rest passed through.
 */
export function ropeRef(x: F64, pos: ArrayLike<number>, invFreq: ArrayLike<number>, B: number, T: number, H: number, D: number, a: number): F64 {
  return ropePairs(x, pos, invFreq, B, T, H, D, a, (c, s, x1, x2) => [x1 * c - x2 * s, x2 * c + x1 * s]);
}

/** The gradient of sum(rope(x) ⊙ G) for x: the transpose of each 2x2 rotation, applied to G. */
export function ropeBackwardRef(G: F64, pos: ArrayLike<number>, invFreq: ArrayLike<number>, B: number, T: number, H: number, D: number, a: number): F64 {
  return ropePairs(G, pos, invFreq, B, T, H, D, a, (c, s, g1, g2) => [c * g1 + s * g2, -s * g1 + c * g2]);
}

/** RoPE's default inverse frequencies base^(-2i/R), i < R/2, as float32 values. */
export function ropeInvFreq(R: number, base = 10000): F64 {
  return Float64Array.from({ length: R / 2 }, (_, i) => Math.fround(base ** (-(2 * i) / R)));
}

// ---- parity cases (test/parity/suite.ts runs them on every backend) ------------------------------

/** Per row: the mean and 1/sqrt(var + eps) (layer norm) or 1/sqrt(mean(x²) + eps) (RMS norm). */
function rowStats(x: F64, N: number, C: number, eps: number, rms: boolean): { mean: F64; rstd: F64 } {
  const mean = new Float64Array(N), rstd = new Float64Array(N);
  for (let r = 0; r < N; r++) {
    const row = x.subarray(r * C, (r + 1) * C);
    const mu = rms ? 0 : row.reduce((a, v) => a + v, 0) / C;
    mean[r] = mu;
    rstd[r] = 1 / Math.sqrt(row.reduce((a, v) => a + (v - mu) ** 2, 0) / C + eps);
  }
  return { mean, rstd };
}

/** log Σ_j exp(z_j) of each row. */
function rowLse(z: F64, rows: number, cols: number): F64 {
  const out = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let mx = -Infinity;
    for (let j = 0; j < cols; j++) mx = Math.max(mx, z[r * cols + j]!);
    let s = 0;
    for (let j = 0; j < cols; j++) s += Math.exp(z[r * cols + j]! - mx);
    out[r] = mx + Math.log(s);
  }
  return out;
}

const NN_TOL: Tol = { atol: 1e-6, rms: 1e-5, rtol: 1e-4 };  // long fp32 sums in another order

function nnCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  let seed = 301;
  const data = (n: number, scale = 1) => seeded(n, seed++, scale);
  for (const [N, C] of [[1, 1], [37, 129], [300, 1000], [2, 5000]] as const) {
    const x = data(N * C, 3), w = data(C), b = data(C), dy = data(N * C), dw0 = data(C), db0 = data(C);
    for (const affine of [true, false]) {
      const tag = `(${N}, ${C})${affine ? '' : ' no affine'}`;
      const wt = affine ? w : null, bt = affine ? b : null;
      const aff: Record<string, Input> = affine ? { w: { data: w }, b: { data: b } } : {};
      cases.push({
        name: `layerNorm ${tag}`, build: () => {
          const { mean, rstd } = rowStats(x, N, C, 1e-5, false);
          return {
            inputs: { x: { data: x }, ...aff }, outputs: { y: N * C, mean: N, rstd: N },
            calls: [['layerNorm', '$y', '$mean', '$rstd', '$x', affine ? '$w' : null, affine ? '$b' : null, N, C, 1e-5]],
            expect: { y: layerNormRef(x, wt, bt, N, C, 1e-5), mean, rstd }, tol: NN_TOL,
          };
        },
      });
      cases.push({
        name: `layerNormBackward ${tag}`, build: () => {
          const { mean, rstd } = rowStats(x, N, C, 1e-5, false);
          const g = layerNormBackwardRef(x, wt, N, C, 1e-5, dy);
          return {
            inputs: { x: { data: x }, dy: { data: dy }, mean: { data: mean }, rstd: { data: rstd }, ...aff },
            outputs: { dx: N * C, dw: dw0, db: db0 },
            calls: [['layerNormBackward', '$dx', '$dw', '$db', '$dy', '$x', affine ? '$w' : null, '$mean', '$rstd', N, C]],
            expect: { dx: g.dx, dw: g.dw.map((v, i) => v + dw0[i]!), db: g.db.map((v, i) => v + db0[i]!) }, tol: NN_TOL,
          };
        },
      });
      for (const offset of affine ? [0, 1] : [0]) {
        const otag = offset ? `${tag} offset ${offset}` : tag;
        cases.push({
          name: `rmsNorm ${otag}`, build: () => ({
            inputs: { x: { data: x }, ...aff }, outputs: { y: N * C, rstd: N },
            calls: [['rmsNorm', '$y', '$rstd', '$x', affine ? '$w' : null, N, C, 1e-6, offset]],
            expect: { y: rmsNormRef(x, wt, N, C, 1e-6, offset), rstd: rowStats(x, N, C, 1e-6, true).rstd }, tol: NN_TOL,
          }),
        });
        cases.push({
          name: `rmsNormBackward ${otag}`, build: () => {
            const g = rmsNormBackwardRef(x, wt, N, C, 1e-6, dy, offset);
            return {
              inputs: { x: { data: x }, dy: { data: dy }, rstd: { data: rowStats(x, N, C, 1e-6, true).rstd }, ...aff },
              outputs: { dx: N * C, dw: dw0 },
              calls: [['rmsNormBackward', '$dx', '$dw', '$dy', '$x', affine ? '$w' : null, '$rstd', N, C, offset]],
              expect: { dx: g.dx, dw: g.dw.map((v, i) => v + dw0[i]!) }, tol: NN_TOL,
            };
          },
        });
      }
    }
  }
  {
    const V = 1000, C = 77, N = 513;
    const table = data(V * C), dout = data(N * C), dt0 = data(V * C);
    const ids = Int32Array.from({ length: N }, (_, i) => (i * 7919) % 50);  // repeats: atomics in the backward
    cases.push({
      name: `embedding (${N} ids of ${V}, ${C})`, build: () => ({
        inputs: { table: { data: table }, ids: { data: ids, dtype: 'int32' } }, outputs: { out: N * C },
        calls: [['embedding', '$out', '$table', '$ids', N, V, C]], expect: { out: embeddingRef(table, ids, C) }, tol: { atol: 0, rtol: 0 },
      }),
    });
    cases.push({
      name: `embeddingBackward (${N} ids of ${V}, ${C})`, build: () => ({
        inputs: { dout: { data: dout }, ids: { data: ids, dtype: 'int32' } }, outputs: { dtable: dt0 },
        calls: [['embeddingBackward', '$dtable', '$dout', '$ids', N, V, C]],
        expect: { dtable: embeddingBackwardRef(ids, V, C, dout).map((v, i) => v + dt0[i]!) }, tol: NN_TOL,
      }),
    });
    // a frozen table stored as bf16 / f16 (a model loaded in that dtype): the rows of the rounded
    // table, widened exactly
    for (const [dtype, round] of [['bfloat16', bf16], ['float16', f16]] as const)
      cases.push({
        name: `embedding, ${dtype} table (${N} ids of ${V}, ${C})`, build: () => ({
          inputs: { table: { data: table, dtype }, ids: { data: ids, dtype: 'int32' } }, outputs: { out: N * C },
          calls: [['embedding', '$out', '$table', '$ids', N, V, C]], expect: { out: embeddingRef(round(table), ids, C) }, tol: { atol: 0, rtol: 0 },
        }),
      });
    cases.push({
      name: 'embedding rejects an id out of range', build: () => ({
        inputs: { table: { data: table }, ids: { data: [3, V], dtype: 'int32' } }, outputs: { out: 2 * C },
        calls: [['embedding', '$out', '$table', '$ids', 2, V, C]], expect: {}, tol: NN_TOL, throws: 'ERR_LORA_RANGE',
      }),
    });
  }
  for (const [N, V, smoothing] of [[1, 2, 0], [37, 1000, 0.1], [8, 50257, 0]] as const) {
    const z = data(N * V, 4), dl = data(N);
    const targets = Int32Array.from({ length: N }, (_, i) => (i % 5 === 3 ? -100 : (i * 31) % V));
    const tag = `(${N}, ${V}) smoothing ${smoothing}`;
    cases.push({
      name: `crossEntropy ${tag}`, build: () => ({
        inputs: { z: { data: z }, t: { data: targets, dtype: 'int32' } }, outputs: { loss: N, lse: N },
        calls: [['crossEntropy', '$loss', '$lse', '$z', '$t', N, V, -100, smoothing]],
        expect: { loss: crossEntropyRef(z, targets, V, -100, smoothing, 'none'), lse: rowLse(z, N, V) }, tol: NN_TOL,
      }),
    });
    cases.push({
      name: `crossEntropyBackward ${tag}`, build: () => ({
        inputs: { z: { data: z }, t: { data: targets, dtype: 'int32' }, lse: { data: rowLse(z, N, V) }, dl: { data: dl } },
        outputs: { dz: N * V },
        calls: [['crossEntropyBackward', '$dz', '$dl', '$z', '$lse', '$t', N, V, -100, smoothing]],
        expect: { dz: crossEntropyBackwardRef(z, targets, V, -100, smoothing, 'none', dl) }, tol: NN_TOL,
      }),
    });
  }
  {
    // logits far apart (exp of z - max below -87 is 0 in the vectorised kernels) and -inf ones
    const [N, V] = [5, 301];
    const z = data(N * V, 60).map((v, i) => (i % 17 === 5 ? -Infinity : v));
    const targets = Int32Array.from({ length: N }, (_, i) => (i === 2 ? -100 : (i * 53 + 1) % V));
    const dl = data(N);
    cases.push({
      name: `crossEntropy (${N}, ${V}) logits spread over ±60 and -inf`, build: () => ({
        inputs: { z: { data: z }, t: { data: targets, dtype: 'int32' } }, outputs: { loss: N, lse: N },
        calls: [['crossEntropy', '$loss', '$lse', '$z', '$t', N, V, -100, 0]],
        expect: { loss: crossEntropyRef(z, targets, V, -100, 0, 'none'), lse: rowLse(z, N, V) }, tol: NN_TOL,
      }),
    });
    cases.push({
      name: `crossEntropyBackward (${N}, ${V}) logits spread over ±60 and -inf`, build: () => ({
        inputs: { z: { data: z }, t: { data: targets, dtype: 'int32' }, lse: { data: rowLse(z, N, V) }, dl: { data: dl } },
        outputs: { dz: N * V },
        calls: [['crossEntropyBackward', '$dz', '$dl', '$z', '$lse', '$t', N, V, -100, 0]],
        expect: { dz: crossEntropyBackwardRef(z, targets, V, -100, 0, 'none', dl) }, tol: NN_TOL,
      }),
    });
    cases.push({
      name: `crossEntropyBackward in place (${N}, ${V}) (the gradient over the logits)`, build: () => ({
        inputs: { z: { data: z }, t: { data: targets, dtype: 'int32' }, lse: { data: rowLse(z, N, V) }, dl: { data: dl } },
        outputs: {},
        calls: [['crossEntropyBackward', '$z', '$dl', '$z', '$lse', '$t', N, V, -100, 0]],
        expect: { z: crossEntropyBackwardRef(z, targets, V, -100, 0, 'none', dl) }, tol: NN_TOL,
      }),
    });
  }
  // RoPE: full and partial rotary dims, positions of left-padded batches and of cached decoding
  // (a large offset: the float32 angle is the contract), attention scaling, in place.
  const ROPE_TOL: Tol = { atol: 1e-6, rtol: 1e-5 };
  for (const [Bt, T, H, D, R, a, offset] of [[1, 1, 1, 2, 2, 1, 0], [2, 5, 3, 16, 16, 1, 0], [2, 7, 3, 20, 8, 1.2, 0], [3, 37, 4, 64, 64, 1, 0],
    [2, 9, 2, 96, 32, 1, 40000]] as const) {
    const n = Bt * T * H * D;
    const x = data(n), dy = data(n), invFreq = ropeInvFreq(R, 10000 + R);
    // sequence b starts b·2 tokens late (left padding: those positions repeat 0)
    const pos = Int32Array.from({ length: Bt * T }, (_, i) => offset + Math.max(0, (i % T) - 2 * Math.floor(i / T)));
    const tag = `(${Bt}, ${T}, ${H}, ${D}) R ${R}${a !== 1 ? ` scaling ${a}` : ''}${offset ? ` from position ${offset}` : ''}`;
    const inputs = { x: { data: x }, dy: { data: dy }, pos: { data: pos, dtype: 'int32' as const }, invFreq: { data: invFreq } };
    cases.push({
      name: `rope ${tag}`, build: () => ({
        inputs, outputs: { y: n }, calls: [['rope', '$y', '$x', '$pos', '$invFreq', Bt, T, H, D, R, a]],
        expect: { y: ropeRef(x, pos, invFreq, Bt, T, H, D, a) }, tol: ROPE_TOL,
      }),
    });
    cases.push({
      name: `rope in place ${tag}`, build: () => ({
        inputs, outputs: {}, calls: [['rope', '$x', '$x', '$pos', '$invFreq', Bt, T, H, D, R, a]],
        expect: { x: ropeRef(x, pos, invFreq, Bt, T, H, D, a) }, tol: ROPE_TOL,
      }),
    });
    cases.push({
      name: `ropeBackward ${tag}`, build: () => ({
        inputs, outputs: { dx: n }, calls: [['ropeBackward', '$dx', '$dy', '$pos', '$invFreq', Bt, T, H, D, R, a]],
        expect: { dx: ropeBackwardRef(dy, pos, invFreq, Bt, T, H, D, a) }, tol: ROPE_TOL,
      }),
    });
    cases.push({
      name: `rope() forward and backward through autograd ${tag}`, build: () => ({
        inputs: {}, outputs: {}, calls: [], tol: ROPE_TOL,
        expect: { y: ropeRef(x, pos, invFreq, Bt, T, H, D, a), dx: ropeBackwardRef(dy, pos, invFreq, Bt, T, H, D, a) },
        api: (device) => tidy(() => {
          const xt = tensor(Float32Array.from(x), [Bt, T, H, D], { device, requiresGrad: true });
          const y = rope(xt, tensor(Array.from(pos), [Bt, T], { device, dtype: 'int32' }), tensor(Float32Array.from(invFreq), [R / 2], { device }),
            a !== 1 ? { attentionScaling: a } : undefined);
          y.backward(tensor(Float32Array.from(dy), [Bt, T, H, D], { device }));
          const out = { y: y.toFloat32Array(), dx: xt.grad!.toFloat32Array() };
          xt.grad!.dispose();
          return out;
        }),
      }),
    });
  }
  {
    // Calls of one shape whose positions, inv_freq or scaling differ in one value each: a kernel that
    // reuses its angles between calls (the CPU's table) must see every change.
    const [Bt, T, H, D, R] = [2, 6, 3, 16, 12];
    const n = Bt * T * H * D;
    const x = data(n), f1 = ropeInvFreq(R), f2 = Float64Array.from(f1, (v, i) => (i === 2 ? v * 1.5 : v));
    const p1 = Int32Array.from({ length: Bt * T }, (_, i) => i % T), p2 = Int32Array.from(p1, (v, i) => (i === 7 ? 4 : v));
    const inputs = { x: { data: x }, p1: { data: p1, dtype: 'int32' as const }, p2: { data: p2, dtype: 'int32' as const }, f1: { data: f1 }, f2: { data: f2 } };
    cases.push({
      name: 'rope: consecutive calls at other positions, inv_freq, scaling and direction', build: () => ({
        inputs, outputs: { y1: n, y2: n, y3: n, y4: n, y5: n, y6: n },
        calls: [['rope', '$y1', '$x', '$p1', '$f1', Bt, T, H, D, R, 1], ['rope', '$y2', '$x', '$p2', '$f1', Bt, T, H, D, R, 1],
          ['rope', '$y3', '$x', '$p2', '$f2', Bt, T, H, D, R, 1], ['rope', '$y4', '$x', '$p2', '$f2', Bt, T, H, D, R, 1.25],
          ['ropeBackward', '$y5', '$x', '$p2', '$f2', Bt, T, H, D, R, 1.25], ['rope', '$y6', '$x', '$p1', '$f1', Bt, T, H, D, R, 1]],
        expect: {
          y1: ropeRef(x, p1, f1, Bt, T, H, D, 1), y2: ropeRef(x, p2, f1, Bt, T, H, D, 1), y3: ropeRef(x, p2, f2, Bt, T, H, D, 1),
          y4: ropeRef(x, p2, f2, Bt, T, H, D, 1.25), y5: ropeBackwardRef(x, p2, f2, Bt, T, H, D, 1.25), y6: ropeRef(x, p1, f1, Bt, T, H, D, 1),
        },
        tol: ROPE_TOL,
      }),
    });
  }
  cases.push({
    name: 'rope reference: its backward against central finite differences', build: () => {
      const [B, T, H, D] = [2, 3, 2, 10], half = 3;
      const x = data(B * T * H * D), G = data(B * T * H * D), pos = [5, 0, 1, 2, 3, 7], invFreq = ropeInvFreq(2 * half);
      const fd = finiteDiff(([v]) => ropeRef(v!, pos, invFreq, B, T, H, D, 1.3), [x], G, 0);
      return { inputs: {}, outputs: {}, calls: [], api: () => ({ dx: fd }), expect: { dx: ropeBackwardRef(G, pos, invFreq, B, T, H, D, 1.3) }, tol: { atol: 1e-8, rtol: 1e-7 } };
    },
  });
  const ropeError = (what: string, code: string, message: RegExp, call: (device: Device) => void): ParityCase => ({
    name: `rope() refuses ${what}`,
    build: () => ({ inputs: {}, outputs: {}, calls: [], expect: {}, tol: ROPE_TOL, throws: { code, message }, api: (device) => { tidy(() => call(device)); return {}; } }),
  });
  const args = (device: Device) => ({
    x: zeros([2, 3, 2, 8], { device }), pos: zeros([2, 3], { device, dtype: 'int32' }), f: zeros([4], { device }),
  });
  cases.push(
    ropeError('float32 positions', 'ERR_LORA_DTYPE', /^Expected int32 positions for rope\(\) but received float32/, (d) => { const a = args(d); rope(a.x, zeros([2, 3], { device: d }), a.f); }),
    ropeError('positions of another shape', 'ERR_LORA_SHAPE', /^Expected positions of shape \[2, 3\] for x of shape \[2, 3, 2, 8\] but received \[3, 2\]$/,
      (d) => { const a = args(d); rope(a.x, zeros([3, 2], { device: d, dtype: 'int32' }), a.f); }),
    ropeError('a rotary dim above headDim', 'ERR_LORA_SHAPE', /^Expected invFreq of shape \[n\] with 2·n <= 8 \(the rotary dim, at most headDim\) but received \[5\]$/,
      (d) => { const a = args(d); rope(a.x, a.pos, zeros([5], { device: d })); }),
    ropeError('x that is not 4-D', 'ERR_LORA_SHAPE', /^Expected x of shape \[batch, seq, heads, headDim\] for rope\(\) but received \[6, 16\]$/,
      (d) => { const a = args(d); rope(zeros([6, 16], { device: d }), a.pos, a.f); }),
    ropeError('a bfloat16 invFreq', 'ERR_LORA_DTYPE', /^Expected float32 tensors for rope\(\) but received bfloat16/,
      (d) => { const a = args(d); rope(a.x, a.pos, a.f.toDtype('bfloat16')); }),
    ropeError('an attentionScaling that is not a number', 'ERR_LORA_TYPE', /^Expected a finite number for attentionScaling but received "2" \(string\)$/,
      (d) => { const a = args(d); rope(a.x, a.pos, a.f, { attentionScaling: '2' as unknown as number }); }),
    ropeError('a misspelt option', 'ERR_LORA_OPTION', /^Unknown option 'attentionscaling' for rope\(\); did you mean 'attentionScaling'\?$/,
      (d) => { const a = args(d); rope(a.x, a.pos, a.f, { attentionscaling: 2 } as never); }),
  );
  return cases;
}

/** The parity cases of the normalisation, embedding, cross-entropy and RoPE kernels (attention: attention_ref.ts). */
export const parityCases: ParityCase[] = nnCases();
