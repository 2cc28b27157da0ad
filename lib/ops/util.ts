// Helpers the ops of lib/ops/ share: argument checks (one device, float32 only, an axis), and the
// raw kernels without autograd that forward and backward passes are built from (broadcasting
// binary ops, reductions over axes, sums back to a broadcast input's shape). Not exported from
// lib/ops/index.ts: nothing here is an op a user calls.
import { editDistance, expectInteger, LoraError, rangeError, typeError } from '../errors';
import { BINARY_OP, DEVICE_ID, DTYPE_ID, native, OP, REDUCE_OP } from '../native';
import { checkShape, contiguousStrides, empty, numelOf, sameShape, shapeString, takeStorage, Tensor } from '../tensor';

/** ERR_LORA_DEVICE unless every tensor lives on one device. */
export function sameDevice(op: string, ...ts: Tensor[]): void {
  const d = ts[0]!.device;
  for (const t of ts)
    if (t.device !== d)
      throw new LoraError('ERR_LORA_DEVICE', `Expected every tensor of ${op}() on one device but received tensors on ${d} and ${t.device}`);
}

/** ERR_LORA_DTYPE unless every tensor is float32. */
export function floatOnly(op: string, ...ts: Tensor[]): void {
  for (const t of ts)
    if (t.dtype !== 'float32')
      throw new LoraError('ERR_LORA_DTYPE', `Expected float32 tensors for ${op}() but received ${t.dtype} (convert with toDtype('float32'))`);
}

/** An axis of an ndim-dimensional tensor, negative counting from the end, as 0..ndim-1. */
export function normAxis(axis: unknown, ndim: number, name = 'axis'): number {
  const a = expectInteger(name, axis, -Math.max(ndim, 1), Math.max(ndim - 1, 0));
  return a < 0 ? a + ndim : a;
}

