// LoraLinear: a frozen linear layer plus a trainable low-rank update, as PEFT's lora.Linear:
//   y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ,   s = alpha/rank (or alpha/sqrt(rank) with rsLoRA).
// Forward and backward each run one native kernel (lora_forward / lora_backward); merge() folds
// s·B·A into W. Names map to the kernels' sizes: inFeatures = C, outFeatures = OC, rank = R.
import { checkOptions, PEFT_LORA_ALIASES, expectBoolean, expectInteger, expectNumber, LoraError, typeError } from './errors';
import { native, NativeStorage } from './native';
import { Module, uniformParameter } from './module';
import { linear } from './ops';
import { defaultRng, Rng } from './random';
import { checkDevice, Device, empty, record, saveFor, shapeString, Tensor, zeros } from './tensor';

export interface LoraLinearOptions {
  /** C: size of each input row. */
  inFeatures: number;
  /** OC: size of each output row. */
  outFeatures: number;
  /** R: rank of the update, 1..min(inFeatures, outFeatures). */
  rank: number;
  /** Scale numerator; default rank (so scaling = 1). */
  alpha?: number;
  /** Dropout probability on the LoRA path in training mode; default 0. */
  dropout?: number;
  /** Whether the base layer has a bias; default true. */
  bias?: boolean;
  /** rsLoRA: scaling = alpha / sqrt(rank); default false. */
  useRslora?: boolean;
  /**
   * An existing frozen weight (outFeatures, inFeatures), used as is: float32 or bfloat16 (read in
   * place by the kernels), or float16 (widened to float32 for each kernel call).
   */
  weight?: Tensor;
  /** An existing frozen bias (outFeatures), used as is; null for none. */
  biasTensor?: Tensor | null;
  /** Seed for the initialisation and dropout; default: the global generator. */
  seed?: number;
  /** Device for new parameters; default 'cpu' (or the given weight's). */
  device?: Device;
}

const OPTIONS = ['inFeatures', 'outFeatures', 'rank', 'alpha', 'dropout', 'bias', 'useRslora', 'weight', 'biasTensor', 'seed', 'device'] as const;
const MAX_FEATURES = 2 ** 31 - 1;

/**
 * A linear layer with a LoRA adapter.
 *
 * @example
 * const layer = new LoraLinear({ inFeatures: 64, outFeatures: 32, rank: 8, alpha: 16 });
 * const y = layer.forward(x);            // x: [..., 64] -> y: [..., 32]
 * const opt = new AdamW(layer.parameters(), { lr: 1e-3 }); // loraA and loraB
 * @throws LoraTypeError / LoraRangeError for bad options (rank outside 1..min(in, out), ...).
 */
