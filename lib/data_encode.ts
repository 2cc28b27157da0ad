// One dataset row to token ids and a loss mask, for the three JSONL formats: {"text"},
// {"prompt", "completion"} and {"messages"} (rendered with the model's chat template). The mask
// marks the tokens the loss counts: everything for text, the completion for prompt/completion,
// the assistant turns (content and the token that ends the turn) for chats. Batching is data.ts.
import { describe } from './errors';
import type { ChatMessage, Tokenizer } from './tokenizer';

/** What a dataset needs of a tokenizer (a {@link Tokenizer} has it all). */
export type DatasetTokenizer = Pick<Tokenizer, 'encode' | 'applyChatTemplate' | 'eosTokenId' | 'eosTokenIds' | 'padTokenId' | 'specialTokens' | 'chatTemplateNames'>;

export type DatasetFormat = 'text' | 'completion' | 'chat';

/** A tokenized row: ids and, per id, 1 when the loss counts it. */
export interface EncodedRow {
  ids: number[];
  mask: Uint8Array;
}

export interface EncodeRowOptions {
  maskPrompt: boolean;
  /** How prompt/completion rows become text: the chat template (user turn, assistant turn) or plain concatenation. */
  completionTemplate: 'chat' | 'plain';
}

/** A row that cannot be used; the message says why (the caller adds file and line). */
export class RowError extends Error {}

/** The format a row is in, by mlx-lm's rule: prompt+completion, else messages, else text. */
export function detectFormat(row: Record<string, unknown>): DatasetFormat | null {
  if ('prompt' in row && 'completion' in row) return 'completion';
  if ('messages' in row) return 'chat';
  if ('text' in row) return 'text';
  return null;
}

function expectString(row: Record<string, unknown>, key: string): string {
  const v = row[key];
  if (typeof v !== 'string') throw new RowError(`"${key}" must be a string but is ${v === undefined ? 'missing' : describe(v)}`);
  return v;
}

function rowTools(row: Record<string, unknown>): object[] | undefined {
  const tools = row.tools;
  if (tools === undefined || tools === null) return undefined;
  if (!Array.isArray(tools) || !tools.every((x) => x && typeof x === 'object')) throw new RowError(`"tools" must be an array of objects but is ${describe(tools)}`);
  return tools as object[];
}

function rowMessages(row: Record<string, unknown>): ChatMessage[] {
  const m = row.messages;
  if (!Array.isArray(m) || m.length === 0) throw new RowError(`"messages" must be a non-empty array of {role, content} objects but is ${describe(m)}`);
  m.forEach((x, i) => {
    if (!x || typeof x !== 'object' || Array.isArray(x)) throw new RowError(`messages[${i}] must be a {role, content} object but is ${describe(x)}`);
    const { role, content } = x as ChatMessage;
    if (typeof role !== 'string') throw new RowError(`messages[${i}].role must be a string but is ${role === undefined ? 'missing' : describe(role)}`);
    if (content !== undefined && content !== null && typeof content !== 'string' && !Array.isArray(content))
      throw new RowError(`messages[${i}].content must be a string, a list of parts or null but is ${describe(content)}`);
  });
  return m as ChatMessage[];
}

function withEos(tok: DatasetTokenizer, ids: number[]): number[] {
  if (tok.eosTokenId !== null && ids[ids.length - 1] !== tok.eosTokenId) ids.push(tok.eosTokenId);
  return ids;
}

function commonPrefix(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  let i = 0;
  while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
  return i;
}

function firstOf(text: string, from: number, needles: string[]): number {
  let best = -1;
  let bestEnd = -1;
  for (const s of needles) {
    if (!s) continue;
    const at = text.indexOf(s, from);
    if (at >= 0 && (best < 0 || at < best)) {
      best = at;
      bestEnd = at + s.length;
    }
  }
  return bestEnd;
}

/**
 * Character spans [start, end) of the assistant turns in the rendered conversation `full`. Each
 * turn starts where the rendering of the messages before it, with the generation prompt, stops
 * matching `full` (rendering prefixes as mlx-lm and TRL do, which survives templates that render
 * history differently, e.g. Qwen3 dropping earlier thoughts). It ends after the first token that
 * stops generation (generation_config's eos ids), else after the first special token, else where
 * the conversation up to that turn ends (trailing whitespace left out).
 */
