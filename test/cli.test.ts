// The lora-native command end to end in a child process (node bin/lora-native.js over dist/, which
// `npm run build` makes): merge against a dense float64 merge, inspect, combine, and failures that
// print one line, exit non-zero and write nothing.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { loadPeftAdapter, loadSafetensors, saveSafetensors, tensor, Tensor } from '../lib/index';
import { assertClose, f32, randomData } from './helpers';
import { addRef, deltaRef } from './ref/merge_ref';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'lora-native.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cli-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

function run(...args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const built = fs.existsSync(path.join(root, 'dist', 'lib', 'cli.js'));
const skip = built ? false : 'dist/ is missing: run npm run build first';

let seed = 500;
const data = (n: number) => f32(randomData(n, seed++));
const keep: Tensor[] = [];
const mk = (d: Float64Array, shape: number[], dtype: 'float32' | 'bfloat16' = 'float32') => {
  const x = tensor(Float32Array.from(d), shape, { dtype });
  keep.push(x);
  return x;
};
t.teardown(() => keep.forEach((x) => x.dispose()));

// fixtures: a base model and two PEFT adapters
const W = data(12 * 10);
const baseFile = path.join(dir, 'model.safetensors');
saveSafetensors(baseFile, {
  'model.layers.0.q_proj.weight': mk(W, [12, 10]),
  'model.layers.0.k_proj.weight': mk(data(8 * 10), [8, 10], 'bfloat16'),
  'model.norm.weight': mk(data(10), [10]),
  position_ids: { dtype: 'I64', shape: [3], data: new Uint8Array(new BigInt64Array([0n, 1n, 2n]).buffer) },
}, { metadata: { format: 'pt' } });
const adapters: Record<string, { A: Float64Array; B: Float64Array; R: number; s: number }> = {};
for (const [name, R, alpha] of [['a', 3, 6], ['b', 2, 2]] as const) {
  const d = path.join(dir, name);
  fs.mkdirSync(d);
  const A = data(R * 10);
  const B = data(12 * R);
  adapters[name] = { A, B, R, s: alpha / R };
  fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: R, lora_alpha: alpha, target_modules: ['q_proj'] }));
  saveSafetensors(path.join(d, 'adapter_model.safetensors'), {
    'base_model.model.model.layers.0.q_proj.lora_A.weight': mk(A, [R, 10]),
    'base_model.model.model.layers.0.q_proj.lora_B.weight': mk(B, [12, R]),
  });
}

