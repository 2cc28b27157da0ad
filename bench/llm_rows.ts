// The model rows of npm run bench: a random SmolLM2-135M-shaped Llama (and, with --full, a
// Llama-3.2-1B-shaped one) written as a Hugging Face folder and loaded with loadCausalLM, each case
// (prefill, decode, LoRA training step) in its own child process for ours (bench/llm_child.ts)
// and for PyTorch (bench/torch_llm.py, transformers' eager arithmetic + PEFT's LoRA) at its best
// configuration, so that RSS is per case; then the table and the targets of issues 13 and 14.
import * as path from 'path';
import { Machine, Tools, baselineEnv, lastJson, run } from './machine';
import { LLM_CONFIGS, decodeBytes, linearParams, prefillFlops, trainFlops, writeLlamaFolder } from './llm';
import { LlmResult, LlmRow, boundShare, llmLabel as label, pooledLlmResult } from './targets';

const fmt = (x: number | undefined, d = 1) => (x !== undefined && Number.isFinite(x) ? x.toFixed(d) : '-');

// rounds: our side runs in that many processes of `reps` steps each, taking turns with the other
// rows that have rounds (after every row's first pass), and the steps are pooled: a ratio between
// two of our rows (gc against none, bf16 against fp32) then compares steps taken in the same minutes
// of the run rather than minutes apart (this VM's speed drifts by 10-20% over minutes).
interface Plan { case: LlmRow['case']; config: string; dtype: 'fp32' | 'bf16'; args: Record<string, string>; reps: number; warmup: number; rounds?: number }

function plans(quick: boolean, full: boolean): Plan[] {
  // --quick: one tiny-model row (a smoke check of the whole path, baseline included)
  if (quick) return [{ case: 'train', config: 'tiny', dtype: 'fp32', args: { gc: '0' }, reps: 3, warmup: 1 }];
  const out: Plan[] = [];
  // mp=bf16: the bf16 weights with matmulPrecision 'bf16' (bf16 dot products in every projection
  // and the head, as PyTorch's bf16 rows compute), beside the default fp32 products
  // a prefill takes well under a second on both sides: more reps (for both) steady its median
  // rounds > 1: prefill and decode in that many processes too (one process's run of decode steps
  // moved 10 -> 15 ms a step between minutes of one bench run, so a single one judged the VM's phase)
  const add = (config: string, dtypes: ('fp32' | 'bf16')[], reps: number, prefillReps: number, rounds?: number) => {
    for (const d of dtypes) out.push({ case: 'prefill', config, dtype: d, args: {}, reps: prefillReps, warmup: 1, rounds });
    if (dtypes.includes('bf16')) out.push({ case: 'prefill', config, dtype: 'bf16', args: { mp: 'bf16' }, reps: prefillReps, warmup: 1, rounds });
    for (const B of ['1', '8']) for (const d of dtypes) out.push({ case: 'decode', config, dtype: d, args: { B }, reps, warmup: 1, rounds });
  };
  add('smol', ['fp32', 'bf16'], 3, 7, 3);
  for (const d of ['fp32', 'bf16'] as const)
    for (const gc of ['0', '1']) out.push({ case: 'train', config: 'smol', dtype: d, args: { gc }, reps: 2, warmup: 1, rounds: 3 });
  // the LoRA layers' frozen base dots bf16 in both bf16 rows; this one adds the head and its loss
  out.push({ case: 'train', config: 'smol', dtype: 'bf16', args: { gc: '0', mp: 'bf16' }, reps: 2, warmup: 1, rounds: 3 });
  if (full) {
    // 1B: bf16 for everything that reads the weights many times; a training step takes minutes
    add('1b', ['fp32', 'bf16'], 2, 2);
    for (const gc of ['0', '1']) out.push({ case: 'train', config: '1b', dtype: 'bf16', args: { gc }, reps: 1, warmup: 1 });
  }
  return out;
}

