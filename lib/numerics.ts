// Numerics for training loops: allFinite() tells whether every value of some tensors (gradients, a
// loss) is finite, so a step that produced NaN or Inf can be thrown or skipped before the optimizer
// writes it into the weights (it reads one float per tensor back, not the tensors); the sum of
// squares and in-place scaling that gradient clipping needs.
import { LoraError, typeError } from './errors';
import { BINARY_OP, DTYPE_ID, native, NativeStorage, REDUCE_OP } from './native';
import { empty, Tensor } from './tensor';

// sum(x · 0) is exactly 0 when every x is finite and NaN as soon as one is NaN or ±Inf (Inf · 0 is
// NaN), and it cannot overflow, unlike sum(x) or sum(x²).
function finiteOne(s: NativeStorage): boolean {
  const n = s.numel;
  if (n === 0 || s.dtype === DTYPE_ID.int32) return true;
  const temps: NativeStorage[] = [];
  try {
    let src = s;
    if (s.dtype !== DTYPE_ID.float32) {
      src = native.alloc(s.device, DTYPE_ID.float32, n);
      temps.push(src);
      native.convert(src, s);
    }
    const zeroed = native.alloc(s.device, DTYPE_ID.float32, n);
    temps.push(zeroed);
    native.binaryScalar(BINARY_OP.mul, zeroed, src, 0, false);
    const total = native.alloc(s.device, DTYPE_ID.float32, 1);
    temps.push(total);
    native.reduce(REDUCE_OP.sum, total, zeroed, 1, n, 1);
    return new Float32Array(native.toHost(total))[0] === 0;
  } finally {
    for (const t of temps) native.dispose(t);
  }
}

/**
 * Whether every value of every tensor is finite (no NaN, no ±Infinity). null and undefined entries
 * (parameters without a gradient) are skipped; int32 tensors are always finite. Works on 'cpu' and
 * 'cuda' tensors; one tiny read-back per tensor.
 *
 * @example
 * loss.backward();
 * if (!allFinite(params.map((p) => p.grad))) { opt.zeroGrad(); continue; } // skip the step
 * opt.step();
 * @throws LoraTypeError when tensors is not a Tensor or an iterable of Tensors (or null);
 *   ERR_LORA_DISPOSED for a disposed tensor.
 */
export function allFinite(tensors: Tensor | Iterable<Tensor | null | undefined>): boolean {
  if (tensors instanceof Tensor) return finiteOne(tensors._live('tensors'));
  if (tensors === null || typeof tensors !== 'object' || ArrayBuffer.isView(tensors) || typeof (tensors as Iterable<unknown>)[Symbol.iterator] !== 'function')
    throw typeError('tensors', 'a Tensor or an iterable of Tensors', tensors);
  const list: NativeStorage[] = [];
  let i = 0;
  for (const t of tensors as Iterable<unknown>) {
    if (t !== null && t !== undefined) {
      if (!(t instanceof Tensor)) throw typeError(`tensors[${i}]`, 'a Tensor, null or undefined', t);
      list.push(t._live(`tensors[${i}]`));
    }
    i++;
  }
  for (const s of list) if (!finiteOne(s)) return false;
  return true;
}

/**
 * Throws ERR_LORA_NON_FINITE naming `what` unless allFinite(tensors).
 * @example assertAllFinite(grads, 'gradients at step 12');
 */
export function assertAllFinite(tensors: Tensor | Iterable<Tensor | null | undefined>, what = 'tensors'): void {
  if (!allFinite(tensors))
    throw new LoraError('ERR_LORA_NON_FINITE', `Expected finite values in ${typeof what === 'string' ? what : 'tensors'} but found NaN or Infinity`);
}

/** @internal clipGradNorm's Σ g² over tensors, summed per device and added on the host in float64. */
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

