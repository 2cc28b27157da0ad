// Layers built on Module and the ops: Linear, Embedding, LayerNorm, RMSNorm, Dropout, Activation,
// Sequential, MLP and a small pre-norm causal transformer language model with conventional
// parameter names (layers.0.attn.q_proj, ...). Also applyLora(), PEFT's get_peft_model for these
// modules, trainableParameters(), and saving/loading the adapter as a PEFT folder. Not a model
// zoo: no KV cache, no rotary embeddings, no weight tying.
import { checkOptions, PEFT_LORA_ALIASES, expectBoolean, expectInteger, expectNumber, expectOneOf, LoraError, typeError } from './errors';
import { LoraLinear } from './lora';
import { checkLoraInit, initChangesBase, LoraInit, mutatedToLora } from './lora_init';
import { allFinite } from './numerics';
import { expectModule, Module, uniformParameter } from './module';
import { add, attention, dropout, embedding, gelu, layerNorm, linear, MatmulPrecision, reshape, rmsNorm, unary, UnaryName } from './ops';
import { expectMatmulPrecision } from './ops/util';
import { configForModules, loadPeftAdapter, PeftAdapter, PeftConfig, PeftModule, savePeftAdapter } from './peft';
import { defaultRng, Rng } from './random';
import { checkDevice, Device, keep, ones, Tensor, tensor, zeros } from './tensor';

interface InitOptions {
  /** Seed for the initial values; default: the global generator (manualSeed). */
  seed?: number;
  /** Device for the parameters; default 'cpu'. */
  device?: Device;
}

function rngOf(seed: unknown): Rng {
  return seed === undefined ? new Rng(defaultRng().seed()) : new Rng(expectInteger('seed', seed, 0, Number.MAX_SAFE_INTEGER));
}

function deviceOf(d: unknown): Device {
  return d === undefined ? 'cpu' : checkDevice('device', d);
}

function normal(shape: number[], std: number, rng: Rng, device: Device): Tensor {
  const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
  for (let i = 0; i < data.length; i++) data[i] = rng.normal() * std;
  return tensor(data, shape, { device, requiresGrad: true });
}

// ---- basic layers ----------------------------------------------------------------------------

export interface LinearOptions extends InitOptions {
  /** Add a bias (default true). */
  bias?: boolean;
  /** An existing weight (outFeatures, inFeatures) to use as is (float32, bfloat16 or float16), not a new one. */
  weight?: Tensor;
  /** An existing bias (outFeatures) to use as is; null for none. */
  biasTensor?: Tensor | null;
  /**
   * The checkpoint stores this layer's weight as [inFeatures, outFeatures] (GPT-2's Conv1D); the
   * layer holds it as [out, in] like any Linear. applyLora records it as PEFT's fan_in_fan_out.
   */
  fanInFanOut?: boolean;
  /**
   * Products with a bfloat16 weight: 'fp32' (default) or 'bf16' (the input rounded to bf16 for a
   * bf16 dot product where the CPU has one; see MatmulPrecision). The layer's `matmulPrecision`
   * property, which may be changed later.
   */
  matmulPrecision?: MatmulPrecision;
}

/** An existing tensor given to a layer: live, of the layer's shape and on its device. */
function givenTensor(name: string, t: unknown, shape: number[], device: Device | undefined): Tensor {
  if (!(t instanceof Tensor)) throw typeError(name, 'a Tensor', t);
  t._live(name);
  if (t.ndim !== shape.length || t.shape.some((d, i) => d !== shape[i]))
    throw new LoraError('ERR_LORA_SHAPE', `Expected ${name} of shape [${shape.join(', ')}] but received [${t.shape.join(', ')}]`);
  if (device !== undefined && t.device !== device) throw new LoraError('ERR_LORA_DEVICE', `Expected ${name} on ${device} but received a tensor on ${t.device}`);
  return t;
}

/**
 * y = x·Wᵀ + b, weight (outFeatures, inFeatures) initialised like PyTorch's nn.Linear.
 * @example const fc = new Linear(64, 10); const y = fc.forward(x);
 * @throws LoraRangeError for non-positive sizes.
 */