/** The work of a row: FLOPs (prefill, train) or weight bytes per decode step. */
function workOf(p: Plan): LlmRow['work'] {
  const c = LLM_CONFIGS[p.config]!;
  if (p.case === 'prefill') return { flops: prefillFlops(c, 512) };
  if (p.case === 'train') return { flops: trainFlops(c, 4, 256, 16) };
  const lp = linearParams(c);
  return { bytes: decodeBytes(c, p.dtype === 'bf16' ? 2 : 4), flops: 2 * Number(p.args.B ?? 1) * (lp.body + lp.head) };
}

export function runLlmRows(o: { quick: boolean; full: boolean; reps?: number; threads: number; tools: Tools; work: string; srcDir: string; log: (s: string) => void }): LlmRow[] {
  const rows: LlmRow[] = [];
  const folders = new Map<string, string>();
  const inRounds: { row: LlmRow; argv: string[]; rounds: number; results: LlmResult[] }[] = [];
  for (const p of plans(o.quick, o.full).map((q) => (o.reps ? { ...q, reps: o.reps } : q))) {
    let dir = folders.get(p.config);
    if (!dir) {
      dir = writeLlamaFolder(path.join(o.work, `llm-${p.config}`), LLM_CONFIGS[p.config]!);
      folders.set(p.config, dir);
    }
    const kv = Object.entries(p.args).map(([k, v]) => `${k}=${v}`);
    const common = [p.case, p.config, p.dtype, String(o.threads), String(p.reps), String(p.warmup)];
    const row: LlmRow = { case: p.case, config: p.config, dtype: p.dtype, threads: o.threads, args: p.args, work: workOf(p) };
    const argv = [path.join(__dirname, 'llm_child.js'), ...common, dir, ...kv];
    if (p.rounds && p.rounds > 1) inRounds.push({ row, argv, rounds: p.rounds, results: [] });
    else {
      const r = run(process.execPath, argv, 1_800_000);
      row.ours = lastJson(r.out);
      if (!row.ours) row.error = r.err.slice(-400);
    }
    // PyTorch's bf16 rows already multiply in bf16: an mp=bf16 row shows the plain bf16 row's PyTorch run
    const twin = p.args.mp ? rows.find((q) => q.case === p.case && q.config === p.config && q.dtype === p.dtype &&
      Object.entries(p.args).every(([k, v]) => k === 'mp' || q.args[k] === v) && !q.args.mp) : undefined;
    if (twin) row.pytorch = twin.pytorch;
    else if (o.tools.python) {
      const t = run(o.tools.python, [path.join(o.srcDir, 'torch_llm.py'), ...common, ...kv], 1_800_000, baselineEnv(o.threads, true));
      row.pytorch = lastJson(t.out);
      if (!row.pytorch) row.error = `${row.error ?? ''} pytorch: ${t.err.slice(-300)}`;
    }
    rows.push(row);
    o.log(`llm ${label(row)}: ours ${row.ours ? brief(row.ours) : inRounds.some((q) => q.row === row) ? 'in rounds below' : 'error'}; pytorch ${brief(row.pytorch)}${row.error ? ` ERROR ${row.error}` : ''}\n`);
  }
  const maxRounds = Math.max(0, ...inRounds.map((q) => q.rounds));
  for (let i = 0; i < maxRounds; i++)
    for (const q of inRounds) {
      if (i >= q.rounds) continue;
      const r = run(process.execPath, q.argv, 1_800_000);
      const res = lastJson(r.out) as LlmResult | undefined;
      if (res) q.results.push(res);
      else q.row.error = `${q.row.error ?? ''} ours, round ${i + 1}: ${r.err.slice(-300)}`;
      o.log(`llm ${label(q.row)} round ${i + 1}/${q.rounds}: ours ${res ? brief(res) : 'error'}\n`);
    }
  for (const q of inRounds) if (q.results.length) q.row.ours = pooledLlmResult(q.results);
  return rows;
}

