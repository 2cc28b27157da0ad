// Hugging Face tokenizers and chat templates: loadTokenizer(dir) reads tokenizer.json and
// tokenizer_config.json (plus chat_template.jinja and generation_config.json when present), encodes
// and decodes with @huggingface/tokenizers and renders chat templates with @huggingface/jinja, as
// transformers' fast tokenizers and apply_chat_template do. It is not a tokenizer or a template
// engine of its own, and it reads no sentencepiece tokenizer.model files.
import * as fs from 'node:fs';
import * as path from 'node:path';

import { checkOptions, describe, expectBoolean, LoraError, typeError } from './errors';

// Both packages ship CommonJS builds for Node's require (package.json "exports" → node.require);
// their type declarations describe ES modules, hence the resolution-mode on the type imports.
type TokenizersModule = typeof import('@huggingface/tokenizers', { with: { 'resolution-mode': 'import' } });
type JinjaModule = typeof import('@huggingface/jinja', { with: { 'resolution-mode': 'import' } });
type HfTemplate = InstanceType<JinjaModule['Template']>;
/**
 * The part of @huggingface/tokenizers' Tokenizer this wrapper uses (declared here so that our
 * .d.ts files do not need TypeScript >= 5.3's import attributes to name the ESM-typed package).
 */
interface HfTokenizer {
  encode(text: string, options: { add_special_tokens: boolean }): { ids: number[] };
  decode(ids: number[], options: { skip_special_tokens: boolean }): string;
  token_to_id(token: string): number | undefined;
  id_to_token(id: number): string | undefined;
  get_added_tokens_decoder(): Map<number, { content: string; special: boolean }>;
  get_vocab(withAddedTokens?: boolean): Map<string, number>;
}
// Loaded on first use, so that `require('lora-native')` does not load them for programs that
// never tokenize (and works from a copy of dist/ without node_modules beside it).
let tokenizersModule: TokenizersModule | undefined;
let jinjaModule: JinjaModule | undefined;
// eslint-disable-next-line @typescript-eslint/no-require-imports
const tokenizers = (): TokenizersModule => (tokenizersModule ??= require('@huggingface/tokenizers') as TokenizersModule);
// eslint-disable-next-line @typescript-eslint/no-require-imports
const jinja = (): JinjaModule => (jinjaModule ??= require('@huggingface/jinja') as JinjaModule);

/** One chat message, as chat templates receive it (extra fields such as tool_calls pass through). */
export interface ChatMessage {
  role: string;
  content?: string | null | { type: string; text?: string; [field: string]: unknown }[];
  [field: string]: unknown;
}

export interface EncodeOptions {
  /** Add the tokenizer's special tokens (BOS, ...) as its post-processor says. Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave special tokens (BOS, EOS, chat markers) out of the text. Default false. */
  skipSpecialTokens?: boolean;
}

export interface ChatTemplateOptions {
  /** End with the header that starts an assistant turn (for generation). Default false. */
  addGenerationPrompt?: boolean;
  /** Tool (function) descriptions as JSON schema objects, passed to the template as `tools`. */
  tools?: object[];
  /** Name of the template when the tokenizer has several (default: 'tool_use' when tools are given and it exists, else 'default'). */
  templateName?: string;
  /** Extra template variables (for example `{ enable_thinking: false }` for Qwen3). */
  variables?: Record<string, unknown>;
}

function fmt(file: string, problem: string): LoraError {
  return new LoraError('ERR_LORA_FORMAT', `Invalid tokenizer file ${file}: ${problem}`);
}

