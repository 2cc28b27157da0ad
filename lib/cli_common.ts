// What the `lora-native` commands share: the usage error (exit 2), the flag helpers over
// node:util parseArgs, and escaping of text from files before it reaches a terminal. The commands
// live in cli.ts, cli_train.ts and cli_generate.ts.
import { parseArgs, ParseArgsConfig } from 'node:util';

import type { DType } from './tensor';

/** A command line the commands cannot run: printed with the usage line, exit status 2. */
export class UsageError extends Error {}

/** --matmul-precision (generate, train): fp32 (default) or bf16 products with bf16 weights (loadCausalLM's matmulPrecision). */
export function matmulPrecisionArg(v: string | undefined): 'fp32' | 'bf16' | undefined {
  if (v === undefined || v === 'fp32' || v === 'bf16') return v;
  throw new UsageError(`--matmul-precision must be fp32 or bf16 but is '${v}'`);
}

/** --dtype values and the dtypes they name. */
export const DTYPE_ARG: Record<string, DType> = { f32: 'float32', float32: 'float32', bf16: 'bfloat16', bfloat16: 'bfloat16', f16: 'float16', float16: 'float16' };

// Control characters (C0, DEL, C1), Unicode line separators and bidi overrides as visible escapes:
// a name or metadata value from a file cannot clear the screen, retitle the terminal, reorder text
// or start a fake output line.
// eslint-disable-next-line no-control-regex
const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** `s` safe to print on a terminal (see UNPRINTABLE). */
export function printable(s: string): string {
  return s.replace(UNPRINTABLE, (c) => {
    const code = c.charCodeAt(0);
    return code <= 0xff ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
}

/** Parses flags strictly (an unknown flag is a UsageError); `--no-x` sets a boolean x to false. */
export function parse(argv: string[], options: NonNullable<ParseArgsConfig['options']>, positionals = 0) {
  let r;
  try {
    r = parseArgs({ args: argv, options, allowPositionals: positionals > 0, strict: true, allowNegative: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (r.positionals.length > positionals) throw new UsageError(`unexpected argument '${r.positionals[positionals]}'`);
  return r;
}

export function need(v: unknown, flag: string): string {
  if (typeof v !== 'string' || v === '') throw new UsageError(`missing ${flag}`);
  return v;
}

export function numberArg(v: string, flag: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`${flag} must be a number but is '${v}'`);
  return n;
}
