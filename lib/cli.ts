// The `lora-native` command: merge an adapter into a base model, inspect files, combine adapters,
// export them, and fine-tune one (`train`, in cli_train.ts).
// Streams tensors one at a time (a model is never held whole), writes atomically, stops cleanly on
// SIGINT/SIGTERM, prints what files contain with control characters escaped, and reports errors
// as one line on stderr with a non-zero exit.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ParseArgsConfig } from 'node:util';

import { DTYPE_ARG, need, numberArg, parse, UsageError } from './cli_common';
import { TRAIN_FLAGS, TRAIN_HELP, trainCommand, TRAIN_USAGE } from './cli_train';
import { LoraError } from './errors';
import { ModuleContribution } from './adapted';
import { combineAdapters, Combination } from './combine';
import { exportGgufAdapter } from './export/gguf';
import { exportMlxAdapter } from './export/mlx';
import { checkWritableFolder, makeFolder, removeTempFiles } from './file_io';
import { checkFinite, mergeError, MergeReportEntry, mergeWeight } from './merge';
import { ADAPTER_CONFIG, loadPeftAdapter, PeftAdapter, PeftModule, savePeftAdapter } from './peft';
import {
  isFloatDtype, openModel, openModelReader, RawTensor, SAFETENSORS_DTYPE, SafetensorsDtype, SafetensorsEntry, saveSafetensorsAsync, tensorDtypeFor,
} from './safetensors';
import { DType, Tensor, tensor } from './tensor';

const USAGE = `Usage:
${TRAIN_USAGE}
  lora-native merge --base <model.safetensors | dir> --adapter <peft dir> --out <file>
                    [--scale k] [--dtype f32|bf16|f16] [--unsafe] [--probe-rows n]
  lora-native inspect <file | dir>
  lora-native combine --adapter <dir> --adapter <dir> [...] --weights w1,w2[,...]
                      --mode linear|cat|svd [--rank k] --out <dir>
  lora-native export --adapter <peft dir> --model <base model dir> --to peft|gguf|mlx|merged --out <path>
  lora-native --help | --version

${TRAIN_HELP}
merge    merges the adapter into every tensor it adapts and writes all tensors to --out (its
         folder is created; the base's config.json and tokenizer files are copied beside it)
  --scale k        multiply the adapter's scaling by k (default 1)
  --dtype d        convert floating tensors to f32, bf16 or f16 (default: keep each dtype)
  --unsafe         write merged weights even when they hold NaN or Inf (refused by default)
  --probe-rows n   random probe rows per tensor for the error report (default 8; 0 skips it)
inspect  lists tensors (dtype, shape, size) from the headers, or an adapter's modules
combine  writes a new PEFT adapter folder --out (a new or empty folder) from weighted adapters
  --weights        one weight per --adapter, comma-separated
  --mode           linear (PEFT's rule, equal ranks), cat (exact) or svd (best rank --rank)
  --rank k         rank of an svd combination (default: the largest source rank)
export   converts a PEFT adapter for another tool; --model is the base model's folder (its
         config.json gives the architecture and head counts)
  --to             peft (a PEFT folder), gguf (a llama.cpp LoRA file), mlx (an mlx-lm adapter
                   folder) or merged (a Hugging Face folder with the adapter merged in)`;

// Every flag of every command: --help and README.md list each (test/cli.test.ts checks).
export const FLAGS = {
  merge: {
    base: { type: 'string' }, adapter: { type: 'string' }, out: { type: 'string' }, scale: { type: 'string' },
    dtype: { type: 'string' }, unsafe: { type: 'boolean' }, 'probe-rows': { type: 'string' },
  },
  inspect: {},
  combine: {
    adapter: { type: 'string', multiple: true }, weights: { type: 'string' }, mode: { type: 'string' },
    rank: { type: 'string' }, out: { type: 'string' },
  },
  export: {
    adapter: { type: 'string' }, model: { type: 'string' }, to: { type: 'string' }, out: { type: 'string' },
  },
  train: TRAIN_FLAGS,
} as const satisfies Record<string, NonNullable<ParseArgsConfig['options']>>;

