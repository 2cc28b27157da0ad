// The matrix products: matmul (NumPy semantics, batched) and linear (x·Wᵀ + b, the frozen base of a
// LoRA layer and the Linear module's op; a bf16 weight is read as stored where the backend can).
import { checkOptions, LoraError } from '../errors';
import { native, REDUCE_OP } from '../native';
import { empty, expectTensor, numelOf, record, sameShape, saveFor, shapeString, Tensor, unreadMode, zeros } from '../tensor';
import { reshape } from './shape';
import { expectMatmulPrecision, floatOnly, gemmWeight, MatmulPrecision, sameDevice, sumTo } from './util';

export type { MatmulPrecision } from './util';

export interface LinearOpOptions {
  /**
   * Products with a bfloat16 weight: 'fp32' (default, the input multiplied as it is) or 'bf16'
   * (the input rounded to bf16 for a bf16 dot product where the CPU has one; see MatmulPrecision).
   * Applies to y = x·Wᵀ and to the gradient of x, dy·W; the weight's gradient stays fp32.
   */
  matmulPrecision?: MatmulPrecision;
}

/**
 * Matrix product with NumPy semantics: (..., M, K) @ (K, N) or batched (..., M, K) @ (..., K, N)
 * with equal batch dims (or one side 2-D); 1-D operands are treated as a row / column vector.
 * @throws ERR_LORA_SHAPE when inner dims differ or batch dims do not match.
 */
export function matmul(a: Tensor, b: Tensor): Tensor {
  expectTensor('a', a);
  expectTensor('b', b);
  sameDevice('matmul', a, b);
  floatOnly('matmul', a, b);
  if (a.ndim === 0 || b.ndim === 0) throw new LoraError('ERR_LORA_SHAPE', `Expected tensors with at least 1 dim for matmul() but received ${shapeString(a.shape)} and ${shapeString(b.shape)}`);
  if (a.ndim === 1) {
    const a2 = reshape(a, [1, a.shape[0]!]);
    let r: Tensor;
    try {
      r = matmul(a2, b);
    } catch (err) {
      a2.dispose(); // a view, but it holds its own reference to a's memory
      throw err;
    }
    const out = reshape(r, r.shape.filter((_, i) => i !== r.ndim - 2));
    r.dispose(); // its GradNode stays in the graph; its values are not needed
    return saveFor(out, a2);
  }
  if (b.ndim === 1) {
    const b2 = reshape(b, [b.shape[0]!, 1]);
    let r: Tensor;
    try {
      r = matmul(a, b2);
    } catch (err) {
      b2.dispose();
      throw err;
    }
    const out = reshape(r, r.shape.slice(0, -1));
    r.dispose(); // its GradNode stays in the graph; its values are not needed
    return saveFor(out, b2);
  }
  const M = a.shape[a.ndim - 2]!;
  const K = a.shape[a.ndim - 1]!;
  const K2 = b.shape[b.ndim - 2]!;
  const N = b.shape[b.ndim - 1]!;
  if (K !== K2)
    throw new LoraError('ERR_LORA_SHAPE', `Expected a.shape[-1] == b.shape[-2] for matmul() but received ${shapeString(a.shape)} and ${shapeString(b.shape)}`);
  const aBatch = a.shape.slice(0, -2);
  const bBatch = b.shape.slice(0, -2);
  if (aBatch.length !== 0 && bBatch.length !== 0 && !sameShape(aBatch, bBatch))
    throw new LoraError('ERR_LORA_SHAPE', `Expected equal batch dims for matmul() but received ${shapeString(a.shape)} and ${shapeString(b.shape)}`);
  // A 2-D b folds a's batch dims into the rows (one GEMM); else one GEMM per batch entry, a 2-D a
  // broadcast over them (stride 0).
  const fold = bBatch.length === 0;
  const rows = fold ? numelOf(aBatch) * M : M;
  const batch = fold ? 1 : numelOf(bBatch);
  const sa = fold || aBatch.length === 0 ? 0 : M * K;
  const out = empty([...(fold ? aBatch : bBatch), M, N], a.device);
  if (out.size > 0) native.gemm(out._storage, a._storage, b._storage, rows, N, K, false, false, K, N, N, 1, 0, batch, sa, K * N, rows * N);
  return record(out, {
    name: 'matmul', inputs: [a, b],
    backward: (g) => {
      let ga: Tensor | null = null;
      let gb: Tensor | null = null;
      if (a.requiresGrad) {
        // da = g·bᵀ per batch entry, summed over the batch where a was broadcast
        const full = empty(fold ? a.shape : [...bBatch, M, K], a.device);
        if (full.size > 0) native.gemm(full._storage, g._storage, b._storage, rows, K, N, false, true, N, N, K, 1, 0, batch, rows * N, K * N, rows * K);
        ga = fold ? full : sumTo(full, a.shape);
        if (ga !== full) full.dispose();
      }
      if (b.requiresGrad) {
        // db = aᵀ·g (zero when there are no rows to sum over)
        gb = empty(b.shape, b.device);
        if (gb.size > 0) {
          if (rows === 0) native.fill(gb._storage, 0);
          else native.gemm(gb._storage, a._storage, g._storage, K, N, rows, true, false, K, N, N, 1, 0, batch, sa, rows * N, K * N);
        }
      }
      return [ga, gb];
    },
  });
}

