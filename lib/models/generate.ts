// CausalLM.generate(): prompts of different lengths batched with left padding (positions from the
// attention mask, as transformers' generate derives them), one prefill into a preallocated KV
// cache, then one token per step; greedy or sampled with transformers' logits processors
// (repetition penalty, then temperature, top-k, top-p, min-p). Sampling runs on the host in
// float64 from the step's logits, read into one host array for all steps (on a worker thread from a
// GPU), with the event loop turning between steps.
import { checkOptions, expectInteger, expectNumber, LoraRangeError, rangeError, typeError } from '../errors';
import { defaultRng, Rng } from '../random';
import { noGrad, tensor } from '../tensor';
import type { CausalLM } from './causal_lm';

/** Options of CausalLM.generate(). */
export interface GenerateOptions {
  /** New tokens to generate at most per prompt (default 256). */
  maxNewTokens?: number;
  /** 0 (the default) picks the most likely token (greedy); above 0, logits / temperature are sampled. */
  temperature?: number;
  /** Sample among the k most likely tokens only (0 or absent: no limit). */
  topK?: number;
  /** Sample among the most likely tokens whose probabilities sum to topP (nucleus; 1: no limit). */
  topP?: number;
  /** Drop tokens less likely than minP times the most likely one (0: no limit). */
  minP?: number;
  /** transformers' repetition penalty (> 1 discourages tokens already in the prompt or output; 1: off). */
  repetitionPenalty?: number;
  /** Seed of the sampler; default: drawn from the global generator (manualSeed). */
  seed?: number;
  /**
   * Token id(s) that end a sequence (included in the result). Default: generation_config.json's
   * eos_token_id, else config.json's; null generates maxNewTokens tokens.
   */
  eosTokenId?: number | number[] | null;
  /** Token-id sequences that end a sequence when generated (included in the result). */
  stop?: number[][];
  /** Called for each new token as it is chosen, with the index of its prompt. */
  onToken?: (token: number, index: number) => void;
  /** Token id that fills the left padding of shorter prompts (default pad_token_id, else 0; it is masked). */
  padTokenId?: number;
  /** Stops generating (resolving with the tokens so far) when aborted. */
  signal?: AbortSignal;
}

const OPTIONS = ['maxNewTokens', 'temperature', 'topK', 'topP', 'minP', 'repetitionPenalty', 'seed', 'eosTokenId', 'stop',
  'onToken', 'padTokenId', 'signal'] as const;

interface Sampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
}

function tokenId(name: string, v: unknown, vocab: number): number {
  return expectInteger(name, v, 0, vocab - 1);
}

/** eos ids from the options, generation_config.json or config.json. */
function eosIds(model: CausalLM, o: GenerateOptions): Set<number> {
  let v: unknown = o.eosTokenId;
  if (v === undefined) v = model.generationConfig?.eos_token_id ?? model.config.eos_token_id ?? null;
  if (v === null) return new Set();
  const list = Array.isArray(v) ? v : [v];
  return new Set(list.map((x, i) => tokenId(Array.isArray(v) ? `eosTokenId[${i}]` : 'eosTokenId', x, model.vocabSize)));
}

function checkPrompts(promptIds: unknown, vocab: number): number[][] {
  if (!Array.isArray(promptIds) || promptIds.length === 0) throw typeError('promptIds', 'a non-empty array of token ids, or an array of such arrays', promptIds);
  const batch = Array.isArray(promptIds[0]) ? (promptIds as unknown[]) : [promptIds];
  return batch.map((p, b) => {
    const name = batch.length === 1 && !Array.isArray(promptIds[0]) ? 'promptIds' : `promptIds[${b}]`;
    if (!Array.isArray(p) || p.length === 0) throw typeError(name, 'a non-empty array of token ids', p);
    return p.map((id, i) => tokenId(`${name}[${i}]`, id, vocab));
  });
}

