// CausalLM: a Hugging Face causal language model as a Module whose module paths are the
// checkpoint's state-dict names (model.layers.0.self_attn.q_proj, transformer.h.0.attn.c_attn),
// so PEFT target_modules work with applyLora unchanged. forward() gives float32 logits with
// transformers' semantics for attention masks, position ids and a KV cache; generate() lives in
// generate.ts, loading and saving in loader.ts, the families in llama.ts ... gpt2.ts.
import { checkOptions, expectBoolean, LoraError, rangeError, typeError } from '../errors';
import { Module } from '../module';
import { LoraLinear } from '../lora';
import { Linear } from '../nn';
import { crossEntropy, linearCrossEntropy, MatmulPrecision, slice } from '../ops';
import { expectMatmulPrecision } from '../ops/util';
import { Device, isGradEnabled, saveFor, shapeString, Tensor, tensor, tidy } from '../tensor';
import { ConfigReader, ForwardContext, isPlainLinear, KVCache, WeightSource } from './common';
import { generate, GenerateOptions } from './generate';

/** The transformer below the head: what a family builds (LlamaModel, Gpt2Model). */
export interface Backbone extends Module {
  /** Layers, KV heads and head size, for a KV cache. */
  readonly cacheShape: { layers: number; kvHeads: number; headDim: number };
  /** Learned positions (GPT-2's n_positions), or null when positions are unbounded (RoPE). */
  readonly maxPositions: number | null;
  /** The input embedding table (a tied head shares it). */
  readonly inputEmbedding: Tensor;
  /** Which RoPE frequencies positions up to maxPosition use (longrope switches; a cache then restarts). */
  ropeRegime(maxPosition: number): string;
  /** Final hidden states [B, T, hidden] (after the last norm). */
  hidden(ids: Tensor, ctx: ForwardContext): Tensor;
}

/** One architecture family: the config.architectures names it builds and how. */
export interface Family {
  /** config.architectures[0] names with the model_type a config without architectures gives. */
  architectures: Record<string, string>;
  /** The backbone's module name ('model', 'transformer'). */
  prefix: string;
  /** Checkpoint keys transformers ignores on load (saved buffers). */
  ignore?: RegExp;
  build(cfg: ConfigReader, arch: string, w: WeightSource, dtypeRound: (v: number) => number):
  { backbone: Backbone; tie: boolean; vocabSize: number; hidden: number };
}

/** Options of CausalLM.forward(). */
export interface ForwardOptions {
  /**
   * int32 [B, T] (or [B, cached + T] with a cache, as transformers takes it): 1 for a token, 0 for
   * padding, on either side. Keys at padding positions are hidden from every query.
   */
  attentionMask?: Tensor;
  /** int32 [B, T] or [1, T]; default cache length + 0..T-1 (transformers' default, padding or not). */
  positionIds?: Tensor;
  /** A KVCache from createCache(): this pass's keys and values are appended, and queries see all cached ones. */
  cache?: KVCache;
  /**
   * int32 [B, T] for packed sequences (a Batch's segmentIds from loadDataset with packing): a token
   * attends only to earlier tokens with the same segment id, so rows packed into one sequence do
   * not see each other. Give positionIds restarting in each row with it. Not with a cache.
   */
  segmentIds?: Tensor;
}

/** Options of CausalLM.loss(): forward()'s, without a cache. */
export type LossOptions = Omit<ForwardOptions, 'cache'>;

/** @internal the key loadCausalLM() passes to the constructor */
export const CONSTRUCT_CAUSAL_LM = Symbol('lora-native.CausalLM');

/** The dtype frozen weights are stored in. */
export type WeightDtype = 'float32' | 'bfloat16' | 'float16';

/**
 * A causal language model loaded with loadCausalLM(). Its module paths are the Hugging Face names,
 * its weights are frozen (model.parameters() lists what applyLora adds), and `config` is the
 * parsed config.json.
 *
 * @example
 * const model = await loadCausalLM('./SmolLM2-135M');
 * const logits = model.forward(tensor([1, 2, 3], [1, 3], { dtype: 'int32' })); // [1, 3, vocab]
 * const newIds = await model.generate([1, 2, 3], { maxNewTokens: 20 });
 */
