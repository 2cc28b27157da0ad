// GemmaForCausalLM (Gemma 1), written from transformers' modeling_gemma.py / configuration_gemma.py:
// Llama's decoder with RMSNorms that scale by (1 + w), embeddings multiplied by sqrt(hidden_size)
// rounded to the weights' dtype, head_dim 256 by default, tied embeddings by default, and the tanh
// GELU (hidden_activation, default gelu_pytorch_tanh; the legacy hidden_act is not used, as
// transformers documents: "overwritten by hidden_activation"). Gemma 2/3 are other architectures.
import type { Family } from './causal_lm';
import { activation } from './common';
import { LlamaModel, readDecoder, ROTARY_BUFFER } from './llama';

/** GemmaForCausalLM. */
export const gemmaFamily: Family = {
  architectures: { GemmaForCausalLM: 'gemma' },
  prefix: 'model',
  ignore: ROTARY_BUFFER,
  build(cfg, _arch, w, dtypeRound) {
    const d = readDecoder(cfg, { headDim: 256, tie: true, theta: 10000, eps: 1e-6, act: 'gelu_pytorch_tanh', maxPositions: 8192 });
    d.act = activation(cfg, 'hidden_activation', cfg.str('hidden_activation', 'gelu_pytorch_tanh'));
    d.qkvBias = d.oBias = cfg.bool('attention_bias', false);
    d.normOffset = 1;
    d.embedScale = true;
    return { backbone: new LlamaModel(d, w, undefined, dtypeRound), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
  },
};
