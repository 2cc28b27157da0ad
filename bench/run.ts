// npm run bench [-- --quick] [--full] [--cases=gemm,lora_forward,attention,llm] [--threads=1,2] [--no-baselines] [--llm-reps=N]
// (--quick: only the cases the targets need, gemm, lora_step and attention, at the smaller shapes,
// and one tiny-model row; --full adds the Llama-3.2-1B-shaped model to the model rows)
// The CPU benchmark suite (issues 3, 13, 14 and 15): every case (bench/cases/<op>.ts) at every shape, thread
// count and weight dtype in its own child process; the machine's ceilings measured first, on every
// run (bench/machine.ts); OpenBLAS and PyTorch at their best over the same work, each row naming
// what each peer ran (library, kernel, threads); then the issue's targets judged from this run
// (bench/targets.ts). Writes bench/results/<date>.json and .md and prints the markdown. Times are
// wall clock (median and min of the runs after warm-up) and exclude first-touch costs (buffers are
// allocated and touched in the untimed setup).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { ATTENTION_SHAPES, attentionKey, native, pooledTiming, QUICK_SHAPES, SHAPES, Shape, shapeKey, Timing, weightCopies, DType } from './common';
import { baselineEnv, lastJson, measureMachine, run, setUpTools } from './machine';
import { DECODE_ROWS, Row, decodeShape, evaluateLlmTargets, evaluateTargets, targetsMarkdown, usesBf16Dot } from './targets';
import { llmMarkdown, runLlmRows } from './llm_rows';

const args = process.argv.slice(2);
const flag = (n: string) => args.includes(`--${n}`);
const opt = (n: string) => args.find((a) => a.startsWith(`--${n}=`))?.split('=')[1];
const quick = flag('quick');
// --quick runs what the targets table needs (gemm at every target shape and decode row count,
// lora_step, attention at T = 512 and 1024) at the shapes below 4096² x 1024 rows, with fewer
// repetitions
const CASES = (opt('cases') ?? (quick ? 'gemm,lora_step,attention,llm' : 'gemm,linear,lora_forward,lora_step,lora_merge,adamw,attention,llm')).split(',');
const THREADS = (opt('threads') ?? '1,2').split(',').map(Number);
const shapes: Shape[] = quick ? QUICK_SHAPES : SHAPES;
// the gemm case also runs every decode row count of the targets (x·Wᵀ with a 4096 x 4096 W);
// attention runs at its own shapes (SmolLM2-135M's heads, T = 512/1024/2048)
const shapesOf = (name: string) =>
  name === 'gemm' ? [...shapes, ...DECODE_ROWS.map(decodeShape).filter((d) => !shapes.some((s) => shapeKey(s) === shapeKey(d)))]
    : name === 'attention' ? (quick ? ATTENTION_SHAPES.slice(0, 2) : ATTENTION_SHAPES) : shapes;
const keyOf = (name: string, s: Shape) => (name === 'attention' ? attentionKey(s) : shapeKey(s));
const reps = quick ? 3 : 7, warmup = quick ? 1 : 2;
const srcDir = path.join(__dirname, '..', '..', 'bench');  // dist/bench -> bench
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-bench-'));
// The load average around the run: other processes on these cores make every figure slower.
const loadBefore = os.loadavg();

// ---- ceilings and baselines -------------------------------------------------------------------
const tools = setUpTools(srcDir, work, !flag('no-baselines'));
const machine = measureMachine(tools, Math.max(...THREADS));
const ceilingOf = (t: number) => machine?.perThreads[String(t)];
process.stderr.write(`machine: ${JSON.stringify(machine)}\nbaselines: openblas=${!!tools.openblas} pytorch=${tools.torch?.version ?? 'no'}` +
  `${Object.keys(tools.skipped).length ? ` skipped: ${JSON.stringify(tools.skipped)}` : ''}\n`);

