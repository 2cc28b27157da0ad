// Hugging Face PEFT's LoRA adapter format: adapter_config.json plus adapter_model.safetensors with
// PEFT's key names, read and written exactly (unknown config fields and unrecognised tensors are
// kept verbatim). Also PEFT's rules for per-module rank/alpha (rank_pattern, alpha_pattern) and for
// which modules an adapter targets. It does not read pickled adapter_model.bin files.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { describe, LoraError, typeError } from './errors';
import { loadSafetensors, saveSafetensors, writeFileAtomic } from './safetensors';
import { shapeString, Tensor } from './tensor';

/** adapter_config.json. Known fields are typed; every other field is kept as loaded. */
export interface PeftConfig {
  peft_type?: string;
  r?: number;
  lora_alpha?: number;
  target_modules?: string[] | string | null;
  exclude_modules?: string[] | string | null;
  use_rslora?: boolean;
  use_dora?: boolean;
  fan_in_fan_out?: boolean;
  bias?: 'none' | 'all' | 'lora_only';
  lora_bias?: boolean;
  rank_pattern?: Record<string, number>;
  alpha_pattern?: Record<string, number>;
  layers_to_transform?: number[] | number | null;
  layers_pattern?: string[] | string | null;
  modules_to_save?: string[] | null;
  lora_dropout?: number;
  init_lora_weights?: boolean | string;
  base_model_name_or_path?: string | null;
  task_type?: string | null;
  [field: string]: unknown;
}

/** One adapted module's tensors. Shapes follow PEFT: A (R, C), B (OC, R). */
export interface PeftModule {
  /** 'linear' (lora_A/lora_B) or 'embedding' (lora_embedding_A/B). */
  kind: 'linear' | 'embedding';
  /** lora_A.weight (R, in) or lora_embedding_A (R, numEmbeddings). */
  loraA: Tensor;
  /** lora_B.weight (out, R) or lora_embedding_B (dim, R). */
  loraB: Tensor;
  /** lora_B.bias (out) with lora_bias, else null. */
  loraBBias: Tensor | null;
  /** DoRA's lora_magnitude_vector (out), else null. */
  magnitude: Tensor | null;
  /** R, from the tensors. */
  rank: number;
  /** alpha for this module (alpha_pattern or lora_alpha). */
  alpha: number;
  /** alpha/R, or alpha/sqrt(R) with use_rslora. */
  scaling: number;
}

/**
 * The fields of PEFT's LoraConfig (and its PeftConfig base), for checking a config given in code:
 * a name outside this list is a typo. Files may hold others; they are kept as loaded.
 */
export const PEFT_CONFIG_FIELDS: readonly string[] = [
  'peft_type', 'task_type', 'base_model_name_or_path', 'revision', 'inference_mode', 'auto_mapping', 'peft_version',
  'r', 'lora_alpha', 'lora_dropout', 'target_modules', 'exclude_modules', 'fan_in_fan_out', 'bias', 'lora_bias', 'use_rslora',
  'use_dora', 'modules_to_save', 'init_lora_weights', 'layers_to_transform', 'layers_pattern', 'rank_pattern', 'alpha_pattern',
  'megatron_config', 'megatron_core', 'trainable_token_indices', 'loftq_config', 'eva_config', 'corda_config', 'use_qalora',
  'qalora_group_size', 'layer_replication', 'runtime_config', 'target_parameters', 'arrow_config', 'ensure_weight_tying',
  'alora_invocation_tokens',
];

/**
 * camelCase names accepted for PEFT's fields in code (`targetModules` for `target_modules`), plus
 * lora-native's own `rank`, `alpha` and `dropout` for `r`, `lora_alpha` and `lora_dropout`.
 */
export const PEFT_CAMEL_ALIASES: Readonly<Record<string, string>> = Object.fromEntries([
  ...PEFT_CONFIG_FIELDS.filter((f) => f.includes('_')).map((f) => [f.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase()), f]),
  ['rank', 'r'], ['alpha', 'lora_alpha'], ['dropout', 'lora_dropout'],
]);

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';
const PREFIX = 'base_model.model.';

