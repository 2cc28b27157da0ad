// Runs every example (the README's snippet as examples/train_linear.ts, the MLP, the safetensors +
// LoRA example and a short `--quick` demo) in a child process from its TypeScript source, so the
// examples cannot rot. Each must exit 0 and print what it promises.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

const root = path.join(__dirname, '..');
// the TypeScript loader this test itself runs under (tap's), so children run the .ts sources
const loader = process.execArgv.filter((a) => a.includes('@tapjs/typescript') || a.includes('ts-node') || a.includes('tsimp'));

function runExample(file: string, args: string[] = []): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [...loader, path.join(root, 'examples', file), ...args], {
    cwd: root, encoding: 'utf8', timeout: 120_000, env: { ...process.env, FORCE_COLOR: '0' },
  });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

t.test('train_linear.ts (the README snippet): the loss falls', (tt) => {
  const r = runExample('train_linear.ts');
  tt.equal(r.code, 0, r.out);
  tt.match(r.out, /loss [\d.]+ -> [\d.]+ \(falling\)/);
  tt.match(r.out, /live tensors at exit: 0/);
  tt.end();
});

t.test('mlp.ts: fits the curve', (tt) => {
  const r = runExample('mlp.ts');
  tt.equal(r.code, 0, r.out);
  tt.match(r.out, /mse [\d.]+ -> [\d.]+ in 600 steps/);
  tt.match(r.out, /live tensors at exit: 0/);
  tt.end();
});

t.test('safetensors_lora.ts: load, adapt, save a PEFT adapter', (tt) => {
  const r = runExample('safetensors_lora.ts');
  tt.equal(r.code, 0, r.out);
  tt.match(r.out, /adapted 4 modules \(layers\.0\.attn\.q_proj, \.\.\.\)/);
  tt.match(r.out, /PEFT adapter: adapter_config\.json, adapter_model\.safetensors; r=4/);
  tt.match(r.out, /live tensors at exit: 0/);
  tt.end();
});

