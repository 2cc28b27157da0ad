// What the `lora-native` commands share: the usage error (exit 2) and the flag helpers over
// node:util parseArgs. The commands live in cli.ts and cli_train.ts.
import { parseArgs, ParseArgsConfig } from 'node:util';

import type { DType } from './tensor';

/** A command line the commands cannot run: printed with the usage line, exit status 2. */
export class UsageError extends Error {}

/** --dtype values and the dtypes they name. */
export const DTYPE_ARG: Record<string, DType> = { f32: 'float32', float32: 'float32', bf16: 'bfloat16', bfloat16: 'bfloat16', f16: 'float16', float16: 'float16' };

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
