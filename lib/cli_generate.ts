// `lora-native generate`: loads a Hugging Face model folder (and a PEFT adapter), encodes a prompt
// (through the tokenizer's chat template when it has one, as mlx_lm.generate does) or runs a chat
// over stdin, and streams the decoded text as tokens come, with prompt and generation tokens/s on
// stderr. Streaming decodes the running sequence and prints its new suffix, holding back a trailing
// incomplete UTF-8 character until its next token. Not a server, and no KV cache across chat turns.
import * as fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import * as readline from 'node:readline';

import { matmulPrecisionArg, need, numberArg, parse, printable, UsageError } from './cli_common';
import { LoraError } from './errors';
import { CausalLM, WeightDtype } from './models/causal_lm';
import { loadCausalLM } from './models/loader';
import { applyLora, loadLoraAdapter } from './nn';
import { loadPeftAdapter } from './peft';
import { ChatMessage, loadTokenizer, Tokenizer } from './tokenizer';

export const GENERATE_FLAGS = {
  model: { type: 'string' }, adapter: { type: 'string' }, prompt: { type: 'string' }, chat: { type: 'boolean' },
  'system-prompt': { type: 'string' }, 'ignore-chat-template': { type: 'boolean' }, 'max-tokens': { type: 'string' },
  temperature: { type: 'string' }, 'top-p': { type: 'string' }, 'top-k': { type: 'string' }, seed: { type: 'string' },
  device: { type: 'string' }, dtype: { type: 'string' }, 'matmul-precision': { type: 'string' },
} as const;

export const GENERATE_USAGE = `generate loads --model (a Hugging Face folder with config.json, safetensors and tokenizer.json)
         and streams the reply to stdout; prompt and generation tokens/s go to stderr
  --prompt TEXT    one prompt; rendered with the tokenizer's chat template when it has one
  --chat           a conversation over stdin, one user message per line (/reset forgets it, /exit ends)
  --adapter DIR    a PEFT LoRA adapter folder applied on top of the model
  --system-prompt  a system message before the user's (chat template only)
  --ignore-chat-template  encode --prompt as plain text even when the tokenizer has a chat template
  --max-tokens n   new tokens at most per reply (default 256)
  --temperature t  0 (the default) is greedy; above 0 samples
  --top-p p        nucleus sampling (default 1: off)     --top-k k   the k most likely only (default 0: off)
  --seed s         seed of the sampler
  --device d       cpu (default) or cuda                 --dtype d   f32, bf16 or f16 for the frozen weights
                   (default: the checkpoint's)
  --matmul-precision p  fp32 (default) or bf16: with bf16 weights, round activations to bf16 for
                   bf16 dot products (about 2x prompt speed on avx512_bf16 CPUs; fp32 sums)`;

const DTYPES: Record<string, WeightDtype> = { f32: 'float32', float32: 'float32', bf16: 'bfloat16', bfloat16: 'bfloat16', f16: 'float16', float16: 'float16' };

// Generated text keeps newlines and tabs; other control characters are escaped (see printable).
// eslint-disable-next-line no-control-regex
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/;

/** Generated text as the command prints it: newlines and tabs kept, other control characters escaped. */
export function printableText(s: string): string {
  return CONTROL.test(s) ? s.split(/(\n|\t)/).map((p) => (p === '\n' || p === '\t' ? p : printable(p))).join('') : s;
}

function intFlag(v: unknown, flag: string, min: number, def: number): number {
  if (v === undefined) return def;
  const n = numberArg(v as string, flag);
  if (!Number.isInteger(n) || n < min) throw new UsageError(`${flag} must be an integer >= ${min} but is '${v}'`);
  return n;
}

interface Settings {
  maxNewTokens: number;
  temperature: number;
  topP: number;
  topK: number;
  seed: number | undefined;
  eos: number[];
}

/**
 * Applies a PEFT adapter to a loaded model: LoRA layers of the adapter's ranks on exactly the
 * modules it adapts, then its weights and scaling. Returns the number of modules.
 */
function attachAdapter(model: CausalLM, dir: string): number {
  const a = loadPeftAdapter(dir);
  const byRank = new Map<number, string[]>();
  try {
    for (const [p, m] of a.modules) byRank.set(m.rank, [...(byRank.get(m.rank) ?? []), p]);
    for (const [rank, paths] of byRank) applyLora(model, { targetModules: paths, rank, useRslora: !!a.config.use_rslora });
  } finally {
    a.dispose();
  }
  return loadLoraAdapter(model, dir).length;
}

/** Generates one reply, printing its text as it comes; returns the text and its statistics on err. */
async function reply(model: CausalLM, tok: Tokenizer, ids: number[], s: Settings, out: NodeJS.WritableStream, err: NodeJS.WritableStream,
  signal: AbortSignal): Promise<string> {
  const tokens: number[] = [];
  let printed = '';
  const show = (final: boolean) => {
    // ids past the tokenizer's vocabulary (an embedding padded beyond it) have no text
    let text = tok.decode(tokens.filter((id) => id < tok.vocabSize), { skipSpecialTokens: true });
    // a token that ends inside a UTF-8 character decodes to U+FFFD until the rest arrives, and a
    // trailing space may merge with the next token's punctuation (clean_up_tokenization_spaces)
    if (!final) text = text.replace(/[\uFFFD ]+$/, '');
    // text that decoding revised (a tokenizer's clean-up rules) cannot be unprinted: go on after it
    if (text.length > printed.length) out.write(printableText(text.slice(printed.length)));
    if (text.length >= printed.length) printed = text;
  };
  const t0 = performance.now();
  let tFirst = 0;
  await model.generate(ids, {
    maxNewTokens: s.maxNewTokens, temperature: s.temperature, topP: s.topP, topK: s.topK, seed: s.seed, eosTokenId: s.eos, signal,
    onToken: (t) => {
      if (tokens.length === 0) tFirst = performance.now();
      tokens.push(t);
      show(false);
    },
  });
  show(true);
  out.write('\n');
  const t1 = performance.now();
  const rate = (n: number, ms: number) => (ms > 0 ? (n / (ms / 1000)).toFixed(1) : '-');
  err.write(`prompt: ${ids.length} tokens, ${rate(ids.length, tFirst - t0)} tokens/s; ` +
    `generation: ${tokens.length} tokens, ${tokens.length > 1 ? rate(tokens.length - 1, t1 - tFirst) : '-'} tokens/s\n`);
  return printed;
}

