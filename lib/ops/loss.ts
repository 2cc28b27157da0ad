// The losses: cross-entropy (its own kernel, with ignore index and label smoothing), the same
// after a linear head in row chunks (linearCrossEntropy: the logits are never all in memory) and
// mean squared error (composed from elementwise ops).
import { checkOptions, expectInteger, expectNumber, expectOneOf, LoraError, rangeError } from '../errors';
import { BINARY_OP, native, REDUCE_OP } from '../native';
import { empty, expectTensor, isGradEnabled, numelOf, record, saveFor, shapeString, Tensor, tensor } from '../tensor';
import { square, sub } from './elementwise';
import { mean as meanOp, sum as sumOp } from './reduce';
import { expectMatmulPrecision, floatOnly, gemmReadable, MatmulPrecision, sameDevice } from './util';

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

export interface LinearCrossEntropyOptions {
  /** The head's bias [V] (float32), or null (default). */
  bias?: Tensor | null;
  /** Targets equal to this are skipped (no logits computed for them). Default -100. */
  ignoreIndex?: number;
  /** ε in [0, 1], as crossEntropy() takes it. Default 0. */
  labelSmoothing?: number;
  /** 'mean' over the rows not ignored (default; NaN when every row is ignored) or 'sum'. */
  reduction?: 'mean' | 'sum';
  /**
   * Most rows whose logits are computed at once. Default: as many as fill at most 128 MB of float32
   * logits (682 rows at vocab 49152, 261 at Llama 3's 128256), the counted rows then split into
   * chunks of equal size (1020 rows: two of 510), at least 1. Fewer rows save memory but cost time:
   * each chunk reads the whole weight twice (head, loss and their backward over 1024 rows on 2
   * threads: vocab 49152 x 576, 128-row chunks 470 ms, 341 400 ms, 512 374 ms, one chunk 355 ms;
   * vocab 128256 x 2048 bf16, 130-row chunks 4.6 s, 256 4.1 s, 512 3.7 s).
   */
  chunkSize?: number;
  /**
   * Products with a bfloat16 weight (the head's logits and the gradient of x): 'fp32' (default)
   * or 'bf16' (x and dlogits rounded to bf16 for a bf16 dot product where the CPU has one; see
   * MatmulPrecision). The softmax, the loss and the weight's gradient stay fp32.
   */
  matmulPrecision?: MatmulPrecision;
}

/** Logits of one chunk fill at most this many floats (128 MB) by default. */
const CHUNK_ELEMENTS = 1 << 25;

/**
 * `crossEntropy(linear(x, weight, bias), targets)` without the logits: rows go through the head in
 * chunks, each chunk's logits [chunk, V] live only while its loss (and, when a gradient will be
 * needed, its dlogits, computed in place, and their products) is computed, so memory holds one
 * chunk-sized buffer instead of the [N, V] logits and their gradient. Rows whose target is ignoreIndex are skipped.
 * When the loss records a gradient, the gradients of x, weight and bias are computed in the same
 * pass (the softmax is at hand then) and kept with the loss until backward() scales them by the
 * incoming gradient: the head costs two products per row, as the unfused forward and backward do,
 * not three. Only 'mean' and 'sum' reductions (a scalar); use crossEntropy() for per-row losses.
 * x is float32 (..., C); weight (V, C) float32, bfloat16 (read in place where the backend can) or
 * float16 (widened once per call).
 *
 * @example
 * const loss = linearCrossEntropy(hidden, model.getModule('lm_head').weight, targets); loss.backward();
 * @throws ERR_LORA_SHAPE when weight is not 2-D (V, C), x not [..., C], targets not x's shape
 *   without its last dim or bias not [V]; ERR_LORA_DTYPE for non-float32 x or bias, an int32
 *   weight or non-int32 targets; ERR_LORA_DEVICE for tensors on several devices; LoraRangeError
 *   for a target outside [0, V) other than ignoreIndex, or a bad option (did-you-mean for names
 *   and for matmulPrecision's values).
 */
