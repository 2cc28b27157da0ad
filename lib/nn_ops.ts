// The neural-network ops over Tensor: slice, concat, softmax/logSoftmax, gelu, crossEntropy, mse,
// layerNorm, rmsNorm, embedding and dropout (attention: attention.ts). Like ops.ts, each
// validates, runs native kernels (the norms, embedding and cross-entropy have their own) and
// records a GradNode written from the math. Nothing here keeps state.
import { checkOptions, expectBoolean, expectInteger, expectNumber, expectOneOf, LoraError, typeError } from './errors';
import { BINARY_OP, native, NativeStorage, REDUCE_OP } from './native';
import { mul, permute, sub, square, mean as meanOp, sum as sumOp, unary } from './ops';
import { defaultRng } from './random';
import {
  contiguousStrides, empty, expectTensor, record, saveFor, shapeString, Tensor, zeros,
} from './tensor';

type S = NativeStorage;
type OptS = NativeStorage | null;

// The binding functions of native/cpu/nn_kernels.cc, typed here (lib/native.ts describes the
// foundation's functions and leaves the rest open).
interface NnBinding {
  layerNorm(y: S, mean: S, rstd: S, x: S, w: OptS, b: OptS, N: number, C: number, eps: number): void;
  layerNormBackward(dx: S, dw: OptS, db: OptS, dy: S, x: S, w: OptS, mean: S, rstd: S, N: number, C: number): void;
  rmsNorm(y: S, rstd: S, x: S, w: OptS, N: number, C: number, eps: number): void;
  rmsNormBackward(dx: S, dw: OptS, dy: S, x: S, w: OptS, rstd: S, N: number, C: number): void;
  embedding(out: S, table: S, ids: S, N: number, V: number, C: number): void;
  embeddingBackward(dtable: S, dout: S, ids: S, N: number, V: number, C: number): void;
  crossEntropy(loss: S, lse: S, logits: S, targets: S, N: number, V: number, ignoreIndex: number, smoothing: number): void;
  crossEntropyBackward(dlogits: S, dloss: S, logits: S, lse: S, targets: S, N: number, V: number, ignoreIndex: number,
    smoothing: number): void;
}
const nn = native as unknown as NnBinding;

function floatOnly(op: string, ...ts: Tensor[]): void {
  for (const t of ts)
    if (t.dtype !== 'float32')
      throw new LoraError('ERR_LORA_DTYPE', `Expected float32 tensors for ${op}() but received ${t.dtype} (convert with toDtype('float32'))`);
}

function sameDevice(op: string, ...ts: Tensor[]): void {
  const d = ts[0]!.device;
  for (const t of ts)
    if (t.device !== d)
      throw new LoraError('ERR_LORA_DEVICE', `Expected every tensor of ${op}() on one device but received tensors on ${d} and ${t.device}`);
}

function normAxis(axis: unknown, ndim: number, name = 'axis'): number {
  const a = expectInteger(name, axis, -Math.max(ndim, 1), Math.max(ndim - 1, 0));
  return a < 0 ? a + ndim : a;
}

