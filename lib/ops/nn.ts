// The neural-network ops with their own kernels: layer and RMS normalisation, embedding lookup,
// dropout and rotary position embedding (attention: ./attention). Each records a backward
// written from the math (the kernels' backward entries); nothing here keeps state.
import { checkOptions, expectBoolean, expectInteger, expectNumber, LoraError } from '../errors';
import { native } from '../native';
import { defaultRng } from '../random';
import { empty, expectTensor, isGradEnabled, record, saveFor, shapeString, Tensor, zeros } from '../tensor';
import { mul } from './elementwise';
import { floatOnly, sameDevice } from './util';

function checkAffine(op: string, x: Tensor, t: Tensor | null, name: string, C: number): void {
  if (t === null) return;
  expectTensor(name, t);
  floatOnly(op, t);
  sameDevice(op, x, t);
  if (t.ndim !== 1 || t.shape[0] !== C)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${name} of shape [${C}] for ${op}() but received ${shapeString(t.shape)}`);
}

/**
 * Layer normalisation over the last dim: (x - mean)/sqrt(var + eps)·weight + bias (biased
 * variance, like PyTorch). weight and bias may be null.
 * @example layerNorm(x, gamma, beta, 1e-5)
 * @throws ERR_LORA_SHAPE when weight/bias are not [C] for x of shape [..., C].
 */
export function layerNorm(x: Tensor, weight: Tensor | null = null, bias: Tensor | null = null, eps = 1e-5): Tensor {
  expectTensor('x', x);
  floatOnly('layerNorm', x);
  if (x.ndim < 1) throw new LoraError('ERR_LORA_SHAPE', 'Expected a tensor with at least 1 dim for layerNorm() but received a scalar');
  const C = x.shape[x.ndim - 1]!;
  checkAffine('layerNorm', x, weight, 'weight', C);
  checkAffine('layerNorm', x, bias, 'bias', C);
  expectNumber('eps', eps, 0, Infinity, 'a finite number >= 0');
  const N = C === 0 ? 0 : x.size / C;
  const y = empty(x.shape, x.device);
  const mu = empty([N], x.device);
  const rstd = empty([N], x.device);
  if (y.size > 0) native.layerNorm(y._storage, mu._storage, rstd._storage, x._storage, weight?._storage ?? null, bias?._storage ?? null, N, C, eps);
  const inputs = [x, ...(weight ? [weight] : []), ...(bias ? [bias] : [])];
  const out = record(y, {
    name: 'layerNorm', inputs,
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      const dw = weight && weight.requiresGrad ? zeros([C], { device: x.device }) : null;
      const db = bias && bias.requiresGrad ? zeros([C], { device: x.device }) : null;
      if (dx.size > 0)
        native.layerNormBackward(dx._storage, dw?._storage ?? null, db?._storage ?? null, g._storage, x._live('input of layerNorm'),
          weight ? weight._live('weight') : null, mu._live('saved mean'), rstd._live('saved rstd'), N, C);
      return [x.requiresGrad ? dx : (dx.dispose(), null), ...(weight ? [dw] : []), ...(bias ? [db] : [])];
    },
  });
  return saveFor(out, mu, rstd);
}

export interface RmsNormOptions {
  /**
   * Added to the weight inside the kernel: y = x/rms(x)·(weightOffset + weight). 1 gives Gemma's
   * (1 + w) norms without rewriting the stored weight; default 0. Unused when weight is null.
   */
  weightOffset?: number;
}

/**
 * RMS normalisation over the last dim: x / sqrt(mean(x²) + eps)·(weightOffset + weight) (weight
 * may be null: no scale).
 * @example rmsNorm(x, gamma, 1e-6); rmsNorm(x, gemmaWeight, 1e-6, { weightOffset: 1 })
 * @throws ERR_LORA_SHAPE when weight is not [C] for x of shape [..., C]; LoraTypeError /
 *   LoraRangeError for eps or weightOffset.
 */
export function rmsNorm(x: Tensor, weight: Tensor | null = null, eps = 1e-6, options?: RmsNormOptions): Tensor {
  const o = checkOptions<RmsNormOptions>('rmsNorm()', options, ['weightOffset']);
  expectTensor('x', x);
  floatOnly('rmsNorm', x);
  if (x.ndim < 1) throw new LoraError('ERR_LORA_SHAPE', 'Expected a tensor with at least 1 dim for rmsNorm() but received a scalar');
  const C = x.shape[x.ndim - 1]!;
  checkAffine('rmsNorm', x, weight, 'weight', C);
  expectNumber('eps', eps, 0, Infinity, 'a finite number >= 0');
  const offset = o.weightOffset === undefined ? 0 : expectNumber('weightOffset', o.weightOffset);
  const N = C === 0 ? 0 : x.size / C;
  const y = empty(x.shape, x.device);
  const rstd = empty([N], x.device);
  if (y.size > 0) native.rmsNorm(y._storage, rstd._storage, x._storage, weight?._storage ?? null, N, C, eps, offset);
  const out = record(y, {
    name: 'rmsNorm', inputs: weight ? [x, weight] : [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      const dw = weight && weight.requiresGrad ? zeros([C], { device: x.device }) : null;
      if (dx.size > 0)
        native.rmsNormBackward(dx._storage, dw?._storage ?? null, g._storage, x._live('input of rmsNorm'),
          weight ? weight._live('weight') : null, rstd._live('saved rstd'), N, C, offset);
      return weight ? [x.requiresGrad ? dx : (dx.dispose(), null), dw] : [dx];
    },
  });
  return saveFor(out, rstd);
}

/**
 * Rows of a table (V, C) picked by int32 ids of any shape: out has shape [...ids.shape, C],
 * float32. The table may be float32, or bfloat16 / float16 (a frozen table, e.g. a model loaded
 * in that dtype, read as stored and widened row by row). The gradient of a float32 table scatters
 * back into it (repeated ids add up).
 * @example embedding(tokenIds, weight)
 * @throws ERR_LORA_DTYPE when ids are not int32, the table is int32, or a bfloat16/float16 table
 *   requires a gradient; LoraRangeError for an id outside [0, V).
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  expectTensor('ids', ids);
  expectTensor('table', table);
  if (table.dtype === 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 table for embedding() but received ${table.dtype}`);
  if (table.dtype !== 'float32' && table.requiresGrad && isGradEnabled())
    throw new LoraError('ERR_LORA_DTYPE', `Expected a float32 table for embedding() with a gradient but received a ${table.dtype} table that requires one (train a float32 copy: table.toDtype('float32'))`);
  sameDevice('embedding', ids, table);
  if (ids.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected int32 ids for embedding() but received ${ids.dtype} (create them with { dtype: 'int32' })`);
  if (table.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D table [V, C] for embedding() but received ${shapeString(table.shape)}`);
  const [V, C] = table.shape as [number, number];
  const N = ids.size;
  const out = empty([...ids.shape, C], table.device);
  try {
    if (out.size > 0) native.embedding(out._storage, table._storage, ids._storage, N, V, C);
  } catch (err) {
    out.dispose();
    throw err;
  }
  return record(out, {
    name: 'embedding', inputs: [table],
    backward: (g) => {
      const d = zeros(table.shape, { device: table.device });
      if (g.size > 0) native.embeddingBackward(d._storage, g._storage, ids._live('ids of embedding'), N, V, C);
      return [d];
    },
  });
}