t.test('demo.ts --quick: pretrain a Llama CausalLM, save it, lora-native train on chat JSONL, generate, export', (tt) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'demo-test-'));
  const r = runExample('demo.ts', ['--quick', '--out', out]);
  tt.equal(r.code, 0, r.out);
  tt.match(r.out, /1\. pretrained all \d+ parameters on task A \(train\.jsonl: 200 rows \(chat\)/);
  tt.match(r.out, /2\. saved with saveCausalLM: .*base-model\/ \(config\.json, model\.safetensors, tokenizer\.json, tokenizer_config\.json\)/);
  tt.match(r.out, /4\. \$ lora-native train --model /);
  tt.match(r.out, /\ntrained 4 steps in [\d.]+ s; final loss [\d.]+, valid loss/, 'the CLI trained');
  tt.match(r.out, /5\. greedy answers for 4 start letters .* base model vs base \+ adapter \(14 modules, \d+ LoRA parameters/);
  tt.match(r.out, /task B accuracy [\d.]+% -> [\d.]+%; task A accuracy/);
  tt.match(r.out, /6\. exported in [\d.]+ s: GGUF for llama\.cpp \(28 tensors\), mlx-lm adapter \(rank 8, scale 2\)/);
  tt.notMatch(r.out, /tensors still live/);
  // a Hugging Face folder the library reads back, the chat JSONL, the CLI's outputs and the exports
  const cfg = JSON.parse(fs.readFileSync(path.join(out, 'base-model', 'config.json'), 'utf8')) as Record<string, unknown>;
  tt.same([cfg.model_type, cfg.vocab_size, cfg.tie_word_embeddings], ['llama', 50257, true]);
  const row = JSON.parse(fs.readFileSync(path.join(out, 'data', 'train.jsonl'), 'utf8').split('\n')[0]!) as { messages: { role: string }[] };
  tt.same(row.messages.map((m) => m.role), ['user', 'assistant']);
  const ad = JSON.parse(fs.readFileSync(path.join(out, 'adapter', 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  tt.same([ad.r, ad.lora_alpha, ad.base_model_name_or_path], [8, 16, path.join(out, 'base-model')]);
  tt.equal(fs.readFileSync(path.join(out, 'exports', 'adapter.gguf')).subarray(0, 4).toString('latin1'), 'GGUF');
  tt.ok(fs.existsSync(path.join(out, 'exports', 'mlx', 'adapters.safetensors')), 'the mlx-lm adapter weights');
  const res = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')) as { pretrainLosses: number[]; answers: unknown[] };
  tt.equal(res.pretrainLosses.length, 6);
  tt.equal(res.answers.length, 4);
  // the summary lists every file the demo wrote, and the README names each of them
  const files = (d: string, pre = ''): string[] => fs.readdirSync(d, { withFileTypes: true })
    .flatMap((e) => (e.isDirectory() ? files(path.join(d, e.name), `${pre}${e.name}/`) : [`${pre}${e.name}`]));
  const listed = r.out.slice(r.out.indexOf(`files to ${out}/:`)).split('\n').slice(1).map((l) => /^ {2}(\S+) /.exec(l)?.[1]).filter((f): f is string => !!f);
  tt.same(listed.slice().sort(), files(out).sort(), 'the summary lists exactly the files written');
  const readme = fs.readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
  for (const f of files(out)) tt.match(readme, path.basename(f), `README mentions ${f}`);
  fs.rmSync(out, { recursive: true, force: true });
  tt.end();
});

// Every ```ts block of README.md, type-checked as a user's ES module (top-level await allowed)
// under `strict` against the package as installed (node_modules/lora-native -> this folder, its
// exports and dist/lib/*.d.ts), in one tsc run. A canary with a known error proves tsc checks.
t.test('README.md: every TypeScript snippet compiles under tsc --strict against the package types', (tt) => {
  if (!fs.existsSync(path.join(root, 'dist', 'lib', 'index.d.ts'))) {
    tt.fail('dist/lib/index.d.ts is missing: run npm run build:ts (npm ci does it through prepare)');
    return tt.end();
  }
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const snippets: { line: number; code: string }[] = [];
  for (const m of readme.matchAll(/^( *)```ts\n([\s\S]*?)^\1```$/gm)) {
    const indent = m[1]!.length;
    snippets.push({ line: readme.slice(0, m.index).split('\n').length + 1, code: m[2]!.split('\n').map((l) => l.slice(indent)).join('\n') });
  }
  tt.ok(snippets.length >= 4, `${snippets.length} TypeScript snippets in README.md`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'readme-ts-'));
  fs.mkdirSync(path.join(dir, 'node_modules', '@types'), { recursive: true });
  fs.symlinkSync(root, path.join(dir, 'node_modules', 'lora-native'), 'dir');
  fs.symlinkSync(path.join(root, 'node_modules', '@types', 'node'), path.join(dir, 'node_modules', '@types', 'node'), 'dir');
  const files = snippets.map((s, i) => {
    const f = `snippet${i}.mts`;
    fs.writeFileSync(path.join(dir, f), s.code);
    return f;
  });
  fs.writeFileSync(path.join(dir, 'canary.mts'), "import { tensor } from 'lora-native';\nconst n: number = tensor([1], [1]);\n");
  fs.writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { strict: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', noEmit: true, skipLibCheck: true, types: ['node'] },
    files: [...files, 'canary.mts'],
  }));
  const r = spawnSync(process.execPath, [path.join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', dir], { cwd: dir, encoding: 'utf8', timeout: 240_000 });
  const errors = `${r.stdout}${r.stderr}`.split('\n').filter((l) => /error TS/.test(l));
  tt.match(errors.filter((l) => l.startsWith('canary.mts')).join('\n'), /canary\.mts\(2,7\): error TS2322: Type 'Tensor' is not assignable to type 'number'/, 'the canary error is found (tsc really checks)');
  for (const [i, s] of snippets.entries()) {
    const mine = errors.filter((l) => l.startsWith(`snippet${i}.mts`));
    // tsc reports snippet-relative lines; shift them to README.md lines
    tt.same(mine.map((l) => l.replace(/^snippet\d+\.mts\((\d+),/, (_, n: string) => `README.md(${Number(n) + s.line - 1},`)), [], `the snippet at README.md line ${s.line} compiles`);
  }
  fs.rmSync(dir, { recursive: true, force: true });
  tt.end();
});
