// LoraModel: named base tensors (a model.safetensors) with PEFT-style LoRA adapters attached by
// module name: several adapters, an active set, per-adapter scales, forward through an adapted
// linear module (LoRA and DoRA, differentiable), merging with an error report, and weighted
// combinations of adapters. It is not a transformer: it runs single modules, not whole models.
import { checkOptions, expectBoolean, expectInteger, expectNumber, expectOneOf, LoraError, typeError } from './errors';
import { mat, matmulMat, Mat, qr, svd, transposeMat } from './linalg';
import { native } from './native';
import { Module } from './module';
import { embedding } from './nn_ops';
import { add, linear, matmul, mul, sub, div, sum, square, transpose } from './ops';
import { configForModules, moduleScaling, PEFT_CAMEL_ALIASES, PEFT_CONFIG_FIELDS, PeftAdapter, PeftConfig, PeftModule, targetsModule } from './peft';
import { Rng } from './random';
import { DType, keep, noGrad, shapeString, Tensor, tensor, tidy } from './tensor';

/** One adapter's contribution to a module, with its effective scaling (scaling · user scale). */
export interface ModuleContribution {
  module: PeftModule;
  scaling: number;
  /** Conv1D-style weights stored (in, out). */
  fanInFanOut: boolean;
}

/** Per merged tensor: how far the merged weight's outputs are from the adapter's. */
export interface MergeReportEntry {
  /** The base tensor that was merged (`<module>.weight`). */
  name: string;
  dtype: DType;
  /** Adapters merged into it. */
  adapters: string[];
  /** max |x·W'ᵀ - adapterForward(x)| over the probe inputs. */
  maxAbsError: number;
  /** max |adapterForward(x)|, for scale. */
  maxAbsOutput: number;
  /** maxAbsError / maxAbsOutput. */
  relError: number;
}

export interface MergeOptions {
  /** Refuse (ERR_LORA_NON_FINITE) when a merged weight holds NaN or Inf, in fp32 or after rounding. Default true. */
  safeMerge?: boolean;
  /** Probe rows per tensor for the error report (0 skips it). Default 8. */
  probeRows?: number;
  /** Seed of the probe inputs. Default 0. */
  seed?: number;
  /** Adapters to merge; default the active ones. */
  adapters?: string[];
}

export interface MergeResult {
  /** Every base tensor: merged ones are new tensors, the others the base tensors themselves. */
  tensors: Map<string, Tensor>;
  report: MergeReportEntry[];
}

function f32(t: Tensor): Tensor {
  return t.dtype === 'float32' ? t : t.toDtype('float32');
}

function data64(t: Tensor): Float64Array {
  return Float64Array.from(t.toFloat32Array());
}

// ---- DoRA ----------------------------------------------------------------------------------------

/**
 * Row norms ||W + s·B·A||_row (one per output) without forming B·A:
 * ||W_i||² + 2s·(B ⊙ (W·Aᵀ))_i·1 + s²·B_i·(A·Aᵀ)·B_iᵀ. W is (OC, C), or (C, OC) with fanInFanOut.
 * Returns a float32 tensor (OC) with no gradient.
 */