// ---- the runs ---------------------------------------------------------------------------------
const rows: Row[] = [];
const dtypesOf: Record<string, string[]> = { adamw: ['fp32'], attention: ['fp32'] };
for (const name of CASES.filter((c) => c !== 'llm')) {
  for (const shape of shapesOf(name)) {
    if (name === 'adamw' && shapes.some((s) => s !== shape && s.C === shape.C && s.OC === shape.OC && shapes.indexOf(s) < shapes.indexOf(shape))) continue;
    for (const threads of THREADS) {
      for (const dtype of dtypesOf[name] ?? ['fp32', 'bf16']) {
        const dims = [shape.N, shape.C, shape.OC, shape.R].map(String);
        const r = run(process.execPath, [path.join(__dirname, 'child.js'), name, ...dims, String(threads), dtype, String(reps), String(warmup)]);
        const row: Row = lastJson(r.out) ?? { case: name, shape, threads, dtype, work: {}, variants: {}, error: r.err.slice(-400) };
        if (tools.openblas && dtype === 'fp32' && name !== 'adamw' && name !== 'attention') {
          const o = lastJson(run(tools.openblas, [name, ...dims, String(threads), String(reps), String(warmup), String(weightCopies(name, shape, dtype as DType))], 600_000, baselineEnv(threads, false)).out);
          if (o) row.variants.openblas = { ...o, config: `OpenBLAS ${o.corename}, ${o.threads} thr (${o.config})` };
        }
        if (tools.python && name === 'attention') {
          // transformers' eager attention (repeat_kv, float mask, fp32 softmax), fwd + bwd
          const argv = [path.join(srcDir, 'torch_llm.py'), 'attention', 'smol', dtype, String(threads), String(reps), String(warmup), `T=${shape.N}`];
          const p = lastJson(run(tools.python, argv, 600_000, baselineEnv(threads, true)).out);
          if (p) row.variants.pytorch = { medianMs: p.medianMs, minMs: p.minMs, reps: p.reps, config: `PyTorch ${tools.torch?.version ?? ''}, eager attention, ${threads} thr` };
        } else if (tools.python) {
          const p = lastJson(run(tools.python, [path.join(srcDir, 'torch_bench.py'), name, ...dims, String(threads), dtype, String(reps), String(warmup), String(weightCopies(name, shape, dtype as DType))], 600_000, baselineEnv(threads, true)).out);
          if (p) {
            // every path timed; the fastest is PyTorch at its best
            for (const [k, v] of Object.entries(p.variants as Record<string, any>)) row.variants[`pytorch_${k}`] = v;
            const best = Object.values(p.variants as Record<string, any>).sort((a, b) => a.medianMs - b.medianMs)[0];
            if (best) row.variants.pytorch = best;
          }
        }
        // ours once more after its peers, both runs pooled: this VM's speed drifts 10-20% within
        // minutes, and a row measured before its peers only (2048² LoRA step, 1 thread: ours 193-230
        // ms and PyTorch's 207-223 in three alternations) carried the drift into their ratio
        const peers = Object.keys(row.variants).some((k) => k === 'openblas' || k.startsWith('pytorch'));
        if (peers && row.variants.ours) {
          const again = lastJson(run(process.execPath, [path.join(__dirname, 'child.js'), name, ...dims, String(threads), dtype, String(reps), String(warmup)]).out);
          for (const [k, v] of Object.entries((again?.variants ?? {}) as Record<string, Timing>))
            if (row.variants[k]) row.variants[k] = pooledTiming([row.variants[k]!, v]);
        }
        rows.push(row);
        process.stderr.write(`${name} ${keyOf(name, shape)} t${threads} ${dtype}: ${Object.entries(row.variants).map(([k, v]) => `${k} ${v.medianMs.toFixed(2)}ms`).join(', ')}${row.error ? ` ERROR ${row.error}` : ''}\n`);
      }
    }
  }
}

// ---- the model rows (prefill, decode, LoRA training step on whole models), at the most threads --
const llmRows = CASES.includes('llm')
  ? runLlmRows({ quick, full: flag('full'), reps: opt('llm-reps') ? Number(opt('llm-reps')) : undefined, threads: Math.max(...THREADS), tools, work, srcDir, log: (s) => process.stderr.write(s) })
  : [];

// ---- report -----------------------------------------------------------------------------------
const find = (c: string, s: Shape, t: number, d: string) =>
  rows.find((r) => r.case === c && shapeKey(r.shape) === shapeKey(s) && r.threads === t && r.dtype === d);
