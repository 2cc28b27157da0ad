// The parts every Hugging Face causal-LM family shares: reading config.json fields with each
// architecture's defaults, activations by their transformers names, RoPE (inv_freq with the scaling
// variants of transformers' modeling_rope_utils.py, the rotation through the rope() op), attention
// with a causal + padding + sliding-window mask, grouped KV heads and a preallocated KV cache, and
// the small frozen layers (embedding, RMS/layer norm) the families build from checkpoint tensors.
// RoPE (applyRope) is the fused rope() kernel of lib/ops/nn.ts; attention (attend) is the fused
// kernel of lib/ops/attention.ts, with the padding mask, the sliding window and the KV cache passed
// to it as they are.
import { describe, expectInteger, LoraError } from '../errors';
import { DEVICE_ID, DTYPE_ID, native, NativeStorage, OP } from '../native';
import { Module } from '../module';
import { LoraLinear } from '../lora';
import { Linear } from '../nn';
import { add, attention, embedding, gatedActivation, gelu, layerNorm, mul, relu, reshape, rmsNorm, rope, sigmoid, silu, slice, tanh, UnaryName } from '../ops';
import { expectMatmulPrecision, gemmReadsAsStored } from '../ops/util';
import { checkDevice, checkpoint, contiguousStrides, Device, DType, empty, keep, numelOf, record, reshapeInference, ones, takeStorage, Tensor, tensor, tidy, unreadOutput, zeros } from '../tensor';

// ---- config.json fields -------------------------------------------------------------------------

/**
 * Reads fields of a parsed config.json. A missing field takes the architecture's default when one
 * is given and is an ERR_LORA_FORMAT naming the file and the key when not; a field of the wrong
 * type is always an ERR_LORA_FORMAT saying what was expected and what was found.
 */
export class ConfigReader {
  constructor(readonly raw: Record<string, unknown>, readonly file: string) {}

  /** The raw value, undefined when absent (null counts as absent, as transformers' `x or default`). */
  get(key: string): unknown {
    const v = this.raw[key];
    return v === null ? undefined : v;
  }

  has(key: string): boolean {
    return this.get(key) !== undefined;
  }

  fail(key: string, expected: string, found: unknown): LoraError {
    return new LoraError('ERR_LORA_FORMAT', found === undefined
      ? `Invalid config ${this.file}: '${key}' is missing (expected ${expected})`
      : `Invalid config ${this.file}: expected ${expected} for '${key}' but found ${describe(found)}`);
  }

  int(key: string, def?: number, min = 1): number {
    const v = this.get(key) ?? def;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > 2 ** 31 - 1)
      throw this.fail(key, `an integer >= ${min}`, this.get(key));
    return v;
  }

  num(key: string, def?: number, min = -Infinity): number {
    const v = this.get(key) ?? def;
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min) throw this.fail(key, min === -Infinity ? 'a number' : `a number >= ${min}`, this.get(key));
    return v;
  }

  bool(key: string, def: boolean): boolean {
    const v = this.get(key) ?? def;
    if (typeof v !== 'boolean') throw this.fail(key, 'true or false', this.get(key));
    return v;
  }

  str(key: string, def?: string): string {
    const v = this.get(key) ?? def;
    if (typeof v !== 'string') throw this.fail(key, 'a string', this.get(key));
    return v;
  }

  /** An integer or null, e.g. sliding_window: an explicit null is null, an absent key the default. */
  optInt(key: string, def: number | null = null): number | null {
    if (this.raw[key] === null) return null;
    return this.has(key) ? this.int(key) : def;
  }

  /** A nested object (rope_scaling), or undefined when absent or null. */
  obj(key: string): ConfigReader | undefined {
    const v = this.get(key);
    if (v === undefined) return undefined;
    if (typeof v !== 'object' || Array.isArray(v)) throw this.fail(key, 'an object or null', v);
    return new ConfigReader(v as Record<string, unknown>, `${this.file} (${key})`);
  }

  numbers(key: string, length: number): number[] {
    const v = this.get(key);
    if (!Array.isArray(v) || v.length !== length || !v.every((x) => typeof x === 'number' && Number.isFinite(x)))
      throw this.fail(key, `an array of ${length} numbers`, v);
    return v as number[];
  }
}

// ---- activations --------------------------------------------------------------------------------

