#!/usr/bin/env node
// `npm run prebuilds`: prebuilds/<platform>-<arch>/ for the npm tarball, made by prebuildify
// (N-API, stripped, Node 20 headers from nodedir) plus liblora_cuda.so beside the addon when the
// CUDA backend was built (scripts/build-cuda.js leaves it in build/Release/). prebuildify runs
// `node-gyp rebuild`, which empties build/: the CUDA library is kept aside and put back, and the
// addon is copied back to build/Release/ so the working tree keeps a local build. Run it through
// npm (it needs npm's node-gyp and nodedir). It never downloads anything.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');

const root = path.resolve(__dirname, '..');
const release = path.join(root, 'build', 'Release');
const out = path.join(root, 'prebuilds', `${process.platform}-${process.arch}`);
const CUDA_LIB = 'liblora_cuda.so';

function say(message) {
  console.log(`lora-native prebuilds: ${message}`);
}

function main() {
  let keptCuda = null;
  const cuda = path.join(release, CUDA_LIB);
  // scripts/build-cuda.js records the architectures it built; by default only this machine's
  let archs = 'all';
  try {
    archs = fs.readFileSync(path.join(release, 'liblora_cuda.archs'), 'utf8').trim();
  } catch { /* built before the record existed, or by cmake-js: the full list */ }
  if (fs.existsSync(cuda) && archs !== 'all')
    say(`warning: ${CUDA_LIB} carries only ${archs}; for prebuilds that run on every GPU rebuild it with LORA_NATIVE_CUDA_ARCHS=all node scripts/build-cuda.js`);
  if (fs.existsSync(cuda)) {
    keptCuda = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'lora-prebuilds-')), CUDA_LIB);
    fs.copyFileSync(cuda, keptCuda);
  }
  fs.rmSync(out, { recursive: true, force: true });

  const bin = path.join(root, 'node_modules', '.bin', 'prebuildify');
  const args = ['--napi', '--strip', '--target=node@20.20.2'];
  say(`prebuildify ${args.join(' ')}`);
  const r = spawnSync(bin, args, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) {
    say(`prebuildify failed (${r.error ? r.error.message : `exit ${r.status}`})`);
    return 1;
  }
  const addons = fs.readdirSync(out).filter((f) => f.endsWith('.node'));
  if (addons.length !== 1) {
    say(`expected one .node file in ${out} but found ${addons.length}`);
    return 1;
  }
  // Back into build/Release so this working tree still loads a local build (prebuildify moved it).
  fs.mkdirSync(release, { recursive: true });
  fs.copyFileSync(path.join(out, addons[0]), path.join(release, 'lora_native.node'));
  if (keptCuda) {
    fs.copyFileSync(keptCuda, path.join(out, CUDA_LIB));
    fs.copyFileSync(keptCuda, cuda);
    fs.rmSync(path.dirname(keptCuda), { recursive: true, force: true });
  } else {
    say(`no ${CUDA_LIB} in build/Release (CUDA backend not built here): the prebuilds are CPU-only`);
  }
  for (const f of fs.readdirSync(out)) say(`${path.relative(root, path.join(out, f))} ${(fs.statSync(path.join(out, f)).size / 1e6).toFixed(1)} MB`);
  return 0;
}

process.exitCode = main();