export class Linear extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  /** True when the checkpoint stores the weight transposed, [in, out] (GPT-2's Conv1D). */
  readonly fanInFanOut: boolean;
  weight: Tensor;
  bias: Tensor | null;
  /**
   * How forward() multiplies by a bfloat16 weight: 'fp32' (default) or 'bf16' (see
   * MatmulPrecision); no effect on a float32 weight. loadCausalLM's `matmulPrecision` sets it on
   * every projection and the head.
   */
  matmulPrecision: MatmulPrecision;

  constructor(inFeatures: number, outFeatures: number, options?: LinearOptions) {
    super();
    const o = checkOptions<LinearOptions>('Linear', options, ['bias', 'seed', 'device', 'weight', 'biasTensor', 'fanInFanOut', 'matmulPrecision']);
    this.matmulPrecision = expectMatmulPrecision('matmulPrecision', o.matmulPrecision);
    this.inFeatures = expectInteger('inFeatures', inFeatures, 1, 2 ** 31 - 1);
    this.outFeatures = expectInteger('outFeatures', outFeatures, 1, 2 ** 31 - 1);
    this.fanInFanOut = o.fanInFanOut === undefined ? false : expectBoolean('fanInFanOut', o.fanInFanOut);
    const rng = rngOf(o.seed);
    const given = o.weight === undefined ? undefined : givenTensor('weight', o.weight, [this.outFeatures, this.inFeatures], o.device === undefined ? undefined : deviceOf(o.device));
    if (given && given.dtype === 'int32')
      throw new LoraError('ERR_LORA_DTYPE', `Expected a float32, bfloat16 or float16 weight but received ${given.dtype}`);
    const device = given ? given.device : deviceOf(o.device);
    const bound = 1 / Math.sqrt(this.inFeatures); // kaiming_uniform(a=√5) on fan-in, as PyTorch
    this.weight = given ?? uniformParameter([this.outFeatures, this.inFeatures], bound, rng, device);
    this.registerParameter('weight', this.weight);
    const hasBias = o.bias === undefined ? true : expectBoolean('bias', o.bias);
    this.bias = o.biasTensor !== undefined ? (o.biasTensor === null ? null : givenTensor('biasTensor', o.biasTensor, [this.outFeatures], device))
      : hasBias ? uniformParameter([this.outFeatures], bound, rng, device) : null;
    this.registerParameter('bias', this.bias);
  }

  forward(x: Tensor): Tensor {
    this.checkInput(x, this.inFeatures, 'Linear.forward()');
    return linear(x, this.weight, this.bias, { matmulPrecision: this.matmulPrecision });
  }
}

export interface EmbeddingOptions extends InitOptions {
  /** Standard deviation of the N(0, std²) initialisation; default 1 (PyTorch's nn.Embedding). */
  std?: number;
}

/** A lookup table: forward(ids int32 [...]) returns [..., embeddingDim]. */
export class Embedding extends Module {
  readonly numEmbeddings: number;
  readonly embeddingDim: number;
  weight: Tensor;

  constructor(numEmbeddings: number, embeddingDim: number, options?: EmbeddingOptions) {
    super();
    const o = checkOptions<EmbeddingOptions>('Embedding', options, ['std', 'seed', 'device']);
    this.numEmbeddings = expectInteger('numEmbeddings', numEmbeddings, 1, 2 ** 31 - 1);
    this.embeddingDim = expectInteger('embeddingDim', embeddingDim, 1, 2 ** 31 - 1);
    const std = o.std === undefined ? 1 : expectNumber('std', o.std, 0);
    this.weight = normal([this.numEmbeddings, this.embeddingDim], std, rngOf(o.seed), deviceOf(o.device));
    this.registerParameter('weight', this.weight);
  }

  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight);
  }
}

/** Layer normalisation over the last dim with a learned scale (weight) and shift (bias). */
export class LayerNorm extends Module {
  readonly dim: number;
  readonly eps: number;
  weight: Tensor;
  bias: Tensor;

  constructor(dim: number, options?: { eps?: number; device?: Device }) {
    super();
    const o = checkOptions<{ eps?: number; device?: Device }>('LayerNorm', options, ['eps', 'device']);
    this.dim = expectInteger('dim', dim, 1, 2 ** 31 - 1);
    this.eps = o.eps === undefined ? 1e-5 : expectNumber('eps', o.eps, 0);
    const device = deviceOf(o.device);
    this.weight = ones([this.dim], { device, requiresGrad: true });
    this.bias = zeros([this.dim], { device, requiresGrad: true });
    this.registerParameter('weight', this.weight);
    this.registerParameter('bias', this.bias);
  }

  forward(x: Tensor): Tensor {
    this.checkInput(x, this.dim, 'LayerNorm.forward()');
    return layerNorm(x, this.weight, this.bias, this.eps);
  }
}

/** RMS normalisation over the last dim with a learned scale (weight). */
export class RMSNorm extends Module {
  readonly dim: number;
  readonly eps: number;
  weight: Tensor;

  constructor(dim: number, options?: { eps?: number; device?: Device }) {
    super();
    const o = checkOptions<{ eps?: number; device?: Device }>('RMSNorm', options, ['eps', 'device']);
    this.dim = expectInteger('dim', dim, 1, 2 ** 31 - 1);
    this.eps = o.eps === undefined ? 1e-6 : expectNumber('eps', o.eps, 0);
    this.weight = ones([this.dim], { device: deviceOf(o.device), requiresGrad: true });
    this.registerParameter('weight', this.weight);
  }

  forward(x: Tensor): Tensor {
    this.checkInput(x, this.dim, 'RMSNorm.forward()');
    return rmsNorm(x, this.weight, this.eps);
  }
}

/** Dropout in training mode, identity in eval mode. Its mask seeds come from its own generator. */
export class Dropout extends Module {
  readonly p: number;
  /** @internal the generator of mask seeds (checkpointed by train()) */
  readonly rng: Rng;

  constructor(p: number, options?: { seed?: number }) {
    super();
    const o = checkOptions<{ seed?: number }>('Dropout', options, ['seed']);
    this.p = expectNumber('p', p, 0, 1, 'a number in [0, 1)');
    if (this.p >= 1) throw new LoraError('ERR_LORA_RANGE', `Expected a number in [0, 1) for p but received ${p} (number)`);
    this.rng = rngOf(o.seed);
  }

  forward(x: Tensor): Tensor {
    if (!this.training || this.p === 0) return dropout(x, 0, { training: false });
    return dropout(x, this.p, { seed: this.rng.seed() });
  }
}

