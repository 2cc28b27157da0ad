// Float64 reference for attention() (lib/ops/attention.ts), written from the math and independent of
// the kernels: per (batch, head, query) the softmax over the visible keys of scale·q·k, times v.
// Query head h reads kv head floor(h / (H / KVH)), as transformers' repeat_kv lays the repeated
// heads out; query i sits at position S - T + i; key j is visible when causal allows (j <= p),
// the sliding window allows (j > p - window, transformers' sliding_window_overlay), the padding
// mask is 1 and the segment ids agree. A row with no visible key gives 0. Also the kernels' parity
// cases (test/parity/: every device). Not a test file.
import { attention, tensor, tidy, zeros } from '../../lib/index';
import type { Device, ParityCase, Tol } from '../parity/suite';
import { seeded } from './dtype_ref';

export type F64 = Float64Array;

export interface AttnRefArgs {
  B: number; T: number; S: number; H: number; KVH: number; D: number;
  /** positions per batch entry of k and v (>= S; the cache length), default S */
  Smax?: number;
  scale: number;
  causal: boolean;
  window?: number;
  /** (B, maskStride) 1/0 */
  mask?: Int32Array;
  maskStride?: number;
  /** (B, segStride) */
  seg?: Int32Array;
  segStride?: number;
}

export function visible(a: AttnRefArgs, b: number, i: number, j: number): boolean {
  const p = a.S - a.T + i;
  if (a.causal && j > p) return false;
  if (a.window && j <= p - a.window) return false;
  if (a.mask && a.mask[b * (a.maskStride ?? a.S) + j] === 0) return false;
  if (a.seg) {
    const st = a.segStride ?? a.S;
    if (a.seg[b * st + j] !== a.seg[b * st + p]) return false;
  }
  return true;
}

const qAt = (a: AttnRefArgs, b: number, t: number, h: number) => ((b * a.T + t) * a.H + h) * a.D;
const kAt = (a: AttnRefArgs, b: number, j: number, h: number) =>
  ((b * (a.Smax ?? a.S) + j) * a.KVH + Math.floor(h / (a.H / a.KVH))) * a.D;

// The probabilities of row (b, h, i) over keys 0..S-1 (0 where not visible; all 0 if none is)
// and the row's log-sum-exp (+Infinity if none is).
function probs(q: F64, k: F64, a: AttnRefArgs, b: number, h: number, i: number): { p: F64; lse: number } {
  const s = new Float64Array(a.S).fill(-Infinity);
  let mx = -Infinity;
  for (let j = 0; j < a.S; j++) {
    if (!visible(a, b, i, j)) continue;
    let d = 0;
    for (let e = 0; e < a.D; e++) d += q[qAt(a, b, i, h) + e]! * k[kAt(a, b, j, h) + e]!;
    s[j] = a.scale * d;
    mx = Math.max(mx, s[j]!);
  }
  const p = new Float64Array(a.S);
  if (mx === -Infinity) return { p, lse: Infinity };
  let sum = 0;
  for (let j = 0; j < a.S; j++) sum += p[j] = s[j] === -Infinity ? 0 : Math.exp(s[j]! - mx);
  for (let j = 0; j < a.S; j++) p[j]! /= sum;
  return { p, lse: mx + Math.log(sum) };
}

/** out (B, T, H, D) and lse (B, H, T) (+Infinity for a row with no visible key). */
export function attentionRef(q: F64, k: F64, v: F64, a: AttnRefArgs): { out: F64; lse: F64 } {
  const out = new Float64Array(a.B * a.T * a.H * a.D);
  const lse = new Float64Array(a.B * a.H * a.T);
  for (let b = 0; b < a.B; b++) for (let h = 0; h < a.H; h++) for (let i = 0; i < a.T; i++) {
    const { p, lse: l } = probs(q, k, a, b, h, i);
    for (let j = 0; j < a.S; j++)
      if (p[j] !== 0) for (let e = 0; e < a.D; e++) out[qAt(a, b, i, h) + e] += p[j]! * v[kAt(a, b, j, h) + e]!;
    lse[(b * a.H + h) * a.T + i] = l;
  }
  return { out, lse };
}

