// Shared test helpers: seeded data at awkward shapes, float comparisons that report the worst
// element, error assertions (class, code, message) and a live-tensor check around each test.
import { Test } from 'tap';

import { LoraError, memory } from '../lib/index';
import { Rng } from '../lib/random';

/** Seeded float64 values in [-1, 1) with no exact zeros. */
export function randomData(n: number, seed: number, scale = 1): Float64Array {
  const rng = new Rng(seed);
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    let v = 2 * rng.uniform() - 1;
    if (Math.abs(v) < 1e-3) v = 0.5;
    out[i] = v * scale;
  }
  return out;
}

/** The same values rounded to float32 and back, so a reference sees exactly what a kernel sees. */
export function f32(a: Float64Array | number[]): Float64Array {
  return Float64Array.from(Float32Array.from(a));
}

export interface Tolerance {
  atol: number;
  rtol: number;
}

/**
 * Asserts |a - r| <= atol + rtol·|r| everywhere; on failure reports the worst index, a few pairs
 * and the normalised error.
 */
export function assertClose(t: Test, actual: ArrayLike<number>, expected: ArrayLike<number>, tol: Tolerance, what: string): void {
  if (actual.length !== expected.length) {
    t.fail(`${what}: length ${actual.length} != ${expected.length}`);
    return;
  }
  let worst = -1;
  let worstExcess = 0;
  let bad = 0;
  let errNorm = 0;
  let refNorm = 0;
  for (let i = 0; i < actual.length; i++) {
    const a = actual[i]!;
    const r = expected[i]!;
    const diff = Math.abs(a - r);
    errNorm += diff * diff;
    refNorm += r * r;
    const excess = diff - (tol.atol + tol.rtol * Math.abs(r));
    if (!(excess <= 0)) {
      bad++;
      if (worst < 0 || !(excess <= worstExcess)) {
        worst = i;
        worstExcess = excess;
      }
    }
  }
  if (bad === 0) {
    t.pass(`${what} (${actual.length} values within atol ${tol.atol}, rtol ${tol.rtol})`);
    return;
  }
  const pairs: string[] = [];
  for (let i = Math.max(0, worst - 2); i < Math.min(actual.length, worst + 3); i++) pairs.push(`[${i}] ${actual[i]} vs ${expected[i]}`);
  t.fail(`${what}: ${bad} of ${actual.length} values out of tolerance; worst index ${worst} ` +
    `(${actual[worst]} vs ${expected[worst]}); normalised error ${Math.sqrt(errNorm / Math.max(refNorm, 1e-300)).toExponential(2)}; ${pairs.join(', ')}`);
}

/** Asserts fn throws a lora-native error with this class, code and message pattern. */
export function assertLoraError(t: Test, fn: () => unknown, cls: new (...args: never[]) => Error, code: string, message: RegExp, what: string): void {
  try {
    fn();
  } catch (err) {
    t.ok(err instanceof cls, `${what}: is a ${cls.name} (got ${(err as Error)?.constructor?.name})`);
    t.ok(err instanceof LoraError, `${what}: instanceof LoraError`);
    t.equal((err as { code?: string }).code, code, `${what}: code ${code}`);
    t.match((err as Error).message, message, `${what}: message`);
    return;
  }
  t.fail(`${what}: expected a throw`);
}

/** Wraps a subtest so that it fails when it leaves native tensors alive. */
export function leakChecked(t: Test, name: string, fn: (t: Test) => void | Promise<void>): Promise<void> {
  return t.test(name, async (tt) => {
    const before = memory().numTensors;
    await fn(tt);
    tt.equal(memory().numTensors, before, `${name}: live tensors before == after`);
  }) as unknown as Promise<void>;
}