export type ActivationName = 'relu' | 'gelu' | 'geluTanh' | 'silu' | 'tanh' | 'sigmoid';
const ACTIVATIONS: readonly ActivationName[] = ['relu', 'gelu', 'geluTanh', 'silu', 'tanh', 'sigmoid'];

/** An elementwise activation as a module (for Sequential). */
export class Activation extends Module {
  readonly name: ActivationName;
  constructor(name: ActivationName) {
    super();
    this.name = expectOneOf('activation', name, ACTIVATIONS);
  }
  forward(x: Tensor): Tensor {
    if (this.name === 'gelu') return gelu(x);
    return unary(this.name as UnaryName, x);
  }
}

/** Runs modules one after another; children are named '0', '1', ... */
export class Sequential extends Module {
  constructor(...modules: Module[]) {
    super();
    modules.forEach((m, i) => this.registerModule(String(i), m));
  }

  /** The children in order. */
  get modules(): Module[] {
    return this.namedChildren().map(([, m]) => m);
  }

  forward(x: Tensor): Tensor {
    let cur = x;
    for (const m of this.modules) cur = m.forward(cur);
    return cur;
  }
}

export interface MLPOptions extends InitOptions {
  /** Activation between the layers (default 'relu'). */
  activation?: ActivationName;
  /** Dropout after each activation (default 0). */
  dropout?: number;
}

/**
 * A multi-layer perceptron: Linear, activation, ..., Linear for sizes [in, hidden..., out].
 * Children are named '0', '1', ... (Linears at even positions when there is no dropout).
 * @example const mlp = new MLP([2, 32, 1], { activation: 'tanh', seed: 1 });
 */
export class MLP extends Sequential {
  constructor(sizes: readonly number[], options?: MLPOptions) {
    const o = checkOptions<MLPOptions>('MLP', options, ['activation', 'dropout', 'seed', 'device']);
    if (!Array.isArray(sizes) || sizes.length < 2) throw typeError('sizes', 'an array of at least two layer sizes', sizes);
    const rng = rngOf(o.seed);
    const act = o.activation ?? 'relu';
    const p = o.dropout ?? 0;
    const mods: Module[] = [];
    for (let i = 0; i + 1 < sizes.length; i++) {
      mods.push(new Linear(sizes[i]!, sizes[i + 1]!, { seed: rng.seed(), device: o.device }));
      if (i + 2 < sizes.length) {
        mods.push(new Activation(act));
        if (p > 0) mods.push(new Dropout(p, { seed: rng.seed() }));
      }
    }
    super(...mods);
  }
}

// ---- the transformer -------------------------------------------------------------------------

export interface TransformerOptions extends InitOptions {
  vocabSize: number;
  /** Width of the residual stream (C). */
  dModel: number;
  /** Attention heads; dModel must be a multiple. */
  nHeads: number;
  nLayers: number;
  /** Longest sequence (rows of the position embedding). */
  maxSeqLen: number;
  /** MLP hidden size = mlpRatio·dModel (default 4). */
  mlpRatio?: number;
  /** Dropout on attention output and MLP output (default 0). */
  dropout?: number;
  /** 'layer' (default) or 'rms' normalisation. */
  norm?: 'layer' | 'rms';
}

// The building blocks take a generator and a device from their parent; check them when called directly.
function checkParts(rng: unknown, device: unknown): void {
  if (!(rng instanceof Rng)) throw typeError('rng', 'an Rng', rng);
  checkDevice('device', device);
}

function makeNorm(kind: 'layer' | 'rms', dim: number, device: Device): Module {
  return kind === 'rms' ? new RMSNorm(dim, { device }) : new LayerNorm(dim, { device });
}

/** Multi-head causal self-attention: q_proj, k_proj, v_proj, o_proj (no biases). */
export class CausalSelfAttention extends Module {
  readonly nHeads: number;
  readonly dModel: number;

  constructor(dModel: number, nHeads: number, rng: Rng, device: Device) {
    super();
    checkParts(rng, device);
    expectInteger('dModel', dModel, 1, 65536);
    expectInteger('nHeads', nHeads, 1, dModel);
    if (dModel % nHeads !== 0) throw new LoraError('ERR_LORA_OPTION', `Expected dModel (${dModel}) to be a multiple of nHeads (${nHeads})`);
    this.dModel = dModel;
    this.nHeads = nHeads;
    for (const name of ['q_proj', 'k_proj', 'v_proj', 'o_proj'])
      this.registerModule(name, new Linear(dModel, dModel, { bias: false, seed: rng.seed(), device }));
  }

  forward(x: Tensor): Tensor {
    const [B, T, C] = x.shape as [number, number, number];
    const H = this.nHeads;
    const split = (name: string) => reshape(this.getModule(name)!.forward(x), [B, T, H, C / H]);
    const y = attention(split('q_proj'), split('k_proj'), split('v_proj'), { causal: true });
    return this.getModule('o_proj')!.forward(reshape(y, [B, T, C]));
  }
}

/** The transformer's feed-forward part: up_proj, GELU (tanh), down_proj. */
export class TransformerMLP extends Module {
  constructor(dModel: number, hidden: number, rng: Rng, device: Device) {
    super();
    checkParts(rng, device);
    expectInteger('dModel', dModel, 1, 65536);
    expectInteger('hidden', hidden, 1, 2 ** 20);
    this.registerModule('up_proj', new Linear(dModel, hidden, { seed: rng.seed(), device }));
    this.registerModule('down_proj', new Linear(hidden, dModel, { seed: rng.seed(), device }));
  }

