// Qwen3ForCausalLM, written from transformers' modeling_qwen3.py / configuration_qwen3.py: Qwen2's
// decoder with an explicit head_dim (default 128), attention_bias on all four projections (default
// false) and an RMSNorm over each head of q and k (q_norm, k_norm) before RoPE.
import type { Family } from './causal_lm';
import { LlamaModel, readDecoder, ROTARY_BUFFER } from './llama';
import { qwenWindows } from './qwen2';

/** Qwen3ForCausalLM. */
export const qwen3Family: Family = {
  architectures: { Qwen3ForCausalLM: 'qwen3' },
  prefix: 'model',
  ignore: ROTARY_BUFFER,
  build(cfg, _arch, w) {
    const d = readDecoder(cfg, { headDim: 128, tie: false, theta: 10000, eps: 1e-6, act: 'silu', maxPositions: 32768 });
    d.qkvBias = d.oBias = cfg.bool('attention_bias', false);
    d.qkNorm = true;
    qwenWindows(cfg, d);
    return { backbone: new LlamaModel(d, w), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
  },
};