const brief = (x?: LlmResult) => (x ? `${x.medianMs.toFixed(0)} ms, ${x.tokensPerS.toFixed(1)} tok/s, RSS ${x.rssAfterLoadMB.toFixed(0)}->${x.peakRssMB.toFixed(0)} MB` : '-');

export function llmMarkdown(rows: LlmRow[], m: Machine | undefined, peer: string): string {
  const lines = [
    `PyTorch peer: ${peer}. Each case runs in its own process (ours and PyTorch's), so RSS is the case's own. ` +
    (rows.some((r) => r.ours?.rounds) ? `Our rows marked † ran in ${Math.max(...rows.map((r) => r.ours?.rounds ?? 0))} processes each, taking turns with each other, their steps pooled (median over all; RSS from the process with the highest peak), so ratios between them compare steps from the same minutes of the run. ` : '') +
    'Bound: prefill and train against the FLOP-bound time at the measured fp32 FMA peak, decode against the larger of weight bytes per step / measured read bandwidth (ideal storage: every projection and the head at the row\'s width) and the step\'s multiply-adds in those layers (B rows) / the measured FMA peak.',
    '',
    '| model | case | W | ours ms | ours tok/s | % of bound | PyTorch ms | PyTorch tok/s | ours/PyTorch | RSS load→peak MB (ours) | (PyTorch) | act. MB ours / PyTorch |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const r of rows) {
    const o = r.ours, p = r.pytorch;
    const share = boundShare(r, m);
    const act = (x?: LlmResult) => (x ? x.peakRssMB - x.rssAfterLoadMB : undefined);
    lines.push(`| ${r.config} | ${r.case}${r.args.B ? ` b${r.args.B}` : ''}${r.case === 'train' ? (r.args.gc === '1' ? ' gc' : ' no gc') : ''} | ${r.dtype}${r.args.mp === 'bf16' ? ' (bf16 products)' : ''} | ` +
      `${o ? `${fmt(o.medianMs, 0)}${o.rounds ? '†' : ''}` : r.error ? 'error' : '-'} | ${fmt(o?.tokensPerS)} | ${share !== undefined ? `${fmt(100 * share, 0)}%` : '-'} | ` +
      `${fmt(p?.medianMs, 0)} | ${fmt(p?.tokensPerS)} | ${o && p ? `${fmt(o.tokensPerS / p.tokensPerS, 2)}x` : '-'} | ` +
      `${o ? `${fmt(o.rssAfterLoadMB, 0)}→${fmt(o.peakRssMB, 0)}` : '-'} | ${p ? `${fmt(p.rssAfterLoadMB, 0)}→${fmt(p.peakRssMB, 0)}` : '-'} | ` +
      `${fmt(act(o), 0)} / ${fmt(act(p), 0)} |`);
  }
  const c = LLM_CONFIGS.smol!;
  const lp = linearParams(c);
  lines.push('', `Work (smol): prefill 512 = 2·${(lp.body / 1e6).toFixed(1)}M·512 + causal attention + one head row = ${fmt(prefillFlops(c, 512) / 1e9)} GFLOP; ` +
    `train step 4×256 = tokens·(4·(${(lp.body / 1e6).toFixed(1)}M + ${(lp.head / 1e6).toFixed(1)}M head) + 6·r·Σ(in+out) LoRA) + 3·attention = ${fmt(trainFlops(c, 4, 256, 16) / 1e9, 0)} GFLOP ` +
    '(forward and dx through every projection and the head, attention forward and backward, LoRA r16; no dW of frozen weights, no recomputation); ' +
    `decode reads ${fmt(decodeBytes(c, 2) / 1e6, 0)} MB of bf16 weights per step (${fmt(decodeBytes(c, 4) / 1e6, 0)} MB fp32).`);
  return lines.join('\n');
}
