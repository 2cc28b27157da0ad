// The differentiable ops over Tensor: elementwise arithmetic with broadcasting, matmul, linear,
// reductions, reshapes and unary functions. Each validates its arguments, runs one or a few
// native kernels and records a GradNode whose backward is written from the math. Ops never
// modify their inputs.
import { expectBoolean, expectInteger, LoraError, typeError } from './errors';
import { BINARY_OP, native, REDUCE_OP, UNARY_OP } from './native';
import {
  checkShape, contiguousStrides, empty, expectTensor, numelOf, record, sameShape, saveFor, shapeString, Tensor,
} from './tensor';

type Operand = Tensor | number;

function sameDevice(op: string, ...ts: Tensor[]): void {
  const d = ts[0]!.device;
  for (const t of ts)
    if (t.device !== d)
      throw new LoraError('ERR_LORA_DEVICE', `Expected every tensor of ${op}() on one device but received tensors on ${d} and ${t.device}`);
}

function floatOnly(op: string, ...ts: Tensor[]): void {
  for (const t of ts)
    if (t.dtype !== 'float32')
      throw new LoraError('ERR_LORA_DTYPE', `Expected float32 tensors for ${op}() but received ${t.dtype} (convert with toDtype('float32'))`);
}

/** The shape two shapes broadcast to (NumPy rules), or ERR_LORA_SHAPE. */
export function broadcastShapes(op: string, a: readonly number[], b: readonly number[]): number[] {
  checkShape('a', a);
  checkShape('b', b);
  const n = Math.max(a.length, b.length);
  const out = new Array<number>(n);
  for (let i = 0; i < n; i++) {
    const da = a[a.length - n + i] ?? 1;
    const db = b[b.length - n + i] ?? 1;
    if (da !== db && da !== 1 && db !== 1)
      throw new LoraError('ERR_LORA_SHAPE', `Expected shapes that broadcast for ${op}() but received ${shapeString(a)} and ${shapeString(b)}`);
    out[i] = da === 1 ? db : da;
  }
  return out;
}

/** Strides that read `shape` (contiguous) as if it had `outShape` (0 on broadcast dims). */
function broadcastStrides(shape: readonly number[], outShape: readonly number[]): number[] {
  const s = contiguousStrides(shape);
  const off = outShape.length - shape.length;
  return outShape.map((d, i) => (i < off || shape[i - off] === 1 ? 0 : s[i - off]!));
}

/** @internal a detached copy of t */
function clone(t: Tensor): Tensor {
  return t.detach();
}

/** Sums g over the dims that broadcasting added to reach g.shape from `shape`. */
export function sumTo(g: Tensor, shape: readonly number[]): Tensor {
  if (sameShape(g.shape, shape)) return clone(g);
  const off = g.shape.length - shape.length;
  const axes: number[] = [];
  for (let i = 0; i < g.shape.length; i++) if (i < off || (shape[i - off] === 1 && g.shape[i] !== 1)) axes.push(i);
  return reduceRaw(g, axes, REDUCE_OP.sum, shape);
}

/**
 * Reduces x over `axes` (sorted) with a native reduce op into a new tensor of `outShape` (the
 * reduced shape, with or without kept dims). No autograd.
 */
function reduceRaw(x: Tensor, axes: readonly number[], op: number, outShape: readonly number[]): Tensor {
  let cur = x;
  for (let k = axes.length - 1; k >= 0; k--) {
    const next = reduceAxis(cur, axes[k]!, op);
    if (cur !== x) cur.dispose();
    cur = next;
  }
  const out = empty(outShape, x.device);
  native.copyInto(out._storage, cur._storage);
  if (cur !== x) cur.dispose();
  return out;
}

/** Repeats t along broadcast dims to fill `shape` (a contiguous copy; no autograd). */
function expandTo(t: Tensor, shape: readonly number[]): Tensor {
  const out = empty(shape, t.device);
  if (out.size === 0) return out;
  native.copyStrided(out._storage, 0, contiguousStrides(shape), t._storage, 0, broadcastStrides(t.shape, shape), shape.slice());
  return out;
}

