// npm run bench [-- --quick] [--cases=gemm,lora_forward] [--threads=1,2] [--no-baselines] [--torch-best]
// The CPU benchmark suite of issue 3: every case (bench/cases/<op>.ts) at every shape, thread count
// and weight dtype in its own child process; the machine's ceilings measured first (FMA peak and
// memory bandwidth, bench/native/probe.c); OpenBLAS and PyTorch baselines over the same work when
// installed (skipped with the reason otherwise). Writes bench/results/<date>.json and prints a
// markdown table. Times are wall clock (median and min of the runs after warm-up) and exclude
// first-touch costs (buffers are allocated and touched in the untimed setup).
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ATTENTION_SHAPES, attentionKey, QUICK_SHAPES, SHAPES, Shape, shapeKey } from './common';

const args = process.argv.slice(2);
const flag = (n: string) => args.includes(`--${n}`);
const opt = (n: string) => args.find((a) => a.startsWith(`--${n}=`))?.split('=')[1];
const quick = flag('quick');
const CASES = (opt('cases') ?? 'gemm,linear,lora_forward,lora_step,lora_merge,adamw,attention').split(',');
const THREADS = (opt('threads') ?? '1,2').split(',').map(Number);
const shapes: Shape[] = quick ? QUICK_SHAPES : SHAPES;
const reps = quick ? 3 : 7, warmup = quick ? 1 : 2;
const srcDir = path.join(__dirname, '..', '..', 'bench');  // dist/bench -> bench
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-bench-'));
// The load average around the run: other processes on these cores make every figure slower.
const loadBefore = os.loadavg();

function run(cmd: string, argv: string[], timeoutMs = 600_000, env: NodeJS.ProcessEnv = process.env): { ok: boolean; out: string; err: string } {
  const r = spawnSync(cmd, argv, { encoding: 'utf8', timeout: timeoutMs, env });
  return { ok: r.status === 0, out: r.stdout ?? '', err: (r.stderr ?? '') + (r.error ? String(r.error) : '') };
}
function lastJson(out: string): any {
  const line = out.trim().split('\n').filter((l) => l.startsWith('{')).pop();
  return line ? JSON.parse(line) : undefined;
}

// ---- ceilings and baselines -------------------------------------------------------------------
const skipped: Record<string, string> = {};
const cc = ['cc', 'gcc', 'clang'].find((c) => run(c, ['--version']).ok);
let probe: string | undefined, openblas: string | undefined;
if (!cc) {
  skipped.probe = skipped.openblas = 'no C compiler (cc/gcc/clang) on PATH';
} else {
  probe = path.join(work, 'probe');
  const p = run(cc, ['-O3', '-pthread', path.join(srcDir, 'native', 'probe.c'), '-o', probe]);
  if (!p.ok) { skipped.probe = `probe did not compile: ${p.err.split('\n')[0]}`; probe = undefined; }
  if (!flag('no-baselines')) {
    openblas = path.join(work, 'openblas_bench');
    const o = run(cc, ['-O2', path.join(srcDir, 'native', 'openblas_bench.c'), '-lopenblas', '-o', openblas]);
    if (!o.ok) {
      skipped.openblas = `OpenBLAS not found (apt-get install libopenblas-dev): ${o.err.split('\n')[0]}`;
      openblas = undefined;
    }
  }
}
let python: string | undefined, torchVersion: string | undefined;
if (flag('no-baselines')) {
  skipped.openblas = skipped.pytorch = '--no-baselines';
} else {
  for (const py of ['/usr/bin/python3', 'python3']) {
    const r = run(py, ['-c', 'import torch; print(torch.__version__)']);
    if (r.ok) { python = py; torchVersion = r.out.trim(); break; }
  }
  if (!python) skipped.pytorch = 'no python3 with torch (apt-get install python3-torch)';
}

