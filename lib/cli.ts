// The `lora-native` command: merge an adapter into a base model, inspect files, combine adapters.
// Streams tensors one at a time (a model is never held whole), writes atomically, and reports
// errors as one line on stderr with a non-zero exit. Not a training front end.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs, ParseArgsConfig } from 'node:util';

import { LoraError } from './errors';
import { exportGgufAdapter } from './export/gguf';
import { exportMlxAdapter } from './export/mlx';
import { combineAdapters, Combination, mergeError, mergeWeight, ModuleContribution, MergeReportEntry } from './lora_model';
import { ADAPTER_CONFIG, loadPeftAdapter, PeftAdapter, PeftModule, savePeftAdapter } from './peft';
import {
  decodeTensor, isFloatDtype, openModel, RawTensor, readTensorBytes, SAFETENSORS_DTYPE, SafetensorsDtype,
  SafetensorsEntry, saveSafetensors, tensorDtypeFor,
} from './safetensors';
import { DType, Tensor, tensor } from './tensor';

class UsageError extends Error {}

const USAGE = `Usage:
  lora-native merge --base <model.safetensors | dir> --adapter <peft dir> --out <file>
                    [--scale k] [--dtype f32|bf16|f16] [--unsafe] [--probe-rows n]
  lora-native inspect <file | dir>
  lora-native combine --adapter <dir> --adapter <dir> [...] --weights w1,w2[,...]
                      --mode linear|cat|svd [--rank k] --out <dir>
  lora-native export --adapter <peft dir> --model <base model dir> --to peft|gguf|mlx|merged --out <path>
  lora-native --help | --version

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
} as const satisfies Record<string, NonNullable<ParseArgsConfig['options']>>;

// The API's option names in messages that reach the command line, and the flags that set them.
const API_TO_FLAG: [RegExp, string][] = [[/\bsafeMerge: false\b/g, '--unsafe'], [/\bsvdRank\b/g, '--rank'], [/\bprobeRows\b/g, '--probe-rows']];

// Files of a Hugging Face model folder that describe the model rather than hold its weights: the
// merged file needs them beside it to load as a model. A sharded index would be wrong for it.
const MODEL_FILES = /^(config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|tokenizer\.model|vocab\.(json|txt)|merges\.txt|chat_template\.(json|jinja)|preprocessor_config\.json|.*\.tiktoken)$/;

const DTYPE_ARG: Record<string, DType> = { f32: 'float32', float32: 'float32', bf16: 'bfloat16', bfloat16: 'bfloat16', f16: 'float16', float16: 'float16' };

function fmtBytes(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${i === 0 ? n : n.toFixed(1)} ${u[i]}`;
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

