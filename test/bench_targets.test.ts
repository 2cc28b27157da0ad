// The bench's target judging (bench/targets.ts) on hand-made rows: which row each target reads,
// the bf16-products rows beside the default ones, and the "unreachable here" notes, so that a
// mislabelled or dropped target cannot hide in a result file.
import t from 'tap';
import { boundShare, evaluateLlmTargets, evaluateTargets, GEMM_512, LlmRow, pooledLlmResult, Row } from '../bench/targets';
import type { Machine } from '../bench/machine';

const machine = {
  perThreads: {
    '1': { fmaGflops: 200, bf16DotGflops: 400, readGBs: 20, updateGBs: 30 },
    '2': { fmaGflops: 400, bf16DotGflops: 800, readGBs: 40, updateGBs: 60 },
  },
} as unknown as Machine;

const result = (ms: number, tokens: number) => ({ medianMs: ms, minMs: ms, reps: 1, tokens, tokensPerS: (1000 * tokens) / ms, rssAfterLoadMB: 500, peakRssMB: 600 });
const row = (kase: LlmRow['case'], dtype: LlmRow['dtype'], args: Record<string, string>, flops: number, ours: number, torch: number, tokens = 512): LlmRow =>
  ({ case: kase, config: 'smol', dtype, threads: 2, args, work: { flops }, ours: result(ours, tokens), pytorch: result(torch, tokens) });

t.test('model rows: rows without an mp argument are the fp32-product rows, bf16-product rows are judged apart', async (t) => {
  const F = 100e9; // 100 GFLOP: 250 ms at the 400 GFLOP/s two-thread FMA peak, 125 ms at the bf16-dot peak
  const rows = [
    row('prefill', 'fp32', {}, F, 300, 600),
    row('prefill', 'bf16', {}, F, 300, 200),
    row('prefill', 'bf16', { mp: 'bf16' }, F, 150, 200),
    row('train', 'fp32', { gc: '0' }, 4 * F, 2000, 5000, 1024),
    row('train', 'fp32', { gc: '1' }, 4 * F, 2400, 6000, 1024),
    row('train', 'bf16', { gc: '0' }, 4 * F, 1500, 3000, 1024),
    row('train', 'bf16', { gc: '0', mp: 'bf16' }, 4 * F, 1200, 3000, 1024),
  ];
  const ts = evaluateLlmTargets(rows, machine);
  const get = (target: string, r: string) => ts.find((x) => x.target === target && x.row === r);
  t.equal(get('prefill 512: % of FLOP-bound time', 'smol prefill fp32')?.measured, '83%', '250 of 300 ms');
  t.equal(get('prefill 512: vs PyTorch', 'smol prefill fp32')?.met, true, '2x PyTorch');
  const bf = get('prefill 512: vs PyTorch', 'smol prefill bf16');
  t.equal(bf?.met, false);
  t.match(bf?.note ?? '', /^unreachable here: 1.50x needs .* FLOP bound with fp32 products/, '1.5x of 200 ms asks for 133 ms, under the 250 ms floor');
  const bp = get('prefill 512: vs PyTorch', 'smol prefill bf16 (bf16 products)');
  t.equal(bp?.met, false, '200 / 150 ms = 1.33x');
  t.equal(bp?.measured.startsWith('1.33x'), true, '200 vs 150 ms');
  t.equal(bp?.note, undefined, '133 ms is above the 125 ms floor at the bf16-dot peak: reachable, no note');
  const train = ts.filter((x) => x.target === 'train: tokens/s vs PyTorch at its best').map((x) => x.row);
  t.same(train, ['smol train fp32', 'smol train bf16', 'smol train bf16 (bf16 products)'], 'every train row judged once');
  t.ok(get('train gc: time vs without', 'smol train gc fp32'), 'the gc row found beside its no-gc row');
  t.same(ts.filter((x) => x.target === 'train: bf16 frozen base vs our fp32').map((x) => x.measured), ['1.33x', '1.67x']);
});

t.test('kernel rows: a ratio goal under the work\'s time at the peak is marked unreachable', async (t) => {
  const flops = 2e9; // 10 ms at one thread's 200 GFLOP/s
  const r: Row = { case: 'lora_step', shape: GEMM_512, threads: 1, dtype: 'fp32', work: { flops }, variants: { ours: { medianMs: 12, minMs: 12, reps: 1 }, pytorch: { medianMs: 14, minMs: 14, reps: 1, config: 'peer' } } };
  const x = evaluateTargets([r], machine, [1]).find((q) => q.target.startsWith('LoRA fwd+bwd 512'))!;
  t.equal(x.met, false);
  t.match(x.note ?? '', /^unreachable here: 1.50x needs 9.33 ms, under the 10.00 ms .* FMA peak; peer$/);
  const reachable = evaluateTargets([{ ...r, variants: { ...r.variants, pytorch: { medianMs: 20, minMs: 20, reps: 1, config: 'peer' } } }], machine, [1])
    .find((q) => q.target.startsWith('LoRA fwd+bwd 512'))!;
  t.equal(reachable.note, 'peer', 'no note when the goal is within the floor');
});

