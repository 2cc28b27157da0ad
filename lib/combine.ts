// Combining adapters into one: the weighted sum of their deltas, exactly ('cat'), as its best
// rank-k approximation ('svd', from QR of the stacked factors and an SVD of the small core, never
// forming the dense delta) or by PEFT's 'linear' rule. Small float64 linear algebra on the host
// (lib/linalg.ts): the factors are rank-sized.
import { checkOptions, expectInteger, expectNumber, expectOneOf, LoraError, typeError } from './errors';
import { mat, matmulMat, Mat, qr, svd, transposeMat } from './linalg';
import { configForModules, PeftAdapter, PeftConfig, PeftModule } from './peft';
import { keep, shapeString, Tensor, tensor } from './tensor';

export type Combination = 'linear' | 'cat' | 'svd';

export interface CombineOptions {
  /** Rank of an 'svd' combination; default the largest source rank of each module. */
  svdRank?: number;
  /** Extra factor per source (a LoraModel's per-adapter scales). Default 1 each. */
  scales?: number[];
}

function toMat(t: Tensor): Mat {
  return mat(t.shape[0]!, t.shape[1]!, t.toFloat32Array());
}

/**
 * A new adapter whose delta is the weighted combination of the sources' deltas
 * Σ wᵢ·sᵢ·Bᵢ·Aᵢ, each sᵢ the source's own scaling (alpha/r or alpha/√r with rsLoRA, so rsLoRA and
 * differing ranks are folded in once). The result has scaling exactly 1 in every module
 * (lora_alpha = r, use_rslora false) and float32 weights.
 * - 'cat': A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁ B₂ ...]: exactly the weighted sum, rank Σrᵢ.
 * - 'svd': the best rank-k approximation of the weighted sum (exact when k >= Σrᵢ), computed by
 *   QR of the stacked factors and an SVD of the small core, never forming the dense delta.
 * - 'linear': PEFT's rule, A = Σ sign(cᵢ)√|cᵢ|·Aᵢ, B = Σ √|cᵢ|·Bᵢ with cᵢ = wᵢsᵢ; needs equal ranks.
 *   Its delta is Σᵢⱼ ... (cross terms), equal to the weighted sum only for one source or shared factors.
 * Modules missing from a source count as a zero delta. DoRA sources are refused.
 * @throws ERR_LORA_UNSUPPORTED for DoRA sources; ERR_LORA_SHAPE for 'linear' with differing ranks or
 *   sources whose module shapes disagree.
 */
