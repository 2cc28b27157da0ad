// The model benchmarks' shared pieces: the model shapes (the same as bench/torch_llm.py's CONFIGS),
// a random Hugging Face Llama folder of one shape (config.json + model.safetensors in bf16, values
// ~N(0, 0.02) as torch_llm.py draws them, norms 1), and the work each case does: FLOPs of
// prefill and of a LoRA training step, weight bytes a decode step reads. Numbers only, not a test.
import * as fs from 'fs';
import * as path from 'path';
import { saveSafetensors } from '../lib/safetensors';

export interface LlmConfig {
  hidden: number; inter: number; layers: number; heads: number; kv: number; vocab: number; tied: boolean; theta: number; eps: number;
}
export const LLM_CONFIGS: Record<string, LlmConfig> = {
  tiny: { hidden: 64, inter: 128, layers: 2, heads: 4, kv: 2, vocab: 256, tied: true, theta: 10000, eps: 1e-5 },
  // SmolLM2-135M's shape
  smol: { hidden: 576, inter: 1536, layers: 30, heads: 9, kv: 3, vocab: 49152, tied: true, theta: 100000, eps: 1e-5 },
  // Llama-3.2-1B's shape (head_dim 64, tied)
  '1b': { hidden: 2048, inter: 8192, layers: 16, heads: 32, kv: 8, vocab: 128256, tied: true, theta: 500000, eps: 1e-5 },
};

export const headDim = (c: LlmConfig) => c.hidden / c.heads;

/** [in, out] of every projection of one decoder layer (q, k, v, o, gate, up, down). */
export function layerLinears(c: LlmConfig): [number, number][] {
  const D = headDim(c);
  return [[c.hidden, c.heads * D], [c.hidden, c.kv * D], [c.hidden, c.kv * D], [c.heads * D, c.hidden],
    [c.hidden, c.inter], [c.hidden, c.inter], [c.inter, c.hidden]];
}

/** Weights of the projections of every layer, and of the head (V x hidden). */
export function linearParams(c: LlmConfig): { body: number; head: number } {
  return { body: c.layers * layerLinears(c).reduce((s, [i, o]) => s + i * o, 0), head: c.vocab * c.hidden };
}

/** Multiply-adds x 2 of causal attention (QKᵀ and PV) over B sequences of T tokens, forward. */
function attentionFlops(c: LlmConfig, B: number, T: number): number {
  return c.layers * B * 4 * c.heads * headDim(c) * (T * (T + 1)) / 2;
}

/** Prefill of T tokens, logits of the last position only: 2·body·T + attention + 2·V·hidden. */
export function prefillFlops(c: LlmConfig, T: number): number {
  const p = linearParams(c);
  return 2 * p.body * T + attentionFlops(c, 1, T) + 2 * p.head;
}

/**
 * A LoRA training step over B·T tokens without recomputation: forward and dx through every
 * projection and the head (4·(body + head) per token; frozen weights get no dW), attention forward
 * (QKᵀ, PV) and backward (twice the forward: dP, dV, dQ, dK), and LoRA on every projection
 * (6·r·(in + out) per token: forward 2, dB and dh 2, dA and dx 2). The optimizer, norms and the
 * loss are left out (a few percent).
 */
export function trainFlops(c: LlmConfig, B: number, T: number, r: number): number {
  const p = linearParams(c);
  const lora = c.layers * layerLinears(c).reduce((s, [i, o]) => s + 6 * r * (i + o), 0);
  return B * T * (4 * (p.body + p.head) + lora) + 3 * attentionFlops(c, B, T);
}

/** Bytes of weights one decode step reads: every projection and the head at `bytesPerWeight`. */
export function decodeBytes(c: LlmConfig, bytesPerWeight: number): number {
  const p = linearParams(c);
  return (p.body + p.head) * bytesPerWeight;
}

// xorshift32 normals (sum of four uniforms, scaled): cheap, deterministic, the right spread
function normalBf16(n: number, std: number, seed: number): Uint16Array {
  const out = new Uint16Array(n);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  let x = seed >>> 0 || 1;
  const k = std * Math.sqrt(3) / 2 / 2147483648;
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let j = 0; j < 4; j++) {
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
      s += x | 0;
    }
    f[0] = s * k;
    out[i] = (u[0]! + 0x7fff + ((u[0]! >>> 16) & 1)) >>> 16;
  }
  return out;
}

/**
 * Writes a random Llama of shape `c` as a Hugging Face folder (config.json with the fields
 * transformers writes, model.safetensors in BF16) and returns its path. Tensors are generated as
 * the writer reaches them, so memory holds one at a time.
 */
export function writeLlamaFolder(dir: string, c: LlmConfig): string {
  fs.mkdirSync(dir, { recursive: true });
  const D = headDim(c);
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({
    architectures: ['LlamaForCausalLM'], model_type: 'llama', attention_bias: false, attention_dropout: 0, bos_token_id: 1, eos_token_id: 2,
    head_dim: D, hidden_act: 'silu', hidden_size: c.hidden, initializer_range: 0.02, intermediate_size: c.inter,
    max_position_embeddings: 8192, mlp_bias: false, num_attention_heads: c.heads, num_hidden_layers: c.layers,
    num_key_value_heads: c.kv, rms_norm_eps: c.eps, rope_scaling: null, rope_theta: c.theta, tie_word_embeddings: c.tied,
    torch_dtype: 'bfloat16', use_cache: true, vocab_size: c.vocab,
  }, null, 2));
  let seed = 1;
  const tensors = new Map<string, { dtype: 'BF16'; shape: number[]; data: () => Uint8Array }>();
  const add = (name: string, shape: number[], norm = false) => {
    const s = seed++;
    const n = shape.reduce((a, b) => a * b, 1);
    tensors.set(name, { dtype: 'BF16', shape, data: () => new Uint8Array((norm ? new Uint16Array(n).fill(0x3f80) : normalBf16(n, 0.02, s * 2654435761)).buffer) });
  };
  add('model.embed_tokens.weight', [c.vocab, c.hidden]);
  const names = ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'];
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}`;
    add(`${p}.input_layernorm.weight`, [c.hidden], true);
    layerLinears(c).forEach(([i, o], k) => add(`${p}.${names[k]}.weight`, [o, i]));
    add(`${p}.post_attention_layernorm.weight`, [c.hidden], true);
  }
  add('model.norm.weight', [c.hidden], true);
  if (!c.tied) add('lm_head.weight', [c.vocab, c.hidden]);
  saveSafetensors(path.join(dir, 'model.safetensors'), tensors, { metadata: { format: 'pt' } });
  return dir;
}
