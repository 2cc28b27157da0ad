// The shape ops: reshape, permute/transpose, slice and concat. Each returns a copy (strided copies
// on the device), and each backward moves the gradient back through the inverse view (reshape's
// takes the incoming gradient's storage under the input's shape: no copy).
import { expectInteger, LoraError, typeError } from '../errors';
import { native } from '../native';
import { contiguousStrides, empty, expectTensor, numelOf, record, shapeString, takeStorage, Tensor, zeros } from '../tensor';
import { floatOnly, normAxis, sameDevice } from './util';

/**
 * The same values with a new shape (one dim may be -1 and is inferred). Returns a copy.
 * @throws ERR_LORA_SHAPE when the element counts differ.
 */
export function reshape(x: Tensor, shape: readonly number[]): Tensor {
  expectTensor('x', x);
  if (!Array.isArray(shape)) throw typeError('shape', 'an array of integers', shape);
  const dims = shape.slice();
  let infer = -1;
  for (let i = 0; i < dims.length; i++) {
    const d = dims[i];
    if (typeof d !== 'number' || !Number.isInteger(d) || d < -1) throw typeError('shape', 'an array of non-negative integers (one may be -1)', shape);
    if (d === -1) {
      if (infer >= 0) throw new LoraError('ERR_LORA_SHAPE', `Expected at most one -1 in shape but received ${shapeString(dims)}`);
      infer = i;
    }
  }
  if (infer >= 0) {
    const rest = numelOf(dims.filter((_, i) => i !== infer));
    if (rest === 0 || x.size % rest !== 0)
      throw new LoraError('ERR_LORA_SHAPE', `Expected a shape compatible with ${x.size} elements for reshape() but received ${shapeString(dims)}`);
    dims[infer] = x.size / rest;
  }
  if (numelOf(dims) !== x.size)
    throw new LoraError('ERR_LORA_SHAPE', `Expected a shape with ${x.size} elements for reshape() of ${shapeString(x.shape)} but received ${shapeString(dims)}`);
  const out = empty(dims, x.device, x.dtype);
  native.copyInto(out._storage, x._storage);
  const from = x.shape;
  // (the gradient is the backward's to keep: it takes g's storage instead of copying it)
  return record(out, { name: 'reshape', inputs: [x], backward: (g) => [takeStorage(g, from)] });
}

/**
 * Reorders dimensions: out.shape[i] = x.shape[perm[i]].
 * @example permute(x, [0, 2, 1])
 */
export function permute(x: Tensor, perm: readonly number[]): Tensor {
  expectTensor('x', x);
  floatOnly('permute', x);
  if (!Array.isArray(perm) || perm.length !== x.ndim) throw typeError('perm', `an array of ${x.ndim} axes`, perm);
  const p = perm.map((a) => normAxis(a, x.ndim, 'perm'));
  if (new Set(p).size !== p.length) throw new LoraError('ERR_LORA_SHAPE', `Expected a permutation of the axes but received ${shapeString(perm)}`);
  const out = empty(p.map((a) => x.shape[a]!), x.device);
  const srcStrides = contiguousStrides(x.shape);
  if (out.size > 0)
    native.copyStrided(out._storage, 0, contiguousStrides(out.shape), x._storage, 0, p.map((a) => srcStrides[a]!), out.shape.slice());
  const inverse = new Array<number>(p.length);
  p.forEach((a, i) => { inverse[a] = i; });
  return record(out, { name: 'permute', inputs: [x], backward: (g) => [noGradPermute(g, inverse)] });
}

function noGradPermute(g: Tensor, perm: number[]): Tensor {
  const out = empty(perm.map((a) => g.shape[a]!), g.device);
  const s = contiguousStrides(g.shape);
  if (out.size > 0)
    native.copyStrided(out._storage, 0, contiguousStrides(out.shape), g._storage, 0, perm.map((a) => s[a]!), out.shape.slice());
  return out;
}

/** Swaps two dimensions (default: the last two). */
export function transpose(x: Tensor, dim0 = -2, dim1 = -1): Tensor {
  expectTensor('x', x);
  if (x.ndim < 2) throw new LoraError('ERR_LORA_SHAPE', `Expected a tensor with at least 2 dims for transpose() but received shape ${shapeString(x.shape)}`);
  const a = normAxis(dim0, x.ndim, 'dim0');
  const b = normAxis(dim1, x.ndim, 'dim1');
  const perm = x.shape.map((_, i) => i);
  perm[a] = b;
  perm[b] = a;
  return permute(x, perm);
}

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
