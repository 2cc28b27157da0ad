// What the adapter exports need of a base model: its config.json (architecture, head counts,
// layer count, tied embeddings) and, per architecture, how a Hugging Face module path is named
// in llama.cpp's GGUF (gguf-py's tensor_mapping.py) and in mlx-lm's model classes. Only the
// architectures lora-native loads; others are refused by name.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, LoraError, typeError } from '../errors';
import { loadPeftAdapter, PeftAdapter, PeftModule } from '../peft';

export interface ArchInfo {
  /** config.json architectures[0]. */
  hfName: string;
  /** general.architecture in GGUF (Mistral is 'llama' there). */
  gguf: string;
  /** model_type in mlx-lm. */
  mlx: string;
  /** llama.cpp stores Llama's q/k rows interleaved per head (convert_hf_to_gguf.py's LlamaModel.permute). */
  permuteQK: boolean;
  /** tie_word_embeddings when config.json does not say (transformers' config class default). */
  tiedByDefault: boolean;
  /** GPT-2's module paths start with 'transformer.'; the others with 'model.'. */
  gpt2: boolean;
}

const ARCHS: ArchInfo[] = [
  { hfName: 'LlamaForCausalLM', gguf: 'llama', mlx: 'llama', permuteQK: true, tiedByDefault: false, gpt2: false },
  { hfName: 'MistralForCausalLM', gguf: 'llama', mlx: 'mistral', permuteQK: true, tiedByDefault: false, gpt2: false },
  { hfName: 'Qwen2ForCausalLM', gguf: 'qwen2', mlx: 'qwen2', permuteQK: false, tiedByDefault: false, gpt2: false },
  { hfName: 'Qwen3ForCausalLM', gguf: 'qwen3', mlx: 'qwen3', permuteQK: false, tiedByDefault: false, gpt2: false },
  { hfName: 'GemmaForCausalLM', gguf: 'gemma', mlx: 'gemma', permuteQK: false, tiedByDefault: true, gpt2: false },
  { hfName: 'Phi3ForCausalLM', gguf: 'phi3', mlx: 'phi3', permuteQK: false, tiedByDefault: false, gpt2: false },
  { hfName: 'GPT2LMHeadModel', gguf: 'gpt2', mlx: 'gpt2', permuteQK: false, tiedByDefault: true, gpt2: true },
];

/** The base model facts an export needs. */
export interface BaseModelInfo {
  arch: ArchInfo;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  tiedEmbeddings: boolean;
  configFile: string;
}

function fmt(file: string, problem: string): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Invalid model config ${file}: ${problem}`);
}

/**
 * Reads a base model folder's config.json.
 * @throws ERR_LORA_IO (no config.json), ERR_LORA_FORMAT (not JSON, a missing or bad field),
 *   ERR_LORA_UNSUPPORTED (an architecture not in the list, which the message gives).
 */
export function readBaseModel(modelDir: string): BaseModelInfo {
  const file = path.join(modelDir, 'config.json');
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not read ${file}: ${(err as Error).message}`);
  }
  let c: Record<string, unknown>;
  try {
    c = JSON.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw fmt(file, `not valid JSON (${(err as Error).message})`);
  }
  if (!c || typeof c !== 'object' || Array.isArray(c)) throw fmt(file, `expected a JSON object but found ${describe(c)}`);
  const archs = c.architectures;
  if (!Array.isArray(archs) || typeof archs[0] !== 'string') throw fmt(file, `"architectures" must be a list naming the model class but is ${describe(archs)}`);
  const arch = ARCHS.find((a) => a.hfName === archs[0]);
  if (!arch) throw new LoraError('ERR_LORA_UNSUPPORTED', `Cannot export adapters for ${archs[0]} (from ${file}); supported: ${ARCHS.map((a) => a.hfName).join(', ')}`);
  const int = (keys: string[], fallback?: number): number => {
    for (const k of keys) {
      const v = c[k];
      if (v === undefined || v === null) continue;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw fmt(file, `"${k}" must be a positive integer but is ${describe(v)}`);
      return v;
    }
    if (fallback !== undefined) return fallback;
    throw fmt(file, `it has no "${keys[0]}"`);
  };
  const numHeads = int(arch.gpt2 ? ['n_head', 'num_attention_heads'] : ['num_attention_heads']);
  const tied = c.tie_word_embeddings;
  if (tied !== undefined && tied !== null && typeof tied !== 'boolean') throw fmt(file, `"tie_word_embeddings" must be a boolean but is ${describe(tied)}`);
  return {
    arch, configFile: file, numHeads,
    numLayers: int(arch.gpt2 ? ['n_layer', 'num_hidden_layers'] : ['num_hidden_layers']),
    numKvHeads: arch.gpt2 ? numHeads : int(['num_key_value_heads'], numHeads),
    tiedEmbeddings: typeof tied === 'boolean' ? tied : arch.tiedByDefault,
  };
}