function readJson(file: string, required: boolean): Record<string, unknown> | null {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new LoraError('ERR_LORA_IO', `Could not read ${file}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw fmt(file, `not valid JSON (${(err as Error).message})`);
  }
  if (!raw || typeof raw !== 'object' || Array.isArray(raw)) throw fmt(file, `expected a JSON object but found ${describe(raw)}`);
  return raw as Record<string, unknown>;
}

/** A special token as tokenizer_config.json writes it: a string or an AddedToken object. */
function tokenString(file: string, key: string, v: unknown): string | null {
  if (v === undefined || v === null) return null;
  if (typeof v === 'string') return v;
  if (typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  throw fmt(file, `${key} must be a string or an object with a "content" string but is ${describe(v)}`);
}

function idList(file: string, key: string, v: unknown): number[] {
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const x of list) if (typeof x !== 'number' || !Number.isInteger(x) || x < 0) throw fmt(file, `${key} must be a token id or a list of token ids but is ${describe(v)}`);
  return list as number[];
}

interface TemplateSource { text: string; file: string }

/** Chat templates of a tokenizer folder by name ('default' for the unnamed one), newest format first. */
function readTemplates(dir: string, config: Record<string, unknown>, configFile: string): Map<string, TemplateSource> {
  const out = new Map<string, TemplateSource>();
  const jinjaFile = path.join(dir, 'chat_template.jinja');
  if (fs.existsSync(jinjaFile)) {
    try {
      out.set('default', { text: fs.readFileSync(jinjaFile, 'utf8'), file: jinjaFile });
    } catch (err) {
      throw new LoraError('ERR_LORA_IO', `Could not read ${jinjaFile}: ${(err as Error).message}`);
    }
    const extraDir = path.join(dir, 'additional_chat_templates');
    if (fs.existsSync(extraDir)) {
      for (const f of fs.readdirSync(extraDir).filter((n) => n.endsWith('.jinja')).sort())
        out.set(f.slice(0, -'.jinja'.length), { text: fs.readFileSync(path.join(extraDir, f), 'utf8'), file: path.join(extraDir, f) });
    }
    return out;
  }
  let ct = config.chat_template;
  let ctFile = configFile;
  if (ct === undefined || ct === null) {
    const jsonFile = path.join(dir, 'chat_template.json');
    const j = readJson(jsonFile, false);
    if (j) {
      ct = j.chat_template;
      ctFile = jsonFile;
    }
  }
  if (ct === undefined || ct === null) return out;
  if (typeof ct === 'string') out.set('default', { text: ct, file: ctFile });
  else if (Array.isArray(ct)) {
    for (const item of ct) {
      const it = item as { name?: unknown; template?: unknown };
      if (!it || typeof it.name !== 'string' || typeof it.template !== 'string')
        throw fmt(ctFile, `chat_template entries must be {"name": string, "template": string} but one is ${describe(item)}`);
      out.set(it.name, { text: it.template, file: ctFile });
    }
  } else if (typeof ct === 'object') {
    for (const [name, text] of Object.entries(ct as Record<string, unknown>)) {
      if (typeof text !== 'string') throw fmt(ctFile, `chat_template['${name}'] must be a string but is ${describe(text)}`);
      out.set(name, { text, file: ctFile });
    }
  } else throw fmt(ctFile, `chat_template must be a string or a list of named templates but is ${describe(ct)}`);
  return out;
}

function checkIds(ids: unknown, vocabSize: number): number[] {
  const arr = ids as ArrayLike<unknown>;
  if (!Array.isArray(ids) && !(ids instanceof Int32Array) && !(ids instanceof Uint32Array))
    throw typeError('ids', 'an array of token ids', ids);
  const out = new Array<number>(arr.length);
  for (let i = 0; i < arr.length; i++) {
    const v = arr[i];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= vocabSize)
      throw new LoraError('ERR_LORA_RANGE', `Expected token ids between 0 and ${vocabSize - 1} for ids but ids[${i}] is ${describe(v)}`);
    out[i] = v;
  }
  return out;
}

function checkMessages(messages: unknown): ChatMessage[] {
  if (!Array.isArray(messages)) throw typeError('messages', 'an array of {role, content} objects', messages);
  messages.forEach((m, i) => {
    if (!m || typeof m !== 'object' || Array.isArray(m)) throw typeError(`messages[${i}]`, 'a {role, content} object', m);
    const { role, content } = m as ChatMessage;
    if (typeof role !== 'string') throw typeError(`messages[${i}].role`, 'a string', role);
    if (content !== undefined && content !== null && typeof content !== 'string' && !Array.isArray(content))
      throw typeError(`messages[${i}].content`, 'a string, an array of content parts or null', content);
  });
  return messages as ChatMessage[];
}

/**
 * A Hugging Face tokenizer loaded from a model folder. Encodes and decodes as transformers' fast
 * tokenizer does, knows the special tokens, and renders the model's chat templates.
 * Created by {@link loadTokenizer}.
 */
export class Tokenizer {
  /** The folder it was loaded from. */
  readonly dir: string;
  /** Number of token ids (the largest id + 1, added tokens included). */
  readonly vocabSize: number;
  /** The parsed tokenizer_config.json ({} when the folder has none). */
  readonly config: Readonly<Record<string, unknown>>;
  readonly bosToken: string | null;
  readonly eosToken: string | null;
  readonly padToken: string | null;
  readonly unkToken: string | null;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  readonly padTokenId: number | null;
  readonly unkTokenId: number | null;
  /**
   * Every id that ends generation: generation_config.json's eos_token_id (a number or a list),
   * else config.json's, then the tokenizer's EOS if not already listed.
   */
  readonly eosTokenIds: readonly number[];
  /** Ids of the tokens marked special (BOS, EOS, chat markers, ...), ascending. */
  readonly specialTokenIds: readonly number[];
  private readonly hf: HfTokenizer;
  private readonly templates: Map<string, TemplateSource>;
  private readonly compiled = new Map<string, HfTemplate>();
  private readonly specialStrings: Map<string, number>;

  /** @internal use loadTokenizer(dir). */
  constructor(dir: string, hf: HfTokenizer, config: Record<string, unknown>, templates: Map<string, TemplateSource>, eosIds: number[], configFile: string) {
    if (typeof dir !== 'string' || !hf || typeof (hf as { get_added_tokens_decoder?: unknown }).get_added_tokens_decoder !== 'function' ||
      !config || typeof config !== 'object' || !(templates instanceof Map) || !Array.isArray(eosIds) || typeof configFile !== 'string')
      throw typeError('Tokenizer arguments', 'what loadTokenizer(dir) passes (create tokenizers with loadTokenizer)', dir);
    this.dir = dir;
    this.hf = hf;
    this.config = config;
    this.templates = templates;
    const added = hf.get_added_tokens_decoder();
    let maxId = -1;
    for (const id of hf.get_vocab(true).values()) if (id > maxId) maxId = id;
    this.vocabSize = maxId + 1;
    this.specialStrings = new Map();
    for (const [id, tok] of added) if (tok.special) this.specialStrings.set(tok.content, id);
    this.specialTokenIds = [...this.specialStrings.values()].sort((a, b) => a - b);
    const lookup = (key: string): [string | null, number | null] => {
      const s = tokenString(configFile, key, config[key]);
      if (s === null) return [null, null];
      const id = hf.token_to_id(s);
      return [s, id === undefined ? null : id];
    };
    [this.bosToken, this.bosTokenId] = lookup('bos_token');
    [this.eosToken, this.eosTokenId] = lookup('eos_token');
    [this.padToken, this.padTokenId] = lookup('pad_token');
    [this.unkToken, this.unkTokenId] = lookup('unk_token');
    const eos = [...eosIds];
    if (this.eosTokenId !== null && !eos.includes(this.eosTokenId)) eos.push(this.eosTokenId);
    this.eosTokenIds = eos;
  }

  /**
   * Token ids of a text.
   * @example tok.encode('Hello world') // [9906, 1917] for Llama 3
   * @throws LoraTypeError for a non-string text or a bad option.
   */
  encode(text: string, options?: EncodeOptions): number[] {
    if (typeof text !== 'string') throw typeError('text', 'a string', text);
    const o = checkOptions<EncodeOptions>('encode', options, ['addSpecialTokens']);
    const add = o.addSpecialTokens === undefined ? true : expectBoolean('addSpecialTokens', o.addSpecialTokens);
    return this.hf.encode(text, { add_special_tokens: add }).ids;
  }

  /**
   * The text of token ids.
   * @example tok.decode([9906, 1917]) // 'Hello world'
   * @throws LoraTypeError / ERR_LORA_RANGE for ids that are not token ids of this tokenizer.
   */
  decode(ids: readonly number[] | Int32Array | Uint32Array, options?: DecodeOptions): string {
    const list = checkIds(ids, this.vocabSize);
    const o = checkOptions<DecodeOptions>('decode', options, ['skipSpecialTokens']);
    const skip = o.skipSpecialTokens === undefined ? false : expectBoolean('skipSpecialTokens', o.skipSpecialTokens);
    return this.hf.decode(list, { skip_special_tokens: skip });
  }

  /** The id of a token string (as in the vocabulary, e.g. 'Ġworld'), or undefined. */
  tokenToId(token: string): number | undefined {
    if (typeof token !== 'string') throw typeError('token', 'a string', token);
    return this.hf.token_to_id(token);
  }

  /** The token string of an id, or undefined. */
  idToToken(id: number): string | undefined {
    if (typeof id !== 'number' || !Number.isInteger(id)) throw typeError('id', 'an integer token id', id);
    return this.hf.id_to_token(id);
  }

  /** The strings of the special tokens with their ids (BOS, EOS, chat markers, ...). */
  get specialTokens(): ReadonlyMap<string, number> {
    return this.specialStrings;
  }

  /** Names of the chat templates this tokenizer has ('default' for the unnamed one); empty when none. */
  get chatTemplateNames(): string[] {
    return [...this.templates.keys()];
  }

  /** The text of a chat template (default: the default one), or null when the tokenizer has none. */
  chatTemplate(name = 'default'): string | null {
    return this.templates.get(name)?.text ?? null;
  }

  /**
   * Renders a conversation with the model's chat template, as transformers'
   * `apply_chat_template(messages, tokenize=False)` does: the template sees `messages`, `tools`,
   * `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...),
   * `raise_exception` and `strftime_now`. Encode the result with `addSpecialTokens: false` (or use
   * {@link encodeChat}): templates write BOS themselves.
   * @example
   * tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true })
   * // '<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
   * @throws ERR_LORA_TEMPLATE when the tokenizer has no chat template, or the template fails to
   *   parse or raises while rendering (the message names the file and the template's error);
   *   LoraTypeError for malformed messages or options.
   */
  applyChatTemplate(messages: ChatMessage[], options?: ChatTemplateOptions): string {
    const msgs = checkMessages(messages);
    const o = checkOptions<ChatTemplateOptions>('applyChatTemplate', options, ['addGenerationPrompt', 'tools', 'templateName', 'variables']);
    const gen = o.addGenerationPrompt === undefined ? false : expectBoolean('addGenerationPrompt', o.addGenerationPrompt);
    if (o.tools !== undefined && (!Array.isArray(o.tools) || !o.tools.every((x) => x && typeof x === 'object')))
      throw typeError('tools', 'an array of tool description objects', o.tools);
    if (o.variables !== undefined && (!o.variables || typeof o.variables !== 'object' || Array.isArray(o.variables)))
      throw typeError('variables', 'an object of template variables', o.variables);
    if (o.templateName !== undefined && typeof o.templateName !== 'string') throw typeError('templateName', 'a string', o.templateName);
    const name = o.templateName ?? (o.tools?.length && this.templates.has('tool_use') ? 'tool_use' : 'default');
    const src = this.templates.get(name);
    if (!src) {
      if (this.templates.size === 0)
        throw new LoraError('ERR_LORA_TEMPLATE', `The tokenizer in ${this.dir} has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja)`);
      throw new LoraError('ERR_LORA_TEMPLATE', `The tokenizer in ${this.dir} has no chat template named '${name}'; it has ${[...this.templates.keys()].map((k) => `'${k}'`).join(', ')}`);
    }
    let tpl = this.compiled.get(name);
    if (!tpl) {
      try {
        tpl = new (jinja().Template)(src.text);
      } catch (err) {
        throw new LoraError('ERR_LORA_TEMPLATE', `The chat template '${name}' in ${src.file} does not parse: ${(err as Error).message}`);
      }
      this.compiled.set(name, tpl);
    }
    const vars: Record<string, unknown> = {};
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const s = tokenString('tokenizer_config.json', key, this.config[key]);
      if (s !== null) vars[key] = s;
    }
    if (Array.isArray(this.config.additional_special_tokens)) vars.additional_special_tokens = this.config.additional_special_tokens;
    Object.assign(vars, o.variables ?? {});
    vars.messages = msgs;
    if (o.tools) vars.tools = o.tools;
    vars.add_generation_prompt = gen;
    try {
      return tpl.render(vars);
    } catch (err) {
      throw new LoraError('ERR_LORA_TEMPLATE', `The chat template '${name}' in ${src.file} failed to render: ${(err as Error).message}`);
    }
  }

  /** {@link applyChatTemplate}, then encode without adding special tokens (the template wrote them). */
  encodeChat(messages: ChatMessage[], options?: ChatTemplateOptions): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }
}

