// Files people trust us with (issue 17), through the `lora-native` command: a base rewritten during
// a merge, a catastrophic pattern in an adapter config (a child process with a timeout), Ctrl-C and
// SIGTERM mid-merge (no temp file left), lora_B.bias overflow, terminal escapes in what inspect
// prints, read-only and odd destinations, --out as a symlink, and merges of 2.2 / 4.5 GiB bases
// (LORA_NATIVE_BIG_TESTS=1). The library side is test/file_safety.test.ts.
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { Writable } from 'node:stream';

import t from 'tap';

import { loadSafetensors, readSafetensorsHeader, saveSafetensors, tensor, Tensor } from '../lib/index';
import { main } from '../lib/cli';
import { randomData } from './helpers';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'lora-native.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cli-safety-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const built = fs.existsSync(path.join(root, 'dist', 'lib', 'cli.js'));
const skip = built ? false : 'dist/ is missing: run npm run build first';

function run(args: string[], timeout = 120_000) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout });
  return { code: r.status, signal: r.signal, out: r.stdout, err: r.stderr };
}

const temps = (d: string) => fs.readdirSync(d).filter((f) => f.endsWith('.tmp'));

// `tensors` as PEFT names them under base_model.model.<module>; config as given.
function adapter(name: string, config: Record<string, unknown>, tensors: Record<string, Tensor>): string {
  const d = path.join(dir, name);
  fs.mkdirSync(d, { recursive: true });
  fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify(config));
  saveSafetensors(path.join(d, 'adapter_model.safetensors'), Object.fromEntries(Object.entries(tensors).map(([k, v]) => [`base_model.model.${k}`, v])));
  for (const v of Object.values(tensors)) v.dispose();
  return d;
}

const rand = (shape: number[], seed: number, scale = 1) => tensor(Float32Array.from(randomData(shape.reduce((a, b) => a * b, 1), seed, scale)), shape);

t.test('a catastrophic pattern in adapter_config.json cannot hang the process', { skip }, (t) => {
  // (a|aa)+$x against 60 a's took past 60 s with a backtracking engine
  const longA = 'a'.repeat(60);
  const longX = `${'x'.repeat(40)}y`;
  const d = adapter('hostile-pattern', { r: 2, lora_alpha: 2, target_modules: [longA, longX], alpha_pattern: { '(a|aa)+$x': 8, '(x+x+)+y': 4 } }, {
    [`${longA}.lora_A.weight`]: rand([2, 3], 1), [`${longA}.lora_B.weight`]: rand([4, 2], 2),
    [`${longX}.lora_A.weight`]: rand([2, 3], 3), [`${longX}.lora_B.weight`]: rand([4, 2], 4),
  });
  const started = Date.now();
  const r = run(['inspect', d], 60_000);
  t.equal(r.signal, null, `finished without being killed (${Date.now() - started} ms, limit 60 s)`);
  t.equal(r.code, 0, r.err);
  t.match(r.out, new RegExp(`${longA}\\s+linear\\s+2\\s+2\\s`), 'the pattern that cannot match leaves alpha at lora_alpha');
  t.match(r.out, new RegExp(`${longX}\\s+linear\\s+2\\s+4\\s`), 'the nested-quantifier pattern matches, in linear time, by PEFT\'s rule');
  const br = adapter('backref-pattern', { r: 2, lora_alpha: 2, rank_pattern: { '(a)\\1': 2 } }, { 'm.lora_A.weight': rand([2, 3], 5), 'm.lora_B.weight': rand([4, 2], 6) });
  const rb = run(['inspect', br], 30_000);
  t.equal(rb.code, 1);
  t.match(rb.err, /^lora-native: Invalid PEFT adapter .*adapter_config\.json: rank_pattern: Expected a regular expression without backreferences or lookaround for pattern key "\(a\)\\\\1" .* \[ERR_LORA_UNSUPPORTED\]\n$/, 'a backreference is refused with a clear error');
  const la = adapter('lookaround-pattern', { r: 2, lora_alpha: 2, target_modules: '(?=m).*' }, { 'm.lora_A.weight': rand([2, 3], 5), 'm.lora_B.weight': rand([4, 2], 6) });
  t.match(run(['inspect', la], 30_000).err, /target_modules: .*without backreferences or lookaround.* \[ERR_LORA_UNSUPPORTED\]/, 'and lookaround');
  t.end();
});