/**
 * The key of a rank_pattern/alpha_pattern that applies to a module, by PEFT's rule: the first key
 * (in the pattern's order) that, read as a regular expression, matches the end of the module
 * path at a '.' boundary (or the whole path). undefined when none does.
 * @example matchPatternKey(['q_proj'], 'model.layers.0.self_attn.q_proj') // 'q_proj'
 */
export function matchPatternKey(keys: readonly string[], moduleName: string): string | undefined {
  if (!Array.isArray(keys) || !keys.every((k) => typeof k === 'string')) throw typeError('keys', 'an array of strings', keys);
  if (typeof moduleName !== 'string') throw typeError('moduleName', 'a string', moduleName);
  for (const key of keys) {
    let re: RegExp;
    try {
      re = new RegExp(`^(?:.*\\.)?(?:${key})$`);
    } catch {
      if (moduleName === key || moduleName.endsWith(`.${key}`)) return key;
      continue;
    }
    if (re.test(moduleName)) return key;
  }
  return undefined;
}

/** Rank, alpha and scaling PEFT gives a module under a config. */
export function moduleScaling(config: PeftConfig, moduleName: string): { rank: number; alpha: number; scaling: number } {
  if (!config || typeof config !== 'object') throw typeError('config', 'a PEFT config object', config);
  const rp = config.rank_pattern ?? {};
  const ap = config.alpha_pattern ?? {};
  const rk = matchPatternKey(Object.keys(rp), moduleName);
  const ak = matchPatternKey(Object.keys(ap), moduleName);
  const rank = rk !== undefined ? rp[rk]! : config.r ?? 8;
  const alpha = ak !== undefined ? ap[ak]! : config.lora_alpha ?? 8;
  const scaling = config.use_rslora ? alpha / Math.sqrt(rank) : alpha / rank;
  return { rank, alpha, scaling };
}

function layerIndex(name: string, patterns: string[] | string | null | undefined): number | undefined {
  const pats = patterns == null ? ['layers', 'h', 'blocks', 'layer'] : Array.isArray(patterns) ? patterns : [patterns];
  for (const p of pats) {
    const m = new RegExp(`(?:^|\\.)(?:${p})\\.(\\d+)\\.`).exec(name);
    if (m) return Number(m[1]);
  }
  return undefined;
}

/**
 * Whether a config targets a module by PEFT's rules: target_modules as a list (the name or its
 * last components at a '.' boundary) or a regular expression matching the whole name, minus
 * exclude_modules, limited to layers_to_transform.
 */
export function targetsModule(config: PeftConfig, moduleName: string): boolean {
  if (!config || typeof config !== 'object') throw typeError('config', 'a PEFT config object', config);
  if (typeof moduleName !== 'string') throw typeError('moduleName', 'a string', moduleName);
  const matches = (spec: string[] | string | null | undefined): boolean => {
    if (spec == null) return false;
    if (typeof spec === 'string') {
      if (spec === 'all-linear') return true;
      return new RegExp(`^(?:${spec})$`).test(moduleName);
    }
    return spec.some((k) => moduleName === k || moduleName.endsWith(`.${k}`));
  };
  if (!matches(config.target_modules)) return false;
  if (matches(config.exclude_modules)) return false;
  const ltt = config.layers_to_transform;
  if (ltt != null && typeof config.target_modules !== 'string') {
    const idx = layerIndex(moduleName, config.layers_pattern);
    const wanted = Array.isArray(ltt) ? ltt : [ltt];
    if (idx === undefined || !wanted.includes(idx)) return false;
  }
  return true;
}

/**
 * A PEFT LoRA adapter in memory: its config, its modules (by module path, without PEFT's
 * 'base_model.model.' prefix), and any other tensors of the file (modules_to_save, ...) verbatim.
 * Owns its tensors: dispose() frees them.
 */
export class PeftAdapter {
  config: PeftConfig;
  readonly modules: Map<string, PeftModule>;
  /** Tensors of the file that are not LoRA weights, by their full key. */
  readonly extraTensors: Map<string, Tensor>;
  /** The safetensors __metadata__ (PEFT writes { format: 'pt' }). */
  metadata: Record<string, string>;
  /** Whether the magnitude key had a '.weight' suffix on disk (older PEFT); kept for round-trips. */
  magnitudeSuffix = '';

