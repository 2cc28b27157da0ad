// The losses: cross-entropy (its own kernel, with ignore index and label smoothing) and mean
// squared error (composed from elementwise ops).
import { checkOptions, expectInteger, expectNumber, expectOneOf, LoraError } from '../errors';
import { BINARY_OP, native, REDUCE_OP } from '../native';
import { empty, expectTensor, record, saveFor, shapeString, Tensor } from '../tensor';
import { square, sub } from './elementwise';
import { mean as meanOp, sum as sumOp } from './reduce';
import { floatOnly, sameDevice } from './util';

export type Reduction = 'mean' | 'sum' | 'none';

export interface CrossEntropyOptions {
  /** Targets equal to this are skipped (no loss, no gradient, not counted in the mean). Default -100. */
  ignoreIndex?: number;
  /** ε in [0, 1]: the target distribution is (1-ε)·onehot + ε/V, as in PyTorch. Default 0. */
  labelSmoothing?: number;
  /** 'mean' over non-ignored rows (default), 'sum', or 'none' (one loss per row). */
  reduction?: Reduction;
}

/** Reads int32 targets to the host (to count rows that are not ignored). */
function countNotIgnored(targets: Tensor, ignoreIndex: number): number {
  const data = new Int32Array(native.toHost(targets._live('targets')));
  let c = 0;
  for (const t of data) if (t !== ignoreIndex) c++;
  return c;
}

/**
 * Cross-entropy between logits (..., V) and int32 class indices (...), with an ignore index and
 * label smoothing. The default 'mean' divides by the number of rows not ignored (NaN when every
 * row is ignored, like PyTorch).
 *
 * @example
 * const loss = crossEntropy(logits, targets, { ignoreIndex: -100, labelSmoothing: 0.1 });
 * @throws ERR_LORA_SHAPE when targets' shape is not logits' shape without its last dim;
 *   ERR_LORA_DTYPE when targets are not int32; LoraRangeError for a target outside [0, V)
 *   other than ignoreIndex.
 */
export function crossEntropy(logits: Tensor, targets: Tensor, options?: CrossEntropyOptions): Tensor {
  const o = checkOptions<CrossEntropyOptions>('crossEntropy()', options, ['ignoreIndex', 'labelSmoothing', 'reduction']);
  expectTensor('logits', logits);
  expectTensor('targets', targets);
  floatOnly('crossEntropy', logits);
  sameDevice('crossEntropy', logits, targets);
  if (targets.dtype !== 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected int32 targets for crossEntropy() but received ${targets.dtype} (create them with { dtype: 'int32' })`);
  if (logits.ndim < 1 || targets.ndim !== logits.ndim - 1 || targets.shape.some((d, i) => d !== logits.shape[i]))
    throw new LoraError('ERR_LORA_SHAPE', `Expected targets of shape ${shapeString(logits.shape.slice(0, -1))} for logits of shape ${shapeString(logits.shape)} but received ${shapeString(targets.shape)}`);
  const ignoreIndex = o.ignoreIndex === undefined ? -100 : expectInteger('ignoreIndex', o.ignoreIndex, -(2 ** 31), 2 ** 31 - 1);
  const eps = o.labelSmoothing === undefined ? 0 : expectNumber('labelSmoothing', o.labelSmoothing, 0, 1);
  const reduction = o.reduction === undefined ? 'mean' : expectOneOf('reduction', o.reduction, ['mean', 'sum', 'none'] as const);
  const V = logits.shape[logits.ndim - 1]!;
  const N = targets.size;
  if (V === 0 && N > 0) throw new LoraError('ERR_LORA_SHAPE', 'Expected at least one class for crossEntropy() but logits have a last dim of 0');
  const rowLoss = empty(targets.shape, logits.device);
  const lse = empty([N], logits.device);
  try {
    if (N > 0) native.crossEntropy(rowLoss._storage, lse._storage, logits._storage, targets._storage, N, V, ignoreIndex, eps);
  } catch (err) {
    rowLoss.dispose();
    lse.dispose();
    throw err;
  }
  const backwardRows = (dloss: Tensor): Tensor => {
    const d = empty(logits.shape, logits.device);
    if (N > 0)
      native.crossEntropyBackward(d._storage, dloss._storage, logits._live('logits of crossEntropy'), lse._live('saved log-sum-exp'),
        targets._live('targets of crossEntropy'), N, V, ignoreIndex, eps);
    return d;
  };
  if (reduction === 'none') {
    const out = record(rowLoss, { name: 'crossEntropy', inputs: [logits], backward: (g) => [backwardRows(g)] });
    return saveFor(out, lse);
  }
  const scale = reduction === 'sum' ? 1 : 1 / countNotIgnored(targets, ignoreIndex);
  const out = empty([], logits.device);
  native.reduce(REDUCE_OP.sum, out._storage, rowLoss._storage, 1, N, 1);
  if (reduction === 'mean') native.binaryScalar(BINARY_OP.mul, out._storage, out._storage, scale, false);
  rowLoss.dispose();
  const res = record(out, {
    name: 'crossEntropy', inputs: [logits],
    backward: (g) => {
      // dloss[n] = g·scale for every row (ignored rows get zero from the kernel)
      const dloss = empty([N], g.device);
      if (N > 0) {
        native.copyStrided(dloss._storage, 0, [1], g._storage, 0, [0], [N]);
        if (scale !== 1) native.binaryScalar(BINARY_OP.mul, dloss._storage, dloss._storage, scale, false);
      }
      const d = backwardRows(dloss);
      dloss.dispose();
      return [d];
    },
  });
  return saveFor(res, lse);
}

export interface MseOptions {
  /** 'mean' (default), 'sum' or 'none'. */
  reduction?: Reduction;
}

/**
 * Mean squared error: mean((input - target)²) (or the sum, or elementwise). Shapes broadcast.
 * @example mse(pred, target)
 */
export function mse(input: Tensor, target: Tensor, options?: MseOptions): Tensor {
  const o = checkOptions<MseOptions>('mse()', options, ['reduction']);
  const reduction = o.reduction === undefined ? 'mean' : expectOneOf('reduction', o.reduction, ['mean', 'sum', 'none'] as const);
  const d = sub(input, target);
  const sq = square(d);
  if (reduction === 'none') return saveFor(sq, d); // square's backward reads d
  const r = reduction === 'mean' ? meanOp(sq) : sumOp(sq);
  return saveFor(r, d, sq);
}