t.test('decode rows: the compute floor of a bf16 gemm row on 4..16 rows is the bf16-dot peak where the CPU has one', async (t) => {
  // 16 x 4096 x 4096: 537 MFLOP; 80% of 20 GB/s leaves 2.10 ms for the 33.5 MB of a bf16 W
  const shape = { N: 16, C: 4096, OC: 4096, R: 16 };
  const r: Row = { case: 'gemm', shape, threads: 1, dtype: 'bf16', work: { flops: 2 * 16 * 4096 * 4096, bytes: 4096 * 4096 * 2 }, variants: { ours: { medianMs: 2, minMs: 2, reps: 1 } } };
  const decode = (m: Machine) => evaluateTargets([r], m, [1]).find((q) => q.target === 'decode 4096²: % of read bandwidth' && q.row.startsWith('gemm 16x4096x4096r16 bf16'))!;
  const dot = decode(machine);
  t.equal(dot.met, true, '33.5 MB in 2 ms: 84% of 20 GB/s');
  t.match(dot.note ?? '', /^compute floor 1.34 ms, bandwidth floor 1.68 ms$/, '537 MFLOP at the 400 GFLOP/s bf16-dot peak');
  const noDot = { perThreads: { '1': { ...machine.perThreads['1']!, bf16DotGflops: 0 } } } as unknown as Machine;
  t.match(decode(noDot).note ?? '', /^unreachable here: 537 MFLOP take 2.68 ms at the FMA peak, more than the 2.10 ms 80% of the read bandwidth allows$/, 'no avx512_bf16: fp32 products');
});

t.test('model decode rows: bound by the slower of reading every weight once and the step\'s multiply-adds', async (t) => {
  // 1 GB of weights per step: 25 ms at the 40 GB/s two-thread read bandwidth
  const dec = (B: number, flops: number, mp?: string): LlmRow => ({
    case: 'decode', config: 'smol', dtype: 'bf16', threads: 2, args: { B: String(B), ...(mp ? { mp } : {}) }, work: { bytes: 1e9, flops },
    ours: result(50, B), pytorch: result(100, B),
  });
  t.equal(boundShare(dec(1, 2e9), machine), 0.5, 'B=1: 2 GFLOP take 5 ms at the FMA peak, the 25 ms read binds: 50 ms a step is 50%');
  t.equal(boundShare(dec(8, 16e9), machine), 0.8, 'B=8: 16 GFLOP take 40 ms at the 400 GFLOP/s FMA peak, past the read: 40 of 50 ms');
  t.equal(boundShare(dec(8, 16e9, 'bf16'), machine), 0.5, 'bf16 products from 4 rows: 20 ms at the bf16-dot peak, the read binds again');
  t.equal(boundShare(dec(2, 16e9, 'bf16'), machine), 0.8, 'bf16 products under 4 rows are fp32 products: the FMA peak');
  const rows = [dec(1, 2e9)];
  rows[0]!.pytorch = result(25, 1); // PyTorch 4x faster: 2x needs 80 tok/s, past the 40 tok/s bound
  const judged = evaluateLlmTargets(rows, machine).find((q) => q.target === 'decode b1 bf16: vs PyTorch')!;
  t.match(judged.note ?? '', /^unreachable here: 2\.00x needs 80\.0 tok\/s, past the 40\.0 tok\/s bound \(read bandwidth or FMA peak, whichever is slower\)$/);
});

t.test('rows run in rounds: steps pooled across processes, RSS from the process with the highest peak', async (t) => {
  const r = (times: number[], load: number, peak: number) =>
    ({ medianMs: times[0]!, minMs: times[0]!, reps: times.length, timesMs: times, tokens: 1024, tokensPerS: 0, rssAfterLoadMB: load, peakRssMB: peak });
  const p = pooledLlmResult([r([2000, 2100], 350, 1900), r([1800, 1900], 340, 1950), r([2500, 2600], 360, 1920)]);
  t.equal(p.reps, 6);
  t.equal(p.rounds, 3);
  t.equal(p.medianMs, 2050, 'median of 1800 1900 2000 2100 2500 2600');
  t.equal(p.minMs, 1800);
  t.equal(p.tokensPerS, 1024 / 2.05);
  t.same([p.rssAfterLoadMB, p.peakRssMB], [340, 1950], 'the second process: peak 1950 MB, 340 MB after loading');
  const odd = pooledLlmResult([r([3], 1, 2), r([1, 2], 1, 2)]);
  t.equal(odd.medianMs, 2, 'odd count: the middle step');
  const old = pooledLlmResult([{ ...r([5], 1, 2), timesMs: undefined, medianMs: 7 }]);
  t.equal(old.medianMs, 7, 'a result without timesMs counts as its median');
});