export interface DropoutOptions {
  /** Apply dropout (true, the default) or pass x through (evaluation). */
  training?: boolean;
  /** Seed of the counter RNG; default: drawn from the global generator (manualSeed). */
  seed?: number;
}

/**
 * Zeroes each element with probability p and scales the rest by 1/(1-p) (inverted dropout),
 * with the mask from the counter RNG (the same mask on CPU and CUDA for the same seed).
 * @example dropout(h, 0.1, { training: model.training })
 * @throws LoraRangeError for p outside [0, 1).
 */
export function dropout(x: Tensor, p: number, options?: DropoutOptions): Tensor {
  const o = checkOptions<DropoutOptions>('dropout()', options, ['training', 'seed']);
  expectTensor('x', x);
  floatOnly('dropout', x);
  expectNumber('p', p, 0, 1, 'a number in [0, 1)');
  if (p >= 1) throw new LoraError('ERR_LORA_RANGE', `Expected a number in [0, 1) for p but received ${p} (number)`);
  const training = o.training === undefined ? true : expectBoolean('training', o.training);
  if (!training || p === 0) return mul(x, 1);
  const seed = o.seed === undefined ? defaultRng().seed() : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  const out = empty(x.shape, x.device);
  if (out.size > 0) native.dropout(out._storage, x._storage, p, seed);
  return record(out, {
    name: 'dropout', inputs: [x],
    backward: (g) => {
      const d = empty(g.shape, g.device);
      if (d.size > 0) native.dropout(d._storage, g._storage, p, seed);
      return [d];
    },
  });
}

