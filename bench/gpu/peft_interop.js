// The lora-native half of bench/gpu/peft_interop.py (read its header): for every adapter PEFT made
// in D/adapters/, merge it into D/base.safetensors with the `lora-native merge` command (what a
// user runs) into D/ours_merged/, and load and re-save it with loadPeftAdapter/savePeftAdapter into
// D/roundtrip/ for PEFT to read back. Plain node over dist/; exits 1 if any step fails.
'use strict';

const fs = require('fs');
const path = require('path');
const { spawnSync } = require('child_process');

const { root } = require('./common');

const lib = require(path.join(root, 'dist', 'lib', 'index.js'));
const dir = process.argv[2];
if (!dir) {
  console.error('usage: node bench/gpu/peft_interop.js <folder made by peft_interop.py make>');
  process.exit(2);
}
const base = path.join(dir, 'base.safetensors');
let failed = 0;
for (const name of fs.readdirSync(path.join(dir, 'adapters')).sort()) {
  const adapter = path.join(dir, 'adapters', name);
  const merged = path.join(dir, 'ours_merged', `${name}.safetensors`);
  fs.mkdirSync(path.dirname(merged), { recursive: true });
  const r = spawnSync(process.execPath, [path.join(root, 'bin', 'lora-native.js'), 'merge', '--base', base, '--adapter', adapter, '--out', merged], { encoding: 'utf8' });
  if (r.status !== 0) {
    failed++;
    console.log(`FAIL merge ${name}: ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' | ')}`);
  } else {
    console.log(`merged ${name}`);
  }
  try {
    const a = lib.loadPeftAdapter(adapter);
    lib.savePeftAdapter(path.join(dir, 'roundtrip', name), a);
    a.dispose();
    console.log(`re-saved ${name}`);
  } catch (e) {
    failed++;
    console.log(`FAIL round trip ${name}: ${e.code || ''} ${e.message}`);
  }
}
process.exitCode = failed ? 1 : 0;
