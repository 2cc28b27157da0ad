// Qwen2ForCausalLM, written from transformers' modeling_qwen2.py / configuration_qwen2.py: Llama's
// decoder with biases on q_proj, k_proj and v_proj (not o_proj), and sliding-window attention on
// the layers from max_window_layers on when use_sliding_window is set (or as layer_types says).
import type { Family } from './causal_lm';
import { ConfigReader } from './common';
import { DecoderConfig, LlamaModel, readDecoder, ROTARY_BUFFER } from './llama';

/**
 * Per-layer windows as transformers' Qwen2/Qwen3 configs derive them: layer_types when given, else
 * 'sliding_attention' for layers >= max_window_layers when use_sliding_window is true.
 */
export function qwenWindows(cfg: ConfigReader, d: DecoderConfig): void {
  const window = cfg.bool('use_sliding_window', false) ? cfg.optInt('sliding_window', 4096) : null;
  const types = cfg.get('layer_types');
  if (types !== undefined) {
    if (!Array.isArray(types) || types.length !== d.layers || !types.every((t) => t === 'full_attention' || t === 'sliding_attention'))
      throw cfg.fail('layer_types', `an array of ${d.layers} 'full_attention' or 'sliding_attention'`, types);
    types.forEach((t, i) => { d.windows[i] = t === 'sliding_attention' ? window : null; });
    return;
  }
  const first = cfg.int('max_window_layers', 28, 0);
  for (let i = 0; i < d.layers; i++) d.windows[i] = window !== null && i >= first ? window : null;
}

/** Qwen2ForCausalLM (Qwen2, Qwen2.5). */
export const qwen2Family: Family = {
  architectures: { Qwen2ForCausalLM: 'qwen2' },
  prefix: 'model',
  ignore: ROTARY_BUFFER,
  build(cfg, _arch, w) {
    const d = readDecoder(cfg, { tie: false, theta: 10000, eps: 1e-6, act: 'silu', maxPositions: 32768 });
    d.qkvBias = true;
    qwenWindows(cfg, d);
    return { backbone: new LlamaModel(d, w), tie: d.tie, vocabSize: d.vocabSize, hidden: d.hidden };
  },
};
