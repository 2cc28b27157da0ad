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

t.test('demo.ts --quick: the table, the SVG and the PEFT adapter', (tt) => {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'demo-test-'));
  const r = runExample('demo.ts', ['--quick', '--out', out]);
  tt.equal(r.code, 0, r.out);
  tt.match(r.out, /\| trainable params +\| \d+ \(\d+\.\d%\) +\| \d+ \(100\.0%\)/);
  tt.match(r.out, /\| task B acc before -> after/);
  tt.match(r.out, /\| saved size/);
  tt.ok(fs.readFileSync(path.join(out, 'loss_curves.svg'), 'utf8').startsWith('<svg'), 'an SVG plot');
  tt.same(fs.readdirSync(path.join(out, 'lora-adapter')).sort(), ['adapter_config.json', 'adapter_model.safetensors']);
  const res = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8'));
  tt.equal(res.losses.lora.length, res.steps.adapt);
  tt.notMatch(r.out, /tensors still live/);
  fs.rmSync(out, { recursive: true, force: true });
  tt.end();
});
