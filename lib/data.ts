// Fine-tuning data: loadDataset reads JSONL (a file, or a folder with train/valid/test.jsonl) line
// by line from a stream, tokenizes each row once (data_encode.ts) into compact typed arrays, and
// hands out padded or packed batches for any epoch, shuffled by a seed. It keeps token ids, not
// text; it does not download datasets or read Parquet/CSV.
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as readline from 'node:readline';

import { DatasetFormat, DatasetTokenizer, detectFormat, encodeRow, RowError } from './data_encode';
import { checkOptions, describe, expectBoolean, expectInteger, expectOneOf, LoraError, typeError } from './errors';
import { Rng } from './random';

export type { DatasetFormat, DatasetTokenizer } from './data_encode';

/** Label value the loss ignores (PyTorch's and Hugging Face's ignore_index). */
export const IGNORE_INDEX = -100;

export interface LoadDatasetOptions {
  /** The model's tokenizer ({@link loadTokenizer}). */
  tokenizer: DatasetTokenizer;
  /** Longest sequence in tokens; longer rows are truncated (counted in `truncated`). */
  maxSeqLength: number;
  /** 'text', 'completion' ({"prompt", "completion"}) or 'chat' ({"messages"}); default: from the first row. */
  format?: DatasetFormat;
  /** Loss only on completions / assistant turns (labels -100 elsewhere). Default true. */
  maskPrompt?: boolean;
  /** Pack several rows into each sequence (see {@link Batch}). Default false. */
  packing?: boolean;
  /** Seed of the shuffling (epoch e uses seed + e). Default 0. */
  seed?: number;
  /** Skip lines that are not valid rows (counted, with reasons, in `skipped`) instead of failing. Default false. */
  skipInvalid?: boolean;
  /** prompt/completion rows: through the chat template ('chat', mlx-lm's way) or concatenated ('plain'). Default 'chat' when the tokenizer has a chat template. */
  completionTemplate?: 'chat' | 'plain';
}

/**
 * One batch, row-major typed arrays of shape [B, T] (`shape`); {@link datasetLoss} runs a CausalLM on it
 * (or make tensors with `tensor(Float32Array.from(b.inputIds), b.shape, { dtype: 'int32' })`).
 * - `inputIds`: token ids, padded on the right with the pad id (the tokenizer's pad, else EOS, else 0).
 * - `labels`: the ids the loss predicts at each position, -100 where it does not count (prompts,
 *   padding); the model shifts them by one as Hugging Face models do (logits at t predict labels[t+1]).
 * - `attentionMask`: 1 for tokens, 0 for padding.
 * - `positionIds`: position of each token within its own row (restarting in each packed row; 0 on padding).
 * - `segmentIds` (packed batches only): 1, 2, 3, ... for the rows packed into a sequence, 0 on
 *   padding. A token attends to earlier tokens with the same segment id only, so packed rows stay
 *   independent; the first token of each packed row has label -100 (it would be predicted from
 *   the row before it), which makes the loss of a packed batch the sum of its rows' losses.
 */
export interface Batch {
  inputIds: Int32Array;
  labels: Int32Array;
  attentionMask: Int32Array;
  positionIds: Int32Array;
  segmentIds?: Int32Array;
  shape: [number, number];
  /** Dataset rows in this batch (indices into the dataset), in order. */
  rows: number[];
  /** Tokens that are not padding. */
  numTokens: number;
  /** Positions whose label the shifted loss counts (the divisor of a mean loss). */
  numLabels: number;
}

export interface BatchOptions {
  /** Sequences per batch. */
  batchSize: number;
  /** Which epoch (changes the shuffle). Default 0. */
  epoch?: number;
  /** Shuffle rows (and packed sequences). Default true. */
  shuffle?: boolean;
  /** Round T up to a multiple of this (kernels like multiples of 8 or 32). Default 1. */
  padToMultipleOf?: number;
  /** Leave out a last, smaller batch. Default false. */
  dropLast?: boolean;
}

/** A line that was skipped (skipInvalid) and why. */
export interface SkippedLine {
  line: number;
  reason: string;
}