t.test('merge writes every tensor, the adapted one merged, and prints the error report', { skip }, (t) => {
  const out = path.join(dir, 'merged.safetensors');
  const r = run('merge', '--base', baseFile, '--adapter', path.join(dir, 'a'), '--out', out, '--scale', '0.5');
  t.equal(r.code, 0, r.err);
  t.match(r.out, /wrote .*merged\.safetensors: 4 tensors, 1 merged \(scale 0\.5\)/);
  t.match(r.out, /model\.layers\.0\.q_proj\.weight\s+float32\s+\S+e-\d+/);
  t.match(r.err, /merged model\.layers\.0\.q_proj\.weight \(1\/4\)/, 'plain progress lines off a TTY');
  const { tensors } = loadSafetensors(out);
  const { tensors: orig } = loadSafetensors(baseFile);
  const a = adapters.a!;
  assertClose(t, Float64Array.from(tensors.get('model.layers.0.q_proj.weight')!.toFloat32Array()), addRef(W, deltaRef(a.A, a.B, 12, a.R, 10, a.s * 0.5)), { atol: 1e-5, rtol: 1e-5 }, 'merged like the dense reference');
  for (const k of ['model.layers.0.k_proj.weight', 'model.norm.weight', 'position_ids'])
    t.same(Buffer.from(tensors.get(k)!.toBytes()), Buffer.from(orig.get(k)!.toBytes()), `${k} copied byte for byte`);
  const raw = fs.readFileSync(out);
  t.match(raw.subarray(8, 8 + Number(raw.readBigUInt64LE(0))).toString(), /"position_ids":\{"dtype":"I64"/, 'I64 kept as I64');
  for (const x of [...tensors.values(), ...orig.values()]) x.dispose();

  const out16 = path.join(dir, 'merged-bf16.safetensors');
  const r2 = run('merge', '--base', baseFile, '--adapter', path.join(dir, 'a'), '--out', out16, '--dtype', 'bf16');
  t.equal(r2.code, 0, r2.err);
  const { tensors: t16 } = loadSafetensors(out16);
  t.same(['model.layers.0.q_proj.weight', 'model.norm.weight', 'position_ids'].map((k) => t16.get(k)!.dtype), ['bfloat16', 'bfloat16', 'int32']);
  t.match(r2.out, /q_proj\.weight\s+bfloat16/);
  for (const x of t16.values()) x.dispose();
  t.end();
});

t.test('inspect a model and an adapter', { skip }, (t) => {
  const m = run('inspect', baseFile);
  t.equal(m.code, 0, m.err);
  t.match(m.out, /model\.layers\.0\.k_proj\.weight\s+BF16\s+\[8, 10\]\s+160 B/);
  t.match(m.out, /4 tensors, 213 parameters/);
  const a = run('inspect', path.join(dir, 'a'));
  t.equal(a.code, 0, a.err);
  t.match(a.out, /r 3, lora_alpha 6, use_rslora false/);
  t.match(a.out, /model\.layers\.0\.q_proj\s+linear\s+3\s+6\s+2\s+\[3, 10\] float32\s+\[12, 3\] float32\s+-\s+66/);
  t.match(a.out, /1 modules, 66 LoRA parameters/);
  t.end();
});

t.test('combine writes a PEFT adapter equal to the weighted sum', { skip }, (t) => {
  const out = path.join(dir, 'ab');
  const r = run('combine', '--adapter', path.join(dir, 'a'), '--adapter', path.join(dir, 'b'), '--weights', '0.7,0.3', '--mode', 'cat', '--out', out);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /cat combination of 2 adapters, 1 modules, rank 5, scaling 1/);
  const ad = loadPeftAdapter(out);
  const m = ad.modules.get('model.layers.0.q_proj')!;
  const got = deltaRef(Float64Array.from(m.loraA.toFloat32Array()), Float64Array.from(m.loraB.toFloat32Array()), 12, m.rank, 10, m.scaling);
  const { a, b } = adapters as Required<typeof adapters>;
  assertClose(t, got, addRef(deltaRef(a.A, a.B, 12, 3, 10, 0.7 * a.s), deltaRef(b.A, b.B, 12, 2, 10, 0.3 * b.s)), { atol: 1e-6, rtol: 1e-5 }, 'combined delta');
  ad.dispose();
  t.end();
});

t.test('failures: one line on stderr, non-zero exit, nothing written', { skip }, (t) => {
  const out = path.join(dir, 'never.safetensors');
  const bad = path.join(dir, 'broken.safetensors');
  fs.writeFileSync(bad, Buffer.from([1, 2, 3]));
  const cases: [string[], number, RegExp][] = [
    [['merge', '--base', bad, '--adapter', path.join(dir, 'a'), '--out', out], 1, /^lora-native: Invalid safetensors file .*broken\.safetensors: the file is 3 bytes.* \[ERR_LORA_FORMAT\]\n$/],
    [['merge', '--base', baseFile, '--adapter', path.join(dir, 'nope'), '--out', out], 1, /^lora-native: Could not read .*adapter_config\.json.*\[ERR_LORA_IO\]\n$/],
    [['merge', '--base', baseFile, '--out', out], 2, /^lora-native: missing --adapter\n/],
    [['merge', '--base', baseFile, '--adapter', path.join(dir, 'a'), '--out', out, '--dtype', 'f8'], 2, /--dtype must be f32, bf16 or f16 but is 'f8'/],
    [['combine', '--adapter', path.join(dir, 'a'), '--weights', '1,2', '--mode', 'cat', '--out', path.join(dir, 'c')], 2, /--weights has 2 values for 1 adapters/],
    [['frobnicate'], 2, /unknown command 'frobnicate'/],
  ];
  for (const [args, code, msg] of cases) {
    const r = run(...args);
    t.equal(r.code, code, `${args[0]} exits ${code}`);
    t.match(r.err, msg, r.err);
    t.notMatch(r.err, /\n\s+at /, 'no stack trace');
  }
  t.notOk(fs.existsSync(out), 'no output file');
  t.notOk(fs.existsSync(path.join(dir, 'c')), 'no output folder');
  t.same(fs.readdirSync(dir).filter((f) => f.includes('.tmp')), [], 'no temp files');
  t.end();
});

