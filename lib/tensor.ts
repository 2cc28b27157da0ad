// Tensor: a typed handle over native memory on 'cpu' or 'cuda', with explicit dispose(), `using`,
// tidy() scopes and a reverse-mode autograd tape (each op's output remembers a GradNode).
// Tensors are immutable in shape and always contiguous; ops return new tensors. This file holds the
// class, the factories and the backward engine; the ops themselves live in ops.ts.
import { checkOptions, describe, expectBoolean, expectInteger, LoraError, rangeError, typeError } from './errors';
import { DEVICE_ID, DTYPE_ID, native, NativeMemory, NativeStorage } from './native';
import { defaultRng, recordSeeds, replaySeeds, Rng } from './random';

export type Device = 'cpu' | 'cuda';
export type DType = 'float32' | 'bfloat16' | 'float16' | 'int32';

const DTYPES: readonly DType[] = ['float32', 'bfloat16', 'float16', 'int32'];
const DEVICES: readonly Device[] = ['cpu', 'cuda'];

/** One recorded op: how to turn the gradient of its output into gradients of its inputs. */
export interface GradNode {
  readonly name: string;
  readonly inputs: readonly Tensor[];
  /** Returns one fresh gradient per input (null where the input needs none). */
  backward(grad: Tensor): (Tensor | null)[];
}

const CONSTRUCT = Symbol('lora-native.construct');

// ---- scopes (tidy) and no-grad mode ---------------------------------------------------------

const scopes: Set<Tensor>[] = [];
let gradEnabled = true;

function track(t: Tensor): void {
  if (scopes.length) scopes[scopes.length - 1]!.add(t);
}

/**
 * @internal The values of t under another shape without a copy, for a fresh intermediate of a pass
 * that records no gradient through it: the result takes over t's storage and t leaves its tidy()
 * scope (whoever still held t sees it disposed once the result is). A t that a gradient could flow
 * through gets copy(t, shape).
 */
export function reshapeInference(t: Tensor, shape: readonly number[], copy: (t: Tensor, shape: readonly number[]) => Tensor): Tensor {
  if (t._node !== null || t.requiresGrad || numelOf(shape) !== t.size) return copy(t, shape);
  keep(t);
  return new Tensor(CONSTRUCT, t._storage, shape);
}

// Disposed storages of no elements, one per device and dtype: what a tensor whose storage another
// took over (takeStorage) is left holding, so that it reads as disposed and frees nothing.
const spentStorages = new Map<number, NativeStorage>();
function spentStorage(s: NativeStorage): NativeStorage {
  const key = s.device * 16 + s.dtype;
  let spent = spentStorages.get(key);
  if (!spent) {
    spent = native.alloc(s.device, s.dtype, 0);
    native.dispose(spent);
    spentStorages.set(key, spent);
  }
  return spent;
}

// Storages that more than one tensor holds, and how many hold each: add's backward hands one
// gradient to both its inputs, and a checkpoint its gradient to the recomputed block, without a
// copy (shareStorage). A storage held so is only read: accumulate() adds into the other operand or
// a new tensor, a leaf's .grad gets a copy, and the last holder's dispose() frees it.
const holders = new WeakMap<NativeStorage, number>();

/** @internal A second tensor over t's storage (no copy), for a gradient that is only read. */
export function shareStorage(t: Tensor): Tensor {
  const s = t._live();
  holders.set(s, (holders.get(s) ?? 1) + 1);
  return new Tensor(CONSTRUCT, s, t.shape);
}

/** @internal Whether another tensor holds t's storage too (shareStorage): t must not be written. */
export function isShared(t: Tensor): boolean {
  return (holders.get(t._storage) ?? 1) > 1;
}

/**
 * @internal The values of t under another shape without a copy, where nothing reads t again: the
 * gradient a backward function receives (runBackward disposes it once the function returns), or
 * a projection's fresh output split into heads. The result takes over t's storage and t is left
 * disposed; its shape, graph node and saved tensors stay, so the op that made t must not read its
 * own output in its backward (linear() and loraLinear() do not).
 */
export function takeStorage(t: Tensor, shape: readonly number[]): Tensor {
  const s = t._live();
  if (numelOf(shape) !== s.numel)
    throw new LoraError('ERR_LORA_SHAPE', `Expected a shape with ${s.numel} elements but received ${shapeString(shape)}`);
  const out = new Tensor(CONSTRUCT, s, shape);
  t._storage = spentStorage(s);
  return out;
}

/** Removes a tensor from every open tidy() scope so that it outlives them. Returns it. */
export function keep<T extends Tensor>(t: T): T {
  for (const s of scopes) s.delete(t);
  return t;
}