/** transformers' ACT2FN names this package computes, and how. */
const ACTIVATIONS: Record<string, (x: Tensor) => Tensor> = {
  silu: silu,
  swish: silu,
  gelu: (x) => gelu(x),
  gelu_new: (x) => gelu(x, { approximate: 'tanh' }),
  gelu_pytorch_tanh: (x) => gelu(x, { approximate: 'tanh' }),
  gelu_fast: (x) => gelu(x, { approximate: 'tanh' }),
  quick_gelu: (x) => mul(x, sigmoid(mul(x, 1.702))),
  relu: relu,
  tanh: tanh,
  sigmoid: sigmoid,
};

/** The ACT2FN names that are one native unary op, so that a GLU MLP can fuse them with the gate. */
const UNARY_ACTIVATIONS: Record<string, UnaryName> = {
  silu: 'silu', swish: 'silu', gelu: 'geluErf', gelu_new: 'geluTanh', gelu_pytorch_tanh: 'geluTanh', gelu_fast: 'geluTanh',
  relu: 'relu', tanh: 'tanh', sigmoid: 'sigmoid',
};

/** An activation function, with the unary op it is when there is one (null: a composition). */
export type Activation = ((x: Tensor) => Tensor) & { readonly unary: UnaryName | null };

/** The activation function for a transformers name, or ERR_LORA_UNSUPPORTED naming the known ones. */
export function activation(cfg: ConfigReader, key: string, name: string): Activation {
  const fn = Object.prototype.hasOwnProperty.call(ACTIVATIONS, name) ? ACTIVATIONS[name] : undefined;
  if (!fn) throw new LoraError('ERR_LORA_UNSUPPORTED', `Unsupported activation ${JSON.stringify(name)} for '${key}' in ${cfg.file}; supported: ${Object.keys(ACTIVATIONS).join(', ')}`);
  return Object.assign((x: Tensor) => fn(x), { unary: UNARY_ACTIVATIONS[name] ?? null });
}

/**
 * act(gate)·up of a GLU MLP: one fused kernel (forward and backward) when act is a unary op. With
 * up null, gate holds [gate | up] halves in its last dim (Phi-3's gate_up_proj), read in place.
 */
export function gated(act: Activation, gate: Tensor, up: Tensor | null): Tensor {
  if (act.unary) return gatedActivation(gate, up, act.unary);
  if (up) return mul(act(gate), up);
  const I = gate.shape[gate.ndim - 1]! / 2;
  return mul(act(slice(gate, -1, 0, I)), slice(gate, -1, I));
}

// ---- rotary position embeddings -----------------------------------------------------------------

/** RoPE as config.json describes it (transformers' rope_theta, partial_rotary_factor, rope_scaling). */
export interface RopeSpec {
  type: 'default' | 'linear' | 'dynamic' | 'llama3' | 'longrope';
  base: number;
  /** Rotated dims per head (head_dim · partial_rotary_factor), even. */
  dim: number;
  /** max_position_embeddings (dynamic NTK grows past it). */
  maxPositions: number;
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  /** llama3: rope_scaling.original_max_position_embeddings; longrope: the switch to long_factor. */
  originalMaxPositions: number;
  shortFactor: number[];
  longFactor: number[];
  /** Multiplies cos and sin (longrope's attention factor; 1 otherwise). */
  attentionScaling: number;
}

const ROPE_TYPES = ['default', 'linear', 'dynamic', 'llama3', 'longrope'] as const;

/** A family's defaults for the RoPE fields of its config. */
export interface RopeDefaults {
  theta: number;
  maxPositions: number;
  /** A config class attribute original_max_position_embeddings (Phi-3: 4096), used by longrope. */
  originalMaxPositions?: number;
  /** Legacy rope_scaling type names of the family ('su' -> 'longrope'). */
  aliases?: Record<string, string>;
}

/**
 * Reads RoPE settings: rope_theta, partial_rotary_factor and rope_scaling (`rope_type`, or `type`
 * as older configs say), or transformers 5's rope_parameters. `aliases` maps a family's legacy
 * type names (Phi-3's 'su' and 'yarn' mean 'longrope').
 */