// --torch-best: PyTorch as fast as this machine lets it run (BUILD.md): jemalloc with decay off
// (freed pages are not handed back and re-faulted; eager attention's (H, T, T) buffers are the
// worst case) and OpenBLAS's own choice of core instead of the environment's Haswell.
const torchBest = flag('torch-best');
const jemalloc = '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2';
const torchBestEnv: NodeJS.ProcessEnv = fs.existsSync(jemalloc)
  ? { LD_PRELOAD: jemalloc, MALLOC_CONF: 'dirty_decay_ms:-1,muzzy_decay_ms:-1' } : {};
if (torchBest && !fs.existsSync(jemalloc)) skipped.jemalloc = `--torch-best: ${jemalloc} not found (apt-get install libjemalloc2)`;

const ceilings: Record<number, { fmaPeakGflops1: number; readGBs: number; updateGBs: number }> = {};
for (const t of THREADS) {
  ceilings[t] = probe ? lastJson(run(probe, [String(t)]).out) : { fmaPeakGflops1: NaN, readGBs: NaN, updateGBs: NaN };
}
// One core's FMA peak is the best any probe saw (a probe that shared its core reads low).
const corePeak = Math.max(...THREADS.map((t) => ceilings[t].fmaPeakGflops1));
for (const t of THREADS) ceilings[t].fmaPeakGflops1 = corePeak;
process.stderr.write(`ceilings: ${JSON.stringify(ceilings)}\nbaselines: openblas=${!!openblas} pytorch=${torchVersion ?? 'no'}` +
  `${Object.keys(skipped).length ? ` skipped: ${JSON.stringify(skipped)}` : ''}\n`);

// ---- the runs ---------------------------------------------------------------------------------
interface Row {
  case: string; shape: Shape; threads: number; dtype: string; isa?: string;
  work: { flops?: number; bytes?: number };
  variants: Record<string, { medianMs: number; minMs: number; reps: number }>;
  error?: string;
}
const rows: Row[] = [];
const dtypesOf: Record<string, string[]> = { adamw: ['fp32'], attention: ['fp32'] };
// attention runs at its own shapes (--quick: T = 512 and 1024); the others at the linear shapes
const shapesOf = (name: string) => (name === 'attention' ? (quick ? ATTENTION_SHAPES.slice(0, 2) : ATTENTION_SHAPES) : shapes);
const keyOf = (name: string, s: Shape) => (name === 'attention' ? attentionKey(s) : shapeKey(s));
for (const name of CASES) {
  for (const shape of shapesOf(name)) {
    if (name === 'adamw' && shapes.some((s) => s !== shape && s.C === shape.C && s.OC === shape.OC && shapes.indexOf(s) < shapes.indexOf(shape))) continue;
    for (const threads of THREADS) {
      for (const dtype of dtypesOf[name] ?? ['fp32', 'bf16']) {
        const dims = [shape.N, shape.C, shape.OC, shape.R].map(String);
        const r = run(process.execPath, [path.join(__dirname, 'child.js'), name, ...dims, String(threads), dtype, String(reps), String(warmup)]);
        const row: Row = lastJson(r.out) ?? { case: name, shape, threads, dtype, work: {}, variants: {}, error: r.err.slice(-400) };
        if (openblas && dtype === 'fp32' && name !== 'adamw' && name !== 'attention') {
          const o = lastJson(run(openblas, [name, ...dims, String(threads), String(reps), String(warmup)]).out);
          if (o) row.variants.openblas = o;
        }
        if (python) {
          // torch.set_num_threads does not reach the BLAS that Debian's torch calls: pin it too
          const tenv: NodeJS.ProcessEnv = { ...process.env, OMP_NUM_THREADS: String(threads), OPENBLAS_NUM_THREADS: String(threads), MKL_NUM_THREADS: String(threads) };
          if (torchBest) {
            Object.assign(tenv, torchBestEnv);
            delete tenv.OPENBLAS_CORETYPE;
            delete tenv.OPENBLAS_L2_SIZE;
          }
          // attention: transformers' eager attention (repeat_kv, float mask, fp32 softmax), fwd + bwd
          const argv = name === 'attention'
            ? [path.join(srcDir, 'torch_llm.py'), 'attention', 'smol', dtype, String(threads), String(reps), String(warmup), `T=${shape.N}`]
            : [path.join(srcDir, 'torch_bench.py'), name, ...dims, String(threads), dtype, String(reps), String(warmup)];
          const p = lastJson(run(python, argv, 600_000, tenv).out);
          if (p) row.variants.pytorch = { medianMs: p.medianMs, minMs: p.minMs, reps: p.reps };
        }
        rows.push(row);
        process.stderr.write(`${name} ${keyOf(name, shape)} t${threads} ${dtype}: ${Object.entries(row.variants).map(([k, v]) => `${k} ${v.medianMs.toFixed(2)}ms`).join(', ')}${row.error ? ` ERROR ${row.error}` : ''}\n`);
      }
    }
  }
}