  constructor(config: PeftConfig, modules = new Map<string, PeftModule>(), extraTensors = new Map<string, Tensor>(), metadata: Record<string, string> = { format: 'pt' }) {
    this.config = config;
    this.modules = modules;
    this.extraTensors = extraTensors;
    this.metadata = metadata;
  }

  /** Trainable parameter count of the LoRA weights (A, B, bias, magnitude). */
  get numParameters(): number {
    let n = 0;
    for (const m of this.modules.values()) n += m.loraA.size + m.loraB.size + (m.loraBBias?.size ?? 0) + (m.magnitude?.size ?? 0);
    return n;
  }

  /** Frees every tensor. */
  dispose(): void {
    for (const m of this.modules.values()) {
      m.loraA.dispose();
      m.loraB.dispose();
      m.loraBBias?.dispose();
      m.magnitude?.dispose();
    }
    for (const t of this.extraTensors.values()) t.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

function fmt(where: string, problem: string): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Invalid PEFT adapter ${where}: ${problem}`);
}

function checkConfig(file: string, raw: unknown): PeftConfig {
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw fmt(file, `expected a JSON object but found ${describe(raw)}`);
  const c = raw as PeftConfig;
  if (c.peft_type !== undefined && c.peft_type !== 'LORA')
    throw new LoraError('ERR_LORA_UNSUPPORTED', `Adapter ${file} has peft_type ${JSON.stringify(c.peft_type)}; lora-native reads LORA adapters only`);
  const posInt = (k: string, v: unknown) => {
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1) throw fmt(file, `${k} must be a positive integer but is ${describe(v)}`);
  };
  const num = (k: string, v: unknown) => {
    if (typeof v !== 'number' || !Number.isFinite(v)) throw fmt(file, `${k} must be a finite number but is ${describe(v)}`);
  };
  if (c.r !== undefined) posInt('r', c.r);
  if (c.lora_alpha !== undefined) num('lora_alpha', c.lora_alpha);
  for (const k of ['use_rslora', 'use_dora', 'fan_in_fan_out', 'lora_bias'] as const)
    if (c[k] !== undefined && c[k] !== null && typeof c[k] !== 'boolean') throw fmt(file, `${k} must be a boolean but is ${describe(c[k])}`);
  for (const k of ['rank_pattern', 'alpha_pattern'] as const) {
    const p = c[k];
    if (p === undefined || p === null) continue;
    if (typeof p !== 'object' || Array.isArray(p)) throw fmt(file, `${k} must be an object but is ${describe(p)}`);
    for (const [key, v] of Object.entries(p)) (k === 'rank_pattern' ? posInt : num)(`${k}['${key}']`, v);
  }
  const tm = c.target_modules;
  if (tm !== undefined && tm !== null && typeof tm !== 'string' && !(Array.isArray(tm) && tm.every((x) => typeof x === 'string')))
    throw fmt(file, `target_modules must be a list of names or a regex string but is ${describe(tm)}`);
  if (typeof tm === 'string') {
    try { new RegExp(tm); } catch { throw fmt(file, `target_modules ${JSON.stringify(tm)} is not a valid regular expression`); }
  }
  return c;
}

const SUFFIXES: [string, keyof Pick<PeftModule, 'loraA' | 'loraB' | 'loraBBias' | 'magnitude'>, PeftModule['kind'] | null][] = [
  ['.lora_A.weight', 'loraA', 'linear'],
  ['.lora_B.weight', 'loraB', 'linear'],
  ['.lora_B.bias', 'loraBBias', 'linear'],
  ['.lora_embedding_A', 'loraA', 'embedding'],
  ['.lora_embedding_B', 'loraB', 'embedding'],
  ['.lora_magnitude_vector.weight', 'magnitude', null],
  ['.lora_magnitude_vector', 'magnitude', null],
];

/**
 * Builds the modules of an adapter from a flat map of PEFT keys. Tensors it does not recognise go
 * to extraTensors. Takes ownership of every tensor in `tensors`.
 */
export function adapterFromTensors(config: PeftConfig, tensors: Map<string, Tensor>, where = 'adapter', metadata?: Record<string, string>): PeftAdapter {
  const parts = new Map<string, Partial<PeftModule> & { kind?: PeftModule['kind'] }>();
  const extra = new Map<string, Tensor>();
  let magnitudeSuffix = '';
  try {
    for (const [key, t] of tensors) {
      const hit = SUFFIXES.find(([s]) => key.endsWith(s));
      if (!hit) {
        extra.set(key, t);
        continue;
      }
      const [suffix, field, kind] = hit;
      let mod = key.slice(0, -suffix.length);
      if (mod.startsWith(PREFIX)) mod = mod.slice(PREFIX.length);
      if (field === 'magnitude' && suffix.endsWith('.weight')) magnitudeSuffix = '.weight';
      const p = parts.get(mod) ?? {};
      if (kind) {
        if (p.kind && p.kind !== kind) throw fmt(where, `module '${mod}' has both linear and embedding LoRA weights`);
        p.kind = kind;
      }
      if (p[field]) throw fmt(where, `module '${mod}' has two tensors for ${suffix}`);
      (p as Record<string, unknown>)[field] = t;
      parts.set(mod, p);
    }
    const modules = new Map<string, PeftModule>();
    for (const [mod, p] of parts) {
      if (!p.loraA || !p.loraB) throw fmt(where, `module '${mod}' lacks its ${p.loraA ? 'lora_B' : 'lora_A'} weight`);
      const A = p.loraA;
      const B = p.loraB;
      if (A.ndim !== 2 || B.ndim !== 2 || A.shape[0] !== B.shape[1])
        throw fmt(where, `module '${mod}' has lora_A ${shapeString(A.shape)} and lora_B ${shapeString(B.shape)}, whose ranks differ`);
      for (const [n, t] of [['lora_A', A], ['lora_B', B], ['lora_B.bias', p.loraBBias], ['lora_magnitude_vector', p.magnitude]] as const)
        if (t && t.dtype === 'int32') throw fmt(where, `module '${mod}' has an integer ${n}`);
      const rank = A.shape[0]!;
      const s = moduleScaling(config, mod);
      if (config.r !== undefined && s.rank !== rank)
        throw fmt(where, `module '${mod}' has rank ${rank} in its tensors but the config gives it rank ${s.rank}`);
      const out = B.shape[0]!;
      if (p.loraBBias && (p.loraBBias.ndim !== 1 || p.loraBBias.shape[0] !== out))
        throw fmt(where, `module '${mod}' has lora_B.bias ${shapeString(p.loraBBias.shape)} for ${out} outputs`);
      if (p.magnitude) {
        if (p.kind === 'embedding') throw new LoraError('ERR_LORA_UNSUPPORTED', `Adapter ${where}: DoRA on embedding '${mod}' is not supported`);
        // a Conv1D (fan_in_fan_out) layer's magnitude is over its outputs too, which are B's rows
        if (p.magnitude.ndim !== 1 || p.magnitude.shape[0] !== out)
          throw fmt(where, `module '${mod}' has lora_magnitude_vector ${shapeString(p.magnitude.shape)} for ${out} outputs`);
      }
      modules.set(mod, {
        kind: p.kind ?? 'linear', loraA: A, loraB: B, loraBBias: p.loraBBias ?? null, magnitude: p.magnitude ?? null,
        rank, alpha: s.alpha, scaling: config.use_rslora ? s.alpha / Math.sqrt(rank) : s.alpha / rank,
      });
    }
    const a = new PeftAdapter(config, modules, extra, metadata ?? { format: 'pt' });
    a.magnitudeSuffix = magnitudeSuffix;
    return a;
  } catch (err) {
    for (const t of tensors.values()) t.dispose();
    throw err;
  }
}

/**
 * Loads a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors). Tensors keep
 * their stored dtype (float32, bfloat16 or float16).
 *
 * @example
 * const adapter = loadPeftAdapter('out/my-lora');
 * for (const [name, m] of adapter.modules) console.log(name, m.rank, m.scaling);
 * @throws ERR_LORA_FORMAT for a malformed config or weights file (naming the file and the
 *   problem), ERR_LORA_UNSUPPORTED for non-LoRA adapters or pickled weights, ERR_LORA_IO when
 *   the folder cannot be read.
 */
export function loadPeftAdapter(dir: string): PeftAdapter {
  if (typeof dir !== 'string') throw typeError('dir', 'a folder path', dir);
  const cfgFile = path.join(dir, ADAPTER_CONFIG);
  let text: string;
  try {
    text = fs.readFileSync(cfgFile, 'utf8');
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not read ${cfgFile}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw fmt(cfgFile, `not valid JSON (${(err as Error).message})`);
  }
  const config = checkConfig(cfgFile, raw);
  const wFile = path.join(dir, ADAPTER_WEIGHTS);
  if (!fs.existsSync(wFile)) {
    if (fs.existsSync(path.join(dir, 'adapter_model.bin')))
      throw new LoraError('ERR_LORA_UNSUPPORTED', `Adapter ${dir} has only adapter_model.bin (a Python pickle); convert it to ${ADAPTER_WEIGHTS} first`);
    throw new LoraError('ERR_LORA_IO', `Could not find ${wFile}`);
  }
  const { tensors, metadata } = loadSafetensors(wFile);
  return adapterFromTensors(config, tensors, wFile, metadata);
}

/** The adapter's tensors under PEFT's on-disk key names. */
export function adapterTensors(adapter: PeftAdapter): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  for (const [mod, m] of adapter.modules) {
    const base = PREFIX + mod;
    if (m.kind === 'embedding') {
      out.set(`${base}.lora_embedding_A`, m.loraA);
      out.set(`${base}.lora_embedding_B`, m.loraB);
    } else {
      out.set(`${base}.lora_A.weight`, m.loraA);
      out.set(`${base}.lora_B.weight`, m.loraB);
    }
    if (m.loraBBias) out.set(`${base}.lora_B.bias`, m.loraBBias);
    if (m.magnitude) out.set(`${base}.lora_magnitude_vector${adapter.magnitudeSuffix}`, m.magnitude);
  }
  for (const [k, t] of adapter.extraTensors) out.set(k, t);
  return out;
}

/**
 * Writes an adapter as PEFT does: adapter_config.json (2-space JSON, every field kept) and
 * adapter_model.safetensors (keys sorted, tensors in their own dtype, byte for byte). Each file is
 * written atomically; a new folder is created.
 * @throws LoraTypeError for a non-adapter; ERR_LORA_IO when the folder cannot be written.
 */
export function savePeftAdapter(dir: string, adapter: PeftAdapter): void {
  if (typeof dir !== 'string' || dir === '') throw typeError('dir', 'a folder path', dir);
  if (!(adapter instanceof PeftAdapter)) throw typeError('adapter', 'a PeftAdapter', adapter);
  const tensors = adapterTensors(adapter);
  for (const [k, t] of tensors) t._live(k);
  try {
    fs.mkdirSync(dir, { recursive: true });
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not create ${dir}: ${(err as Error).message}`);
  }
  saveSafetensors(path.join(dir, ADAPTER_WEIGHTS), tensors, { metadata: adapter.metadata, sort: true });
  writeFileAtomic(path.join(dir, ADAPTER_CONFIG), JSON.stringify({ peft_type: 'LORA', ...adapter.config }, null, 2) + '\n');
}