function collectTensors(v: unknown, out: Set<Tensor>, depth = 0): void {
  if (v instanceof Tensor) out.add(v);
  else if (depth < 4 && Array.isArray(v)) for (const x of v) collectTensors(x, out, depth + 1);
  else if (depth < 4 && v && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype)
    for (const x of Object.values(v)) collectTensors(x, out, depth + 1);
}

/**
 * Runs fn and disposes every tensor created inside it, except those it returns (a tensor, or
 * tensors in an array or plain object) and those passed to keep(). Gradients that backward()
 * stores in `.grad` and optimizer state are kept automatically. fn must be synchronous.
 *
 * @example
 * const loss = tidy(() => mse(layer.forward(x), target)); // intermediates freed, loss kept
 * @throws LoraTypeError when fn is not a function or returns a Promise.
 */
export function tidy<T>(fn: () => T): T {
  if (typeof fn !== 'function') throw typeError('fn', 'a function', fn);
  const scope = new Set<Tensor>();
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (err) {
    scopes.pop();
    for (const t of scope) t.dispose();
    throw err;
  }
  scopes.pop();
  if (result && typeof (result as { then?: unknown }).then === 'function') {
    for (const t of scope) t.dispose();
    throw typeError('tidy() callback result', 'a synchronous function (tidy cannot track async work)', result);
  }
  const kept = new Set<Tensor>();
  collectTensors(result, kept);
  for (const t of scope) if (!kept.has(t)) t.dispose();
  for (const t of kept) if (scope.has(t)) track(t);
  return result;
}

/** Runs fn with gradient recording switched off (evaluation, parameter updates). */
export function noGrad<T>(fn: () => T): T {
  if (typeof fn !== 'function') throw typeError('fn', 'a function', fn);
  const prev = gradEnabled;
  gradEnabled = false;
  try {
    return fn();
  } finally {
    gradEnabled = prev;
  }
}

/** Whether ops currently record gradients (false inside noGrad). */
export function isGradEnabled(): boolean {
  return gradEnabled;
}

// ---- shapes ----------------------------------------------------------------------------------

export function numelOf(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function contiguousStrides(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i]!;
  }
  return s;
}

const MAX_DIMS = 8;
const MAX_ELEMENTS = 2 ** 40;

/** Validates a shape argument: an array of at most 8 non-negative integers. */
export function checkShape(name: string, shape: unknown): number[] {
  if (!Array.isArray(shape)) throw typeError(name, 'an array of non-negative integers', shape);
  if (shape.length > MAX_DIMS) throw rangeError(name, `at most ${MAX_DIMS} dimensions`, shape);
  for (const d of shape) {
    if (typeof d !== 'number') throw typeError(name, 'an array of non-negative integers', shape);
    if (!Number.isInteger(d) || d < 0) throw rangeError(name, 'an array of non-negative integers', shape);
  }
  if (numelOf(shape) > MAX_ELEMENTS) throw rangeError(name, `at most 2^40 elements`, shape);
  return shape.slice();
}

export function shapeString(shape: readonly number[]): string {
  return `[${shape.join(', ')}]`;
}

// ---- the Tensor class ------------------------------------------------------------------------

/**
 * An n-dimensional array in native memory. Create with tensor(), zeros(), ones(), randn().
 * Free with dispose() (or `using`, or tidy()); a dropped tensor is also freed by the garbage
 * collector, later.
 *
 * @example
 * using x = tensor([1, 2, 3, 4], [2, 2]);
 * console.log(x.shape, x.toFloat32Array());
 */
export class Tensor {
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
  readonly dtype: DType;
  readonly device: Device;
  /** Whether backward() computes a gradient for this tensor. */
  requiresGrad: boolean;
  /** The accumulated gradient (same shape), or null. */
  grad: Tensor | null = null;
  /** @internal */
  _storage: NativeStorage;
  /** @internal the op that produced this tensor, when recorded */
  _node: GradNode | null = null;
  /** @internal tensors the GradNode saved for the backward; freed with this tensor */
  _saved: Tensor[] | null = null;

  /** @internal use the factories (tensor, zeros, ...) */
  constructor(key: symbol, storage: NativeStorage, shape: readonly number[], requiresGrad = false) {
    if (key !== CONSTRUCT) throw new LoraError('ERR_LORA_TYPE', 'Tensors are created with tensor(), zeros(), ones() or randn(), not new Tensor()');
    this._storage = storage;
    this.shape = Object.freeze(shape.slice());
    this.dtype = DTYPES[storage.dtype]!;
    this.device = DEVICES[storage.device]!;
    this.requiresGrad = requiresGrad;
    track(this);
  }

  /** Number of elements. */
  get size(): number {
    return this._storage.numel;
  }

  get ndim(): number {
    return this.shape.length;
  }

  /** True once dispose() ran. */
  get isDisposed(): boolean {
    return this._storage.disposed;
  }

  /** True for a tensor no op produced (a parameter or an input). */
  get isLeaf(): boolean {
    return this._node === null;
  }

