// The targets of issues 15 (kernels), 13 (attention, models) and 14 (training), judged from one bench run: each a ratio
// against the ceiling measured in the same run or against a peer timed in the same run, with the goal and met / not met. A target
// whose row did not run (a skipped peer, --cases without it) says so instead of passing.
import { Ceiling, Machine } from './machine';
import { attentionKey, Shape, shapeKey } from './common';


export interface Timing { medianMs: number; minMs: number; reps: number; config?: string; corename?: string; threads?: number }
export interface Row {
  case: string; shape: Shape; threads: number; dtype: string; isa?: string;
  work: { flops?: number; bytes?: number };
  variants: Record<string, Timing>;
  error?: string;
}
export interface Target { target: string; row: string; measured: string; goal: string; met: boolean | undefined; note?: string }

const fmt = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : '-');
export const GEMM_2048: Shape = { N: 2048, C: 2048, OC: 2048, R: 16 };
export const GEMM_512: Shape = { N: 512, C: 1024, OC: 1024, R: 8 };
// decode: rows of x against a 4096 x 4096 W (the gemm case runs these as well)
export const DECODE_ROWS = [1, 2, 4, 8, 16];
export const decodeShape = (N: number): Shape => ({ N, C: 4096, OC: 4096, R: 16 });
// attention (issue 13): one causal sequence of 1024 tokens, SmolLM2-135M's heads (9 q, 3 kv, D 64)
export const ATTENTION_1024: Shape = { N: 1024, C: 9, OC: 3, R: 64 };

// Whether a bf16 row runs on the bf16 dot product (x rounded to bf16), where the CPU has avx512_bf16:
// the LoRA ops from 64 rows (not linear(), which promises fp32 products); gemm (bf16Dot asked for, as
// matmulPrecision 'bf16' does) from 64 rows and on 4..16 rows (decode: the streaming dot product).
export const usesBf16Dot = (r: Row, m: Machine | undefined) =>
  r.dtype === 'bf16' && r.case !== 'linear' && (r.shape.N >= 64 || (r.case === 'gemm' && r.shape.N >= 4 && r.shape.N <= 16)) &&
  (m?.perThreads['1']?.bf16DotGflops ?? 0) > 0;

