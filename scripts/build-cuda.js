#!/usr/bin/env node
// Builds the optional CUDA backend (cuda/ -> liblora_cuda.so) after the CPU addon, during
// `npm install`/`npm ci`, and puts it beside the .node file the addon loads. Without nvcc (or
// cmake) it prints one line saying why the CUDA backend was skipped and exits 0. It never
// downloads anything. A compile error exits 1 (CI must see it); LORA_NATIVE_SKIP_CUDA=1 skips.
//
// Environment: CUDACXX (nvcc path), LORA_NATIVE_CUDA_ARCHS (CUDA architectures, e.g. "90-real"),
// LORA_NATIVE_CUDA_JOBS (parallel compile jobs, default 2), LORA_NATIVE_SKIP_CUDA=1. The older
// names LORA_CUDA_ARCHS and LORA_CUDA_JOBS still work, with a warning.
//
// `--emulator` builds instead the CPU emulator of the same kernels (cuda/emu/ ->
// build-cuda-emu/liblora_cuda_emu.so and its self-test), a test tool: `npm test` runs the CUDA
// tests on it (pretest). It needs cmake, g++ and the CUDA headers, not nvcc's device compiler.
'use strict';

const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');

function say(message) {
  console.log(`lora-native: ${message}`);
}

// A LORA_NATIVE_* knob, or its older name (with a warning) when only that is set.
function knob(name, oldName) {
  if (process.env[name]) return process.env[name];
  if (process.env[oldName]) {
    say(`${oldName} is deprecated; set ${name} instead.`);
    return process.env[oldName];
  }
  return undefined;
}

const jobs = () => String(Math.max(1, Number(knob('LORA_NATIVE_CUDA_JOBS', 'LORA_CUDA_JOBS')) || 2));  // 2: CI machines have 2 cores

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
  if (!cmakeBuild(cmake, 'CUDA emulator', configure, buildDir, jobs())) return 1;
  const seconds = (Date.now() - started) / 1000;
  if (seconds >= 2) say(`CUDA emulator built in ${seconds.toFixed(0)} s: ${path.relative(root, path.join(buildDir, 'liblora_cuda_emu.so'))}`);
  return 0;
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
  const prebuilt = path.join(root, 'prebuilds', 'linux-x64', 'liblora_cuda.so');
  if (fs.existsSync(prebuilt) && !fs.existsSync(path.join(root, 'build'))) return 0;  // packaged

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
  const buildDir = path.join(root, 'build', 'cuda');
  const configure = ['-S', path.join(root, 'cuda'), '-B', buildDir,
    '-G', ninja ? 'Ninja' : 'Unix Makefiles',
    `-DCMAKE_CUDA_COMPILER=${nvcc}`, '-DCMAKE_BUILD_TYPE=Release'];
  const archs = knob('LORA_NATIVE_CUDA_ARCHS', 'LORA_CUDA_ARCHS');
  if (archs) configure.push(`-DLORA_NATIVE_CUDA_ARCHS=${archs}`);

  const started = Date.now();
  say(`building the CUDA backend with ${nvcc} (${jobs()} jobs; a few minutes)...`);
  if (!cmakeBuild(cmake, 'CUDA backend', configure, buildDir, jobs())) {
    say('Set LORA_NATIVE_SKIP_CUDA=1 to install without the CUDA backend.');
    return 1;
  }
  const built = path.join(buildDir, 'liblora_cuda.so');
  const destDir = addonDir();
  fs.mkdirSync(destDir, { recursive: true });
  const dest = path.join(destDir, 'liblora_cuda.so');
  fs.copyFileSync(built, `${dest}.tmp`);  // then rename: a running process may have dest mapped
  fs.renameSync(`${dest}.tmp`, dest);
  say(`CUDA backend built in ${((Date.now() - started) / 1000).toFixed(0)} s: ${path.relative(root, dest)}`);
  return 0;
}

process.exitCode = main();