export function doraWeightNorm(W: Tensor, A: Tensor, B: Tensor, s: number, fanInFanOut = false): Tensor {
  for (const [name, v] of [['W', W], ['A', A], ['B', B]] as const) {
    if (!(v instanceof Tensor)) throw typeError(name, 'a Tensor', v);
    v._live(name);
    if (v.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D ${name} for doraWeightNorm() but received ${shapeString(v.shape)}`);
  }
  expectNumber('s', s);
  expectBoolean('fanInFanOut', fanInFanOut);
  const rows = fanInFanOut ? W.shape[1]! : W.shape[0]!;
  const cols = fanInFanOut ? W.shape[0]! : W.shape[1]!;
  if (A.shape[1] !== cols || B.shape[0] !== rows || B.shape[1] !== A.shape[0])
    throw new LoraError('ERR_LORA_SHAPE', `Expected A [R, ${cols}] and B [${rows}, R] for doraWeightNorm() but received ${shapeString(A.shape)} and ${shapeString(B.shape)}`);
  return noGrad(() => tidy(() => {
    const w = f32(W);
    const a = f32(A);
    const R = a.shape[0]!;
    const wn2 = data64(sum(square(w), fanInFanOut ? 0 : 1)); // (OC)
    const P = data64(fanInFanOut ? transpose(matmul(a, w)) : linear(w, a)); // (OC, R): row i = W_i·Aᵀ
    const G = data64(linear(a, a)); // (R, R) = A·Aᵀ
    const b = data64(B);
    const OC = wn2.length;
    const out = new Float32Array(OC);
    for (let i = 0; i < OC; i++) {
      let cross = 0;
      let quad = 0;
      for (let r = 0; r < R; r++) {
        const bir = b[i * R + r]!;
        cross += bir * P[i * R + r]!;
        let gb = 0;
        for (let q = 0; q < R; q++) gb += G[r * R + q]! * b[i * R + q]!;
        quad += bir * gb;
      }
      out[i] = Math.sqrt(Math.max(0, wn2[i]! + 2 * s * cross + s * s * quad));
    }
    return tensor(out, [OC]);
  }));
}

/**
 * The output of a module with adapters, as PEFT computes it (dropout off). x (..., in).
 * Linear: y = x·Wᵀ + b + Σ s·(x·Aᵀ·Bᵀ + b_B); DoRA adapters instead add
 * (c - 1)⊙(x·Wᵀ) + c⊙s·x·Aᵀ·Bᵀ with c = m / ||W + s·B·A||_row (the norm a constant in the backward).
 * Differentiable in x, A, B and m.
 */
export function adaptedForward(x: Tensor, W: Tensor, bias: Tensor | null, contribs: readonly ModuleContribution[], fanInFanOut = false): Tensor {
  const wt = W.dtype === 'float16' ? W.toDtype('float32') : W;
  const base = fanInFanOut ? matmul(x, f32(wt)) : linear(x, wt);
  let y = bias ? add(base, f32(bias)) : base;
  for (const c of contribs) {
    const m = c.module;
    if (m.kind !== 'linear') throw new LoraError('ERR_LORA_UNSUPPORTED', 'Expected a linear module for forward(); embedding adapters can be merged and saved but not run');
    const A = m.loraA.dtype === 'float16' ? m.loraA.toDtype('float32') : m.loraA;
    const B = m.loraB.dtype === 'float16' ? m.loraB.toDtype('float32') : m.loraB;
    const lora = mul(linear(linear(x, A), B), c.scaling);
    if (m.magnitude) {
      const norm = doraWeightNorm(W, m.loraA, m.loraB, c.scaling, fanInFanOut);
      const scale = div(f32(m.magnitude), norm);
      y = add(add(y, mul(sub(scale, 1), base)), mul(scale, lora));
    } else {
      y = add(y, lora);
    }
    if (m.loraBBias) y = add(y, mul(f32(m.loraBBias), c.scaling));
  }
  return y;
}

/**
 * The output of an embedding with adapters, as PEFT computes it: ids (...) int32 into W (V, D);
 * y = W[ids] + Σ s·(Aᵀ[ids])·Bᵀ with lora_embedding_A (R, V) and lora_embedding_B (D, R).
 * Differentiable in A and B.
 */
export function adaptedEmbedding(ids: Tensor, W: Tensor, contribs: readonly ModuleContribution[]): Tensor {
  if (ids.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected int32 ids for an embedding module but received ${ids.dtype} (create them with { dtype: 'int32' })`);
  const table = f32(W);
  let y = embedding(ids, table);
  for (const c of contribs) {
    const m = c.module;
    const At = transpose(f32(m.loraA)); // (V, R): row v is what id v contributes before B
    const lora = mul(linear(embedding(ids, At), f32(m.loraB)), c.scaling);
    y = add(y, lora);
  }
  return y;
}

// ---- merging -------------------------------------------------------------------------------------

/**
 * Merges adapters into one weight in float32 and rounds once to `W.dtype`; returns the new weight
 * (or `outDtype`) and, with lora_bias, the new bias (else null). Linear: W += s·B·A; Conv1D (fan_in_fan_out) and
 * embeddings: W += s·(B·A)ᵀ; DoRA: W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A).
 * @throws ERR_LORA_NON_FINITE with safe and a NaN/Inf result (nothing is returned then).
 */
export function mergeWeight(name: string, W: Tensor, bias: Tensor | null, contribs: readonly ModuleContribution[], safe = true, outDtype: DType = W.dtype): { weight: Tensor; bias: Tensor | null } {
  if (W.dtype === 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected a floating-point base weight for '${name}' but received int32`);
  const w = W.toDtype('float32'); // a copy: the merge happens in fp32, W stays as it is
  let b32: Tensor | null = null;
  try {
    for (const c of contribs) {
      const m = c.module;
      const A = f32(m.loraA);
      const B = f32(m.loraB);
      const R = m.rank;
      const transposed = c.fanInFanOut || m.kind === 'embedding';
      const [rows, cols] = w.shape as [number, number];
      const want = transposed ? [A.shape[1]!, B.shape[0]!] : [B.shape[0]!, A.shape[1]!];
      if (w.ndim !== 2 || rows !== want[0] || cols !== want[1])
        throw new LoraError('ERR_LORA_SHAPE', `Expected base weight '${name}' of shape ${shapeString(want)} for its adapter but received ${shapeString(W.shape)}`);
      if (m.magnitude) {
        const norm = doraWeightNorm(w, A, B, c.scaling, c.fanInFanOut);
        if (transposed) mergeTransposed(w, A, B, R, c.scaling);
        else native.loraMerge(w._storage, A._storage, B._storage, rows, cols, R, c.scaling);
        const mag = m.magnitude.toFloat32Array();
        const nv = norm.toFloat32Array();
        norm.dispose();
        const d = w.toFloat32Array();
        for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
          const o = transposed ? j : i;
          d[i * cols + j] = (mag[o]! / nv[o]!) * d[i * cols + j]!;
        }
        w.assign(d);
      } else if (transposed) {
        mergeTransposed(w, A, B, R, c.scaling);
      } else {
        native.loraMerge(w._storage, A._storage, B._storage, rows, cols, R, c.scaling);
      }
      if (A !== m.loraA) A.dispose();
      if (B !== m.loraB) B.dispose();
      if (m.loraBBias) {
        const bb = m.loraBBias.toFloat32Array();
        const cur = b32 ? b32.toFloat32Array() : bias ? bias.toFloat32Array() : new Float32Array(bb.length);
        for (let i = 0; i < cur.length; i++) cur[i] = cur[i]! + c.scaling * bb[i]!;
        b32?.dispose();
        b32 = tensor(cur, [cur.length]);
      }
    }
    if (safe) checkFinite(name, w, 'in float32');
    const out = outDtype === 'float32' ? w : w.toDtype(outDtype);
    if (out !== w) w.dispose();
    let outBias: Tensor | null = null;
    if (b32) {
      const bd = bias ? (outDtype !== W.dtype ? outDtype : bias.dtype) : outDtype;
      outBias = bd !== 'float32' ? b32.toDtype(bd) : b32;
      if (outBias !== b32) b32.dispose();
      b32 = null;
    }
    if (safe) {
      try {
        checkFinite(name, out, `after rounding to ${outDtype}`);
        if (outBias) checkFinite(name.replace(/weight$/, 'bias'), outBias, 'after merging lora_B.bias');
      } catch (err) {
        out.dispose();
        outBias?.dispose();
        throw err;
      }
    }
    return { weight: out, bias: outBias };
  } catch (err) {
    if (!w.isDisposed) w.dispose();
    b32?.dispose();
    throw err;
  }
}

/** w (rows, cols) += s·(B·A)ᵀ = s·Aᵀ·Bᵀ, via loraMerge with the small factors transposed. */
function mergeTransposed(w: Tensor, A: Tensor, B: Tensor, R: number, s: number): void {
  tidy(() => noGrad(() => {
    const At = transpose(A).reshape([A.shape[1]!, R]); // (rows, R) plays B
    const Bt = transpose(B).reshape([R, B.shape[0]!]); // (R, cols) plays A
    native.loraMerge(w._storage, Bt._storage, At._storage, w.shape[0]!, w.shape[1]!, R, s);
  }));
}

function checkFinite(name: string, t: Tensor, when: string): void {
  const d = t.toFloat32Array();
  for (let i = 0; i < d.length; i++)
    if (!Number.isFinite(d[i]!))
      throw new LoraError('ERR_LORA_NON_FINITE', `Refusing to merge '${name}': element ${i} is ${d[i]} ${when} (the adapter or the base holds NaN/Inf or overflows; pass safeMerge: false to merge anyway)`);
}

/**
 * The error report for one merged weight: probe inputs x (seeded), merged output x·W'ᵀ + b' against
 * the adapter output from the original weights (embeddings: looked-up rows).
 */
export function mergeError(name: string, W: Tensor, bias: Tensor | null, merged: Tensor, mergedBias: Tensor | null,
  contribs: readonly ModuleContribution[], adapters: string[], probeRows: number, seed: number): MergeReportEntry {
  const fifo = contribs.some((c) => c.fanInFanOut);
  const embedding = contribs.some((c) => c.module.kind === 'embedding');
  let maxErr = 0;
  let maxOut = 0;
  const rng = new Rng(seed);
  if (embedding) {
    const [num, dim] = W.shape as [number, number];
    const w = W.toFloat32Array();
    const wm = merged.toFloat32Array();
    const factors = contribs.map((c) => ({ a: data64(c.module.loraA), b: data64(c.module.loraB), R: c.module.rank, s: c.scaling }));
    for (let p = 0; p < probeRows; p++) {
      const id = Math.floor(rng.uniform() * num);
      for (let j = 0; j < dim; j++) {
        let ref = w[id * dim + j]!;
        for (const f of factors) for (let r = 0; r < f.R; r++) ref += f.s * f.b[j * f.R + r]! * f.a[r * num + id]!;
        maxErr = Math.max(maxErr, Math.abs(wm[id * dim + j]! - ref));
        maxOut = Math.max(maxOut, Math.abs(ref));
      }
    }
  } else {
    noGrad(() => tidy(() => {
      const C = fifo ? W.shape[0]! : W.shape[1]!;
      const xs = new Float32Array(probeRows * C);
      for (let i = 0; i < xs.length; i++) xs[i] = rng.normal();
      const x = tensor(xs, [probeRows, C]);
      const ref = adaptedForward(x, f32(W), bias, contribs, fifo).toFloat32Array();
      const mw = merged.dtype === 'float16' ? merged.toDtype('float32') : merged;
      let y = fifo ? matmul(x, f32(mw)) : linear(x, mw);
      const b = mergedBias ?? bias;
      if (b) y = add(y, f32(b));
      const got = y.toFloat32Array();
      for (let i = 0; i < got.length; i++) {
        maxErr = Math.max(maxErr, Math.abs(got[i]! - ref[i]!));
        maxOut = Math.max(maxOut, Math.abs(ref[i]!));
      }
    }));
  }
  return { name, dtype: merged.dtype, adapters, maxAbsError: maxErr, maxAbsOutput: maxOut, relError: maxOut > 0 ? maxErr / maxOut : maxErr };
}

// ---- combining adapters --------------------------------------------------------------------------

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

// ---- the model ----------------------------------------------------------------------------------

/**
 * A new adapter's config: PEFT's LoraConfig field names (`target_modules`, `r`, `lora_alpha`, ...)
 * or their camelCase forms (`targetModules`, and `rank`, `alpha`, `dropout` for `r`, `lora_alpha`,
 * `lora_dropout`), plus a seed for the initialisation. Other names are refused with a did-you-mean.
 */
export interface NewAdapterConfig extends PeftConfig {
  seed?: number;
  targetModules?: string[] | string;
  rank?: number;
  alpha?: number;
  useRslora?: boolean;
  useDora?: boolean;
}

/** One adapted linear module of a LoraModel, as a Module (forward(x), parameters()). */
export class AdaptedLinear extends Module {
  constructor(private readonly model: LoraModel, readonly moduleName: string) {
    super();
  }

  forward(x: Tensor): Tensor {
    return this.model.forward(this.moduleName, x);
  }

  override namedParameters(prefix = ''): [string, Tensor][] {
    return this.model.moduleParameters(this.moduleName).map(([n, t]) => [prefix + n, t] as [string, Tensor]);
  }

  override dispose(): void {
    /* the model owns the tensors */
  }
}

/**
 * Base tensors by name (e.g. from loadModel) with named LoRA adapters attached by module name, as
 * PEFT's LoraModel: a module `model.layers.0.q_proj` is the base tensor `model.layers.0.q_proj.weight`
 * (and `.bias`). The model does not own the base tensors; it owns its adapters.
 *
 * @example
 * const { tensors } = loadModel('base/');
 * const model = new LoraModel(tensors);
 * model.addAdapter('sql', loadPeftAdapter('adapters/sql'));
 * const y = model.forward('model.layers.0.self_attn.q_proj', x);
 * const { tensors: merged, report } = model.mergeAndUnload();
 */
export class LoraModel {
  private baseTensors: Map<string, Tensor>;
  private readonly adapters = new Map<string, PeftAdapter>();
  private readonly scales = new Map<string, number>();
  private active: string[] = [];

  constructor(base: Map<string, Tensor> | Record<string, Tensor>) {
    const entries = base instanceof Map ? [...base] : base && typeof base === 'object' ? Object.entries(base) : null;
    if (!entries) throw typeError('base', 'a Map or an object of named tensors', base);
    for (const [n, t] of entries) if (!(t instanceof Tensor)) throw typeError(`base['${n}']`, 'a Tensor', t);
    this.baseTensors = new Map(entries);
  }

  /** The base tensors (after mergeAndUnload, the merged ones). */
  get base(): ReadonlyMap<string, Tensor> {
    return this.baseTensors;
  }

  get adapterNames(): string[] {
    return [...this.adapters.keys()];
  }

  get activeAdapters(): string[] {
    return this.active.slice();
  }

  /** The adapter's modules, tensors and config (owned by the model). */
  getAdapter(name: string): PeftAdapter {
    const a = this.adapters.get(name);
    if (!a) throw this.noAdapter(name);
    return a;
  }

  private noAdapter(name: unknown): LoraError {
    return new LoraError('ERR_LORA_STATE', `Expected the name of an attached adapter (${this.adapterNames.map((n) => `'${n}'`).join(', ') || 'none attached'}) but received ${JSON.stringify(name)}`);
  }

  /**
   * Attaches an adapter under a name and makes it active if none is. Either a loaded PeftAdapter
   * (the model takes ownership; every module must exist in the base with matching shapes), or a
   * config (PEFT field names: target_modules, r, lora_alpha, use_rslora, use_dora, fan_in_fan_out,
   * init_lora_weights, ...) that creates a new adapter on every 2-D `<module>.weight` it targets:
   * A Kaiming-uniform, B zeros (init_lora_weights: false makes B random too), DoRA's magnitude the
   * weight's row norms.
   * @throws ERR_LORA_STATE for a name in use; ERR_LORA_SHAPE / ERR_LORA_FORMAT when the adapter does not fit the base.
   */
  addAdapter(name: string, adapter: PeftAdapter | NewAdapterConfig): this {
    if (typeof name !== 'string' || name === '') throw typeError('name', 'a non-empty string', name);
    if (this.adapters.has(name)) throw new LoraError('ERR_LORA_STATE', `Expected a new adapter name but '${name}' is already attached`);
    const a = adapter instanceof PeftAdapter ? adapter : this.createAdapter(adapter);
    for (const [mod, m] of a.modules) {
      const W = this.baseTensors.get(`${mod}.weight`);
      if (!W) throw new LoraError('ERR_LORA_FORMAT', `Adapter '${name}' adapts module '${mod}' but the base has no tensor '${mod}.weight'`);
      const fifo = !!a.config.fan_in_fan_out || m.kind === 'embedding';
      const want = fifo ? [m.loraA.shape[1]!, m.loraB.shape[0]!] : [m.loraB.shape[0]!, m.loraA.shape[1]!];
      if (W.ndim !== 2 || W.shape[0] !== want[0] || W.shape[1] !== want[1])
        throw new LoraError('ERR_LORA_SHAPE', `Adapter '${name}' needs '${mod}.weight' of shape ${shapeString(want)} but the base has ${shapeString(W.shape)}`);
      for (const t of [m.loraA, m.loraB, m.loraBBias, m.magnitude]) if (t && t.dtype === 'float32') t.requiresGrad = true;
    }
    this.adapters.set(name, a);
    this.scales.set(name, 1);
    if (this.active.length === 0) this.active = [name];
    return this;
  }

  private createAdapter(cfg: NewAdapterConfig): PeftAdapter {
    if (!cfg || typeof cfg !== 'object') throw typeError('adapter', 'a PeftAdapter or a config object', cfg);
    const { seed, ...config } = checkOptions<NewAdapterConfig>('addAdapter() config', cfg, [...PEFT_CONFIG_FIELDS, 'seed'], PEFT_CAMEL_ALIASES);
    if (config.target_modules == null) throw typeError('target_modules', 'a list of module names or a regex string', config.target_modules);
    if (config.r !== undefined) expectInteger('r', config.r, 1, 1 << 16);
    if (config.lora_alpha !== undefined) expectNumber('lora_alpha', config.lora_alpha);
    const rng = new Rng(seed === undefined ? 0 : expectInteger('seed', seed, 0, Number.MAX_SAFE_INTEGER));
    const modules = new Map<string, PeftModule>();
    const fifo = !!config.fan_in_fan_out;
    const randomB = config.init_lora_weights === false;
    for (const [tname, W] of this.baseTensors) {
      if (!tname.endsWith('.weight') || W.ndim !== 2 || W.dtype === 'int32') continue;
      const mod = tname.slice(0, -'.weight'.length);
      if (!targetsModule(config, mod)) continue;
      const { rank, alpha } = moduleScaling(config, mod);
      const [OC, C] = fifo ? [W.shape[1]!, W.shape[0]!] : [W.shape[0]!, W.shape[1]!];
      const bound = 1 / Math.sqrt(C);
      const A = new Float32Array(rank * C).map(() => (2 * rng.uniform() - 1) * bound);
      const B = new Float32Array(OC * rank).map(() => (randomB ? (2 * rng.uniform() - 1) * bound : 0));
      const m: PeftModule = {
        kind: 'linear', rank, alpha, scaling: config.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank,
        loraA: keep(tensor(A, [rank, C])), loraB: keep(tensor(B, [OC, rank])),
        loraBBias: config.lora_bias ? keep(tensor(new Float32Array(OC), [OC])) : null, magnitude: null,
      };
      if (config.use_dora) m.magnitude = keep(doraWeightNorm(W, m.loraA, m.loraB, m.scaling, fifo));
      modules.set(mod, m);
    }
    if (modules.size === 0) throw new LoraError('ERR_LORA_STATE', `Expected target_modules ${JSON.stringify(config.target_modules)} to match a 2-D weight of the base but none matched`);
    return new PeftAdapter({ peft_type: 'LORA', r: 8, lora_alpha: 8, ...config }, modules);
  }

  /** Makes one adapter, or several (their deltas add), the active set. */
  setAdapter(names: string | string[]): this {
    const list = typeof names === 'string' ? [names] : names;
    if (!Array.isArray(list)) throw typeError('names', 'an adapter name or an array of names', names);
    for (const n of list) if (!this.adapters.has(n)) throw this.noAdapter(n);
    this.active = [...new Set(list)];
    return this;
  }

  /** Detaches an adapter and frees its tensors. */
  deleteAdapter(name: string): this {
    const a = this.getAdapter(name);
    a.dispose();
    this.adapters.delete(name);
    this.scales.delete(name);
    this.active = this.active.filter((n) => n !== name);
    return this;
  }

  /** Multiplies an adapter's scaling by k in forward, merge and combinations (1 by default). */
  setScale(name: string, k: number): this {
    this.getAdapter(name);
    this.scales.set(name, expectNumber('scale', k));
    return this;
  }

  getScale(name: string): number {
    this.getAdapter(name);
    return this.scales.get(name)!;
  }

  /** The modules any attached adapter adapts. */
  get adaptedModules(): string[] {
    const out = new Set<string>();
    for (const a of this.adapters.values()) for (const m of a.modules.keys()) out.add(m);
    return [...out];
  }

  private contributions(moduleName: string, names = this.active): ModuleContribution[] {
    const out: ModuleContribution[] = [];
    for (const n of names) {
      const a = this.adapters.get(n);
      if (!a) throw this.noAdapter(n);
      const m = a.modules.get(moduleName);
      if (m) out.push({ module: m, scaling: m.scaling * this.scales.get(n)!, fanInFanOut: !!a.config.fan_in_fan_out });
    }
    return out;
  }

  /**
   * Runs one module with the active adapters: y = x·Wᵀ + b + Σ adapter deltas (DoRA as PEFT).
   * Differentiable in x and in the adapters' float32 tensors.
   * @throws ERR_LORA_STATE for a module the base lacks; ERR_LORA_SHAPE for a wrong x.
   */
  forward(moduleName: string, x: Tensor): Tensor {
    const W = this.baseTensors.get(`${moduleName}.weight`);
    if (!W) throw new LoraError('ERR_LORA_STATE', `Expected a module of the base but '${moduleName}.weight' is not a base tensor`);
    const contribs = this.contributions(moduleName);
    if (!(x instanceof Tensor)) throw typeError('x', 'a Tensor', x);
    if (contribs.some((c) => c.module.kind === 'embedding')) return adaptedEmbedding(x, W, contribs);
    const fifo = contribs.some((c) => c.fanInFanOut);
    const C = fifo ? W.shape[0]! : W.shape[1]!;
    if (x.shape[x.ndim - 1] !== C) throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [..., ${C}] for module '${moduleName}' but received ${shapeString(x.shape)}`);
    return adaptedForward(x, W, this.baseTensors.get(`${moduleName}.bias`) ?? null, contribs, fifo);
  }

  /** A Module view of one adapted linear module (forward(x); parameters() = the active adapters' tensors there). */
  module(moduleName: string): AdaptedLinear {
    if (!this.baseTensors.has(`${moduleName}.weight`)) throw new LoraError('ERR_LORA_STATE', `Expected a module of the base but '${moduleName}.weight' is not a base tensor`);
    return new AdaptedLinear(this, moduleName);
  }

  /** @internal the active adapters' tensors of one module, named like PEFT's state dict */
  moduleParameters(moduleName: string): [string, Tensor][] {
    const out: [string, Tensor][] = [];
    for (const n of this.active) {
      const m = this.adapters.get(n)!.modules.get(moduleName);
      if (!m) continue;
      out.push([`lora_A.${n}.weight`, m.loraA], [`lora_B.${n}.weight`, m.loraB]);
      if (m.loraBBias) out.push([`lora_B.${n}.bias`, m.loraBBias]);
      if (m.magnitude) out.push([`lora_magnitude_vector.${n}.weight`, m.magnitude]);
    }
    return out;
  }

  /** The active adapters' trainable tensors (for an optimizer). */
  parameters(): Tensor[] {
    const out: Tensor[] = [];
    for (const mod of this.adaptedModules) for (const [, t] of this.moduleParameters(mod)) if (t.requiresGrad) out.push(t);
    return out;
  }

  /**
   * Merged base tensors without changing the model: each adapted weight merged in float32 and
   * rounded once to its dtype (fp32, bf16, fp16), biases updated for lora_bias, plus the error
   * report. Untouched tensors are the base tensors themselves; the new ones belong to the caller.
   * @throws ERR_LORA_NON_FINITE with safeMerge (the default) and a NaN/Inf result; nothing is returned then.
   */
  merge(opts?: MergeOptions): MergeResult {
    const o = checkOptions<MergeOptions>('merge()', opts, ['safeMerge', 'probeRows', 'seed', 'adapters']);
    const safe = o.safeMerge === undefined ? true : expectBoolean('safeMerge', o.safeMerge);
    const probeRows = o.probeRows === undefined ? 8 : expectInteger('probeRows', o.probeRows, 0, 1 << 16);
    const seed = o.seed === undefined ? 0 : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
    const names = o.adapters ?? this.active;
    for (const n of names) if (!this.adapters.has(n)) throw this.noAdapter(n);
    const created: Tensor[] = [];
    const out = new Map(this.baseTensors);
    const report: MergeReportEntry[] = [];
    try {
      for (const mod of this.adaptedModules) {
        const contribs = this.contributions(mod, names);
        if (contribs.length === 0) continue;
        const wName = `${mod}.weight`;
        const bName = `${mod}.bias`;
        const W = this.baseTensors.get(wName)!;
        const bias = this.baseTensors.get(bName) ?? null;
        const { weight, bias: nb } = mergeWeight(wName, W, bias, contribs, safe);
        created.push(weight);
        out.set(wName, weight);
        if (nb) {
          created.push(nb);
          out.set(bName, nb);
        }
        if (probeRows > 0) report.push(mergeError(wName, W, bias, weight, nb, contribs, names.filter((n) => this.adapters.get(n)!.modules.has(mod)), probeRows, seed));
      }
    } catch (err) {
      for (const t of created) t.dispose();
      throw err;
    }
    return { tensors: out, report };
  }

  /**
   * merge(), then detaches every adapter (freeing them) and makes the merged tensors the model's
   * base. The replaced base tensors are not freed (they belong to the caller).
   */
  mergeAndUnload(opts?: MergeOptions): MergeResult {
    const result = this.merge(opts);
    for (const n of this.adapterNames) this.deleteAdapter(n);
    this.baseTensors = new Map(result.tensors);
    return result;
  }

  /**
   * Attaches a new adapter `newName` combining attached adapters (see combineAdapters): their
   * per-adapter scales are folded in, the result has scaling 1.
   * @example model.addWeightedAdapter(['a', 'b'], [0.7, 0.3], 'svd', 'ab', { svdRank: 8 });
   */
  addWeightedAdapter(names: string[], weights: number[], combination: Combination, newName: string, opts?: { svdRank?: number }): this {
    if (!Array.isArray(names)) throw typeError('names', 'an array of adapter names', names);
    const o = checkOptions<{ svdRank?: number }>('addWeightedAdapter()', opts, ['svdRank']);
    const sources = names.map((n) => this.getAdapter(n));
    const combined = combineAdapters(sources, weights, combination, { ...o, scales: names.map((n) => this.scales.get(n)!) });
    try {
      return this.addAdapter(newName, combined);
    } catch (err) {
      combined.dispose();
      throw err;
    }
  }

  /** Frees every adapter (not the base tensors). */
  dispose(): void {
    for (const n of this.adapterNames) this.deleteAdapter(n);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
