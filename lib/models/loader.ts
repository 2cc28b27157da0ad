// loadCausalLM() and saveCausalLM(): Hugging Face model folders (config.json, model.safetensors or
// shards named by model.safetensors.index.json, tokenizer and generation files) to a CausalLM and
// back. Loading checks every weight's name and shape against the architecture before reading any
// data, then streams tensor by tensor into preallocated frozen weights (peak memory about one copy
// of the model). The registry maps config.architectures[0] to a family builder.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, expectOneOf, LoraError, typeError } from '../errors';
import { Linear, loraLayers } from '../nn';
import { MatmulPrecision, permute } from '../ops';
import { expectMatmulPrecision } from '../ops/util';
import { ioChunkBytes, makeFolder, parseJsonBounded } from '../file_io';
import {
  INDEX_FILE, isFloatDtype, ModelIndex, ModelReader, openModelReader, RawTensor, readsInto, SAFETENSORS_DTYPE, SafetensorsEntry, saveSafetensorsAsync, writeFileAtomic,
} from '../safetensors';
import { checkDevice, Device, empty, keep, noGrad, numelOf, releaseCachedMemory, shapeString, Tensor } from '../tensor';
import { CausalLM, CONSTRUCT_CAUSAL_LM, Family, WeightDtype } from './causal_lm';
import { ConfigReader, WeightSource } from './common';
import { gemmaFamily } from './gemma';
import { gpt2Family } from './gpt2';
import { llamaFamily } from './llama';
import { phi3Family } from './phi3';
import { qwen2Family } from './qwen2';
import { qwen3Family } from './qwen3';

const FAMILIES: readonly Family[] = [llamaFamily, qwen2Family, qwen3Family, gemmaFamily, phi3Family, gpt2Family];

/** The config.architectures names loadCausalLM() builds. */
export const SUPPORTED_ARCHITECTURES: readonly string[] = FAMILIES.flatMap((f) => Object.keys(f.architectures));

/** Files of a model folder besides config and weights that saveCausalLM() copies along. */
const COMPANION_FILES = [
  'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model', 'vocab.json', 'merges.txt',
  'added_tokens.json', 'generation_config.json', 'chat_template.jinja', 'chat_template.json',
];

function readJsonFile(file: string, what: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'ENOENT') throw new LoraError('ERR_LORA_FORMAT', `Expected a Hugging Face model folder with ${what} but ${file} does not exist`);
    throw new LoraError('ERR_LORA_IO', `Could not read ${file}: ${(err as Error).message}`);
  }
  // nesting is bounded: a 200,000-deep array parses, but saving the config would overflow the stack
  const v = parseJsonBounded(text, (problem) => new LoraError('ERR_LORA_FORMAT', `Invalid config ${file}: ${problem}`));
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new LoraError('ERR_LORA_FORMAT', `Invalid config ${file}: expected a JSON object but found ${describe(v)}`);
  return v as Record<string, unknown>;
}