function lastDim(op: string, x: Tensor, size: number, what: string): void {
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== size)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${what} of shape [..., ${size}] for ${op}() but received ${shapeString(x.shape)}`);
}

// ---- slice and concat ------------------------------------------------------------------------

/**
 * Elements start..end-1 of one axis (negative indices count from the end; end defaults to the
 * axis length). Returns a copy.
 * @example slice(x, 1, 0, 4) // x[:, 0:4]
 * @throws LoraRangeError for an axis out of range; ERR_LORA_SHAPE when start > end after clamping.
 */
export function slice(x: Tensor, axis: number, start: number, end?: number): Tensor {
  expectTensor('x', x);
  floatOnly('slice', x);
  if (x.ndim === 0) throw new LoraError('ERR_LORA_SHAPE', 'Expected a tensor with at least 1 dim for slice() but received a scalar');
  const a = normAxis(axis, x.ndim);
  const n = x.shape[a]!;
  const fix = (v: number, name: string) => {
    expectInteger(name, v, -Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
    return Math.min(n, Math.max(0, v < 0 ? v + n : v));
  };
  const s = fix(start, 'start');
  const e = end === undefined ? n : fix(end, 'end');
  if (e < s) throw new LoraError('ERR_LORA_SHAPE', `Expected start <= end for slice() of an axis of length ${n} but received ${start} and ${end}`);
  const shape = x.shape.slice();
  shape[a] = e - s;
  const strides = contiguousStrides(x.shape);
  const offset = s * strides[a]!;
  const out = empty(shape, x.device);
  if (out.size > 0) native.copyStrided(out._storage, 0, contiguousStrides(shape), x._storage, offset, strides, shape);
  return record(out, {
    name: 'slice', inputs: [x],
    backward: (g) => {
      const dx = zeros(x.shape, { device: x.device });
      if (g.size > 0) native.copyStrided(dx._storage, offset, strides, g._storage, 0, contiguousStrides(shape), shape);
      return [dx];
    },
  });
}

/**
 * Joins tensors along one axis; every other dim must match.
 * @example concat([a, b], -1)
 * @throws ERR_LORA_SHAPE when the other dims differ.
 */
export function concat(tensors: readonly Tensor[], axis = 0): Tensor {
  if (!Array.isArray(tensors) || tensors.length === 0) throw typeError('tensors', 'a non-empty array of Tensors', tensors);
  for (let i = 0; i < tensors.length; i++) expectTensor(`tensors[${i}]`, tensors[i]); // a for loop: forEach skips holes
  floatOnly('concat', ...tensors);
  sameDevice('concat', ...tensors);
  const first = tensors[0]!;
  if (first.ndim === 0) throw new LoraError('ERR_LORA_SHAPE', 'Expected tensors with at least 1 dim for concat()');
  const a = normAxis(axis, first.ndim);
  for (const t of tensors)
    if (t.ndim !== first.ndim || t.shape.some((d: number, i: number) => i !== a && d !== first.shape[i]))
      throw new LoraError('ERR_LORA_SHAPE', `Expected tensors that differ only in axis ${a} for concat() but received ${shapeString(first.shape)} and ${shapeString(t.shape)}`);
  const shape = first.shape.slice();
  shape[a] = tensors.reduce((acc, t) => acc + t.shape[a]!, 0);
  const out = empty(shape, first.device);
  const outStrides = contiguousStrides(shape);
  const offsets: number[] = [];
  let pos = 0;
  for (const t of tensors) {
    offsets.push(pos * outStrides[a]!);
    if (t.size > 0) native.copyStrided(out._storage, pos * outStrides[a]!, outStrides, t._storage, 0, contiguousStrides(t.shape), t.shape.slice());
    pos += t.shape[a]!;
  }
  return record(out, {
    name: 'concat', inputs: tensors.slice(),
    backward: (g) => tensors.map((t, i) => {
      if (!t.requiresGrad) return null;
      const d = empty(t.shape, t.device);
      if (d.size > 0) native.copyStrided(d._storage, 0, contiguousStrides(t.shape), g._storage, offsets[i]!, outStrides, t.shape.slice());
      return d;
    }),
  });
}

// ---- softmax family --------------------------------------------------------------------------

function softmaxImpl(name: string, x: Tensor, axis: number, log: boolean): Tensor {
  expectTensor('x', x);
  floatOnly(name, x);
  if (x.ndim === 0) throw new LoraError('ERR_LORA_SHAPE', `Expected a tensor with at least 1 dim for ${name}() but received a scalar`);
  const a = normAxis(axis, x.ndim);
  if (a !== x.ndim - 1) {
    // move the axis last, apply, move it back
    const perm = x.shape.map((_, i) => i).filter((i) => i !== a);
    perm.push(a);
    const inv = new Array<number>(perm.length);
    perm.forEach((p, i) => { inv[p] = i; });
    const xp = permute(x, perm);
    const yp = softmaxImpl(name, xp, -1, log);
    const y = permute(yp, inv);
    return saveFor(saveFor(y, yp), xp);
  }
  const cols = x.shape[a]!;
  const rows = cols === 0 ? 0 : x.size / cols;
  const out = empty(x.shape, x.device);
  if (out.size > 0) native.softmax(out._storage, x._storage, rows, cols, log);
  return record(out, {
    name, inputs: [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      if (dx.size > 0) native.softmaxBackward(dx._storage, g._storage, out._live(`output of ${name}`), rows, cols, log);
      return [dx];
    },
  });
}

/**
 * softmax(x)_i = exp(x_i) / Σ_j exp(x_j) along an axis (default the last).
 * @example softmax(logits, -1)
 */
export function softmax(x: Tensor, axis = -1): Tensor {
  return softmaxImpl('softmax', x, axis, false);
}

/** log(softmax(x)) along an axis (default the last), computed stably. */
export function logSoftmax(x: Tensor, axis = -1): Tensor {
  return softmaxImpl('logSoftmax', x, axis, true);
}

export interface GeluOptions {
  /** 'none' (exact, with erf; the default, like PyTorch) or 'tanh' (the GPT-2 approximation). */
  approximate?: 'none' | 'tanh';
}

/**
 * GELU: x·Φ(x) exactly, or 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) with approximate: 'tanh'.
 * @example gelu(x); gelu(x, { approximate: 'tanh' })
 */
export function gelu(x: Tensor, options?: GeluOptions): Tensor {
  const o = checkOptions<GeluOptions>('gelu()', options, ['approximate']);
  const approx = o.approximate === undefined ? 'none' : expectOneOf('approximate', o.approximate, ['none', 'tanh'] as const);
  return unary(approx === 'tanh' ? 'geluTanh' : 'geluErf', x);
}

// ---- losses ----------------------------------------------------------------------------------

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
    if (N > 0) nn.crossEntropy(rowLoss._storage, lse._storage, logits._storage, targets._storage, N, V, ignoreIndex, eps);
  } catch (err) {
    rowLoss.dispose();
    lse.dispose();
    throw err;
  }
  const backwardRows = (dloss: Tensor): Tensor => {
    const d = empty(logits.shape, logits.device);
    if (N > 0)
      nn.crossEntropyBackward(d._storage, dloss._storage, logits._live('logits of crossEntropy'), lse._live('saved log-sum-exp'),
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

// ---- normalisation ---------------------------------------------------------------------------

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
  if (y.size > 0) nn.layerNorm(y._storage, mu._storage, rstd._storage, x._storage, weight?._storage ?? null, bias?._storage ?? null, N, C, eps);
  const inputs = [x, ...(weight ? [weight] : []), ...(bias ? [bias] : [])];
  const out = record(y, {
    name: 'layerNorm', inputs,
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      const dw = weight && weight.requiresGrad ? zeros([C], { device: x.device }) : null;
      const db = bias && bias.requiresGrad ? zeros([C], { device: x.device }) : null;
      if (dx.size > 0)
        nn.layerNormBackward(dx._storage, dw?._storage ?? null, db?._storage ?? null, g._storage, x._live('input of layerNorm'),
          weight ? weight._live('weight') : null, mu._live('saved mean'), rstd._live('saved rstd'), N, C);
      return [x.requiresGrad ? dx : (dx.dispose(), null), ...(weight ? [dw] : []), ...(bias ? [db] : [])];
    },
  });
  return saveFor(out, mu, rstd);
}

/**
 * RMS normalisation over the last dim: x / sqrt(mean(x²) + eps)·weight (weight may be null).
 * @example rmsNorm(x, gamma, 1e-6)
 */
export function rmsNorm(x: Tensor, weight: Tensor | null = null, eps = 1e-6): Tensor {
  expectTensor('x', x);
  floatOnly('rmsNorm', x);
  if (x.ndim < 1) throw new LoraError('ERR_LORA_SHAPE', 'Expected a tensor with at least 1 dim for rmsNorm() but received a scalar');
  const C = x.shape[x.ndim - 1]!;
  checkAffine('rmsNorm', x, weight, 'weight', C);
  expectNumber('eps', eps, 0, Infinity, 'a finite number >= 0');
  const N = C === 0 ? 0 : x.size / C;
  const y = empty(x.shape, x.device);
  const rstd = empty([N], x.device);
  if (y.size > 0) nn.rmsNorm(y._storage, rstd._storage, x._storage, weight?._storage ?? null, N, C, eps);
  const out = record(y, {
    name: 'rmsNorm', inputs: weight ? [x, weight] : [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      const dw = weight && weight.requiresGrad ? zeros([C], { device: x.device }) : null;
      if (dx.size > 0)
        nn.rmsNormBackward(dx._storage, dw?._storage ?? null, g._storage, x._live('input of rmsNorm'),
          weight ? weight._live('weight') : null, rstd._live('saved rstd'), N, C);
      return weight ? [x.requiresGrad ? dx : (dx.dispose(), null), dw] : [dx];
    },
  });
  return saveFor(out, rstd);
}

// ---- embedding, dropout --------------------------------------------------------------------

/**
 * Rows of a table (V, C) picked by int32 ids of any shape: out has shape [...ids.shape, C].
 * The gradient scatters back into the table (repeated ids add up).
 * @example embedding(tokenIds, weight)
 * @throws ERR_LORA_DTYPE when ids are not int32; LoraRangeError for an id outside [0, V).
 */
export function embedding(ids: Tensor, table: Tensor): Tensor {
  expectTensor('ids', ids);
  expectTensor('table', table);
  floatOnly('embedding', table);
  sameDevice('embedding', ids, table);
  if (ids.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected int32 ids for embedding() but received ${ids.dtype} (create them with { dtype: 'int32' })`);
  if (table.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a 2-D table [V, C] for embedding() but received ${shapeString(table.shape)}`);
  const [V, C] = table.shape as [number, number];
  const N = ids.size;
  const out = empty([...ids.shape, C], table.device);
  try {
    if (out.size > 0) nn.embedding(out._storage, table._storage, ids._storage, N, V, C);
  } catch (err) {
    out.dispose();
    throw err;
  }
  return record(out, {
    name: 'embedding', inputs: [table],
    backward: (g) => {
      const d = zeros(table.shape, { device: table.device });
      if (g.size > 0) nn.embeddingBackward(d._storage, g._storage, ids._live('ids of embedding'), N, V, C);
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

/** @internal used by clipGradNorm: Σ g² over tensors, on the host, in float64. */
export function sumOfSquares(ts: readonly Tensor[]): number {
  // one running total per device, read back once (one synchronisation per device, not per tensor)
  const totals = new Map<string, Tensor>();
  try {
    for (const t of ts) {
      if (t.size === 0) continue;
      const sq = empty(t.shape, t.device);
      native.binary(BINARY_OP.mul, sq._storage, t._live('a gradient'), t._storage, [t.size], [1], [1]);
      const s = empty([], t.device);
      native.reduce(REDUCE_OP.sum, s._storage, sq._storage, 1, t.size, 1);
      sq.dispose();
      const acc = totals.get(t.device);
      if (acc) {
        native.axpy(acc._storage, s._storage, 1);
        s.dispose();
      } else totals.set(t.device, s);
    }
    let total = 0;
    for (const acc of totals.values()) total += acc.item();
    return total;
  } finally {
    for (const acc of totals.values()) acc.dispose();
  }
}

/** @internal scales a tensor in place (gradient clipping); not recorded. */
export function scaleInPlace(t: Tensor, factor: number): void {
  if (t.size > 0) native.binaryScalar(BINARY_OP.mul, t._storage, t._live(), factor, false);
}