export class CausalLM extends Module {
  /** config.json as parsed. */
  readonly config: Record<string, unknown>;
  /** config.architectures[0] (or the name model_type implied). */
  readonly architecture: string;
  /** dtype of the frozen projection weights. */
  readonly dtype: WeightDtype;
  /** generation_config.json of the folder, when it had one (eos_token_id defaults for generate()). */
  readonly generationConfig: Record<string, unknown> | null;
  readonly vocabSize: number;
  /** @internal the folder it was loaded from (saveCausalLM copies its tokenizer files) */
  readonly sourceDir: string | null;
  /** @internal */
  readonly backbone: Backbone;
  /** @internal */
  readonly prefix: string;
  /** Whether lm_head shares the input embedding table. */
  readonly tied: boolean;
  /**
   * Gradient checkpointing (transformers' gradient_checkpointing_enable()): when true, a forward
   * pass that records gradients keeps only each decoder layer's input and recomputes the layer
   * during backward(), so activation memory is about one layer's instead of all layers', for
   * about one more forward pass of time. Gradients and dropout masks are the same as without.
   * Ignored with a KV cache and when nothing records gradients. Default false.
   *
   * @example
   * model.gradientCheckpointing = true;
   * tidy(() => model.loss(ids, labels).backward());
   * @throws LoraTypeError when set to anything but a boolean.
   */
  get gradientCheckpointing(): boolean {
    return this.checkpointing;
  }
  set gradientCheckpointing(on: boolean) {
    this.checkpointing = expectBoolean('gradientCheckpointing', on);
  }
  private checkpointing = false;

  /**
   * How the model's products with bfloat16 weights treat their float32 input (see
   * MatmulPrecision): 'fp32' (default) or 'bf16', where the input is rounded to bf16 for a bf16 dot
   * product (avx512_bf16 CPUs; about twice the prefill and training speed of a bfloat16 model,
   * each output within 2^-8·Σ|x·w|). Setting it sets every Linear's (projections, the head, LoRA
   * layers when merged; applyLora carries it over). loadCausalLM's `matmulPrecision` sets it at
   * load. No effect on float32 weights, nor on CUDA (fp32 products there for now).
   *
   * @example
   * const model = await loadCausalLM(dir, { dtype: 'bfloat16', matmulPrecision: 'bf16' });
   * model.matmulPrecision = 'fp32'; // back to fp32 products
   * @throws LoraRangeError (ERR_LORA_RANGE, with a did-you-mean) for another value; LoraTypeError for a non-string.
   */
  get matmulPrecision(): MatmulPrecision {
    return this.precision;
  }
  set matmulPrecision(p: MatmulPrecision) {
    if (p === undefined) throw typeError('matmulPrecision', "one of 'fp32', 'bf16'", p);
    this.precision = expectMatmulPrecision('matmulPrecision', p);
    for (const [, m] of this.namedModules()) if (m instanceof Linear || m instanceof LoraLinear) m.matmulPrecision = this.precision;
  }
  private precision: MatmulPrecision = 'fp32';

  /** @internal made by loadCausalLM() */
  constructor(key: symbol, parts: {
    config: Record<string, unknown>; architecture: string; dtype: WeightDtype; generationConfig: Record<string, unknown> | null;
    sourceDir: string | null; prefix: string; backbone: Backbone; head: Linear; tied: boolean;
  }) {
    if (key !== CONSTRUCT_CAUSAL_LM) throw new LoraError('ERR_LORA_TYPE', 'A CausalLM is made by loadCausalLM(), not new CausalLM()');
    super();
    this.config = parts.config;
    this.architecture = parts.architecture;
    this.dtype = parts.dtype;
    this.generationConfig = parts.generationConfig;
    this.sourceDir = parts.sourceDir;
    this.prefix = parts.prefix;
    this.backbone = parts.backbone;
    this.tied = parts.tied;
    this.vocabSize = parts.head.outFeatures;
    this.registerModule(parts.prefix, parts.backbone);
    this.registerModule('lm_head', parts.head);
    this.freeze();
    this.eval();
  }

