// The errors lora-native throws and the argument checks that produce them. Every message has one
// shape: "Expected <what> for <argument> but received <value> (<type>)". Wrong types are
// LoraTypeError (a TypeError), out-of-range values LoraRangeError (a RangeError), everything else
// LoraError; all three carry a `code` and all three pass `instanceof LoraError`.

/** Error codes lora-native uses. */
export type LoraErrorCode =
  | 'ERR_LORA_TYPE'
  | 'ERR_LORA_RANGE'
  | 'ERR_LORA_SHAPE'
  | 'ERR_LORA_DTYPE'
  | 'ERR_LORA_DEVICE'
  | 'ERR_LORA_NO_CUDA'
  | 'ERR_LORA_CUDA'
  | 'ERR_LORA_DISPOSED'
  | 'ERR_LORA_FORMAT'
  | 'ERR_LORA_OPTION'
  | 'ERR_LORA_GRAD'
  | 'ERR_LORA_STATE'
  | 'ERR_LORA_IO'
  | 'ERR_LORA_LOAD'
  | 'ERR_LORA_NON_FINITE'
  | 'ERR_LORA_ABORTED'
  | 'ERR_LORA_OUT_OF_MEMORY'
  | 'ERR_LORA_UNSUPPORTED'
  | 'ERR_LORA_BUSY'
  | 'ERR_LORA_TEMPLATE'
  | 'ERR_LORA_INTERNAL';

function isLoraCoded(v: unknown): boolean {
  return v instanceof Error && typeof (v as { code?: unknown }).code === 'string' &&
    (v as unknown as { code: string }).code.startsWith('ERR_LORA_');
}

/**
 * The error class of lora-native. `err.code` says what went wrong (`ERR_LORA_SHAPE`, ...).
 * `instanceof LoraError` is true for every error lora-native throws, including its TypeErrors
 * and RangeErrors.
 */
export class LoraError extends Error {
  readonly code: string;
  constructor(code: LoraErrorCode | string, message: string) {
    super(message);
    this.name = 'LoraError';
    this.code = code;
  }
  static override [Symbol.hasInstance](value: unknown): boolean {
    return isLoraCoded(value);
  }
}

/** A wrong type: a TypeError with `code` 'ERR_LORA_TYPE' (also `instanceof LoraError`). */
export class LoraTypeError extends TypeError {
  readonly code = 'ERR_LORA_TYPE';
  constructor(message: string) {
    super(message);
    this.name = 'LoraTypeError';
  }
}

/** A value out of range: a RangeError with `code` 'ERR_LORA_RANGE' (also `instanceof LoraError`). */
export class LoraRangeError extends RangeError {
  readonly code = 'ERR_LORA_RANGE';
  constructor(message: string) {
    super(message);
    this.name = 'LoraRangeError';
  }
}

/** How a received value is shown in messages: `0 (number)`, `"x" (string)`, `[1,2] (array)`. */
export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'undefined';
  if (typeof v === 'string') return `${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)} (string)`;
  if (typeof v === 'number' || typeof v === 'boolean' || typeof v === 'bigint') return `${String(v)} (${typeof v})`;
  if (typeof v === 'function') return `a function (${v.name || 'anonymous'})`;
  if (Array.isArray(v)) {
    let s: string | undefined;
    try {
      s = JSON.stringify(v.length > 8 ? [...v.slice(0, 8), '…'] : v);
    } catch {
      s = undefined; // nested too deep to print (RangeError) or holding a BigInt
    }
    return `${s && s.length < 80 ? s : 'an array'} (array of ${v.length})`;
  }
  if (ArrayBuffer.isView(v)) return `a ${v.constructor.name} of ${(v as unknown as { length: number }).length}`;
  const name = (v as object).constructor?.name;
  return name && name !== 'Object' ? `a ${name}` : 'an object';
}

export function typeError(name: string, expected: string, received: unknown): LoraTypeError {
  return new LoraTypeError(`Expected ${expected} for ${name} but received ${describe(received)}`);
}

