// LoraLinear: a frozen linear layer plus a trainable low-rank update, as PEFT's lora.Linear:
//   y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ,   s = alpha/rank (or alpha/sqrt(rank) with rsLoRA);
// with DoRA, y = m / ||W + s·B·A||_row ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b (lib/dora.ts). The module holds the
// parameters and state; forward is the LoRA op (lib/ops/lora.ts: one native kernel each way);
// merge() folds the update into W; PEFT's inits (lib/lora_init.ts) set A and B, PiSSA/OLoRA also W.
// inFeatures = C, outFeatures = OC, rank = R.
import { checkOptions, PEFT_LORA_ALIASES, expectBoolean, expectInteger, expectNumber, LoraError, typeError } from './errors';
import { doraLinear, doraWeightNorm } from './dora';
import { checkLoraInit, initChangesBase, LoraInit, loraInitFactors } from './lora_init';
import { mergeWeight } from './merge';
import { native, NativeStorage } from './native';
import { Module, uniformParameter } from './module';
import { div, linear, loraLinear, MatmulPrecision, reshape } from './ops';
import { defaultRng, Rng } from './random';
import { checkDevice, Device, keep, noGrad, shapeString, Tensor, tensor, tidy, zeros } from './tensor';

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
  /**
   * DoRA (PEFT's use_dora): a trainable magnitude vector m (outFeatures), initialised to the row
   * norms of W + s·B·A, rescales each output: y = m / ||W + s·B·A||_row ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b,
   * the norm recomputed each forward (without forming B·A) and held constant in the backward, as
   * PEFT does. Default false.
   */
  useDora?: boolean;
  /**
   * PEFT's init_lora_weights (see LoraInit): true (default), false, 'gaussian', 'pissa',
   * 'pissa_niter_N' or 'olora'. PiSSA and OLoRA overwrite the weight with the residual W - s·B·A
   * (in place: the tensor given as `weight` changes), computed once on the host in float64: about a
   * second for a 576 x 1536 weight on one core, more under load; a one-time cost, not per step.
   */
  initLoraWeights?: LoraInit;
}

const OPTIONS = ['inFeatures', 'outFeatures', 'rank', 'alpha', 'dropout', 'bias', 'useRslora', 'weight', 'biasTensor', 'seed', 'device', 'useDora', 'initLoraWeights'] as const;
const MAX_FEATURES = 2 ** 31 - 1;