/** Reduces one axis with keepDims (no autograd). */
function reduceAxis(t: Tensor, axis: number, op: number): Tensor {
  const outer = numelOf(t.shape.slice(0, axis));
  const dim = t.shape[axis]!;
  const inner = numelOf(t.shape.slice(axis + 1));
  const shape = t.shape.slice();
  shape[axis] = 1;
  const out = empty(shape, t.device);
  native.reduce(op, out._storage, t._storage, outer, dim, inner);
  return out;
}

// ---- elementwise binary ----------------------------------------------------------------------

function rawBinary(op: number, a: Tensor, b: Tensor): Tensor {
  const shape = broadcastShapes(Object.keys(BINARY_OP)[op]!, a.shape, b.shape);
  const out = empty(shape, a.device);
  if (out.size > 0) native.binary(op, out._storage, a._storage, b._storage, shape, broadcastStrides(a.shape, shape), broadcastStrides(b.shape, shape));
  return out;
}

function rawScalar(op: number, a: Tensor, s: number, scalarFirst: boolean): Tensor {
  const out = empty(a.shape, a.device);
  native.binaryScalar(op, out._storage, a._storage, s, scalarFirst);
  return out;
}

function operands(op: string, a: unknown, b: unknown): [Tensor | number, Tensor | number] {
  const check = (name: string, v: unknown) => {
    if (typeof v === 'number') return v;
    return expectTensor(name, v);
  };
  const x = check('a', a);
  const y = check('b', b);
  if (typeof x === 'number' && typeof y === 'number') throw typeError('a', `a Tensor (at least one operand of ${op}() must be a tensor)`, a);
  const ts = [x, y].filter((v): v is Tensor => v instanceof Tensor);
  sameDevice(op, ...ts);
  floatOnly(op, ...ts);
  return [x, y];
}

/**
 * a + b, elementwise with broadcasting; either side may be a number.
 * @example add(x, 1); add(x, bias)
 * @throws ERR_LORA_SHAPE when the shapes do not broadcast.
 */