export interface RopeOptions {
  /** transformers' attention_scaling: cos and sin are multiplied by it. Default 1. */
  attentionScaling?: number;
}

/**
 * Rotary position embedding as transformers' `apply_rotary_pos_emb` with `rotate_half`: in each
 * head, the pairs (i, i + R/2) of the first R = 2·invFreq.length features are rotated by
 * θ = position·invFreq[i] (computed in float32, as transformers does), cos and sin scaled by
 * attentionScaling; features R.. pass through (partial rotary, as Phi-3 and GPT-NeoX). x is
 * [batch, seq, heads, headDim], the layout attention() takes; positions are int32
 * [batch, seq], one per token (left-padded batches, cached decoding); invFreq is float32 [R/2],
 * computed by the caller (so any RoPE scaling — linear, dynamic, llama3 — is a choice of
 * invFreq). The backward rotates by -θ. positions and invFreq get no gradient.
 *
 * @example
 * const D = 64;
 * const invFreq = tensor(Array.from({ length: D / 2 }, (_, i) => 10000 ** (-2 * i / D)), [D / 2]);
 * const positions = tensor([0, 1, 2, 3], [1, 4], { dtype: 'int32' });
 * const qRot = rope(q, positions, invFreq);   // q: [1, 4, heads, 64]
 * @throws ERR_LORA_SHAPE when x is not 4-D, positions not [batch, seq] or 2·invFreq.length > headDim;
 *   ERR_LORA_DTYPE when positions are not int32 or x / invFreq not float32; ERR_LORA_DEVICE
 *   across devices; LoraTypeError / LoraRangeError for attentionScaling.
 */
export function rope(x: Tensor, positions: Tensor, invFreq: Tensor, options?: RopeOptions): Tensor {
  const o = checkOptions<RopeOptions>('rope()', options, ['attentionScaling']);
  expectTensor('x', x);
  expectTensor('positions', positions);
  expectTensor('invFreq', invFreq);
  floatOnly('rope', x, invFreq);
  sameDevice('rope', x, positions, invFreq);
  if (positions.dtype !== 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected int32 positions for rope() but received ${positions.dtype} (create them with { dtype: 'int32' })`);
  if (x.ndim !== 4)
    throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [batch, seq, heads, headDim] for rope() but received ${shapeString(x.shape)}`);
  const [Bt, T, H, D] = x.shape as [number, number, number, number];
  if (positions.ndim !== 2 || positions.shape[0] !== Bt || positions.shape[1] !== T)
    throw new LoraError('ERR_LORA_SHAPE', `Expected positions of shape [${Bt}, ${T}] for x of shape ${shapeString(x.shape)} but received ${shapeString(positions.shape)}`);
  if (invFreq.ndim !== 1 || 2 * invFreq.size > D)
    throw new LoraError('ERR_LORA_SHAPE', `Expected invFreq of shape [n] with 2·n <= ${D} (the rotary dim, at most headDim) but received ${shapeString(invFreq.shape)}`);
  const R = 2 * invFreq.size;
  const a = o.attentionScaling === undefined ? 1 : expectNumber('attentionScaling', o.attentionScaling);
  const y = empty(x.shape, x.device);
  if (y.size > 0) native.rope(y._storage, x._storage, positions._storage, invFreq._storage, Bt, T, H, D, R, a);
  return record(y, {
    name: 'rope', inputs: [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      if (dx.size > 0)
        native.ropeBackward(dx._storage, g._storage, positions._live('positions of rope'), invFreq._live('invFreq of rope'), Bt, T, H, D, R, a);
      return [dx];
    },
  });
}
