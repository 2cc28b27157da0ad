#!/usr/bin/env node
// Builds the optional CUDA backend (cuda/ -> liblora_cuda.so) after the CPU addon, during
// `npm install`/`npm ci`, and puts it beside the .node file the addon loads. Without nvcc (or
// cmake) it prints one line saying why the CUDA backend was skipped and exits 0. It never
// downloads anything. A compile error exits 1 (CI must see it) in a checkout; in an installed
// package whose CPU addon is a prebuild it is a warning (the install succeeds with the CPU
// backend); LORA_NATIVE_SKIP_CUDA=1 skips.
//
// Architectures: by default only those of the GPUs present (nvidia-smi), or with no GPU one small
// default (sm_90 SASS + compute_80 PTX that the driver JIT-compiles for any other GPU from sm_80
// on); LORA_NATIVE_CUDA_ARCHS=all builds SASS for every supported GPU (what prebuilds should carry),
// LORA_NATIVE_CUDA_ARCHS=86-real,90-real a list of your own. `--print-archs` prints the choice
// and builds nothing.
//
// Environment: CUDACXX (nvcc path), LORA_NATIVE_CUDA_ARCHS (formerly LORA_CUDA_ARCHS, still read),
// LORA_NATIVE_CUDA_JOBS (parallel compile jobs, default 2; formerly LORA_CUDA_JOBS, still read),
// LORA_NATIVE_SKIP_CUDA=1.
//
// `--emulator` builds instead the CPU emulator of the same kernels (cuda/emu/ ->
// build-cuda-emu/liblora_cuda_emu.so and its self-test), a test tool: `npm test` runs the CUDA
// tests on it (pretest). It needs cmake, g++ and the CUDA headers, not nvcc's device compiler.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');

function say(message) {
  console.log(`lora-native: ${message}`);
}

// Parallel compile jobs: LORA_NATIVE_CUDA_JOBS, or its older name, default 2 (CI machines have 2 cores).
function jobCount() {
  const n = Number(process.env.LORA_NATIVE_CUDA_JOBS || process.env.LORA_CUDA_JOBS);
  return String(Math.max(1, n || 2));
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

function onPath(name) {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, name))) return path.join(dir, name);
  }
  return null;
}

function findNvcc() {
  const fromEnv = process.env.CUDACXX;
  if (fromEnv && isExecutable(fromEnv)) return fromEnv;
  return onPath('nvcc') || ['/usr/local/cuda/bin/nvcc'].find(isExecutable) || null;
}

// The folder of the .node file node-gyp-build would load: the CUDA library must sit beside it.
function addonDir() {
  try {
    const resolved = require('node-gyp-build').resolve(root);
    return path.dirname(resolved);
  } catch {
    return path.join(root, 'build', 'Release');
  }
}

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 64 << 20 });
  return { ok: r.status === 0, output: `${r.stdout || ''}${r.stderr || ''}`, error: r.error };
}

// The folder holding cuda_runtime.h: beside nvcc, under CUDA_PATH, or the usual install folder.
function findCudaHeaders(nvcc) {
  const candidates = [];
  if (process.env.CUDA_PATH) candidates.push(path.join(process.env.CUDA_PATH, 'include'));
  if (nvcc) {
    const bin = path.dirname(fs.realpathSync(nvcc));
    candidates.push(path.join(bin, '..', 'include'), path.join(bin, '..', 'targets', 'x86_64-linux', 'include'));
  }
  candidates.push('/usr/local/cuda/include');
  return candidates.find((dir) => fs.existsSync(path.join(dir, 'cuda_runtime.h'))) || null;
}

// Configures and builds one CMake project; prints the tail of the log and returns false on failure.
function cmakeBuild(cmake, what, configure, buildDir, jobs) {
  for (const [step, args] of [['configure', configure], ['build', ['--build', buildDir, '-j', jobs]]]) {
    const r = run(cmake, args);
    if (!r.ok) {
      process.stderr.write(r.output.split('\n').slice(-60).join('\n') + '\n');
      const log = path.join(buildDir, `${step}.log`);
      try {
        fs.mkdirSync(buildDir, { recursive: true });
        fs.writeFileSync(log, r.output);
      } catch { /* the message below is what matters */ }
      say(`${what} ${step} failed${r.error ? ` (${r.error.message})` : ''}; full log: ${log}.`);
      return false;
    }
  }
  return true;
}