  /** Where the weights live. */
  get device(): Device {
    return this.backbone.inputEmbedding.device;
  }

  /**
   * Logits [B, T, vocab] (float32) for int32 token ids [B, T]. Logits at real positions do not
   * depend on padding elsewhere in the batch. Without `cache`, positions are 0..T-1 unless
   * positionIds says otherwise, as in transformers.
   *
   * @example
   * const logits = model.forward(ids, { attentionMask: mask }); // left or right padding
   * @throws ERR_LORA_DTYPE / ERR_LORA_SHAPE for ids, attentionMask or positionIds of the wrong
   *   dtype or shape; LoraRangeError for a token id outside [0, vocab) or a mask value other than
   *   0 or 1 (or a negative segment id); ERR_LORA_OPTION for segmentIds with a cache; ERR_LORA_STATE for a cache of another model or one too short for T more positions.
   */
  forward(ids: Tensor, options?: ForwardOptions): Tensor {
    const o = checkOptions<ForwardOptions>('CausalLM.forward()', options, ['attentionMask', 'positionIds', 'cache', 'segmentIds']);
    const [B, T] = checkIds(ids);
    const cache = o.cache === undefined ? null : this.checkCache(o.cache, B, T);
    const { positions, keyMask, segments } = readInputs(o, B, T, cache);
    return this.run(ids, positions, keyMask, cache, false, segments);
  }

  /**
   * The causal-LM loss of ids against labels, as `causalLmLoss(model.forward(ids, options),
   * labels)` gives it (shift by one, -100 ignored, the mean over counted tokens, NaN when none
   * counts), without the [B, T, vocab] logits: the final hidden states go through the head and
   * the cross-entropy a chunk of rows at a time ({@link linearCrossEntropy}), so training holds a
   * few MB of logits instead of two logits-sized tensors (400 MB at batch 4 x 256, vocab 49152).
   * Positions whose label is ignored compute no logits. A head with a LoRA adapter (or another
   * module than a plain Linear) takes the unfused path and gives the same loss.
   *
   * @example
   * const loss = model.loss(ids, labels, { attentionMask }); loss.backward();
   * @throws what forward() throws for ids and options (no cache here); ERR_LORA_SHAPE when labels
   *   are not [B, T]; ERR_LORA_DTYPE for non-int32 labels; LoraRangeError for a label outside
   *   [0, vocab) other than -100.
   */
  loss(ids: Tensor, labels: Tensor, options?: LossOptions): Tensor {
    const o = checkOptions<LossOptions>('CausalLM.loss()', options, ['attentionMask', 'positionIds', 'segmentIds']);
    const [B, T] = checkIds(ids);
    const head = this.getModule('lm_head');
    if (!isPlainLinear(head)) {
      const pass = () => causalLmLoss(this.forward(ids, o), labels);
      return isGradEnabled() && this.parameters().length > 0 ? pass() : tidy(pass);
    }
    const shifted = shiftLabels(labels, B, T);
    const V = this.vocabSize;
    for (const v of shifted) if (v !== -100 && (v < 0 || v >= V)) throw rangeError('labels', `token ids between 0 and ${V - 1} (or -100)`, v);
    const targets = tensor(shifted, [B, T], { dtype: 'int32', device: labels.device });
    try {
      const { positions, keyMask, segments } = readInputs(o, B, T, null);
      const ctx = new ForwardContext(B, T, positions, keyMask, null, this.device);
      ctx.segmentIds = segments;
      const recording = isGradEnabled() && this.parameters().length > 0;
      ctx.checkpointLayers = recording && this.checkpointing;
      ctx.inference = !recording;
      const pass = () => linearCrossEntropy(this.backbone.hidden(ids, ctx), head.weight, targets, { bias: head.bias, matmulPrecision: head.matmulPrecision });
      return recording ? pass() : tidy(pass);
    } finally {
      targets.dispose(); // read on the host; the loss keeps its gradients, not its targets
    }
  }