export function evaluateTargets(rows: Row[], machine: Machine | undefined, threads: number[]): Target[] {
  const out: Target[] = [];
  const find = (c: string, s: Shape, t: number, d: string) =>
    rows.find((r) => r.case === c && shapeKey(r.shape) === shapeKey(s) && r.threads === t && r.dtype === d && r.variants.ours);
  const ceil = (t: number): Ceiling | undefined => machine?.perThreads[String(t)];
  const label = (c: string, s: Shape, t: number, d: string) => `${c} ${c === 'attention' ? attentionKey(s) : shapeKey(s)} ${d} ${t} thr`;
  const missing = (target: string, row: string, goal: string, why: string) => out.push({ target, row, measured: '-', goal, met: undefined, note: why });

  // ours against a peer: peer time / our time >= goal
  const versus = (target: string, c: string, s: Shape, t: number, d: string, peer: string, goal: number) => {
    const r = find(c, s, t, d), row = label(c, s, t, d), g = `>= ${goal.toFixed(2)}x`;
    if (!r) return missing(target, row, g, 'row not run');
    const p = r.variants[peer];
    if (!p) return missing(target, row, g, `${peer} not run`);
    const ratio = p.medianMs / r.variants.ours!.medianMs;
    // the goal asks for a time under the FLOP floor (the work at the fastest arithmetic the row may use): say so
    const ce = ceil(t), peak = usesBf16Dot(r, machine) ? ce?.bf16DotGflops : ce?.fmaGflops;
    const floorMs = r.work.flops && peak ? r.work.flops / (peak * 1e6) : 0, neededMs = p.medianMs / goal;
    const why = neededMs < floorMs ? `unreachable here: ${goal.toFixed(2)}x needs ${fmt(neededMs, 2)} ms, under the ${fmt(floorMs, 2)} ms the work takes at the measured ${usesBf16Dot(r, machine) ? 'bf16-dot' : 'FMA'} peak; ` : '';
    out.push({ target, row, measured: `${fmt(ratio, 2)}x (${peer} ${fmt(p.medianMs, 2)} ms, ours ${fmt(r.variants.ours!.medianMs, 2)} ms)`, goal: g, met: ratio >= goal, note: `${why}${p.config ?? ''}` });
  };
  // ours as a share of a ceiling
  const share = (target: string, c: string, s: Shape, t: number, d: string, kind: 'fma' | 'bf16' | 'read', goalPct: number) => {
    const r = find(c, s, t, d), row = label(c, s, t, d), g = `>= ${goalPct}%`;
    const ce = ceil(t);
    if (!r) return missing(target, row, g, 'row not run');
    if (!ce) return missing(target, row, g, 'no ceiling measured (probe skipped)');
    const ms = r.variants.ours!.medianMs;
    if (kind === 'read') {
      const bytes = r.work.bytes ?? r.shape.OC * r.shape.C * (d === 'bf16' ? 2 : 4);
      const gbs = bytes / ms / 1e6, pct = (100 * gbs) / ce.readGBs;
      // the compute floor: the work at the measured FMA peak (fp32 products) or bf16-dot peak (the
      // row's products are bf16 dots), against the time 80% of the read bandwidth allows
      const dot = usesBf16Dot(r, machine), peakName = dot ? 'bf16-dot' : 'FMA';
      const floorMs = (r.work.flops ?? 0) / ((dot ? ce.bf16DotGflops : ce.fmaGflops) * 1e6), allowedMs = bytes / (ce.readGBs * 1e6 * goalPct / 100);
      const note = floorMs > allowedMs
        ? `unreachable here: ${fmt(r.work.flops! / 1e6, 0)} MFLOP take ${fmt(floorMs, 2)} ms at the ${peakName} peak, more than the ${fmt(allowedMs, 2)} ms ${goalPct}% of the read bandwidth allows`
        : `compute floor ${fmt(floorMs, 2)} ms, bandwidth floor ${fmt(bytes / (ce.readGBs * 1e6), 2)} ms`;
      out.push({ target, row, measured: `${fmt(pct, 0)}% (${fmt(gbs)} of ${fmt(ce.readGBs)} GB/s)`, goal: g, met: pct >= goalPct, note });
    } else {
      const peak = kind === 'bf16' ? ce.bf16DotGflops : ce.fmaGflops;
      const gf = (r.work.flops ?? 0) / ms / 1e6, pct = (100 * gf) / peak;
      if (!(peak > 0)) return missing(target, row, g, `no ${kind === 'bf16' ? 'avx512_bf16' : 'FMA'} on this CPU`);
      out.push({ target, row, measured: `${fmt(pct, 0)}% (${fmt(gf)} of ${fmt(peak, 0)} GFLOP/s)`, goal: g, met: pct >= goalPct });
    }
  };

  for (const t of threads) {
    const pct = t === 1 ? 85 : 80;
    for (const s of [GEMM_2048, GEMM_512]) {
      const name = s === GEMM_2048 ? 'fp32 GEMM 2048³' : 'fp32 GEMM, LoRA shape';
      share(`${name}: % of FMA peak`, 'gemm', s, t, 'fp32', 'fma', pct);
      versus(`${name}: ahead of OpenBLAS`, 'gemm', s, t, 'fp32', 'openblas', 1);
    }
    for (const n of [1, 16]) versus('fp32 GEMM, LoRA shape: ahead of OpenBLAS', 'gemm', decodeShape(n), t, 'fp32', 'openblas', 1);
    share('bf16 GEMM 2048³: % of bf16-dot peak', 'gemm', GEMM_2048, t, 'bf16', 'bf16', 80);
    versus('bf16 GEMM 2048³: ahead of PyTorch (oneDNN)', 'gemm', GEMM_2048, t, 'bf16', 'pytorch', 1);
    for (const d of ['fp32', 'bf16'])
      for (const n of DECODE_ROWS) share('decode 4096²: % of read bandwidth', 'gemm', decodeShape(n), t, d, 'read', 80);
    for (const d of ['fp32', 'bf16']) {
      versus('LoRA fwd+bwd 2048: vs PyTorch at its best', 'lora_step', GEMM_2048, t, d, 'pytorch', 1.0);
      versus('LoRA fwd+bwd 512×1024×1024: vs PyTorch at its best', 'lora_step', GEMM_512, t, d, 'pytorch', 1.5);
      for (const s of [GEMM_2048, GEMM_512]) {
        const r = find('lora_step', s, t, d), row = label('lora_step', s, t, d);
        const f = r?.variants.frozen_linear;
        if (!r || !f) { missing('LoRA fwd+bwd: adapter cost over a frozen layer', row, '<= 4%', r ? 'frozen_linear not run' : 'row not run'); continue; }
        const over = 100 * (r.variants.ours!.medianMs / f.medianMs - 1);
        out.push({ target: 'LoRA fwd+bwd: adapter cost over a frozen layer', row, measured: `${fmt(over, 1)}% (${fmt(r.variants.ours!.medianMs, 2)} vs ${fmt(f.medianMs, 2)} ms)`, goal: '<= 4%', met: over <= 4 });
      }
    }
    // work counted as FlashAttention counts it (bench/cases/attention.ts)
    share('attention fwd+bwd at T=1024: % of FMA peak', 'attention', ATTENTION_1024, t, 'fp32', 'fma', 50);
  }
  return out;
}