export class LoraLinear extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  readonly rank: number;
  readonly dropout: number;
  private _alpha: number;
  private _useRslora: boolean;
  /** (outFeatures, inFeatures), frozen. */
  weight!: Tensor;
  /** (outFeatures), frozen; null without bias. */
  bias!: Tensor | null;
  /** (rank, inFeatures), trainable; Kaiming-uniform (a = sqrt(5)) like PEFT. */
  loraA!: Tensor;
  /** (outFeatures, rank), trainable; zeros, so a new adapter changes nothing. */
  loraB!: Tensor;
  private _merged = false;
  private _merging: Promise<void> | null = null;
  private readonly rng: Rng;

  constructor(options: LoraLinearOptions) {
    super();
    const o = checkOptions<LoraLinearOptions>('LoraLinear', options, OPTIONS, PEFT_LORA_ALIASES);
    if (options === undefined) throw typeError('LoraLinear options', 'an object with inFeatures, outFeatures and rank', options);
    this.inFeatures = expectInteger('inFeatures', o.inFeatures, 1, MAX_FEATURES);
    this.outFeatures = expectInteger('outFeatures', o.outFeatures, 1, MAX_FEATURES);
    const maxRank = Math.min(this.inFeatures, this.outFeatures);
    this.rank = expectInteger('rank', o.rank, 1, maxRank);
    this._alpha = o.alpha === undefined ? this.rank : expectNumber('alpha', o.alpha, 0, Infinity, 'a finite number > 0');
    if (this._alpha === 0) throw new LoraError('ERR_LORA_RANGE', 'Expected a finite number > 0 for alpha but received 0 (number)');
    this.dropout = o.dropout === undefined ? 0 : expectNumber('dropout', o.dropout, 0, 1, 'a number in [0, 1)');
    if (this.dropout >= 1) throw new LoraError('ERR_LORA_RANGE', `Expected a number in [0, 1) for dropout but received ${this.dropout} (number)`);
    this._useRslora = o.useRslora === undefined ? false : expectBoolean('useRslora', o.useRslora);
    const hasBias = o.bias === undefined ? true : expectBoolean('bias', o.bias);
    this.rng = o.seed === undefined ? new Rng(defaultRng().seed()) : new Rng(expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER));
    let device: Device = o.device === undefined ? (o.weight instanceof Tensor ? o.weight.device : 'cpu') : checkDevice('device', o.device);

    const C = this.inFeatures;
    const OC = this.outFeatures;
    const bound = 1 / Math.sqrt(C); // kaiming_uniform(a=sqrt(5)) on fan_in C: gain·sqrt(3/C) = 1/sqrt(C)
    if (o.weight !== undefined) {
      const w = o.weight;
      if (!(w instanceof Tensor)) throw typeError('weight', 'a Tensor', w);
      w._live('weight');
      if (w.ndim !== 2 || w.shape[0] !== OC || w.shape[1] !== C)
        throw new LoraError('ERR_LORA_SHAPE', `Expected weight of shape [${OC}, ${C}] but received ${shapeString(w.shape)}`);
      if (w.dtype === 'int32')
        throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 weight but received ${w.dtype}`);
      device = w.device;
      this.weight = w;
    } else {
      this.weight = uniformParameter([OC, C], bound, this.rng, device);
    }
    this.weight.requiresGrad = false;
    this.registerParameter('weight', this.weight);

    let b: Tensor | null = null;
    if (o.biasTensor !== undefined && o.biasTensor !== null) {
      const bt = o.biasTensor;
      if (!(bt instanceof Tensor)) throw typeError('biasTensor', 'a Tensor or null', bt);
      bt._live('biasTensor');
      if (bt.ndim !== 1 || bt.shape[0] !== OC) throw new LoraError('ERR_LORA_SHAPE', `Expected bias of shape [${OC}] but received ${shapeString(bt.shape)}`);
      if (bt.device !== device) throw new LoraError('ERR_LORA_DEVICE', `Expected bias on ${device} but received a tensor on ${bt.device}`);
      b = bt;
    } else if (hasBias && o.biasTensor === undefined) {
      b = uniformParameter([OC], bound, this.rng, device);
    }
    if (b) b.requiresGrad = false;
    this.bias = b;
    this.registerParameter('bias', b);

    this.loraA = uniformParameter([this.rank, C], bound, this.rng, device);
    this.loraA.requiresGrad = true;
    this.registerParameter('loraA', this.loraA);
    this.loraB = zeros([OC, this.rank], { device, requiresGrad: true });
    this.registerParameter('loraB', this.loraB);
  }

  /** True while s·B·A is folded into the weight. */
  get merged(): boolean {
    return this._merged;
  }

  /** Scale numerator (PEFT's lora_alpha). */
  get alpha(): number {
    return this._alpha;
  }

  /** rsLoRA: scaling = alpha / sqrt(rank). */
  get useRslora(): boolean {
    return this._useRslora;
  }

  /** alpha / rank, or alpha / sqrt(rank) with rsLoRA. */
  get scaling(): number {
    return this._useRslora ? this._alpha / Math.sqrt(this.rank) : this._alpha / this.rank;
  }

  /**
   * @internal Takes another alpha / rsLoRA setting (loadLoraAdapter adopts the file's).
   * @throws ERR_LORA_STATE while merged (the folded-in update was made with the old scaling).
   */
  _setScaling(alpha: number, useRslora: boolean, where: string): void {
    this.checkIdle('loading an adapter');
    if (this._merged && (alpha !== this._alpha || useRslora !== this._useRslora))
      throw new LoraError('ERR_LORA_STATE', `Expected an unmerged LoraLinear for ${where} but it is merged; call unmerge() first`);
    this._alpha = expectNumber('alpha', alpha, Number.MIN_VALUE, Infinity, 'a finite number > 0');
    this._useRslora = expectBoolean('useRslora', useRslora);
  }

  /**
   * @internal W + scaling·B·A as a new tensor in the weight's dtype (fp32 math, one rounding); the
   * layer is unchanged. After merge() the weight itself already is that.
   */
  _mergedWeight(): Tensor {
    this.checkIdle('merge()');
    const out = this.weight.toDtype(this.weight.dtype);
    if (!this._merged) native.loraMerge(out._storage, this.loraA._live('loraA'), this.loraB._live('loraB'), this.outFeatures, this.inFeatures, this.rank, this.scaling);
    return out;
  }

  /**
   * y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ for x of shape [..., inFeatures]. Dropout applies in
   * training mode only. After merge() it is the plain linear layer.
   * @throws ERR_LORA_SHAPE when x's last dim is not inFeatures; ERR_LORA_DEVICE across devices.
   */
  forward(x: Tensor): Tensor {
    this.checkIdle('forward()');
    this.checkInput(x, this.inFeatures, 'LoraLinear.forward()');
    const W = this.weight;
    const b = this.bias;
    const A = this.loraA;
    const B = this.loraB;
    for (const [name, t] of [['weight', W], ['loraA', A], ['loraB', B], ['bias', b]] as const) {
      if (!t) continue;
      t._live(name);
      if (t.device !== x.device)
        throw new LoraError('ERR_LORA_DEVICE', `Expected x on ${t.device} (where the layer's ${name} is) but received a tensor on ${x.device}`);
    }
    if (this._merged) return linear(x, W, b);

    const C = this.inFeatures;
    const OC = this.outFeatures;
    const R = this.rank;
    const N = x.size / C;
    const s = this.scaling;
    const p = this.training ? this.dropout : 0;
    const seed = p > 0 ? this.rng.seed() : 0;
    const y = empty([...x.shape.slice(0, -1), OC], x.device);
    const h = empty([N, R], x.device);
    withKernelWeight(W, (w) => native.loraForward(y._storage, h._storage, x._storage, w, b ? b._storage : null, A._storage, B._storage, N, C, OC, R, s, p, seed));
    const out = record(y, {
      name: 'lora_forward',
      inputs: [x, A, B],
      backward: (g) => {
        const dx = x.requiresGrad ? empty(x.shape, x.device) : null;
        const dA = A.requiresGrad ? zeros(A.shape, { device: A.device }) : null;
        const dB = B.requiresGrad ? zeros(B.shape, { device: B.device }) : null;
        withKernelWeight(W, (w) => native.loraBackward(dx ? dx._storage : null, dA ? dA._storage : null, dB ? dB._storage : null,
          g._storage, x._live('the input of a LoraLinear forward'), h._live('saved activations'), w, A._live('loraA'),
          B._live('loraB'), N, C, OC, R, s, p, seed));
        return [dx, dA, dB];
      },
    });
    return saveFor(out, h);
  }

  /**
   * Folds the adapter into the weight: W += scaling·B·A. Forward is then one plain linear layer.
   * A second merge() does nothing (like PEFT).
   */
  merge(): void {
    this.checkIdle('merge()');
    if (this._merged) return;
    mergeInto(this.weight, this.loraA._live('loraA'), this.loraB._live('loraB'), this.outFeatures, this.inFeatures, this.rank, this.scaling);
    this._merged = true;
  }

  /** Undoes merge(): W -= scaling·B·A (exact up to float rounding). */
  unmerge(): void {
    this.checkIdle('unmerge()');
    if (!this._merged) return;
    mergeInto(this.weight, this.loraA._live('loraA'), this.loraB._live('loraB'), this.outFeatures, this.inFeatures, this.rank, -this.scaling);
    this._merged = false;
  }

  /**
   * merge() on a worker thread: the event loop keeps turning while W += scaling·B·A runs. Until
   * the promise settles, forward(), merge() and unmerge() throw ERR_LORA_BUSY (other native calls
   * wait for the merge to finish); a second mergeAsync() returns the same promise.
   *
   * @example await layer.mergeAsync(); // layer.merged === true
   * @throws ERR_LORA_DISPOSED (synchronously) when a parameter was disposed.
   */
  mergeAsync(): Promise<void> {
    if (this._merging) return this._merging;
    if (this._merged) return Promise.resolve();
    if (this.weight.dtype === 'float16') {
      this.merge(); // no kernel merges into float16 in place: widen, merge, narrow (synchronously)
      return Promise.resolve();
    }
    const run = native.loraMergeAsync(this.weight._live('weight'), this.loraA._live('loraA'), this.loraB._live('loraB'),
      this.outFeatures, this.inFeatures, this.rank, this.scaling);
    this._merging = run.then(() => {
      this._merged = true;
    }).finally(() => {
      this._merging = null;
    });
    return this._merging;
  }

  private checkIdle(what: string): void {
    if (this._merging)
      throw new LoraError('ERR_LORA_BUSY', `Expected no mergeAsync() in flight for LoraLinear.${what}; await it first`);
  }

}

/**
 * Calls a kernel with the storage of a frozen weight it can read: the weight itself (float32,
 * bfloat16) or, for float16, a float32 copy made for this call.
 */
function withKernelWeight(W: Tensor, fn: (w: NativeStorage) => void): void {
  if (W.dtype !== 'float16') {
    fn(W._live('weight'));
    return;
  }
  const wide = W.toDtype('float32');
  try {
    fn(wide._storage);
  } finally {
    wide.dispose();
  }
}

/** W += s·B·A in place; a float16 W is widened, merged and rounded back once. */
function mergeInto(W: Tensor, A: NativeStorage, B: NativeStorage, OC: number, C: number, R: number, s: number): void {
  if (W.dtype !== 'float16') {
    native.loraMerge(W._live('weight'), A, B, OC, C, R, s);
    return;
  }
  const wide = W.toDtype('float32');
  try {
    native.loraMerge(wide._storage, A, B, OC, C, R, s);
    W.assign(wide);
  } finally {
    wide.dispose();
  }
}
