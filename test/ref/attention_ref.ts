// Float64 reference for attention() (lib/attention.ts), written from the math and independent of
// the kernels: per (batch, head, query) the softmax over the visible keys of scale·q·k, times v.
// Query head h reads kv head floor(h / (H / KVH)), as transformers' repeat_kv lays the repeated
// heads out; query i sits at position S - T + i; key j is visible when causal allows (j <= p),
// the sliding window allows (j > p - window, transformers' sliding_window_overlay), the padding
// mask is 1 and the segment ids agree. A row with no visible key gives 0. Not a test file.
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