/**
 * A linear layer with a LoRA adapter.
 *
 * @example
 * const layer = new LoraLinear({ inFeatures: 64, outFeatures: 32, rank: 8, alpha: 16 });
 * const y = layer.forward(x);            // x: [..., 64] -> y: [..., 32]
 * const opt = new AdamW(layer.parameters(), { lr: 1e-3 }); // loraA and loraB
 * const dora = new LoraLinear({ inFeatures: 64, outFeatures: 32, rank: 8, useDora: true, initLoraWeights: 'pissa' });
 * @throws LoraTypeError / LoraRangeError for bad options (rank outside 1..min(in, out), an unknown
 *   initLoraWeights, ...); ERR_LORA_UNSUPPORTED for PEFT inits lora-native lacks ('eva', 'loftq', ...);
 *   ERR_LORA_NON_FINITE when PiSSA/OLoRA meet a weight holding NaN or Inf.
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
  /** DoRA's magnitude vector m (outFeatures), trainable (PEFT's lora_magnitude_vector); null without DoRA. */
  loraMagnitude: Tensor | null = null;
  /** PEFT's init_lora_weights this layer was created with. */
  readonly initLoraWeights: LoraInit;
  /**
   * @internal A and B as PiSSA/OLoRA made them (host float32), kept so that saveLoraAdapter can
   * convert the trained adapter into a plain LoRA of the original weight; null for other inits.
   */
  _initialFactors: { A: Float32Array; B: Float32Array } | null = null;
  // DoRA while merged: the row scale m / ||W + s·B·A|| that merge() applied, for unmerge()
  private _doraMergeScale: Tensor | null = null;
  /**
   * How a merged layer's forward() multiplies by a bfloat16 weight ('fp32' default, or 'bf16': see
   * MatmulPrecision). Unmerged, the LoRA kernel's frozen product already uses the bf16 dot product
   * where the CPU has one; the adapter's own products stay fp32. applyLora copies it from the
   * Linear it replaces, and unloading copies it back.
   */
  matmulPrecision: MatmulPrecision = 'fp32';
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
    const useDora = o.useDora === undefined ? false : expectBoolean('useDora', o.useDora);
    this.initLoraWeights = o.initLoraWeights === undefined ? true : checkLoraInit('initLoraWeights', o.initLoraWeights);
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
    }
    // tensors made here are freed if a later step throws; a given weight changes only once all succeeded
    const made: Tensor[] = [];
    try {
      this.#initParameters(o, hasBias, useDora, device, bound, made);
    } catch (err) {
      for (const t of made) t.dispose();
      throw err;
    }
  }

  #initParameters(o: Partial<LoraLinearOptions>, hasBias: boolean, useDora: boolean, device: Device, bound: number, made: Tensor[]): void {
    const C = this.inFeatures;
    const OC = this.outFeatures;
    if (o.weight === undefined) made.push(this.weight = uniformParameter([OC, C], bound, this.rng, device));
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
      made.push(b = uniformParameter([OC], bound, this.rng, device));
    }
    if (b) b.requiresGrad = false;
    this.bias = b;
    this.registerParameter('bias', b);

    let residual: Float32Array | null = null;
    if (this.initLoraWeights === true) {
      made.push(this.loraA = uniformParameter([this.rank, C], bound, this.rng, device));
      made.push(this.loraB = zeros([OC, this.rank], { device, requiresGrad: true }));
    } else {
      const init = this.initLoraWeights;
      const W64 = initChangesBase(init) ? Float64Array.from(this.weight.toFloat32Array()) : null;
      const f = loraInitFactors(init, W64, OC, C, this.rank, this.scaling, this.rng);
      made.push(this.loraA = tensor(f.A, [this.rank, C], { device }));
      made.push(this.loraB = tensor(f.B, [OC, this.rank], { device }));
      residual = f.residual;
      if (residual) this._initialFactors = { A: f.A, B: f.B };
    }
    this.loraA.requiresGrad = true;
    this.loraB.requiresGrad = true;
    this.registerParameter('loraA', this.loraA);
    this.registerParameter('loraB', this.loraB);
    if (residual) this.weight.assign(residual); // PiSSA/OLoRA: W becomes W - s·B·A
    if (useDora) {
      // PEFT initialises m after A and B (and after PiSSA/OLoRA changed W): m = ||W + s·B·A||_row
      made.push(this.loraMagnitude = doraWeightNorm(this.weight, this.loraA, this.loraB, this.scaling));
      this.loraMagnitude.requiresGrad = true;
      this.registerParameter('loraMagnitude', this.loraMagnitude);
    }
  }

  /** DoRA (PEFT's use_dora): outputs rescaled by the trainable magnitude vector loraMagnitude. */
  get useDora(): boolean {
    return this.loraMagnitude !== null;
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
    if (this.loraMagnitude && !this._merged) {
      // DoRA: m / ||W + s·B·A||_row ⊙ (W + s·B·A) in float32, rounded once (LoraModel's merge)
      const module = { kind: 'linear' as const, loraA: this.loraA, loraB: this.loraB, loraBBias: null, magnitude: this.loraMagnitude, rank: this.rank, alpha: this._alpha, scaling: this.scaling };
      return mergeWeight('weight', this.weight, null, [{ module, scaling: this.scaling, fanInFanOut: false }], false).weight;
    }
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
    if (this._merged) return linear(x, W, b, { matmulPrecision: this.matmulPrecision });
    const p = this.training ? this.dropout : 0;
    if (this.loraMagnitude) {
      const m = this.loraMagnitude;
      m._live('loraMagnitude');
      if (m.device !== x.device) throw new LoraError('ERR_LORA_DEVICE', `Expected x on ${m.device} (where the layer's loraMagnitude is) but received a tensor on ${x.device}`);
      return doraLinear(x, W, b, A, B, m, this.scaling, p, p > 0 ? this.rng.seed() : 0);
    }
    return loraLinear(x, W, b, A, B, this.scaling, { dropout: p, seed: p > 0 ? this.rng.seed() : 0 });
  }

  /**
   * Folds the adapter into the weight: W += scaling·B·A (DoRA: W = m / ||W + s·B·A||_row ⊙
   * (W + s·B·A)). Forward is then one plain linear layer. A second merge() does nothing (like PEFT).
   */
  merge(): void {
    this.checkIdle('merge()');
    if (this._merged) return;
    if (this.loraMagnitude) {
      const m = this.loraMagnitude;
      const merged = this._mergedWeight();
      let scale: Tensor | null = null;
      try {
        scale = noGrad(() => tidy(() => keep(div(m, doraWeightNorm(this.weight, this.loraA, this.loraB, this.scaling)))));
        this.weight.assign(merged);
      } catch (err) {
        scale?.dispose();
        throw err;
      } finally {
        merged.dispose();
      }
      this._doraMergeScale = scale;
      this._merged = true;
      return;
    }
    mergeInto(this.weight, this.loraA._live('loraA'), this.loraB._live('loraB'), this.outFeatures, this.inFeatures, this.rank, this.scaling);
    this._merged = true;
  }

  /** Undoes merge(): W -= scaling·B·A (DoRA: W = W / (m / ||W + s·B·A||) - s·B·A); exact up to float rounding. */
  unmerge(): void {
    this.checkIdle('unmerge()');
    if (!this._merged) return;
    if (this._doraMergeScale) {
      const scale = this._doraMergeScale;
      const w = noGrad(() => tidy(() => keep(div(this.weight.toDtype('float32'), reshape(scale, [this.outFeatures, 1])))));
      try {
        native.loraMerge(w._storage, this.loraA._live('loraA'), this.loraB._live('loraB'), this.outFeatures, this.inFeatures, this.rank, -this.scaling);
        this.weight.assign(w);
      } finally {
        w.dispose();
      }
      scale.dispose();
      this._doraMergeScale = null;
      this._merged = false;
      return;
    }
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
    if (this.weight.dtype === 'float16' || this.loraMagnitude) {
      // no kernel merges into float16 in place, nor DoRA's rescale: merge() synchronously
      this.merge();
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

  /** @internal Frees the adapter's tensors (A, B, m and a merged DoRA's scale), not W or the bias. */
  _disposeAdapter(): void {
    for (const t of [this.loraA, this.loraB, this.loraMagnitude, this._doraMergeScale]) t?.dispose();
    this._doraMergeScale = null;
  }

  override to(device: Device): this {
    super.to(device);
    const scale = this._doraMergeScale;
    if (scale && scale.device !== device) {
      this._doraMergeScale = keep(noGrad(() => scale.to(device)));
      scale.dispose();
    }
    return this;
  }

  override dispose(): void {
    this._doraMergeScale?.dispose();
    this._doraMergeScale = null;
    super.dispose();
  }

  private checkIdle(what: string): void {
    if (this._merging)
      throw new LoraError('ERR_LORA_BUSY', `Expected no mergeAsync() in flight for LoraLinear.${what}; await it first`);
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