  /** @internal throws ERR_LORA_DISPOSED when this tensor was disposed */
  _live(name = 'tensor'): NativeStorage {
    // A forged object: checked here, before an op allocates its output, so nothing is left behind.
    if (!(this._storage instanceof native.Storage)) throw typeError(name, 'a Tensor made by tensor(), zeros(), ...', this);
    if (this._storage.disposed)
      throw new LoraError('ERR_LORA_DISPOSED', `Expected a live tensor for ${name} but received a disposed tensor of shape ${shapeString(this.shape)}`);
    return this._storage;
  }

  /**
   * A copy of the data as float32 (bf16/f16 are widened; int32 converted). With `out`, the values
   * are written into its first `size` elements and that view of it is returned: a loop that reads
   * a tensor every step (a decode loop's logits) reuses one array instead of having a new one
   * allocated and its pages first touched each time (8 x 49152 logits: 40 µs against 0.13-5 ms).
   * A float32 tensor is read straight into `out`; other dtypes are widened through a temporary.
   *
   * @example const row = new Float32Array(vocab); logits.toFloat32Array(row);
   * @throws ERR_LORA_TYPE when `out` is not a Float32Array; ERR_LORA_SHAPE when it holds fewer than `size` elements.
   * @throws ERR_LORA_UNSUPPORTED for more than 2^32 elements (more than one typed array holds).
   */
  toFloat32Array(out?: Float32Array): Float32Array {
    const s = this._live();
    if (this.size > MAX_TYPED_ELEMENTS) throw tooBigForOneArray('toFloat32Array()', `${this.size} elements`);
    if (out === undefined) return widen(this.dtype, native.toHost(s));
    if (!(out instanceof Float32Array)) throw typeError('out', 'a Float32Array', out);
    if (out.length < this.size)
      throw new LoraError('ERR_LORA_SHAPE', `Expected out to hold at least ${this.size} elements (shape ${shapeString(this.shape)}) but received a Float32Array of ${out.length}`);
    const view = out.length === this.size ? out : out.subarray(0, this.size);
    if (this.dtype === 'float32') native.readBytes(s, 0, view);
    else view.set(widen(this.dtype, native.toHost(s)));
    return view;
  }

  /**
   * Resolves a copy of the data as float32, like toFloat32Array(), read on a worker thread so the
   * event loop keeps turning while a large tensor (or a GPU tensor) is copied out. The tensor may
   * be disposed while the read is in flight: its memory is freed when the read completes.
   *
   * @example const values = await logits.data();
   * @throws ERR_LORA_DISPOSED (synchronously) when the tensor was already disposed.
   */
  data(): Promise<Float32Array> {
    const s = this._live();
    const dtype = this.dtype;
    return native.toHostAsync(s).then((bytes) => widen(dtype, bytes));
  }

  /**
   * A copy of the raw stored bytes (bf16 bits for bfloat16, and so on).
   * @throws ERR_LORA_UNSUPPORTED for more than 4 GiB (more than one typed array holds).
   */
  toBytes(): Uint8Array {
    const s = this._live();
    const bytes = this.size * (this.dtype === 'bfloat16' || this.dtype === 'float16' ? 2 : 4);
    if (bytes > MAX_TYPED_ELEMENTS) throw tooBigForOneArray('toBytes()', `${bytes} bytes`);
    return new Uint8Array(native.toHost(s));
  }

  /** The value of a one-element tensor. */
  item(): number {
    if (this.size !== 1) throw new LoraError('ERR_LORA_SHAPE', `Expected a tensor with one element for item() but received shape ${shapeString(this.shape)}`);
    return this.toFloat32Array()[0]!;
  }

  /** The data as nested arrays (for printing and tests). */
  toArray(): unknown {
    const data = Array.from(this.toFloat32Array());
    if (this.shape.length === 0) return data[0];
    const build = (dim: number, offset: number): unknown => {
      const n = this.shape[dim]!;
      const stride = numelOf(this.shape.slice(dim + 1));
      return Array.from({ length: n }, (_, i) => dim === this.shape.length - 1 ? data[offset + i] : build(dim + 1, offset + i * stride));
    };
    return build(0, 0);
  }