function parse(argv: string[], options: NonNullable<ParseArgsConfig['options']>, positionals = 0) {
  let r;
  try {
    r = parseArgs({ args: argv, options, allowPositionals: positionals > 0, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (r.positionals.length > positionals) throw new UsageError(`unexpected argument '${r.positionals[positionals]}'`);
  return r;
}

function need(v: unknown, flag: string): string {
  if (typeof v !== 'string' || v === '') throw new UsageError(`missing ${flag}`);
  return v;
}

function numberArg(v: string, flag: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`${flag} must be a number but is '${v}'`);
  return n;
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

function mkdirFor(dir: string): void {
  try {
    fs.mkdirSync(dir, { recursive: true });
  } catch (e) {
    throw new LoraError('ERR_LORA_IO', `Could not create ${dir}: ${(e as Error).message}`);
  }
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

function merge(argv: string[], out: NodeJS.WriteStream, err: NodeJS.WriteStream): void {
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
  const model = openModel(basePath);
  const adapter = loadPeftAdapter(adapterDir);
  try {
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
    const read = (e: SafetensorsEntry, mode: 'keep' | 'float32' = 'keep') => decodeTensor(e, readTensorBytes(e), mode);
    const encode = (t: Tensor, dtype: SafetensorsDtype): Uint8Array => {
      if (dtype === 'F64') return new Uint8Array(Float64Array.from(t.toFloat32Array()).buffer);
      return t.toBytes();
    };
    const tensorDtype = (d: SafetensorsDtype): DType => (d === 'F64' ? 'float32' : tensorDtypeFor(d));

    // merged lora_bias vectors are small: compute them first so weight and bias entries stay independent
    const mergedBias = new Map<string, Tensor>();
    const sources = new Map<string, RawTensor>();
    for (const [, { mod, m }] of plan) {
      if (!m.loraBBias) continue;
      const be = byName.get(`${mod}.bias`);
      const dt: SafetensorsDtype = be ? outDtypeOf(be) : forced ? SAFETENSORS_DTYPE[forced] : 'F32';
      const cur = be ? read(be, 'float32').toFloat32Array() : new Float32Array(m.loraB.shape[0]!);
      const bb = m.loraBBias.toFloat32Array();
      for (let i = 0; i < cur.length; i++) cur[i] = cur[i]! + m.scaling * scale * bb[i]!;
      const t32 = tensor(cur, [cur.length]);
      const t = tensorDtype(dt) === 'float32' ? t32 : t32.toDtype(tensorDtype(dt));
      if (t !== t32) t32.dispose();
      mergedBias.set(`${mod}.bias`, t);
    }
    let index = 0;
    const total = model.entries.length + [...mergedBias.keys()].filter((k) => !byName.has(k)).length;
    const progress = new Progress(total, err);
    const names: string[] = [];
    for (const e of model.entries) {
      const dt = outDtypeOf(e);
      const p = plan.get(e.name);
      names.push(e.name);
      if (p) {
        sources.set(e.name, {
          dtype: dt, shape: e.shape, data: () => {
            const W = read(e);
            const biasE = byName.get(`${p.mod}.bias`);
            const bias = biasE ? read(biasE, 'float32') : null;
            const { weight } = mergeWeight(e.name, W, null, contribFor(p.m, false), !v.unsafe, tensorDtype(dt));
            if (probeRows > 0) report.push(mergeError(e.name, W, bias, weight, mergedBias.get(`${p.mod}.bias`) ?? null, contribFor(p.m, true), [path.basename(path.resolve(adapterDir))], probeRows, 0));
            W.dispose();
            bias?.dispose();
            const bytes = encode(weight, dt);
            weight.dispose();
            return bytes;
          },
        });
      } else if (mergedBias.has(e.name)) {
        const t = mergedBias.get(e.name)!;
        sources.set(e.name, { dtype: dt, shape: e.shape, data: () => encode(t, dt) });
      } else if (dt === e.dtype) {
        sources.set(e.name, { dtype: dt, shape: e.shape, data: () => readTensorBytes(e) });
      } else {
        sources.set(e.name, {
          dtype: dt, shape: e.shape, data: () => {
            const t = read(e, 'float32');
            const c = dt === 'F32' ? t : t.toDtype(tensorDtype(dt));
            const bytes = encode(c, dt);
            t.dispose();
            if (c !== t) c.dispose();
            return bytes;
          },
        });
      }
    }
    for (const [k, t] of mergedBias) if (!byName.has(k)) sources.set(k, { dtype: SAFETENSORS_DTYPE[t.dtype], shape: t.shape, data: () => t.toBytes() });
    mkdirFor(path.dirname(path.resolve(outFile)));
    try {
      saveSafetensors(outFile, new Map(sources), {
        metadata: model.metadata,
        onTensor: (i, _n, name) => {
          index = i + 1;
          progress.step(index, plan.has(name) ? `merged ${name}` : name, plan.has(name));
        },
      });
    } finally {
      for (const t of mergedBias.values()) t.dispose();
    }
    const copied = copyModelFiles(basePath, path.dirname(path.resolve(outFile)));
    const worst = report.reduce((m, r) => Math.max(m, r.relError), 0);
    out.write(`wrote ${outFile}: ${model.entries.length} tensors, ${plan.size} merged (scale ${scale}${forced ? `, dtype ${forced}` : ''})\n`);
    if (copied.length) out.write(`copied beside it from the base: ${copied.join(', ')}\n`);
    if (report.length) {
      out.write('merge error (max |merged forward - adapter forward| on random probe inputs):\n');
      out.write(table([['tensor', 'dtype', 'max abs error', 'max abs output', 'relative'],
        ...report.map((r) => [r.name, r.dtype, r.maxAbsError.toExponential(3), r.maxAbsOutput.toExponential(3), r.relError.toExponential(3)])]) + '\n');
      out.write(`worst relative error: ${worst.toExponential(3)}\n`);
    }
  } finally {
    adapter.dispose();
  }
}

// ---- inspect ----------------------------------------------------------------------------------

function inspectAdapter(dir: string, out: NodeJS.WriteStream): void {
  const a = loadPeftAdapter(dir);
  try {
    const c = a.config;
    out.write(`PEFT adapter ${dir}\n`);
    out.write(`  peft_type ${c.peft_type ?? 'LORA'}, r ${c.r ?? 8}, lora_alpha ${c.lora_alpha ?? 8}, use_rslora ${!!c.use_rslora}, use_dora ${!!c.use_dora}, fan_in_fan_out ${!!c.fan_in_fan_out}\n`);
    out.write(`  target_modules ${JSON.stringify(c.target_modules ?? null)}\n`);
    if (c.base_model_name_or_path) out.write(`  base_model_name_or_path ${c.base_model_name_or_path}\n`);
    const rows = [['module', 'kind', 'rank', 'alpha', 'scaling', 'lora_A', 'lora_B', 'extras', 'params']];
    for (const [name, m] of a.modules) {
      const extras = [m.loraBBias ? 'bias' : '', m.magnitude ? 'dora' : ''].filter(Boolean).join(',') || '-';
      const params = m.loraA.size + m.loraB.size + (m.loraBBias?.size ?? 0) + (m.magnitude?.size ?? 0);
      rows.push([name, m.kind, String(m.rank), String(m.alpha), m.scaling.toPrecision(6).replace(/\.?0+$/, ''), `[${m.loraA.shape.join(', ')}] ${m.loraA.dtype}`, `[${m.loraB.shape.join(', ')}] ${m.loraB.dtype}`, extras, String(params)]);
    }
    out.write(table(rows).replace(/^/gm, '  ') + '\n');
    for (const [k, t] of a.extraTensors) out.write(`  other tensor ${k} [${t.shape.join(', ')}] ${t.dtype}\n`);
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
  out.write(`${m.source}${m.files.length > 1 ? ` (${m.files.length} shards)` : ''}\n`);
  const rows = [['tensor', 'dtype', 'shape', 'size']];
  let params = 0;
  let bytes = 0;
  for (const e of m.entries) {
    rows.push([e.name, e.dtype, `[${e.shape.join(', ')}]`, fmtBytes(e.byteLength)]);
    params += e.shape.reduce((a, b) => a * b, 1);
    bytes += e.byteLength;
  }
  out.write(table(rows).replace(/^/gm, '  ') + '\n');
  for (const [k, val] of Object.entries(m.metadata)) out.write(`  metadata ${k} = ${val}\n`);
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
    mkdirFor(path.dirname(path.resolve(outDir)));
    const tmp = path.join(path.dirname(path.resolve(outDir)), `.${path.basename(outDir)}.${process.pid}.tmp`);
    try {
      savePeftAdapter(tmp, combined);
      fs.renameSync(tmp, outDir);
    } catch (e) {
      fs.rmSync(tmp, { recursive: true, force: true });
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

function exportAdapter(argv: string[], out: NodeJS.WriteStream, err: NodeJS.WriteStream): void {
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
      merge(['--base', modelDir, '--adapter', adapterDir, '--out', path.join(outPath, 'model.safetensors')], out, err);
      return;
    }
    default:
      throw new UsageError(`--to must be peft, gguf, mlx or merged but is '${to}'`);
  }
}

// ---- entry --------------------------------------------------------------------------------------

const quietOnEpipe = new WeakSet<NodeJS.WriteStream>();

/** Runs the command line; returns the exit code (0 ok, 1 failure, 2 usage). */
export function main(argv: string[], out: NodeJS.WriteStream = process.stdout, err: NodeJS.WriteStream = process.stderr): number {
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
      case 'merge': merge(rest, out, err); return 0;
      case 'inspect': inspect(rest, out); return 0;
      case 'combine': combine(rest, out); return 0;
      case 'export': exportAdapter(rest, out, err); return 0;
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
      err.write(`lora-native: ${e.message}\n${USAGE.split('\n')[0]} (see lora-native --help)\n`);
      return 2;
    }
    let msg = e instanceof Error ? e.message : String(e);
    for (const [api, flag] of API_TO_FLAG) msg = msg.replace(api, flag);
    const code = (e as { code?: string })?.code;
    err.write(`lora-native: ${msg.split('\n')[0]}${code && code.startsWith('ERR_LORA') ? ` [${code}]` : ''}\n`);
    return 1;
  }
}

if (require.main === module) process.exitCode = main(process.argv.slice(2));