export function assistantSpans(tok: DatasetTokenizer, messages: ChatMessage[], tools: object[] | undefined, full: string): [number, number][] {
  const render = (msgs: ChatMessage[], gen: boolean) => tok.applyChatTemplate(msgs, tools ? { addGenerationPrompt: gen, tools } : { addGenerationPrompt: gen });
  const stops: string[] = [];
  const specials: string[] = [];
  for (const [s, id] of tok.specialTokens) (tok.eosTokenIds.includes(id) ? stops : specials).push(s);
  const spans: [number, number][] = [];
  for (let i = 0; i < messages.length; i++) {
    if (messages[i]!.role !== 'assistant') continue;
    let start: number;
    try {
      start = commonPrefix(full, render(messages.slice(0, i), true));
    } catch {
      if (i > 0) throw new RowError(`the chat template cannot render the conversation before assistant message ${i}, so its turn cannot be located`);
      start = 0; // templates that index messages[0] fail on an empty conversation
    }
    if (spans.length && start < spans[spans.length - 1]![1]) start = spans[spans.length - 1]![1];
    let end = firstOf(full, start, stops);
    if (end < 0) end = firstOf(full, start, specials);
    if (end < 0) {
      const upTo = i === messages.length - 1 ? full.length : commonPrefix(full, render(messages.slice(0, i + 1), false));
      end = upTo;
      while (end > start && /\s/.test(full[end - 1]!)) end--;
    }
    if (end <= start) throw new RowError(`assistant message ${i} renders to nothing the model could learn`);
    spans.push([start, end]);
  }
  return spans;
}

/** Token index where character `pos` of `text` falls in `ids` (the encoding of all of `text`). */
function tokenIndex(tok: DatasetTokenizer, text: string, ids: number[], pos: number, isEnd: boolean): number {
  if (pos <= 0) return 0;
  if (pos >= text.length) return ids.length;
  const head = tok.encode(text.slice(0, pos), { addSpecialTokens: false });
  let k = 0;
  while (k < head.length && k < ids.length && head[k] === ids[k]) k++;
  // a token that straddles the boundary (a merge across it) belongs to the span
  return k === head.length || !isEnd ? k : Math.min(k + 1, ids.length);
}

function encodeChat(tok: DatasetTokenizer, messages: ChatMessage[], tools: object[] | undefined, maskPrompt: boolean): EncodedRow {
  const full = tok.applyChatTemplate(messages, tools ? { tools } : undefined);
  const ids = tok.encode(full, { addSpecialTokens: false });
  const mask = new Uint8Array(ids.length);
  if (!maskPrompt) {
    mask.fill(1);
    return { ids, mask };
  }
  for (const [s, e] of assistantSpans(tok, messages, tools, full)) {
    const a = tokenIndex(tok, full, ids, s, false);
    const b = tokenIndex(tok, full, ids, e, true);
    mask.fill(1, a, b);
  }
  return { ids, mask };
}

/**
 * Tokenizes one row of the given format. Text gets the tokenizer's special tokens and EOS
 * (mlx-lm's rule); prompt/completion goes through the chat template as a user and an assistant
 * turn when `completionTemplate` is 'chat' (mlx-lm), else prompt ids (with special tokens) +
 * completion ids + EOS; chats are rendered with the chat template.
 * @throws RowError for a row that does not fit the format or whose template fails.
 */
export function encodeRow(tok: DatasetTokenizer, format: DatasetFormat, row: Record<string, unknown>, o: EncodeRowOptions): EncodedRow {
  if (format === 'text') {
    const ids = withEos(tok, tok.encode(expectString(row, 'text')));
    return { ids, mask: new Uint8Array(ids.length).fill(1) };
  }
  if (format === 'completion') {
    const prompt = expectString(row, 'prompt');
    const completion = expectString(row, 'completion');
    if (o.completionTemplate === 'chat')
      return encodeChat(tok, [{ role: 'user', content: prompt }, { role: 'assistant', content: completion }], rowTools(row), o.maskPrompt);
    const p = tok.encode(prompt);
    const c = withEos(tok, tok.encode(completion, { addSpecialTokens: false }));
    const mask = new Uint8Array(p.length + c.length).fill(1);
    if (o.maskPrompt) mask.fill(0, 0, p.length);
    return { ids: p.concat(c), mask };
  }
  return encodeChat(tok, rowMessages(row), rowTools(row), o.maskPrompt);
}