/** Applies transformers' processors to one row's logits (float64) and picks a token. */
export function pickToken(logits: Float32Array, history: Iterable<number>, s: Sampling, rng: Rng | null): number {
  const V = logits.length;
  if ((s.temperature === 0 || !rng) && s.repetitionPenalty === 1) {
    // greedy: the first maximum, as torch.argmax, read in place (float32 compares as float64 would)
    let best = 0;
    for (let i = 1; i < V; i++) if (logits[i]! > logits[best]!) best = i;
    return best;
  }
  const x = Float64Array.from(logits);
  if (s.repetitionPenalty !== 1)
    for (const id of new Set(history)) x[id] = x[id]! < 0 ? x[id]! * s.repetitionPenalty : x[id]! / s.repetitionPenalty;
  if (s.temperature === 0 || !rng) {
    let best = 0;
    for (let i = 1; i < V; i++) if (x[i]! > x[best]!) best = i; // the first maximum, as torch.argmax
    return best;
  }
  for (let i = 0; i < V; i++) x[i] = x[i]! / s.temperature;
  if (s.topK > 0 && s.topK < V) {
    const kth = Float64Array.from(x).sort()[V - s.topK]!;
    for (let i = 0; i < V; i++) if (x[i]! < kth) x[i] = -Infinity;
  }
  const probs = () => {
    let m = -Infinity;
    for (const v of x) if (v > m) m = v;
    const p = new Float64Array(V);
    let sum = 0;
    for (let i = 0; i < V; i++) sum += (p[i] = Math.exp(x[i]! - m));
    for (let i = 0; i < V; i++) p[i] = p[i]! / sum;
    return p;
  };
  if (s.topP < 1) {
    const p = probs();
    const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => x[a]! - x[b]! || a - b); // ascending
    let cum = 0;
    for (let r = 0; r < V - 1; r++) { // the most likely token always stays
      cum += p[order[r]!]!;
      if (cum <= 1 - s.topP) x[order[r]!] = -Infinity;
    }
  }
  if (s.minP > 0) {
    const p = probs();
    let top = 0;
    for (const v of p) if (v > top) top = v;
    let best = 0;
    for (let i = 1; i < V; i++) if (x[i]! > x[best]!) best = i;
    for (let i = 0; i < V; i++) if (i !== best && p[i]! < s.minP * top) x[i] = -Infinity;
  }
  const p = probs();
  let u = rng.uniform();
  let last = 0;
  for (let i = 0; i < V; i++) {
    if (p[i]! === 0) continue;
    last = i;
    u -= p[i]!;
    if (u < 0) return i;
  }
  return last; // rounding left u >= 0: the last possible token
}

function endsWith(seq: number[], tail: number[]): boolean {
  if (tail.length === 0 || tail.length > seq.length) return false;
  for (let i = 0; i < tail.length; i++) if (seq[seq.length - tail.length + i] !== tail[i]) return false;
  return true;
}