export function targetsMarkdown(ts: Target[]): string {
  const lines = ['| target | row | measured | goal | met | note |', '|---|---|---|---|---|---|'];
  for (const t of ts) lines.push(`| ${t.target} | ${t.row} | ${t.measured} | ${t.goal} | ${t.met === undefined ? 'n/a' : t.met ? 'met' : 'NOT met'} | ${t.note ?? ''} |`);
  const judged = ts.filter((t) => t.met !== undefined);
  lines.push('', `${judged.filter((t) => t.met).length} of ${judged.length} judged targets met; ${ts.length - judged.length} could not be judged in this run.`);
  return lines.join('\n');
}

// ---- the model rows (issues 13 and 14) ---------------------------------------------------------

export interface LlmResult {
  medianMs: number; minMs: number; reps: number; tokens: number; tokensPerS: number; rssAfterLoadMB: number; peakRssMB: number;
  /** each timed rep, sorted (ours) */
  timesMs?: number[];
  /** processes whose reps were pooled (ours, rows run in rounds) */
  rounds?: number;
}
export interface LlmRow {
  case: 'prefill' | 'decode' | 'train'; config: string; dtype: 'fp32' | 'bf16'; threads: number;
  args: Record<string, string>;
  work: { flops?: number; bytes?: number };
  ours?: LlmResult; pytorch?: LlmResult; error?: string;
}

/**
 * One result from the processes of a row run in rounds: the median and minimum of all their
 * steps; RSS from the process with the highest peak (its own RSS after loading beside it).
 */
export function pooledLlmResult(results: LlmResult[]): LlmResult {
  const times = results.flatMap((r) => r.timesMs ?? [r.medianMs]).sort((a, b) => a - b);
  const n = times.length;
  const medianMs = n % 2 ? times[n >> 1]! : (times[n / 2 - 1]! + times[n / 2]!) / 2;
  const rss = results.reduce((a, b) => (b.peakRssMB > a.peakRssMB ? b : a));
  return { ...results[0]!, medianMs, minMs: times[0]!, reps: n, timesMs: times, rounds: results.length,
    tokensPerS: results[0]!.tokens / (medianMs / 1e3), rssAfterLoadMB: rss.rssAfterLoadMB, peakRssMB: rss.peakRssMB };
}

export const llmLabel = (r: LlmRow) =>
  `${r.config} ${r.case}${r.args.B ? ` b${r.args.B}` : ''}${r.args.gc === '1' ? ' gc' : ''} ${r.dtype}${r.args.mp === 'bf16' ? ' (bf16 products)' : ''}`;

/** Where a row stands against its bound: FLOP-bound time (prefill, train), or for decode the tokens/s of
 * the slower of reading every weight once per step and the step's multiply-adds at the FMA peak. */
export function boundShare(r: LlmRow, m: Machine | undefined): number | undefined {
  const c = m?.perThreads[String(r.threads)];
  if (!c || !r.ours) return undefined;
  if (r.case !== 'decode' && r.work.flops) return (r.work.flops / (c.fmaGflops * 1e6)) / r.ours.medianMs;
  if (r.work.bytes) {
    // a step reads every weight once, and does B rows of multiply-adds against them: bound by
    // the read bandwidth at a few rows, by the FMA peak (the bf16-dot peak where the row's
    // products are bf16 dots: mp=bf16 from 4 rows) at more
    const B = Number(r.args.B ?? 1);
    const peak = r.args.mp === 'bf16' && B >= 4 ? c.bf16DotGflops : c.fmaGflops;
    const stepS = Math.max(r.work.bytes / (c.readGBs * 1e9), (r.work.flops ?? 0) / (peak * 1e9));
    return r.ours.tokensPerS / (B / stepS);
  }
  return undefined;
}