/** A module path split into its layer index and the path inside the layer (or null for top-level modules). */
export function splitLayer(base: BaseModelInfo, mod: string): { layer: number; inner: string } | null {
  const m = (base.arch.gpt2 ? /^(?:transformer\.)?h\.(\d+)\.(.+)$/ : /^model\.layers\.(\d+)\.(.+)$/).exec(mod);
  return m ? { layer: Number(m[1]), inner: m[2]! } : null;
}

/** The modules of an adapter, checked for what a LoRA file outside PEFT can hold. */
export function exportableModules(adapter: PeftAdapter, base: BaseModelInfo, target: string, allowDora: boolean): [string, PeftModule][] {
  const unsupported = (what: string) => new LoraError('ERR_LORA_UNSUPPORTED', `Cannot export this adapter to ${target}: ${what}`);
  if (adapter.extraTensors.size) throw unsupported(`it holds tensors that are not LoRA weights (${[...adapter.extraTensors.keys()].slice(0, 3).join(', ')}; modules_to_save?); merge it instead (--to merged)`);
  const out: [string, PeftModule][] = [];
  for (const [mod, m] of [...adapter.modules].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    if (m.magnitude && !allowDora) throw unsupported(`'${mod}' is a DoRA module, which ${target} cannot apply; merge it instead (--to merged)`);
    if (m.loraBBias) throw unsupported(`'${mod}' has a lora_B bias (lora_bias), which ${target} cannot apply; merge it instead (--to merged)`);
    if ((mod === 'lm_head' || mod.endsWith('.lm_head')) && base.tiedEmbeddings)
      throw unsupported(`it adapts lm_head, but ${base.arch.hfName} ties lm_head to the token embeddings (tie_word_embeddings), so ${target} has no separate output weight to adapt`);
    out.push([mod, m]);
  }
  if (!out.length) throw unsupported('it has no LoRA modules');
  return out;
}

const GGUF_LAYER: Record<string, string> = {
  'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
  'self_attn.qkv_proj': 'attn_qkv', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
  'mlp.gate_up_proj': 'ffn_up',
};
const GGUF_LAYER_GPT2: Record<string, string> = { 'attn.c_attn': 'attn_qkv', 'attn.c_proj': 'attn_output', 'mlp.c_fc': 'ffn_up', 'mlp.c_proj': 'ffn_down' };

/** The GGUF tensor name (without '.lora_a'/'.lora_b') of a module's weight, or null when llama.cpp has none. */
export function ggufTensorName(base: BaseModelInfo, mod: string): string | null {
  const l = splitLayer(base, mod);
  if (l) {
    const name = (base.arch.gpt2 ? GGUF_LAYER_GPT2 : GGUF_LAYER)[l.inner];
    return name ? `blk.${l.layer}.${name}.weight` : null;
  }
  if (mod === 'lm_head') return 'output.weight';
  if (mod === (base.arch.gpt2 ? 'transformer.wte' : 'model.embed_tokens')) return 'token_embd.weight';
  return null;
}

/** The module path in mlx-lm's model (GPT-2's 'transformer.' becomes 'model.'). */
export function mlxModulePath(base: BaseModelInfo, mod: string): string {
  if (!base.arch.gpt2) return mod;
  if (mod.startsWith('transformer.')) return `model.${mod.slice('transformer.'.length)}`;
  return /^(h\.|wte$|wpe$)/.test(mod) ? `model.${mod}` : mod;
}

/**
 * The arguments every export shares: checks the options (modelDir, out and the extra `known`
 * keys), reads the base model, and runs `fn` with the adapter: loaded from its folder and freed
 * afterwards, or the caller's own PeftAdapter, left alive.
 */
export function withExportInputs<O extends { modelDir: string; out: string }, R>(
  where: string, adapter: string | PeftAdapter, options: O, known: string[], outWhat: string, fn: (o: O, base: BaseModelInfo, a: PeftAdapter) => R,
): R {
  const o = checkOptions<O>(where, options, ['modelDir', 'out', ...known]) as O;
  if (typeof o.modelDir !== 'string' || !o.modelDir) throw typeError('modelDir', 'a model folder path', o.modelDir);
  if (typeof o.out !== 'string' || !o.out) throw typeError('out', outWhat, o.out);
  if (typeof adapter !== 'string' && !(adapter instanceof PeftAdapter)) throw typeError('adapter', 'a PEFT adapter folder or a PeftAdapter', adapter);
  const base = readBaseModel(o.modelDir);
  const owned = typeof adapter === 'string' ? loadPeftAdapter(adapter) : null;
  try {
    return fn(o, base, owned ?? (adapter as PeftAdapter));
  } finally {
    owned?.dispose();
  }
}