// The API's option names in messages that reach the command line, and the flags that set them.
const API_TO_FLAG: [RegExp, string][] = [[/\bsafeMerge: false\b/g, '--unsafe'], [/\bsvdRank\b/g, '--rank'], [/\bprobeRows\b/g, '--probe-rows'],
  [/\bmaxSeqLength\b/g, '--max-seq-len'], [/\btargetModules\b/g, '--target']];

// Files of a Hugging Face model folder that describe the model rather than hold its weights: the
// merged file needs them beside it to load as a model. A sharded index would be wrong for it.
const MODEL_FILES = /^(config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|tokenizer\.model|vocab\.(json|txt)|merges\.txt|chat_template\.(json|jinja)|preprocessor_config\.json|.*\.tiktoken)$/;

function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(1)} ${u[i]}`;
}

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

function table(rows: string[][]): string {
  const w = rows[0]!.map((_, j) => Math.max(...rows.map((r) => r[j]!.length)));
  return rows.map((r) => r.map((c, j) => (j === r.length - 1 ? c : c.padEnd(w[j]!))).join('  ').trimEnd()).join('\n');
}

/** Progress on stderr: a redrawn bar on a TTY, plain lines otherwise. */
class Progress {
  private readonly tty: boolean;
  constructor(private readonly total: number, private readonly err: NodeJS.WriteStream) {
    this.tty = !!err.isTTY;
  }
  step(done: number, label: string, plainLine: boolean): void {
    if (this.tty) {
      const width = 30;
      const fill = Math.round((done / this.total) * width);
      this.err.write(`\r[${'#'.repeat(fill)}${'.'.repeat(width - fill)}] ${done}/${this.total} ${label.slice(0, 50).padEnd(50)}`);
      if (done === this.total) this.err.write('\n');
    } else if (plainLine) {
      this.err.write(`${label} (${done}/${this.total})\n`);
    }
  }
}

// ---- merge ------------------------------------------------------------------------------------

/** Refuses an --out that is an existing folder (a file is wanted), before any work. */
function outFileArg(v: unknown): string {
  const outFile = need(v, '--out');
  if (fs.existsSync(outFile) && fs.statSync(outFile).isDirectory())
    throw new UsageError(`--out ${outFile} is an existing folder; give the file to write, e.g. ${path.join(outFile, 'model.safetensors')}`);
  return outFile;
}

/** Refuses an --out folder that exists and is not empty (it would mix two adapters), before any work. */
function outDirArg(v: unknown): string {
  const outDir = need(v, '--out');
  if (fs.existsSync(outDir) && (!fs.statSync(outDir).isDirectory() || fs.readdirSync(outDir).length > 0))
    throw new UsageError(`--out ${outDir} ${fs.statSync(outDir).isDirectory() ? 'is a folder that is not empty' : 'is an existing file'}; give a new or empty folder`);
  return outDir;
}

/** Copies the base model's config and tokenizer files into outDir (atomically); returns their names. */
function copyModelFiles(basePath: string, outDir: string): string[] {
  const srcDir = fs.statSync(basePath).isDirectory() ? basePath : path.dirname(basePath);
  if (path.resolve(srcDir) === path.resolve(outDir)) return [];
  const copied: string[] = [];
  for (const f of fs.readdirSync(srcDir).filter((n) => MODEL_FILES.test(n)).sort()) {
    const dest = path.join(outDir, f);
    try {
      fs.copyFileSync(path.join(srcDir, f), `${dest}.${process.pid}.tmp`);
      fs.renameSync(`${dest}.${process.pid}.tmp`, dest);
    } catch (e) {
      fs.rmSync(`${dest}.${process.pid}.tmp`, { force: true });
      throw new LoraError('ERR_LORA_IO', `Could not copy ${f} from ${srcDir} to ${outDir}: ${(e as Error).message}`);
    }
    copied.push(f);
  }
  return copied;
}

async function merge(argv: string[], out: NodeJS.WriteStream, err: NodeJS.WriteStream, signal: AbortSignal): Promise<void> {
  const { values: v } = parse(argv, FLAGS.merge);
  const basePath = need(v.base, '--base');
  const adapterDir = need(v.adapter, '--adapter');
  const outFile = outFileArg(v.out);
  const scale = v.scale === undefined ? 1 : numberArg(v.scale as string, '--scale');
  const probeRows = v['probe-rows'] === undefined ? 8 : numberArg(v['probe-rows'] as string, '--probe-rows');
  if (!Number.isInteger(probeRows) || probeRows < 0) throw new UsageError(`--probe-rows must be a non-negative integer but is '${v['probe-rows']}'`);
  let forced: DType | undefined;
  if (v.dtype !== undefined) {
    forced = DTYPE_ARG[v.dtype as string];
    if (!forced) throw new UsageError(`--dtype must be f32, bf16 or f16 but is '${v.dtype}'`);
  }
  checkWritableFolder(outFile, true);
  // Every base file stays open through one handle until the output is written: a base that
  // another job rewrites meanwhile is refused (ERR_LORA_IO), never mixed into the output.
  const model = openModelReader(basePath);
  let adapter: PeftAdapter | null = null;
  const mergedBias = new Map<string, Tensor>();
  try {
    adapter = loadPeftAdapter(adapterDir);
    const fifo = !!adapter.config.fan_in_fan_out;
    const byName = new Map(model.entries.map((e) => [e.name, e]));
    // check everything before writing anything
    const plan = new Map<string, { mod: string; m: PeftModule }>();
    for (const [mod, m] of adapter.modules) {
      const e = byName.get(`${mod}.weight`);
      if (!e) throw new LoraError('ERR_LORA_FORMAT', `The adapter adapts '${mod}' but ${model.source} has no tensor '${mod}.weight'`);
      const transposed = fifo || m.kind === 'embedding';
      const want = transposed ? [m.loraA.shape[1]!, m.loraB.shape[0]!] : [m.loraB.shape[0]!, m.loraA.shape[1]!];
      if (e.shape.length !== 2 || e.shape[0] !== want[0] || e.shape[1] !== want[1])
        throw new LoraError('ERR_LORA_SHAPE', `The adapter needs '${e.name}' of shape [${want.join(', ')}] but ${model.source} has [${e.shape.join(', ')}]`);
      if (!isFloatDtype(e.dtype)) throw new LoraError('ERR_LORA_DTYPE', `Cannot merge into '${e.name}', which is ${e.dtype}`);
      plan.set(e.name, { mod, m });
    }
    const outDtypeOf = (e: SafetensorsEntry): SafetensorsDtype => (forced && isFloatDtype(e.dtype) ? SAFETENSORS_DTYPE[forced] : e.dtype);
    const report: MergeReportEntry[] = [];
    const contribFor = (m: PeftModule, withBias: boolean): ModuleContribution[] =>
      [{ module: withBias ? m : { ...m, loraBBias: null }, scaling: m.scaling * scale, fanInFanOut: fifo }];
    // F64 is written from a float32 tensor as bytes; every other dtype as the tensor itself
    const encode = (t: Tensor, dtype: SafetensorsDtype): Uint8Array | Tensor =>
      dtype === 'F64' ? new Uint8Array(Float64Array.from(t.toFloat32Array()).buffer) : t;
    const tensorDtype = (d: SafetensorsDtype): DType => (d === 'F64' ? 'float32' : tensorDtypeFor(d));

    // merged lora_bias vectors are small: compute them first so weight and bias entries stay independent
    for (const [, { mod, m }] of plan) {
      if (!m.loraBBias) continue;
      const name = `${mod}.bias`;
      const be = byName.get(name);
      const dt: SafetensorsDtype = be ? outDtypeOf(be) : forced ? SAFETENSORS_DTYPE[forced] : 'F32';
      mergedBias.set(name, mergeBias(name, be ? model.readTensor(be, 'float32') : null, m, m.scaling * scale, tensorDtype(dt), !v.unsafe));
    }
    const total = model.entries.length + [...mergedBias.keys()].filter((k) => !byName.has(k)).length;
    const progress = new Progress(total, err);
    const sources = new Map<string, RawTensor>();
    for (const e of model.entries) {
      const dt = outDtypeOf(e);
      const p = plan.get(e.name);
      if (p) {
        sources.set(e.name, {
          dtype: dt, shape: e.shape, data: () => {
            const W = model.readTensor(e);
            const biasE = byName.get(`${p.mod}.bias`);
            let bias: Tensor | null = null;
            try {
              bias = biasE ? model.readTensor(biasE, 'float32') : null;
              const { weight } = mergeWeight(e.name, W, null, contribFor(p.m, false), !v.unsafe, tensorDtype(dt));
              if (probeRows > 0) report.push(mergeError(e.name, W, bias, weight, mergedBias.get(`${p.mod}.bias`) ?? null, contribFor(p.m, true), [path.basename(path.resolve(adapterDir))], probeRows, 0));
              const data = encode(weight, dt);
              if (data !== weight) weight.dispose();
              return data;
            } finally {
              W.dispose();
              bias?.dispose();
            }
          },
        });
      } else if (mergedBias.has(e.name)) {
        const t = mergedBias.get(e.name)!;
        sources.set(e.name, { dtype: dt, shape: e.shape, data: () => (dt === 'F64' ? encode(t, dt) : t.toBytes()) });
      } else if (dt === e.dtype) {
        sources.set(e.name, { dtype: dt, shape: e.shape, data: model.bytes(e) });
      } else {
        sources.set(e.name, {
          dtype: dt, shape: e.shape, data: () => {
            const t = model.readTensor(e, 'float32');
            if (dt === 'F32') return t;
            try {
              return dt === 'F64' ? encode(t, dt) : t.toDtype(tensorDtype(dt));
            } finally {
              t.dispose();
            }
          },
        });
      }
    }
    for (const [k, t] of mergedBias) if (!byName.has(k)) sources.set(k, { dtype: SAFETENSORS_DTYPE[t.dtype], shape: t.shape, data: () => t.toBytes() });
    // the folder of --out is created (one level at a time: see makeFolder) once the work is checked
    makeFolder(path.dirname(path.resolve(outFile)));
    await saveSafetensorsAsync(outFile, sources, {
      metadata: model.metadata,
      signal,
      onTensor: (i, _n, name) => progress.step(i + 1, printable(plan.has(name) ? `merged ${name}` : name), plan.has(name)),
    });
    const copied = copyModelFiles(basePath, path.dirname(path.resolve(outFile)));
    const worst = report.reduce((m, r) => Math.max(m, r.relError), 0);
    out.write(`wrote ${outFile}: ${model.entries.length} tensors, ${plan.size} merged (scale ${scale}${forced ? `, dtype ${forced}` : ''})\n`);
    if (copied.length) out.write(`copied beside it from the base: ${copied.join(', ')}\n`);
    if (report.length) {
      out.write('merge error (max |merged forward - adapter forward| on random probe inputs):\n');
      out.write(table([['tensor', 'dtype', 'max abs error', 'max abs output', 'relative'],
        ...report.map((r) => [printable(r.name), r.dtype, r.maxAbsError.toExponential(3), r.maxAbsOutput.toExponential(3), r.relError.toExponential(3)])]) + '\n');
      out.write(`worst relative error: ${worst.toExponential(3)}\n`);
    }
  } finally {
    for (const t of mergedBias.values()) t.dispose();
    adapter?.dispose();
    model.close();
  }
}

/**
 * One merged lora_B.bias: base bias (or zeros) + s·b_B in float32, rounded to `dtype`, refused when
 * any value is NaN/Inf in float32 or after rounding (unless `safe` is false), as weights are.
 * Takes ownership of `base`.
 */
function mergeBias(name: string, base: Tensor | null, m: PeftModule, s: number, dtype: DType, safe: boolean): Tensor {
  let t32: Tensor | null = null;
  try {
    const cur = base ? base.toFloat32Array() : new Float32Array(m.loraB.shape[0]!);
    const bb = m.loraBBias!.toFloat32Array();
    for (let i = 0; i < cur.length; i++) cur[i] = cur[i]! + s * bb[i]!;
    t32 = tensor(cur, [cur.length]);
    if (safe) checkFinite(name, t32, 'in float32 after merging lora_B.bias');
    const t = dtype === 'float32' ? t32 : t32.toDtype(dtype);
    if (t !== t32) t32.dispose();
    t32 = t;
    if (safe) checkFinite(name, t, `after merging lora_B.bias and rounding to ${dtype}`);
    t32 = null;
    return t;
  } finally {
    base?.dispose();
    t32?.dispose();
  }
}

// ---- inspect ----------------------------------------------------------------------------------

function inspectAdapter(dir: string, out: NodeJS.WriteStream): void {
  const a = loadPeftAdapter(dir);
  try {
    const c = a.config;
    // everything printed from the files goes through printable(): names and strings are the file's
    out.write(`PEFT adapter ${printable(dir)}\n`);
    out.write(`  peft_type ${printable(String(c.peft_type ?? 'LORA'))}, r ${c.r ?? 8}, lora_alpha ${c.lora_alpha ?? 8}, use_rslora ${!!c.use_rslora}, use_dora ${!!c.use_dora}, fan_in_fan_out ${!!c.fan_in_fan_out}\n`);
    out.write(`  target_modules ${printable(JSON.stringify(c.target_modules ?? null))}\n`);
    if (c.base_model_name_or_path) out.write(`  base_model_name_or_path ${printable(String(c.base_model_name_or_path))}\n`);
    const rows = [['module', 'kind', 'rank', 'alpha', 'scaling', 'lora_A', 'lora_B', 'extras', 'params']];
    for (const [name, m] of a.modules) {
      const extras = [m.loraBBias ? 'bias' : '', m.magnitude ? 'dora' : ''].filter(Boolean).join(',') || '-';
      const params = m.loraA.size + m.loraB.size + (m.loraBBias?.size ?? 0) + (m.magnitude?.size ?? 0);
      rows.push([printable(name), m.kind, String(m.rank), String(m.alpha), m.scaling.toPrecision(6).replace(/\.?0+$/, ''), `[${m.loraA.shape.join(', ')}] ${m.loraA.dtype}`, `[${m.loraB.shape.join(', ')}] ${m.loraB.dtype}`, extras, String(params)]);
    }
    out.write(table(rows).replace(/^/gm, '  ') + '\n');
    for (const [k, t] of a.extraTensors) out.write(`  other tensor ${printable(k)} [${t.shape.join(', ')}] ${t.dtype}\n`);
    out.write(`  ${a.modules.size} modules, ${a.numParameters} LoRA parameters\n`);
  } finally {
    a.dispose();
  }
}

function inspect(argv: string[], out: NodeJS.WriteStream): void {
  const { positionals } = parse(argv, FLAGS.inspect, 1);
  const p = need(positionals[0], 'a file or folder to inspect');
  if (fs.existsSync(path.join(p, ADAPTER_CONFIG))) return inspectAdapter(p, out);
  const m = openModel(p);
  out.write(`${printable(m.source)}${m.files.length > 1 ? ` (${m.files.length} shards)` : ''}\n`);
  const rows = [['tensor', 'dtype', 'shape', 'size']];
  let params = 0;
  let bytes = 0;
  for (const e of m.entries) {
    rows.push([printable(e.name), e.dtype, `[${e.shape.join(', ')}]`, fmtBytes(e.byteLength)]);
    params += e.shape.reduce((a, b) => a * b, 1);
    bytes += e.byteLength;
  }
  out.write(table(rows).replace(/^/gm, '  ') + '\n');
  for (const [k, val] of Object.entries(m.metadata)) out.write(`  metadata ${printable(k)} = ${printable(val)}\n`);
  out.write(`  ${m.entries.length} tensors, ${params} parameters, ${fmtBytes(bytes)}\n`);
}

// ---- combine ----------------------------------------------------------------------------------

function combine(argv: string[], out: NodeJS.WriteStream): void {
  const { values: v } = parse(argv, FLAGS.combine);
  const dirs = (v.adapter as string[] | undefined) ?? [];
  if (dirs.length === 0) throw new UsageError('missing --adapter (give one per adapter)');
  const weightsArg = need(v.weights, '--weights');
  const weights = weightsArg.split(',').map((w) => numberArg(w, '--weights'));
  if (weights.length !== dirs.length) throw new UsageError(`--weights has ${weights.length} values for ${dirs.length} adapters`);
  const mode = need(v.mode, '--mode');
  if (mode !== 'linear' && mode !== 'cat' && mode !== 'svd') throw new UsageError(`--mode must be linear, cat or svd but is '${mode}'`);
  const outDir = outDirArg(v.out);
  let svdRank: number | undefined;
  if (v.rank !== undefined) {
    svdRank = numberArg(v.rank as string, '--rank');
    if (!Number.isInteger(svdRank) || svdRank < 1) throw new UsageError(`--rank must be a positive integer but is '${v.rank}'`);
  }
  const adapters: PeftAdapter[] = [];
  let combined: PeftAdapter | null = null;
  try {
    for (const d of dirs) adapters.push(loadPeftAdapter(d));
    combined = combineAdapters(adapters, weights, mode as Combination, svdRank === undefined ? undefined : { svdRank });
    // a new folder appears whole or not at all: write a sibling temp folder, then rename it
    // (rename(2) replaces an empty folder, the only kind outDirArg lets through)
    checkWritableFolder(outDir, true);
    makeFolder(path.dirname(path.resolve(outDir)));
    const tmp = path.join(path.dirname(path.resolve(outDir)), `.${path.basename(outDir)}.${process.pid}.tmp`);
    try {
      savePeftAdapter(tmp, combined);
      fs.renameSync(tmp, outDir);
    } catch (e) {
      fs.rmSync(tmp, { recursive: true, force: true });
      // the temp folder is ours, not the user's: say --out
      if (e instanceof LoraError && e.code === 'ERR_LORA_IO') throw new LoraError('ERR_LORA_IO', e.message.split(tmp).join(path.resolve(outDir)));
      throw e;
    }
    const ranks = [...combined.modules.values()].map((m) => m.rank);
    out.write(`wrote ${outDir}: ${mode} combination of ${dirs.length} adapters, ${combined.modules.size} modules, rank ${Math.min(...ranks)}${Math.max(...ranks) !== Math.min(...ranks) ? `-${Math.max(...ranks)}` : ''}, scaling 1\n`);
  } finally {
    for (const a of adapters) a.dispose();
    combined?.dispose();
  }
}

// ---- export ---------------------------------------------------------------------------------

async function exportAdapter(argv: string[], out: NodeJS.WriteStream, err: NodeJS.WriteStream, signal: AbortSignal): Promise<void> {
  const { values: v } = parse(argv, FLAGS.export);
  const adapterDir = need(v.adapter, '--adapter');
  const modelDir = need(v.model, '--model');
  const to = need(v.to, '--to');
  const outPath = need(v.out, '--out');
  if (!fs.existsSync(modelDir) || !fs.statSync(modelDir).isDirectory()) throw new LoraError('ERR_LORA_IO', `Could not find the model folder ${modelDir}`);
  switch (to) {
    case 'peft': {
      const a = loadPeftAdapter(adapterDir);
      try {
        savePeftAdapter(outPath, a);
      } finally {
        a.dispose();
      }
      out.write(`wrote ${outPath}: PEFT adapter (${ADAPTER_CONFIG}, adapter_model.safetensors)\n`);
      return;
    }
    case 'gguf': {
      const r = exportGgufAdapter(adapterDir, { modelDir, out: outPath });
      out.write(`wrote ${outPath}: GGUF LoRA adapter for llama.cpp (${r.architecture}, ${r.tensors} tensors, alpha ${r.alpha}` +
        `${r.permuted.length ? `, ${r.permuted.length} q/k modules permuted` : ''}${r.rescaled.length ? `, ${r.rescaled.length} modules rescaled into lora_b` : ''})\n`);
      return;
    }
    case 'mlx': {
      const r = exportMlxAdapter(adapterDir, { modelDir, out: outPath });
      out.write(`wrote ${outPath}: mlx-lm adapter (${r.fineTuneType}, ${r.modelType}, rank ${r.rank}, scale ${r.scale}, last ${r.numLayers} layers, keys ${r.keys.join(', ')})\n`);
      return;
    }
    case 'merged': {
      // merge() creates the folder and copies the base's config and tokenizer files beside the weights
      await merge(['--base', modelDir, '--adapter', adapterDir, '--out', path.join(outPath, 'model.safetensors')], out, err, signal);
      return;
    }
    default:
      throw new UsageError(`--to must be peft, gguf, mlx or merged but is '${to}'`);
  }
}

// ---- entry --------------------------------------------------------------------------------------

const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

/**
 * Runs `work` with SIGINT/SIGTERM/SIGHUP turned into an abort: the merge stops at its next chunk,
 * removes its temp file and exits 128 + the signal's number (train stops after its step, writes
 * its adapter and checkpoint, and exits so too). A second signal removes temp files at once and exits.
 */
async function interruptible(err: NodeJS.WriteStream, work: (signal: AbortSignal) => Promise<void>): Promise<number> {
  const ac = new AbortController();
  let caught: NodeJS.Signals | null = null;
  const exitCode = (sig: NodeJS.Signals) => 128 + (os.constants.signals[sig] ?? 2);
  const onSignal = (sig: NodeJS.Signals) => {
    if (caught) {
      removeTempFiles();
      process.exit(exitCode(sig));
    }
    caught = sig;
    ac.abort(new Error(`interrupted by ${sig}`));
  };
  for (const s of SIGNALS) process.on(s, onSignal);
  try {
    await work(ac.signal);
    return caught ? exitCode(caught) : 0;
  } catch (e) {
    if (!caught) throw e;
    removeTempFiles();
    err.write(`lora-native: interrupted by ${caught}; nothing was written and no partial output is left\n`);
    return exitCode(caught);
  } finally {
    for (const s of SIGNALS) process.off(s, onSignal);
  }
}

const quietOnEpipe = new WeakSet<NodeJS.WriteStream>();

/** Runs the command line; resolves the exit code (0 ok, 1 failure, 2 usage, 128 + n on signal n). */
export async function main(argv: string[], out: NodeJS.WriteStream = process.stdout, err: NodeJS.WriteStream = process.stderr): Promise<number> {
  // `lora-native inspect x | head`: a reader that stops early is not an error; exit quietly
  if (!quietOnEpipe.has(out) && typeof out.on === 'function') {
    quietOnEpipe.add(out);
    out.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
      throw e;
    });
  }
  const [cmd, ...rest] = argv;
  try {
    switch (cmd) {
      case 'merge': return await interruptible(err, (signal) => merge(rest, out, err, signal));
      case 'inspect': inspect(rest, out); return 0;
      case 'combine': combine(rest, out); return 0;
      case 'export': return await interruptible(err, (signal) => exportAdapter(rest, out, err, signal));
      case 'train': return await interruptible(err, (signal) => trainCommand(rest, out, err, signal));
      case '--version': case '-v': {
        // eslint-disable-next-line @typescript-eslint/no-require-imports
        const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string };
        out.write(`${pkg.version}\n`);
        return 0;
      }
      case '--help': case '-h': case 'help': out.write(USAGE + '\n'); return 0;
      case undefined: err.write(USAGE + '\n'); return 2;
      default: throw new UsageError(`unknown command '${cmd}'`);
    }
  } catch (e) {
    if (e instanceof UsageError) {
      err.write(`lora-native: ${printable(e.message)}\n${USAGE.split('\n')[0]} (see lora-native --help)\n`);
      return 2;
    }
    let msg = e instanceof Error ? e.message : String(e);
    for (const [api, flag] of API_TO_FLAG) msg = msg.replace(api, flag);
    const code = (e as { code?: string })?.code;
    // a message may quote names from a file: its first line only, escaped
    err.write(`lora-native: ${printable(msg.split('\n')[0]!)}${code && code.startsWith('ERR_LORA') ? ` [${code}]` : ''}\n`);
    return 1;
  }
}

if (require.main === module) void main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
