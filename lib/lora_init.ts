// PEFT's init_lora_weights for a LoRA layer: the factors A (R, C) and B (OC, R) that a new adapter
// starts from, and for PiSSA/OLoRA the residual base weight W - s·B·A that replaces W. The SVD and
// QR run on the host in float64 (lib/linalg.ts): a one-time cost per layer, not a training kernel.
// Also PEFT's conversion of a trained PiSSA/OLoRA adapter into a plain LoRA of the original weights.
// It does not do PEFT's data-driven inits (EVA, CorDA, LoftQ, LoRA-GA).
import { editDistance, LoraError, LoraRangeError, rangeError, typeError } from './errors';
import { Mat, mat, qr, svdLowRank, topSvd } from './linalg';
import type { LoraLinear } from './lora';
import { PeftAdapter, PeftModule } from './peft';
import { Rng } from './random';
import { tensor } from './tensor';

/**
 * PEFT's `init_lora_weights`: `true` (A Kaiming-uniform, B zeros), `false` (A and B random: the
 * adapter changes the output from the start; for tests), `'gaussian'` (A ~ N(0, 1/r²), B zeros),
 * `'pissa'` (A, B from the top-r singular triplets of W, the rest left in W), `'pissa_niter_N'`
 * (the same from a randomized SVD with N subspace iterations: fast, approximate, seeded), `'olora'`
 * (A, B from a QR decomposition of W).
 */
export type LoraInit = boolean | 'gaussian' | 'pissa' | 'olora' | `pissa_niter_${number}`;

const NAMED = ['gaussian', 'pissa', 'olora', 'pissa_niter_[number of iters]'] as const;

/**
 * Checks an init_lora_weights value (PEFT's names; 'PiSSA', 'OLoRA' in any case are accepted as
 * PEFT accepts them).
 * @throws LoraTypeError for a non-boolean non-string; LoraRangeError for an unknown name (with a
 *   did-you-mean), for PEFT's inits that lora-native does not do ('eva', 'corda', 'loftq', ...) or a
 *   pissa_niter_N whose N is not an integer 0..1000.
 */
export function checkLoraInit(name: string, v: unknown): LoraInit {
  if (typeof v === 'boolean') return v;
  const list = `true, false, ${NAMED.map((n) => `'${n}'`).join(', ')}`;
  if (typeof v !== 'string') throw typeError(name, `one of ${list}`, v);
  const low = v.toLowerCase();
  if (low === 'gaussian' || low === 'pissa' || low === 'olora') return low;
  const niter = /^pissa_niter_(\d+)$/.exec(low);
  if (niter) {
    const n = Number(niter[1]);
    if (n > 1000) throw rangeError(name, "'pissa_niter_N' with N an integer 0..1000", v);
    return `pissa_niter_${n}`;
  }
  if (['eva', 'corda', 'loftq', 'orthogonal', 'lora_ga', 'mica'].includes(low))
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected one of ${list} for ${name} but received '${v}' (string): PEFT's '${low}' initialisation is not supported`);
  const hint = low.startsWith('pissa') ? "; did you mean 'pissa' or 'pissa_niter_4'?" :
    ['gaussian', 'pissa', 'olora'].map((n) => [n, editDistance(low, n)] as const).filter(([, d]) => d <= 2).map(([n]) => `; did you mean '${n}'?`)[0] ?? '';
  throw new LoraRangeError(`Expected one of ${list} for ${name} but received '${v}' (string)${hint}`);
}

/** True for the inits that read W and write a residual back (PiSSA, OLoRA). */
export function initChangesBase(init: LoraInit): init is 'pissa' | 'olora' | `pissa_niter_${number}` {
  return typeof init === 'string' && init !== 'gaussian';
}

/** Factors of a new adapter, row-major float32: A (R, C), B (OC, R); residual (OC, C) or null. */
export interface LoraInitFactors {
  A: Float32Array;
  B: Float32Array;
  /** W - s·B·A (computed in float64 from the float32 A and B, rounded once), for PiSSA/OLoRA. */
  residual: Float32Array | null;
}

