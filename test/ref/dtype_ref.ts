// Float64 references of the storage dtypes (bfloat16 and float16 rounding, as native/backend/half.h
// does it, written from IEEE 754's round-to-nearest-even) and the seeded data the parity cases use.

/** Seeded values in [-scale, scale) (or (0.05, 0.05 + scale) when positive), as float32 would hold them. */
export function seeded(n: number, seed: number, scale = 1, positive = false): Float64Array {
  let a = (seed * 2654435761) >>> 0;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    const u = ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    out[i] = Math.fround(positive ? 0.05 + scale * u : scale * (2 * u - 1));
  }
  return out;
}

const f32Bits = new Float32Array(1);
const u32Bits = new Uint32Array(f32Bits.buffer);

/** One value float32 -> bfloat16 -> float32, rounding to nearest even (native/backend/half.h); NaN stays NaN. */
export function bf16Value(v: number): number {
  f32Bits[0] = v;
  const bits = u32Bits[0]!;
  if ((bits & 0x7fffffff) > 0x7f800000) return NaN;
  u32Bits[0] = ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) << 16;
  return f32Bits[0]!;
}

/** bf16Value of every element (a plain loop: Float64Array.from with a callback took a tenth of a parity run). */
export function bf16(a: ArrayLike<number>): Float64Array {
  const out = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = bf16Value(a[i]!);
  return out;
}

/** float32 -> IEEE float16 -> float32, rounding to nearest even, with subnormals and overflow to ±inf. */
export function f16(a: ArrayLike<number>): Float64Array {
  return Float64Array.from(a, (v) => {
    if (!Number.isFinite(v) || v === 0) return v;
    const ax = Math.abs(v);
    let e = Math.floor(Math.log2(ax));
    if (2 ** e > ax) e--;  // Math.log2 may round across a power of two
    else if (2 ** (e + 1) <= ax) e++;
    e = Math.max(e, -14);
    const q = 2 ** (e - 10);  // the spacing of float16 values around ax
    let m = ax / q;
    const fl = Math.floor(m);
    m = m - fl > 0.5 || (m - fl === 0.5 && fl % 2 === 1) ? fl + 1 : fl;
    const r = m * q;
    return Math.sign(v) * (r > 65504 ? Infinity : r);
  });
}
