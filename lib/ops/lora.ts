// The LoRA op: a frozen linear layer plus a low-rank update in one native kernel each way,
//   y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ      (forward: lora_forward)
//   dB = s·dyᵀ·h;  dh = s·dy·B;  dA = dhᵀ·x̃;  dx = dy·W + dropout'(dh·A)   (backward: lora_backward)
// with h = x̃·Aᵀ kept from the forward. LoraLinear and LoraModel's adapted modules both run it.
// Sizes: inFeatures = C, outFeatures = OC, rank = R, N = rows of x.
import { checkOptions, expectInteger, expectNumber, LoraError } from '../errors';
import { native, NativeStorage } from '../native';
import { defaultRng } from '../random';
import { empty, expectTensor, record, saveFor, shapeString, Tensor, unreadKeep, unreadMode, unreadTake, zeros } from '../tensor';
import { lastDim, sameDevice } from './util';

export interface LoraOpOptions {
  /** Dropout probability on the LoRA path only, in [0, 1); default 0. */
  dropout?: number;
  /** Seed of the dropout mask; default: drawn from the global generator when dropout > 0. */
  seed?: number;
}

/**
 * The fused LoRA layer: y = x·Wᵀ + b + scaling·dropout(x)·Aᵀ·Bᵀ for x of shape [..., inFeatures],
 * weight [outFeatures, inFeatures] (frozen; float32 or bfloat16 read in place, float16 widened to
 * float32 for each kernel call), bias [outFeatures] or null
 * (frozen), loraA [rank, inFeatures] and loraB [outFeatures, rank]. One native kernel forward and
 * one backward; gradients flow to x, loraA and loraB.
 *
 * @example
 * const y = loraLinear(x, W, null, A, B, alpha / rank, { dropout: 0.05, seed: 7 });
 * @throws ERR_LORA_SHAPE for shapes that do not fit together; ERR_LORA_DTYPE for an int32 weight
 *   or other tensors not float32; ERR_LORA_DEVICE across devices;
 *   ERR_LORA_GRAD when weight or bias requires a gradient (they are frozen here);
 *   LoraRangeError for dropout outside [0, 1).
 */
export function loraLinear(x: Tensor, weight: Tensor, bias: Tensor | null, loraA: Tensor, loraB: Tensor, scaling: number,
  options?: LoraOpOptions): Tensor {
  const o = checkOptions<LoraOpOptions>('loraLinear()', options, ['dropout', 'seed']);
  for (const [name, t] of [['x', x], ['weight', weight], ['loraA', loraA], ['loraB', loraB]] as const) expectTensor(name, t)._live(name);
  if (bias !== null) expectTensor('bias', bias)._live('bias');
  const s = expectNumber('scaling', scaling);
  const p = o.dropout === undefined ? 0 : expectNumber('dropout', o.dropout, 0, 1, 'a number in [0, 1)');
  if (p >= 1) throw new LoraError('ERR_LORA_RANGE', `Expected a number in [0, 1) for dropout but received ${p} (number)`);
  const seed = p === 0 ? 0 : o.seed === undefined ? defaultRng().seed() : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  sameDevice('loraLinear', x, weight, loraA, loraB, ...(bias ? [bias] : []));
  if (weight.dtype === 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 weight for loraLinear() but received ${weight.dtype}`);
  for (const [name, t] of [['x', x], ['loraA', loraA], ['loraB', loraB], ['bias', bias]] as const)
    if (t && t.dtype !== 'float32') throw new LoraError('ERR_LORA_DTYPE', `Expected a float32 ${name} for loraLinear() but received ${t.dtype}`);
  if (weight.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D weight (outFeatures, inFeatures) but received ${shapeString(weight.shape)}`);
  const [OC, C] = weight.shape as [number, number];
  const R = loraA.shape[0] ?? 0;
  if (loraA.ndim !== 2 || loraA.shape[1] !== C || loraB.ndim !== 2 || loraB.shape[0] !== OC || loraB.shape[1] !== R)
    throw new LoraError('ERR_LORA_SHAPE', `Expected loraA [rank, ${C}] and loraB [${OC}, rank] for a weight of shape ${shapeString(weight.shape)} but received ${shapeString(loraA.shape)} and ${shapeString(loraB.shape)}`);
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== OC))
    throw new LoraError('ERR_LORA_SHAPE', `Expected bias of shape [${OC}] but received ${shapeString(bias.shape)}`);
  lastDim('loraLinear', x, C, 'x');
  for (const [name, t] of [['weight', weight], ['bias', bias]] as const)
    if (t?.requiresGrad)
      throw new LoraError('ERR_LORA_GRAD', `Expected a frozen ${name} for loraLinear() (requiresGrad false): its gradient is not computed; use linear() for a trainable layer`);

  const N = x.size / C;
  // in a checkpoint()'s recomputation of an output nothing reads (unreadOutput), no product: zeros,
  // with the h the first run kept
  const mode = unreadMode();
  const y = mode === 'skip' ? zeros([...x.shape.slice(0, -1), OC], { device: x.device }) : empty([...x.shape.slice(0, -1), OC], x.device);
  const h = mode === 'skip' ? unreadTake() : empty([N, R], x.device);
  if (mode === 'skip' && (h.ndim !== 2 || h.shape[0] !== N || h.shape[1] !== R))
    throw new LoraError('ERR_LORA_STATE', `checkpoint(): the recomputation of a LoRA layer expected its kept h of shape [${N}, ${R}] but found ${shapeString(h.shape)} (the function is not deterministic)`);
  if (mode !== 'skip') {
    withKernelWeight(weight, (w) => native.loraForward(y._storage, h._storage, x._storage, w, bias ? bias._storage : null, loraA._storage,
      loraB._storage, N, C, OC, R, s, p, seed));
  }
  const out = record(y, {
    name: 'lora_forward',
    inputs: [x, loraA, loraB],
    backward: (g) => {
      const dx = x.requiresGrad ? empty(x.shape, x.device) : null;
      const dA = loraA.requiresGrad ? zeros(loraA.shape, { device: loraA.device }) : null;
      const dB = loraB.requiresGrad ? zeros(loraB.shape, { device: loraB.device }) : null;
      withKernelWeight(weight, (w) => native.loraBackward(dx ? dx._storage : null, dA ? dA._storage : null, dB ? dB._storage : null,
        g._storage, x._live('the input of a LoRA layer'), h._live('saved activations'), w, loraA._live('loraA'), loraB._live('loraB'),
        N, C, OC, R, s, p, seed));
      return [dx, dA, dB];
    },
  });
  if (mode === 'keep') unreadKeep(h); // checkpoint()'s first run: h for the recomputation
  return mode === null ? saveFor(out, h) : out; // 'skip': h belongs to the checkpoint
}

/**
 * Calls a kernel with the storage of a frozen weight it can read: the weight itself (float32,
 * bfloat16) or, for float16, a float32 copy made for this call.
 */
function withKernelWeight(W: Tensor, fn: (w: NativeStorage) => void): void {
  if (W.dtype !== 'float16') {
    fn(W._live('weight'));
    return;
  }
  const wide = W.toDtype('float32');
  try {
    fn(wide._storage);
  } finally {
    wide.dispose();
  }
}