/**
 * Gradients of sum(out ⊙ G): dv_j = Σ_i p_ij·G_i; dp_ij = G_i·v_j; ds = p ⊙ (dp - Σ_j p·dp);
 * dq_i = scale·Σ_j ds_ij·k_j; dk_j = scale·Σ_i ds_ij·q_i (summed over the heads sharing k, v).
 * dk, dv have k's shape (B, Smax, KVH, D); positions >= S get 0.
 */
export function attentionBackwardRef(q: F64, k: F64, v: F64, a: AttnRefArgs, G: F64): { dq: F64; dk: F64; dv: F64 } {
  const dq = new Float64Array(q.length), dk = new Float64Array(k.length), dv = new Float64Array(v.length);
  for (let b = 0; b < a.B; b++) for (let h = 0; h < a.H; h++) for (let i = 0; i < a.T; i++) {
    const { p } = probs(q, k, a, b, h, i);
    const qi = qAt(a, b, i, h);
    const dp = new Float64Array(a.S);
    let dot = 0;
    for (let j = 0; j < a.S; j++) {
      let g = 0;
      for (let e = 0; e < a.D; e++) g += G[qi + e]! * v[kAt(a, b, j, h) + e]!;
      dp[j] = g;
      dot += p[j]! * g;
    }
    for (let j = 0; j < a.S; j++) {
      if (p[j] === 0) continue;
      const kj = kAt(a, b, j, h);
      const ds = p[j]! * (dp[j]! - dot);
      for (let e = 0; e < a.D; e++) {
        dv[kj + e] += p[j]! * G[qi + e]!;
        dq[qi + e] += a.scale * ds * k[kj + e]!;
        dk[kj + e] += a.scale * ds * q[qi + e]!;
      }
    }
  }
  return { dq, dk, dv };
}

/** k or v (B, S, KVH, D) with each kv head repeated H/KVH times: (B, S, H, D), as repeat_kv. */
export function repeatKv(x: F64, B: number, S: number, KVH: number, H: number, D: number): F64 {
  const out = new Float64Array(B * S * H * D);
  const n = H / KVH;
  for (let b = 0; b < B; b++) for (let s = 0; s < S; s++) for (let h = 0; h < H; h++)
    for (let e = 0; e < D; e++) out[((b * S + s) * H + h) * D + e] = x[((b * S + s) * KVH + Math.floor(h / n)) * D + e]!;
  return out;
}

// ---- parity cases ---------------------------------------------------------------------------------

const ATTN_TOL: Tol = { atol: 2e-5, rms: 1e-5, rtol: 2e-4 };   // fp32 exp2 / online softmax
const GRAD_TOL: Tol = { atol: 1e-4, rms: 1e-5, rtol: 1e-3 };   // sums over S keys and G heads

interface ParityShape {
  B: number; T: number; S: number; Smax?: number; H: number; KVH: number; D: number; causal: boolean;
  window?: number; scale?: number;
  /** 'right': the last 4 keys of batch 1 are padding; 'left': the first 9 keys of batch 0 are
   * (queries before them see nothing: out 0, lse +inf, so lse is not compared). */
  pad?: 'left' | 'right';
  /** segments of 11 positions */
  segments?: boolean;
}

// T and S not multiples of any block (96 rows, 96 keys on the CPU, 32/8·warps on CUDA), D from 1 to
// 128, GQA groups 1, 3, 8, a chunk of queries against a longer cache, every mask kind.
const SHAPES: ParityShape[] = [
  { B: 1, T: 1, S: 1, H: 1, KVH: 1, D: 1, causal: true },
  { B: 2, T: 37, S: 37, H: 6, KVH: 2, D: 16, causal: true, pad: 'right' },
  { B: 1, T: 130, S: 130, H: 2, KVH: 1, D: 64, causal: false, window: 50 },
  { B: 2, T: 5, S: 70, Smax: 80, H: 8, KVH: 1, D: 40, causal: true, pad: 'left' },
  { B: 1, T: 45, S: 45, H: 3, KVH: 3, D: 7, causal: true, segments: true, scale: 0.3 },
  { B: 2, T: 1, S: 99, Smax: 101, H: 9, KVH: 3, D: 64, causal: true, pad: 'right' },
  { B: 1, T: 150, S: 150, H: 2, KVH: 1, D: 128, causal: true },
];

function shapeTag(c: ParityShape): string {
  return `B${c.B} T${c.T} S${c.S}${c.Smax ? `/${c.Smax}` : ''} H${c.H}/${c.KVH} D${c.D}${c.causal ? ' causal' : ''}` +
    `${c.window ? ` window ${c.window}` : ''}${c.pad ? ` ${c.pad}-padded` : ''}${c.segments ? ' segments' : ''}`;
}