  /**
   * Copies src's values into this tensor in place (same shape, same device; src may be a
   * Float32Array of the same size). Not recorded by autograd.
   * @throws ERR_LORA_SHAPE on a shape mismatch, ERR_LORA_DISPOSED after dispose.
   */
  assign(src: Tensor | Float32Array): this {
    const dst = this._live('this tensor');
    if (src instanceof Float32Array) {
      if (src.length !== this.size) throw new LoraError('ERR_LORA_SHAPE', `Expected ${this.size} values for assign() but received ${src.length}`);
      const tmp = native.fromHost(dst.device, DTYPE_ID.float32, src);
      try {
        if (this.dtype === 'float32') native.copyInto(dst, tmp);
        else native.convert(dst, tmp);
      } finally {
        native.dispose(tmp);
      }
      return this;
    }
    if (!(src instanceof Tensor)) throw typeError('src', 'a Tensor or a Float32Array', src);
    const s = src._live('src');
    if (!sameShape(src.shape, this.shape))
      throw new LoraError('ERR_LORA_SHAPE', `Expected src of shape ${shapeString(this.shape)} for assign() but received ${shapeString(src.shape)}`);
    if (src.device !== this.device) throw new LoraError('ERR_LORA_DEVICE', `Expected src on ${this.device} for assign() but received a tensor on ${src.device}`);
    if (src.dtype === this.dtype) native.copyInto(dst, s);
    else native.convert(dst, s);
    return this;
  }

  /**
   * This tensor on another device (a copy; the same tensor when it is already there).
   * @throws ERR_LORA_NO_CUDA when CUDA is unavailable (with the reason).
   */
  to(device: Device): Tensor {
    const d = checkDevice('device', device);
    if (d === this.device) return this;
    const out = new Tensor(CONSTRUCT, native.toDevice(this._live(), DEVICE_ID[d]), this.shape);
    const from = this.device;
    return record(out, { name: 'to', inputs: [this], backward: (g) => [g.to(from)] });
  }

  /** A copy with no autograd history (a new leaf). */
  detach(): Tensor {
    const s = this._live();
    const out = new Tensor(CONSTRUCT, native.alloc(s.device, s.dtype, s.numel), this.shape);
    native.copyInto(out._storage, s);
    return out;
  }

