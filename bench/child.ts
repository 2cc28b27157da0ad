// One benchmark case at one shape, thread count and dtype, in its own process (so caches, the
// allocator and thread pools start the same for every row). Prints one JSON line.
//   node dist/bench/child.js <case> <N> <C> <OC> <R> <threads> <fp32|bf16> <reps> <warmup>
import * as path from 'path';
import { Case, DType, native, timeAll } from './common';

const [name, N, C, OC, R, threads, dtype, reps, warmup] = process.argv.slice(2);
// eslint-disable-next-line @typescript-eslint/no-require-imports
const c: Case = require(path.join(__dirname, 'cases', name)).default;
native.setNumThreads(Number(threads));
const shape = { N: +N, C: +C, OC: +OC, R: +R };
const { variants, work, dispose } = c.setup(shape, dtype as DType);
const out: Record<string, unknown> = { case: name, shape, threads: +threads, dtype, work, isa: native.features().isa, variants: {} };
out.variants = timeAll(variants, +reps, +warmup);
dispose();
process.stdout.write(JSON.stringify(out) + '\n');