export function rangeError(name: string, expected: string, received: unknown): LoraRangeError {
  return new LoraRangeError(`Expected ${expected} for ${name} but received ${describe(received)}`);
}

export function expectInteger(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number') throw typeError(name, `an integer between ${min} and ${max}`, v);
  if (!Number.isInteger(v) || v < min || v > max) throw rangeError(name, `an integer between ${min} and ${max}`, v);
  return v;
}

/** A finite number within [min, max] (bounds optional). */
export function expectNumber(name: string, v: unknown, min = -Infinity, max = Infinity, what?: string): number {
  const expected = what ?? (min === -Infinity && max === Infinity ? 'a finite number'
    : max === Infinity ? `a finite number >= ${min}` : `a number between ${min} and ${max}`);
  if (typeof v !== 'number') throw typeError(name, expected, v);
  if (!Number.isFinite(v) || v < min || v > max) throw rangeError(name, expected, v);
  return v;
}

export function expectBoolean(name: string, v: unknown): boolean {
  if (typeof v !== 'boolean') throw typeError(name, 'a boolean', v);
  return v;
}

export function expectOneOf<T extends string>(name: string, v: unknown, allowed: readonly T[]): T {
  const list = allowed.map((a) => `'${a}'`).join(', ');
  if (typeof v !== 'string') throw typeError(name, `one of ${list}`, v);
  if (!allowed.includes(v as T)) throw rangeError(name, `one of ${list}`, v);
  return v as T;
}

export function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, prev + (a[i - 1]!.toLowerCase() === b[j - 1]!.toLowerCase() ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length]!;
}

/**
 * Checks an options object: it must be a plain object (or undefined) with only known keys; an
 * unknown key gets a "did you mean" suggestion. `aliases` maps other accepted names to known ones
 * (PEFT's `lora_alpha` for `alpha`, or camelCase for PEFT's snake_case): the result then holds the
 * known names only, and giving both names of one option is refused. Returns the object (or {}).
 */
export function checkOptions<T extends object>(where: string, opts: unknown, known: readonly string[], aliases: Readonly<Record<string, string>> = {}): Partial<T> {
  if (opts === undefined) return {};
  if (opts === null || typeof opts !== 'object' || Array.isArray(opts)) throw typeError(`${where} options`, 'an object', opts);
  aliases = Object.fromEntries(Object.entries(aliases).filter(([, k]) => known.includes(k)));
  const names = [...known, ...Object.keys(aliases)];
  for (const key of Object.keys(opts)) {
    if (names.includes(key)) continue;
    let best = '';
    let bestD = Infinity;
    for (const k of names) {
      const d = editDistance(key, k);
      if (d < bestD) { bestD = d; best = k; }
    }
    const hint = bestD <= Math.max(2, Math.floor(key.length / 3)) ? `; did you mean '${best}'?` : `; known options: ${known.join(', ')}`;
    throw new LoraError('ERR_LORA_OPTION', `Unknown option '${key}' for ${where}${hint}`);
  }
  const given = Object.keys(opts).filter((k) => k in aliases);
  if (given.length === 0) return opts as Partial<T>;
  const out: Record<string, unknown> = { ...opts };
  for (const alias of given) {
    const name = aliases[alias]!;
    const clash = Object.keys(opts).find((k) => k !== alias && (k === name || aliases[k] === name));
    if (clash) throw new LoraError('ERR_LORA_OPTION', `Expected one of '${clash}' and '${alias}' for ${where} (two names of one option) but received both`);
    out[name] = out[alias];
    delete out[alias];
  }
  return out as Partial<T>;
}

/** PEFT's snake_case names of LoRA settings, as aliases of lora-native's camelCase ones. */
export const PEFT_LORA_ALIASES: Readonly<Record<string, string>> = {
  r: 'rank', lora_alpha: 'alpha', lora_dropout: 'dropout', use_rslora: 'useRslora', target_modules: 'targetModules',
  use_dora: 'useDora', init_lora_weights: 'initLoraWeights',
};
