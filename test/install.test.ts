// The package as users get it: `npm pack`, then `npm install <tarball>` into fresh folders, offline
// and with an empty npm cache of its own: the runtime dependencies come as tarballs packed from this
// clone's node_modules, so the test needs nothing but what `npm ci` installed (npm ci fills the
// cache with tarballs, not the registry metadata an offline install of a bare tarball asks for).
// Once with prebuilds/ and no compiler on PATH (shims that fail for cc/c++/g++/make), proving the
// prebuild was loaded; once without prebuilds, the CPU addon compiled from source (the CUDA build
// skipped; the tarball is checked to hold every file it reads); once with nothing to load,
// checking the loader's message. Each install trains a layer.
// Uses prebuilds/ from `npm run prebuilds` when present, else stages the local build as one.
import { execFileSync, spawnSync, SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { features } from '../lib/index';

const root = path.join(__dirname, '..');
const PLATFORM = `${process.platform}-${process.arch}`;
const COMPILERS = ['cc', 'c++', 'gcc', 'g++', 'clang', 'clang++', 'make'];

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-install-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));
// An npm cache that starts empty, whatever this machine's cache holds: a fresh machine's.
const emptyCache = fs.mkdtempSync(path.join(tmp, 'npm-cache-'));

// The environment of the outer `npm test` minus npm's per-script variables (they describe the
// repository, not the fresh folder), with the empty cache; npm's user config (nodedir) still applies.
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^npm_(package|lifecycle|config_(prefix|global|local_prefix|dry_run|ignore_scripts|offline|cache))/i.test(k)) continue;
    if (k === 'INIT_CWD' || k === 'LORA_NATIVE_ADDON' || k === 'PREBUILDS_ONLY' || k === 'CC' || k === 'CXX') continue;
    env[k] = v;
  }
  return { ...env, JOBS: '2', npm_config_jobs: '2', npm_config_cache: emptyCache, ...extra };
}

function run(cmd: string, args: string[], cwd: string, env = cleanEnv()): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { cwd, env, encoding: 'utf8', maxBuffer: 64 << 20, timeout: 240_000 });
}

function npm(args: string[], cwd: string, env?: NodeJS.ProcessEnv): SpawnSyncReturns<string> {
  return run('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], cwd, env);
}

function pack(dir: string, dest: string): { file: string; files: string[] } {
  const r = npm(['pack', '--ignore-scripts', '--json', '--pack-destination', dest], dir);
  if (r.status !== 0) throw new Error(`npm pack in ${dir} failed: ${r.stderr}`);
  const info = JSON.parse(r.stdout.slice(r.stdout.indexOf('['))) as { filename: string; files: { path: string }[] }[];
  return { file: path.join(dest, info[0]!.filename), files: info[0]!.files.map((f) => f.path) };
}

// A small training run inside an installed copy: prints which binary loaded and the loss before
// and after 60 AdamW steps.
const TRAIN_SCRIPT = `
const L = require('lora-native');
const f = L.features();
const layer = new L.LoraLinear({ inFeatures: 16, outFeatures: 8, rank: 4, seed: 1 });
const x = L.randn([32, 16], { seed: 2 });
const target = L.randn([32, 8], { seed: 3 });
const opt = new L.AdamW(layer.parameters(), { lr: 0.02 });
const losses = [];
for (let step = 0; step < 60; step++) {
  L.tidy(() => {
    const d = L.sub(layer.forward(x), target);
    const loss = L.mean(L.mul(d, d));
    loss.backward();
    losses.push(loss.item());
  });
  if (!L.allFinite(layer.parameters().map((p) => p.grad))) throw new Error('non-finite gradient');
  opt.step();
  opt.zeroGrad();
}
console.log(JSON.stringify({ binary: f.binary, addonPath: f.addonPath, isa: f.isa, threads: f.threads,
  first: losses[0], last: losses[losses.length - 1] }));
`;

function app(base: string, name: string): string {
  const dir = path.join(base, name);
  fs.mkdirSync(dir);
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name, version: '1.0.0', private: true }));
  fs.writeFileSync(path.join(dir, 'train.js'), TRAIN_SCRIPT);
  return dir;
}

interface TrainOutput { binary: string; addonPath: string; isa: string; first: number; last: number }

