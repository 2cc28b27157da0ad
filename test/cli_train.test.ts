// `lora-native train` in a child process (node bin/lora-native.js over dist/) on a random Llama in
// Hugging Face format with GPT-2's real tokenizer: the files it writes (a PEFT adapter that
// loadLoraAdapter reads and that changes generation, checkpoint, log, loss curve), a YAML/JSON
// config under the flags, resume onto the same weights, SIGINT, and flag/config/data errors.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import t from 'tap';

import { applyLora, loadCausalLM, loadLoraAdapter, loadSafetensors, loadTokenizer } from '../lib/index';
import { tinyLlama } from './hf_checkpoint';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'lora-native.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cli-train-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const built = fs.existsSync(path.join(root, 'dist', 'lib', 'cli_train.js'));
const skip = built ? false : 'dist/ is missing: run npm run build first';

function run(...args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const model = tinyLlama(path.join(dir, 'model'), { max_position_embeddings: 128 });
const data = path.join(dir, 'data');
fs.mkdirSync(data);
const rows = Array.from({ length: 16 }, (_, i) => JSON.stringify({ prompt: `What comes after ${i}?`, completion: ` ${i + 1}, then ${i + 2}.` }));
fs.writeFileSync(path.join(data, 'train.jsonl'), rows.join('\n') + '\n');
fs.writeFileSync(path.join(data, 'valid.jsonl'), rows.slice(0, 3).join('\n') + '\n');
const common = ['--model', model, '--data', data, '--rank', '4', '--alpha', '8', '--batch-size', '4', '--max-seq-len', '32', '--seed', '1'];
let n = 0;
const outDir = () => path.join(dir, `out${n++}`);

interface LogRecord { type: string; step: number; loss: number; lr?: number; tokens?: number; tokensPerSecond?: number; perplexity?: number }
const readLog = (out: string) => fs.readFileSync(path.join(out, 'log.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as LogRecord);

t.test('train writes an adapter that loads and changes generation, a checkpoint, a log and a loss curve', { skip }, async (t) => {
  const out = outDir();
  const r = run('train', ...common, '--out', out, '--iters', '8', '--lr', '5e-2', '--target', 'q_proj,v_proj,down_proj', '--val-every', '4', '--val-batches', '1', '--save-every', '3', '--packing');
  t.equal(r.code, 0, r.err);
  t.match(r.out, /^data: train\.jsonl: 16 rows \(completion\), \d+ tokens, \d+ trained; valid\.jsonl: 3 rows/);
  t.match(r.out, /\ntrained 8 steps in [\d.]+ s; final loss [\d.]+, valid loss [\d.]+ \(perplexity [\d.e+]+\)\n/);
  for (const [what, file] of [['adapter', out], ['checkpoint', path.join(out, 'checkpoint', 'checkpoint.safetensors')], ['log', path.join(out, 'log.jsonl')], ['loss curve', path.join(out, 'loss.svg')]]) {
    t.match(r.out, `${what}:`.padEnd(12) + file, `prints where the ${what} is`);
    t.ok(fs.existsSync(file), `${file} exists`);
  }
  t.match(r.err, /step \d\/8 {2}loss [\d.]+ {2}lr 5\.00e-2 {2}.* tok\/s {2}ETA /, 'progress lines with tokens/s and ETA');
  const cfg = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  t.equal(cfg.base_model_name_or_path, path.resolve(model));
  t.same([cfg.r, cfg.lora_alpha, cfg.target_modules], [4, 8, ['q_proj', 'v_proj', 'down_proj']]);
  const log = readLog(out);
  t.same(log.filter((x) => x.type === 'train').map((x) => x.step), [1, 2, 3, 4, 5, 6, 7, 8], 'a record per step');
  t.same(log.filter((x) => x.type === 'eval').map((x) => x.step), [4, 8], 'and per evaluation');
  for (const x of log.filter((y) => y.type === 'train')) t.ok(x.lr === 0.05 && x.tokens! > 0 && x.tokensPerSecond! > 0 && Number.isFinite(x.loss), `step ${x.step}: lr, tokens, tokens/s, loss`);
  const svg = fs.readFileSync(path.join(out, 'loss.svg'), 'utf8');
  t.match(svg, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
  t.equal((svg.match(/<polyline class="train"[^>]* points="([^"]+)"/)![1]!).split(' ').length, 8, 'the train curve has a point per step');
  t.equal((svg.match(/<circle class="valid"/g) ?? []).length, 2, 'a point per evaluation');

  // the adapter loads onto a fresh copy of the base and changes what it generates
  const tok = loadTokenizer(model);
  const prompt = tok.encode('What comes after 3?');
  const base = await loadCausalLM(model);
  const before = await base.generate(prompt, { maxNewTokens: 6 });
  applyLora(base, { targetModules: ['q_proj', 'v_proj', 'down_proj'], rank: 4 });
  t.equal(loadLoraAdapter(base, out).length, 6, 'every adapted module (2 layers x 3) loaded');
  const after = await base.generate(prompt, { maxNewTokens: 6 });
  t.notSame(after, before, `generation changes (${JSON.stringify(before)} -> ${JSON.stringify(after)})`);
  base.dispose();
});

t.test('a config file (YAML or JSON) whose keys are the flags; flags win', { skip }, (t) => {
  const yamlFile = path.join(dir, 'train.yaml');
  fs.writeFileSync(yamlFile, `model: ${model}\ndata: ${data}\nrank: 2\nalpha: 4\ntarget:\n  - q_proj\n  - k_proj\niters: 50\nbatch-size: 4\nmax-seq-len: 32\nmask-prompt: false\nlora-plus-ratio: 4\n`);
  const out = outDir();
  const r = run('train', '--config', yamlFile, '--out', out, '--iters', '2');
  t.equal(r.code, 0, r.err);
  t.match(r.out, /trained 2 steps/, '--iters 2 overrides the file\'s 50');
  const cfg = JSON.parse(fs.readFileSync(path.join(out, 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  t.same([cfg.r, cfg.lora_alpha, cfg.target_modules], [2, 4, ['q_proj', 'k_proj']], 'rank, alpha and target from the file');
  const jsonFile = path.join(dir, 'train.json');
  fs.writeFileSync(jsonFile, JSON.stringify({ model, data, iters: 1, rank: 3, target: 'all-linear', 'max-seq-len': 32, 'matmul-precision': 'bf16' }));
  const out2 = outDir();
  const r2 = run('train', '--config', jsonFile, '--out', out2);
  t.equal(r2.code, 0, r2.err);
  t.same(JSON.parse(fs.readFileSync(path.join(out2, 'adapter_config.json'), 'utf8')).target_modules, 'all-linear');

  const bad = (name: string, text: string, msg: RegExp) => {
    const f = path.join(dir, name);
    fs.writeFileSync(f, text);
    const o = outDir();
    const x = run('train', '--config', f, '--out', o);
    t.equal(x.code, 1, name);
    t.match(x.err, msg, name);
    t.notOk(fs.existsSync(o), `${name}: nothing written`);
  };
  bad('typo.yaml', `model: ${model}\ndata: ${data}\nbatch_size: 4\n`, /^lora-native: Unknown option 'batch_size' for the config file .*typo\.yaml \(its keys are train's long flag names\); did you mean 'batch-size'\? \[ERR_LORA_OPTION\]\n$/);
  bad('types.yaml', `model: ${model}\ndata: ${data}\npacking: 1\n`, /^lora-native: Expected true or false for 'packing' in the config file .*types\.yaml but found 1 \[ERR_LORA_FORMAT\]\n$/);
  bad('list.yaml', '- a\n- b\n', /^lora-native: Expected the config file .*list\.yaml to hold a mapping of flag names to values \[ERR_LORA_FORMAT\]\n$/);
  bad('broken.json', '{"model": ', /^lora-native: Could not parse the config file .*broken\.json: .* \[ERR_LORA_FORMAT\]\n$/);
  t.end();
});

t.test('--resume continues onto the weights an uninterrupted run ends with', { skip }, (t) => {
  const args = [...common, '--iters', '6', '--save-every', '2', '--lr', '1e-2', '--dropout', '0.1', '--grad-accum', '2'];
  const full = outDir();
  t.equal(run('train', ...args, '--out', full).code, 0);
  // a first run of 3 steps, continued in the same folder to 6
  const part = outDir();
  t.equal(run('train', ...common, '--iters', '3', '--save-every', '2', '--lr', '1e-2', '--dropout', '0.1', '--grad-accum', '2', '--out', part).code, 0);
  const r = run('train', ...args, '--out', part, '--resume', part);
  t.equal(r.code, 0, r.err);
  t.match(r.err, /resumed from .*checkpoint\.safetensors at step 3 of 6 \(3 steps left\); options that differ from the checkpoint's: steps 6 \(checkpoint: 3\)/);
  t.match(r.out, /trained 3 steps \(resumed at step 3\)/);
  const weights = (o: string) => fs.readFileSync(path.join(o, 'adapter_model.safetensors'));
  t.ok(weights(part).equals(weights(full)), 'adapter bit-identical to the uninterrupted run');
  // (the first run also evaluated at its last step, 3)
  const strip = (log: LogRecord[]) => log.filter((x) => x.type === 'train').map(({ tokensPerSecond, ...x }) => ({ ...x, elapsed: 0, tokensPerSecond: tokensPerSecond! > 0 }));
  t.same(strip(readLog(part)), strip(readLog(full)), 'the log holds every step once, with the same losses');
  // into another folder: the checkpoint and log are carried over
  const other = outDir();
  const r2 = run('train', ...args, '--out', other, '--resume', full);
  t.equal(r2.code, 0, r2.err);
  t.match(r2.err, /nothing left to train/);
  t.ok(weights(other).equals(weights(full)), 'resuming a finished run into a new folder gives its adapter');
  t.end();
});

t.test('SIGINT stops after the step, writes adapter and checkpoint, exits 130', { skip }, async (t) => {
  const out = outDir();
  const child = spawn(process.execPath, [bin, 'train', ...common, '--out', out, '--iters', '100000', '--save-every', '100000'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  let stdout = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  const code = await new Promise<number | null>((resolve) => {
    child.stderr.on('data', (d: Buffer) => {
      const had = err;
      err += d.toString();
      if (!/step \d/.test(had) && /step \d/.test(err)) child.kill('SIGINT');
    });
    child.on('exit', (c) => resolve(c));
  });
  t.equal(code, 130, err);
  t.match(err, /lora-native: interrupted at step \d+; the adapter and checkpoint of that step are written \(continue with --resume /);
  t.match(stdout, /^stopped \d+ steps/m);
  t.ok(fs.existsSync(path.join(out, 'adapter_model.safetensors')));
  t.ok(fs.existsSync(path.join(out, 'checkpoint', 'checkpoint.safetensors')));
});

t.test('flag and data errors: one line, exit 2 (usage) or 1, nothing written', { skip }, (t) => {
  const usage = (args: string[], msg: RegExp, what: string) => {
    const o = outDir();
    const r = run('train', ...args, '--out', o);
    t.equal(r.code, 2, what);
    t.match(r.err, msg, what);
    t.match(r.err, /\nUsage:/, `${what}: the usage line`);
    t.notOk(fs.existsSync(o), `${what}: nothing written`);
  };
  usage(['--data', data], /^lora-native: missing --model\n/, 'no --model');
  usage([...common, '--epochs', '1', '--iters', '2'], /^lora-native: give --epochs or --iters, not both\n/, 'both lengths');
  usage([...common, '--rank', '0'], /^lora-native: --rank must be an integer >= 1 but is '0'\n/, 'rank 0');
  usage([...common, '--val-batches', '0'], /^lora-native: --val-batches must be an integer >= 1 but is '0'\n/, 'val-batches 0');
  usage([...common, '--lr', 'fast'], /^lora-native: --lr must be a number but is 'fast'\n/, 'lr not a number');
  usage([...common, '--dropout', '1'], /^lora-native: --dropout must be a number in \[0, 1\) but is '1'\n/, 'dropout 1');
  usage([...common, '--dtype', 'f8'], /^lora-native: --dtype must be f32, bf16 or f16 but is 'f8'\n/, 'dtype');
  usage([...common, '--device', 'tpu'], /^lora-native: --device must be cpu or cuda but is 'tpu'\n/, 'device');
  usage([...common, '--matmul-precision', 'tf32'], /^lora-native: --matmul-precision must be fp32 or bf16 but is 'tf32'\n/, 'matmul-precision');
  usage([...common, '--batchsize', '2'], /^lora-native: Unknown option '--batchsize'/, 'unknown flag');
  usage([...common, '--max-seq-len', '4096'], /^lora-native: --max-seq-len 4096 is longer than the model's max_position_embeddings 128; give at most 128/, 'longer than the positions');
  usage([...common, '--config', path.join(dir, 'x.toml')], /^lora-native: --config must name a \.yaml, \.yml or \.json file but is/, 'config type');

  const busy = outDir();
  fs.mkdirSync(busy);
  fs.writeFileSync(path.join(busy, 'keep.txt'), 'x');
  const r = run('train', ...common, '--out', busy);
  t.equal(r.code, 2);
  t.match(r.err, /--out .* is a folder that is not empty; give a new or empty folder, or --resume .* to continue its run/);
  t.same(fs.readdirSync(busy), ['keep.txt'], 'left as it was');
  const noCkpt = run('train', ...common, '--out', outDir(), '--resume', busy);
  t.equal(noCkpt.code, 1);
  t.match(noCkpt.err, /^lora-native: Found no checkpoint to resume in .* \(expected .*checkpoint\.safetensors, which train writes with --save-every\) \[ERR_LORA_IO\]\n$/);

  const badData = path.join(dir, 'bad.jsonl');
  fs.writeFileSync(badData, `${rows[0]}\n${rows[1]}\n{"prompt": "x", "completion": \n`);
  const o = outDir();
  const b = run('train', ...common, '--data', badData, '--out', o);
  t.equal(b.code, 1);
  t.match(b.err, /^lora-native: Invalid dataset row in .*bad\.jsonl line 3: not valid JSON .*\[ERR_LORA_FORMAT\]\n$/, 'names the file and line');
  t.notOk(fs.existsSync(o), 'nothing written');

  // DoRA and gradient checkpointing train and write a PEFT adapter (DoRA's magnitudes in it)
  for (const flag of ['--use-dora', '--grad-checkpoint']) {
    const d = outDir();
    const x = run('train', ...common, '--iters', '1', '--out', d, flag);
    t.equal(x.code, 0, `${flag} trains: ${x.err}`);
    t.ok(fs.existsSync(path.join(d, 'adapter_model.safetensors')), `${flag} writes the adapter`);
    const cfg = JSON.parse(fs.readFileSync(path.join(d, 'adapter_config.json'), 'utf8')) as { use_dora?: boolean };
    t.equal(cfg.use_dora ?? false, flag === '--use-dora', `${flag}: use_dora in adapter_config.json`);
    if (flag === '--use-dora') {
      const { tensors } = loadSafetensors(path.join(d, 'adapter_model.safetensors'));
      t.ok([...tensors.keys()].some((k) => k.endsWith('.lora_magnitude_vector')), 'the magnitudes are saved');
      for (const x of tensors.values()) x.dispose();
    }
  }
  t.end();
});
