// LlamaForCausalLM (Llama 2/3/3.1/3.2, SmolLM, TinyLlama) and MistralForCausalLM, written from
// transformers' modeling_llama.py / configuration_llama.py and modeling_mistral.py /
// configuration_mistral.py, shaped after mlx-lm's models/llama.py: attention, MLP, decoder layer,
// model. Mistral is the same math (no biases) plus a sliding window over every layer. The classes
// here are the pre-norm RoPE decoder the Qwen, Gemma and Phi-3 families reuse with their options.
import { Module } from '../module';
import { Sequential } from '../nn';
import { mul, reshape } from '../ops';
import { reshapeInference, Tensor } from '../tensor';
import type { Backbone, Family } from './causal_lm';
import { decodeLayer } from './decode';
import {
  Activation, activation, addProjected, applyRope, attend, child, ConfigReader, ForwardContext, gated, HfEmbedding, HfRMSNorm, isOneProduct, linearFrom, plainContext, projectShared, reshapeFresh,
  readRope, RopeDefaults, RopeInputs, ropeInputs, RopeSpec, ropeRegime, WeightSource,
} from './common';

/** What the RoPE decoder families need from config.json, with each family's defaults applied. */
export interface DecoderConfig {
  vocabSize: number;
  hidden: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  intermediate: number;
  eps: number;
  act: Activation;
  rope: RopeSpec;
  tie: boolean;
  /** Biases of q/k/v_proj and of o_proj (Qwen2 has the first, Llama's attention_bias both). */
  qkvBias: boolean;
  oBias: boolean;
  mlpBias: boolean;
  /** Sliding window of each layer (null: full causal attention). */
  windows: (number | null)[];
  /** Qwen3: RMSNorm over each head of q and k before RoPE. */
  qkNorm: boolean;
  /** Gemma: norms scale by (1 + w). */
  normOffset: number;
  /** Gemma: embeddings times sqrt(hidden), rounded to the weights' dtype. */
  embedScale: boolean;
}

/** The fields every RoPE decoder config shares; `d` holds the family's defaults for them. */
export function readDecoder(cfg: ConfigReader, d: { headDim?: number; tie: boolean; theta: number; eps: number; act: string; maxPositions: number; rope?: Partial<RopeDefaults> }): DecoderConfig {
  const hidden = cfg.int('hidden_size');
  const heads = cfg.int('num_attention_heads');
  const headDim = cfg.int('head_dim', d.headDim ?? Math.floor(hidden / heads));
  const kvHeads = cfg.int('num_key_value_heads', heads);
  if (heads % kvHeads !== 0) throw cfg.fail('num_key_value_heads', `a divisor of num_attention_heads (${heads})`, kvHeads);
  const layers = cfg.int('num_hidden_layers');
  return {
    vocabSize: cfg.int('vocab_size'),
    hidden, layers, heads, kvHeads, headDim,
    intermediate: cfg.int('intermediate_size'),
    eps: cfg.num('rms_norm_eps', d.eps, 0),
    act: activation(cfg, 'hidden_act', cfg.str('hidden_act', d.act)),
    rope: readRope(cfg, headDim, { theta: d.theta, maxPositions: d.maxPositions, ...d.rope }),
    tie: cfg.bool('tie_word_embeddings', d.tie),
    qkvBias: false, oBias: false, mlpBias: false,
    windows: new Array<number | null>(layers).fill(null),
    qkNorm: false, normOffset: 0, embedScale: false,
  };
}

/** Projects x [B, T, hidden] to q [B, T, H, D], k and v [B, T, KVH, D]. */
export type QkvProjection = (x: Tensor) => { q: Tensor; k: Tensor; v: Tensor };

/**
 * Self-attention with RoPE (transformers' LlamaAttention): q/k/v_proj, o_proj, optionally
 * Qwen3's q_norm/k_norm. Subclasses change how q, k, v are projected (Phi-3's fused qkv_proj).
 */
export class LlamaAttention extends Module {
  constructor(readonly cfg: DecoderConfig, readonly layer: number, w: WeightSource, p: string, fused = false) {
    super();
    const { hidden, heads, kvHeads, headDim } = cfg;
    if (!fused) {
      this.registerModule('q_proj', linearFrom(w, `${p}.q_proj`, hidden, heads * headDim, cfg.qkvBias));
      this.registerModule('k_proj', linearFrom(w, `${p}.k_proj`, hidden, kvHeads * headDim, cfg.qkvBias));
      this.registerModule('v_proj', linearFrom(w, `${p}.v_proj`, hidden, kvHeads * headDim, cfg.qkvBias));
    }
    this.registerModule('o_proj', linearFrom(w, `${p}.o_proj`, heads * headDim, hidden, cfg.oBias));
    if (cfg.qkNorm) {
      this.registerModule('q_norm', new HfRMSNorm(w.take(`${p}.q_norm.weight`, [headDim], 'vector'), cfg.eps));
      this.registerModule('k_norm', new HfRMSNorm(w.take(`${p}.k_norm.weight`, [headDim], 'vector'), cfg.eps));
    }
  }