/** @internal CausalLM.generate's body. */
export async function generate(model: CausalLM, promptIds: number[] | number[][], options?: GenerateOptions): Promise<number[] | number[][]> {
  const o = checkOptions<GenerateOptions>('generate()', options, OPTIONS);
  const V = model.vocabSize;
  const prompts = checkPrompts(promptIds, V);
  const single = !Array.isArray(promptIds[0]);
  const maxNew = o.maxNewTokens === undefined ? 256 : expectInteger('maxNewTokens', o.maxNewTokens, 0, 2 ** 24);
  const s: Sampling = {
    temperature: o.temperature === undefined ? 0 : expectNumber('temperature', o.temperature, 0),
    topK: o.topK === undefined ? 0 : expectInteger('topK', o.topK, 0, 2 ** 31 - 1),
    topP: o.topP === undefined ? 1 : expectNumber('topP', o.topP, 0, 1),
    minP: o.minP === undefined ? 0 : expectNumber('minP', o.minP, 0, 1),
    repetitionPenalty: o.repetitionPenalty === undefined ? 1 : expectNumber('repetitionPenalty', o.repetitionPenalty, 0),
  };
  if (s.topP === 0) throw rangeError('topP', 'a number in (0, 1]', 0);
  if (s.repetitionPenalty === 0) throw rangeError('repetitionPenalty', 'a number > 0', 0);
  const rng = s.temperature > 0 ? new Rng(o.seed === undefined ? defaultRng().seed() : expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER)) : null;
  if (o.seed !== undefined) expectInteger('seed', o.seed, 0, Number.MAX_SAFE_INTEGER);
  const eos = eosIds(model, o);
  const stop = (o.stop ?? []).map((seq, i) => {
    if (!Array.isArray(seq) || seq.length === 0) throw typeError(`stop[${i}]`, 'a non-empty array of token ids', seq);
    return seq.map((id, j) => tokenId(`stop[${i}][${j}]`, id, V));
  });
  if (o.stop !== undefined && !Array.isArray(o.stop)) throw typeError('stop', 'an array of token-id arrays', o.stop);
  if (o.onToken !== undefined && typeof o.onToken !== 'function') throw typeError('onToken', 'a function', o.onToken);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw typeError('signal', 'an AbortSignal', o.signal);
  const padDefault = typeof model.config.pad_token_id === 'number' && model.config.pad_token_id < V && model.config.pad_token_id >= 0 ? model.config.pad_token_id : 0;
  const pad = o.padTokenId === undefined ? padDefault : tokenId('padTokenId', o.padTokenId, V);

  const B = prompts.length;
  const L = Math.max(...prompts.map((p) => p.length));
  const out: number[][] = prompts.map(() => []);
  if (maxNew === 0) return single ? out[0]! : out;
  const limit = model.backbone.maxPositions;
  for (const [b, p] of prompts.entries())
    if (limit !== null && p.length + maxNew - 1 > limit)
      throw new LoraRangeError(`Expected prompt + maxNewTokens within the model's ${limit} positions but prompt ${b} has ${p.length} tokens and maxNewTokens is ${maxNew}`);

  const total = L + maxNew;
  // every row, left-padded to a common length: what has been fed so far, with masks and positions
  const seqs = prompts.map((p) => [...new Array<number>(L - p.length).fill(pad), ...p]);
  const masks = prompts.map((p) => [...new Array<number>(L - p.length).fill(0), ...new Array<number>(p.length).fill(1)]);
  const positionsOf = (b: number, from: number, to: number) => {
    // cumsum(mask) - 1, with padding at 1 (transformers' generate)
    const res: number[] = [];
    let c = 0;
    for (let i = 0; i < to; i++) {
      c += masks[b]![i]!;
      if (i >= from) res.push(masks[b]![i] ? c - 1 : 1);
    }
    return res;
  };
  const padded = prompts.map((p) => p.length < L); // rows with left padding (their mask has zeros)
  const finished = new Array<boolean>(B).fill(false);
  const cache = model.createCache(B, total);
  let host = new Float32Array(0); // the step's logits on the host, reused
  let regime = '';
  try {
    let from = 0; // first position of the next pass
    while (true) {
      const to = seqs[0]!.length;
      const T = to - from;
      const ids: number[] = [];
      const pos = new Int32Array(B * T);
      let keyMask: Uint8Array | null = null; // null: no padding anywhere (the kernel skips the mask)
      for (let b = 0; b < B; b++) {
        ids.push(...seqs[b]!.slice(from, to));
        pos.set(positionsOf(b, from, to), b * T);
        if (padded[b]) (keyMask ??= new Uint8Array(B * to).fill(1)).set(masks[b]!.slice(0, to), b * to);
      }
      let maxPos = 0;
      for (const p of pos) if (p > maxPos) maxPos = p;
      const logits = noGrad(() => {
        const idt = tensor(Float32Array.from(ids), [B, T], { dtype: 'int32', device: model.device });
        try {
          return model.run(idt, pos, keyMask, cache, true);
        } finally {
          idt.dispose();
        }
      });
      regime = model.backbone.ropeRegime(maxPos);
      let data: Float32Array;
      try {
        if (logits.device === 'cpu') {
          // The CPU forward has finished: copy into one array for every step (a new one each step
          // had its pages first touched: 8 x 49152 logits 0.13-5 ms, against 40 µs), then let the
          // event loop turn.
          data = logits.toFloat32Array(host.length >= logits.size ? host : (host = new Float32Array(logits.size)));
          await new Promise<void>((resolve) => setImmediate(resolve));
        } else {
          data = await logits.data(); // read on a worker thread (it waits for the device): the event loop turns
        }
      } finally {
        logits.dispose();
      }
      const step = out[0]!.length;
      for (let b = 0; b < B; b++) {
        if (finished[b]) continue;
        const row = data.subarray(b * V, (b + 1) * V);
        const history = s.repetitionPenalty !== 1 ? [...prompts[b]!, ...out[b]!] : [];
        const id = pickToken(row, history, s, rng);
        out[b]!.push(id);
        o.onToken?.(id, b);
        if (eos.has(id) || stop.some((seq) => endsWith(out[b]!, seq))) finished[b] = true;
      }
      if (finished.every(Boolean) || step + 1 >= maxNew || o.signal?.aborted) break;
      for (let b = 0; b < B; b++) {
        // a finished row keeps being fed (its tokens are not reported), as transformers does
        seqs[b]!.push(finished[b] ? pad : out[b]![out[b]!.length - 1]!);
        masks[b]!.push(1);
      }
      from = to;
      // longrope changes every position's frequencies past its original length: recompute all (transformers too)
      let next = 0;
      for (let b = 0; b < B; b++) next = Math.max(next, positionsOf(b, to, to + 1)[0]!);
      if (model.backbone.ropeRegime(next) !== regime) {
        cache.reset();
        from = 0;
      }
    }
  } finally {
    cache.dispose();
  }
  return single ? out[0]! : out;
}