/**
 * Loads a Hugging Face tokenizer folder: tokenizer.json (required), tokenizer_config.json (special
 * tokens, chat_template), chat_template.jinja (newer transformers save the template there; it wins
 * over tokenizer_config.json) and generation_config.json / config.json (the ids that end
 * generation). Runs offline; nothing is downloaded.
 *
 * @example
 * const tok = loadTokenizer('./SmolLM2-135M-Instruct');
 * const ids = tok.encodeChat([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true });
 * console.log(tok.decode(ids), tok.eosTokenIds);
 * @throws ERR_LORA_IO when the folder or tokenizer.json cannot be read (a folder with only a
 *   sentencepiece tokenizer.model gets ERR_LORA_UNSUPPORTED); ERR_LORA_FORMAT naming the file
 *   for JSON that does not parse or a tokenizer the library cannot build.
 */
export function loadTokenizer(dir: string): Tokenizer {
  if (typeof dir !== 'string' || dir === '') throw typeError('dir', 'a folder path', dir);
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not find the tokenizer folder ${dir}`);
  const tokFile = path.join(dir, 'tokenizer.json');
  if (!fs.existsSync(tokFile) && fs.existsSync(path.join(dir, 'tokenizer.model')))
    throw new LoraError('ERR_LORA_UNSUPPORTED', `${dir} has a sentencepiece tokenizer.model but no tokenizer.json; save the tokenizer with transformers (AutoTokenizer.from_pretrained(...).save_pretrained(...)) to get tokenizer.json`);
  const tokJson = readJson(tokFile, true)!;
  if (!tokJson.model || typeof tokJson.model !== 'object') throw fmt(tokFile, 'it has no "model" object');
  const cfgFile = path.join(dir, 'tokenizer_config.json');
  const config = readJson(cfgFile, false) ?? {};
  let hf: HfTokenizer;
  try {
    hf = new (tokenizers().Tokenizer)(tokJson, config);
  } catch (err) {
    throw fmt(tokFile, `the tokenizer could not be built: ${(err as Error).message}`);
  }
  const templates = readTemplates(dir, config, cfgFile);
  const genFile = path.join(dir, 'generation_config.json');
  const gen = readJson(genFile, false);
  let eos = gen ? idList(genFile, 'eos_token_id', gen.eos_token_id) : [];
  if (!gen || gen.eos_token_id === undefined) {
    const modelFile = path.join(dir, 'config.json');
    const model = readJson(modelFile, false);
    if (model) eos = idList(modelFile, 'eos_token_id', model.eos_token_id);
  }
  return new Tokenizer(dir, hf, config, templates, eos, cfgFile);
}
