// The reductions: sum, mean and max over axes, and softmax / log-softmax along one axis (their own
// kernels, forward and backward). max's gradient splits evenly between tied maxima.
import { expectBoolean, LoraError, typeError } from '../errors';
import { BINARY_OP, native, REDUCE_OP, UNARY_OP } from '../native';
import { empty, expectTensor, numelOf, record, saveFor, shapeString, Tensor } from '../tensor';
import { mul } from './elementwise';
import { permute } from './shape';
import { expandTo, floatOnly, normAxis, rawBinary, rawScalar, reduceRaw, reshapeRaw, sumTo } from './util';

function reduceAxes(x: Tensor, axis: number | readonly number[] | undefined): number[] {
  if (axis === undefined) return x.shape.map((_, i) => i);
  const list = typeof axis === 'number' ? [axis] : axis;
  if (!Array.isArray(list)) throw typeError('axis', 'an integer or an array of integers', axis);
  const axes = list.map((a) => normAxis(a, x.ndim));
  // A 0-d tensor takes axis 0 or -1, as in PyTorch, and has nothing to reduce over.
  if (x.ndim === 0) return [];
  if (new Set(axes).size !== axes.length) throw new LoraError('ERR_LORA_SHAPE', `Expected distinct axes but received ${shapeString(list)}`);
  return axes.sort((p, q) => p - q);
}

function reducedShape(shape: readonly number[], axes: number[], keepDims: boolean): number[] {
  return keepDims ? shape.map((d, i) => (axes.includes(i) ? 1 : d)) : shape.filter((_, i) => !axes.includes(i));
}

/** The checked forward of sum/max: the reduced output and the input's shape with reduced dims kept as 1. */
function reduction(name: string, op: number, x: Tensor, axis: number | readonly number[] | undefined, keepDims: boolean): { out: Tensor; keptShape: number[] } {
  expectTensor('x', x);
  floatOnly(name, x);
  expectBoolean('keepDims', keepDims);
  const axes = reduceAxes(x, axis);
  return { out: reduceRaw(x, axes, op, reducedShape(x.shape, axes, keepDims)), keptShape: reducedShape(x.shape, axes, true) };
}

/**
 * Sum over all elements (a scalar) or over the given axes.
 * @example sum(x); sum(x, 1); sum(x, [0, 1], true)
 */
export function sum(x: Tensor, axis?: number | readonly number[], keepDims = false): Tensor {
  const { out, keptShape } = reduction('sum', REDUCE_OP.sum, x, axis, keepDims);
  return record(out, {
    name: 'sum', inputs: [x],
    backward: (g) => {
      const gk = reshapeRaw(g, keptShape);
      const e = expandTo(gk, x.shape);
      gk.dispose();
      return [e];
    },
  });
}

/** Mean over all elements or over the given axes. */
export function mean(x: Tensor, axis?: number | readonly number[], keepDims = false): Tensor {
  expectTensor('x', x);
  const axes = reduceAxes(x, axis);
  const count = numelOf(axes.map((a) => x.shape[a]!));
  const s = sum(x, axis, keepDims);
  const m = mul(s, count === 0 ? NaN : 1 / count);
  s.dispose();
  return m;
}

/** Maximum over all elements or over the given axes (the gradient goes to every maximal element). */
export function max(x: Tensor, axis?: number | readonly number[], keepDims = false): Tensor {
  const { out, keptShape } = reduction('max', REDUCE_OP.max, x, axis, keepDims);
  return record(out, {
    name: 'max', inputs: [x],
    backward: (g) => {
      // mask = (x == max), split evenly between ties, times g
      const mk = reshapeRaw(out, keptShape);
      const me = expandTo(mk, x.shape);
      const d = rawBinary(BINARY_OP.sub, x, me);
      const eq = empty(x.shape, x.device);
      native.unary(UNARY_OP.abs, eq._storage, d._storage);
      // step(|d|) = min(1, min(1, |d|·2^126)·2^126): exactly 1 for every |d| > 0 (the smallest
      // subnormal, 2^-149, reaches 2^103 after two scalings) and 0 for d = 0; mask = 1 - step
      const s1 = rawScalar(BINARY_OP.mul, eq, 2 ** 126, false);
      const c1 = rawScalar(BINARY_OP.min, s1, 1, false);
      const s2 = rawScalar(BINARY_OP.mul, c1, 2 ** 126, false);
      const c2 = rawScalar(BINARY_OP.min, s2, 1, false);
      const mask = rawScalar(BINARY_OP.sub, c2, 1, true);
      const cnt = sumTo(mask, keptShape);
      const gk = reshapeRaw(g, keptShape);
      const share = rawBinary(BINARY_OP.div, gk, cnt);
      const res = rawBinary(BINARY_OP.mul, mask, share);
      for (const t of [mk, me, d, eq, s1, c1, s2, c2, mask, cnt, gk, share]) t.dispose();
      return [res];
    },
  });
}

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