const SKIPPED_KEPT = 20;

/**
 * A tokenized JSONL file. Rows are stored once as token ids plus a loss mask; batches are built on
 * demand for any epoch.
 */
export class Dataset {
  readonly file: string;
  readonly format: DatasetFormat;
  readonly maxSeqLength: number;
  readonly packing: boolean;
  readonly seed: number;
  /** Rows kept. */
  readonly numRows: number;
  /** Tokens of all rows (after truncation). */
  readonly numTokens: number;
  /** Tokens the loss counts. */
  readonly numLabels: number;
  /** Rows longer than maxSeqLength, cut to it. */
  readonly truncated: number;
  /** Rows left with no token to learn (e.g. a prompt longer than maxSeqLength): not kept. */
  readonly dropped: number;
  /** Invalid lines skipped (skipInvalid). */
  readonly skipped: number;
  /** The first skipped lines with their reasons. */
  readonly skippedLines: readonly SkippedLine[];
  /** The id padding uses. */
  readonly padId: number;
  private readonly ids: Int32Array;
  private readonly mask: Uint8Array;
  private readonly offsets: Float64Array;
  // the last epoch's plan, so batch() reads batch after batch without re-planning the epoch
  private planCache: { key: string; plan: number[][] } | null = null;

  /** @internal built by loadDataset. */
  constructor(init: {
    file: string; format: DatasetFormat; maxSeqLength: number; packing: boolean; seed: number; ids: Int32Array; mask: Uint8Array;
    offsets: Float64Array; truncated: number; dropped: number; skipped: number; skippedLines: SkippedLine[]; padId: number;
  }) {
    if (!init || typeof init !== 'object' || !(init.ids instanceof Int32Array) || !(init.mask instanceof Uint8Array) || !(init.offsets instanceof Float64Array) ||
      init.offsets.length < 1 || init.mask.length !== init.ids.length || init.offsets[init.offsets.length - 1] !== init.ids.length)
      throw typeError('Dataset', 'what loadDataset passes (create datasets with loadDataset)', init);
    this.file = init.file;
    this.format = init.format;
    this.maxSeqLength = init.maxSeqLength;
    this.packing = init.packing;
    this.seed = init.seed;
    this.ids = init.ids;
    this.mask = init.mask;
    this.offsets = init.offsets;
    this.numRows = init.offsets.length - 1;
    this.numTokens = init.ids.length;
    let labels = 0;
    for (let r = 0; r < this.numRows; r++) for (let i = this.offsets[r]! + 1; i < this.offsets[r + 1]!; i++) labels += this.mask[i]!;
    this.numLabels = labels;
    this.truncated = init.truncated;
    this.dropped = init.dropped;
    this.skipped = init.skipped;
    this.skippedLines = init.skippedLines;
    this.padId = init.padId;
  }

  /** Length of row r in tokens. */
  rowLength(r: number): number {
    expectInteger('row', r, 0, this.numRows - 1);
    return this.len(r);
  }

  private len(r: number): number {
    return this.offsets[r + 1]! - this.offsets[r]!;
  }

  /** Row r: its ids and labels (-100 where the loss does not count). */
  row(r: number): { inputIds: Int32Array; labels: Int32Array } {
    expectInteger('row', r, 0, this.numRows - 1);
    const a = this.offsets[r]!;
    const b = this.offsets[r + 1]!;
    const inputIds = this.ids.slice(a, b);
    const labels = new Int32Array(b - a);
    for (let i = a; i < b; i++) labels[i - a] = this.mask[i] ? this.ids[i]! : IGNORE_INDEX;
    return { inputIds, labels };
  }

  /** One line of statistics, for logs. */
  summary(): string {
    const parts = [`${this.numRows} rows (${this.format})`, `${this.numTokens} tokens`, `${this.numLabels} trained`];
    if (this.truncated) parts.push(`${this.truncated} truncated to ${this.maxSeqLength}`);
    if (this.dropped) parts.push(`${this.dropped} dropped (nothing left to train after truncation)`);
    if (this.skipped) parts.push(`${this.skipped} invalid lines skipped`);
    return `${path.basename(this.file)}: ${parts.join(', ')}`;
  }