/** The targets of issues 13 and 14 from the model rows. */
export function evaluateLlmTargets(rows: LlmRow[], m: Machine | undefined): Target[] {
  const out: Target[] = [];
  const find = (config: string, kase: string, dtype: string, args: Record<string, string> = {}) =>
    rows.find((r) => r.config === config && r.case === kase && r.dtype === dtype && (r.args.mp ?? 'fp32') === (args.mp ?? 'fp32') &&
      Object.entries(args).every(([k, v]) => k === 'mp' || r.args[k] === v));
  const missing = (target: string, row: string, goal: string, note: string) => out.push({ target, row, measured: '-', goal, met: undefined, note });
  for (const config of [...new Set(rows.map((r) => r.config))].filter((c) => c !== 'tiny')) { // tiny: a smoke check, not judged
    // prefill: >= 70% of the FLOP-bound time (fp32), >= 1.5x PyTorch
    const pf = find(config, 'prefill', 'fp32');
    if (pf) {
      const s = boundShare(pf, m);
      if (s === undefined) missing('prefill 512: % of FLOP-bound time', llmLabel(pf), '>= 70%', pf.ours ? 'no ceiling measured' : 'row failed');
      else out.push({ target: 'prefill 512: % of FLOP-bound time', row: llmLabel(pf), measured: `${fmt(100 * s, 0)}%`, goal: '>= 70%', met: s >= 0.7 });
    }
    for (const [d, mp] of [['fp32', 'fp32'], ['bf16', 'fp32'], ['bf16', 'bf16']]) {
      const r = find(config, 'prefill', d!, { mp: mp! });
      if (r) ratio(out, 'prefill 512: vs PyTorch', r, 1.5, m);
    }
    // decode b1 bf16: >= 70% of bandwidth-bound tokens/s, >= 2x PyTorch
    const dc = find(config, 'decode', 'bf16', { B: '1' });
    if (dc) {
      const s = boundShare(dc, m);
      if (s === undefined) missing('decode b1 bf16: % of bandwidth-bound tokens/s', llmLabel(dc), '>= 70%', dc.ours ? 'no ceiling measured' : 'row failed');
      else out.push({ target: 'decode b1 bf16: % of bandwidth-bound tokens/s', row: llmLabel(dc), measured: `${fmt(100 * s, 0)}%`, goal: '>= 70%', met: s >= 0.7, note: `${fmt(dc.work.bytes! / 1e6, 0)} MB per token` });
      ratio(out, 'decode b1 bf16: vs PyTorch', dc, 2, m);
    }
    // training: >= 3x PyTorch at its best (its faster dtype), >= 50% of the FLOP-bound rate
    const torchBest = rows.filter((r) => r.config === config && r.case === 'train' && r.args.gc === '0' && r.pytorch).sort((a, b) => b.pytorch!.tokensPerS - a.pytorch!.tokensPerS)[0];
    for (const [d, mp] of [['fp32', 'fp32'], ['bf16', 'fp32'], ['bf16', 'bf16']] as const) {
      const r = find(config, 'train', d, { gc: '0', mp });
      if (!r) continue;
      if (!r.ours || !torchBest) missing('train: tokens/s vs PyTorch at its best', llmLabel(r), '>= 3.00x', r.ours ? 'PyTorch not run' : 'row failed');
      else {
        const x = r.ours.tokensPerS / torchBest.pytorch!.tokensPerS;
        out.push({ target: 'train: tokens/s vs PyTorch at its best', row: llmLabel(r), measured: `${fmt(x, 2)}x (${fmt(r.ours.tokensPerS)} vs ${fmt(torchBest.pytorch!.tokensPerS)} tok/s)`, goal: '>= 3.00x', met: x >= 3, note: `PyTorch's best: ${torchBest.dtype}` });
      }
      if (d === 'fp32') {
        const s = boundShare(r, m);
        if (s === undefined) missing('train: % of FLOP-bound rate', llmLabel(r), '>= 50%', 'no ceiling or row failed');
        else out.push({ target: 'train: % of FLOP-bound rate', row: llmLabel(r), measured: `${fmt(100 * s, 0)}%`, goal: '>= 50%', met: s >= 0.5, note: `${fmt(r.work.flops! / 1e9, 0)} GFLOP per step` });
      }
      if (r.ours && r.pytorch) {
        const ok = r.ours.peakRssMB <= r.pytorch.peakRssMB;
        out.push({ target: 'train: peak RSS <= PyTorch', row: llmLabel(r), measured: `${fmt(r.ours.peakRssMB, 0)} vs ${fmt(r.pytorch.peakRssMB, 0)} MB`, goal: '<=', met: ok });
      }
      // gradient checkpointing: activation memory <= 25% of without, for <= 30% more time
      const g = find(config, 'train', d, { gc: '1', mp });
      if (g?.ours && r.ours) {
        const a0 = r.ours.peakRssMB - r.ours.rssAfterLoadMB, a1 = g.ours.peakRssMB - g.ours.rssAfterLoadMB;
        const mem = a1 / a0, time = g.ours.medianMs / r.ours.medianMs;
        out.push({ target: 'train gc: activation memory vs without', row: llmLabel(g), measured: `${fmt(100 * mem, 0)}% (${fmt(a1, 0)} vs ${fmt(a0, 0)} MB)`, goal: '<= 25%', met: mem <= 0.25 });
        out.push({ target: 'train gc: time vs without', row: llmLabel(g), measured: `${time >= 1 ? '+' : ''}${fmt(100 * (time - 1), 0)}% time (${fmt(g.ours.medianMs / 1e3, 1)} vs ${fmt(r.ours.medianMs / 1e3, 1)} s)`, goal: '<= 30% more', met: time <= 1.3 });
      }
    }
    const f = find(config, 'train', 'fp32', { gc: '0' });
    for (const b of [find(config, 'train', 'bf16', { gc: '0' }), find(config, 'train', 'bf16', { gc: '0', mp: 'bf16' })]) {
      if (!f?.ours || !b?.ours) continue;
      const x = b.ours.tokensPerS / f.ours.tokensPerS;
      out.push({ target: 'train: bf16 frozen base vs our fp32', row: llmLabel(b), measured: `${fmt(x, 2)}x`, goal: '>= 1.60x', met: x >= 1.6 });
    }
  }
  return out;
}