export function readRope(cfg: ConfigReader, headDim: number, d: RopeDefaults): RopeSpec {
  const aliases = d.aliases ?? {};
  const params = cfg.obj('rope_parameters');
  const scaling = cfg.obj('rope_scaling') ?? params;
  const base = params?.has('rope_theta') ? params.num('rope_theta', undefined, 0) : cfg.num('rope_theta', d.theta, 0);
  const partial = cfg.num('partial_rotary_factor', params?.num('partial_rotary_factor', 1) ?? 1, 0);
  const dim = Math.floor(headDim * partial);
  if (dim < 2 || dim % 2 !== 0 || dim > headDim) throw cfg.fail('partial_rotary_factor', `a factor giving an even rotary size between 2 and head_dim ${headDim}`, partial);
  const maxPositions = cfg.int('max_position_embeddings', d.maxPositions);
  const spec: RopeSpec = {
    type: 'default', base, dim, maxPositions, factor: 1, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: maxPositions,
    shortFactor: [], longFactor: [], attentionScaling: 1,
  };
  if (!scaling) return spec;
  let type = scaling.has('rope_type') ? scaling.str('rope_type') : scaling.str('type', 'default');
  type = aliases[type] ?? type;
  if (!(ROPE_TYPES as readonly string[]).includes(type))
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Unsupported rope_scaling type ${JSON.stringify(type)} in ${cfg.file}; supported: ${ROPE_TYPES.join(', ')}`);
  spec.type = type as RopeSpec['type'];
  if (spec.type === 'linear' || spec.type === 'dynamic' || spec.type === 'llama3') spec.factor = scaling.num('factor', undefined, 0);
  if (spec.type === 'llama3') {
    spec.lowFreqFactor = scaling.num('low_freq_factor');
    spec.highFreqFactor = scaling.num('high_freq_factor');
    spec.originalMaxPositions = scaling.int('original_max_position_embeddings');
    if (!(spec.highFreqFactor > spec.lowFreqFactor)) throw scaling.fail('high_freq_factor', `a number > low_freq_factor (${spec.lowFreqFactor})`, spec.highFreqFactor);
  }
  if (spec.type === 'longrope') {
    spec.shortFactor = scaling.numbers('short_factor', dim / 2);
    spec.longFactor = scaling.numbers('long_factor', dim / 2);
    // transformers: a top-level original_max_position_embeddings (Phi-3) sets factor = max / original
    let factor: number;
    if (cfg.has('original_max_position_embeddings') || d.originalMaxPositions !== undefined) {
      spec.originalMaxPositions = cfg.int('original_max_position_embeddings', d.originalMaxPositions);
      factor = maxPositions / spec.originalMaxPositions;
    } else factor = scaling.num('factor', 1, 0);
    spec.attentionScaling = scaling.has('attention_factor') ? scaling.num('attention_factor', undefined, 0)
      : factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(spec.originalMaxPositions));
  }
  return spec;
}

const f32 = Math.fround;

/**
 * inv_freq for the rotated dims as transformers computes it in float32, for a forward pass whose
 * largest position is maxPosition (dynamic NTK and longrope depend on it).
 */
export function ropeInvFreq(spec: RopeSpec, maxPosition: number): Float32Array {
  const half = spec.dim / 2;
  const seqLen = maxPosition + 1;
  let base = spec.base;
  if (spec.type === 'dynamic' && seqLen > spec.maxPositions)
    base = base * ((spec.factor * seqLen / spec.maxPositions) - (spec.factor - 1)) ** (spec.dim / (spec.dim - 2));
  const out = new Float32Array(half);
  for (let i = 0; i < half; i++) {
    const exponent = f32(f32(2 * i) / spec.dim);
    let inv = f32(1 / f32(base ** exponent));
    if (spec.type === 'linear') inv = f32(inv / spec.factor);
    else if (spec.type === 'longrope') {
      const ext = f32(seqLen > spec.originalMaxPositions ? spec.longFactor[i]! : spec.shortFactor[i]!);
      inv = f32(1 / f32(ext * f32(base ** exponent)));
    } else if (spec.type === 'llama3') {
      const lowWavelen = spec.originalMaxPositions / spec.lowFreqFactor;
      const highWavelen = spec.originalMaxPositions / spec.highFreqFactor;
      const wavelen = 2 * Math.PI / inv;
      if (wavelen > lowWavelen) inv = f32(inv / spec.factor);
      else if (wavelen >= highWavelen) {
        const smooth = (spec.originalMaxPositions / wavelen - spec.lowFreqFactor) / (spec.highFreqFactor - spec.lowFreqFactor);
        inv = f32((1 - smooth) * inv / spec.factor + smooth * inv);
      }
    }
    out[i] = inv;
  }
  return out;
}

/** A key naming which inv_freq a position range uses (longrope switches at its original length). */
export function ropeRegime(spec: RopeSpec | null, maxPosition: number): string {
  return spec?.type === 'longrope' && maxPosition + 1 > spec.originalMaxPositions ? 'long' : 'short';
}

/** What the rope() op needs for one pass: positions [B, T] and inv_freq [dim/2] as tensors. */
export interface RopeInputs {
  positions: Tensor;
  invFreq: Tensor;
  /** Multiplies cos and sin (longrope's attention factor; 1 otherwise). */
  scaling: number;
}

/**
 * The positions (B·T, row-major) and the inv_freq of the largest of them as tensors for rope(),
 * which computes θ = inv_freq·position in float32 and cos, sin times the attention scaling, as
 * transformers' rotary embedding does.
 */
export function ropeInputs(spec: RopeSpec, positions: Int32Array, B: number, T: number, device: Device): RopeInputs {
  let maxPos = 0;
  for (const p of positions) if (p > maxPos) maxPos = p;
  return {
    positions: tensor(Float32Array.from(positions), [B, T], { dtype: 'int32', device }),
    invFreq: tensor(ropeInvFreq(spec, maxPos), [spec.dim / 2], { device }),
    scaling: spec.attentionScaling,
  };
}

/**
 * Rotates the first 2·invFreq.length dims of each head of x [B, T, H, headDim] (transformers'
 * apply_rotary_pos_emb with rotate_half; the other dims pass through, as partial rotary does),
 * with the fused rope() kernel. In an inference pass (ctx.inference: nothing records gradients) x
 * must be a fresh intermediate of the pass, read by no one else: it is rotated in place.
 */
export function applyRope(x: Tensor, r: RopeInputs, ctx?: ForwardContext): Tensor {
  // An inference pass rotates its fresh q and k in place (the kernel allows y = x): no new tensor,
  // and the rotation reads and writes memory the projection has just left in cache.
  if (ctx?.inference && x._node === null && !x.requiresGrad && x.dtype === 'float32' && x.ndim === 4 && x.size > 0 &&
    x.device === r.positions.device && x.device === r.invFreq.device && r.positions.shape[0] === x.shape[0] &&
    r.positions.shape[1] === x.shape[1] && 2 * r.invFreq.size <= x.shape[3]!) {
    const [Bt, T, H, D] = x.shape as [number, number, number, number];
    const y = x._live('x');
    native.rope(y, y, r.positions._live('positions'), r.invFreq._live('invFreq'), Bt, T, H, D, 2 * r.invFreq.size, r.scaling);
    return x;
  }
  return rope(x, r.positions, r.invFreq, { attentionScaling: r.scaling });
}

// ---- the KV cache and the forward context --------------------------------------------------------

/**
 * Keys and values of every layer for up to maxLength positions of batchSize rows, preallocated
 * ([batch, maxLength, kvHeads, headDim] float32 per layer), plus which positions hold real tokens.
 * Made by CausalLM.createCache(); forward({ cache }) appends to it. Inference only: no gradient
 * flows through cached keys and values. Free it with dispose().
 *
 * @example
 * using cache = model.createCache(1, 64);
 * const first = model.forward(promptIds, { cache });   // [1, T, vocab]
 * const next = model.forward(nextId, { cache });       // [1, 1, vocab]: one token's work
 */
export class KVCache {
  readonly batchSize: number;
  readonly maxLength: number;
  /** Positions filled so far. */
  length = 0;
  /** @internal per layer: [B, maxLength, KVH, D] */
  readonly keys: Tensor[];
  /** @internal */
  readonly values: Tensor[];
  /** @internal 1 where a filled position holds a real token, 0 for padding ([B, maxLength]). */
  readonly keyMask: Uint8Array;
  /** @internal tensors the decode path reuses between steps (lib/models/decode.ts), freed with the cache */
  readonly scratch = new Map<string, Record<string, Tensor>>();

  /** @internal */
  constructor(layers: number, batchSize: number, maxLength: number, kvHeads: number, headDim: number, device: Device) {
    expectInteger('layers', layers, 0, 1 << 20);
    expectInteger('batchSize', batchSize, 1, 2 ** 31 - 1);
    expectInteger('maxLength', maxLength, 1, 2 ** 31 - 1);
    expectInteger('kvHeads', kvHeads, 1, 1 << 20);
    expectInteger('headDim', headDim, 1, 1 << 20);
    checkDevice('device', device);
    this.batchSize = batchSize;
    this.maxLength = maxLength;
    this.keyMask = new Uint8Array(batchSize * maxLength);
    this.keys = [];
    this.values = [];
    try {
      for (let l = 0; l < layers; l++) {
        // kept out of tidy() scopes: a cache lives until dispose(), like a parameter
        this.keys.push(keep(zeros([batchSize, maxLength, kvHeads, headDim], { device })));
        this.values.push(keep(zeros([batchSize, maxLength, kvHeads, headDim], { device })));
      }
    } catch (err) {
      this.dispose();
      throw err;
    }
  }

  /** Forgets the cached positions (the memory stays for reuse). */
  reset(): void {
    this.length = 0;
    this.keyMask.fill(0);
  }

  dispose(): void {
    for (const t of [...this.keys, ...this.values]) t.dispose();
    for (const set of this.scratch.values()) for (const t of Object.values(set)) t.dispose();
    this.scratch.clear();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** What one forward pass shares between its layers: positions, masks, RoPE tables, the cache. */
export class ForwardContext {
  readonly B: number;
  readonly T: number;
  /** Cache positions filled before this pass (0 without a cache). */
  readonly past: number;
  /** Position id of each token (B·T), for RoPE or learned positions. */
  readonly positions: Int32Array;
  readonly cache: KVCache | null;
  readonly device: Device;
  /**
   * Packed rows (B·T, no cache): a query sees only keys of its own segment id, so rows packed into
   * one sequence stay independent; null when each sequence is one row.
   */
  segmentIds: Int32Array | null = null;
  /** 1/0 per key position (B·(past+T)), or null when every key is a real token. */
  private readonly keyMask: Uint8Array | null;
  private readonly made = new Map<string, unknown>();
  private readonly owned: Tensor[] = [];

  constructor(B: number, T: number, positions: Int32Array, keyMask: Uint8Array | null, cache: KVCache | null, device: Device) {
    this.B = B;
    this.T = T;
    this.past = cache ? cache.length : 0;
    this.positions = positions;
    this.keyMask = keyMask;
    this.cache = cache;
    this.device = device;
  }

  /** Keys each query may see: past + T. */
  get keyLength(): number {
    return this.past + this.T;
  }

  /**
   * Whether each layer runs through checkpoint() (CausalLM.gradientCheckpointing while gradients
   * are recorded): its activations are recomputed in the backward pass instead of kept.
   */
  checkpointLayers = false;
  /** Whether nothing will run backward through this pass: each layer's intermediates are freed as it ends. */
  inference = false;

  /**
   * Runs one decoder layer on x: through checkpoint() when this pass checkpoints its layers, in
   * its own tidy() scope in an inference pass (so a pass holds one layer's activations, not all
   * of them). The pass's padding mask and segment ids are made first, outside either, so that they outlive them.
   */
  layer(x: Tensor, run: (h: Tensor) => Tensor): Tensor {
    if (!this.checkpointLayers && !this.inference) return run(x);
    this.keyMaskTensor();
    this.segmentIdsTensor();
    return this.checkpointLayers ? checkpoint(run, [x]) : tidy(() => run(x));
  }

  /** Builds a value once per pass (RoPE tables, masks); tensors made so are freed by dispose(). */
  once<V>(key: string, make: () => V): V {
    if (this.made.has(key)) return this.made.get(key) as V;
    const v = make();
    this.made.set(key, v);
    return v;
  }

  /** Remembers a tensor this pass made for its own use. */
  own<T extends Tensor | null>(t: T): T {
    if (t) this.owned.push(t);
    return t;
  }

  /**
   * The padding mask as an int32 tensor [B, keyLength] (1 a real token, 0 padding), made once per
   * pass; null when every key is a real token.
   */
  keyMaskTensor(): Tensor | null {
    const m = this.keyMask;
    if (!m) return null;
    return this.once('keyMask', () => this.own(tensor(Float32Array.from(m), [this.B, this.keyLength], { dtype: 'int32', device: this.device })));
  }

  /**
   * Packed rows' segment ids as an int32 tensor [B, T] (no cache: keys are the T tokens), made
   * once per pass; null when the batch is not packed.
   */
  segmentIdsTensor(): Tensor | null {
    const seg = this.segmentIds;
    if (!seg) return null;
    return this.once('segmentIds', () => this.own(tensor(Float32Array.from(seg), [this.B, this.T], { dtype: 'int32', device: this.device })));
  }

  /** Frees the tensors this pass made for itself (call when no backward pass will need them). */
  dispose(): void {
    for (const t of this.owned) t.dispose();
    this.owned.length = 0;
    this.made.clear();
  }
}

// ---- attention ------------------------------------------------------------------------------------

/** Writes this pass's keys or values [B, T, KVH, D] into a layer's cache at position `past`. */
export function writeCache(cache: Tensor, x: Tensor, past: number): void {
  const [B, T, KVH, D] = x.shape as [number, number, number, number];
  const maxLen = cache.shape[1]!;
  native.copyStrided(cache._storage, past * KVH * D, [maxLen * KVH * D, KVH * D, D, 1], x._live('keys'), 0, contiguousStrides(x.shape), [B, T, KVH, D]);
}

/**
 * Causal self-attention of one layer: q [B, T, H, D] (RoPE applied), k and v [B, T, KVH, D]
 * (H a multiple of KVH: the fused kernel reads each kv head for its H/KVH query heads). With a
 * cache, k and v are written at ctx.past and the queries attend to the first past + T positions
 * of the cache in place. The padding mask and the sliding window (transformers' kv > q - window)
 * go to the kernel; a query row that sees no key (a left-padding position) gives 0, which nothing
 * reads. Returns [B, T, H·D].
 */
export function attend(q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext, layer: number, scale: number, window: number | null): Tensor {
  const [B, T, H, D] = q.shape as [number, number, number, number];
  let keys = k;
  let values = v;
  if (ctx.cache) {
    if (layer >= ctx.cache.keys.length) throw new LoraError('ERR_LORA_SHAPE', `Expected a cache with at least ${layer + 1} layers but it has ${ctx.cache.keys.length}`);
    writeCache(ctx.cache.keys[layer]!, k, ctx.past);
    writeCache(ctx.cache.values[layer]!, v, ctx.past);
    keys = ctx.cache.keys[layer]!;
    values = ctx.cache.values[layer]!;
  }
  const mask = ctx.keyMaskTensor();
  const segments = ctx.segmentIdsTensor();
  const out = attention(q, keys, values, {
    causal: true, scale,
    ...(segments ? { segmentIds: segments } : {}),
    ...(ctx.cache ? { kvLength: ctx.keyLength } : {}),
    ...(mask ? { attentionMask: mask } : {}),
    ...(window !== null ? { window } : {}),
  });
  return ctx.inference ? reshapeInference(out, [B, T, H * D], reshape) : reshape(out, [B, T, H * D]);
}

// ---- frozen layers made from checkpoint tensors ----------------------------------------------------

/** A lookup table (nn.Embedding) over a given weight [V, C] (float32, bfloat16 or float16), float32 out. */
export class HfEmbedding extends Module {
  weight!: Tensor;
  constructor(weight: Tensor) {
    super();
    this.registerParameter('weight', weight);
  }
  forward(ids: Tensor): Tensor {
    return embedding(ids, this.weight);
  }
}

/**
 * RMSNorm over the last dim with a given weight: x/sqrt(mean(x²) + eps)·w, or ·(1 + w) with
 * offset 1 (Gemma's GemmaRMSNorm; the kernel adds the offset, the stored weight stays as loaded).
 */
export class HfRMSNorm extends Module {
  weight!: Tensor;
  constructor(weight: Tensor, readonly eps: number, readonly offset = 0) {
    super();
    this.registerParameter('weight', weight);
  }
  forward(x: Tensor): Tensor {
    return rmsNorm(x, this.weight, this.eps, this.offset ? { weightOffset: this.offset } : undefined);
  }
}

/** LayerNorm over the last dim with a given weight and bias (GPT-2's ln_1, ln_2, ln_f). */
export class HfLayerNorm extends Module {
  weight!: Tensor;
  bias!: Tensor;
  constructor(weight: Tensor, bias: Tensor, readonly eps: number) {
    super();
    this.registerParameter('weight', weight);
    this.registerParameter('bias', bias);
  }
  forward(x: Tensor): Tensor {
    return layerNorm(x, this.weight, this.bias, this.eps);
  }
}

/** Where a family's builder gets its frozen tensors: by Hugging Face name, shape checked. */
export interface WeightSource {
  /**
   * The tensor stored under `name` with this shape. 'matrix' tensors (projections) and 'table'
   * tensors (embedding tables, read by the lookup kernel and by a tied head's linear()) come in
   * the model's dtype; 'vector' tensors (norms, biases) in float32. `transposed`: the
   * checkpoint stores it as [shape[1], shape[0]] (GPT-2's Conv1D).
   */
  take(name: string, shape: number[], kind: 'matrix' | 'vector' | 'table', transposed?: boolean): Tensor;
}

/** A Linear over a checkpoint's `${name}.weight` [out, in] (and `${name}.bias` when it has one). */
export function linearFrom(w: WeightSource, name: string, inFeatures: number, outFeatures: number, bias: boolean, transposed = false): Linear {
  return new Linear(inFeatures, outFeatures, {
    weight: w.take(`${name}.weight`, [outFeatures, inFeatures], 'matrix', transposed),
    biasTensor: bias ? w.take(`${name}.bias`, [outFeatures], 'vector') : null,
    fanInFanOut: transposed,
  });
}

/** A Linear itself, not a subclass (LoraLinear and the adapted layers change what forward() computes). */
export function isPlainLinear(m: Module | undefined): m is Linear {
  return m instanceof Linear && Object.getPrototypeOf(m) === Linear.prototype;
}

/**
 * residual + proj(x) for a decoder layer's residual stream. In an inference pass (ctx.inference:
 * nothing records gradients, and the layer's input and its sums belong to the pass, read by no one
 * after this; CausalLM.run sets it) where proj is a plain bias-free Linear, its GEMM adds into residual in place
 * (y += x·Wᵀ, with the layer's matmulPrecision): no separate add over memory, no new tensor. Anything else (LoRA layers, biases,
 * training): the plain add of a new tensor.
 */
export function addProjected(residual: Tensor, proj: Module, x: Tensor, ctx: ForwardContext, layerOutput = false): Tensor {
  if (ctx.inference && isPlainLinear(proj) &&
    proj.bias === null && residual.dtype === 'float32' && x.dtype === 'float32' && residual.device === x.device && proj.weight.device === x.device) {
    const w = proj.weight;
    const [OC, C] = w.shape as [number, number];
    const M = numelOf(x.shape.slice(0, -1));
    if (gemmReadsAsStored(w) && x.shape[x.ndim - 1] === C && residual.shape[residual.ndim - 1] === OC && numelOf(residual.shape.slice(0, -1)) === M && M > 0) {
      const bf16Dot = expectMatmulPrecision('matmulPrecision', proj.matmulPrecision) === 'bf16';
      native.gemm(residual._live('residual'), x._live('x'), w._live('weight'), M, OC, C, false, true, C, C, OC, 1, 1, 1, 0, 0, 0, bf16Dot);
      return residual;
    }
  }
  // the layer's output under gradient checkpointing: its recomputation skips the product (one op)
  if (layerOutput && ctx.checkpointLayers && isOneProduct(proj)) return residual.add(unreadOutput(() => proj.forward(x)));
  return residual.add(proj.forward(x));
}

/**
 * Whether m.forward(x) is one product op (linear() or loraLinear(), which unreadOutput() can skip):
 * a plain Linear, or a LoraLinear without DoRA (doraLinear is several ops, and a skipped inner
 * product would feed zeros to the next one's backward).
 */
export function isOneProduct(m: Module): boolean {
  return isPlainLinear(m) || (Object.getPrototypeOf(m) === LoraLinear.prototype && (m as LoraLinear).loraMagnitude === null);
}

/**
 * reshape() of a fresh result that nothing else reads (the output of a projection that
 * isOneProduct(), split into heads): no copy forward or backward (takeStorage); x is left disposed.
 */
export function reshapeFresh(x: Tensor, shape: readonly number[]): Tensor {
  const from = x.shape;
  const out = takeStorage(x, shape);
  return record(out, { name: 'reshape', inputs: [x], backward: (g) => [takeStorage(g, from)] });
}

/** Rows from which projectShared() runs the products in one call (fewer: decode's streaming GEMV). */
const SHARED_MIN_ROWS = 32;

/**
 * mods[i](x) for the projections of one input (q/k/v, gate/up: two or three modules). In an
 * inference pass (ctx.inference) over at least SHARED_MIN_ROWS rows of a float32 x, where every
 * module is a plain bias-free Linear, the weights all float32 or all bfloat16 and the modules of
 * one matmulPrecision, the products run in one backend call that packs x once per thread for all
 * of them (gemmSharedA, where the backend has it for that dtype). Each product is the one the
 * module's forward makes: fp32 products, or with bf16 weights and matmulPrecision 'bf16' the bf16
 * dot product (x rounded to bf16 once for all of them; bit for bit the separate products where the
 * CPU runs the dot for each). Anything else (LoRA layers, biases, float16 weights, mixed dtypes or
 * precisions, training, decode's few rows): each module's forward.
 */
export function projectShared(x: Tensor, mods: readonly Module[], ctx?: ForwardContext): Tensor[] {
  if (ctx?.inference && (mods.length === 2 || mods.length === 3) && x.dtype === 'float32' && x.ndim >= 2) {
    const K = x.shape[x.ndim - 1]!;
    const M = numelOf(x.shape.slice(0, -1));
    const lins = mods.map((m) => (isPlainLinear(m) && m.bias === null ? m : null));
    if (M >= SHARED_MIN_ROWS && K > 0 && lins.every((l) => l !== null) && sharesA(lins as Linear[], x.device, K)) {
      const ws = lins.map((l) => l!.weight);
      const outs = ws.map((w) => empty([...x.shape.slice(0, -1), w.shape[0]!], x.device));
      gemmSharedA(x._live('x'), M, K, outs.map((o) => o._storage), lins as Linear[]);
      return outs;
    }
  }
  return mods.map((m) => m.forward(x));
}

/**
 * @internal Whether one gemmSharedA call can run the products of these bias-free Linears on an
 * input of K columns on `device`: weights all float32 or all bfloat16, read as stored, 2-D with K
 * columns and at least one row, on that device, one matmulPrecision, and the backend has the entry
 * for that dtype (`hasEntry`: asks the binding unless the caller keeps the answer). projectShared()
 * and the decode fast path.
 */
export function sharesA(lins: readonly Linear[], device: Device, K: number,
  hasEntry = (dtype: DType) => native.supports(DEVICE_ID[device], OP.gemmSharedA, DTYPE_ID[dtype])): boolean {
  const first = lins[0];
  const dtype = first?.weight.dtype;
  return first !== undefined && (dtype === 'float32' || dtype === 'bfloat16') && hasEntry(dtype) && gemmReadsAsStored(first.weight) &&
    lins.every((l) => l.bias === null && l.matmulPrecision === first.matmulPrecision && l.weight.dtype === dtype &&
      l.weight.device === device && l.weight.ndim === 2 && l.weight.shape[1] === K && l.weight.shape[0]! > 0);
}

/**
 * @internal outs[i] (M, rows of lins[i]'s weight) = x (M, K)·Wᵢᵀ for 2 or 3 Linears in one
 * native.gemmSharedA call, with their matmulPrecision (sharesA() says when it applies).
 */
export function gemmSharedA(x: NativeStorage, M: number, K: number, outs: NativeStorage[], lins: readonly Linear[]): void {
  const ws = lins.map((l) => l.weight._live('weight')), rows = lins.map((l) => l.weight.shape[0]!);
  const bf16Dot = expectMatmulPrecision('matmulPrecision', lins[0]!.matmulPrecision) === 'bf16';
  const third = outs.length === 3;
  native.gemmSharedA(x, M, K, outs[0]!, ws[0]!, rows[0]!, outs[1]!, ws[1]!, rows[1]!,
    third ? outs[2]! : null, third ? ws[2]! : null, third ? rows[2]! : 0, bf16Dot);
}

/** A context for a stand-alone forward of one layer: positions 0..T-1, no padding, no cache. */
export function plainContext(x: Tensor): ForwardContext {
  const [B, T] = x.shape as [number, number];
  const positions = new Int32Array(B * T);
  for (let i = 0; i < B * T; i++) positions[i] = i % T;
  return new ForwardContext(B, T, positions, null, null, x.device);
}

/** A child module by name (children may be swapped, e.g. Linear for LoraLinear by applyLora). */
export function child(m: Module, name: string): Module {
  const c = m.getModule(name);
  if (!c) throw new LoraError('ERR_LORA_STATE', `Expected a child module '${name}' but there is none`);
  return c;
}