// ---- report -----------------------------------------------------------------------------------
const find = (c: string, s: Shape, t: number, d: string) =>
  rows.find((r) => r.case === c && shapeKey(r.shape) === shapeKey(s) && r.threads === t && r.dtype === d);
const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-');
const lines: string[] = [];
lines.push(`| case | N×C×OC r | thr | W | ours ms (min) | rate | % ceiling | unfused | OpenBLAS | PyTorch | ratio |`);
lines.push(`|---|---|---|---|---|---|---|---|---|---|---|`);
for (const r of rows) {
  const ours = r.variants.ours;
  if (!ours) { lines.push(`| ${r.case} | ${keyOf(r.case, r.shape)} | ${r.threads} | ${r.dtype} | error | | | | | | |`); continue; }
  const c = ceilings[r.threads];
  const memBound = r.case === 'lora_merge' || r.case === 'adamw' || (r.shape.N <= 16 && r.case !== 'lora_step');
  let rate: string, pct: string;
  if (memBound) {
    const bytes = r.work.bytes ?? (r.shape.OC * r.shape.C * (r.dtype === 'bf16' ? 2 : 4));
    const gbs = bytes / ours.medianMs / 1e6;
    const ceil = r.case === 'lora_merge' || r.case === 'adamw' ? c.updateGBs : c.readGBs;
    rate = `${fmt(gbs)} GB/s`;
    pct = `${fmt((100 * gbs) / ceil, 0)}% of ${fmt(ceil)} GB/s`;
  } else {
    const gf = (r.work.flops ?? 0) / ours.medianMs / 1e6;
    const ceil = c.fmaPeakGflops1 * r.threads;
    rate = `${fmt(gf)} GFLOP/s`;
    pct = `${fmt((100 * gf) / ceil, 0)}% of ${fmt(ceil, 0)}`;
  }
  const cell = (k: string) => (r.variants[k] ? `${fmt(r.variants[k].medianMs, 2)}` : '-');
  let ratio = '';
  if (r.case === 'linear') {
    const st = r.variants.ours_step, uf = r.variants.unfused, us = r.variants.unfused_step;
    if (st) ratio = `fwd+dx ${fmt(st.medianMs, 2)} ms`;
    if (uf) ratio += `; unfused/ours ${fmt(uf.medianMs / ours.medianMs, 2)}x`;
    if (us && st) ratio += ` (fwd+dx ${fmt(us.medianMs / st.medianMs, 2)}x)`;
  } else if (r.case === 'lora_forward') {
    const g = find('gemm', r.shape, r.threads, r.dtype)?.variants.ours;
    if (g) ratio = `${fmt(ours.medianMs / g.medianMs, 3)}x gemm`;
  } else if (r.case === 'lora_step' && r.variants.frozen_linear) {
    ratio = `${fmt(ours.medianMs / r.variants.frozen_linear.medianMs, 3)}x frozen`;
    if (r.variants.pytorch) ratio += `; torch/ours ${fmt(r.variants.pytorch.medianMs / ours.medianMs, 2)}x`;
  } else if (r.case === 'attention') {
    // ours = forward + backward; the forward alone and one decode step against T cached positions
    const fw = r.variants.ours_fwd, dec = r.variants.ours_decode;
    if (r.variants.pytorch) ratio = `torch/ours ${fmt(r.variants.pytorch.medianMs / ours.medianMs, 2)}x; `;
    if (fw) ratio += `fwd ${fmt(fw.medianMs, 2)} ms (${fmt(((r.work.flops ?? 0) / 3.5) / fw.medianMs / 1e6)} GFLOP/s)`;
    if (dec) ratio += `; decode ${fmt(dec.medianMs * 1e3, 0)} µs (${fmt((r.work.bytes ?? 0) / dec.medianMs / 1e6)} GB/s of K, V)`;
  } else if (r.variants.pytorch) {
    ratio = `torch/ours ${fmt(r.variants.pytorch.medianMs / ours.medianMs, 2)}x`;
  }
  if (r.variants.ours_dropout) ratio += `${ratio ? '; ' : ''}p=0.1: ${fmt(r.variants.ours_dropout.medianMs, 2)} ms`;
  if (r.dtype === 'bf16') {
    const f = find(r.case, r.shape, r.threads, 'fp32')?.variants.ours;
    if (f) ratio += `${ratio ? '; ' : ''}${fmt(f.medianMs / ours.medianMs, 2)}x fp32 speed`;
  }
  lines.push(`| ${r.case} | ${keyOf(r.case, r.shape)} | ${r.threads} | ${r.dtype} | ${fmt(ours.medianMs, 2)} (${fmt(ours.minMs, 2)}) | ${rate} | ${pct} | ${cell('unfused')} | ${cell('openblas')} | ${cell('pytorch')} | ${ratio} |`);
}
const isa = rows.find((r) => r.isa)?.isa;
const header = [
  `lora-native CPU bench ${new Date().toISOString()} — ${os.cpus()[0]?.model ?? 'cpu'}, ${os.cpus().length} cores, ISA ${isa}${quick ? ' (--quick)' : ''}`,
  `ceilings (measured): ${THREADS.map((t) => `${t} thr: FMA ${fmt(ceilings[t].fmaPeakGflops1 * t, 0)} GFLOP/s, read ${fmt(ceilings[t].readGBs)} GB/s, update ${fmt(ceilings[t].updateGBs)} GB/s`).join('; ')}`,
  `baselines: OpenBLAS ${openblas ? 'found' : `skipped (${skipped.openblas})`}; PyTorch ${python ? torchVersion : `skipped (${skipped.pytorch})`}` +
    `${python && torchBest ? ' with jemalloc (decay off) and OpenBLAS\'s own core choice (--torch-best)' : ''}`,
  `times are medians in ms; rates from the median; memory-bound rows (merge, adamw, N <= 16) in GB/s of the weight traffic; bf16 rows are shown against the fp32 FMA peak (the bf16 dot product does twice the flops per instruction).`,
  `load average (1 min) before/after the run: ${loadBefore[0]!.toFixed(1)} / ${os.loadavg()[0]!.toFixed(1)} on ${os.cpus().length} cores${os.loadavg()[0]! > os.cpus().length * 0.75 ? ' — the machine was busy; figures are pessimistic' : ''}`,
];
const md = header.join('\n') + '\n\n' + lines.join('\n') + '\n';
const outDir = path.join(srcDir, 'results');
fs.mkdirSync(outDir, { recursive: true });
const stamp = new Date().toISOString().replace(/[:]/g, '-').replace(/\..*/, '');
const file = path.join(outDir, `${stamp}.json`);
fs.writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), loadavg: { before: loadBefore, after: os.loadavg() }, quick, isa, cpu: os.cpus()[0]?.model, ceilings, skipped, torchVersion, rows, markdown: md }, null, 1));
fs.writeFileSync(path.join(outDir, `${stamp}.md`), md);
fs.rmSync(work, { recursive: true, force: true });
process.stdout.write(md + `\nresults: ${path.relative(process.cwd(), file)}\n`);