const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-');
// a peer's configuration in a few words: kernel and threads (the header has the full strings)
const peerBrief = (r: Row) => {
  const parts: string[] = [];
  const ob = r.variants.openblas;
  if (ob) parts.push(`OpenBLAS ${ob.corename} ${ob.threads}t`);
  const pt = r.variants.pytorch?.config;
  if (pt) parts.push(pt.replace(/^PyTorch [^,]+, /, 'PyTorch ').replace(/ \(decay off\)/, ''));
  return parts.join('; ');
};
const lines: string[] = [];
lines.push(`| case | N×C×OC r | thr | W | ours ms (min) | rate | % ceiling | unfused | OpenBLAS | PyTorch | ratio | peers (library, kernel, threads) |`);
lines.push(`|---|---|---|---|---|---|---|---|---|---|---|---|`);
for (const r of rows) {
  const ours = r.variants.ours;
  if (!ours) { lines.push(`| ${r.case} | ${keyOf(r.case, r.shape)} | ${r.threads} | ${r.dtype} | error | | | | | | | |`); continue; }
  const c = ceilingOf(r.threads);
  const memBound = r.case === 'lora_merge' || r.case === 'adamw' || (r.shape.N <= 16 && r.case !== 'lora_step');
  let rate: string, pct: string;
  if (memBound) {
    const bytes = r.work.bytes ?? (r.shape.OC * r.shape.C * (r.dtype === 'bf16' ? 2 : 4));
    const gbs = bytes / ours.medianMs / 1e6;
    const ceil = r.case === 'lora_merge' || r.case === 'adamw' ? c?.updateGBs ?? NaN : c?.readGBs ?? NaN;
    rate = `${fmt(gbs)} GB/s`;
    pct = `${fmt((100 * gbs) / ceil, 0)}% of ${fmt(ceil)} GB/s`;
  } else {
    const gf = (r.work.flops ?? 0) / ours.medianMs / 1e6;
    const bf16 = usesBf16Dot(r, machine);
    const ceil = (bf16 ? c?.bf16DotGflops : c?.fmaGflops) ?? NaN;
    rate = `${fmt(gf)} GFLOP/s`;
    pct = `${fmt((100 * gf) / ceil, 0)}% of ${fmt(ceil, 0)}${bf16 ? ' bf16' : ''}`;
  }
  const cell = (k: string) => (r.variants[k] ? `${fmt(r.variants[k].medianMs, 2)}` : '-');
  const ratios: string[] = [];
  if (r.variants.openblas) ratios.push(`OpenBLAS/ours ${fmt(r.variants.openblas.medianMs / ours.medianMs, 2)}x`);
  if (r.variants.pytorch) ratios.push(`torch/ours ${fmt(r.variants.pytorch.medianMs / ours.medianMs, 2)}x`);
  if (r.case === 'linear') {
    const st = r.variants.ours_step, uf = r.variants.unfused, us = r.variants.unfused_step;
    if (st) ratios.push(`fwd+dx ${fmt(st.medianMs, 2)} ms`);
    if (uf) ratios.push(`unfused/ours ${fmt(uf.medianMs / ours.medianMs, 2)}x${us && st ? ` (fwd+dx ${fmt(us.medianMs / st.medianMs, 2)}x)` : ''}`);
  } else if (r.case === 'lora_forward') {
    const g = find('gemm', r.shape, r.threads, r.dtype)?.variants.ours;
    if (g) ratios.push(`${fmt(ours.medianMs / g.medianMs, 3)}x gemm`);
  } else if (r.case === 'lora_step' && r.variants.frozen_linear) {
    ratios.push(`${fmt(ours.medianMs / r.variants.frozen_linear.medianMs, 3)}x frozen`);
  } else if (r.case === 'attention') {
    // ours = forward + backward; the forward alone and one decode step against T cached positions
    const fw = r.variants.ours_fwd, dec = r.variants.ours_decode;
    if (fw) ratios.push(`fwd ${fmt(fw.medianMs, 2)} ms (${fmt(((r.work.flops ?? 0) / 3.5) / fw.medianMs / 1e6)} GFLOP/s)`);
    if (dec) ratios.push(`decode ${fmt(dec.medianMs * 1e3, 0)} µs (${fmt((r.work.bytes ?? 0) / dec.medianMs / 1e6)} GB/s of K, V)`);
  }
  if (r.variants.ours_dropout) ratios.push(`p=0.1: ${fmt(r.variants.ours_dropout.medianMs, 2)} ms`);
  if (r.dtype === 'bf16') {
    const f = find(r.case, r.shape, r.threads, 'fp32')?.variants.ours;
    if (f) ratios.push(`${fmt(f.medianMs / ours.medianMs, 2)}x fp32 speed`);
  }
  lines.push(`| ${r.case} | ${keyOf(r.case, r.shape)} | ${r.threads} | ${r.dtype} | ${fmt(ours.medianMs, 2)} (${fmt(ours.minMs, 2)}) | ${rate} | ${pct} | ${cell('unfused')} | ${cell('openblas')} | ${cell('pytorch')} | ${ratios.join('; ')} | ${peerBrief(r)} |`);
}
// (the kernel rows' children report it; a run of model rows alone asks this process's binding)
const isa = rows.find((r) => r.isa)?.isa ?? native.features().isa;
const tt = tools.torch;
const m = machine;
const header = [
  `lora-native CPU bench ${new Date().toISOString()} — ${os.cpus().length} cores, ISA ${isa}${quick ? ' (--quick)' : ''}`,
  m ? `CPU: ${m.cpuModel} (cpuid: "${m.cpuidBrand.trim()}", family ${m.family} model ${m.model} stepping ${m.stepping}); clock ${fmt(m.clockGHz, 2)} GHz measured (1-cycle add chain), ${fmt(m.nominalMHz, 0)} MHz nominal`
    : `CPU: ${os.cpus()[0]?.model ?? 'unknown'} (probe skipped: ${tools.skipped.probe})`,
  `ceilings (measured this run, threads at once): ${THREADS.map((t) => { const c = ceilingOf(t); return c ? `${t} thr: FMA ${fmt(c.fmaGflops, 0)} GFLOP/s, bf16 dot ${fmt(c.bf16DotGflops, 0)} GFLOP/s, read ${fmt(c.readGBs)} GB/s, update ${fmt(c.updateGBs)} GB/s` : `${t} thr: -`; }).join('; ')}`,
  `OpenBLAS: ${tools.openblas ? `in its own child with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (this machine sets ${process.env.OPENBLAS_CORETYPE ? `OPENBLAS_CORETYPE=${process.env.OPENBLAS_CORETYPE}` : 'neither'}); ${rows.find((r) => r.variants.openblas)?.variants.openblas?.config ?? ''}` : `skipped (${tools.skipped.openblas})`}`,
  `PyTorch: ${tt ? `${tt.version}, fp32 matmuls on ${tt.blas.kind} ${tt.blas.corename ?? ''} (${tt.blas.path ?? tt.blas.libraries?.join(', ')}), oneDNN ${tt.mkldnn ? 'available' : 'absent'}, ${tt.jemalloc ? `jemalloc (MALLOC_CONF=${tt.mallocConf})` : 'glibc malloc (no jemalloc)'}; every path timed (ATen, and oneDNN through mkldnn tensors for fp32 inference), the fastest shown` : `skipped (${tools.skipped.pytorch})`}`,
  `times are medians in ms; rates from the median; ours ran before and after its peers in a row that has them, its two processes' runs pooled (so the machine's drift weighs on both sides alike); memory-bound rows (merge, adamw, N <= 16) in GB/s of the weight traffic; gemm's rows of N <= 16 (ours, OpenBLAS and PyTorch) take turns over copies of W of 128 MB in all, so W comes from memory on every call; bf16 rows of lora_forward and lora_step from 64 rows, and of gemm (bf16Dot, as matmulPrecision 'bf16') from 64 rows and on 4..16, use the bf16 dot product (x rounded to bf16) and are shown against the bf16-dot peak; linear keeps fp32 products. attention rows (T queries, H/KVH heads, D) time forward + backward, work counted as FlashAttention counts it (forward 4·T²·D·H halved for causal, backward 2.5x).`,
  `load average (1 min) before/after the run: ${loadBefore[0]!.toFixed(1)} / ${os.loadavg()[0]!.toFixed(1)} on ${os.cpus().length} cores${os.loadavg()[0]! > os.cpus().length * 0.75 ? ' — the machine was busy; figures are pessimistic' : ''}`,
];
const targets = [...(rows.length ? evaluateTargets(rows, machine, THREADS) : []), ...evaluateLlmTargets(llmRows, machine)];
const torchPeer = tt ? `PyTorch ${tt.version} eager (bench/torch_llm.py: transformers' Llama arithmetic, PEFT's LoRA), ${Math.max(...THREADS)} thr, ` +
  `fp32 matmuls on ${tt.blas.kind} ${tt.blas.corename ?? ''}, ${tt.jemalloc ? `jemalloc (${tt.mallocConf})` : 'glibc malloc'}` : `not run (${tools.skipped.pytorch})`;