t.test('--out: folders are created, an existing folder is refused first, the base\'s config and tokenizer files are copied', { skip }, (t) => {
  const hf = path.join(dir, 'hf-base');
  fs.mkdirSync(hf);
  fs.copyFileSync(baseFile, path.join(hf, 'model.safetensors'));
  const extras = { 'config.json': '{"model_type":"llama"}', 'tokenizer.json': '{"version":"1.0"}', 'tokenizer_config.json': '{}', 'generation_config.json': '{}', 'README.md': 'not copied' };
  for (const [f, text] of Object.entries(extras)) fs.writeFileSync(path.join(hf, f), text);
  const out = path.join(dir, 'new', 'nested', 'merged.safetensors');
  const r = run('merge', '--base', hf, '--adapter', path.join(dir, 'a'), '--out', out);
  t.equal(r.code, 0, r.err);
  t.ok(fs.existsSync(out), 'the missing folders were created');
  t.same(fs.readdirSync(path.dirname(out)).sort(), ['config.json', 'generation_config.json', 'merged.safetensors', 'tokenizer.json', 'tokenizer_config.json'], 'config and tokenizer files beside the merged file, nothing else');
  t.equal(fs.readFileSync(path.join(path.dirname(out), 'config.json'), 'utf8'), extras['config.json']);
  t.match(r.out, /copied beside it from the base: config\.json, generation_config\.json, tokenizer\.json, tokenizer_config\.json\n/);
  // refused before any work: the adapter path is wrong too, but --out is what is reported
  const r2 = run('merge', '--base', hf, '--adapter', path.join(dir, 'nope'), '--out', hf);
  t.equal(r2.code, 2);
  t.match(r2.err, `lora-native: --out ${hf} is an existing folder; give the file to write, e.g. ${path.join(hf, 'model.safetensors')}\n`);
  const comb = path.join(dir, 'new', 'combined', 'ab');
  const r3 = run('combine', '--adapter', path.join(dir, 'a'), '--adapter', path.join(dir, 'b'), '--weights', '1,1', '--mode', 'cat', '--out', comb);
  t.equal(r3.code, 0, r3.err);
  t.same(fs.readdirSync(comb).sort(), ['adapter_config.json', 'adapter_model.safetensors'], 'combine creates its folder');
  const r4 = run('combine', '--adapter', path.join(dir, 'nope'), '--weights', '1', '--mode', 'cat', '--out', comb);
  t.equal(r4.code, 2);
  t.match(r4.err, `lora-native: --out ${comb} is a folder that is not empty; give a new or empty folder\n`);
  const empty = path.join(dir, 'empty-out');
  fs.mkdirSync(empty);
  t.equal(run('combine', '--adapter', path.join(dir, 'a'), '--weights', '1', '--mode', 'cat', '--out', empty).code, 0, 'an empty folder is fine');
  t.ok(fs.existsSync(path.join(empty, 'adapter_config.json')));
  t.end();
});

t.test('messages name the command\'s flags: the NaN refusal says --unsafe', { skip }, (t) => {
  const nan = path.join(dir, 'nan-adapter');
  fs.mkdirSync(nan);
  fs.writeFileSync(path.join(nan, 'adapter_config.json'), JSON.stringify({ peft_type: 'LORA', r: 1, lora_alpha: 1, target_modules: ['q_proj'] }));
  saveSafetensors(path.join(nan, 'adapter_model.safetensors'), {
    'base_model.model.model.layers.0.q_proj.lora_A.weight': mk(new Float64Array(10).fill(NaN), [1, 10]),
    'base_model.model.model.layers.0.q_proj.lora_B.weight': mk(new Float64Array(12).fill(1), [12, 1]),
  });
  const out = path.join(dir, 'nan-merged.safetensors');
  const r = run('merge', '--base', baseFile, '--adapter', nan, '--out', out);
  t.equal(r.code, 1);
  t.match(r.err, /^lora-native: Refusing to merge 'model\.layers\.0\.q_proj\.weight': element 0 is NaN in float32 .*pass --unsafe to merge anyway\) \[ERR_LORA_NON_FINITE\]\n$/);
  t.notMatch(r.err, /safeMerge/, 'not the API\'s option name');
  t.notOk(fs.existsSync(out), 'nothing written');
  t.equal(run('merge', '--base', baseFile, '--adapter', nan, '--out', out, '--unsafe', '--probe-rows', '0').code, 0, '--unsafe merges anyway');
  t.end();
});