function train(dir: string, env: NodeJS.ProcessEnv): TrainOutput {
  const r = run(process.execPath, ['train.js'], dir, env);
  if (r.status !== 0) throw new Error(`train.js in ${dir} failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as TrainOutput;
}

// The package's runtime dependencies as tarballs packed from this clone's node_modules (what
// `npm ci` installed), installed beside the package so npm needs neither the registry nor its cache.
function dependencyTarballs(dest: string): string[] {
  const deps = (JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { dependencies?: Record<string, string> }).dependencies ?? {};
  return Object.keys(deps).map((name) => {
    const dir = path.join(root, 'node_modules', name);
    if (!fs.existsSync(path.join(dir, 'package.json'))) throw new Error(`dependency ${name} is not in node_modules: run npm ci first`);
    return pack(dir, dest).file;
  });
}

// PATH without a compiler: shims named like every compiler and make, first on PATH, that fail.
const shims = path.join(tmp, 'no-compiler');
fs.mkdirSync(shims);
for (const c of COMPILERS)
  fs.writeFileSync(path.join(shims, c), `#!/bin/sh\necho "$0: no compiler on this machine (install test)" >&2\nexit 127\n`, { mode: 0o755 });
const noCompilerEnv = cleanEnv({ PATH: `${shims}${path.delimiter}${process.env.PATH ?? ''}` });

let withPrebuilds = '';
let withoutPrebuilds = '';
let deps: string[] = [];

t.test('npm pack: dist and prebuilds in, tests, benches and build trees out', (t) => {
  if (!fs.existsSync(path.join(root, 'dist', 'lib', 'index.js'))) {
    t.fail('dist/lib/index.js is missing: run npm run build:ts (npm ci does it through prepare)');
    return t.end();
  }
  const packed = pack(root, fs.mkdtempSync(path.join(tmp, 'pack-')));
  const files = packed.files;
  for (const f of ['package.json', 'dist/lib/index.js', 'dist/lib/index.d.ts', 'binding.gyp', 'native/binding.cc', 'README.md', 'scripts/build-cuda.js', 'cuda/CMakeLists.txt'])
    t.ok(files.includes(f), `tarball has ${f}`);
  // what a user's install compiles the CUDA backend from (the install below skips that build: npm ci
  // runs it, and here it would only repeat minutes of nvcc): every file cuda/ includes or lists
  const cudaDir = path.join(root, 'cuda');
  const cudaSources = fs.readdirSync(cudaDir).filter((f) => /\.(cu|cuh|h|map)$/.test(f));
  const missing = cudaSources.map((f) => `cuda/${f}`).filter((f) => !files.includes(f));
  t.same(missing, [], `tarball has the ${cudaSources.length} files of cuda/ the CUDA build reads`);
  const listed = [...fs.readFileSync(path.join(cudaDir, 'CMakeLists.txt'), 'utf8').matchAll(/^\s+(\w+\.cu)$/gm)].map((m) => m[1]!);
  t.ok(listed.length > 0 && listed.every((f) => cudaSources.includes(f)), `cuda/CMakeLists.txt builds ${listed.length} sources, all in cuda/`);
  const unwanted = files.filter((f) => /^(test|bench|build|build-cmake|build-asan|coverage|\.tap|\.ci|scripts\/sanitize|dist\/(bench|examples|test)|native\/dev)\//.test(f) || f.endsWith('.tgz'));
  t.same(unwanted, [], 'no tests, benches, build trees or tarballs in the tarball');

  // A staged copy of the package: with the prebuilds from `npm run prebuilds`, or (when this
  // working tree has none) with the addon this process loaded, placed where prebuildify puts it.
  const stage = path.join(tmp, 'stage');
  fs.mkdirSync(stage);
  execFileSync('tar', ['xzf', packed.file, '-C', stage]);
  const pkg = path.join(stage, 'package');
  const pre = path.join(pkg, 'prebuilds', PLATFORM);
  const shipped = fs.existsSync(pre) ? fs.readdirSync(pre).filter((f) => f.endsWith('.node')) : [];
  if (shipped.length) {
    t.pass(`tarball has prebuilds/${PLATFORM}/${shipped.join(', ')}`);
    withPrebuilds = packed.file;
  } else {
    t.comment(`no prebuilds/${PLATFORM} here (run npm run prebuilds); staging ${path.relative(root, features().addonPath)} as the prebuild`);
    fs.mkdirSync(pre, { recursive: true });
    fs.copyFileSync(features().addonPath, path.join(pre, 'lora-native.node'));
    const cuda = path.join(path.dirname(features().addonPath), 'liblora_cuda.so');
    if (fs.existsSync(cuda)) fs.copyFileSync(cuda, path.join(pre, 'liblora_cuda.so'));
    withPrebuilds = pack(pkg, fs.mkdtempSync(path.join(tmp, 'pack-'))).file;
  }
  fs.rmSync(path.join(pkg, 'prebuilds'), { recursive: true, force: true });
  const bare = pack(pkg, fs.mkdtempSync(path.join(tmp, 'pack-')));
  t.notOk(bare.files.some((f) => f.startsWith('prebuilds/')), 'second tarball has no prebuilds');
  withoutPrebuilds = bare.file;
  deps = dependencyTarballs(fs.mkdtempSync(path.join(tmp, 'deps-')));
  t.ok(deps.length > 0, `runtime dependencies packed from node_modules: ${deps.map((d) => path.basename(d)).join(', ')}`);
  t.end();
});

t.test('install with prebuilds and no compiler on PATH: the prebuild loads and trains', (t) => {
  if (!withPrebuilds) return t.end();
  t.equal(run('g++', ['--version'], tmp, noCompilerEnv).status, 127, 'g++ fails on the shimmed PATH');
  const dir = app(tmp, 'app-prebuilt');
  const started = Date.now();
  const r = npm(['install', '--offline', withPrebuilds, ...deps], dir, noCompilerEnv);
  t.equal(r.status, 0, `npm install --offline succeeded in ${((Date.now() - started) / 1000).toFixed(1)} s${r.status ? `: ${r.stderr}` : ''}`);
  const installed = path.join(dir, 'node_modules', 'lora-native');
  t.notOk(fs.existsSync(path.join(installed, 'build')), 'nothing was compiled (no build/ folder)');
  const out = train(dir, noCompilerEnv);
  t.equal(out.binary, 'prebuild', 'features().binary is prebuild');
  t.ok(out.addonPath.startsWith(path.join(fs.realpathSync(installed), 'prebuilds', PLATFORM)), `loaded ${out.addonPath}`);
  t.ok(out.last < out.first * 0.9, `loss falls: ${out.first.toFixed(4)} -> ${out.last.toFixed(4)} (${out.isa})`);
  t.end();
});

t.test('install without prebuilds: compiled from source, offline', (t) => {
  if (!withoutPrebuilds) return t.end();
  const dir = app(tmp, 'app-source');
  const started = Date.now();
  const r = npm(['install', '--offline', withoutPrebuilds, ...deps], dir, cleanEnv({ LORA_NATIVE_SKIP_CUDA: '1' }));
  t.equal(r.status, 0, `npm install --offline compiled the addon in ${((Date.now() - started) / 1000).toFixed(1)} s${r.status ? `: ${r.stderr.slice(-3000)}` : ''}`);
  const installed = path.join(dir, 'node_modules', 'lora-native');
  t.ok(fs.existsSync(path.join(installed, 'build', 'Release', 'lora_native.node')), 'build/Release/lora_native.node exists');
  const out = train(dir, cleanEnv());
  t.equal(out.binary, 'build', 'features().binary is build');
  t.ok(out.addonPath.startsWith(path.join(fs.realpathSync(installed), 'build', 'Release')), `loaded ${out.addonPath}`);
  t.ok(out.last < out.first * 0.9, `loss falls: ${out.first.toFixed(4)} -> ${out.last.toFixed(4)}`);
  t.end();
});

t.test('nothing to load and no compiler: one ERR_LORA_LOAD that says what to do', (t) => {
  if (!withoutPrebuilds) return t.end();
  const dir = app(tmp, 'app-none');
  const emptyDir = fs.mkdtempSync(path.join(tmp, 'empty-path-')); // a PATH with no tools at all
  const r = npm(['install', '--offline', '--ignore-scripts', withoutPrebuilds, ...deps], dir, noCompilerEnv);
  t.equal(r.status, 0, 'npm install --ignore-scripts succeeded');
  const probe = run(process.execPath, ['-e', `
    try { require('lora-native'); console.log('loaded'); }
    catch (e) { console.log(JSON.stringify({ name: e.name, code: e.code, message: e.message })); }`], dir, cleanEnv({ PATH: emptyDir }));
  const out = JSON.parse(probe.stdout.trim()) as { name: string; code: string; message: string };
  t.equal(out.code, 'ERR_LORA_LOAD', 'code ERR_LORA_LOAD');
  t.match(out.message, /No compiled addon \(build\/Release\) and no prebuilt binary/, 'says nothing was found');
  t.match(out.message, /install a C\+\+17 compiler \(g\+\+ or clang\+\+\), make/, 'names the missing tools');
  t.match(out.message, /npm rebuild lora-native/, 'says how to compile');
  t.match(out.message, /--ignore-scripts/, 'mentions skipped install scripts');
  t.match(out.message, /never downloads/, 'says it never downloads');
  t.end();
});