export function linearCrossEntropy(x: Tensor, weight: Tensor, targets: Tensor, options?: LinearCrossEntropyOptions): Tensor {
  const o = checkOptions<LinearCrossEntropyOptions>('linearCrossEntropy()', options, ['bias', 'ignoreIndex', 'labelSmoothing', 'reduction', 'chunkSize', 'matmulPrecision']);
  const precision = expectMatmulPrecision('matmulPrecision', o.matmulPrecision);
  expectTensor('x', x);
  expectTensor('weight', weight);
  expectTensor('targets', targets);
  const bias = o.bias ?? null;
  if (bias !== null) expectTensor('bias', bias);
  const ts = bias ? [x, weight, bias] : [x, weight];
  sameDevice('linearCrossEntropy', ...ts, targets);
  floatOnly('linearCrossEntropy', x, ...(bias ? [bias] : []));
  if (weight.dtype === 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 weight for linearCrossEntropy() but received ${weight.dtype}`);
  if (weight.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D weight (vocab, inFeatures) for linearCrossEntropy() but received ${shapeString(weight.shape)}`);
  const [V, C] = weight.shape as [number, number];
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== C)
    throw new LoraError('ERR_LORA_SHAPE', `Expected x of shape [..., ${C}] for linearCrossEntropy() but received ${shapeString(x.shape)}`);
  if (bias && (bias.ndim !== 1 || bias.shape[0] !== V))
    throw new LoraError('ERR_LORA_SHAPE', `Expected bias of shape [${V}] for linearCrossEntropy() but received ${shapeString(bias.shape)}`);
  if (targets.dtype !== 'int32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected int32 targets for linearCrossEntropy() but received ${targets.dtype} (create them with { dtype: 'int32' })`);
  const rowShape = x.shape.slice(0, -1);
  if (targets.ndim !== rowShape.length || targets.shape.some((d, i) => d !== rowShape[i]))
    throw new LoraError('ERR_LORA_SHAPE', `Expected targets of shape ${shapeString(rowShape)} for x of shape ${shapeString(x.shape)} but received ${shapeString(targets.shape)}`);
  const ignoreIndex = o.ignoreIndex === undefined ? -100 : expectInteger('ignoreIndex', o.ignoreIndex, -(2 ** 31), 2 ** 31 - 1);
  const eps = o.labelSmoothing === undefined ? 0 : expectNumber('labelSmoothing', o.labelSmoothing, 0, 1);
  const reduction = o.reduction === undefined ? 'mean' : expectOneOf('reduction', o.reduction, ['mean', 'sum'] as const);
  const chunkSize = o.chunkSize === undefined ? undefined : expectInteger('chunkSize', o.chunkSize, 1, 2 ** 31 - 1);
  const t = new Int32Array(native.toHost(targets._storage));
  const rows: number[] = [];
  for (let n = 0; n < t.length; n++) {
    const v = t[n]!;
    if (v === ignoreIndex) continue;
    if (v < 0 || v >= V) throw rangeError('targets', `class indices between 0 and ${V - 1} (or ignoreIndex ${ignoreIndex})`, v);
    rows.push(n);
  }
  return headLoss(x, weight, bias, t, rows, { ignoreIndex, eps, reduction, chunkSize: chunkSize ?? defaultChunkRows(rows.length, V), N: numelOf(rowShape), V, C, bf16Dot: precision === 'bf16' });
}

/**
 * linearCrossEntropy()'s rows per chunk without a chunkSize: `count` counted rows in
 * equal chunks of at most CHUNK_ELEMENTS logits (the last chunk as large as the others, not a remainder).
 */
function defaultChunkRows(count: number, V: number): number {
  const most = Math.max(1, Math.floor(CHUNK_ELEMENTS / Math.max(V, 1)));
  return Math.max(1, Math.ceil(count / Math.max(1, Math.ceil(count / most))));
}

interface HeadLossSizes {
  ignoreIndex: number; eps: number; reduction: 'mean' | 'sum'; chunkSize: number; N: number; V: number; C: number;
  bf16Dot: boolean;  // matmulPrecision 'bf16' (the binding ignores it for a float32 weight)
}

