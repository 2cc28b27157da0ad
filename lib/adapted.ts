// The forward of a module with PEFT adapters attached (LoraModel's adapted modules), as PEFT
// computes it: linear modules through the fused LoRA op (lib/ops/lora.ts) when they can — the
// first adapter fused with the base product, DoRA as a row scale of that fused output, further
// plain adapters as their own low-rank products — and composed from ops otherwise (Conv1D-style
// fan_in_fan_out weights, float16 weights or factors, several DoRA adapters); embeddings by
// looking rows up. Differentiable in x and the adapters' float32 tensors.
import { LoraError } from './errors';
import { doraLinear, doraWeightNorm } from './dora';
import { add, div, embedding, linear, loraLinear, matmul, mul, sub, transpose } from './ops';
import { PeftModule } from './peft';
import { asFloat32, Tensor } from './tensor';

/** One adapter's contribution to a module, with its effective scaling (scaling · user scale). */
export interface ModuleContribution {
  module: PeftModule;
  scaling: number;
  /** Conv1D-style weights stored (in, out). */
  fanInFanOut: boolean;
}

// The fused op takes a weight stored (out, in) and float32 factors of the first adapter; DoRA
// only for that first one (its scale multiplies the fused output).
function fusable(W: Tensor, contribs: readonly ModuleContribution[], fanInFanOut: boolean): boolean {
  const first = contribs[0]?.module;
  return !fanInFanOut && first !== undefined && first.kind === 'linear' && W.dtype !== 'int32' &&
    first.loraA.dtype === 'float32' && first.loraB.dtype === 'float32' &&
    contribs.slice(1).every((c) => c.module.kind === 'linear' && !c.module.magnitude);
}

// y = x·Wᵀ + b + s·x·Aᵀ·Bᵀ in one fused op; DoRA: c ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b with
// c = m / ||W + s·B·A||_row, the norm a constant in the backward (PEFT detaches it).
function fusedForward(x: Tensor, W: Tensor, bias: Tensor | null, contribs: readonly ModuleContribution[]): Tensor {
  const [first, ...rest] = contribs;
  const m = first!.module;
  let y: Tensor;
  if (m.magnitude) {
    y = doraLinear(x, W, bias, m.loraA, m.loraB, m.magnitude, first!.scaling);
  } else {
    y = loraLinear(x, W, bias ? asFloat32(bias) : null, m.loraA, m.loraB, first!.scaling);
  }
  if (m.loraBBias) y = add(y, mul(asFloat32(m.loraBBias), first!.scaling));
  for (const c of rest) {
    y = add(y, mul(linear(linear(x, asFloat32(c.module.loraA)), asFloat32(c.module.loraB)), c.scaling));
    if (c.module.loraBBias) y = add(y, mul(asFloat32(c.module.loraBBias), c.scaling));
  }
  return y;
}

/**
 * The output of a module with adapters, as PEFT computes it (dropout off). x (..., in).
 * Linear: y = x·Wᵀ + b + Σ s·(x·Aᵀ·Bᵀ + b_B); DoRA adapters instead add
 * (c - 1)⊙(x·Wᵀ) + c⊙s·x·Aᵀ·Bᵀ with c = m / ||W + s·B·A||_row (the norm a constant in the backward).
 * Differentiable in x, A, B and m.
 */
export function adaptedForward(x: Tensor, W: Tensor, bias: Tensor | null, contribs: readonly ModuleContribution[], fanInFanOut = false): Tensor {
  if (fusable(W, contribs, fanInFanOut)) return fusedForward(x, W, bias, contribs);
  const wt = W.dtype === 'float16' ? W.toDtype('float32') : W;
  const base = fanInFanOut ? matmul(x, asFloat32(wt)) : linear(x, wt);
  let y = bias ? add(base, asFloat32(bias)) : base;
  for (const c of contribs) {
    const m = c.module;
    if (m.kind !== 'linear') throw new LoraError('ERR_LORA_UNSUPPORTED', 'Expected a linear module for forward(); embedding adapters can be merged and saved but not run');
    const A = m.loraA.dtype === 'float16' ? m.loraA.toDtype('float32') : m.loraA;
    const B = m.loraB.dtype === 'float16' ? m.loraB.toDtype('float32') : m.loraB;
    const lora = mul(linear(linear(x, A), B), c.scaling);
    if (m.magnitude) {
      const norm = doraWeightNorm(W, m.loraA, m.loraB, c.scaling, fanInFanOut);
      const scale = div(asFloat32(m.magnitude), norm);
      y = add(add(y, mul(sub(scale, 1), base)), mul(scale, lora));
    } else {
      y = add(y, lora);
    }
    if (m.loraBBias) y = add(y, mul(asFloat32(m.loraBBias), c.scaling));
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
  let y = embedding(ids, W); // a bf16/f16 table is read as stored
  for (const c of contribs) {
    const m = c.module;
    const At = transpose(asFloat32(m.loraA)); // (V, R): row v is what id v contributes before B
    const lora = mul(linear(embedding(ids, At), asFloat32(m.loraB)), c.scaling);
    y = add(y, lora);
  }
  return y;
}