  /**
   * @internal logits for host-side positions and key mask (generate() calls it under noGrad); with
   * lastOnly, only the last position's logits [B, 1, vocab] are computed.
   */
  run(ids: Tensor, positions: Int32Array, keyMask: Uint8Array | null, cache: KVCache | null, lastOnly: boolean, segments: Int32Array | null = null): Tensor {
    const [B, T] = ids.shape as [number, number];
    const ctx = new ForwardContext(B, T, positions, keyMask, cache, this.device);
    ctx.segmentIds = segments;
    const pass = () => {
      let h = this.backbone.hidden(ids, ctx);
      if (lastOnly && T > 1) h = slice(h, 1, T - 1);
      return this.getModule('lm_head')!.forward(h);
    };
    // nothing will run backward through this pass: free every intermediate now
    const recording = isGradEnabled() && this.parameters().length > 0;
    ctx.checkpointLayers = recording && !cache && this.checkpointing;
    ctx.inference = !recording;
    const out = recording ? pass() : tidy(pass);
    if (cache) {
      const S = ctx.past + T;
      for (let b = 0; b < B; b++)
        for (let s = cache.length; s < S; s++) cache.keyMask[b * cache.maxLength + s] = keyMask ? keyMask[b * S + s]! : 1;
      cache.length = S;
    }
    return out;
  }

  /**
   * A KV cache for up to maxLength positions of batchSize rows, to pass to forward({ cache }).
   * Free it with dispose().
   * @example using cache = model.createCache(1, 128);
   */
  createCache(batchSize: number, maxLength: number): KVCache {
    const { layers, kvHeads, headDim } = this.backbone.cacheShape;
    return new KVCache(layers, batchSize, maxLength, kvHeads, headDim, this.device);
  }

  /**
   * Generates new tokens after each prompt (see GenerateOptions): greedy by default, or sampled
   * with temperature, topK, topP, minP and a seed; several prompts batch together with left
   * padding; a KV cache makes each step one token's work. Resolves with the new ids only (ending
   * with the eos id when one was generated), one array per prompt for an array of prompts.
   *
   * @example
   * const ids = await model.generate(tokenizer.encode('Hello'), { maxNewTokens: 32, onToken: (id) => out.push(id) });
   * @throws LoraTypeError / LoraRangeError for bad prompts or options (did-you-mean for unknown names).
   */
  generate(promptIds: number[], options?: GenerateOptions): Promise<number[]>;
  generate(promptIds: number[][], options?: GenerateOptions): Promise<number[][]>;
  generate(promptIds: number[] | number[][], options?: GenerateOptions): Promise<number[] | number[][]> {
    return generate(this, promptIds, options);
  }

  /** Moves every weight to a device; a tied head keeps sharing the moved table. */
  override to(device: Device): this {
    const head = this.getModule('lm_head') as unknown as { weight: Tensor | null };
    const shared = head.weight === this.backbone.inputEmbedding;
    if (shared) head.weight = null;
    try {
      super.to(device);
    } finally {
      if (shared) head.weight = this.backbone.inputEmbedding;
    }
    return this;
  }

  private checkCache(cache: unknown, B: number, T: number): KVCache {
    if (!(cache instanceof KVCache)) throw typeError('cache', 'a KVCache from createCache()', cache);
    const { layers } = this.backbone.cacheShape;
    if (cache.keys.length !== layers || cache.keys.some((k) => k.isDisposed))
      throw new LoraError('ERR_LORA_STATE', `Expected a live KVCache made by this model's createCache() (${layers} layers) but received one with ${cache.keys.length} layers${cache.keys.some((k) => k.isDisposed) ? ', disposed' : ''}`);
    if (cache.batchSize !== B) throw new LoraError('ERR_LORA_SHAPE', `Expected ids with ${cache.batchSize} rows for this cache but received ${B}`);
    if (cache.length + T > cache.maxLength)
      throw new LoraError('ERR_LORA_STATE', `Expected at most ${cache.maxLength - cache.length} more positions for this cache (maxLength ${cache.maxLength}, ${cache.length} used) but received ${T}`);
    return cache;
  }
}