  forward(x: Tensor): Tensor {
    return this.getModule('down_proj')!.forward(gelu(this.getModule('up_proj')!.forward(x), { approximate: 'tanh' }));
  }
}

/** One pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(x)). */
export class TransformerBlock extends Module {
  constructor(o: Required<Pick<TransformerOptions, 'dModel' | 'nHeads' | 'mlpRatio' | 'dropout' | 'norm'>>, rng: Rng, device: Device) {
    super();
    checkParts(rng, device);
    if (o === null || typeof o !== 'object') throw typeError('TransformerBlock options', 'an object with dModel, nHeads, mlpRatio, dropout and norm', o);
    expectNumber('mlpRatio', o.mlpRatio, 0.01, 64);
    expectNumber('dropout', o.dropout, 0, 0.99);
    expectOneOf('norm', o.norm, ['layer', 'rms'] as const);
    this.registerModule('ln_1', makeNorm(o.norm, o.dModel, device));
    this.registerModule('attn', new CausalSelfAttention(o.dModel, o.nHeads, rng, device));
    this.registerModule('ln_2', makeNorm(o.norm, o.dModel, device));
    this.registerModule('mlp', new TransformerMLP(o.dModel, Math.round(o.mlpRatio * o.dModel), rng, device));
    this.registerModule('drop', new Dropout(o.dropout, { seed: rng.seed() }));
  }

  forward(x: Tensor): Tensor {
    const m = (n: string) => this.getModule(n)!;
    const drop = m('drop') as Dropout;
    // skip the identity copy dropout makes when it is off
    const d = (t: Tensor) => (drop.training && drop.p > 0 ? drop.forward(t) : t);
    const h = add(x, d(m('attn').forward(m('ln_1').forward(x))));
    return add(h, d(m('mlp').forward(m('ln_2').forward(h))));
  }
}

/**
 * A small pre-norm causal transformer language model (GPT-2 shaped): tok_emb + pos_emb, blocks
 * layers.0..n-1 (ln_1, attn.{q,k,v,o}_proj, ln_2, mlp.{up,down}_proj), ln_f, lm_head.
 *
 * @example
 * const lm = new TransformerLM({ vocabSize: 32, dModel: 64, nHeads: 4, nLayers: 2, maxSeqLen: 32, seed: 1 });
 * const logits = lm.forward(ids); // ids int32 [B, T] -> [B, T, vocabSize]
 * @throws LoraRangeError for bad sizes; ERR_LORA_OPTION when dModel is not a multiple of nHeads.
 */
export class TransformerLM extends Module {
  readonly config: Required<Omit<TransformerOptions, 'seed' | 'device'>>;
  private readonly positions = new Map<number, Tensor>();

  constructor(options: TransformerOptions) {
    super();
    const o = checkOptions<TransformerOptions>('TransformerLM', options, ['vocabSize', 'dModel', 'nHeads', 'nLayers', 'maxSeqLen', 'mlpRatio', 'dropout', 'norm', 'seed', 'device']);
    if (options === undefined) throw typeError('TransformerLM options', 'an object with vocabSize, dModel, nHeads, nLayers and maxSeqLen', options);
    const cfg = {
      vocabSize: expectInteger('vocabSize', o.vocabSize, 1, 2 ** 31 - 1),
      dModel: expectInteger('dModel', o.dModel, 1, 65536),
      nHeads: expectInteger('nHeads', o.nHeads, 1, 4096),
      nLayers: expectInteger('nLayers', o.nLayers, 0, 1024),
      maxSeqLen: expectInteger('maxSeqLen', o.maxSeqLen, 1, 2 ** 24),
      mlpRatio: o.mlpRatio === undefined ? 4 : expectNumber('mlpRatio', o.mlpRatio, 0.01, 64),
      dropout: o.dropout === undefined ? 0 : expectNumber('dropout', o.dropout, 0, 0.99),
      norm: o.norm === undefined ? 'layer' as const : expectOneOf('norm', o.norm, ['layer', 'rms'] as const),
    };
    if (cfg.dModel % cfg.nHeads !== 0)
      throw new LoraError('ERR_LORA_OPTION', `Expected dModel to be a multiple of nHeads but received dModel ${cfg.dModel} and nHeads ${cfg.nHeads}`);
    this.config = cfg;
    const rng = rngOf(o.seed);
    const device = deviceOf(o.device);
    this.registerModule('tok_emb', new Embedding(cfg.vocabSize, cfg.dModel, { std: 0.1, seed: rng.seed(), device }));
    this.registerModule('pos_emb', new Embedding(cfg.maxSeqLen, cfg.dModel, { std: 0.1, seed: rng.seed(), device }));
    const blocks: Module[] = [];
    for (let i = 0; i < cfg.nLayers; i++) blocks.push(new TransformerBlock(cfg, rng, device));
    this.registerModule('layers', new Sequential(...blocks));
    this.registerModule('ln_f', makeNorm(cfg.norm, cfg.dModel, device));
    this.registerModule('lm_head', new Linear(cfg.dModel, cfg.vocabSize, { bias: false, seed: rng.seed(), device }));
  }