function ratio(out: Target[], target: string, r: LlmRow, goal: number, m: Machine | undefined): void {
  const g = `>= ${goal.toFixed(2)}x`;
  if (!r.ours || !r.pytorch) {
    out.push({ target, row: llmLabel(r), measured: '-', goal: g, met: undefined, note: r.ours ? 'PyTorch not run' : 'row failed' });
    return;
  }
  const x = r.ours.tokensPerS / r.pytorch.tokensPerS;
  // a goal past this machine's bound (the FLOP bound with fp32 products, or the bandwidth bound) is said to be
  // (a row on bf16 products: the FLOP bound at the bf16-dot peak)
  // (decode: boundShare already takes the larger of its bandwidth and FLOP floors, at the row's peak)
  const c = m?.perThreads[String(r.threads)], dot = r.case !== 'decode' && r.args.mp === 'bf16' && c ? c.bf16DotGflops / c.fmaGflops : 1;
  const share = boundShare(r, m), needed = goal * r.pytorch.tokensPerS, bound = share && dot > 0 ? (dot * r.ours.tokensPerS) / share : undefined;
  const kind = r.case === 'decode' ? 'bound (read bandwidth or FMA peak, whichever is slower)' : dot !== 1 ? 'FLOP bound at the bf16-dot peak' : 'FLOP bound with fp32 products';
  const note = bound !== undefined && needed > bound ? `unreachable here: ${goal.toFixed(2)}x needs ${fmt(needed)} tok/s, past the ${fmt(bound)} tok/s ${kind}` : undefined;
  out.push({ target, row: llmLabel(r), measured: `${fmt(x, 2)}x (${fmt(r.ours.tokensPerS)} vs ${fmt(r.pytorch.tokensPerS)} tok/s)`, goal: g, met: x >= goal, note });
}
