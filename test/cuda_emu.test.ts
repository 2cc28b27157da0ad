// The CUDA backend on the CPU emulator of cuda/emu/ (built by `npm test`'s pretest:
// `node scripts/build-cuda.js --emulator`). Our machines have no GPU; this is how the CUDA
// backend runs in CI: the emulator's own checks, test/cuda.test.ts's CUDA cases, and the error
// paths (a device fault, running out of memory). Every kernel against the float64 references is
// test/parity.test.ts's emulator runs. What it cannot show (speed, the hardware's exact rounding,
// memory ordering between blocks) waits for bench/gpu/run.sh on a GPU.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

import t from 'tap';

const root = path.resolve(__dirname, '..');
const emuDir = path.join(root, 'build-cuda-emu');
const emuLib = path.join(emuDir, 'liblora_cuda_emu.so');
const selftest = path.join(emuDir, 'lora_cuda_emu_selftest');
const notBuilt = fs.existsSync(emuLib) && fs.existsSync(selftest)
  ? false
  : 'the CUDA emulator is not built (npm run build:cuda-emu; it needs cmake, g++ and the CUDA headers)';

function run(cmd: string, args: string[], env: Record<string, string> = {}, timeout = 240_000) {
  const r = spawnSync(cmd, args, {
    cwd: root, encoding: 'utf8', timeout, maxBuffer: 64 << 20,
    env: { ...process.env, LORA_NATIVE_CUDA_LIB: emuLib, ...env },
  });
  return { status: r.status, signal: r.signal, out: `${r.stdout ?? ''}${r.stderr ?? ''}` };
}

t.test('the emulator checks itself', { skip: notBuilt }, async (t) => {
  const list = run(selftest, []);
  const cases = (list.out.match(/cases: (.*)/)?.[1] ?? '').trim().split(/\s+/).filter(Boolean);
  t.ok(cases.length >= 8, `self-test cases: ${cases.join(', ')}`);
  for (const c of cases) {
    const r = run(selftest, [c], {}, 60_000);
    t.equal(r.status, 0, `${c}: ${r.out.trim().split('\n').filter((l) => l.startsWith('FAIL')).slice(0, 5).join('; ') || 'exit 0'}`);
    t.match(r.out, new RegExp(`^ok ${c}$`, 'm'), `${c} reports ok`);
  }
});