/** Lines of input, ending early when the signal aborts. */
async function* lines(input: NodeJS.ReadableStream, signal: AbortSignal): AsyncGenerator<string> {
  const rl = readline.createInterface({ input, terminal: false, crlfDelay: Infinity });
  const close = () => rl.close();
  signal.addEventListener('abort', close);
  try {
    for await (const line of rl) yield line;
  } finally {
    signal.removeEventListener('abort', close);
    rl.close();
  }
}

/** The `generate` command (see GENERATE_USAGE). Usage mistakes throw UsageError. */
export async function generateCommand(argv: string[], out: NodeJS.WritableStream, err: NodeJS.WritableStream, signal: AbortSignal,
  input: NodeJS.ReadableStream = process.stdin): Promise<void> {
  const { values: v } = parse(argv, GENERATE_FLAGS);
  const modelDir = need(v.model, '--model');
  const chat = v.chat === true;
  if (chat && v.prompt !== undefined) throw new UsageError('--prompt and --chat exclude each other: give one');
  if (!chat && v.prompt === undefined) throw new UsageError('missing --prompt or --chat');
  const prompt = chat ? '' : (v.prompt as string);
  const s: Settings = {
    maxNewTokens: intFlag(v['max-tokens'], '--max-tokens', 1, 256),
    temperature: v.temperature === undefined ? 0 : numberArg(v.temperature as string, '--temperature'),
    topP: v['top-p'] === undefined ? 1 : numberArg(v['top-p'] as string, '--top-p'),
    topK: intFlag(v['top-k'], '--top-k', 0, 0),
    seed: v.seed === undefined ? undefined : intFlag(v.seed, '--seed', 0, 0),
    eos: [],
  };
  if (s.temperature < 0) throw new UsageError(`--temperature must be >= 0 but is '${v.temperature}'`);
  if (!(s.topP > 0 && s.topP <= 1)) throw new UsageError(`--top-p must be in (0, 1] but is '${v['top-p']}'`);
  const device = (v.device ?? 'cpu') as string;
  if (device !== 'cpu' && device !== 'cuda') throw new UsageError(`--device must be cpu or cuda but is '${device}'`);
  let dtype: WeightDtype | undefined;
  if (v.dtype !== undefined) {
    dtype = DTYPES[v.dtype as string];
    if (!dtype) throw new UsageError(`--dtype must be f32, bf16 or f16 but is '${v.dtype}'`);
  }
  if (!fs.existsSync(modelDir) || !fs.statSync(modelDir).isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not find the model folder ${modelDir}`);
  const adapterDir = v.adapter as string | undefined;
  if (adapterDir !== undefined && (!fs.existsSync(adapterDir) || !fs.statSync(adapterDir).isDirectory()))
    throw new LoraError('ERR_LORA_IO', `Could not find the adapter folder ${adapterDir}`);

  const tok = loadTokenizer(modelDir);
  const template = !v['ignore-chat-template'] && tok.chatTemplate() !== null;
  if (chat && !template) throw new LoraError('ERR_LORA_UNSUPPORTED', `--chat needs a chat template but the tokenizer of ${modelDir} has none (use --prompt)`);
  const t0 = performance.now();
  const matmulPrecision = matmulPrecisionArg(v['matmul-precision'] as string | undefined);
  const model = await loadCausalLM(modelDir, { dtype, device, ...(matmulPrecision ? { matmulPrecision } : {}) });
  try {
    const modules = adapterDir === undefined ? 0 : attachAdapter(model, adapterDir);
    s.eos = tok.eosTokenIds.filter((id) => id < model.vocabSize);
    err.write(`loaded ${printable(modelDir)} (${model.architecture}, ${model.dtype}, ${device})${adapterDir ? ` with the adapter ${printable(adapterDir)} (${modules} modules)` : ''} ` +
      `in ${((performance.now() - t0) / 1000).toFixed(2)} s\n`);
    const system: ChatMessage[] = v['system-prompt'] !== undefined ? [{ role: 'system', content: v['system-prompt'] as string }] : [];
    if (!chat) {
      const ids = template ? tok.encodeChat([...system, { role: 'user', content: prompt }], { addGenerationPrompt: true }) : tok.encode(prompt);
      await reply(model, tok, ids, s, out, err, signal);
    } else {
      const interactive = !!(input as { isTTY?: boolean }).isTTY;
      let messages: ChatMessage[] = [...system];
      if (interactive) err.write('> ');
      for await (const line of lines(input, signal)) {
        const text = line.trim();
        if (text === '/exit' || text === '/quit') break;
        if (text === '/reset') messages = [...system];
        else if (text !== '') {
          messages.push({ role: 'user', content: line });
          const answer = await reply(model, tok, tok.encodeChat(messages, { addGenerationPrompt: true }), s, out, err, signal);
          if (signal.aborted) break;
          messages.push({ role: 'assistant', content: answer });
        }
        if (interactive) err.write('> ');
      }
    }
    if (signal.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('interrupted');
  } finally {
    model.dispose();
  }
}
