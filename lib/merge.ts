// Merging adapters into base weights: each adapted weight merged in float32 on its device (LoRA
// W += s·B·A with the binding's merge kernel, Conv1D-style and embedding weights transposed, DoRA
// rescaled by m / ||W + s·B·A||_row, lora_B.bias into the bias), refused when a result holds NaN or
// Inf, rounded once to the weight's dtype; and the report of how far merged outputs are from the
// adapters'.
import { LoraError } from './errors';
import { adaptedForward, ModuleContribution } from './adapted';
import { doraWeightNorm } from './dora';
import { native } from './native';
import { allFinite } from './numerics';
import { add, div, linear, matmul, mul, reshape, transpose } from './ops';
import { Rng } from './random';
import { asFloat32, DType, noGrad, shapeString, Tensor, tensor, tidy } from './tensor';

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

function data64(t: Tensor): Float64Array {
  return Float64Array.from(t.toFloat32Array());
}

/**
 * Merges adapters into one weight in float32 and rounds once to `W.dtype`; returns the new weight
 * (or `outDtype`) and, with lora_bias, the new bias (else null). Linear: W += s·B·A; Conv1D (fan_in_fan_out) and
 * embeddings: W += s·(B·A)ᵀ; DoRA: W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A).
 * @throws ERR_LORA_NON_FINITE with safe and a NaN/Inf result (nothing is returned then).
 */
export function mergeWeight(name: string, W: Tensor, bias: Tensor | null, contribs: readonly ModuleContribution[], safe = true, outDtype: DType = W.dtype): { weight: Tensor; bias: Tensor | null } {
  if (W.dtype === 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected a floating-point base weight for '${name}' but received int32`);
  let w = W.toDtype('float32'); // a copy: the merge happens in fp32, W stays as it is
  let b32: Tensor | null = null;
  try {
    for (const c of contribs) {
      const m = c.module;
      const A = asFloat32(m.loraA);
      const B = asFloat32(m.loraB);
      const R = m.rank;
      const transposed = c.fanInFanOut || m.kind === 'embedding';
      const [rows, cols] = w.shape as [number, number];
      const want = transposed ? [A.shape[1]!, B.shape[0]!] : [B.shape[0]!, A.shape[1]!];
      if (w.ndim !== 2 || rows !== want[0] || cols !== want[1])
        throw new LoraError('ERR_LORA_SHAPE', `Expected base weight '${name}' of shape ${shapeString(want)} for its adapter but received ${shapeString(W.shape)}`);
      if (m.magnitude) {
        // W' = m / ||W + s·B·A||_row ⊙ (W + s·B·A), the norm taken before the merge, on the device
        const norm = doraWeightNorm(w, A, B, c.scaling, c.fanInFanOut);
        if (transposed) mergeTransposed(w, A, B, R, c.scaling);
        else native.loraMerge(w._storage, A._storage, B._storage, rows, cols, R, c.scaling);
        const scaled = noGrad(() => tidy(() => {
          const k = div(asFloat32(m.magnitude!), norm);
          return mul(w, reshape(k, transposed ? [1, cols] : [rows, 1]));
        }));
        norm.dispose();
        w.dispose();
        w = scaled;
      } else if (transposed) {
        mergeTransposed(w, A, B, R, c.scaling);
      } else {
        native.loraMerge(w._storage, A._storage, B._storage, rows, cols, R, c.scaling);
      }
      if (A !== m.loraA) A.dispose();
      if (B !== m.loraB) B.dispose();
      if (m.loraBBias) {
        // b' = b + s·b_B on the bias's device
        const bB = m.loraBBias;
        const sum = noGrad(() => tidy(() => {
          const scaled = mul(asFloat32(bB), c.scaling);
          const prev = b32 ?? (bias ? asFloat32(bias) : null);
          return prev ? add(prev, scaled) : scaled;
        }));
        b32?.dispose();
        b32 = sum;
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

/**
 * @internal Throws ERR_LORA_NON_FINITE naming the tensor and the first bad element unless every
 * value of t is finite (checked natively first: no host copy of a good tensor).
 */
export function checkFinite(name: string, t: Tensor, when: string): void {
  if (allFinite(t)) return;
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
      const ref = adaptedForward(x, asFloat32(W), bias, contribs, fifo).toFloat32Array();
      const mw = merged.dtype === 'float16' ? merged.toDtype('float32') : merged;
      let y = fifo ? matmul(x, asFloat32(mw)) : linear(x, mw);
      const b = mergedBias ?? bias;
      if (b) y = add(y, asFloat32(b));
      const got = y.toFloat32Array();
      for (let i = 0; i < got.length; i++) {
        maxErr = Math.max(maxErr, Math.abs(got[i]! - ref[i]!));
        maxOut = Math.max(maxOut, Math.abs(ref[i]!));
      }
    }));
  }
  return { name, dtype: merged.dtype, adapters, maxAbsError: maxErr, maxAbsOutput: maxOut, relError: maxOut > 0 ? maxErr / maxOut : maxErr };
}