/** The family and architecture name of a config (config.architectures[0], else model_type). */
function resolveArchitecture(cfg: ConfigReader): { family: Family; arch: string } {
  const archs = cfg.get('architectures');
  let arch: string;
  if (archs !== undefined) {
    if (!Array.isArray(archs) || typeof archs[0] !== 'string') throw cfg.fail('architectures', 'an array of architecture names', archs);
    arch = archs[0];
  } else {
    const type = cfg.get('model_type');
    if (type === undefined) throw cfg.fail('architectures', `an array naming the architecture (one of ${SUPPORTED_ARCHITECTURES.join(', ')})`, undefined);
    const hit = FAMILIES.flatMap((f) => Object.entries(f.architectures)).find(([, t]) => t === type);
    arch = hit ? hit[0] : `model_type ${JSON.stringify(type)}`;
  }
  const family = FAMILIES.find((f) => Object.prototype.hasOwnProperty.call(f.architectures, arch));
  if (!family)
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Unsupported architecture ${arch} in ${cfg.file}; supported: ${SUPPORTED_ARCHITECTURES.join(', ')}`);
  return { family, arch };
}

const TORCH_DTYPES: Record<string, WeightDtype> = { float32: 'float32', float64: 'float32', bfloat16: 'bfloat16', float16: 'float16' };

/** The checkpoint's dtype: config dtype / torch_dtype, else the stored dtype of its first floating tensor. */
function checkpointDtype(cfg: ConfigReader, index: ModelIndex): WeightDtype {
  const declared = cfg.get('dtype') ?? cfg.get('torch_dtype');
  if (typeof declared === 'string' && TORCH_DTYPES[declared.replace(/^torch\./, '')]) return TORCH_DTYPES[declared.replace(/^torch\./, '')]!;
  const first = index.entries.find((e) => isFloatDtype(e.dtype));
  return first?.dtype === 'BF16' ? 'bfloat16' : first?.dtype === 'F16' ? 'float16' : 'float32';
}

/** x rounded to a dtype (Gemma's sqrt(hidden) normaliser is a tensor of the weights' dtype). */
function roundTo(dtype: WeightDtype): (v: number) => number {
  if (dtype === 'float32') return Math.fround;
  const mantissa = dtype === 'bfloat16' ? 7 : 10;
  return (v) => {
    if (v === 0 || !Number.isFinite(v)) return v;
    const ulp = 2 ** (Math.floor(Math.log2(Math.abs(v))) - mantissa);
    const q = v / ulp;
    const r = Math.round(q);
    return (Math.abs(q - Math.trunc(q)) === 0.5 && r % 2 !== 0 ? r - 1 : r) * ulp; // ties to even
  };
}

interface FillJob {
  entry: SafetensorsEntry;
  target: Tensor;
  transposed: boolean;
}

// The most bytes of fill()'s one staging buffer.
const STAGING_BYTES = 16 * 1024 * 1024;

/**
 * A WeightSource over a checkpoint's headers: take() checks a name and shape and returns an
 * allocated, not yet filled tensor; fill() then streams the data in, tensor by tensor.
 */
class CheckpointWeights implements WeightSource {
  readonly jobs: FillJob[] = [];
  private readonly byName: Map<string, SafetensorsEntry>;
  private readonly bare: boolean;

  constructor(private readonly index: ModelReader, private readonly prefix: string, private readonly dtype: WeightDtype,
    private readonly device: Device, private readonly arch: string) {
    this.byName = new Map(index.entries.map((e) => [e.name, e]));
    // checkpoints saved from the bare model (GPT-2's on the Hub) lack the prefix: transformers adds it
    this.bare = !index.entries.some((e) => e.name.startsWith(`${prefix}.`));
  }

  /** The entry holding a model name. */
  resolve(name: string): SafetensorsEntry | undefined {
    const bareName = this.bare && name.startsWith(`${this.prefix}.`) ? name.slice(this.prefix.length + 1) : name;
    return this.byName.get(bareName);
  }

  take(name: string, shape: number[], kind: 'matrix' | 'vector' | 'table', transposed = false): Tensor {
    const e = this.resolve(name);
    const fileShape = transposed ? [shape[1]!, shape[0]!] : shape;
    if (!e)
      throw new LoraError('ERR_LORA_FORMAT', `Missing weight '${name}' in ${this.index.source}: ${this.arch} with this config.json expects a tensor of shape ${shapeString(fileShape)}`);
    if (e.shape.length !== fileShape.length || e.shape.some((d, i) => d !== fileShape[i]))
      throw new LoraError('ERR_LORA_FORMAT', `Weight '${e.name}' in ${e.file} has shape ${shapeString(e.shape)} but ${this.arch} with this config.json expects ${shapeString(fileShape)}`);
    if (!isFloatDtype(e.dtype))
      throw new LoraError('ERR_LORA_FORMAT', `Weight '${e.name}' in ${e.file} holds ${e.dtype} values but a floating-point tensor was expected`);
    const target = keep(empty(shape, this.device, kind === 'vector' ? 'float32' : this.dtype));
    this.jobs.push({ entry: e, target, transposed });
    return target;
  }

  /** Names the checkpoint holds that nothing took (and that transformers would not ignore either). */
  unexpected(ignore: (name: string) => boolean): SafetensorsEntry[] {
    const taken = new Set(this.jobs.map((j) => j.entry));
    return this.index.entries.filter((e) => !taken.has(e) && !ignore(e.name));
  }

  /** Reads every taken tensor into its target, yielding to the event loop between tensors. */
  async fill(): Promise<void> {
    // One staging buffer for every tensor: a new one per tensor had its pages first touched each
    // time (as many bytes as the checkpoint). With the direct reads below, a SmolLM2-135M-shaped
    // float32 checkpoint loads in 0.92-1.09 s against 1.67-1.74 (float32 weights) and 0.76-0.80 s
    // against 1.33-1.39 (bfloat16 weights), alternating old and new processes.
    const most = Math.max(8, ...this.jobs.map((j) => j.entry.byteLength));
    const staging = new Uint8Array(Math.min(ioChunkBytes(), STAGING_BYTES, most));
    for (const job of this.jobs) {
      if (!job.transposed && job.target.device === 'cpu' && readsInto(job.entry, job.target.dtype)) {
        // stored as the target keeps it: read straight into it (no second copy of the weight)
        this.index.readTensorInto(job.entry, job.target, staging);
        await new Promise<void>((resolve) => setImmediate(resolve));
        continue;
      }
      // read through the reader's open handle (a file changed meanwhile is refused) and decoded as
      // stored; assign() converts to the target's dtype in native code (one pass)
      const decoded = this.index.readTensor(job.entry, 'keep', staging);
      const temps = [decoded];
      try {
        let src = decoded;
        const needWide = job.transposed || (src.dtype !== job.target.dtype && src.dtype !== 'float32' && job.target.dtype !== 'float32');
        if (needWide && src.dtype !== 'float32') temps.push(src = src.toDtype('float32'));
        if (job.transposed) temps.push(src = noGrad(() => permute(src, [1, 0])));
        if (src.device !== job.target.device) temps.push(src = src.to(job.target.device));
        job.target.assign(src);
      } finally {
        for (const t of temps) t.dispose();
      }
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  }

  dispose(): void {
    for (const j of this.jobs) j.target.dispose();
  }
}

/** Options of loadCausalLM(). */
export interface LoadCausalLMOptions {
  /**
   * How frozen projection weights and embedding tables are stored: default the checkpoint's
   * torch_dtype (a tied head shares the one table). Norms and biases stay float32; activations and
   * sums are float32 either way.
   */
  dtype?: WeightDtype;
  /** 'cpu' (default) or 'cuda'. */
  device?: Device;
  /**
   * Products with bfloat16 weights: 'fp32' (default, the float32 activations multiplied as they
   * are) or 'bf16' (activations rounded to bf16 for a bf16 dot product with fp32 accumulation on
   * avx512_bf16 CPUs, as PyTorch's bf16 matmuls do: about twice the prefill speed). Sets the
   * model's `matmulPrecision`; see MatmulPrecision. No effect with float32 weights.
   */
  matmulPrecision?: MatmulPrecision;
}

/**
 * Loads a Hugging Face causal LM folder: config.json plus model.safetensors, or the shards named by
 * model.safetensors.index.json. Supported: LlamaForCausalLM (rope_scaling llama3, linear, dynamic),
 * MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Phi3ForCausalLM
 * (longrope), GPT2LMHeadModel.
 *
 * @example
 * const model = await loadCausalLM('./SmolLM2-135M', { dtype: 'bfloat16' });
 * applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 8 });
 * const fast = await loadCausalLM('./SmolLM2-135M', { dtype: 'bfloat16', matmulPrecision: 'bf16' });
 * @throws ERR_LORA_UNSUPPORTED for another architecture (naming the supported ones);
 *   ERR_LORA_FORMAT naming the file, the key and expected vs found for a config that is not JSON
 *   or lacks a field, a missing, unexpected or mis-shaped weight, a truncated shard;
 *   ERR_LORA_IO when a file cannot be read; ERR_LORA_RANGE for a matmulPrecision other than 'fp32'
 *   or 'bf16' (did-you-mean).
 */
export async function loadCausalLM(dir: string, options?: LoadCausalLMOptions): Promise<CausalLM> {
  if (typeof dir !== 'string' || dir === '') throw typeError('dir', 'a model folder path', dir);
  const o = checkOptions<LoadCausalLMOptions>('loadCausalLM()', options, ['dtype', 'device', 'matmulPrecision']);
  const device = o.device === undefined ? 'cpu' : checkDevice('device', o.device);
  if (o.dtype !== undefined) expectOneOf('dtype', o.dtype, ['float32', 'bfloat16', 'float16'] as const);
  const precision = expectMatmulPrecision('matmulPrecision', o.matmulPrecision);
  const configFile = path.join(dir, 'config.json');
  const raw = readJsonFile(configFile, 'config.json');
  const cfg = new ConfigReader(raw, configFile);
  const { family, arch } = resolveArchitecture(cfg);
  if (!fs.readdirSync(dir).some((f) => f.endsWith('.safetensors') || f === INDEX_FILE) && fs.existsSync(path.join(dir, 'pytorch_model.bin')))
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Found only pytorch_model.bin in ${dir}: lora-native reads safetensors (convert with transformers: model.save_pretrained(dir, safe_serialization=True))`);
  // every weight file stays open through one handle from its header to its last tensor
  const index = openModelReader(dir);
  let weights: CheckpointWeights | null = null;
  let model: CausalLM | null = null;
  try {
    const dtype = o.dtype ?? checkpointDtype(cfg, index);
    weights = new CheckpointWeights(index, family.prefix, dtype, device, arch);
    const { backbone, tie, vocabSize, hidden } = family.build(cfg, arch, weights, roundTo(dtype));
    const head = new Linear(hidden, vocabSize, {
      weight: tie ? backbone.inputEmbedding : weights.take('lm_head.weight', [vocabSize, hidden], 'matrix'), biasTensor: null,
    });
    const ignore = (n: string) => !!family.ignore?.test(n) || (tie && n === 'lm_head.weight');
    const extra = weights.unexpected(ignore);
    if (extra.length)
      throw new LoraError('ERR_LORA_FORMAT', `Unexpected weight${extra.length > 1 ? 's' : ''} ${extra.slice(0, 5).map((e) => `'${e.name}' (in ${e.file})`).join(', ')}${extra.length > 5 ? ` and ${extra.length - 5} more` : ''}: ${arch} with this config.json has no such parameter`);
    await weights.fill();
    releaseCachedMemory(); // the decoding temporaries: give their memory back rather than keep it for reuse
    const genFile = path.join(dir, 'generation_config.json');
    const generationConfig = fs.existsSync(genFile) ? readJsonFile(genFile, 'generation_config.json') : null;
    model = new CausalLM(CONSTRUCT_CAUSAL_LM, { config: raw, architecture: arch, dtype, generationConfig, sourceDir: path.resolve(dir), prefix: family.prefix, backbone, head, tied: tie });
    model.matmulPrecision = precision;
    return model;
  } finally {
    index.close();
    if (!model) weights?.dispose();
  }
}

