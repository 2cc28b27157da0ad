// The parts every Hugging Face causal-LM family shares: reading config.json fields with each
// architecture's defaults, activations by their transformers names, RoPE (inv_freq with the scaling
// variants of transformers' modeling_rope_utils.py, the cos/sin tables, the rotation), attention
// with a causal + padding + sliding-window mask, grouped KV heads and a preallocated KV cache, and
// the small frozen layers (embedding, RMS/layer norm) the families build from checkpoint tensors.
// RoPE and masked attention are compositions of existing ops, each behind one function here
// (applyRope, attend) so that a fused kernel can replace it in one place.
import { describe, expectInteger, LoraError } from '../errors';
import { native } from '../native';
import { Module } from '../module';
import { Linear } from '../nn';
import { add, attention, concat, embedding, gelu, layerNorm, matmul, mul, neg, permute, relu, reshape, rmsNorm, sigmoid, silu, slice, softmax, tanh } from '../ops';
import { checkDevice, contiguousStrides, Device, keep, ones, Tensor, tensor, zeros } from '../tensor';

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

/** The activation function for a transformers name, or ERR_LORA_UNSUPPORTED naming the known ones. */
export function activation(cfg: ConfigReader, key: string, name: string): (x: Tensor) => Tensor {
  const fn = Object.prototype.hasOwnProperty.call(ACTIVATIONS, name) ? ACTIVATIONS[name] : undefined;
  if (!fn) throw new LoraError('ERR_LORA_UNSUPPORTED', `Unsupported activation ${JSON.stringify(name)} for '${key}' in ${cfg.file}; supported: ${Object.keys(ACTIVATIONS).join(', ')}`);
  return fn;
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

/**
 * cos and sin tables [B, T, 1, dim] for positions (B·T, row-major): emb = cat(freqs, freqs),
 * freqs = inv_freq·position in float32, times the attention scaling, as transformers' rotary
 * embedding computes them.
 */
export function ropeTables(spec: RopeSpec, positions: Int32Array, B: number, T: number, device: Device): { cos: Tensor; sin: Tensor } {
  let maxPos = 0;
  for (const p of positions) if (p > maxPos) maxPos = p;
  const inv = ropeInvFreq(spec, maxPos);
  const D = spec.dim;
  const half = D / 2;
  const cos = new Float32Array(B * T * D);
  const sin = new Float32Array(B * T * D);
  for (let r = 0; r < B * T; r++) {
    const p = positions[r]!;
    for (let i = 0; i < half; i++) {
      const f = f32(inv[i]! * p);
      const c = f32(f32(Math.cos(f)) * spec.attentionScaling);
      const s = f32(f32(Math.sin(f)) * spec.attentionScaling);
      cos[r * D + i] = c;
      cos[r * D + half + i] = c;
      sin[r * D + i] = s;
      sin[r * D + half + i] = s;
    }
  }
  return { cos: tensor(cos, [B, T, 1, D], { device }), sin: tensor(sin, [B, T, 1, D], { device }) };
}

/**
 * Rotates the first cos.shape[-1] dims of each head of x [B, T, H, headDim] (transformers'
 * apply_rotary_pos_emb with rotate_half; the other dims pass through, as partial rotary does).
 */
export function applyRope(x: Tensor, cos: Tensor, sin: Tensor): Tensor {
  const D = x.shape[3]!;
  const R = cos.shape[3]!;
  const rot = R === D ? x : slice(x, -1, 0, R);
  const rotated = add(mul(rot, cos), mul(concat([neg(slice(rot, -1, R / 2, R)), slice(rot, -1, 0, R / 2)], -1), sin));
  return R === D ? rotated : concat([rotated, slice(x, -1, R)], -1);
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
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

// Additive mask value for a hidden key: finite (as transformers' finfo.min), so a query row with
// no visible key (a left-padding position) gives finite, ignored values instead of NaN.
const MASKED = -1e30;

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
   * The additive mask [B, 1, 1, T, keyLength] (0 where a query sees a key: causal on cache
   * positions, a real token, within the sliding window and the query's segment), or null when plain causal attention over
   * T keys gives every real token the same result (then the fused causal kernel applies).
   */
  maskFor(window: number | null): Tensor | null {
    const S = this.keyLength;
    const seg = this.segmentIds;
    const plain = !this.cache && !seg && (!this.keyMask || this.rightPadded()) && (window === null || window >= this.T);
    if (plain) return null;
    return this.once(`mask:${window}`, () => {
      const { B, T, past } = this;
      const m = new Float32Array(B * T * S);
      for (let b = 0; b < B; b++)
        for (let t = 0; t < T; t++) {
          const p = past + t;
          const row = (b * T + t) * S;
          for (let s = 0; s < S; s++) {
            const ok = s <= p && (!this.keyMask || this.keyMask[b * S + s] === 1) && (window === null || p - s < window) &&
              (!seg || seg[b * T + t] === seg[b * S + s]);
            m[row + s] = ok ? 0 : MASKED;
          }
        }
      return this.own(tensor(m, [B, 1, 1, T, S], { device: this.device }));
    });
  }

  /**
   * Whether every row is tokens then padding: causal attention then never lets a real token see a
   * padding key, so the plain causal kernel gives real positions the masked result (training
   * batches are padded so; only padding positions' own outputs differ, and nothing reads them).
   */
  private rightPadded(): boolean {
    return this.once('rightPadded', () => {
      const m = this.keyMask!;
      const S = this.keyLength;
      for (let b = 0; b < this.B; b++)
        for (let s = 1; s < S; s++) if (m[b * S + s]! > m[b * S + s - 1]!) return false;
      return true;
    });
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
function writeCache(cache: Tensor, x: Tensor, past: number): void {
  const [B, T, KVH, D] = x.shape as [number, number, number, number];
  const maxLen = cache.shape[1]!;
  native.copyStrided(cache._storage, past * KVH * D, [maxLen * KVH * D, KVH * D, D, 1], x._live('keys'), 0, contiguousStrides(x.shape), [B, T, KVH, D]);
}

/** Repeats each of KVH heads G times ([B, T, KVH, D] -> [B, T, KVH·G, D], head h reads kv head h/G). */
function repeatHeads(x: Tensor, G: number): Tensor {
  if (G === 1) return x;
  const [B, T, KVH, D] = x.shape as [number, number, number, number];
  return reshape(mul(reshape(x, [B, T, KVH, 1, D]), ones([G, 1], { device: x.device })), [B, T, KVH * G, D]);
}

/**
 * Attention over grouped heads with an additive mask, as transformers' eager attention computes it
 * but without repeating K/V: q [B, T, H, D], k and v [B, S, KVH, D], mask [B, 1, 1, T, S].
 */
function maskedAttention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: number): Tensor {
  const [B, T, H, D] = q.shape as [number, number, number, number];
  const S = k.shape[1]!;
  const KVH = k.shape[2]!;
  const G = H / KVH;
  const qh = reshape(permute(q, [0, 2, 1, 3]), [B, KVH, G * T, D]); // head h = kv·G + g
  const scores = reshape(matmul(qh, permute(k, [0, 2, 3, 1])), [B, KVH, G, T, S]);
  const probs = softmax(add(mul(scores, scale), mask), -1);
  const out = matmul(reshape(probs, [B, KVH, G * T, S]), permute(v, [0, 2, 1, 3]));
  return permute(reshape(out, [B, H, T, D]), [0, 2, 1, 3]);
}

/**
 * Causal self-attention of one layer: q [B, T, H, D] (RoPE applied), k and v [B, T, KVH, D].
 * With a cache, k and v are appended at ctx.past and the queries see every cached key. Returns
 * [B, T, H·D]. Without cache, padding or a binding window it is the fused causal kernel.
 */
export function attend(q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext, layer: number, scale: number, window: number | null): Tensor {
  const [B, T, H, D] = q.shape as [number, number, number, number];
  const KVH = k.shape[2]!;
  let keys = k;
  let values = v;
  if (ctx.cache) {
    if (layer >= ctx.cache.keys.length) throw new LoraError('ERR_LORA_SHAPE', `Expected a cache with at least ${layer + 1} layers but it has ${ctx.cache.keys.length}`);
    writeCache(ctx.cache.keys[layer]!, k, ctx.past);
    writeCache(ctx.cache.values[layer]!, v, ctx.past);
    keys = slice(ctx.cache.keys[layer]!, 1, 0, ctx.keyLength);
    values = slice(ctx.cache.values[layer]!, 1, 0, ctx.keyLength);
  }
  const mask = ctx.maskFor(window);
  const out = mask === null
    ? attention(q, repeatHeads(k, H / KVH), repeatHeads(v, H / KVH), { causal: true, scale })
    : maskedAttention(q, keys, values, mask, scale);
  return reshape(out, [B, T, H * D]);
}

// ---- frozen layers made from checkpoint tensors ----------------------------------------------------

/** A lookup table (nn.Embedding) over a given float32 weight [V, C]. */
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
 * offset 1 (Gemma's GemmaRMSNorm).
 */
export class HfRMSNorm extends Module {
  weight!: Tensor;
  constructor(weight: Tensor, readonly eps: number, readonly offset = 0) {
    super();
    this.registerParameter('weight', weight);
  }
  forward(x: Tensor): Tensor {
    return rmsNorm(x, this.offset ? add(this.weight, this.offset) : this.weight, this.eps);
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
   * The tensor stored under `name` with this shape. 'matrix' tensors (projections, embedding
   * tables read by linear()) come in the model's dtype; 'vector' tensors (norms, biases) and
   * 'table' tensors (read by the float32-only lookup kernel) in float32. `transposed`: the
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