  /** Logits [B, T, vocabSize] for int32 token ids [B, T] (T <= maxSeqLen). */
  forward(ids: Tensor): Tensor {
    if (!(ids instanceof Tensor)) throw typeError('ids', 'an int32 Tensor of shape [batch, seq]', ids);
    if (ids.ndim !== 2) throw new LoraError('ERR_LORA_SHAPE', `Expected ids of shape [batch, seq] but received [${ids.shape.join(', ')}]`);
    const T = ids.shape[1]!;
    if (T > this.config.maxSeqLen) throw new LoraError('ERR_LORA_SHAPE', `Expected at most maxSeqLen (${this.config.maxSeqLen}) positions but received ${T}`);
    let pos = this.positions.get(T);
    if (!pos || pos.isDisposed || pos.device !== ids.device) {
      pos = keep(tensor(Float32Array.from({ length: T }, (_, i) => i), [T], { dtype: 'int32', device: ids.device }));
      this.positions.set(T, pos);
    }
    const x = add(this.getModule('tok_emb')!.forward(ids), this.getModule('pos_emb')!.forward(pos));
    const h = this.getModule('layers')!.forward(x);
    return this.getModule('lm_head')!.forward(this.getModule('ln_f')!.forward(h));
  }

  override dispose(): void {
    for (const p of this.positions.values()) p.dispose();
    this.positions.clear();
    super.dispose();
  }
}

// ---- LoRA on any model -----------------------------------------------------------------------

export interface ApplyLoraOptions {
  /**
   * Which Linear layers get an adapter, PEFT's way: a list of names (a module matches when its
   * path equals a name or ends with '.' + name), a RegExp (full match of the path), or
   * 'all-linear' (every Linear except an output head named lm_head).
   */
  targetModules: readonly string[] | RegExp | 'all-linear';
  /** R (default 8). */
  rank?: number;
  /** Scale numerator (default rank: scaling 1). */
  alpha?: number;
  /** Dropout on the LoRA path (default 0). */
  dropout?: number;
  /** rsLoRA scaling alpha/sqrt(rank) (default false). */
  useRslora?: boolean;
  /** Seed for lora_A's initialisation; default: the global generator. */
  seed?: number;
  /** DoRA on every adapted layer (PEFT's use_dora; see LoraLinearOptions.useDora). Default false. */
  useDora?: boolean;
  /**
   * PEFT's init_lora_weights: true (default), false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora'
   * (see LoraInit). PiSSA and OLoRA replace each adapted weight by its residual W - s·B·A in place:
   * the model's base weights change (see saveLoraAdapter's convertToLora).
   */
  initLoraWeights?: LoraInit;
}

/** What applyLora() did: the adapted module paths and the PEFT config describing them. */
export interface LoraInfo {
  modules: string[];
  config: PeftConfig;
}

const loraInfo = new WeakMap<Module, LoraInfo>();

function matchesTarget(path: string, target: ApplyLoraOptions['targetModules']): boolean {
  if (target === 'all-linear') return !/(^|\.)lm_head$/.test(path);
  if (target instanceof RegExp) return new RegExp(`^(?:${target.source})$`, target.flags.replace('g', '')).test(path);
  return target.some((n) => path === n || path.endsWith(`.${n}`));
}

/**
 * Swaps the targeted Linear layers of a model for LoraLinear layers that wrap the same weight and
 * bias tensors, and freezes everything else (PEFT's get_peft_model). Only lora_A/lora_B train.
 *
 * @example
 * applyLora(model, { targetModules: ['q_proj', 'v_proj', 'up_proj', 'down_proj'], rank: 8, alpha: 16 });
 * const opt = new AdamW(model.parameters(), { lr: 1e-3 });
 * @throws ERR_LORA_OPTION when no Linear matches targetModules, or the model already has adapters.
 */