function checkIds(ids: unknown): [number, number] {
  if (!(ids instanceof Tensor)) throw typeError('ids', 'an int32 Tensor of shape [batch, seq]', ids);
  ids._live('ids');
  if (ids.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected int32 ids but received ${ids.dtype} (create them with { dtype: 'int32' })`);
  if (ids.ndim !== 2 || ids.shape[0] === 0 || ids.shape[1] === 0)
    throw new LoraError('ERR_LORA_SHAPE', `Expected ids of shape [batch, seq] with batch, seq >= 1 but received ${shapeString(ids.shape)}`);
  return ids.shape as [number, number];
}

function intData(name: string, t: unknown): Int32Array {
  if (!(t instanceof Tensor)) throw typeError(name, 'an int32 Tensor', t);
  t._live(name);
  if (t.dtype !== 'int32') throw new LoraError('ERR_LORA_DTYPE', `Expected an int32 ${name} but received ${t.dtype}`);
  return Int32Array.from(t.toFloat32Array());
}

function defaultPositions(B: number, T: number, past: number): Int32Array {
  const p = new Int32Array(B * T);
  for (let i = 0; i < B * T; i++) p[i] = past + (i % T);
  return p;
}

function readPositions(t: Tensor, B: number, T: number): Int32Array {
  const data = intData('positionIds', t);
  if (t.ndim !== 2 || t.shape[1] !== T || (t.shape[0] !== B && t.shape[0] !== 1))
    throw new LoraError('ERR_LORA_SHAPE', `Expected positionIds of shape [${B}, ${T}] or [1, ${T}] but received ${shapeString(t.shape)}`);
  if (t.shape[0] === B) return data;
  const out = new Int32Array(B * T);
  for (let b = 0; b < B; b++) out.set(data, b * T);
  return out;
}

/** The targets [B, T] on the host: labels[b, t + 1] at t, -100 at the last position of each row. */
function shiftLabels(labels: Tensor, B: number, T: number, logitsShape?: readonly number[]): Float32Array {
  const data = intData('labels', labels);
  if (labels.ndim !== 2 || labels.shape[0] !== B || labels.shape[1] !== T)
    throw new LoraError('ERR_LORA_SHAPE', `Expected labels of shape [${B}, ${T}] for ${logitsShape ? `logits of shape ${shapeString(logitsShape)}` : `ids of shape [${B}, ${T}]`} but received ${shapeString(labels.shape)}`);
  const shifted = new Float32Array(B * T).fill(-100);
  for (let b = 0; b < B; b++) for (let t = 0; t + 1 < T; t++) shifted[b * T + t] = data[b * T + t + 1]!;
  return shifted;
}

/** Host-side positions, key mask and segment ids of forward()'s or loss()'s options. */
function readInputs(o: LossOptions, B: number, T: number, cache: KVCache | null): { positions: Int32Array; keyMask: Uint8Array | null; segments: Int32Array | null } {
  let segments: Int32Array | null = null;
  if (o.segmentIds !== undefined) {
    if (cache) throw new LoraError('ERR_LORA_OPTION', 'Expected segmentIds (packed rows) or a cache for CausalLM.forward(), not both');
    segments = intData('segmentIds', o.segmentIds);
    if (o.segmentIds.ndim !== 2 || o.segmentIds.shape[0] !== B || o.segmentIds.shape[1] !== T)
      throw new LoraError('ERR_LORA_SHAPE', `Expected segmentIds of shape [${B}, ${T}] but received ${shapeString(o.segmentIds.shape)}`);
    for (const v of segments) if (v < 0) throw rangeError('segmentIds', 'values >= 0', v);
  }
  const past = cache ? cache.length : 0;
  const positions = o.positionIds === undefined ? defaultPositions(B, T, past) : readPositions(o.positionIds, B, T);
  const given = o.attentionMask === undefined ? null : readMask(o.attentionMask, B, T, past);
  return { positions, keyMask: buildKeyMask(B, T, past, given, cache), segments };
}

/** The mask of this pass's tokens [B, T] (a [B, past + T] mask gives its last T columns). */
function readMask(t: Tensor, B: number, T: number, past: number): Int32Array {
  const data = intData('attentionMask', t);
  const ok = t.ndim === 2 && t.shape[0] === B && (t.shape[1] === T || t.shape[1] === past + T);
  if (!ok) throw new LoraError('ERR_LORA_SHAPE', `Expected attentionMask of shape [${B}, ${T}]${past ? ` or [${B}, ${past + T}]` : ''} but received ${shapeString(t.shape)}`);
  for (const v of data) if (v !== 0 && v !== 1) throw rangeError('attentionMask', 'values 0 or 1', v);
  const W = t.shape[1]!;
  if (W === T) return data;
  const out = new Int32Array(B * T);
  for (let b = 0; b < B; b++) out.set(data.subarray(b * W + past, (b + 1) * W), b * T);
  return out;
}

/** 1/0 for every key position (B·(past+T)): the cache's record, then this pass's mask; null when all are 1. */
export function buildKeyMask(B: number, T: number, past: number, given: ArrayLike<number> | null, cache: KVCache | null): Uint8Array | null {
  const S = past + T;
  const m = new Uint8Array(B * S);
  let all = true;
  for (let b = 0; b < B; b++) {
    for (let s = 0; s < past; s++) m[b * S + s] = cache!.keyMask[b * cache!.maxLength + s]!;
    for (let t = 0; t < T; t++) m[b * S + past + t] = given ? given[b * T + t]! : 1;
  }
  for (const v of m) if (v !== 1) { all = false; break; }
  // every key real (the cache's too): no mask for the kernel to read (run() fills the cache's as 1)
  return all ? null : m;
}

/**
 * The loss of a causal LM as transformers computes it: logits [B, T, V] at position t predict
 * labels [B, T] at t + 1 (shift by one), labels equal to -100 are ignored, and the result is the
 * mean over the counted tokens (NaN when none counts). No shifted copy of the logits is made; the
 * cross-entropy kernel keeps one log-sum-exp per row, not a second [B·T, V] tensor (its gradient
 * is one [B·T, V] tensor, as any backward through the head needs).
 *
 * @example
 * const loss = causalLmLoss(model.forward(ids, { attentionMask }), labels); loss.backward();
 * @throws ERR_LORA_SHAPE when labels are not [B, T] for logits [B, T, V]; ERR_LORA_DTYPE for
 *   non-int32 labels; LoraRangeError for a label outside [0, V) other than -100.
 */
export function causalLmLoss(logits: Tensor, labels: Tensor): Tensor {
  if (!(logits instanceof Tensor)) throw typeError('logits', 'a float32 Tensor [batch, seq, vocab]', logits);
  logits._live('logits');
  if (logits.ndim !== 3) throw new LoraError('ERR_LORA_SHAPE', `Expected logits of shape [batch, seq, vocab] but received ${shapeString(logits.shape)}`);
  const [B, T] = logits.shape as [number, number, number];
  const targets = tensor(shiftLabels(labels, B, T, logits.shape), [B, T], { dtype: 'int32', device: labels.device });
  let loss: Tensor;
  try {
    loss = crossEntropy(logits, targets, { ignoreIndex: -100 });
  } catch (err) {
    targets.dispose();
    throw err;
  }
  return saveFor(loss, targets); // its backward reads the targets; they go with the loss
}