// The chunked pass: for each chunk of counted rows, gather their x rows, logits = xc·Wᵀ (+ b),
// the cross-entropy kernel's row losses and log-sum-exps, and when a gradient will be needed,
// dlogits = dloss·(softmax - q) in place of the logits, with dloss = the reduction's scale, then
//   dx[rows] = dlogits·W,  dW += dlogitsᵀ·xc,  db += Σ_rows dlogits.
function headLoss(x: Tensor, weight: Tensor, bias: Tensor | null, t: Int32Array, rows: number[], s: HeadLossSizes): Tensor {
  const { ignoreIndex, eps, reduction, N, V, C, bf16Dot } = s;
  const device = x.device;
  const count = rows.length;
  const grad = isGradEnabled() && (x.requiresGrad || weight.requiresGrad || (bias !== null && bias.requiresGrad));
  const wantX = grad && x.requiresGrad, wantW = grad && weight.requiresGrad, wantB = grad && bias !== null && bias.requiresGrad;
  const scale = reduction === 'sum' ? 1 : 1 / count;
  const chunk = Math.max(1, Math.min(s.chunkSize, count));
  const temps: Tensor[] = [];
  const temp = (shape: number[]): Tensor => {
    const buf = empty(shape, device);
    temps.push(buf);
    return buf;
  };
  const zeroed = (shape: readonly number[]): Tensor => {
    const z = empty(shape, device);
    if (z.size > 0) native.fill(z._storage, 0);
    return z;
  };
  const out = empty([], device);
  const grads: Tensor[] = [];
  const dx = wantX ? zeroed(x.shape) : null;
  const dw = wantW ? zeroed(weight.shape) : null;
  const db = wantB ? zeroed([V]) : null;
  for (const g of [dx, dw, db]) if (g) grads.push(g);
  const w = gemmReadable(weight);
  if (w !== weight) temps.push(w);
  try {
    const lossRows = temp([Math.max(count, 1)]);
    native.fill(lossRows._storage, 0);
    const xc = temp([chunk, C]), logits = temp([chunk, V]), lse = temp([chunk]), rowLoss = temp([chunk]);
    const dlogits = grad ? logits : null; // the kernel writes the gradient over the logits
    const dloss = grad ? temp([chunk]) : null;
    if (dloss) native.fill(dloss._storage, scale);
    const dxc = wantX ? temp([chunk, C]) : null;
    const dbc = wantB ? temp([V]) : null;
    for (let r0 = 0; r0 < count; r0 += chunk) {
      const n = Math.min(chunk, count - r0);
      const idx = rows.slice(r0, r0 + n);
      const ids = tensor(idx, [n], { dtype: 'int32', device });
      const tc = tensor(idx.map((r) => t[r]!), [n], { dtype: 'int32', device });
      temps.push(ids, tc);
      native.embedding(xc._storage, x._storage, ids._storage, n, N, C); // gather the chunk's rows
      if (bias) native.copyStrided(logits._storage, 0, [V, 1], bias._storage, 0, [0, 1], [n, V]);
      native.gemm(logits._storage, xc._storage, w._storage, n, V, C, false, true, C, C, V, 1, bias ? 1 : 0, 1, 0, 0, 0, bf16Dot);
      native.crossEntropy(rowLoss._storage, lse._storage, logits._storage, tc._storage, n, V, ignoreIndex, eps);
      native.copyStrided(lossRows._storage, r0, [1], rowLoss._storage, 0, [1], [n]);
      if (dlogits && dloss) {
        native.crossEntropyBackward(dlogits._storage, dloss._storage, logits._storage, lse._storage, tc._storage, n, V, ignoreIndex, eps);
        if (dx && dxc) {
          native.gemm(dxc._storage, dlogits._storage, w._storage, n, C, V, false, false, V, C, C, 1, 0, 1, 0, 0, 0, bf16Dot);
          native.embeddingBackward(dx._storage, dxc._storage, ids._storage, n, N, C); // scatter (rows are distinct)
        }
        if (dw) native.gemm(dw._storage, dlogits._storage, xc._storage, V, C, n, true, false, V, C, C, 1, 1, 1, 0, 0, 0);
        if (db && dbc) {
          native.reduce(REDUCE_OP.sum, dbc._storage, dlogits._storage, 1, n, V);
          native.binary(BINARY_OP.add, db._storage, db._storage, dbc._storage, [V], [1], [1]);
        }
      }
      ids.dispose();
      tc.dispose();
    }
    native.reduce(REDUCE_OP.sum, out._storage, lossRows._storage, 1, Math.max(count, 1), 1);
    if (reduction === 'mean') native.binaryScalar(BINARY_OP.mul, out._storage, out._storage, scale, false);
  } catch (err) {
    out.dispose();
    for (const g of grads) g.dispose();
    throw err;
  } finally {
    for (const buf of temps) buf.dispose();
  }
  if (!grad) return out;
  const inputs = bias ? [x, weight, bias] : [x, weight];
  const res = record(out, {
    name: 'linearCrossEntropy', inputs,
    backward: (g) => {
      // the gradients were computed for an incoming gradient of 1: scale them by g
      const gv = g.toFloat32Array()[0]!;
      const scaled = (d: Tensor | null): Tensor | null => {
        if (!d) return null;
        const r = empty(d.shape, d.device);
        if (r.size > 0) native.binaryScalar(BINARY_OP.mul, r._storage, d._storage, gv, false);
        return r;
      };
      return bias ? [scaled(dx), scaled(dw), scaled(db)] : [scaled(dx), scaled(dw)];
    },
  });
  return saveFor(res, ...grads);
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