function parityInputs(c: ParityShape, seed: number) {
  const Smax = c.Smax ?? c.S;
  const a: AttnRefArgs = { ...c, Smax, scale: c.scale ?? 1 / Math.sqrt(c.D) };
  // mask rows are Smax long (a cache's mask), read for the first S positions
  if (c.pad) {
    a.maskStride = Smax;
    a.mask = Int32Array.from({ length: c.B * Smax }, (_, i) => {
      const b = Math.floor(i / Smax), j = i % Smax;
      return c.pad === 'left' ? (b === 0 && j < 9 ? 0 : 1) : (b === 1 && j >= c.S - 4 ? 0 : 1);
    });
  }
  if (c.segments) {
    a.segStride = c.S;
    a.seg = Int32Array.from({ length: c.B * c.S }, (_, i) => Math.floor((i % c.S) / 11));
  }
  const q = seeded(c.B * c.T * c.H * c.D, seed, 2), k = seeded(c.B * Smax * c.KVH * c.D, seed + 1, 2);
  const v = seeded(c.B * Smax * c.KVH * c.D, seed + 2), G = seeded(c.B * c.T * c.H * c.D, seed + 3);
  return { a, q: Float64Array.from(q, Math.fround), k: Float64Array.from(k, Math.fround), v: Float64Array.from(v, Math.fround), G: Float64Array.from(G, Math.fround) };
}

// The trailing arguments of the attention entries: masks ('$mask', '$seg' or null), sizes, options.
function trailing(c: ParityShape, a: AttnRefArgs): unknown[] {
  return [a.mask ? '$mask' : null, a.mask ? a.maskStride : 0, a.seg ? '$seg' : null, a.seg ? a.segStride : 0,
    c.B, c.T, c.S, a.Smax, c.H, c.KVH, c.D, a.scale, c.causal, c.window ?? 0];
}