/**
 * The factors that PEFT's `init_lora_weights` gives a layer with weight W (OC, C) (row-major,
 * needed only by PiSSA/OLoRA), rank R and scaling s:
 * - true: A ~ U(-1/sqrt(C), 1/sqrt(C)) (kaiming_uniform, a = sqrt(5)), B = 0;
 * - false: A as above, B ~ U(-1/sqrt(R), 1/sqrt(R)) (nn.Linear(R, OC)'s own init);
 * - 'gaussian': A ~ N(0, std 1/R), B = 0;
 * - 'pissa': W = U·diag(S)·Vᵀ, S_r = S[:R]/s, A = diag(sqrt(S_r))·V[:, :R]ᵀ, B = U[:, :R]·diag(sqrt(S_r))
 *   (the top R triplets from topSvd(): the leading singular pairs to float64 accuracy, faster than a
 *   full SVD; where singular values tie at S[R-1] any basis of their space is as good, as with PEFT);
 *   'pissa_niter_N' the same from a randomized SVD (N subspace iterations, Gaussian start from rng);
 * - 'olora': W = Q·R (Householder, thin), A = R[:R, :], B = Q[:, :R];
 * and for PiSSA/OLoRA the residual W - s·B·A.
 * @throws LoraRangeError when R > min(OC, C) for PiSSA/OLoRA; ERR_LORA_NON_FINITE when W holds NaN or Inf.
 */
export function loraInitFactors(init: LoraInit, W: Float64Array | null, OC: number, C: number, R: number, s: number, rng: Rng): LoraInitFactors {
  const A = new Float32Array(R * C);
  const B = new Float32Array(OC * R);
  if (!initChangesBase(init)) {
    if (init === 'gaussian') {
      for (let i = 0; i < A.length; i++) A[i] = rng.normal() / R;
    } else {
      const bound = 1 / Math.sqrt(C);
      for (let i = 0; i < A.length; i++) A[i] = (2 * rng.uniform() - 1) * bound;
      if (init === false) {
        const bb = 1 / Math.sqrt(R);
        for (let i = 0; i < B.length; i++) B[i] = (2 * rng.uniform() - 1) * bb;
      }
    }
    return { A, B, residual: null };
  }
  if (!W) throw new LoraError('ERR_LORA_STATE', `Expected the base weight for init_lora_weights '${String(init)}'`);
  if (R > Math.min(OC, C)) throw rangeError('rank', `an integer between 1 and ${Math.min(OC, C)} (min(outFeatures, inFeatures)) for init_lora_weights '${String(init)}'`, R);
  for (let i = 0; i < W.length; i++)
    if (!Number.isFinite(W[i]!)) throw new LoraError('ERR_LORA_NON_FINITE', `Expected a finite base weight for init_lora_weights '${String(init)}' but element ${i} is ${W[i]}`);
  const w = mat(OC, C, W);
  if (init === 'olora') {
    const { q, r } = qr(w, R);
    const k = q.cols;
    for (let i = 0; i < OC; i++) for (let j = 0; j < R; j++) B[i * R + j] = q.data[i * k + j]!;
    A.set(r.data.subarray(0, R * C));
  } else {
    const niter = init === 'pissa' ? -1 : Number(init.slice('pissa_niter_'.length));
    const { u, s: sv, v } = niter < 0 ? topSvd(w, R, () => rng.normal()) : svdLowRank(w, R, niter, () => rng.normal());
    for (let j = 0; j < R; j++) {
      const root = Math.sqrt(sv[j]! / s);
      for (let c = 0; c < C; c++) A[j * C + c] = root * v.data[c * v.cols + j]!;
      for (let o = 0; o < OC; o++) B[o * R + j] = u.data[o * u.cols + j]! * root;
    }
  }
  return { A, B, residual: residualOf(w, A, B, R, s) };
}

// W - s·B·A in float64 from the float32 factors the layer will hold, so that residual + s·B·A
// gives W back up to one float32 rounding of the residual.
function residualOf(w: Mat, A: Float32Array, B: Float32Array, R: number, s: number): Float32Array {
  const { rows: OC, cols: C } = w;
  const out = new Float32Array(OC * C);
  const row = new Float64Array(C);
  for (let o = 0; o < OC; o++) {
    for (let c = 0; c < C; c++) row[c] = w.data[o * C + c]!;
    for (let r = 0; r < R; r++) {
      const b = s * B[o * R + r]!;
      if (b === 0) continue;
      for (let c = 0; c < C; c++) row[c] -= b * A[r * C + c]!;
    }
    for (let c = 0; c < C; c++) out[o * C + c] = row[c]!;
  }
  return out;
}

