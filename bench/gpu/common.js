// Helpers shared by bench/gpu/check.js and bench/gpu/bench.js: load the compiled addon from
// dist/ (plain node, no tap, no TypeScript at run time), seeded data, moving arrays to and from a
// device, and a comparison that reports the worst element. Not part of the published package.
'use strict';

const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..', '..');

function loadNative() {
  for (const rel of ['dist/lib/native.js', 'dist/native.js']) {
    const file = path.join(root, rel);
    if (fs.existsSync(file)) return require(file).native;
  }
  throw new Error(`no compiled dist/ under ${root}: run \`npm run build:ts\` before carrying dist`);
}

const native = loadNative();
const CPU = 0;
const CUDA = 1;
const F32 = 0;
const BF16 = 1;
const F16 = 2;

// mulberry32: small, seeded, identical everywhere.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Values in [-scale, scale) (or [lo, hi) with opts.positive) as a Float32Array.
function randomF32(n, seed, scale = 1, positive = false) {
  const r = rng(seed);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = positive ? 0.05 + scale * r() : scale * (2 * r() - 1);
  return out;
}

// A storage on `device` holding `arr` (float32) converted to `dtype`.
function put(device, arr, dtype = F32) {
  const s = native.fromHost(device, F32, arr);
  if (dtype === F32) return s;
  const d = native.alloc(device, dtype, arr.length);
  native.convert(d, s);
  native.dispose(s);
  return d;
}

// The storage's values as float32 (downloading synchronizes the device).
function get(s) {
  if (s.dtype === F32) return new Float32Array(native.toHost(s));
  const f = native.alloc(s.device, F32, s.numel);
  native.convert(f, s);
  const out = new Float32Array(native.toHost(f));
  native.dispose(f);
  return out;
}

// Blocks until the CUDA stream is idle (a 1-element download).
let syncStorage = null;
function syncCuda() {
  if (!syncStorage) syncStorage = native.alloc(CUDA, F32, 1);
  native.toHost(syncStorage);
}

function rms(a) {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * a[i];
  return Math.sqrt(s / Math.max(1, a.length));
}

// |a - r| <= atol + rtol·|r| everywhere. Returns { ok, text }.
function compare(actual, expected, atol, rtol) {
  if (actual.length !== expected.length) return { ok: false, text: `length ${actual.length} != ${expected.length}` };
  let bad = 0;
  let worst = -1;
  let worstExcess = -Infinity;
  let maxDiff = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i];
    const r = expected[i];
    const diff = Math.abs(a - r);
    const excess = diff - (atol + rtol * Math.abs(r));
    if (diff > maxDiff || Number.isNaN(diff)) maxDiff = diff;
    if (!(excess <= 0)) {
      bad++;
      if (worst < 0 || !(excess <= worstExcess)) {
        worst = i;
        worstExcess = excess;
      }
    }
  }
  const norm = maxDiff / Math.max(rms(expected), 1e-30);
  if (bad === 0) return { ok: true, text: `max|diff| ${maxDiff.toExponential(2)} (${norm.toExponential(2)} of rms)` };
  const pairs = [];
  for (let i = Math.max(0, worst - 1); i < Math.min(actual.length, worst + 2); i++) pairs.push(`[${i}] ${actual[i]} vs ${expected[i]}`);
  return {
    ok: false,
    text: `${bad}/${actual.length} outside atol ${atol.toExponential(1)} rtol ${rtol.toExponential(1)}; ` +
      `worst at ${worst}: ${pairs.join(', ')}; max|diff|/rms ${norm.toExponential(2)}`,
  };
}

module.exports = { native, root, CPU, CUDA, F32, BF16, F16, rng, randomF32, put, get, syncCuda, rms, compare };
