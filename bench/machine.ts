// The bench's view of the machine and of its peers: the ceilings measured on every run
// (bench/native/probe.c: fp32 FMA and bf16 dot peaks of 1 and 2 threads at once, read and update
// bandwidth, the clock, the CPU's own name), and the baselines set up at their best — OpenBLAS and
// PyTorch each in a child whose environment alone drops OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (this
// machine's environment pins OpenBLAS to Haswell kernels, half its speed here), PyTorch with jemalloc
// with decay off, and a PyTorch whose BLAS is Netlib's reference BLAS refused as a baseline.
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

export function run(cmd: string, argv: string[], timeoutMs = 600_000, env: NodeJS.ProcessEnv = process.env): { ok: boolean; out: string; err: string } {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: timeoutMs, env, maxBuffer: 64 << 20 });
  return { ok: r.status === 0, out: r.stdout ?? '', err: (r.stderr ?? '') + (r.error ? String(r.error) : '') };
}
export function lastJson(out: string): any {
  const line = out.trim().split('\n').filter((l) => l.startsWith('{')).pop();
  if (!line) return undefined;
  try { return JSON.parse(line); } catch { return undefined; }
}

export interface Ceiling { fmaGflops: number; bf16DotGflops: number; readGBs: number; updateGBs: number }
export interface Machine {
  cpuModel: string; cpuidBrand: string; family: number; model: number; stepping: number;
  nominalMHz: number; clockGHz: number; vectorWidth: number;
  perThreads: Record<string, Ceiling>;
}

// A baseline's environment: the parent's, without the variables that pin OpenBLAS to one kernel
// set, with `threads` for every threading layer, and (PyTorch) jemalloc with decay off where
// installed (plain jemalloc hands freed pages back and re-faults them: slower than glibc here).
const JEMALLOC = '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2';
export function baselineEnv(threads: number, jemalloc: boolean): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, OMP_NUM_THREADS: String(threads), OPENBLAS_NUM_THREADS: String(threads), MKL_NUM_THREADS: String(threads) };
  delete env.OPENBLAS_CORETYPE;
  delete env.OPENBLAS_L2_SIZE;
  if (jemalloc && fs.existsSync(JEMALLOC)) {
    env.LD_PRELOAD = [JEMALLOC, env.LD_PRELOAD].filter(Boolean).join(':');
    env.MALLOC_CONF = 'dirty_decay_ms:-1,muzzy_decay_ms:-1';
  }
  return env;
}

export interface Tools {
  probe?: string; openblas?: string; python?: string;
  torch?: { version: string; blas: any; mkldnn: boolean; jemalloc: boolean; mallocConf?: string };
  skipped: Record<string, string>;
}

// Compiles the probe and the OpenBLAS baseline, finds a python3 with torch and asks it which BLAS it
// runs on (refusing the reference BLAS).
export function setUpTools(srcDir: string, work: string, withBaselines: boolean): Tools {
  const tools: Tools = { skipped: {} };
  const cc = ['cc', 'gcc', 'clang'].find((c) => run(c, ['--version']).ok);
  if (!cc) {
    tools.skipped.probe = tools.skipped.openblas = 'no C compiler (cc/gcc/clang) on PATH';
  } else {
    const probe = path.join(work, 'probe');
    const p = run(cc, ['-O3', '-pthread', path.join(srcDir, 'native', 'probe.c'), '-o', probe]);
    if (p.ok) tools.probe = probe;
    else tools.skipped.probe = `probe did not compile: ${p.err.split('\n')[0]}`;
    if (withBaselines) {
      const ob = path.join(work, 'openblas_bench');
      const o = run(cc, ['-O2', path.join(srcDir, 'native', 'openblas_bench.c'), '-lopenblas', '-o', ob]);
      if (o.ok) tools.openblas = ob;
      else tools.skipped.openblas = `OpenBLAS not found (apt-get install libopenblas-dev): ${o.err.split('\n')[0]}`;
    }
  }
  if (!withBaselines) {
    tools.skipped.openblas = tools.skipped.pytorch = '--no-baselines';
    return tools;
  }
  for (const py of ['/usr/bin/python3', 'python3']) {
    const r = run(py, [path.join(srcDir, 'torch_bench.py'), '--probe'], 120_000, baselineEnv(1, true));
    const info = r.ok ? lastJson(r.out) : undefined;
    if (!info) continue;
    if (info.blas?.kind === 'reference') {
      tools.skipped.pytorch = `refused: this PyTorch (${info.torch}) runs its matmuls on the reference BLAS ${info.blas.path} ` +
        '(hundreds of times slower; apt-get install libopenblas-dev)';
      return tools;
    }
    tools.python = py;
    tools.torch = { version: info.torch, blas: info.blas, mkldnn: info.mkldnn, jemalloc: info.jemalloc, mallocConf: info.mallocConf };
    return tools;
  }
  tools.skipped.pytorch = 'no python3 with torch (apt-get install python3-torch)';
  return tools;
}

export function measureMachine(tools: Tools, maxThreads: number): Machine | undefined {
  if (!tools.probe) return undefined;
  return lastJson(run(tools.probe, [String(maxThreads)]).out);
}