/**
 * PEFT's conversion of a PiSSA/OLoRA adapter into a plain LoRA of the original weights
 * (subtract_mutated_init): W = W_res + s·B₀·A₀ and the trained layer is W_res + s·B·A, so the update
 * on W is s·(B·A - B₀·A₀) = s'·B'·A' with A' = [A; A₀] (2R, C), B' = [B, -B₀] (OC, 2R) and the
 * scaling kept by doubling r and lora_alpha (rsLoRA: lora_alpha·sqrt 2). Returns a new adapter
 * (on the CPU) that owns its tensors; `adapter` shares the layers' tensors (peftAdapterOf).
 * @throws ERR_LORA_UNSUPPORTED for a module that PiSSA/OLoRA did not initialise, a DoRA module, or
 *   rsLoRA with rank_pattern/alpha_pattern (PEFT refuses it too).
 */
export function mutatedToLora(adapter: PeftAdapter, layers: ReadonlyMap<string, LoraLinear>): PeftAdapter {
  const cfg = adapter.config;
  const patterns = Object.keys(cfg.rank_pattern ?? {}).length + Object.keys(cfg.alpha_pattern ?? {}).length;
  if (cfg.use_rslora && patterns > 0)
    throw new LoraError('ERR_LORA_UNSUPPORTED', 'Cannot convert the adapter to plain LoRA (convertToLora) with use_rslora and rank_pattern/alpha_pattern at once, as PEFT cannot');
  for (const [path, m] of adapter.modules) {
    const l = layers.get(path);
    if (!l || !l._initialFactors)
      throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected layers initialised with initLoraWeights 'pissa', 'pissa_niter_N' or 'olora' for convertToLora but '${path}' was initialised with ${JSON.stringify(l?.initLoraWeights ?? null)}`);
    if (m.magnitude) throw new LoraError('ERR_LORA_UNSUPPORTED', `Cannot convert DoRA module '${path}' to plain LoRA (convertToLora): DoRA's row rescale is not a low-rank update`);
  }
  const modules = new Map<string, PeftModule>();
  const out = new PeftAdapter({ ...cfg }, modules);
  try {
    for (const [path, m] of adapter.modules) {
      const l = layers.get(path)!;
      const { A: A0, B: B0 } = l._initialFactors!;
      const [R, C, OC] = [l.rank, l.inFeatures, l.outFeatures];
      const A = new Float32Array(2 * R * C);
      A.set(m.loraA.toFloat32Array());
      A.set(A0, R * C);
      const Bt = m.loraB.toFloat32Array();
      const B = new Float32Array(OC * 2 * R);
      for (let o = 0; o < OC; o++)
        for (let r = 0; r < R; r++) {
          B[o * 2 * R + r] = Bt[o * R + r]!;
          B[o * 2 * R + R + r] = -B0[o * R + r]!;
        }
      const alpha = cfg.use_rslora ? m.alpha * Math.SQRT2 : 2 * m.alpha;
      modules.set(path, { kind: 'linear', loraA: tensor(A, [2 * R, C]), loraB: tensor(B, [OC, 2 * R]), loraBBias: null, magnitude: null, rank: 2 * R, alpha, scaling: m.scaling });
    }
    const double = (p: Record<string, number> | undefined) => (p ? Object.fromEntries(Object.entries(p).map(([k, v]) => [k, 2 * v])) : p);
    out.config = {
      ...cfg, init_lora_weights: true, r: 2 * (cfg.r ?? 8),
      lora_alpha: cfg.use_rslora ? (cfg.lora_alpha ?? 8) * Math.SQRT2 : 2 * (cfg.lora_alpha ?? 8),
      rank_pattern: double(cfg.rank_pattern), alpha_pattern: double(cfg.alpha_pattern),
    };
    for (const k of ['rank_pattern', 'alpha_pattern'] as const) if (out.config[k] === undefined) delete out.config[k];
    return out;
  } catch (err) {
    out.dispose();
    throw err;
  }
}
