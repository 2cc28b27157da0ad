// GPT2LMHeadModel, written from transformers' modeling_gpt2.py / configuration_gpt2.py: learned
// position embeddings (wpe), pre-norm blocks with LayerNorm (ln_1, ln_2, ln_f), one fused c_attn
// for q, k, v, an MLP c_fc -> gelu_new -> c_proj, and a head tied to wte by default. Its Conv1D
// layers store weights as [in, out]; they are held as Linear [out, in] (fanInFanOut, so applyLora
// records PEFT's fan_in_fan_out) and written back as [in, out] by saveCausalLM.
import { LoraError, rangeError } from '../errors';
import { Module } from '../module';
import { Sequential } from '../nn';
import { add, reshape, slice } from '../ops';
import { Tensor, tensor } from '../tensor';
import type { Backbone, Family } from './causal_lm';
import {
  activation, addProjected, attend, child, ConfigReader, ForwardContext, HfEmbedding, HfLayerNorm, linearFrom, plainContext, WeightSource,
} from './common';

interface Gpt2Config {
  vocabSize: number;
  hidden: number;
  layers: number;
  heads: number;
  inner: number;
  positions: number;
  eps: number;
  act: (x: Tensor) => Tensor;
  scaleAttn: boolean;
  scaleByLayer: boolean;
  tie: boolean;
}