  /** A copy converted to another dtype (float32 <-> bfloat16/float16). Not recorded by autograd. */
  toDtype(dtype: DType): Tensor {
    const dt = checkDtype('dtype', dtype);
    const s = this._live();
    const out = new Tensor(CONSTRUCT, native.alloc(s.device, DTYPE_ID[dt], s.numel), this.shape);
    try {
      if (dt === this.dtype) native.copyInto(out._storage, s);
      else native.convert(out._storage, s);
    } catch (err) {
      out.dispose();
      if (err instanceof LoraError && err.code === 'ERR_LORA_UNSUPPORTED')
        throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected a conversion this backend has for toDtype() but received ${this.dtype} -> ${dt} on ${this.device} (${err.message})`);
      throw err;
    }
    return out;
  }

  /** Frees the native memory now. Idempotent; the gradient, if any, is disposed too. */
  dispose(): void {
    const s = this._storage;
    if (!s.disposed) {
      const n = holders.get(s);
      if (n === undefined) {
        native.dispose(s);
      } else {
        // another tensor still holds it (shareStorage): let go of it, free nothing
        if (n > 2) holders.set(s, n - 1);
        else holders.delete(s);
        this._storage = spentStorage(s);
      }
    }
    if (this.grad) {
      this.grad.dispose();
      this.grad = null;
    }
    // The GradNode stays: a disposed intermediate still passes gradients through, and an op
    // whose backward needs a freed tensor says so (ERR_LORA_DISPOSED).
    if (this._saved) for (const t of this._saved) t.dispose();
    this._saved = null;
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  /** Sets .grad to null (disposing the old gradient). */
  zeroGrad(): void {
    if (this.grad) this.grad.dispose();
    this.grad = null;
  }

  /**
   * Back-propagates from this tensor: accumulates d(this)/d(leaf) · gradient into `.grad` of every
   * leaf that requires a gradient. A one-element tensor needs no gradient argument; any other
   * needs one of its own shape.
   * @throws ERR_LORA_GRAD when this tensor does not require a gradient, or a non-scalar is given none.
   */
  backward(gradient?: Tensor): void {
    this._live();
    if (!this.requiresGrad)
      throw new LoraError('ERR_LORA_GRAD', 'Expected a tensor that requires a gradient for backward() but received one that does not (no input had requiresGrad: true, or it was made under noGrad)');
    let seed: Tensor;
    if (gradient === undefined) {
      if (this.size !== 1)
        throw new LoraError('ERR_LORA_GRAD', `Expected a gradient argument for backward() on a tensor of shape ${shapeString(this.shape)} (only a one-element tensor may omit it)`);
      seed = full(this.shape, 1, { device: this.device });
    } else {
      if (!(gradient instanceof Tensor)) throw typeError('gradient', 'a Tensor', gradient);
      gradient._live('gradient');
      if (!sameShape(gradient.shape, this.shape))
        throw new LoraError('ERR_LORA_SHAPE', `Expected gradient of shape ${shapeString(this.shape)} but received ${shapeString(gradient.shape)}`);
      if (gradient.device !== this.device)
        throw new LoraError('ERR_LORA_DEVICE', `Expected gradient on ${this.device} but received a tensor on ${gradient.device}`);
      seed = gradient.detach();
    }
    runBackward(this, seed);
  }
}

export function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}


// A typed array holds at most 2^32 elements.
const MAX_TYPED_ELEMENTS = 2 ** 32;

function tooBigForOneArray(what: string, size: string): LoraError {
  return new LoraError('ERR_LORA_UNSUPPORTED', `Expected a tensor that fits one typed array (2^32 elements) for ${what} but it holds ${size}; saveSafetensors() writes larger ones in chunks`);
}

function widen(dtype: DType, bytes: ArrayBuffer): Float32Array {
  if (dtype === 'float32') return new Float32Array(bytes);
  if (dtype === 'int32') return Float32Array.from(new Int32Array(bytes));
  const bits = new Uint16Array(bytes);
  const out = new Float32Array(bits.length);
  const u32 = new Uint32Array(out.buffer);
  if (dtype === 'bfloat16') for (let i = 0; i < bits.length; i++) u32[i] = bits[i]! << 16;
  else for (let i = 0; i < bits.length; i++) out[i] = halfToFloat(bits[i]!);
  return out;
}

function halfToFloat(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Topological order of the recorded graph below root (inputs before their users). */
function topoOrder(root: Tensor): Tensor[] {
  const order: Tensor[] = [];
  const seen = new Set<Tensor>();
  const stack: [Tensor, number][] = [[root, 0]];
  seen.add(root);
  while (stack.length) {
    const top = stack[stack.length - 1]!;
    const [t, i] = top;
    const inputs = t._node ? t._node.inputs : [];
    if (i < inputs.length) {
      top[1] = i + 1;
      const inp = inputs[i]!;
      if (inp.requiresGrad && !seen.has(inp)) {
        seen.add(inp);
        stack.push([inp, 0]);
      }
    } else {
      order.push(t);
      stack.pop();
    }
  }
  return order;
}

function accumulate(map: Map<Tensor, Tensor>, t: Tensor, g: Tensor): void {
  const prev = map.get(t);
  if (!prev) {
    map.set(t, g);
    return;
  }
  // into whichever of the two no other tensor holds (shareStorage), or a new one
  if (!isShared(prev)) {
    native.axpy(prev._storage, g._storage, 1);
    g.dispose();
    return;
  }
  const sum = isShared(g) ? g.detach() : g;
  native.axpy(sum._storage, prev._storage, 1);
  if (sum !== g) g.dispose();
  prev.dispose();
  map.set(t, sum);
}

function runBackward(root: Tensor, seed: Tensor): void {
  const order = topoOrder(root);
  const grads = new Map<Tensor, Tensor>([[root, seed]]);
  for (let k = order.length - 1; k >= 0; k--) {
    const t = order[k]!;
    const g = grads.get(t);
    if (!g) continue;
    grads.delete(t);
    if (!t._node) {
      // a leaf: accumulate into .grad, which outlives any tidy() scope
      if (t.grad && !t.grad.isDisposed) {
        native.axpy(t.grad._storage, g._storage, 1);
        g.dispose();
      } else if (isShared(g)) {
        // .grad is written in place later (accumulation, clipping): a storage of its own
        t.grad = keep(g.detach());
        g.dispose();
      } else {
        t.grad = keep(g);
      }
      continue;
    }
    const ins = t._node.inputs;
    const gs = t._node.backward(g);
    g.dispose();
    for (let i = 0; i < ins.length; i++) {
      const gi = gs[i];
      if (!gi) continue;
      if (ins[i]!.requiresGrad) accumulate(grads, ins[i]!, gi);
      else gi.dispose();
    }
  }
  for (const g of grads.values()) g.dispose();
}

// ---- construction helpers used by ops ---------------------------------------------------------

/** @internal a new uninitialised float32 tensor */
export function empty(shape: readonly number[], device: Device = 'cpu', dtype: DType = 'float32'): Tensor {
  return new Tensor(CONSTRUCT, native.alloc(DEVICE_ID[device], DTYPE_ID[dtype], numelOf(shape)), shape);
}

/** @internal t itself when float32, else a float32 copy (the caller disposes it, or a tidy() does) */
export function asFloat32(t: Tensor): Tensor {
  return t.dtype === 'float32' ? t : t.toDtype('float32');
}

// While checkpoint() runs its function without recording, whether any op read a tensor that
// requires a gradient (a trainable parameter or a checkpointed input): then the output needs one.
let probe: { needsGrad: boolean } | null = null;

/** @internal wraps an op's output and records its GradNode when any input requires a gradient */
export function record(out: Tensor, node: GradNode): Tensor {
  if (gradEnabled && node.inputs.some((t) => t.requiresGrad)) {
    out.requiresGrad = true;
    out._node = node;
  } else if (probe && !probe.needsGrad && node.inputs.some((t) => t.requiresGrad)) {
    probe.needsGrad = true;
  }
  return out;
}

/**
 * Gradient checkpointing: runs `fn(...inputs)` keeping none of its intermediate tensors (only the
 * inputs stay, as the op's saved state) and, when backward() reaches its output, runs fn again
 * with gradients recorded and back-propagates through that recomputation. The gradients are the
 * same as without checkpointing (parameters fn reads receive theirs in `.grad`); memory holds one
 * call's activations at a time instead of all of them, for about one more forward pass of time.
 * The recomputation gets the kernel seeds the first run drew (from any generator), so dropout
 * inside fn draws the same masks and no generator advances twice. fn must be deterministic otherwise and return one tensor; the tensors it reads
 * besides `inputs` (parameters, tables) must stay alive until the backward pass.
 *
 * @example
 * for (const block of blocks) x = checkpoint((h) => block.forward(h), [x]);
 * @throws LoraTypeError when fn is not a function, inputs not an array of live tensors, or fn
 *   returns something other than a Tensor.
 */
export function checkpoint(fn: (...inputs: Tensor[]) => Tensor, inputs: readonly Tensor[]): Tensor {
  if (typeof fn !== 'function') throw typeError('fn', 'a function', fn);
  if (!Array.isArray(inputs)) throw typeError('inputs', 'an array of Tensors', inputs);
  inputs.forEach((t, i) => expectTensor(`inputs[${i}]`, t));
  const resultOf = (v: unknown): Tensor => {
    if (!(v instanceof Tensor)) throw typeError('checkpoint() callback result', 'a Tensor', v);
    return v;
  };
  if (!gradEnabled) return withRun(null, () => resultOf(fn(...inputs)));
  const prevProbe = probe;
  const seen = { needsGrad: inputs.some((t) => t.requiresGrad) };
  probe = seen;
  gradEnabled = false;
  let out: Tensor;
  let seeds: number[];
  const first: CheckpointRun = { replay: false, kept: [], pos: 0 };
  try {
    ({ result: out, seeds } = recordSeeds(() => withRun(first, () => tidy(() => resultOf(fn(...inputs))))));
  } catch (err) {
    for (const t of first.kept) t.dispose();
    throw err;
  } finally {
    gradEnabled = true;
    probe = prevProbe;
  }
  if (prevProbe && seen.needsGrad) prevProbe.needsGrad = true;
  if (!seen.needsGrad) {
    for (const t of first.kept) t.dispose();
    return out;
  }
  if (inputs.includes(out)) out = out.detach(); // fn returned an input: the output is a new tensor
  out.requiresGrad = true;
  saveFor(out, ...first.kept); // freed with the output
  out._node = {
    name: 'checkpoint', inputs: inputs.slice(),
    backward: (g) => {
      // inputs as new leaves, so that their gradients land in their .grad
      const leaves = inputs.map((t) => {
        const l = t.detach();
        l.requiresGrad = t.requiresGrad;
        return l;
      });
      try {
        tidy(() => {
          const y = replaySeeds(seeds, () => withRun({ replay: true, kept: first.kept, pos: 0 }, () => resultOf(fn(...leaves))));
          if (y.requiresGrad) runBackward(y, shareStorage(g));
        });
        return leaves.map((l) => {
          const gi = l.grad;
          l.grad = null;
          return gi;
        });
      } finally {
        for (const l of leaves) l.dispose();
      }
    },
  };
  return out;
}

// ---- outputs only the recomputation's graph reads ----------------------------------------------

/** One run of a checkpoint() function: the first (kept fills) or the backward's recomputation (replay). */
interface CheckpointRun { replay: boolean; kept: Tensor[]; pos: number }
/** The checkpoint() run in progress (null outside one, and in a run that records nothing). */
let run: CheckpointRun | null = null;
/** The run whose unreadOutput() region is in progress. */
let unread: CheckpointRun | null = null;

function withRun<T>(r: CheckpointRun | null, fn: () => T): T {
  const prev = run;
  const prevUnread = unread;
  run = r;
  unread = null;
  try {
    return fn();
  } finally {
    run = prev;
    unread = prevUnread;
  }
}

/**
 * @internal Runs fn, a product whose output nothing reads but the output of the checkpoint()
 * function it runs in (a decoder layer's last projection into its residual stream). Outside
 * checkpoint() it is fn(). The backward of that output reads none of its values, so when
 * checkpoint() recomputes the function, the ops in fn that support it (linear(), loraLinear())
 * skip their product and return zeros with the same backward; what that backward needs besides
 * its inputs (LoRA's h = x·Aᵀ) they keep from the first run (unreadKeep/unreadTake). Gradients
 * stay bit-identical; a recomputed layer saves its largest-K product.
 */
export function unreadOutput(fn: () => Tensor): Tensor {
  if (!run) return fn();
  const prev = unread;
  unread = run;
  try {
    return fn();
  } finally {
    unread = prev;
  }
}

/**
 * @internal Inside unreadOutput(): 'keep' in checkpoint()'s first run (the op passes what its
 * backward needs to unreadKeep), 'skip' in its recomputation (the op skips its product and takes
 * those tensors back from unreadTake, in the same order); null elsewhere (compute as usual).
 */
export function unreadMode(): 'keep' | 'skip' | null {
  return unread ? (unread.replay ? 'skip' : 'keep') : null;
}

/** @internal keeps t (owned by the checkpoint from now) for the recomputation's unreadTake(). */
export function unreadKeep(t: Tensor): void {
  unread!.kept.push(keep(t));
}

/** @internal the next tensor unreadKeep() kept in the first run (owned by the checkpoint: do not dispose). */
export function unreadTake(): Tensor {
  const r = unread!;
  const t = r.kept[r.pos++];
  if (!t) throw new LoraError('ERR_LORA_STATE', 'checkpoint(): the recomputation took more saved tensors than the first run kept (the function is not deterministic)');
  return t;
}

/**
 * @internal Ties tensors an op's backward needs to the op's output: they are freed with it. When
 * the output records no gradient they are freed now.
 */
export function saveFor(out: Tensor, ...saved: Tensor[]): Tensor {
  if (out.requiresGrad) out._saved = [...(out._saved ?? []), ...saved.map((t) => keep(t))];
  else for (const t of saved) t.dispose();
  return out;
}

/** @internal checks that v is a live Tensor */
export function expectTensor(name: string, v: unknown): Tensor {
  if (!(v instanceof Tensor)) throw typeError(name, 'a Tensor', v);
  v._live(name);
  return v;
}

export function checkDevice(name: string, v: unknown): Device {
  if (typeof v !== 'string') throw typeError(name, "'cpu' or 'cuda'", v);
  if (v !== 'cpu' && v !== 'cuda') throw rangeError(name, "'cpu' or 'cuda'", v);
  return v;
}

export function checkDtype(name: string, v: unknown): DType {
  if (typeof v !== 'string') throw typeError(name, `one of ${DTYPES.join(', ')}`, v);
  if (!DTYPES.includes(v as DType)) throw rangeError(name, `one of ${DTYPES.join(', ')}`, v);
  return v as DType;
}

// ---- factories -------------------------------------------------------------------------------

export interface TensorOptions {
  /** Record gradients for this tensor (a leaf). Default false. */
  requiresGrad?: boolean;
  /** 'cpu' (default) or 'cuda'. */
  device?: Device;
  /** Storage type: 'float32' (default), 'bfloat16' or 'float16' (frozen weights), 'int32' (ids). */
  dtype?: DType;
}

const TENSOR_OPTIONS = ['requiresGrad', 'device', 'dtype'] as const;

function factoryOptions(where: string, opts: unknown, extra: readonly string[] = []): Required<TensorOptions> {
  const o = checkOptions<TensorOptions & Record<string, unknown>>(where, opts, [...TENSOR_OPTIONS, ...extra]);
  const requiresGrad = o.requiresGrad === undefined ? false : expectBoolean('requiresGrad', o.requiresGrad);
  const device = o.device === undefined ? 'cpu' : checkDevice('device', o.device);
  const dtype = o.dtype === undefined ? 'float32' : checkDtype('dtype', o.dtype);
  if (requiresGrad && dtype !== 'float32')
    throw new LoraError('ERR_LORA_DTYPE', `Expected dtype 'float32' for a tensor with requiresGrad but received '${dtype}'`);
  return { requiresGrad, device, dtype };
}

function fromFloat32(data: Float32Array, shape: readonly number[], o: Required<TensorOptions>): Tensor {
  let storage: NativeStorage;
  if (o.dtype === 'float32') storage = native.fromHost(DEVICE_ID[o.device], DTYPE_ID.float32, data);
  else if (o.dtype === 'int32') {
    for (const v of data) if (!Number.isInteger(v)) throw rangeError('data', 'integers for an int32 tensor', v);
    storage = native.fromHost(DEVICE_ID[o.device], DTYPE_ID.int32, Int32Array.from(data));
  } else {
    const tmp = native.fromHost(DEVICE_ID[o.device], DTYPE_ID.float32, data);
    try {
      storage = native.alloc(DEVICE_ID[o.device], DTYPE_ID[o.dtype], data.length);
      native.convert(storage, tmp);
    } finally {
      native.dispose(tmp);
    }
  }
  return new Tensor(CONSTRUCT, storage, shape, o.requiresGrad);
}

/**
 * A tensor holding a copy of `data` with the given shape (row-major).
 *
 * @example
 * const x = tensor([1, 2, 3, 4, 5, 6], [2, 3], { requiresGrad: true });
 * @throws LoraTypeError for data that is not a Float32Array or array of numbers;
 *   ERR_LORA_SHAPE when data.length differs from the shape's element count.
 */
export function tensor(data: Float32Array | readonly number[], shape: readonly number[], opts?: TensorOptions): Tensor {
  const o = factoryOptions('tensor()', opts);
  const dims = checkShape('shape', shape);
  let values: Float32Array;
  if (data instanceof Float32Array) values = data;
  else if (Array.isArray(data)) {
    for (let i = 0; i < data.length; i++) if (typeof data[i] !== 'number') throw typeError(`data[${i}]`, 'a number', data[i]);
    values = Float32Array.from(data as number[]);
  } else throw typeError('data', 'a Float32Array or an array of numbers', data);
  if (values.length !== numelOf(dims))
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${numelOf(dims)} values for shape ${shapeString(dims)} but received ${values.length}`);
  return fromFloat32(values, dims, o);
}

/** A tensor filled with one value. */
export function full(shape: readonly number[], value: number, opts?: TensorOptions): Tensor {
  const o = factoryOptions('full()', opts);
  const dims = checkShape('shape', shape);
  if (typeof value !== 'number') throw typeError('value', 'a number', value);
  if (o.dtype !== 'float32') return fromFloat32(new Float32Array(numelOf(dims)).fill(value), dims, o);
  const t = new Tensor(CONSTRUCT, native.alloc(DEVICE_ID[o.device], DTYPE_ID.float32, numelOf(dims)), dims, o.requiresGrad);
  native.fill(t._storage, value);
  return t;
}

/** A tensor of zeros. */
export function zeros(shape: readonly number[], opts?: TensorOptions): Tensor {
  return full(shape, 0, opts);
}

/** A tensor of ones. */
export function ones(shape: readonly number[], opts?: TensorOptions): Tensor {
  return full(shape, 1, opts);
}

export interface RandomOptions extends TensorOptions {
  /** Seed for a reproducible draw; without it the global generator (manualSeed) is used. */
  seed?: number;
}

function rngFor(o: { seed?: unknown }): Rng {
  if (o.seed === undefined) return defaultRng();
  expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  return new Rng(o.seed as number);
}

/** Standard-normal random values. @example randn([3, 4], { seed: 1 }) */
export function randn(shape: readonly number[], opts?: RandomOptions): Tensor {
  const o = factoryOptions('randn()', opts, ['seed']);
  const dims = checkShape('shape', shape);
  const rng = rngFor((opts ?? {}) as RandomOptions);
  const data = new Float32Array(numelOf(dims));
  for (let i = 0; i < data.length; i++) data[i] = rng.normal();
  return fromFloat32(data, dims, o);
}

/** Uniform random values in [low, high) (default [0, 1)). */
export function rand(shape: readonly number[], opts?: RandomOptions & { low?: number; high?: number }): Tensor {
  const o = factoryOptions('rand()', opts, ['seed', 'low', 'high']);
  const dims = checkShape('shape', shape);
  const all = (opts ?? {}) as RandomOptions & { low?: number; high?: number };
  const low = all.low ?? 0;
  const high = all.high ?? 1;
  if (typeof low !== 'number' || !Number.isFinite(low)) throw typeError('low', 'a finite number', low);
  if (typeof high !== 'number' || !Number.isFinite(high) || high < low) throw rangeError('high', `a finite number >= low (${low})`, high);
  const rng = rngFor(all);
  const data = new Float32Array(numelOf(dims));
  for (let i = 0; i < data.length; i++) data[i] = low + (high - low) * rng.uniform();
  return fromFloat32(data, dims, o);
}

// ---- memory and threads ----------------------------------------------------------------------

export interface MemoryInfo extends NativeMemory {}

/**
 * Live native tensors and their bytes (`numTensors`, `numBytes`), per device, and what the
 * caching allocators hold for reuse.
 */
export function memory(): MemoryInfo {
  return native.memory();
}

/**
 * Restarts the peak counters of memory() (`cpuPeakBytes`, `cudaPeakBytes`) from the bytes live
 * now, to measure the peak of one step.
 *
 * @example
 * resetPeakMemory();
 * tidy(() => causalLmLoss(model.forward(ids), labels).backward());
 * console.log(memory().cpuPeakBytes);
 */
export function resetPeakMemory(): void {
  native.resetPeakMemory();
}

/** Frees memory the caching allocators keep for reuse. */
export function releaseCachedMemory(): void {
  native.releaseCached();
}

/** Sets the number of CPU threads the kernels use (default: the machine's core count, or LORA_NATIVE_THREADS). */
export function setNumThreads(n: number): void {
  expectInteger('threads', n, 1, 1024);
  native.setNumThreads(n);
}

export function getNumThreads(): number {
  return native.getNumThreads();
}