  protected project(x: Tensor, ctx?: ForwardContext): { q: Tensor; k: Tensor; v: Tensor } {
    const [B, T] = x.shape as [number, number];
    const { heads, kvHeads, headDim } = this.cfg;
    const mods = ['q_proj', 'k_proj', 'v_proj'].map((name) => child(this, name));
    const n = [heads, kvHeads, kvHeads];
    // an inference pass runs the three products in one call where it can (projectShared) and takes
    // their fresh outputs over as [B, T, n, D] without a copy; so does a pass that records
    // gradients, where the product is one op whose backward does not read its output (reshapeFresh)
    const [q, k, v] = ctx?.inference
      ? projectShared(x, mods, ctx).map((y, i) => reshapeInference(y, [B, T, n[i]!, headDim], reshape))
      : mods.map((m, i) => (isOneProduct(m) ? reshapeFresh : reshape)(m.forward(x), [B, T, n[i]!, headDim]));
    return { q: q!, k: k!, v: v! };
  }

  /** The attention's output before o_proj: [B, T, H·D]. */
  heads(x: Tensor, ctx: ForwardContext, rope: RopeInputs): Tensor {
    let { q, k, v } = this.project(x, ctx);
    if (this.cfg.qkNorm) {
      q = child(this, 'q_norm').forward(q);
      k = child(this, 'k_norm').forward(k);
    }
    // (q and k are this pass's own: project() and the norms return fresh tensors)
    q = applyRope(q, rope, ctx);
    k = applyRope(k, rope, ctx);
    return attend(q, k, v, ctx, this.layer, this.cfg.headDim ** -0.5, this.cfg.windows[this.layer]!);
  }

  run(x: Tensor, ctx: ForwardContext, rope: RopeInputs): Tensor {
    return child(this, 'o_proj').forward(this.heads(x, ctx, rope));
  }

  /** A stand-alone pass: positions 0..T-1, causal, no cache. */
  forward(x: Tensor): Tensor {
    const ctx = plainContext(x);
    return this.run(x, ctx, ropeInputs(this.cfg.rope, ctx.positions, ctx.B, ctx.T, x.device));
  }
}

/** down_proj(act(gate_proj(x)) · up_proj(x)) (transformers' LlamaMLP), the gate fused in one kernel. */
export class LlamaMLP extends Module {
  constructor(readonly cfg: DecoderConfig, w: WeightSource, p: string) {
    super();
    const { hidden, intermediate, mlpBias } = cfg;
    this.registerModule('gate_proj', linearFrom(w, `${p}.gate_proj`, hidden, intermediate, mlpBias));
    this.registerModule('up_proj', linearFrom(w, `${p}.up_proj`, hidden, intermediate, mlpBias));
    this.registerModule('down_proj', linearFrom(w, `${p}.down_proj`, intermediate, hidden, mlpBias));
  }

  /** act(gate_proj(x)) · up_proj(x), the input of down_proj (both products in one call in an inference pass: projectShared). */
  inner(x: Tensor, ctx?: ForwardContext): Tensor {
    const [g, u] = projectShared(x, [child(this, 'gate_proj'), child(this, 'up_proj')], ctx);
    return gated(this.cfg.act, g!, u!);
  }

  forward(x: Tensor): Tensor {
    return child(this, 'down_proj').forward(this.inner(x));
  }
}

/** An MLP that ends in down_proj(inner(x)) (Llama's gate/up, Phi-3's gate_up_proj): the layer adds down_proj into its residual. */
function hasInner(m: Module): m is Module & { inner(x: Tensor, ctx?: ForwardContext): Tensor } {
  return typeof (m as { inner?: unknown }).inner === 'function' && m.getModule('down_proj') !== undefined;
}

/** Pre-norm block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)). */
export class DecoderLayer extends Module {
  constructor(cfg: DecoderConfig, attn: LlamaAttention, mlp: Module, w: WeightSource, p: string) {
    super();
    const norm = (name: string) => new HfRMSNorm(w.take(`${p}.${name}.weight`, [cfg.hidden], 'vector'), cfg.eps, cfg.normOffset);
    this.registerModule('input_layernorm', norm('input_layernorm'));
    this.registerModule('self_attn', attn);
    this.registerModule('post_attention_layernorm', norm('post_attention_layernorm'));
    this.registerModule('mlp', mlp);
  }

  run(x: Tensor, ctx: ForwardContext, rope: RopeInputs): Tensor {
    const attn = child(this, 'self_attn') as LlamaAttention;
    const mlp = child(this, 'mlp');
    // a cached one-token inference pass over plain projections: the same kernels into reused scratch
    if (ctx.cache && ctx.T === 1 && Object.getPrototypeOf(attn) === LlamaAttention.prototype && Object.getPrototypeOf(mlp) === LlamaMLP.prototype) {
      const y = decodeLayer(this, attn, mlp, x, ctx, rope);
      if (y) return y;
    }
    // o_proj and down_proj add into the residual stream (in place in an inference pass: addProjected)
    const h = addProjected(x, child(attn, 'o_proj'), attn.heads(child(this, 'input_layernorm').forward(x), ctx, rope), ctx);
    const n = child(this, 'post_attention_layernorm').forward(h);
    return hasInner(mlp) ? addProjected(h, child(mlp, 'down_proj'), mlp.inner(n, ctx), ctx, true) : h.add(mlp.forward(n));
  }