// A base of `n` adapted 256x256 modules and an adapter for all of them: a merge of a few seconds.
function slowMergeFixture(name: string, n: number): { base: string; ad: string } {
  const base = path.join(dir, `${name}.safetensors`);
  const ts: Record<string, Tensor> = {};
  const ad: Record<string, Tensor> = {};
  for (let i = 0; i < n; i++) {
    ts[`m.${i}.weight`] = rand([256, 256], 100 + i);
    ad[`m.${i}.lora_A.weight`] = rand([8, 256], 200 + i);
    ad[`m.${i}.lora_B.weight`] = rand([256, 8], 300 + i);
  }
  saveSafetensors(base, ts);
  for (const v of Object.values(ts)) v.dispose();
  return { base, ad: adapter(`${name}-adapter`, { r: 8, lora_alpha: 16, target_modules: ['m'] }, ad) };
}

// Runs a merge and sends `sig` once it has merged its first tensor (stopped meanwhile, so the
// signal lands mid-merge whatever the machine's speed).
function interrupt(args: string[], sig: NodeJS.Signals): Promise<{ code: number | null; signal: string | null; err: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    let sent = false;
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      err += s;
      if (!sent && /merged m\.0\.weight/.test(err)) {
        sent = true;
        child.kill('SIGSTOP');
        child.kill(sig);
        child.kill('SIGCONT');
      }
    });
    child.on('close', (code, signal) => resolve({ code, signal, err }));
  });
}

t.test('SIGINT and SIGTERM during a merge stop it, remove its temp file and leave --out as it was', { skip }, async (t) => {
  const { base, ad } = slowMergeFixture('slow', 40);
  const outDir = path.join(dir, 'interrupted');
  fs.mkdirSync(outDir);
  const out = path.join(outDir, 'merged.safetensors');
  const args = ['merge', '--base', base, '--adapter', ad, '--out', out, '--probe-rows', '64'];
  const a = await interrupt(args, 'SIGINT');
  t.equal(a.code, 130, `exit code 128 + SIGINT (stderr: ${a.err.split('\n').slice(-2).join(' | ')})`);
  t.match(a.err, /lora-native: interrupted by SIGINT; nothing was written and no partial output is left\n$/);
  t.notOk(/merged m\.39\.weight/.test(a.err), 'it stopped before the last tensor');
  t.same(fs.readdirSync(outDir), [], 'no output and no temp file');
  fs.writeFileSync(out, 'previous contents');
  const b = await interrupt(args, 'SIGTERM');
  t.equal(b.code, 143, 'exit code 128 + SIGTERM');
  t.equal(fs.readFileSync(out, 'utf8'), 'previous contents', 'an existing --out is left as it was');
  t.same(temps(outDir), [], 'no temp file');
  const c = run(args);
  t.equal(c.code, 0, `an uninterrupted run completes: ${c.err.slice(-300)}`);
  t.equal(readSafetensorsHeader(out).entries.length, 40);
  t.end();
});

// An in-process merge whose progress stream rewrites the base right after the first tensor.
function sink(onLine: (s: string) => void): NodeJS.WriteStream & { text: string } {
  const w = new Writable({ write(chunk, _enc, cb) { w.text += String(chunk); onLine(String(chunk)); cb(); } }) as unknown as NodeJS.WriteStream & { text: string };
  w.text = '';
  return w;
}

t.test('a base rewritten during the merge fails it (exit 1, nothing written) instead of mixing tensors', async (t) => {
  const base = path.join(dir, 'rewritten.safetensors');
  const write = (file: string, seed: number, note: string) => {
    const ts = { 'a.weight': rand([4, 3], seed), 'b.weight': rand([64, 64], seed + 1), 'c.weight': rand([64, 64], seed + 2) };
    saveSafetensors(file, ts, { metadata: { note } });
    for (const v of Object.values(ts)) v.dispose();
  };
  const side = path.join(dir, 'rewritten.next');
  const ad = adapter('rewrite-adapter', { r: 2, lora_alpha: 2, target_modules: ['a'] }, { 'a.lora_A.weight': rand([2, 3], 9), 'a.lora_B.weight': rand([4, 2], 10) });
  const cases: [string, () => void, RegExp][] = [
    ['rewritten in place, header 32 bytes longer', () => {
      write(side, 50, 'x'.repeat(32));
      fs.writeFileSync(base, fs.readFileSync(side)); // the same file, new bytes
    }, /its size went from/],
    ['replaced by a rename', () => {
      const tmp = path.join(dir, 'rewritten.new');
      fs.copyFileSync(base, tmp);
      fs.renameSync(tmp, base);
    }, /another file was moved to its path/],
  ];
  for (const [what, change, reason] of cases) {
    write(base, 40, '');
    const out = path.join(dir, 'rewritten-out.safetensors');
    let changed = false;
    const err = sink((s) => {
      if (!changed && /merged a\.weight/.test(s)) {
        changed = true;
        change();
      }
    });
    const stdout = sink(() => undefined);
    const code = await main(['merge', '--base', base, '--adapter', ad, '--out', out], stdout, err);
    t.ok(changed, `${what}: the base changed after the first tensor`);
    t.equal(code, 1, `${what}: exit code 1`);
    t.match(err.text, new RegExp(`lora-native: .*rewritten\\.safetensors changed while it was being read \\(${reason.source}.*\\[ERR_LORA_IO\\]\\n$`), `${what}: says so`);
    t.notOk(/worst relative error/.test(stdout.text), `${what}: no merge report`);
    t.notOk(fs.existsSync(out), `${what}: no output`);
    t.same(temps(dir), [], `${what}: no temp file`);
  }
  t.end();
});