export function combineAdapters(sources: readonly PeftAdapter[], weights: readonly number[], combination: Combination, opts?: CombineOptions): PeftAdapter {
  if (!Array.isArray(sources) || sources.length === 0 || !sources.every((s) => s instanceof PeftAdapter))
    throw typeError('adapters', 'a non-empty array of PeftAdapters', sources);
  if (!Array.isArray(weights) || weights.length !== sources.length)
    throw typeError('weights', `an array of ${sources.length} numbers`, weights);
  weights.forEach((w, i) => expectNumber(`weights[${i}]`, w));
  expectOneOf('combination', combination, ['linear', 'cat', 'svd'] as const);
  const o = checkOptions<CombineOptions>('combineAdapters()', opts, ['svdRank', 'scales']);
  const scales = o.scales ?? sources.map(() => 1);
  if (o.svdRank !== undefined) expectInteger('svdRank', o.svdRank, 1, 1 << 20);
  const fifo = !!sources[0]!.config.fan_in_fan_out;
  for (const s of sources) {
    if (!!s.config.fan_in_fan_out !== fifo) throw new LoraError('ERR_LORA_UNSUPPORTED', 'Expected adapters that agree on fan_in_fan_out for combineAdapters()');
    for (const [name, m] of s.modules) if (m.magnitude) throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected adapters without DoRA for combineAdapters() but module '${name}' has a magnitude vector (DoRA deltas do not add)`);
  }
  const names: string[] = [];
  for (const s of sources) for (const n of s.modules.keys()) if (!names.includes(n)) names.push(n);
  const modules = new Map<string, PeftModule>();
  try {
    for (const name of names) {
      const parts = sources.map((s, i) => ({ m: s.modules.get(name), c: weights[i]! * scales[i]! * (s.modules.get(name)?.scaling ?? 0) }))
        .filter((p): p is { m: PeftModule; c: number } => p.m !== undefined);
      const kind = parts[0]!.m.kind;
      const OC = parts[0]!.m.loraB.shape[0]!;
      const C = parts[0]!.m.loraA.shape[1]!;
      for (const p of parts)
        if (p.m.kind !== kind || p.m.loraB.shape[0] !== OC || p.m.loraA.shape[1] !== C)
          throw new LoraError('ERR_LORA_SHAPE', `Expected module '${name}' to have the same kind and shape in every adapter but found ${shapeString([OC, C])} and ${shapeString([p.m.loraB.shape[0]!, p.m.loraA.shape[1]!])}`);
      let A: Mat;
      let B: Mat;
      if (combination === 'linear') {
        const R = parts[0]!.m.rank;
        if (parts.some((p) => p.m.rank !== R))
          throw new LoraError('ERR_LORA_SHAPE', `Expected equal ranks for a 'linear' combination but module '${name}' has ranks ${parts.map((p) => p.m.rank).join(', ')}; use 'cat' or 'svd'`);
        A = mat(R, C);
        B = mat(OC, R);
        for (const p of parts) {
          const k = Math.sqrt(Math.abs(p.c));
          const a = toMat(p.m.loraA);
          const b = toMat(p.m.loraB);
          for (let i = 0; i < A.data.length; i++) A.data[i] += Math.sign(p.c) * k * a.data[i]!;
          for (let i = 0; i < B.data.length; i++) B.data[i] += k * b.data[i]!;
        }
      } else {
        const Rt = parts.reduce((n, p) => n + p.m.rank, 0);
        const Acat = mat(Rt, C);
        const Bcat = mat(OC, Rt);
        let off = 0;
        for (const p of parts) {
          const a = toMat(p.m.loraA);
          const b = toMat(p.m.loraB);
          const R = p.m.rank;
          for (let i = 0; i < R * C; i++) Acat.data[off * C + i] = p.c * a.data[i]!;
          for (let i = 0; i < OC; i++) for (let r = 0; r < R; r++) Bcat.data[i * Rt + off + r] = b.data[i * R + r]!;
          off += R;
        }
        if (combination === 'cat') {
          A = Acat;
          B = Bcat;
        } else {
          const k = Math.min(o.svdRank ?? Math.max(...parts.map((p) => p.m.rank)), OC, C);
          // Δ = Bcat·Acat = Qb·(Rb·Raᵀ)·Qaᵀ with Bcat = Qb·Rb and Acatᵀ = Qa·Ra
          const { q: Qb, r: Rb } = qr(Bcat);
          const { q: Qa, r: Ra } = qr(transposeMat(Acat));
          const core = matmulMat(Rb, transposeMat(Ra));
          const { u, s, v } = svd(core);
          const p = s.length;
          const Uk = mat(u.rows, k);
          const Vk = mat(v.rows, k);
          for (let j = 0; j < Math.min(k, p); j++) {
            const root = Math.sqrt(s[j]!);
            for (let i = 0; i < u.rows; i++) Uk.data[i * k + j] = u.data[i * p + j]! * root;
            for (let i = 0; i < v.rows; i++) Vk.data[i * k + j] = v.data[i * p + j]! * root;
          }
          B = matmulMat(Qb, Uk); // (OC, k)
          A = transposeMat(matmulMat(Qa, Vk)); // (k, C)
        }
      }
      let bias: Float32Array | null = null;
      for (const p of parts) {
        if (!p.m.loraBBias) continue;
        bias ??= new Float32Array(OC);
        const bb = p.m.loraBBias.toFloat32Array();
        for (let i = 0; i < OC; i++) bias[i] = bias[i]! + p.c * bb[i]!;
      }
      const R = A.rows;
      modules.set(name, {
        kind, rank: R, alpha: R, scaling: 1,
        loraA: keep(tensor(Float32Array.from(A.data), [R, C])),
        loraB: keep(tensor(Float32Array.from(B.data), [OC, R])),
        loraBBias: bias ? keep(tensor(bias, [OC])) : null,
        magnitude: null,
      });
    }
  } catch (err) {
    for (const m of modules.values()) { m.loraA.dispose(); m.loraB.dispose(); m.loraBBias?.dispose(); }
    throw err;
  }
  const first = sources[0]!.config;
  const base: PeftConfig = { ...first, use_rslora: false, use_dora: false, lora_bias: [...modules.values()].some((m) => m.loraBBias !== null) };
  const sameTargets = sources.every((s) => JSON.stringify(s.config.target_modules) === JSON.stringify(first.target_modules) &&
    JSON.stringify(s.config.layers_to_transform) === JSON.stringify(first.layers_to_transform));
  if (!sameTargets) {
    base.target_modules = names.slice().sort();
    delete base.layers_to_transform;
    delete base.layers_pattern;
  }
  const cfg = configForModules(base, new Map([...modules].map(([n, m]) => [n, { rank: m.rank, alpha: m.alpha }])));
  return new PeftAdapter(cfg, modules, new Map(), { format: 'pt' });
}
