// Float64-world reference of the counter RNG in native/backend/rng.h, written from its definition with
// BigInt arithmetic: the dropout mask a kernel must draw for (seed, index).
const MASK64 = (1n << 64n) - 1n;

function mix(z: bigint): bigint {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

export function uniformRef(seed: number, index: number): number {
  const z = mix((BigInt(seed) * 0x9e3779b97f4a7c15n + BigInt(index) + 0x632be59bd9b4e019n) & MASK64);
  return Number(z >> 40n) / 16777216;
}

/** The kept-and-scaled factor of element `index`: 1/(1-p) or 0. */
export function dropoutFactorRef(seed: number, index: number, p: number): number {
  return uniformRef(seed, index) >= Math.fround(p) ? 1 / (1 - p) : 0;
}