/** ERR_LORA_SHAPE unless x has shape [..., size]. */
export function lastDim(op: string, x: Tensor, size: number, what: string): void {
  if (x.ndim < 1 || x.shape[x.ndim - 1] !== size)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${what} of shape [..., ${size}] for ${op}() but received ${shapeString(x.shape)}`);
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
export function broadcastStrides(shape: readonly number[], outShape: readonly number[]): number[] {
  const s = contiguousStrides(shape);
  const off = outShape.length - shape.length;
  return outShape.map((d, i) => (i < off || shape[i - off] === 1 ? 0 : s[i - off]!));
}

/** a op b with broadcasting, no autograd. */
export function rawBinary(op: number, a: Tensor, b: Tensor): Tensor {
  const shape = broadcastShapes(Object.keys(BINARY_OP)[op]!, a.shape, b.shape);
  const out = empty(shape, a.device);
  if (out.size > 0) native.binary(op, out._storage, a._storage, b._storage, shape, broadcastStrides(a.shape, shape), broadcastStrides(b.shape, shape));
  return out;
}

/** a op s (or s op a), no autograd. */
export function rawScalar(op: number, a: Tensor, s: number, scalarFirst: boolean): Tensor {
  const out = empty(a.shape, a.device);
  native.binaryScalar(op, out._storage, a._storage, s, scalarFirst);
  return out;
}

/** The same values with another shape, no autograd. */
export function reshapeRaw(g: Tensor, shape: readonly number[]): Tensor {
  const out = empty(shape, g.device);
  native.copyInto(out._storage, g._storage);
  return out;
}

/** Reduces one axis with keepDims, no autograd. */
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

/**
 * Reduces x over `axes` (sorted) with a native reduce op into a new tensor of `outShape` (the
 * reduced shape, with or without kept dims). No autograd.
 */
export function reduceRaw(x: Tensor, axes: readonly number[], op: number, outShape: readonly number[]): Tensor {
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

/** Sums g over the dims that broadcasting added to reach g.shape from `shape`. */
export function sumTo(g: Tensor, shape: readonly number[]): Tensor {
  if (sameShape(g.shape, shape)) return g.detach();
  const off = g.shape.length - shape.length;
  const axes: number[] = [];
  for (let i = 0; i < g.shape.length; i++) if (i < off || (shape[i - off] === 1 && g.shape[i] !== 1)) axes.push(i);
  return reduceRaw(g, axes, REDUCE_OP.sum, shape);
}

/**
 * sumTo() for the last use of a gradient a backward function received (runBackward disposes it
 * once the function returns): of g's own shape, g's storage itself (takeStorage), not a copy.
 */
export function sumToTaking(g: Tensor, shape: readonly number[]): Tensor {
  return sameShape(g.shape, shape) ? takeStorage(g, shape) : sumTo(g, shape);
}

/** Repeats t along broadcast dims to fill `shape` (a contiguous copy; no autograd). */
export function expandTo(t: Tensor, shape: readonly number[]): Tensor {
  const out = empty(shape, t.device);
  if (out.size === 0) return out;
  native.copyStrided(out._storage, 0, contiguousStrides(shape), t._storage, 0, broadcastStrides(t.shape, shape), shape.slice());
  return out;
}

/**
 * The weight as linear()'s products read it: itself when float32, or bfloat16 on a backend with a
 * bf16-weight GEMM; else a float32 copy (the caller disposes it when it is not `weight`).
 */
export function gemmReadable(weight: Tensor): Tensor {
  return gemmReadsAsStored(weight) ? weight : weight.toDtype('float32');
}

/** Whether the GEMM reads the weight as stored: float32, or bfloat16 where the backend has a bf16-weight GEMM. */
export function gemmReadsAsStored(weight: Tensor): boolean {
  return weight.dtype === 'float32' ||
    (weight.dtype === 'bfloat16' && native.supports(DEVICE_ID[weight.device], OP.gemm, DTYPE_ID.bfloat16));
}

/**
 * How a product with a bfloat16 weight treats its float32 input (PyTorch's
 * torch.set_float32_matmul_precision for bf16 weights): 'fp32' (the default) multiplies the input
 * as it is, with the weight widened exactly, so the result is the float32 product; 'bf16' lets
 * the backend round the input to bfloat16 for a bf16 dot product with float32 accumulation
 * (avx512_bf16 CPUs, about twice the speed from 64 rows on, and on 4..16 rows of x·Wᵀ: decode
 * of a batch reads W at memory speed), each output then within
 * 2^-8·Σ|x·w| of the exact sum. Float32 weights always get float32 products, as do backends
 * without a bf16 dot product (other CPUs, CUDA for now): 'bf16' then changes nothing.
 */
export type MatmulPrecision = 'fp32' | 'bf16';

const MATMUL_PRECISIONS: readonly MatmulPrecision[] = ['fp32', 'bf16'];
// other names people reach for: dtype names, the CLI's, PyTorch's precision levels
const PRECISION_SYNONYMS: Readonly<Record<string, MatmulPrecision>> = {
  float32: 'fp32', f32: 'fp32', highest: 'fp32', high: 'fp32', bfloat16: 'bf16', medium: 'bf16',
};

/** A MatmulPrecision ('fp32' when undefined), or LoraTypeError/LoraRangeError naming `name` with a did-you-mean. */
export function expectMatmulPrecision(name: string, v: unknown): MatmulPrecision {
  if (v === undefined) return 'fp32';
  const expected = `one of ${MATMUL_PRECISIONS.map((p) => `'${p}'`).join(', ')}`;
  if (typeof v !== 'string') throw typeError(name, expected, v);
  if (MATMUL_PRECISIONS.includes(v as MatmulPrecision)) return v as MatmulPrecision;
  const near = PRECISION_SYNONYMS[v.toLowerCase()] ?? MATMUL_PRECISIONS.find((p) => editDistance(v, p) <= 1);
  const err = rangeError(name, expected, v);
  if (near) err.message += `; did you mean '${near}'?`;
  throw err;
}

/**
 * C = op(A)·op(weight) (+ C when accumulate) for the products of linear(): a bf16 weight is read
 * as is by backends with a bf16-weight GEMM (fp32 products and accumulation, or with precision
 * 'bf16' the bf16 dot product where the backend has one), else widened first.
 */
export function gemmWeight(c: Tensor, a: Tensor, weight: Tensor, M: number, N: number, K: number, transB: boolean, lda: number,
  ldb: number, ldc: number, accumulate: boolean, precision: MatmulPrecision = 'fp32'): void {
  const w = gemmReadable(weight);
  try {
    native.gemm(c._storage, a._storage, w._storage, M, N, K, false, transB, lda, ldb, ldc, 1, accumulate ? 1 : 0, 1, 0, 0, 0, precision === 'bf16');
  } finally {
    if (w !== weight) w.dispose();
  }
}