/**
 * y = x·Wᵀ + b for x (..., inFeatures), weight (outFeatures, inFeatures), bias (outFeatures) or
 * null: the frozen base of a LoRA layer and the Linear module's op. A bfloat16 weight is read as
 * stored (no fp32 copy) where the backend can: products and sums stay fp32, unless
 * `matmulPrecision: 'bf16'` lets the input be rounded to bf16 for a bf16 dot product (fp32
 * accumulation, each output within 2^-8·Σ|x·w|; avx512_bf16 CPUs, from 64 rows on and on 4..16 rows of x·Wᵀ). A float16
 * weight is widened to fp32 for each product (no kernel reads float16 in place yet).
 *
 * @example
 * const y = linear(x, W, b);
 * const fast = linear(x, Wbf16, null, { matmulPrecision: 'bf16' });
 * @throws ERR_LORA_SHAPE for a weight that is not 2-D, x not [..., inFeatures] or bias not
 *   [outFeatures]; ERR_LORA_DTYPE for non-float32 x or bias or an int32 weight; ERR_LORA_DEVICE
 *   for tensors on several devices; ERR_LORA_RANGE for a matmulPrecision other than 'fp32' or
 *   'bf16' (did-you-mean), ERR_LORA_OPTION for an unknown option.
 */
export function linear(x: Tensor, weight: Tensor, bias: Tensor | null = null, options?: LinearOpOptions): Tensor {
  const precision = expectMatmulPrecision('matmulPrecision', checkOptions<LinearOpOptions>('linear()', options, ['matmulPrecision']).matmulPrecision);
  expectTensor('x', x);
  expectTensor('weight', weight);
  if (bias !== null) expectTensor('bias', bias);
  const ts = bias ? [x, weight, bias] : [x, weight];
  sameDevice('linear', ...ts);
  floatOnly('linear', x, ...(bias ? [bias] : []));
  if (weight.dtype === 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 weight for linear() but received ${weight.dtype}`);
  if (weight.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D weight (outFeatures, inFeatures) but received ${shapeString(weight.shape)}`);
  const [OC, C] = weight.shape as [number, number];
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== C)
    throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [..., ${C}] for linear() but received ${shapeString(x.shape)}`);
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== OC))
    throw new LoraError('ERR_LORA_SHAPE', `Expected bias of shape [${OC}] but received ${shapeString(bias.shape)}`);
  const N = numelOf(x.shape.slice(0, -1));
  // in a checkpoint()'s recomputation of an output nothing reads (unreadOutput): zeros, no product
  const skip = unreadMode() === 'skip';
  const out = skip ? zeros([...x.shape.slice(0, -1), OC], { device: x.device }) : empty([...x.shape.slice(0, -1), OC], x.device);
  if (out.size > 0 && !skip) {
    if (bias) native.copyStrided(out._storage, 0, [OC, 1], bias._storage, 0, [0, 1], [N, OC]);
    gemmWeight(out, x, weight, N, OC, C, true, C, C, OC, bias !== null, precision);
  }
  return record(out, {
    name: 'linear', inputs: ts,
    backward: (g) => {
      let gx: Tensor | null = null;
      let gw: Tensor | null = null;
      let gb: Tensor | null = null;
      if (x.requiresGrad) {
        gx = empty(x.shape, x.device);
        if (gx.size > 0) gemmWeight(gx, g, weight, N, C, OC, false, OC, C, C, false, precision);
      }
      if (weight.requiresGrad) {
        gw = empty(weight.shape, weight.device);
        if (N === 0) native.fill(gw._storage, 0);
        else if (gw.size > 0) native.gemm(gw._storage, g._storage, x._storage, OC, C, N, true, false, OC, C, C, 1, 0, 1, 0, 0, 0);
      }
      if (bias && bias.requiresGrad) {
        gb = empty([OC], g.device);
        native.reduce(REDUCE_OP.sum, gb._storage, g._storage, 1, N, OC);
      }
      return bias ? [gx, gw, gb] : [gx, gw];
    },
  });
}