  private checkBatchOptions(options: BatchOptions): Required<BatchOptions> {
    const o = checkOptions<BatchOptions>('batches', options, ['batchSize', 'epoch', 'shuffle', 'padToMultipleOf', 'dropLast']);
    return {
      batchSize: expectInteger('batchSize', o.batchSize, 1, 1 << 20),
      epoch: o.epoch === undefined ? 0 : expectInteger('epoch', o.epoch, 0, 1 << 30),
      shuffle: o.shuffle === undefined ? true : expectBoolean('shuffle', o.shuffle),
      padToMultipleOf: o.padToMultipleOf === undefined ? 1 : expectInteger('padToMultipleOf', o.padToMultipleOf, 1, 4096),
      dropLast: o.dropLast === undefined ? false : expectBoolean('dropLast', o.dropLast),
    };
  }

  /**
   * The sequences of an epoch: each a list of row indices (one row each without packing). Rows
   * are shuffled with seed + epoch; with packing, rows are packed best-fit-decreasing within
   * windows of 1024 rows into sequences of at most maxSeqLength tokens, whose order is shuffled.
   */
  private plan(o: Required<BatchOptions>): number[][] {
    const key = `${o.epoch}/${o.shuffle}`;
    if (this.planCache?.key === key) return this.planCache.plan;
    const plan = this.makePlan(o);
    this.planCache = { key, plan };
    return plan;
  }

  private makePlan(o: Required<BatchOptions>): number[][] {
    const order = Array.from({ length: this.numRows }, (_, i) => i);
    const rng = new Rng(this.seed + o.epoch);
    const shuffle = <T>(a: T[]) => {
      for (let i = a.length - 1; i > 0; i--) {
        const j = Math.floor(rng.uniform() * (i + 1));
        [a[i], a[j]] = [a[j]!, a[i]!];
      }
    };
    if (o.shuffle) shuffle(order);
    if (!this.packing) return order.map((r) => [r]);
    const bins: number[][] = [];
    const WINDOW = 1024;
    for (let w = 0; w < order.length; w += WINDOW) {
      const rows = order.slice(w, w + WINDOW).sort((a, b) => this.len(b) - this.len(a) || a - b);
      const open: { rows: number[]; free: number }[] = [];
      for (const r of rows) {
        const len = this.len(r);
        let best = -1;
        for (let k = 0; k < open.length; k++) if (open[k]!.free >= len && (best < 0 || open[k]!.free < open[best]!.free)) best = k;
        if (best < 0) open.push({ rows: [r], free: this.maxSeqLength - len });
        else {
          open[best]!.rows.push(r);
          open[best]!.free -= len;
        }
      }
      for (const b of open) bins.push(b.rows);
    }
    if (o.shuffle) shuffle(bins);
    return bins;
  }

  /** Number of batches in an epoch with these options. */
  numBatches(options: BatchOptions): number {
    const o = this.checkBatchOptions(options);
    const n = this.plan(o).length;
    return o.dropLast ? Math.floor(n / o.batchSize) : Math.ceil(n / o.batchSize);
  }

  /**
   * The batches of one epoch, built one at a time (see {@link Batch} for the layout).
   * @example
   * for (const b of ds.batches({ batchSize: 4, epoch: 0 })) {
   *   const loss = datasetLoss(model, b); // or tensor(Float32Array.from(b.inputIds), b.shape, { dtype: 'int32' })
   *   ...
   * }
   * @throws LoraTypeError / LoraRangeError for bad options.
   */
  *batches(options: BatchOptions): Generator<Batch> {
    const o = this.checkBatchOptions(options);
    const seqs = this.plan(o);
    const end = o.dropLast ? seqs.length - (seqs.length % o.batchSize) : seqs.length;
    for (let s = 0; s < end; s += o.batchSize) yield this.makeBatch(seqs.slice(s, s + o.batchSize), o.padToMultipleOf);
  }