t.test('test/cuda.test.ts passes on the emulator, its CUDA cases run', { skip: notBuilt }, async (t) => {
  const hooks = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
  if (!hooks.length) {
    t.skip('needs tap\'s TypeScript hook (run under tap)');
    return;
  }
  const r = run(process.execPath, [...hooks, path.join('test', 'cuda.test.ts')]);
  const failed = r.out.split('\n').filter((l) => /^\s*not ok/.test(l)).slice(0, 8);
  t.equal(r.status, 0, `exit 0${failed.length ? `; failed:\n${failed.join('\n')}` : ''}`);
  t.notMatch(r.out, /# SKIP CUDA unavailable/, 'the GPU cases ran (no "CUDA unavailable" skip)');
  t.match(r.out, /ok \d+ - CUDA matches the CPU/, 'the CUDA-vs-CPU block passed');
  t.match(r.out, /ok \d+ - LoraLinear \(33, 64, 257, 8\) dropout 0 bf16 weight/, 'including the bf16 tensor-core path');
});

// A script run in a child with the emulator and extra environment; prints one JSON line. Uses
// lib/ through tap's TypeScript hook when there is one, else dist/.
function child(script: string, env: Record<string, string>): { status: number | null; json: Record<string, unknown> | null; out: string } {
  const hooks = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
  const target = hooks.length ? path.join(root, 'lib', 'index') : path.join(root, 'dist', 'lib', 'index.js');
  const r = run(process.execPath, [...hooks, '-e', `const L = require(${JSON.stringify(target)});\n${script}`], env, 60_000);
  const last = r.out.trim().split('\n').filter((l) => l.startsWith('{')).pop();
  return { status: r.status, json: last ? JSON.parse(last) : null, out: r.out };
}

const attempt = `const attempt = (fn) => { try { fn(); return 'ok'; } catch (e) { return e.code + ': ' + e.message; } };`;

t.test('a device fault makes the CUDA backend refuse further work, with the reason; the CPU goes on', { skip: notBuilt }, async (t) => {
  // Launch 0 is the backend's smoke test; launch 1 is the first add, made to fault.
  const r = child(`${attempt}
    const a = L.tensor([1, 2, 3], [3], { device: 'cuda' });
    const first = attempt(() => L.add(a, a)), second = attempt(() => L.mul(a, a)), fresh = attempt(() => L.ones([2], { device: 'cuda' }));
    const read = attempt(() => a.toFloat32Array()), dispose = attempt(() => a.dispose());
    const cpu = Array.from(L.add(L.tensor([1], [1]), L.tensor([2], [1])).toFloat32Array());
    console.log(JSON.stringify({ first, second, fresh, read, dispose, cpu }));`, { LORA_NATIVE_CUDA_EMU_FAULT_AT: '1' });
  t.ok(r.json, r.json ? 'the child reported' : `the child printed no report (exit ${r.status}): ${r.out.slice(-300)}`);
  const j = r.json ?? {};
  const unusable = /^ERR_LORA_CUDA: .*backend unusable after an earlier device error \(CUDA error in binary: an illegal memory access was encountered \(cudaErrorIllegalAddress\)\. The GPU context is unusable after this error; restart the process to use CUDA again\.\)$/;
  t.match(j.first, /^ERR_LORA_CUDA: binary failed on cuda: /, 'the faulting op throws ERR_LORA_CUDA');
  t.match(j.first, unusable, 'naming the CUDA error and what to do');
  t.match(j.second, unusable, 'the next op is refused with the same reason');
  t.match(j.fresh, /^ERR_LORA_CUDA: alloc failed on cuda: backend unusable/, 'a new allocation is refused as unusable, not as out of memory');
  t.match(j.read, /^ERR_LORA_CUDA: download failed on cuda: backend unusable/, 'reading a tensor back is refused');
  t.equal(j.dispose, 'ok', 'disposing still works');
  t.same(j.cpu, [3], 'the CPU backend is unaffected');
  t.equal(r.status, 0, 'the process exits normally');
});

t.test('running out of device memory is ERR_LORA_OUT_OF_MEMORY and not sticky', { skip: notBuilt }, async (t) => {
  const r = child(`${attempt}
    const big = attempt(() => L.zeros([64, 1024, 1024], { device: 'cuda' }));
    const after = Array.from(L.ones([4], { device: 'cuda' }).toFloat32Array());
    console.log(JSON.stringify({ big, after }));`, { LORA_NATIVE_CUDA_EMU_MEMORY_MB: '64' });
  const j = r.json ?? {};
  t.match(j.big, /^ERR_LORA_OUT_OF_MEMORY: could not allocate 268435456 bytes on cuda \(CUDA error in alloc: out of memory \(cudaErrorMemoryAllocation\)\)$/, '256 MiB on a 64 MiB device');
  t.same(j.after, [1, 1, 1, 1], 'small allocations and kernels still work afterwards');
});

t.test('matmulPrecision bf16 on CUDA: fp32 products (the backend has no gemm_bf16_dot), as on the CPU with fp32', { skip: notBuilt }, async (t) => {
  const r = child(`
    const x = L.tensor(Array.from({ length: 96 * 40 }, (_, i) => Math.sin(i) * 3.3), [96, 40], { device: 'cuda' });
    const W = L.tensor(Array.from({ length: 24 * 40 }, (_, i) => Math.cos(i) * 0.7), [24, 40], { device: 'cuda' }).toDtype('bfloat16');
    const bf = Array.from(L.linear(x, W, null, { matmulPrecision: 'bf16' }).toFloat32Array());
    const fp = Array.from(L.linear(x, W).toFloat32Array());
    console.log(JSON.stringify({ same: bf.every((v, i) => v === fp[i]), n: bf.length }));`, {});
  t.ok(r.json, r.json ? 'the child reported' : `the child printed no report (exit ${r.status}): ${r.out.slice(-300)}`);
  t.same(r.json, { same: true, n: 96 * 24 }, "linear() with 'bf16' equals 'fp32' on CUDA");
});
