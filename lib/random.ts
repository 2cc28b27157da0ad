// Seeded pseudo-random numbers for initialisation, randn and dropout seeds: splitmix64 in BigInt-free
// 32-bit halves (fast, reproducible across platforms). Not for cryptography.
import { expectInteger } from './errors';

/** A seeded generator. Same seed, same sequence, on every machine. */
export class Rng {
  private hi: number;
  private lo: number;
  private spare: number | null = null;

  constructor(seed: number) {
    expectInteger('seed', seed, 0, Number.MAX_SAFE_INTEGER);
    this.hi = (Math.floor(seed / 4294967296) ^ 0x9e3779b9) >>> 0;
    this.lo = (seed >>> 0) ^ 0x7f4a7c15;
  }

  /** A uniform 32-bit unsigned integer (mulberry32 over a 64-bit Weyl counter). */
  nextU32(): number {
    this.lo = (this.lo + 0x6d2b79f5) >>> 0;
    if (this.lo < 0x6d2b79f5) this.hi = (this.hi + 1) >>> 0;
    let z = (this.lo ^ Math.imul(this.hi, 0x85ebca6b)) >>> 0;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return (z ^ (z >>> 14)) >>> 0;
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return (this.nextU32() * 2097152 + (this.nextU32() >>> 11)) / 9007199254740992;
  }

  /** Standard normal (Box-Muller, both values used). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.uniform();
    const v = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** A seed for a kernel's counter RNG: an integer below 2^53. */
  seed(): number {
    // checkpoint() recomputes a function with the seeds its first run drew (same dropout masks)
    const s = replaying && replaying.pos < replaying.seeds.length ? replaying.seeds[replaying.pos++]! : (this.nextU32() & 0x1fffff) * 4294967296 + this.nextU32();
    if (recording) recording.push(s);
    return s;
  }

  /** The generator's state, for checkpoints. */
  getState(): [number, number, number | null] {
    return [this.hi, this.lo, this.spare];
  }

  setState(state: readonly [number, number, number | null]): void {
    [this.hi, this.lo, this.spare] = state;
  }
}

let globalRng = new Rng(0x5eed);

// Kernel seeds (dropout masks) drawn by any generator while a checkpointed function runs, and the
// ones its recomputation hands out again instead of drawing (generators do not advance then).
let recording: number[] | null = null;
let replaying: { seeds: readonly number[]; pos: number } | null = null;

/** @internal runs fn and returns the kernel seeds every generator drew during it. */
export function recordSeeds<T>(fn: () => T): { result: T; seeds: number[] } {
  const prev = recording;
  const seeds: number[] = [];
  recording = seeds;
  try {
    const result = fn();
    if (prev) prev.push(...seeds);
    return { result, seeds };
  } finally {
    recording = prev;
  }
}

/** @internal runs fn with seed() handing out `seeds` in order (then drawing as usual). */
export function replaySeeds<T>(seeds: readonly number[], fn: () => T): T {
  const prev = replaying;
  replaying = { seeds, pos: 0 };
  try {
    return fn();
  } finally {
    replaying = prev;
  }
}

/** Seeds the global generator that randn, module initialisation and dropout draw from. */
export function manualSeed(seed: number): void {
  globalRng = new Rng(seed);
}

/** The global generator (used when no seed is given). */
export function defaultRng(): Rng {
  return globalRng;
}