/** Options of saveCausalLM(). */
export interface SaveCausalLMOptions {
  /** Largest shard: bytes, or '5GB' / '500MB' / '2GiB' as transformers writes it (default '5GB'). */
  maxShardSize?: number | string;
}

function shardBytes(v: unknown): number {
  if (typeof v === 'number' && Number.isInteger(v) && v > 0) return v;
  const m = typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$/i.exec(v) : null;
  if (!m) throw typeError('maxShardSize', "a positive number of bytes or a size such as '5GB'", v);
  const unit = m[2]!.toUpperCase();
  const scale = unit.endsWith('IB') ? 2 ** (10 * ['KIB', 'MIB', 'GIB', 'TIB'].indexOf(unit) + 10) : 10 ** (3 * ['B', 'KB', 'MB', 'GB', 'TB'].indexOf(unit));
  return Math.max(1, Math.floor(Number(m[1]) * scale));
}

/**
 * Writes a model as a Hugging Face folder other tools load: config.json (torch_dtype set to the
 * saved dtype), the weights in the model's dtype as model.safetensors or shards with
 * model.safetensors.index.json (files of an earlier save that no longer belong are removed), and
 * the tokenizer and generation files of the folder it was loaded from. After merging an adapter
 * into the weights it is the merged model.
 *
 * @example await saveCausalLM(model, 'out/merged', { maxShardSize: '2GB' });
 * @throws ERR_LORA_STATE when the model still has LoRA layers (merge them first, or save the
 *   adapter with saveLoraAdapter); ERR_LORA_IO when a file cannot be written.
 */