t.test('lora_B.bias goes through the NaN/Inf refusal (f32 overflow, f16 rounding), --unsafe writes it', { skip }, (t) => {
  const base = path.join(dir, 'bias-base.safetensors');
  const W = rand([4, 3], 60);
  const b = tensor([3e38, 1, 2, 4e4], [4]);
  saveSafetensors(base, { 'l.weight': W, 'l.bias': b });
  W.dispose();
  b.dispose();
  const ad = adapter('bias-adapter', { r: 2, lora_alpha: 2, target_modules: ['l'], lora_bias: true }, {
    'l.lora_A.weight': rand([2, 3], 61), 'l.lora_B.weight': rand([4, 2], 62), 'l.lora_B.bias': tensor([3e38, 0, 0, 4e4], [4]),
  });
  const out = path.join(dir, 'bias-out.safetensors');
  const r = run(['merge', '--base', base, '--adapter', ad, '--out', out]);
  t.equal(r.code, 1);
  t.match(r.err, /Refusing to merge 'l\.bias': element 0 is Infinity in float32 after merging lora_B\.bias .*\[ERR_LORA_NON_FINITE\]/, '3e38 + 3e38 overflows float32');
  t.notOk(fs.existsSync(out), 'nothing written');
  const ad16 = adapter('bias16-adapter', { r: 2, lora_alpha: 2, target_modules: ['l'], lora_bias: true }, {
    'l.lora_A.weight': rand([2, 3], 61), 'l.lora_B.weight': rand([4, 2], 62), 'l.lora_B.bias': tensor([-3e38, 0, 0, 4e4], [4]),
  });
  const r16 = run(['merge', '--base', base, '--adapter', ad16, '--out', out, '--dtype', 'f16']);
  t.equal(r16.code, 1);
  t.match(r16.err, /Refusing to merge 'l\.bias': element 3 is Infinity after merging lora_B\.bias and rounding to float16/, 'fits float32, overflows float16');
  t.notOk(fs.existsSync(out), 'nothing written');
  const ru = run(['merge', '--base', base, '--adapter', ad, '--out', out, '--unsafe']);
  t.equal(ru.code, 0, ru.err);
  const { tensors } = loadSafetensors(out);
  t.equal(tensors.get('l.bias')!.toFloat32Array()[0], Infinity, '--unsafe writes the overflowed value');
  for (const v of tensors.values()) v.dispose();
  t.end();
});

const CONTROL = /[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202e]/; // eslint-disable-line no-control-regex