t.test('every flag is in --help and in the README', { skip }, (t) => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { FLAGS } = require(path.join(root, 'dist', 'lib', 'cli.js')) as { FLAGS: Record<string, Record<string, unknown>> };
  const help = run('--help').out;
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Command line'), readme.indexOf('\n## ', readme.indexOf('## Command line') + 5));
  for (const [cmd, flags] of Object.entries(FLAGS)) {
    t.match(help, `lora-native ${cmd}`, `--help shows ${cmd}`);
    t.match(section, `lora-native ${cmd}`, `README shows ${cmd}`);
    for (const f of Object.keys(flags)) {
      t.match(help, `--${f}`, `--help lists ${cmd} --${f}`);
      t.match(section, `--${f}`, `README's Command line section lists ${cmd} --${f}`);
    }
  }
  t.end();
});

t.test('a reader that stops early (inspect | head) ends the command quietly', { skip }, (t) => {
  const many = path.join(dir, 'many.safetensors');
  const z = mk(new Float64Array(2), [2]);
  saveSafetensors(many, Object.fromEntries(Array.from({ length: 4000 }, (_, i) => [`model.layers.${i}.a_long_enough_tensor_name.weight`, z])));
  const r = spawnSync('bash', ['-c', `"${process.execPath}" "${bin}" inspect "${many}" | head -n 1; echo "status \${PIPESTATUS[0]}" >&2`], { encoding: 'utf8' });
  t.equal(r.stdout, `${many}\n`, 'head got its line');
  t.equal(r.stderr, 'status 0\n', 'no EPIPE stack trace, exit status 0');
  t.end();
});

// bench/gpu/peft_interop.{py,js} run on the GPU machine, where PEFT is; here (no torch) their
// lora-native half and the numpy comparison run on a folder laid out as `make` lays it out, with
// lora-native's own merge standing in for PEFT's, so the scripts cannot rot unseen.
const numpy = spawnSync('python3', ['-c', 'import numpy'], { encoding: 'utf8' }).status === 0;
t.test('the PEFT interop scripts of the GPU check run', { skip: skip || (numpy ? false : 'python3 with numpy is needed') }, (t) => {
  const d = path.join(dir, 'interop');
  fs.mkdirSync(path.join(d, 'adapters'), { recursive: true });
  fs.copyFileSync(path.join(dir, 'model.safetensors'), path.join(d, 'base.safetensors'));
  fs.cpSync(path.join(dir, 'a'), path.join(d, 'adapters', 'plain'), { recursive: true });
  const node = spawnSync(process.execPath, [path.join(root, 'bench', 'gpu', 'peft_interop.js'), d], { encoding: 'utf8' });
  t.equal(node.status, 0, `peft_interop.js: ${node.stdout.trim().split('\n').join('; ')}`);
  t.ok(fs.existsSync(path.join(d, 'ours_merged', 'plain.safetensors')), 'merged with the CLI');
  t.ok(fs.existsSync(path.join(d, 'roundtrip', 'plain', 'adapter_config.json')), 're-saved');
  fs.mkdirSync(path.join(d, 'peft_merged'));
  fs.mkdirSync(path.join(d, 'rt_peft_merged'));
  fs.copyFileSync(path.join(d, 'ours_merged', 'plain.safetensors'), path.join(d, 'peft_merged', 'plain.safetensors'));
  t.equal(run('merge', '--base', path.join(d, 'base.safetensors'), '--adapter', path.join(d, 'roundtrip', 'plain'),
    '--out', path.join(d, 'rt_peft_merged', 'plain.safetensors')).code, 0, 'the re-saved adapter merges');
  const cmp = spawnSync('python3', [path.join(root, 'bench', 'gpu', 'peft_interop.py'), 'compare', d], { encoding: 'utf8' });
  t.match(cmp.stdout, /^\| plain \| 0\.0e\+00 \| 0\.0e\+00 \| yes \|$/m, 'compare reads both files and finds them equal');
  t.match(cmp.stdout, /^\| dora \| – \| – \| NO \(PEFT made nothing\) \|$/m, 'and reports the cases PEFT did not make');
  t.equal(cmp.status, 1, 'exit 1 while any case is missing');
  t.end();
});