function buildEmulator() {
  if (process.env.LORA_NATIVE_SKIP_CUDA_EMU === '1') {
    say('CUDA emulator skipped (LORA_NATIVE_SKIP_CUDA_EMU=1).');
    return 0;
  }
  const cmake = onPath('cmake');
  const headers = findCudaHeaders(findNvcc());
  if (!cmake || !headers || process.platform !== 'linux' || process.arch !== 'x64') {
    say(`CUDA emulator skipped: ${!cmake ? 'cmake not found on PATH' : !headers ? 'no CUDA headers (cuda_runtime.h) found' : 'linux-x64 only'}; the CUDA tests will say so.`);
    return 0;
  }
  const buildDir = path.join(root, 'build-cuda-emu');
  const configure = ['-S', path.join(root, 'cuda', 'emu'), '-B', buildDir, '-G', onPath('ninja') ? 'Ninja' : 'Unix Makefiles',
    '-DCMAKE_BUILD_TYPE=Release', `-DLORA_CUDA_INCLUDE=${headers}`];
  const started = Date.now();
  if (!cmakeBuild(cmake, 'CUDA emulator', configure, buildDir, jobCount())) return 1;
  const seconds = (Date.now() - started) / 1000;
  if (seconds >= 2) say(`CUDA emulator built in ${seconds.toFixed(0)} s: ${path.relative(root, path.join(buildDir, 'liblora_cuda_emu.so'))}`);
  return 0;
}

// The oldest architecture the kernels run on: mma.sync bf16, ldmatrix and cp.async need sm_80.
const MIN_ARCH = 80;
// The default with no GPU to ask: SASS for the H100/H200 (the usual data-centre GPU) and
// compute_80 PTX, which the driver JIT-compiles for every other GPU from sm_80 on. Two device
// passes instead of the five of 'all'.
const NO_GPU_DEFAULT = ['90-real', '80-virtual'];

// Compute capabilities of the GPUs present, as integers (9.0 -> 90), from nvidia-smi; null when
// nvidia-smi is missing or cannot answer (no driver, an old one without compute_cap).
function gpuArchitectures() {
  const smi = onPath('nvidia-smi');
  if (!smi) return null;
  const r = spawnSync(smi, ['--query-gpu=compute_cap', '--format=csv,noheader'], { encoding: 'utf8', timeout: 20_000 });
  if (r.status !== 0 || !r.stdout) return null;
  const caps = r.stdout.split('\n').map((l) => l.trim()).filter((l) => /^\d+\.\d+$/.test(l))
    .map((l) => { const [maj, min] = l.split('.'); return Number(maj) * 10 + Number(min); });
  return caps.length ? [...new Set(caps)].sort((a, b) => a - b) : null;
}

// The real architectures this nvcc can compile for (from `nvcc --list-gpu-code`), or null.
function nvccArchitectures(nvcc) {
  const r = spawnSync(nvcc, ['--list-gpu-code'], { encoding: 'utf8', timeout: 20_000 });
  if (r.status !== 0 || !r.stdout) return null;
  const archs = [...r.stdout.matchAll(/^sm_(\d+)$/gm)].map((m) => Number(m[1]));
  return archs.length ? archs : null;
}

/**
 * Which CUDA architectures to build: { archs: CMake list or null for CMakeLists.txt's full list,
 * why: one line for the user } or { skip: why }. `env` the environment, `gpus` the compute
 * capabilities present (null: unknown), `nvccArchs` what nvcc supports (null: unknown).
 */
function chooseArchitectures(env, gpus, nvccArchs) {
  const asked = env.LORA_NATIVE_CUDA_ARCHS || env.LORA_CUDA_ARCHS;
  const which = env.LORA_NATIVE_CUDA_ARCHS ? 'LORA_NATIVE_CUDA_ARCHS' : 'LORA_CUDA_ARCHS';
  if (asked && asked.trim().toLowerCase() === 'all')
    return { archs: null, why: `every supported architecture (${which}=all): SASS for sm_80, sm_86, sm_89, sm_90 and PTX for newer GPUs` };
  if (asked) {
    const list = asked.split(/[;,\s]+/).filter(Boolean);
    const bad = list.find((a) => !/^\d{2,3}[a-z]?(-real|-virtual)?$/.test(a));
    if (bad) return { error: `${which}=${asked} is not a list of CUDA architectures like 90-real,80-virtual (or 'all'): '${bad}'` };
    return { archs: list, why: `${list.join(', ')} (${which})` };
  }
  const hint = 'LORA_NATIVE_CUDA_ARCHS=all builds every supported GPU architecture';
  if (!gpus || gpus.length === 0)
    return { archs: NO_GPU_DEFAULT, why: `no GPU found here (nvidia-smi): sm_90 + compute_80 PTX, which runs on any GPU from sm_80 on after a one-time JIT compile; ${hint}` };
  const usable = gpus.filter((g) => g >= MIN_ARCH);
  const fmt = (g) => `${Math.floor(g / 10)}.${g % 10}`;
  if (usable.length === 0)
    return { skip: `the GPUs here have compute capability ${gpus.map(fmt).join(', ')}; lora-native's CUDA kernels need 8.0 or newer (the CPU backend is ready)` };
  const top = nvccArchs ? Math.max(...nvccArchs) : Infinity;
  const archs = [];
  for (const g of usable) {
    if (g <= top) archs.push(`${g}-real`);
    else if (!archs.includes(`${top}-virtual`)) archs.push(`${top}-virtual`);  // newer than this nvcc: PTX it can JIT
  }
  return { archs, why: `the GPUs present (compute capability ${usable.map(fmt).join(', ')}): ${archs.join(', ')}; ${hint}` };
}

