// The backend-parity suite (test/parity/, cases beside their references in test/ref/) on every
// device this machine has, each run in a process of its own: the CPU at its default ISA level
// (every case) and at the lower levels it supports (the GEMM-based and attention cases: the ISA
// level changes only the GEMM engine and the attention kernel), the CUDA emulator (every case; the LoRA cases again with the alternate
// GEMM kernels and with an H200's 132 SMs, which change grid and split-K choices), and a GPU when
// one is present. bench/gpu/check.js runs the same suite on the GPU machine.
import { spawn } from 'node:child_process';
import * as os from 'node:os';
import * as fs from 'node:fs';
import * as path from 'node:path';

import t from 'tap';

import { features } from '../lib/index';

const root = path.resolve(__dirname, '..');
const emuLib = path.join(root, 'build-cuda-emu', 'liblora_cuda_emu.so');
const f = features();
const hooks = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
const script = hooks.length ? path.join(root, 'test', 'parity', 'run.ts') : path.join(root, 'dist', 'test', 'parity', 'run.js');

interface Run {
  label: string;
  device: 'cpu' | 'cuda';
  env: Record<string, string>;
  minCases: number;
  skip: string | false;
  /** For an ISA level: the level the child must report (else this CPU lacks it). */
  isa?: string;
}

const ISA_LEVELS = ['avx512', 'avx2', 'generic'];
const best = ISA_LEVELS.indexOf(f.isa);
const gpu = f.cuda && !f.cudaEmulated;
const noEmu = fs.existsSync(emuLib) ? false : 'the CUDA emulator is not built (npm run build:cuda-emu; it needs cmake, g++ and the CUDA headers)';
const emu = { LORA_NATIVE_CUDA_LIB: emuLib };
const runs: Run[] = [
  { label: `cpu (${f.isa}), every case`, device: 'cpu', env: {}, minCases: 280, skip: false },
  ...ISA_LEVELS.slice(best + 1).map((isa): Run => ({
    label: `cpu (${isa}), the GEMM-based and attention cases`, device: 'cpu', env: { LORA_NATIVE_ISA: isa, LORA_NATIVE_PARITY_ONLY: 'gemm,lora,attention' },
    minCases: 120, skip: false, isa,
  })),
  { label: 'cuda emulator, every case', device: 'cuda', env: emu, minCases: 280, skip: noEmu },
  {
    label: 'cuda emulator, LoRA cases on the register-staged GEMM and SIMT adapter GEMMs', device: 'cuda',
    env: { ...emu, LORA_NATIVE_PARITY_ONLY: 'lora', LORA_NATIVE_CUDA_TC: 'staged', LORA_NATIVE_CUDA_SKINNY: 'simt' }, minCases: 40, skip: noEmu,
  },
  {
    label: 'cuda emulator, LoRA cases with 132 SMs', device: 'cuda',
    env: { ...emu, LORA_NATIVE_PARITY_ONLY: 'lora', LORA_NATIVE_CUDA_EMU_SMS: '132' }, minCases: 40, skip: noEmu,
  },
  { label: `cuda (${f.devices[0]?.name ?? 'no GPU'}), every case`, device: 'cuda', env: {}, minCases: 280, skip: gpu ? false : `no GPU here (${f.reason ?? 'CUDA is the emulator'})` },
];

interface ChildResult { out: string; status: number | null; signal: string | null }

// One child run of the suite (its stdout and stderr together, 15 minutes at most).
function runChild(run: Run): Promise<ChildResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...hooks, script, run.device], {
      cwd: root, env: { ...process.env, LORA_NATIVE_PARITY_ONLY: '', ...run.env }, stdio: ['ignore', 'pipe', 'pipe'],
    });
    const chunks: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => chunks.push(d));
    child.stderr.on('data', (d: Buffer) => chunks.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 900_000);
    child.on('close', (status, signal) => {
      clearTimeout(timer);
      resolve({ out: Buffer.concat(chunks).toString('utf8'), status, signal });
    });
  });
}

// The runs are independent processes: two at a time (one per core on a 2-core machine), started
// in order, so the suite does not leave a core idle at the end of `npm test`.
const pending = runs.filter((r) => !r.skip);
// Each run's result, settled when its child exits; a run waits for a free slot before it starts.
const finish = new Map<Run, (r: ChildResult) => void>();
const results = new Map(pending.map((run) => [run, new Promise<ChildResult>((resolve) => finish.set(run, resolve))]));
const slots = Math.max(1, Math.min(2, os.availableParallelism()));
let active = 0;
const launchNext = (): void => {
  while (active < slots && pending.length) {
    const run = pending.shift()!;
    active++;
    void runChild(run).then((r) => { active--; finish.get(run)!(r); launchNext(); });
  }
};
launchNext();

for (const run of runs) {
  t.test(run.label, { skip: run.skip }, async (t) => {
    const r = await results.get(run)!;
    const out = r.out;
    const summary = out.match(/^parity \((.*)\): (\d+) passed, (\d+) failed$/m);
    if (run.isa && summary && !summary[1]!.endsWith(run.isa)) {
      t.skip(`this CPU has no ${run.isa} (the run used ${summary[1]})`);
      return;
    }
    const fails = out.split('\n').filter((l) => l.startsWith('FAIL')).slice(0, 10);
    t.ok(summary, `printed its summary (exit ${r.status}${r.signal ? `, ${r.signal}` : ''})${summary ? '' : `: ${out.slice(-500)}`}`);
    t.equal(Number(summary?.[3] ?? -1), 0, `no case failed${fails.length ? `:\n${fails.join('\n')}` : ''}`);
    t.ok(Number(summary?.[2] ?? 0) >= run.minCases, `${summary?.[2]} cases passed (at least ${run.minCases})`);
    t.equal(r.status, 0, 'exit 0');
    t.notMatch(out, /kernel failed/, 'no kernel fault, deadlock or illegal address');
  });
}