  forward(x: Tensor): Tensor {
    const attn = child(this, 'self_attn') as LlamaAttention;
    const ctx = plainContext(x);
    return this.run(x, ctx, ropeInputs(attn.cfg.rope, ctx.positions, ctx.B, ctx.T, x.device));
  }
}

/** How a family builds one layer's attention and MLP. */
export interface LayerParts {
  attention(cfg: DecoderConfig, layer: number, w: WeightSource, p: string): LlamaAttention;
  mlp(cfg: DecoderConfig, w: WeightSource, p: string): Module;
}

const llamaParts: LayerParts = {
  attention: (cfg, layer, w, p) => new LlamaAttention(cfg, layer, w, p),
  mlp: (cfg, w, p) => new LlamaMLP(cfg, w, p),
};

/** embed_tokens, layers.0..n-1, norm (transformers' LlamaModel and its relatives). */
export class LlamaModel extends Module implements Backbone {
  readonly cacheShape: { layers: number; kvHeads: number; headDim: number };
  readonly maxPositions = null;
  private readonly embedNormalizer: number;

  constructor(readonly cfg: DecoderConfig, w: WeightSource, parts: LayerParts = llamaParts, dtypeRound: (v: number) => number = (v) => v) {
    super();
    this.registerModule('embed_tokens', new HfEmbedding(w.take('model.embed_tokens.weight', [cfg.vocabSize, cfg.hidden], 'table')));
    const layers: Module[] = [];
    for (let i = 0; i < cfg.layers; i++) {
      const p = `model.layers.${i}`;
      layers.push(new DecoderLayer(cfg, parts.attention(cfg, i, w, `${p}.self_attn`), parts.mlp(cfg, w, `${p}.mlp`), w, p));
    }
    this.registerModule('layers', new Sequential(...layers));
    this.registerModule('norm', new HfRMSNorm(w.take('model.norm.weight', [cfg.hidden], 'vector'), cfg.eps, cfg.normOffset));
    this.cacheShape = { layers: cfg.layers, kvHeads: cfg.kvHeads, headDim: cfg.headDim };
    // Gemma multiplies by sqrt(hidden) as a tensor of the weights' dtype (55.4256 -> 55.5 in bf16)
    this.embedNormalizer = cfg.embedScale ? dtypeRound(Math.sqrt(cfg.hidden)) : 1;
  }

  get inputEmbedding(): Tensor {
    return (child(this, 'embed_tokens') as HfEmbedding).weight;
  }

  ropeRegime(maxPosition: number): string {
    return ropeRegime(this.cfg.rope, maxPosition);
  }

  hidden(ids: Tensor, ctx: ForwardContext): Tensor {
    let x = child(this, 'embed_tokens').forward(ids);
    if (this.embedNormalizer !== 1) x = mul(x, this.embedNormalizer);
    const rope = ctx.once('rope', () => {
      const r = ropeInputs(this.cfg.rope, ctx.positions, ctx.B, ctx.T, ctx.device);
      ctx.own(r.positions);
      ctx.own(r.invFreq);
      return r;
    });
    for (const [, layer] of (child(this, 'layers') as Sequential).namedChildren())
      x = ctx.layer(x, (h) => (layer as DecoderLayer).run(h, ctx, rope));
    return child(this, 'norm').forward(x);
  }

  /** The final hidden states [B, T, hidden] for ids [B, T] at positions 0..T-1. */
  forward(ids: Tensor): Tensor {
    return this.hidden(ids, plainContext(ids));
  }
}

/** The rotary inv_freq buffer older checkpoints of the RoPE families saved (transformers recomputes it). */
export const ROTARY_BUFFER = /(^|\.)rotary_emb\.inv_freq$/;

/** LlamaForCausalLM and MistralForCausalLM. */
export const llamaFamily: Family = {
  architectures: { LlamaForCausalLM: 'llama', MistralForCausalLM: 'mistral' },
  prefix: 'model',
  ignore: ROTARY_BUFFER,
  build(cfg, arch, w, dtypeRound) {
    if (arch === 'MistralForCausalLM') {
      const d = readDecoder(cfg, { tie: false, theta: 10000, eps: 1e-6, act: 'silu', maxPositions: 4096 * 32 });
      d.windows.fill(cfg.optInt('sliding_window', 4096));
      return { backbone: new LlamaModel(d, w), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
    }
    const d = readDecoder(cfg, { tie: false, theta: 10000, eps: 1e-6, act: 'silu', maxPositions: 2048 });
    d.qkvBias = d.oBias = cfg.bool('attention_bias', false);
    d.mlpBias = cfg.bool('mlp_bias', false);
    return { backbone: new LlamaModel(d, w, llamaParts, dtypeRound), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
  },
};