  /**
   * Batch `index` of an epoch, the same batch batches() yields at that place (train() reads
   * batches so, by index, which makes a resumed run read exactly what the first run would have).
   * @example const b = ds.batch(3, { batchSize: 4, epoch: 1 });
   * @throws LoraRangeError for an index at or past numBatches(options); LoraTypeError / LoraRangeError for bad options.
   */
  batch(index: number, options: BatchOptions): Batch {
    const o = this.checkBatchOptions(options);
    const seqs = this.plan(o);
    const n = o.dropLast ? Math.floor(seqs.length / o.batchSize) : Math.ceil(seqs.length / o.batchSize);
    if (n === 0) throw new LoraError('ERR_LORA_OPTION', `Expected an epoch with at least one batch but batchSize ${o.batchSize} with dropLast leaves none of ${seqs.length} sequences`);
    expectInteger('index', index, 0, n - 1);
    return this.makeBatch(seqs.slice(index * o.batchSize, (index + 1) * o.batchSize), o.padToMultipleOf);
  }

  private makeBatch(seqs: number[][], multiple: number): Batch {
    const B = seqs.length;
    let longest = 1;
    for (const rows of seqs) longest = Math.max(longest, rows.reduce((n, r) => n + this.len(r), 0));
    const T = Math.ceil(longest / multiple) * multiple;
    const inputIds = new Int32Array(B * T).fill(this.padId);
    const labels = new Int32Array(B * T).fill(IGNORE_INDEX);
    const attentionMask = new Int32Array(B * T);
    const positionIds = new Int32Array(B * T);
    const segmentIds = this.packing ? new Int32Array(B * T) : undefined;
    let numTokens = 0;
    let numLabels = 0;
    for (let b = 0; b < B; b++) {
      let t = b * T;
      seqs[b]!.forEach((r, k) => {
        const a = this.offsets[r]!;
        const len = this.offsets[r + 1]! - a;
        for (let i = 0; i < len; i++, t++) {
          inputIds[t] = this.ids[a + i]!;
          attentionMask[t] = 1;
          positionIds[t] = i;
          if (segmentIds) segmentIds[t] = k + 1;
          if (!this.mask[a + i]) continue;
          // the first token of a row is never predicted (nothing precedes it in its row): in a
          // packed sequence its label would be predicted from the previous row, so it is -100
          if (i > 0 || !segmentIds) labels[t] = this.ids[a + i]!;
          if (i > 0) numLabels++;
        }
        numTokens += len;
      });
    }
    const batch: Batch = { inputIds, labels, attentionMask, positionIds, shape: [B, T], rows: seqs.flat(), numTokens, numLabels };
    if (segmentIds) batch.segmentIds = segmentIds;
    return batch;
  }
}

/** train.jsonl (required), valid.jsonl and test.jsonl of a folder; a single file is `train`. */
export interface DatasetSplits {
  train: Dataset;
  valid: Dataset | null;
  test: Dataset | null;
}

interface Resolved {
  tokenizer: DatasetTokenizer;
  maxSeqLength: number;
  format?: DatasetFormat;
  maskPrompt: boolean;
  packing: boolean;
  seed: number;
  skipInvalid: boolean;
  completionTemplate: 'chat' | 'plain';
}

function resolveOptions(options: LoadDatasetOptions): Resolved {
  if (options === undefined || options === null) throw typeError('options', 'an object with tokenizer and maxSeqLength', options);
  const o = checkOptions<LoadDatasetOptions>('loadDataset', options,
    ['tokenizer', 'maxSeqLength', 'format', 'maskPrompt', 'packing', 'seed', 'skipInvalid', 'completionTemplate']);
  const tok = o.tokenizer;
  if (!tok || typeof tok !== 'object' || typeof tok.encode !== 'function' || typeof tok.applyChatTemplate !== 'function')
    throw typeError('tokenizer', 'a Tokenizer (from loadTokenizer)', tok);
  const hasTemplate = tok.chatTemplateNames.length > 0;
  return {
    tokenizer: tok,
    maxSeqLength: expectInteger('maxSeqLength', o.maxSeqLength, 2, 1 << 24),
    format: o.format === undefined ? undefined : expectOneOf('format', o.format, ['text', 'completion', 'chat'] as const),
    maskPrompt: o.maskPrompt === undefined ? true : expectBoolean('maskPrompt', o.maskPrompt),
    packing: o.packing === undefined ? false : expectBoolean('packing', o.packing),
    seed: o.seed === undefined ? 0 : expectInteger('seed', o.seed, 0, 2 ** 31),
    skipInvalid: o.skipInvalid === undefined ? false : expectBoolean('skipInvalid', o.skipInvalid),
    completionTemplate: o.completionTemplate === undefined ? (hasTemplate ? 'chat' : 'plain') : expectOneOf('completionTemplate', o.completionTemplate, ['chat', 'plain'] as const),
  };
}