function readGpt2(cfg: ConfigReader): Gpt2Config {
  const hidden = cfg.int('n_embd');
  const heads = cfg.int('n_head');
  if (hidden % heads !== 0) throw cfg.fail('n_head', `a divisor of n_embd (${hidden})`, heads);
  if (cfg.bool('add_cross_attention', false))
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Unsupported GPT-2 option add_cross_attention in ${cfg.file} (encoder-decoder use)`);
  return {
    vocabSize: cfg.int('vocab_size'),
    hidden, heads,
    layers: cfg.int('n_layer'),
    inner: cfg.int('n_inner', 4 * hidden),
    positions: cfg.int('n_positions', 1024),
    eps: cfg.num('layer_norm_epsilon', 1e-5, 0),
    act: activation(cfg, 'activation_function', cfg.str('activation_function', 'gelu_new')),
    scaleAttn: cfg.bool('scale_attn_weights', true),
    scaleByLayer: cfg.bool('scale_attn_by_inverse_layer_idx', false),
    tie: cfg.bool('tie_word_embeddings', true),
  };
}

/** c_attn (q, k, v in one Conv1D) and c_proj. */
class Gpt2Attention extends Module {
  constructor(readonly cfg: Gpt2Config, readonly layer: number, w: WeightSource, p: string) {
    super();
    this.registerModule('c_attn', linearFrom(w, `${p}.c_attn`, cfg.hidden, 3 * cfg.hidden, true, true));
    this.registerModule('c_proj', linearFrom(w, `${p}.c_proj`, cfg.hidden, cfg.hidden, true, true));
  }

  run(x: Tensor, ctx: ForwardContext): Tensor {
    const [B, T] = x.shape as [number, number];
    const { hidden: C, heads: H } = this.cfg;
    const D = C / H;
    const qkv = child(this, 'c_attn').forward(x);
    const part = (i: number) => reshape(slice(qkv, -1, i * C, (i + 1) * C), [B, T, H, D]);
    let scale = this.cfg.scaleAttn ? D ** -0.5 : 1;
    if (this.cfg.scaleByLayer) scale /= this.layer + 1;
    return child(this, 'c_proj').forward(attend(part(0), part(1), part(2), ctx, this.layer, scale, null));
  }

  forward(x: Tensor): Tensor {
    return this.run(x, plainContext(x));
  }
}

/** c_fc -> activation -> c_proj. */
class Gpt2MLP extends Module {
  constructor(readonly cfg: Gpt2Config, w: WeightSource, p: string) {
    super();
    this.registerModule('c_fc', linearFrom(w, `${p}.c_fc`, cfg.hidden, cfg.inner, true, true));
    this.registerModule('c_proj', linearFrom(w, `${p}.c_proj`, cfg.inner, cfg.hidden, true, true));
  }

  /** act(c_fc(x)), c_proj's input. */
  inner(x: Tensor): Tensor {
    return this.cfg.act(child(this, 'c_fc').forward(x));
  }

  forward(x: Tensor): Tensor {
    return child(this, 'c_proj').forward(this.inner(x));
  }
}

/** x + attn(ln_1(x)), then + mlp(ln_2(x)). */
class Gpt2Block extends Module {
  constructor(cfg: Gpt2Config, layer: number, w: WeightSource, p: string) {
    super();
    const ln = (name: string) => new HfLayerNorm(w.take(`${p}.${name}.weight`, [cfg.hidden], 'vector'), w.take(`${p}.${name}.bias`, [cfg.hidden], 'vector'), cfg.eps);
    this.registerModule('ln_1', ln('ln_1'));
    this.registerModule('attn', new Gpt2Attention(cfg, layer, w, `${p}.attn`));
    this.registerModule('ln_2', ln('ln_2'));
    this.registerModule('mlp', new Gpt2MLP(cfg, w, `${p}.mlp`));
  }

  run(x: Tensor, ctx: ForwardContext): Tensor {
    const h = add(x, (child(this, 'attn') as Gpt2Attention).run(child(this, 'ln_1').forward(x), ctx));
    const mlp = child(this, 'mlp');
    const n = child(this, 'ln_2').forward(h);
    return mlp instanceof Gpt2MLP ? addProjected(h, child(mlp, 'c_proj'), mlp.inner(n), ctx, true) : add(h, mlp.forward(n));
  }

  forward(x: Tensor): Tensor {
    return this.run(x, plainContext(x));
  }
}

/** wte, wpe, h.0..n-1, ln_f (transformers' GPT2Model). */
class Gpt2Model extends Module implements Backbone {
  readonly cacheShape: { layers: number; kvHeads: number; headDim: number };
  readonly maxPositions: number;

  constructor(readonly cfg: Gpt2Config, w: WeightSource) {
    super();
    this.registerModule('wte', new HfEmbedding(w.take('transformer.wte.weight', [cfg.vocabSize, cfg.hidden], 'table')));
    this.registerModule('wpe', new HfEmbedding(w.take('transformer.wpe.weight', [cfg.positions, cfg.hidden], 'table')));
    const blocks: Module[] = [];
    for (let i = 0; i < cfg.layers; i++) blocks.push(new Gpt2Block(cfg, i, w, `transformer.h.${i}`));
    this.registerModule('h', new Sequential(...blocks));
    this.registerModule('ln_f', new HfLayerNorm(w.take('transformer.ln_f.weight', [cfg.hidden], 'vector'), w.take('transformer.ln_f.bias', [cfg.hidden], 'vector'), cfg.eps));
    this.cacheShape = { layers: cfg.layers, kvHeads: cfg.heads, headDim: cfg.hidden / cfg.heads };
    this.maxPositions = cfg.positions;
  }

  get inputEmbedding(): Tensor {
    return (child(this, 'wte') as HfEmbedding).weight;
  }

  ropeRegime(): string {
    return '';
  }

  hidden(ids: Tensor, ctx: ForwardContext): Tensor {
    for (const p of ctx.positions)
      if (p < 0 || p >= this.cfg.positions)
        throw rangeError('positionIds', `positions between 0 and ${this.cfg.positions - 1} (GPT-2's n_positions learned positions)`, p);
    const pos = ctx.own(tensor(Float32Array.from(ctx.positions), [ctx.B, ctx.T], { dtype: 'int32', device: ctx.device }));
    let x = add(child(this, 'wte').forward(ids), child(this, 'wpe').forward(pos));
    for (const [, block] of (child(this, 'h') as Sequential).namedChildren()) x = ctx.layer(x, (h) => (block as Gpt2Block).run(h, ctx));
    return child(this, 'ln_f').forward(x);
  }

  /** The final hidden states [B, T, n_embd] for ids [B, T] at positions 0..T-1. */
  forward(ids: Tensor): Tensor {
    return this.hidden(ids, plainContext(ids));
  }
}

/** GPT2LMHeadModel. */
export const gpt2Family: Family = {
  architectures: { GPT2LMHeadModel: 'gpt2' },
  prefix: 'transformer',
  // the causal-mask buffers older checkpoints saved (transformers ignores them too)
  ignore: /(^|\.)attn\.(masked_)?bias$/,
  build(cfg, _arch, w) {
    const c = readGpt2(cfg);
    return { backbone: new Gpt2Model(c, w), tie: c.tie, vocabSize: c.vocabSize, hidden: c.hidden };
  },
};