export function add(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('add', a, b);
  if (typeof y === 'number') return scalarOp('add', BINARY_OP.add, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('add', BINARY_OP.add, y, x, true);
  return record(rawBinary(BINARY_OP.add, x, y), {
    name: 'add', inputs: [x, y],
    backward: (g) => [x.requiresGrad ? sumTo(g, x.shape) : null, y.requiresGrad ? sumTo(g, y.shape) : null],
  });
}

/** a - b, elementwise with broadcasting; either side may be a number. */
export function sub(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('sub', a, b);
  if (typeof y === 'number') return scalarOp('sub', BINARY_OP.sub, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('sub', BINARY_OP.sub, y, x, true);
  return record(rawBinary(BINARY_OP.sub, x, y), {
    name: 'sub', inputs: [x, y],
    backward: (g) => {
      let gy: Tensor | null = null;
      if (y.requiresGrad) {
        const s = sumTo(g, y.shape);
        gy = rawScalar(BINARY_OP.mul, s, -1, false);
        s.dispose();
      }
      return [x.requiresGrad ? sumTo(g, x.shape) : null, gy];
    },
  });
}

/** a ⊙ b, elementwise with broadcasting; either side may be a number. */
export function mul(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('mul', a, b);
  if (typeof y === 'number') return scalarOp('mul', BINARY_OP.mul, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('mul', BINARY_OP.mul, y, x, true);
  return record(rawBinary(BINARY_OP.mul, x, y), {
    name: 'mul', inputs: [x, y],
    backward: (g) => [
      x.requiresGrad ? productSumTo(g, y, x.shape) : null,
      y.requiresGrad ? productSumTo(g, x, y.shape) : null,
    ],
  });
}

/** a / b, elementwise with broadcasting; either side may be a number. */
export function div(a: Operand, b: Operand): Tensor {
  const [x, y] = operands('div', a, b);
  if (typeof y === 'number') return scalarOp('div', BINARY_OP.div, x as Tensor, y, false);
  if (typeof x === 'number') return scalarOp('div', BINARY_OP.div, y, x, true);
  return record(rawBinary(BINARY_OP.div, x, y), {
    name: 'div', inputs: [x, y],
    backward: (g) => {
      let gx: Tensor | null = null;
      let gy: Tensor | null = null;
      if (x.requiresGrad) {
        const t = rawBinary(BINARY_OP.div, g, y);
        gx = sumTo(t, x.shape);
        t.dispose();
      }
      if (y.requiresGrad) {
        // d(x/y)/dy = -x / y²
        const q = rawBinary(BINARY_OP.div, x, y);
        const q2 = rawBinary(BINARY_OP.div, q, y);
        const t = rawBinary(BINARY_OP.mul, g, q2);
        const s = sumTo(t, y.shape);
        gy = rawScalar(BINARY_OP.mul, s, -1, false);
        for (const z of [q, q2, t, s]) z.dispose();
      }
      return [gx, gy];
    },
  });
}

function productSumTo(g: Tensor, other: Tensor, shape: readonly number[]): Tensor {
  const t = rawBinary(BINARY_OP.mul, g, other);
  const s = sumTo(t, shape);
  t.dispose();
  return s;
}

function scalarOp(name: string, op: number, t: Tensor, s: number, scalarFirst: boolean): Tensor {
  const out = rawScalar(op, t, s, scalarFirst);
  return record(out, {
    name, inputs: [t],
    backward: (g) => {
      switch (op) {
        case BINARY_OP.add: return [clone(g)];
        case BINARY_OP.sub: return [scalarFirst ? rawScalar(BINARY_OP.mul, g, -1, false) : clone(g)];
        case BINARY_OP.mul: return [rawScalar(BINARY_OP.mul, g, s, false)];
        default: {
          if (!scalarFirst) return [rawScalar(BINARY_OP.mul, g, 1 / s, false)];
          // d(s/t)/dt = -s / t² = -out / t
          const q = rawBinary(BINARY_OP.div, out, t);
          const r = rawBinary(BINARY_OP.mul, g, q);
          q.dispose();
          const n = rawScalar(BINARY_OP.mul, r, -1, false);
          r.dispose();
          return [n];
        }
      }
    },
  });
}

/** -x */
export function neg(x: Tensor): Tensor {
  return mul(x, -1);
}

// ---- unary functions -------------------------------------------------------------------------

/** The elementwise functions with native kernels. */
export type UnaryName = keyof typeof UNARY_OP;

/** f(x) elementwise for a named function ('relu', 'exp', 'geluTanh', ...). */
export function unary(name: UnaryName, x: Tensor): Tensor {
  const op = typeof name === 'string' && Object.prototype.hasOwnProperty.call(UNARY_OP, name) ? UNARY_OP[name] : undefined;
  if (op === undefined) throw typeError('name', `one of ${Object.keys(UNARY_OP).join(', ')}`, name);
  expectTensor('x', x);
  floatOnly(name, x);
  const out = empty(x.shape, x.device);
  native.unary(op, out._storage, x._storage);
  return record(out, {
    name, inputs: [x],
    backward: (g) => {
      const dx = empty(x.shape, x.device);
      native.unaryBackward(op, dx._storage, g._storage, x._live('input of ' + name), out._live('output of ' + name));
      return [dx];
    },
  });
}

export const exp = (x: Tensor) => unary('exp', x);
export const log = (x: Tensor) => unary('log', x);
export const sqrt = (x: Tensor) => unary('sqrt', x);
export const relu = (x: Tensor) => unary('relu', x);
export const tanh = (x: Tensor) => unary('tanh', x);
export const sigmoid = (x: Tensor) => unary('sigmoid', x);
export const silu = (x: Tensor) => unary('silu', x);
export const square = (x: Tensor) => unary('square', x);
export const abs = (x: Tensor) => unary('abs', x);

// ---- shape ops ------------------------------------------------------------------------------

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
  return record(out, { name: 'reshape', inputs: [x], backward: (g) => [reshapeRaw(g, from)] });
}

function reshapeRaw(g: Tensor, shape: readonly number[]): Tensor {
  const out = empty(shape, g.device);
  native.copyInto(out._storage, g._storage);
  return out;
}

function normAxis(axis: unknown, ndim: number, name = 'axis'): number {
  const a = expectInteger(name, axis, -Math.max(ndim, 1), Math.max(ndim - 1, 0));
  return a < 0 ? a + ndim : a;
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

// ---- reductions ----------------------------------------------------------------------------

function reduceAxes(x: Tensor, axis: number | readonly number[] | undefined): number[] {
  if (axis === undefined) return x.shape.map((_, i) => i);
  const list = typeof axis === 'number' ? [axis] : axis;
  if (!Array.isArray(list)) throw typeError('axis', 'an integer or an array of integers', axis);
  const axes = list.map((a) => normAxis(a, x.ndim));
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

// ---- matrix products -------------------------------------------------------------------------

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
    const r = matmul(a2, b);
    const out = reshape(r, r.shape.filter((_, i) => i !== r.ndim - 2));
    r.dispose(); // its GradNode stays in the graph; its values are not needed
    return saveFor(out, a2);
  }
  if (b.ndim === 1) {
    const b2 = reshape(b, [b.shape[0]!, 1]);
    const r = matmul(a, b2);
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
  if (bBatch.length === 0) {
    // fold a's batch dims into M: one GEMM
    const P = numelOf(aBatch) * M;
    const out = empty([...aBatch, M, N], a.device);
    if (out.size > 0) native.gemm(out._storage, a._storage, b._storage, P, N, K, false, false, K, N, N, 1, 0, 1, 0, 0, 0);
    return record(out, {
      name: 'matmul', inputs: [a, b],
      backward: (g) => {
        let ga: Tensor | null = null;
        let gb: Tensor | null = null;
        if (a.requiresGrad) {
          ga = empty(a.shape, a.device);
          if (ga.size > 0) native.gemm(ga._storage, g._storage, b._storage, P, K, N, false, true, N, N, K, 1, 0, 1, 0, 0, 0);
        }
        if (b.requiresGrad) {
          gb = empty(b.shape, b.device);
          if (P === 0) native.fill(gb._storage, 0);
          else if (gb.size > 0) native.gemm(gb._storage, a._storage, g._storage, K, N, P, true, false, K, N, N, 1, 0, 1, 0, 0, 0);
        }
        return [ga, gb];
      },
    });
  }
  if (aBatch.length !== 0 && !sameShape(aBatch, bBatch))
    throw new LoraError('ERR_LORA_SHAPE', `Expected equal batch dims for matmul() but received ${shapeString(a.shape)} and ${shapeString(b.shape)}`);
  const batchShape = bBatch;
  const batch = numelOf(batchShape);
  const sa = aBatch.length === 0 ? 0 : M * K;
  const out = empty([...batchShape, M, N], a.device);
  if (out.size > 0) native.gemm(out._storage, a._storage, b._storage, M, N, K, false, false, K, N, N, 1, 0, batch, sa, K * N, M * N);
  return record(out, {
    name: 'matmul', inputs: [a, b],
    backward: (g) => {
      let ga: Tensor | null = null;
      let gb: Tensor | null = null;
      if (a.requiresGrad) {
        const full = empty([...batchShape, M, K], a.device);
        if (full.size > 0) native.gemm(full._storage, g._storage, b._storage, M, K, N, false, true, N, N, K, 1, 0, batch, M * N, K * N, M * K);
        ga = sumTo(full, a.shape);
        full.dispose();
      }
      if (b.requiresGrad) {
        gb = empty(b.shape, b.device);
        if (gb.size > 0) {
          if (M === 0) native.fill(gb._storage, 0);
          else native.gemm(gb._storage, a._storage, g._storage, K, N, M, true, false, K, N, N, 1, 0, batch, sa, M * N, K * N);
        }
      }
      return [ga, gb];
    },
  });
}

// Devices whose backend answered ERR_LORA_UNSUPPORTED to a gemm with a bf16 weight operand: there
// linear() widens the weight to fp32 for each product instead (once found, for the process). Both
// backends we build implement it (the loader refuses an older CUDA library); this keeps linear()
// working on a backend that leaves the optional op out.
const bf16GemmUnsupported = new Set<string>();

/**
 * C = op(A)·op(weight) (+ C when accumulate) for the products of linear(): a bf16 weight is read
 * as is by backends with a bf16-weight GEMM (fp32 products and accumulation), else widened first.
 */
function gemmWeight(c: Tensor, a: Tensor, weight: Tensor, M: number, N: number, K: number, transB: boolean, lda: number,
  ldb: number, ldc: number, accumulate: boolean): void {
  if (weight.dtype === 'bfloat16' && !bf16GemmUnsupported.has(weight.device)) {
    try {
      native.gemm(c._storage, a._storage, weight._storage, M, N, K, false, transB, lda, ldb, ldc, 1, accumulate ? 1 : 0, 1, 0, 0, 0);
      return;
    } catch (err) {
      if (!(err instanceof LoraError && err.code === 'ERR_LORA_UNSUPPORTED')) throw err;
      bf16GemmUnsupported.add(weight.device);
    }
  }
  const w = weight.dtype === 'float32' ? weight : weight.toDtype('float32');
  try {
    native.gemm(c._storage, a._storage, w._storage, M, N, K, false, transB, lda, ldb, ldc, 1, accumulate ? 1 : 0, 1, 0, 0, 0);
  } finally {
    if (w !== weight) w.dispose();
  }
}

/**
 * y = x·Wᵀ + b for x (..., inFeatures), weight (outFeatures, inFeatures), bias (outFeatures) or
 * null: the frozen base of a LoRA layer and the Linear module's op. A bfloat16 weight is read as
 * stored (no fp32 copy) where the backend can: products and sums stay fp32. A float16 weight is
 * widened to fp32 for each product (no kernel reads float16 in place yet).
 */
export function linear(x: Tensor, weight: Tensor, bias: Tensor | null = null): Tensor {
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
  const out = empty([...x.shape.slice(0, -1), OC], x.device);
  if (out.size > 0) {
    if (bias) native.copyStrided(out._storage, 0, [OC, 1], bias._storage, 0, [0, 1], [N, OC]);
    gemmWeight(out, x, weight, N, OC, C, true, C, C, OC, bias !== null);
  }
  return record(out, {
    name: 'linear', inputs: ts,
    backward: (g) => {
      let gx: Tensor | null = null;
      let gw: Tensor | null = null;
      let gb: Tensor | null = null;
      if (x.requiresGrad) {
        gx = empty(x.shape, x.device);
        if (gx.size > 0) gemmWeight(gx, g, weight, N, C, OC, false, OC, C, C, false);
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

// ---- Tensor method forms ---------------------------------------------------------------------

declare module './tensor' {
  interface Tensor {
    add(other: Tensor | number): Tensor;
    sub(other: Tensor | number): Tensor;
    mul(other: Tensor | number): Tensor;
    div(other: Tensor | number): Tensor;
    neg(): Tensor;
    matmul(other: Tensor): Tensor;
    sum(axis?: number | readonly number[], keepDims?: boolean): Tensor;
    mean(axis?: number | readonly number[], keepDims?: boolean): Tensor;
    reshape(shape: readonly number[]): Tensor;
    transpose(dim0?: number, dim1?: number): Tensor;
  }
}

Tensor.prototype.add = function (this: Tensor, o: Tensor | number) { return add(this, o); };
Tensor.prototype.sub = function (this: Tensor, o: Tensor | number) { return sub(this, o); };
Tensor.prototype.mul = function (this: Tensor, o: Tensor | number) { return mul(this, o); };
Tensor.prototype.div = function (this: Tensor, o: Tensor | number) { return div(this, o); };
Tensor.prototype.neg = function (this: Tensor) { return neg(this); };
Tensor.prototype.matmul = function (this: Tensor, o: Tensor) { return matmul(this, o); };
Tensor.prototype.sum = function (this: Tensor, axis?: number | readonly number[], keepDims?: boolean) { return sum(this, axis, keepDims); };
Tensor.prototype.mean = function (this: Tensor, axis?: number | readonly number[], keepDims?: boolean) { return mean(this, axis, keepDims); };
Tensor.prototype.reshape = function (this: Tensor, shape: readonly number[]) { return reshape(this, shape); };
Tensor.prototype.transpose = function (this: Tensor, d0?: number, d1?: number) { return transpose(this, d0, d1); };