function attentionCases(): ParityCase[] {
  const cases: ParityCase[] = [];
  SHAPES.forEach((c, n) => {
    const tag = shapeTag(c);
    const seed = 300 + 10 * n;
    const masks = (a: AttnRefArgs) => ({
      ...(a.mask ? { mask: { data: a.mask, dtype: 'int32' as const } } : {}),
      ...(a.seg ? { seg: { data: a.seg, dtype: 'int32' as const } } : {}),
    });
    cases.push({
      name: `attention ${tag}`, build: () => {
        const { a, q, k, v } = parityInputs(c, seed);
        const ref = attentionRef(q, k, v, a);
        const expect: Record<string, F64> = c.pad === 'left' ? { out: ref.out } : { out: ref.out, lse: ref.lse };
        return {
          inputs: { q: { data: q }, k: { data: k }, v: { data: v }, ...masks(a) },
          outputs: { out: c.B * c.T * c.H * c.D, lse: c.B * c.H * c.T },
          calls: [['attention', '$out', '$lse', '$q', '$k', '$v', ...trailing(c, a)]],
          expect, tol: ATTN_TOL,
        };
      },
    });
    cases.push({
      name: `attentionBackward ${tag}`, build: () => {
        const { a, q, k, v, G } = parityInputs(c, seed);
        const ref = attentionRef(q, k, v, a);
        const g = attentionBackwardRef(q, k, v, a, G);
        // cache positions S..Smax-1 start at 7 and must stay so (the kernel writes only the first S)
        const Smax = a.Smax!, row = c.KVH * c.D;
        const init = Float64Array.from({ length: c.B * Smax * row }, (_, i) => (i % (Smax * row) >= c.S * row ? 7 : 0));
        const keep = (d: F64) => d.map((x, i) => (i % (Smax * row) >= c.S * row ? 7 : x));
        // the kernel's lse is +inf where no key is visible; the reference's is too
        return {
          inputs: { q: { data: q }, k: { data: k }, v: { data: v }, dout: { data: G }, out: { data: ref.out },
            lse: { data: ref.lse }, ...masks(a) },
          outputs: { dq: c.B * c.T * c.H * c.D, dk: init, dv: init },
          calls: [['attentionBackward', '$dq', '$dk', '$dv', '$dout', '$q', '$k', '$v', '$out', '$lse', ...trailing(c, a)]],
          expect: { dq: g.dq, dk: keep(g.dk), dv: keep(g.dv) }, tol: GRAD_TOL,
        };
      },
    });
  });
  // The op through autograd: GQA against a cache holding kvLength positions, left padding.
  cases.push({
    name: 'attention() op: GQA decode chunk against a cache with padding, through autograd', build: () => {
      const c: ParityShape = { B: 2, T: 3, S: 20, Smax: 24, H: 4, KVH: 2, D: 8, causal: true, pad: 'left' };
      const { a, q, k, v, G } = parityInputs(c, 77);
      const ref = attentionRef(q, k, v, a);
      const g = attentionBackwardRef(q, k, v, a, G);
      return {
        inputs: {}, outputs: {}, calls: [], expect: { y: ref.out, dq: g.dq, dk: g.dk, dv: g.dv }, tol: GRAD_TOL,
        api: (device: Device) => tidy(() => {
          const mk = (x: F64, shape: number[]) => tensor(Float32Array.from(x), shape, { device, requiresGrad: true });
          const qt = mk(q, [c.B, c.T, c.H, c.D]), kt = mk(k, [c.B, 24, c.KVH, c.D]), vt = mk(v, [c.B, 24, c.KVH, c.D]);
          const mask = tensor(Float32Array.from(a.mask!), [c.B, 24], { device, dtype: 'int32' });
          const y = attention(qt, kt, vt, { kvLength: c.S, attentionMask: mask });
          y.backward(tensor(Float32Array.from(G), y.shape, { device }));
          const out = { y: y.toFloat32Array(), dq: qt.grad!.toFloat32Array(), dk: kt.grad!.toFloat32Array(), dv: vt.grad!.toFloat32Array() };
          [qt, kt, vt].forEach((x) => x.grad!.dispose());
          return out;
        }),
      };
    },
  });
  const attnError = (what: string, code: string, message: RegExp, call: (device: Device) => void): ParityCase => ({
    name: `attention() refuses ${what}`,
    build: () => ({ inputs: {}, outputs: {}, calls: [], expect: {}, tol: ATTN_TOL, throws: { code, message }, api: (device) => { tidy(() => call(device)); return {}; } }),
  });
  const qkv = (device: Device) => ({ q: zeros([1, 4, 6, 8], { device }), k: zeros([1, 4, 2, 8], { device }) });
  cases.push(
    attnError('query heads that are not a multiple of the kv heads', 'ERR_LORA_SHAPE',
      /^Expected the query heads \(6\) to be a multiple of the key\/value heads \(4\) for attention\(\)/,
      (d) => { const { q } = qkv(d); const k = zeros([1, 4, 4, 8], { device: d }); attention(q, k, k); }),
    attnError('a float32 attentionMask', 'ERR_LORA_DTYPE', /^Expected an int32 attentionMask for attention\(\) but received float32/,
      (d) => { const { q, k } = qkv(d); attention(q, k, k, { attentionMask: zeros([1, 4], { device: d }) }); }),
    attnError('a kvLength past the cache', 'ERR_LORA_RANGE', /^Expected an integer between 4 and 4 for kvLength but received 5 \(number\)$/,
      (d) => { const { q, k } = qkv(d); attention(q, k, k, { kvLength: 5 }); }),
    attnError('a misspelt option', 'ERR_LORA_OPTION', /^Unknown option 'kvLenght' for attention\(\); did you mean 'kvLength'\?$/,
      (d) => { const { q, k } = qkv(d); attention(q, k, k, { kvLenght: 4 } as never); }),
  );
  // The binding: sizes that do not fit together reach the backends' shared check (T > S here); lib's
  // attention() says so first, in its own words.
  cases.push({
    name: 'attention binding rejects T > S', build: () => ({
      inputs: { q: { data: new Float64Array(16) }, k: { data: new Float64Array(16) } }, outputs: { out: 16, lse: 2 },
      calls: [['attention', '$out', '$lse', '$q', '$k', '$k', null, 0, null, 0, 1, 2, 1, 2, 1, 1, 8, 1, true, 0]],
      expect: {}, tol: ATTN_TOL, throws: { code: 'ERR_LORA_INTERNAL', message: /^attention failed on \w+: invalid argument$/ },
    }),
  });
  return cases;
}

/** The parity cases of the attention kernels and the attention() op. */
export const parityCases: ParityCase[] = attentionCases();