const md = header.join('\n') + '\n\n' + lines.join('\n') +
  (llmRows.length ? '\n\n## Models (issues 13 and 14)\n\n' + llmMarkdown(llmRows, machine, torchPeer) : '') +
  '\n\n## Targets (issues 15, 13, 14), from this run\n\n' + targetsMarkdown(targets) + '\n';
const outDir = path.join(srcDir, 'results');
fs.mkdirSync(outDir, { recursive: true });
const stamp = new Date().toISOString().replace(/[:]/g, '-').replace(/\..*/, '');
const file = path.join(outDir, `${stamp}.json`);
// the kernel rows' medians and minima, not every timed run (up to 200 rounds per variant, pooled
// from two processes: they made a quick run's file 490 KB)
const savedRows = rows.map((r) => ({ ...r, variants: Object.fromEntries(Object.entries(r.variants).map(([k, v]) => {
  const { timesMs: _times, ...rest } = v as Timing;
  return [k, rest];
})) }));
fs.writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), loadavg: { before: loadBefore, after: os.loadavg() }, quick, isa, machine, tools: { torch: tt, skipped: tools.skipped }, rows: savedRows, llmRows, targets, markdown: md }, null, 1));
fs.writeFileSync(path.join(outDir, `${stamp}.md`), md);
fs.rmSync(work, { recursive: true, force: true });
process.stdout.write(md + `\nresults: ${path.relative(process.cwd(), file)}\n`);