/**
 * A config that states each module's rank and alpha exactly: r/lora_alpha are the most common
 * values, rank_pattern/alpha_pattern list the rest by full module path (anchored by PEFT's rule).
 * Used for adapters that lora-native builds (combinations, new adapters).
 */
export function configForModules(base: PeftConfig, modules: Map<string, { rank: number; alpha: number }>): PeftConfig {
  const mode = (vals: number[]) => {
    const counts = new Map<number, number>();
    for (const v of vals) counts.set(v, (counts.get(v) ?? 0) + 1);
    return [...counts].sort((a, b) => b[1] - a[1] || a[0] - b[0])[0]?.[0];
  };
  const r = mode([...modules.values()].map((m) => m.rank)) ?? base.r ?? 8;
  const alpha = mode([...modules.values()].map((m) => m.alpha)) ?? base.lora_alpha ?? r;
  const rank_pattern: Record<string, number> = {};
  const alpha_pattern: Record<string, number> = {};
  const esc = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  for (const [name, m] of modules) {
    if (m.rank !== r) rank_pattern[esc(name)] = m.rank;
    if (m.alpha !== alpha) alpha_pattern[esc(name)] = m.alpha;
  }
  return { ...base, peft_type: 'LORA', r, lora_alpha: alpha, rank_pattern, alpha_pattern };
}
