// `lora-native export` in a child process (node bin/lora-native.js over dist/): each target
// written and read back (GGUF through @huggingface/gguf, MLX and merged safetensors through our
// reader against float64 references), and failures that print one line and exit non-zero.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { gguf } from '@huggingface/gguf';
import t from 'tap';

import { loadPeftAdapter, loadSafetensors, saveSafetensors, tensor, Tensor } from '../lib/index';
import { assertClose, f32, randomData } from './helpers';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'lora-native.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cli-export-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const built = fs.existsSync(path.join(root, 'dist', 'lib', 'cli.js'));
const skip = built ? false : 'dist/ is missing: run npm run build first';

function run(...args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const keep: Tensor[] = [];
t.teardown(() => keep.forEach((x) => x.dispose()));
const mk = (d: Float64Array, shape: number[]) => {
  const x = tensor(Float32Array.from(d), shape);
  keep.push(x);
  return x;
};

// a 1-layer Llama-shaped base (hidden 8, 2 heads) with config and tokenizer files, and an adapter on q_proj
const model = path.join(dir, 'model');
fs.mkdirSync(model);
fs.writeFileSync(path.join(model, 'config.json'), JSON.stringify({ architectures: ['LlamaForCausalLM'], num_attention_heads: 2, num_hidden_layers: 1, hidden_size: 8 }));
fs.writeFileSync(path.join(model, 'tokenizer.json'), '{"model": {}}');
fs.writeFileSync(path.join(model, 'tokenizer_config.json'), '{}');
const W = f32(randomData(8 * 8, 1));
saveSafetensors(path.join(model, 'model.safetensors'), {
  'model.layers.0.self_attn.q_proj.weight': mk(W, [8, 8]),
  'model.norm.weight': mk(f32(randomData(8, 2)), [8]),
}, { metadata: { format: 'pt' } });
const A = f32(randomData(2 * 8, 3));
const B = f32(randomData(8 * 2, 4));
const adapter = path.join(dir, 'adapter');
fs.mkdirSync(adapter);
fs.writeFileSync(path.join(adapter, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 2, lora_alpha: 4, target_modules: ['q_proj'] }));
saveSafetensors(path.join(adapter, 'adapter_model.safetensors'), {
  'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': mk(A, [2, 8]),
  'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight': mk(B, [8, 2]),
});

t.test('export --to gguf / mlx / peft / merged', { skip }, async (t) => {
  const g = path.join(dir, 'a.gguf');
  let r = run('export', '--adapter', adapter, '--model', model, '--to', 'gguf', '--out', g);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^wrote .*a\.gguf: GGUF LoRA adapter for llama\.cpp \(llama, 2 tensors, alpha 4, 1 q\/k modules permuted\)\n$/);
  const parsed = await gguf(g, { allowLocalFile: true });
  t.same([parsed.metadata['general.type'], parsed.metadata['adapter.type'], parsed.tensorInfos.map((x) => x.name)],
    ['adapter', 'lora', ['blk.0.attn_q.weight.lora_a', 'blk.0.attn_q.weight.lora_b']]);

  const m = path.join(dir, 'mlx');
  r = run('export', '--adapter', adapter, '--model', model, '--to', 'mlx', '--out', m);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /mlx-lm adapter \(lora, llama, rank 2, scale 2, last 1 layers, keys self_attn\.q_proj\)/);
  const { tensors } = loadSafetensors(path.join(m, 'adapters.safetensors'));
  t.same([...tensors.keys()].sort(), ['model.layers.0.self_attn.q_proj.lora_a', 'model.layers.0.self_attn.q_proj.lora_b']);
  for (const x of tensors.values()) x.dispose();

  const p = path.join(dir, 'peft');
  r = run('export', '--adapter', adapter, '--model', model, '--to', 'peft', '--out', p);
  t.equal(r.code, 0, r.err);
  const back = loadPeftAdapter(p);
  t.same(Array.from(back.modules.get('model.layers.0.self_attn.q_proj')!.loraB.toFloat32Array()), Array.from(Float32Array.from(B)));
  back.dispose();

  const merged = path.join(dir, 'merged');
  r = run('export', '--adapter', adapter, '--model', model, '--to', 'merged', '--out', merged);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /copied beside it from the base: config\.json, tokenizer\.json, tokenizer_config\.json\n/);
  t.same(fs.readdirSync(merged).sort(), ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
  const mt = loadSafetensors(path.join(merged, 'model.safetensors')).tensors;
  const expected = new Float64Array(64);
  for (let i = 0; i < 8; i++) for (let j = 0; j < 8; j++) {
    let d = 0;
    for (let k = 0; k < 2; k++) d += B[i * 2 + k]! * A[k * 8 + j]!;
    expected[i * 8 + j] = W[i * 8 + j]! + 2 * d;
  }
  assertClose(t, mt.get('model.layers.0.self_attn.q_proj.weight')!.toFloat32Array(), expected, { atol: 1e-6, rtol: 1e-6 }, 'W + (alpha/r)·B·A');
  for (const x of mt.values()) x.dispose();
});

t.test('export failures: one line, non-zero exit, nothing written', { skip }, (t) => {
  const out = path.join(dir, 'never.gguf');
  const cases: [string[], number, RegExp][] = [
    [['export', '--adapter', adapter, '--model', model, '--to', 'onnx', '--out', out], 2, /^lora-native: --to must be peft, gguf, mlx or merged but is 'onnx'\n/],
    [['export', '--adapter', adapter, '--model', model, '--out', out], 2, /^lora-native: missing --to\n/],
    [['export', '--adapter', adapter, '--model', path.join(dir, 'nope'), '--to', 'gguf', '--out', out], 1, /^lora-native: Could not find the model folder .*nope \[ERR_LORA_IO\]\n$/],
    [['export', '--adapter', path.join(dir, 'nope'), '--model', model, '--to', 'gguf', '--out', out], 1, /^lora-native: Could not read .*adapter_config\.json.*\[ERR_LORA_IO\]\n$/],
  ];
  for (const [args, code, re] of cases) {
    const r = run(...args);
    t.equal(r.code, code, args.join(' '));
    t.match(r.err, re);
  }
  const falcon = path.join(dir, 'falcon');
  fs.mkdirSync(falcon);
  fs.writeFileSync(path.join(falcon, 'config.json'), JSON.stringify({ architectures: ['FalconForCausalLM'] }));
  const r = run('export', '--adapter', adapter, '--model', falcon, '--to', 'mlx', '--out', path.join(dir, 'never-mlx'));
  t.equal(r.code, 1);
  t.match(r.err, /^lora-native: Cannot export adapters for FalconForCausalLM .*supported: LlamaForCausalLM, .*GPT2LMHeadModel \[ERR_LORA_UNSUPPORTED\]\n$/);
  t.notOk(fs.existsSync(out));
  t.notOk(fs.existsSync(path.join(dir, 'never-mlx')));
  t.end();
});