/** Growable Int32/Uint8 storage, doubling as rows arrive. */
class Store {
  ids = new Int32Array(1 << 16);
  mask = new Uint8Array(1 << 16);
  offsets = new Float64Array(1 << 10);
  length = 0;
  rows = 0;
  push(ids: number[], mask: Uint8Array, n: number): void {
    while (this.length + n > this.ids.length) {
      const ids2 = new Int32Array(this.ids.length * 2);
      ids2.set(this.ids);
      this.ids = ids2;
      const m2 = new Uint8Array(this.mask.length * 2);
      m2.set(this.mask);
      this.mask = m2;
    }
    if (this.rows + 2 > this.offsets.length) {
      const o2 = new Float64Array(this.offsets.length * 2);
      o2.set(this.offsets);
      this.offsets = o2;
    }
    for (let i = 0; i < n; i++) this.ids[this.length + i] = ids[i]!;
    this.mask.set(mask.subarray(0, n), this.length);
    this.length += n;
    this.rows++;
    this.offsets[this.rows] = this.length;
  }
}

async function readFile(file: string, o: Resolved): Promise<Dataset> {
  const bad = (line: number, problem: string) => new LoraError('ERR_LORA_FORMAT', `Invalid dataset row in ${file} line ${line}: ${problem}`);
  let stream: fs.ReadStream;
  try {
    fs.accessSync(file, fs.constants.R_OK);
    stream = fs.createReadStream(file, { encoding: 'utf8', highWaterMark: 1 << 20 });
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not read ${file}: ${(err as Error).message}`);
  }
  const lines = readline.createInterface({ input: stream, crlfDelay: Infinity });
  const store = new Store();
  let format = o.format;
  let lineNo = 0;
  let truncated = 0;
  let dropped = 0;
  let skipped = 0;
  const skippedLines: SkippedLine[] = [];
  try {
    for await (const text of lines) {
      lineNo++;
      if (lineNo === 1 && text.charCodeAt(0) === 0xfeff) throw bad(1, 'the file starts with a byte-order mark; save it as UTF-8 without BOM');
      if (text.trim() === '') continue;
      try {
        let row: unknown;
        try {
          row = JSON.parse(text);
        } catch (err) {
          throw new RowError(`not valid JSON (${(err as Error).message})`);
        }
        if (!row || typeof row !== 'object' || Array.isArray(row)) throw new RowError(`expected a JSON object but found ${describe(row)}`);
        const found = detectFormat(row as Record<string, unknown>);
        if (!format) {
          if (!found) throw new RowError(`cannot tell the format: expected a "text", "prompt" and "completion", or "messages" field but found ${JSON.stringify(Object.keys(row).slice(0, 8))}`);
          format = found;
        }
        const enc = encodeRow(o.tokenizer, format, row as Record<string, unknown>, o);
        let n = enc.ids.length;
        if (n > o.maxSeqLength) {
          n = o.maxSeqLength;
          truncated++;
        }
        let learnable = 0;
        for (let i = 1; i < n; i++) learnable += enc.mask[i]!;
        if (learnable === 0) {
          dropped++;
          continue;
        }
        store.push(enc.ids, enc.mask, n);
      } catch (err) {
        const reason = err instanceof RowError ? err.message
          : err instanceof LoraError && (err as { code?: string }).code === 'ERR_LORA_TEMPLATE' ? (err as Error).message : null;
        if (reason === null) throw err;
        if (!o.skipInvalid) throw bad(lineNo, reason);
        skipped++;
        if (skippedLines.length < SKIPPED_KEPT) skippedLines.push({ line: lineNo, reason });
      }
    }
  } catch (err) {
    if (err instanceof LoraError) throw err;
    throw new LoraError('ERR_LORA_IO', `Could not read ${file}: ${(err as Error).message}`);
  } finally {
    lines.close();
    stream.destroy();
  }
  if (store.rows === 0) throw new LoraError('ERR_LORA_FORMAT', `Dataset ${file} has no usable rows (${lineNo} lines${skipped ? `, ${skipped} invalid` : ''}${dropped ? `, ${dropped} with nothing to train` : ''})`);
  const tok = o.tokenizer;
  return new Dataset({
    file, format: format!, maxSeqLength: o.maxSeqLength, packing: o.packing, seed: o.seed,
    ids: store.ids.slice(0, store.length), mask: store.mask.slice(0, store.length), offsets: store.offsets.slice(0, store.rows + 1),
    truncated, dropped, skipped, skippedLines, padId: tok.padTokenId ?? tok.eosTokenId ?? 0,
  });
}

/**
 * Loads fine-tuning data from JSONL: a file, or a folder with train.jsonl (required), valid.jsonl
 * and test.jsonl. Each line is one row in one of three formats, detected from the first row
 * unless `format` is given:
 * - `{"text": "..."}`: trained on every token (EOS appended);
 * - `{"prompt": "...", "completion": "..."}`: trained on the completion (and its end token);
 * - `{"messages": [{"role": "user", "content": "..."}, ...], "tools"?: [...]}`: rendered with the
 *   chat template, trained on the assistant turns (their content and end-of-turn token).
 * `maskPrompt: false` trains on every token. Files are read line by line from a stream; rows are
 * tokenized once and kept as token ids only.
 *
 * @example
 * const tokenizer = loadTokenizer('./SmolLM2-135M-Instruct');
 * const { train, valid } = await loadDataset('./data', { tokenizer, maxSeqLength: 512, packing: true });
 * console.log(train.summary());
 * for (const batch of train.batches({ batchSize: 4, epoch: 0 })) { ... }
 * @throws ERR_LORA_FORMAT naming the file and line for a line that is not a valid row (unless
 *   skipInvalid) or a chat template that fails on it, and for a file with no usable rows;
 *   ERR_LORA_IO when the path cannot be read or a folder has no train.jsonl; LoraTypeError /
 *   LoraRangeError / ERR_LORA_OPTION for bad options.
 */
export async function loadDataset(datasetPath: string, options: LoadDatasetOptions): Promise<DatasetSplits> {
  if (typeof datasetPath !== 'string' || datasetPath === '') throw typeError('path', 'a JSONL file or a folder path', datasetPath);
  const o = resolveOptions(options);
  let stat: fs.Stats;
  try {
    stat = fs.statSync(datasetPath);
  } catch (err) {
    throw new LoraError('ERR_LORA_IO', `Could not find the dataset ${datasetPath}: ${(err as Error).message}`);
  }
  if (!stat.isDirectory()) return { train: await readFile(datasetPath, o), valid: null, test: null };
  const trainFile = path.join(datasetPath, 'train.jsonl');
  if (!fs.existsSync(trainFile))
    throw new LoraError('ERR_LORA_IO', `The dataset folder ${datasetPath} has no train.jsonl (expected train.jsonl, and optionally valid.jsonl and test.jsonl)`);
  const train = await readFile(trainFile, o);
  // later splits use the format of train so a folder is one format throughout
  const same = { ...o, format: o.format ?? train.format };
  const opt = async (name: string) => {
    const f = path.join(datasetPath, `${name}.jsonl`);
    return fs.existsSync(f) ? readFile(f, same) : null;
  };
  return { train, valid: await opt('valid'), test: await opt('test') };
}