function main() {
  if (process.argv.includes('--emulator')) return buildEmulator();
  if (process.env.LORA_NATIVE_SKIP_CUDA === '1') {
    say('CUDA backend skipped (LORA_NATIVE_SKIP_CUDA=1).');
    return 0;
  }
  if (process.platform !== 'linux' || process.arch !== 'x64') {
    say(`CUDA backend skipped: only built on linux-x64 (this is ${process.platform}-${process.arch}).`);
    return 0;
  }
  // an installed package: node-gyp-build found the prebuilt addon, so nothing was built here
  const packaged = fs.existsSync(path.join(root, 'prebuilds', 'linux-x64')) && !fs.existsSync(path.join(root, 'build'));
  const prebuilt = path.join(root, 'prebuilds', 'linux-x64', 'liblora_cuda.so');
  if (packaged && fs.existsSync(prebuilt) && !process.argv.includes('--print-archs')) return 0;

  const printOnly = process.argv.includes('--print-archs');
  const nvcc = findNvcc();
  if (!nvcc) {
    say('CUDA backend skipped: nvcc not found (looked at CUDACXX, PATH, /usr/local/cuda/bin); the CPU backend is ready.');
    return 0;
  }
  const cmake = onPath('cmake');
  if (!cmake) {
    say(`CUDA backend skipped: cmake not found on PATH (nvcc is at ${nvcc}); the CPU backend is ready.`);
    return 0;
  }
  const ninja = onPath('ninja');
  // an installed package builds outside itself (its folder keeps no build tree; the log stays in tmp)
  const buildDir = packaged && !printOnly ? fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-cuda-')) : path.join(root, 'build', 'cuda');
  const jobs = jobCount();
  const configure = ['-S', path.join(root, 'cuda'), '-B', buildDir,
    '-G', ninja ? 'Ninja' : 'Unix Makefiles',
    `-DCMAKE_CUDA_COMPILER=${nvcc}`, '-DCMAKE_BUILD_TYPE=Release'];
  const choice = chooseArchitectures(process.env, gpuArchitectures(), nvccArchitectures(nvcc));
  if (choice.error) {
    say(choice.error);
    return 1;
  }
  if (choice.skip) {
    say(`CUDA backend skipped: ${choice.skip}.`);
    return 0;
  }
  if (printOnly) {
    console.log(JSON.stringify(choice));
    return 0;
  }
  // a list, or (all) CMakeLists.txt's own list: -U drops a list an earlier configure cached
  configure.push(choice.archs ? `-DLORA_NATIVE_CUDA_ARCHS=${choice.archs.join(';')}` : '-ULORA_NATIVE_CUDA_ARCHS');

  const started = Date.now();
  say(`building the CUDA backend with ${nvcc} (${jobs} jobs; a minute or more) for ${choice.why}...`);
  if (!cmakeBuild(cmake, 'CUDA backend', configure, buildDir, jobs)) {
    if (packaged) {
      // the prebuilt CPU addon works: a CUDA toolchain that cannot build must not fail the install
      say('the CPU backend is ready; installed without the CUDA backend (set LORA_NATIVE_SKIP_CUDA=1 to skip this attempt).');
      return 0;
    }
    say('Set LORA_NATIVE_SKIP_CUDA=1 to install without the CUDA backend.');
    return 1;
  }
  const built = path.join(buildDir, 'liblora_cuda.so');
  const destDir = addonDir();
  fs.mkdirSync(destDir, { recursive: true });
  const dest = path.join(destDir, 'liblora_cuda.so');
  fs.copyFileSync(built, `${dest}.tmp`);  // then rename: a running process may have dest mapped
  fs.renameSync(`${dest}.tmp`, dest);
  if (packaged) fs.rmSync(buildDir, { recursive: true, force: true });
  // which architectures the library carries, for scripts/prebuilds.js (prebuilds should carry all)
  fs.writeFileSync(path.join(destDir, 'liblora_cuda.archs'), `${choice.archs ? choice.archs.join(';') : 'all'}\n`);
  say(`CUDA backend built in ${((Date.now() - started) / 1000).toFixed(0)} s: ${path.relative(root, dest)}`);
  return 0;
}

module.exports = { chooseArchitectures };
if (require.main === module) process.exitCode = main();