export function applyLora(model: Module, options: ApplyLoraOptions): LoraInfo {
  expectModule('model', model);
  if (!(model instanceof Module)) throw typeError('model', 'a Module', model);
  const o = checkOptions<ApplyLoraOptions>('applyLora()', options, ['targetModules', 'rank', 'alpha', 'dropout', 'useRslora', 'seed', 'useDora', 'initLoraWeights'], PEFT_LORA_ALIASES);
  const target = o.targetModules;
  if (!(target instanceof RegExp) && target !== 'all-linear' && !(Array.isArray(target) && target.every((x) => typeof x === 'string')))
    throw typeError('targetModules', "an array of module names, a RegExp or 'all-linear'", target);
  if (loraInfo.has(model)) throw new LoraError('ERR_LORA_OPTION', 'Expected a model without adapters for applyLora() but this one already has them');
  const rank = o.rank === undefined ? 8 : expectInteger('rank', o.rank, 1, 65536);
  const alpha = o.alpha === undefined ? rank : expectNumber('alpha', o.alpha, 0);
  const p = o.dropout ?? 0;
  const useRslora = o.useRslora ?? false;
  const useDora = o.useDora === undefined ? false : expectBoolean('useDora', o.useDora);
  const init = o.initLoraWeights === undefined ? true : checkLoraInit('initLoraWeights', o.initLoraWeights);
  const rng = rngOf(o.seed);
  const hits = model.namedModules().filter(([path, m]) => path !== '' && m instanceof Linear && matchesTarget(path, target));
  if (hits.length === 0)
    throw new LoraError('ERR_LORA_OPTION', `Expected targetModules to match at least one Linear layer but received ${target instanceof RegExp ? String(target) : JSON.stringify(target)}; the model's Linear layers are: ${model.namedModules().filter(([, m]) => m instanceof Linear).map(([n]) => n).slice(0, 12).join(', ')}`);
  if (initChangesBase(init)) {
    // PiSSA/OLoRA write residuals into the weights: refuse a weight another module shares (a tied
    // head would change the embeddings) or one holding NaN/Inf, before any layer changes
    const users = new Map<Tensor, string[]>();
    for (const [name, t] of model.namedParameters()) users.set(t, [...(users.get(t) ?? []), name]);
    for (const [path, m] of hits) {
      const names = users.get((m as Linear).weight)!;
      if (names.length > 1)
        throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected untied weights for initLoraWeights '${init}' (it writes the residual W - s·B·A into the weight) but '${path}.weight' is also ${names.filter((n) => n !== `${path}.weight`).join(', ')}; leave it out of targetModules`);
      if (!allFinite((m as Linear).weight))
        throw new LoraError('ERR_LORA_NON_FINITE', `Expected a finite weight for initLoraWeights '${init}' but '${path}.weight' holds NaN or Inf`);
    }
  }
  model.freeze();
  for (const [path, m] of hits) {
    const lin = m as Linear;
    const lora = new LoraLinear({
      inFeatures: lin.inFeatures, outFeatures: lin.outFeatures, rank: Math.min(rank, lin.inFeatures, lin.outFeatures), alpha,
      dropout: p, useRslora, weight: lin.weight, biasTensor: lin.bias, seed: rng.seed(), useDora, initLoraWeights: init,
    });
    lora.train(model.training);
    lora.matmulPrecision = lin.matmulPrecision;
    if (lin.fanInFanOut) transposedLayers.add(lora);
    model.setModule(path, lora);
  }
  const modules = hits.map(([path]) => path);
  const config: PeftConfig = {
    peft_type: 'LORA', task_type: 'CAUSAL_LM', r: rank, lora_alpha: alpha, lora_dropout: p, use_rslora: useRslora, use_dora: useDora,
    target_modules: target instanceof RegExp ? target.source : target === 'all-linear' ? 'all-linear' : [...target],
    bias: 'none', fan_in_fan_out: hits.some(([, m]) => (m as Linear).fanInFanOut), init_lora_weights: init, base_model_name_or_path: null, modules_to_save: null,
    rank_pattern: {}, alpha_pattern: {},
  };
  const info = { modules, config };
  loraInfo.set(model, info);
  return info;
}

/** The adapted LoraLinear layers of a model, by module path. */
export function loraLayers(model: Module): Map<string, LoraLinear> {
  expectModule('model', model);
  return new Map(model.namedModules().filter((e): e is [string, LoraLinear] => e[1] instanceof LoraLinear));
}

/**
 * The model's adapter as a PeftAdapter that shares (does not copy) the lora tensors: save it with
 * savePeftAdapter(), but do not dispose it while the model lives. The config states every
 * module's rank and scaling exactly (r/lora_alpha plus rank_pattern/alpha_pattern where layers
 * differ, e.g. after loadLoraAdapter took another adapter's alpha).
 * @throws ERR_LORA_STATE when the model has no LoraLinear layers.
 */
export function peftAdapterOf(model: Module): PeftAdapter {
  expectModule('model', model);
  const layers = loraLayers(model);
  if (layers.size === 0) throw new LoraError('ERR_LORA_STATE', 'Expected a model with LoRA layers (call applyLora first) but it has none');
  const info = loraInfo.get(model);
  const first = [...layers.values()][0]!;
  const base: PeftConfig = info ? { ...info.config } : {
    peft_type: 'LORA', r: first.rank, lora_alpha: first.alpha, lora_dropout: first.dropout,
    target_modules: [...new Set([...layers.keys()].map((k) => k.split('.').pop()!))], bias: 'none',
  };
  // one use_rslora for the file; a layer with the other rule gets the alpha that gives its scaling
  const rslora = first.useRslora;
  const mixed = [...layers].find(([, l]) => l.useDora !== first.useDora);
  if (mixed)
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Expected every LoraLinear to use DoRA or none (a PEFT adapter has one use_dora) but '${mixed[0]}' has useDora ${mixed[1].useDora} and '${[...layers.keys()][0]}' ${first.useDora}`);
  const modules = new Map<string, PeftModule>();
  const sizes = new Map<string, { rank: number; alpha: number }>();
  for (const [path, l] of layers) {
    const alpha = l.useRslora === rslora ? l.alpha : rslora ? l.scaling * Math.sqrt(l.rank) : l.scaling * l.rank;
    modules.set(path, { kind: 'linear', loraA: l.loraA, loraB: l.loraB, loraBBias: null, magnitude: l.loraMagnitude, rank: l.rank, alpha, scaling: l.scaling });
    sizes.set(path, { rank: l.rank, alpha });
  }
  const config = configForModules({ ...base, use_rslora: rslora, use_dora: first.useDora }, sizes);
  for (const k of ['rank_pattern', 'alpha_pattern'] as const) if (Object.keys(config[k] ?? {}).length === 0 && !base[k]) delete config[k];
  return new PeftAdapter(config, modules);
}

/** Options of saveLoraAdapter(). */
export interface SaveLoraAdapterOptions {
  /**
   * For an adapter made with initLoraWeights 'pissa', 'pissa_niter_N' or 'olora' (which changed the
   * base weights to W - s·B₀·A₀): write instead the plain LoRA adapter of rank 2r that gives the
   * same model on the ORIGINAL base weights, A' = [A; A₀], B' = [B, -B₀], with r, lora_alpha (and
   * rank_pattern) doubled and init_lora_weights true (PEFT's save_pretrained with
   * path_initial_model_for_weight_conversion). Default false: the adapter is written as it is,
   * with init_lora_weights 'pissa'/'olora', and runs on the original base only where the loader
   * recomputes the residual from it (PEFT does; so does applyLora with the same initLoraWeights,
   * except 'pissa_niter_N', whose randomized SVD differs run to run), or on the residual base
   * weights (save them with unloadLora() and saveCausalLM()).
   */
  convertToLora?: boolean;
}

/**
 * Writes the model's LoRA adapter as a PEFT folder (adapter_config.json +
 * adapter_model.safetensors) that Python's PEFT loads onto the same architecture: lora_A/lora_B,
 * DoRA's `lora_magnitude_vector` (with use_dora: true) and init_lora_weights as applied.
 * @example
 * saveLoraAdapter(model, 'out/adapter');
 * saveLoraAdapter(pissaModel, 'out/as-lora', { convertToLora: true }); // rank 2r, for the original base
 * @throws ERR_LORA_STATE without LoRA layers; ERR_LORA_UNSUPPORTED for convertToLora on layers that
 *   PiSSA/OLoRA did not initialise, on DoRA layers (their rescale does not convert), or with rsLoRA
 *   layers of different ranks (as PEFT).
 */
export function saveLoraAdapter(model: Module, dir: string, options?: SaveLoraAdapterOptions): void {
  expectModule('model', model);
  const o = checkOptions<SaveLoraAdapterOptions>('saveLoraAdapter()', options, ['convertToLora']);
  const convert = o.convertToLora === undefined ? false : expectBoolean('convertToLora', o.convertToLora);
  const adapter = peftAdapterOf(model);
  if (!convert) {
    savePeftAdapter(dir, adapter);
    return;
  }
  const converted = mutatedToLora(adapter, loraLayers(model));
  try {
    savePeftAdapter(dir, converted);
  } finally {
    converted.dispose();
  }
}

/**
 * Loads a PEFT folder into the model's LoraLinear layers (same module paths): lora_A/lora_B
 * values, and each module's alpha and rsLoRA setting from the file (lora_alpha, alpha_pattern,
 * use_rslora), so the layers run at the scaling the adapter was trained with. Everything is
 * checked before anything changes. Returns the module paths loaded.
 *
 * @example
 * applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 8 });
 * loadLoraAdapter(model, 'out/adapter');   // rank 8 adapter; its lora_alpha replaces the model's
 * @throws ERR_LORA_STATE when a module of the adapter is not a LoraLinear of the model, or a layer
 *   is merged; ERR_LORA_SHAPE when a module's rank or sizes differ (naming the module and both);
 *   ERR_LORA_UNSUPPORTED for lora_B.bias or embedding modules; ERR_LORA_STATE for a DoRA adapter on
 *   layers without useDora, or the reverse.
 */
export function loadLoraAdapter(model: Module, dir: string): string[] {
  expectModule('model', model);
  const layers = loraLayers(model);
  const adapter = loadPeftAdapter(dir);
  try {
    const rslora = !!adapter.config.use_rslora;
    for (const [path, m] of adapter.modules) {
      const l = layers.get(path);
      if (!l) throw new LoraError('ERR_LORA_STATE', `Adapter module '${path}' has no LoraLinear in the model (apply LoRA with the same targetModules first)`);
      const what = m.kind === 'embedding' ? 'an embedding adapter' : m.loraBBias ? 'an adapter with lora_B.bias' : '';
      if (what) throw new LoraError('ERR_LORA_UNSUPPORTED', `Adapter module '${path}' in ${dir} is ${what}; a LoraLinear runs plain LoRA or DoRA (load it with LoraModel instead)`);
      if (!!m.magnitude !== l.useDora)
        throw new LoraError('ERR_LORA_STATE', m.magnitude ? `Adapter module '${path}' in ${dir} is a DoRA module but the model's LoraLinear is not; apply LoRA with useDora: true to load it`
          : `Adapter module '${path}' in ${dir} has no lora_magnitude_vector but the model's LoraLinear uses DoRA; apply LoRA without useDora to load it`);
      if (m.rank !== l.rank)
        throw new LoraError('ERR_LORA_SHAPE', `Expected rank ${l.rank} for module '${path}' (the model's LoraLinear) but the adapter in ${dir} has rank ${m.rank}; apply LoRA with rank ${m.rank} to load it`);
      const [R, C, OC] = [l.rank, l.inFeatures, l.outFeatures];
      if (m.loraA.shape[1] !== C || m.loraB.shape[0] !== OC)
        throw new LoraError('ERR_LORA_SHAPE', `Expected lora_A [${R}, ${C}] and lora_B [${OC}, ${R}] for module '${path}' but the adapter in ${dir} has [${m.loraA.shape.join(', ')}] and [${m.loraB.shape.join(', ')}]`);
      if (l.merged) throw new LoraError('ERR_LORA_STATE', `Expected an unmerged LoraLinear at '${path}' for loadLoraAdapter() but it is merged; call unmerge() first`);
    }
    for (const [path, m] of adapter.modules) {
      const l = layers.get(path)!;
      const A = m.loraA.dtype === 'float32' ? m.loraA : m.loraA.toDtype('float32');
      const B = m.loraB.dtype === 'float32' ? m.loraB : m.loraB.toDtype('float32');
      l.loraA.assign(A);
      l.loraB.assign(B);
      if (A !== m.loraA) A.dispose();
      if (B !== m.loraB) B.dispose();
      if (m.magnitude) l.loraMagnitude!.assign(m.magnitude.toFloat32Array());
      l._setScaling(m.alpha, rslora, 'loadLoraAdapter()');
    }
    return [...adapter.modules.keys()];
  } finally {
    adapter.dispose();
  }
}

// LoraLinears that replaced a Linear whose checkpoint stores [in, out] (GPT-2's Conv1D): the Linear
// that mergeAndUnload/unloadLora puts back must say so again, or saving would write it untransposed.
const transposedLayers = new WeakSet<LoraLinear>();

function swapLoraLayers(model: Module, where: string, merge: boolean, safeMerge: boolean): string[] {
  expectModule('model', model);
  const layers = loraLayers(model);
  if (layers.size === 0) throw new LoraError('ERR_LORA_STATE', `Expected a model with LoRA layers for ${where} but it has none`);
  // merged weights are computed first, all of them, so a refusal leaves the model as it was
  const merged = new Map<string, Tensor>();
  try {
    if (merge) {
      for (const [path, l] of layers) {
        const w = l.merged ? null : l._mergedWeight();
        if (w) merged.set(path, w);
        if (safeMerge && w && !w.toFloat32Array().every(Number.isFinite))
          throw new LoraError('ERR_LORA_NON_FINITE', `Refusing to merge '${path}': the merged weight holds NaN or Inf (the adapter or the base does, or the sum overflows); pass { safeMerge: false } to merge anyway`);
      }
    }
  } catch (err) {
    for (const w of merged.values()) w.dispose();
    throw err;
  }
  for (const [path, l] of layers) {
    if (merge) {
      const w = merged.get(path);
      if (w) {
        l.weight.assign(w);  // in place: the weight tensor keeps its identity (and any references)
        w.dispose();
      }
    } else if (l.merged) {
      l.unmerge();
    }
    const lin = new Linear(l.inFeatures, l.outFeatures, {
      weight: l.weight, biasTensor: l.bias, fanInFanOut: transposedLayers.has(l), matmulPrecision: l.matmulPrecision,
    });
    lin.train(l.training);
    model.setModule(path, lin);
    l._disposeAdapter();
  }
  loraInfo.delete(model);
  return [...layers.keys()];
}

/**
 * PEFT's merge_and_unload() for a Module: folds each LoraLinear's update into its weight
 * (W += scaling·B·A, fp32 math, rounded once to the weight's dtype) and puts a plain Linear
 * holding that weight and the bias in its place; lora_A/lora_B are freed. The model's
 * stateDict() then has the base names only (`layers.0.attn.q_proj.weight`, no `loraA`), so it
 * loads into a model built without LoRA. Parameters stay frozen (call unfreeze() to train them).
 * Returns the module paths swapped.
 *
 * @example
 * mergeAndUnload(model);
 * saveSafetensors('merged.safetensors', model.stateDict());
 * @throws ERR_LORA_STATE without LoRA layers; ERR_LORA_NON_FINITE when a merged weight holds NaN
 *   or Inf (unless safeMerge: false), leaving the model unchanged.
 */
export function mergeAndUnload(model: Module, options?: { safeMerge?: boolean }): string[] {
  expectModule('model', model);
  const o = checkOptions<{ safeMerge?: boolean }>('mergeAndUnload()', options, ['safeMerge']);
  return swapLoraLayers(model, 'mergeAndUnload()', true, o.safeMerge === undefined ? true : expectBoolean('safeMerge', o.safeMerge));
}

/**
 * PEFT's unload() for a Module: puts a plain Linear with the original (unmerged) weight and bias
 * in place of each LoraLinear and frees the adapters, giving back the base model. A merged layer
 * is unmerged first (exact up to float rounding). Returns the module paths swapped.
 *
 * @example unloadLora(model); // model.stateDict() is the base model's again
 * @throws ERR_LORA_STATE without LoRA layers.
 */
export function unloadLora(model: Module): string[] {
  return swapLoraLayers(model, 'unloadLora()', false, false);
}

/** Trainable and total parameter counts of a model, and the trainable share (0..1). */
export interface ParameterCount {
  trainable: number;
  total: number;
  share: number;
}

/**
 * Counts parameters like PEFT's print_trainable_parameters(). Shared tensors count once.
 * @example const { trainable, total, share } = trainableParameters(model);
 */
export function trainableParameters(model: Module): ParameterCount {
  expectModule('model', model);
  if (!(model instanceof Module)) throw typeError('model', 'a Module', model);
  const seen = new Set<Tensor>();
  let trainable = 0;
  let total = 0;
  for (const [, t] of model.namedParameters()) {
    if (seen.has(t)) continue;
    seen.add(t);
    total += t.size;
    if (t.requiresGrad) trainable += t.size;
  }
  return { trainable, total, share: total === 0 ? 0 : trainable / total };
}