export async function saveCausalLM(model: CausalLM, dir: string, options?: SaveCausalLMOptions): Promise<void> {
  if (!(model instanceof CausalLM)) throw typeError('model', 'a CausalLM from loadCausalLM()', model);
  if (typeof dir !== 'string' || dir === '') throw typeError('dir', 'a folder path', dir);
  const o = checkOptions<SaveCausalLMOptions>('saveCausalLM()', options, ['maxShardSize']);
  const maxShard = shardBytes(o.maxShardSize ?? '5GB');
  const lora = [...loraLayers(model).keys()];
  if (lora.length)
    throw new LoraError('ERR_LORA_STATE', `Expected a model without LoRA layers for saveCausalLM() but ${lora.length} remain (${lora.slice(0, 3).join(', ')}); merge them into the weights first, or save the adapter with saveLoraAdapter()`);
  const transposed = new Set(model.namedModules().filter(([, m]) => m instanceof Linear && m.fanInFanOut).map(([p]) => `${p}.weight`));
  const dtype = model.dtype;
  const stDtype = SAFETENSORS_DTYPE[dtype];
  const items: [string, RawTensor][] = [];
  for (const [name, t] of model.namedParameters()) {
    if (name === 'lm_head.weight' && model.tied) continue; // the tied head is the embedding table
    const shape = transposed.has(name) ? [t.shape[1]!, t.shape[0]!] : t.shape.slice();
    items.push([name, {
      dtype: stDtype, shape, data: () => noGrad(() => {
        const src = transposed.has(name) ? permute(t.dtype === 'float32' ? t : t.toDtype('float32'), [1, 0]) : t;
        const out = src.dtype === dtype ? (src === t ? src.detach() : src) : src.toDtype(dtype);
        if (src !== t && src !== out) src.dispose();
        return out;
      }),
    }]);
  }
  const shards: [string, RawTensor][][] = [[]];
  let size = 0;
  for (const item of items) {
    const bytes = numelOf(item[1].shape) * (dtype === 'float32' ? 4 : 2);
    if (size > 0 && size + bytes > maxShard) {
      shards.push([]);
      size = 0;
    }
    shards[shards.length - 1]!.push(item);
    size += bytes;
  }
  makeFolder(dir);
  const names = shards.length === 1 ? ['model.safetensors']
    : shards.map((_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`);
  for (let i = 0; i < shards.length; i++)
    await saveSafetensorsAsync(path.join(dir, names[i]!), new Map(shards[i]), { metadata: { format: 'pt' } });
  const written = new Set(names);
  if (shards.length > 1) {
    const weightMap: Record<string, string> = {};
    shards.forEach((s, i) => { for (const [n] of s) weightMap[n] = names[i]!; });
    const totalSize = items.reduce((a, [, r]) => a + numelOf(r.shape) * (dtype === 'float32' ? 4 : 2), 0);
    const sorted = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]!]));
    writeFileAtomic(path.join(dir, INDEX_FILE), JSON.stringify({ metadata: { total_size: totalSize }, weight_map: sorted }, null, 2) + '\n');
    written.add(INDEX_FILE);
  }
  for (const f of fs.readdirSync(dir))
    if (!written.has(f) && (f === INDEX_FILE || f === 'model.safetensors' || /^model-\d{5}-of-\d{5}\.safetensors$/.test(f))) fs.unlinkSync(path.join(dir, f));
  const config: Record<string, unknown> = { ...model.config, torch_dtype: dtype };
  if ('dtype' in model.config) config.dtype = dtype;
  writeFileAtomic(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  const src = model.sourceDir;
  if (src && path.resolve(dir) !== src)
    for (const f of COMPANION_FILES) if (fs.existsSync(path.join(src, f))) fs.copyFileSync(path.join(src, f), path.join(dir, f));
}