t.test('inspect and error messages print names and metadata from a file with control characters escaped', { skip }, (t) => {
  const f = path.join(dir, 'escapes.safetensors');
  const x = tensor([1, 2], [2]);
  const nasty = ['\u001b[2J\u001b[Hclear', '\u001b]0;pwned\u0007title', 'carriage\rreturn', '\u202ereversed', 'line\n  fake 0 tensors'];
  saveSafetensors(f, Object.fromEntries(nasty.map((n) => [n, x])), { metadata: { ['key\u001b[31m']: 'value\u009b2J\n  metadata injected = 1' } });
  x.dispose();
  const r = run(['inspect', f]);
  t.equal(r.code, 0, r.err);
  t.notOk(CONTROL.test(r.out), 'no control character reaches the terminal (newlines only between lines)');
  t.equal(r.out.split('\n').length, 2 + nasty.length + 1 + 1 + 1, 'one line per tensor: no injected lines');
  for (const s of ['\\x1b[2J\\x1b[Hclear', '\\x1b]0;pwned\\x07title', 'carriage\\x0dreturn', '\\u202ereversed', 'line\\x0a  fake 0 tensors', 'metadata key\\x1b[31m = value\\x9b2J\\x0a  metadata injected = 1'])
    t.ok(r.out.includes(s), `shown as ${s}`);
  const ad = adapter('escapes-adapter', { r: 2, lora_alpha: 2, target_modules: ['q\u001b[2J'], base_model_name_or_path: 'org/\u001b]0;x\u0007model' }, {
    'q\u001b[2J.lora_A.weight': rand([2, 3], 70), 'q\u001b[2J.lora_B.weight': rand([4, 2], 71),
  });
  const ra = run(['inspect', ad]);
  t.equal(ra.code, 0, ra.err);
  t.notOk(CONTROL.test(ra.out), 'nor from an adapter');
  t.match(ra.out, /base_model_name_or_path org\/\\x1b\]0;x\\x07model/);
  // an error that quotes a name from the file
  const base = path.join(dir, 'escapes-base.safetensors');
  const w = rand([4, 4], 72);
  saveSafetensors(base, { 'other.weight': w });
  w.dispose();
  const rm = run(['merge', '--base', base, '--adapter', ad, '--out', path.join(dir, 'never.safetensors')]);
  t.equal(rm.code, 1);
  t.notOk(CONTROL.test(rm.err.slice(0, -1)), 'error messages escape them too');
  t.match(rm.err, /adapts 'q\\x1b\[2J'/);
  t.end();
});

t.test('destinations: read-only (EROFS), under a file, a symlink; errors name --out, never a temp file', { skip }, (t) => {
  const base = path.join(dir, 'dest-base.safetensors');
  const w = rand([4, 3], 80);
  saveSafetensors(base, { 'l.weight': w });
  w.dispose();
  const ad = adapter('dest-adapter', { r: 2, lora_alpha: 2, target_modules: ['l'] }, { 'l.lora_A.weight': rand([2, 3], 81), 'l.lora_B.weight': rand([4, 2], 82) });

  const notDir = path.join(dir, 'a-file');
  fs.writeFileSync(notDir, 'x');
  const r1 = run(['merge', '--base', base, '--adapter', ad, '--out', path.join(notDir, 'out.safetensors')]);
  t.equal(r1.code, 1);
  t.match(r1.err, /^lora-native: Could not write .*a-file\/out\.safetensors: .*a-file is not a folder \[ERR_LORA_IO\]\n$/, 'a path under a regular file');
  t.notOk(/\.tmp/.test(r1.err), 'no temp name in the message');

  // --out naming a symlink: the link is replaced by the new file; what it pointed to is untouched
  const target = path.join(dir, 'link-target.safetensors');
  fs.writeFileSync(target, 'keep me');
  const link = path.join(dir, 'link.safetensors');
  fs.symlinkSync(target, link);
  const r2 = run(['merge', '--base', base, '--adapter', ad, '--out', link]);
  t.equal(r2.code, 0, r2.err);
  t.ok(fs.lstatSync(link).isFile(), '--out is now a regular file');
  t.equal(fs.readFileSync(target, 'utf8'), 'keep me', 'the symlink\'s target is unchanged');
  t.equal(readSafetensorsHeader(link).entries.length, 1);

  // a read-only file system, in a private mount namespace (needs root and unshare)
  const ro = path.join(dir, 'ro');
  fs.mkdirSync(ro);
  const probe = spawnSync('unshare', ['-m', 'sh', '-c', `mount -t tmpfs -o ro none '${ro}' && touch '${ro}/x'`], { encoding: 'utf8' });
  if (!/Read-only file system/.test(probe.stderr ?? '')) {
    t.comment(`skipping the read-only case: no private read-only mount here (${(probe.stderr || probe.error?.message || '').trim().slice(0, 120)})`);
    return t.end();
  }
  const inRo = (args: string[]) => spawnSync('unshare', ['-m', 'sh', '-c', `mount -t tmpfs -o ro none '${ro}' && exec "$0" "$@"`, process.execPath, bin, ...args], { encoding: 'utf8' });
  const r3 = inRo(['merge', '--base', base, '--adapter', ad, '--out', path.join(ro, 'out.safetensors')]);
  t.equal(r3.status, 1);
  t.match(r3.stderr, /^lora-native: Could not write .*ro\/out\.safetensors: its folder .*ro is not writable: the file system is read-only \(EROFS\) \[ERR_LORA_IO\]\n$/, 'merge names --out and says EROFS');
  const r4 = inRo(['combine', '--adapter', ad, '--weights', '1', '--mode', 'cat', '--out', path.join(ro, 'combined')]);
  t.equal(r4.status, 1);
  t.match(r4.stderr, /Could not write .*ro\/combined: its folder .*ro is not writable: the file system is read-only \(EROFS\)/, 'combine too');
  t.notOk(/\.tmp/.test(r3.stderr + r4.stderr), 'no temp name in the messages');
  t.end();
});

