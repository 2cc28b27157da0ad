// Phi3ForCausalLM (Phi-3, Phi-3.5, Phi-4-mini), written from transformers' modeling_phi3.py /
// modular_phi3.py / configuration_phi3.py: Llama's decoder with one fused qkv_proj (q rows, then
// k, then v) and one fused gate_up_proj (gate rows first: up · act(gate)), no biases, rms_norm_eps
// 1e-5, partial rotary (partial_rotary_factor) and LongRoPE scaling (rope_scaling type 'longrope',
// or 'su'/'yarn' as older Phi-3 configs say, which transformers maps to 'longrope'). Residual
// dropout is 0 at inference and not applied.
import { Module } from '../module';
import { reshape, slice } from '../ops';
import { Tensor } from '../tensor';
import type { Family } from './causal_lm';
import { child, gated, linearFrom, WeightSource } from './common';
import { DecoderConfig, LayerParts, LlamaAttention, LlamaModel, readDecoder, ROTARY_BUFFER } from './llama';

/** Attention whose q, k and v come from one qkv_proj. */
class Phi3Attention extends LlamaAttention {
  constructor(cfg: DecoderConfig, layer: number, w: WeightSource, p: string) {
    super(cfg, layer, w, p, true);
    const { hidden, heads, kvHeads, headDim } = cfg;
    this.registerModule('qkv_proj', linearFrom(w, `${p}.qkv_proj`, hidden, (heads + 2 * kvHeads) * headDim, false));
  }

  protected override project(x: Tensor): { q: Tensor; k: Tensor; v: Tensor } {
    const [B, T] = x.shape as [number, number];
    const { heads, kvHeads, headDim } = this.cfg;
    const qkv = child(this, 'qkv_proj').forward(x);
    const q = heads * headDim;
    const kv = kvHeads * headDim;
    return {
      q: reshape(slice(qkv, -1, 0, q), [B, T, heads, headDim]),
      k: reshape(slice(qkv, -1, q, q + kv), [B, T, kvHeads, headDim]),
      v: reshape(slice(qkv, -1, q + kv), [B, T, kvHeads, headDim]),
    };
  }
}

/** down_proj(up · act(gate)) with gate and up from one gate_up_proj. */
class Phi3MLP extends Module {
  constructor(readonly cfg: DecoderConfig, w: WeightSource, p: string) {
    super();
    this.registerModule('gate_up_proj', linearFrom(w, `${p}.gate_up_proj`, cfg.hidden, 2 * cfg.intermediate, false));
    this.registerModule('down_proj', linearFrom(w, `${p}.down_proj`, cfg.intermediate, cfg.hidden, false));
  }

  /** up · act(gate), down_proj's input (the two halves of gate_up_proj's output read in place by the fused kernel). */
  inner(x: Tensor): Tensor {
    return gated(this.cfg.act, child(this, 'gate_up_proj').forward(x), null);
  }

  forward(x: Tensor): Tensor {
    return child(this, 'down_proj').forward(this.inner(x));
  }
}

const phi3Parts: LayerParts = {
  attention: (cfg, layer, w, p) => new Phi3Attention(cfg, layer, w, p),
  mlp: (cfg, w, p) => new Phi3MLP(cfg, w, p),
};

/** Phi3ForCausalLM. */
export const phi3Family: Family = {
  architectures: { Phi3ForCausalLM: 'phi3' },
  prefix: 'model',
  ignore: ROTARY_BUFFER,
  build(cfg, _arch, w) {
    const d = readDecoder(cfg, {
      tie: false, theta: 10000, eps: 1e-5, act: 'silu', maxPositions: 4096,
      rope: { originalMaxPositions: 4096, aliases: { su: 'longrope', yarn: 'longrope' } },
    });
    d.windows.fill(cfg.optInt('sliding_window', null));
    return { backbone: new LlamaModel(d, w, phi3Parts), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
  },
};