t.test('a config nested 200,000 deep is an ERR_LORA_FORMAT, not a stack overflow', { skip }, (t) => {
  const d = path.join(dir, 'deep');
  fs.mkdirSync(d);
  fs.writeFileSync(path.join(d, 'adapter_config.json'), `{"r": 2, "target_modules": ${'['.repeat(200_000)}${']'.repeat(200_000)}}`);
  const A = rand([2, 3], 95);
  const B = rand([4, 2], 96);
  saveSafetensors(path.join(d, 'adapter_model.safetensors'), { 'base_model.model.l.lora_A.weight': A, 'base_model.model.l.lora_B.weight': B });
  A.dispose();
  B.dispose();
  const r = run(['inspect', d]);
  t.equal(r.code, 1);
  t.match(r.err, /adapter_config\.json: nested deeper than 64 levels \[ERR_LORA_FORMAT\]\n$/);
  t.end();
});

// ---- 2.2 and 4.5 GiB bases ---------------------------------------------------------------------

const bigSkip = skip || (process.env.LORA_NATIVE_BIG_TESTS === '1' ? false : 'merges bases of 2.2 and 4.5 GiB (reads 6.7 GiB, minutes here): set LORA_NATIVE_BIG_TESTS=1');

t.test('merges of sparse 2.2 and 4.5 GiB bases: tensors past 2^31 and 2^32 merged and copied', { skip: bigSkip }, (t) => {
  const ad = adapter('big-adapter', { r: 2, lora_alpha: 2, target_modules: ['lin'] }, { 'lin.lora_A.weight': rand([2, 3], 90), 'lin.lora_B.weight': rand([4, 2], 91) });
  const lin = Float32Array.from(randomData(12, 92));
  for (const [label, dtype, shape, elem] of [['2.2 GiB', 'F32', [573, 2 ** 20], 4], ['4.5 GiB', 'BF16', [2304, 2 ** 20], 2]] as const) {
    const n = shape[0] * shape[1] * elem;
    const f = path.join(dir, `big-${elem}.safetensors`);
    let json = JSON.stringify({ big: { dtype, shape, data_offsets: [0, n] }, 'lin.weight': { dtype: 'F32', shape: [4, 3], data_offsets: [n, n + 48] } });
    json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    const fd = fs.openSync(f, 'w');
    fs.writeSync(fd, Buffer.concat([len, Buffer.from(json)]));
    fs.writeSync(fd, Buffer.from([9, 8, 7, 6]), 0, 4, 8 + json.length + n - 4);
    fs.writeSync(fd, Buffer.from(lin.buffer), 0, 48, 8 + json.length + n);
    fs.closeSync(fd);
    const out = path.join(dir, `big-${elem}-merged.safetensors`);
    const r = run(['merge', '--base', f, '--adapter', ad, '--out', out], 600_000);
    t.equal(r.code, 0, `${label}: ${r.err.slice(-300)}`);
    const h = readSafetensorsHeader(out);
    const fdo = fs.openSync(out, 'r');
    const tail = Buffer.alloc(4);
    fs.readSync(fdo, tail, 0, 4, h.dataStart + n - 4);
    fs.closeSync(fdo);
    t.same([...tail], [9, 8, 7, 6], `${label}: the big tensor's last bytes copied`);
    const merged = loadSafetensors(out, { names: ['lin.weight'] }).tensors.get('lin.weight')!;
    t.notSame(Array.from(merged.toFloat32Array()), Array.from(lin), `${label}: lin.weight (past 2^${elem === 4 ? 31 : 32}) merged`);
    merged.dispose();
    fs.rmSync(out);
    fs.rmSync(f);
  }
  t.end();
});
