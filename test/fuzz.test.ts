// A mutation fuzzer for every file parser: safetensors files, sharded indexes and PEFT adapter
// folders. Seeds are valid files built here (every dtype, metadata, empty tensors, DoRA, biases,
// embeddings); mutations are bit flips, byte inserts/deletes, truncations, header-length edits and
// structured header/config JSON edits (offsets, dtypes, shapes, names, lengths). Every input must
// load or throw a LoraError; loads may not allocate more than the file justifies, nothing may
// leak, and no input may take long. Seed: LORA_NATIVE_FUZZ_SEED (printed). A failing
// input is kept under $TMPDIR/lora-fuzz-failures/ for replay.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t, { Test } from 'tap';

import { LoraError, loadPeftAdapter, loadModel, loadSafetensors, memory, saveSafetensors, tensor, Tensor } from '../lib/index';

// Fixed by default so that CI is deterministic; set LORA_NATIVE_FUZZ_SEED to explore other sequences.
const SEED = Number(process.env.LORA_NATIVE_FUZZ_SEED ?? 20261129);
// Time budgets (ms) per target; at least MIN_INPUTS each whatever the machine's speed.
const BUDGET = { safetensors: 9000, peft: 6000, index: 1500 };
const MIN_INPUTS = { safetensors: 12000, peft: 6000, index: 1000 };
const SLOW_MS = 1000; // a single input taking this long is a hang candidate

const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const dir = fs.mkdtempSync(path.join(shm, 'lora-fuzz-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
t.comment(`fuzz seed ${SEED} (LORA_NATIVE_FUZZ_SEED=${SEED} replays this run)`);

// ---- a small seeded generator ------------------------------------------------------------------

let state = BigInt(SEED) | 1n;
function next(): number {
  // xorshift64*
  state ^= state >> 12n;
  state ^= (state << 25n) & 0xffffffffffffffffn;
  state ^= state >> 27n;
  return Number(((state * 2685821657736338717n) & 0xffffffffffffffffn) >> 11n) / 2 ** 53;
}
const int = (n: number) => Math.floor(next() * n);
const pick = <T>(a: readonly T[]): T => a[int(a.length)]!;

// ---- seeds ---------------------------------------------------------------------------------------

function header(buf: Buffer): { json: Record<string, unknown>; len: number } | null {
  if (buf.length < 8) return null;
  const len = Number(buf.readBigUInt64LE(0));
  if (len > buf.length - 8) return null;
  try {
    const json = JSON.parse(buf.subarray(8, 8 + len).toString('utf8'));
    JSON.stringify(json); // a header nested too deep for the mutators to rewrite: byte mutations only
    return json && typeof json === 'object' && !Array.isArray(json) ? { json, len } : null;
  } catch {
    return null;
  }
}

function withHeader(json: unknown, data: Buffer, lenOverride?: number): Buffer {
  const text = Buffer.from(typeof json === 'string' ? json : JSON.stringify(json), 'utf8');
  const out = Buffer.alloc(8 + text.length + data.length);
  out.writeBigUInt64LE(BigInt(lenOverride ?? text.length), 0);
  text.copy(out, 8);
  data.copy(out, 8 + text.length);
  return out;
}

const raw = (bytes: number[] | Uint8Array, dtype: string, shape: number[]) => ({ dtype, shape, data: Uint8Array.from(bytes) }) as never;

function seedFiles(): Buffer[] {
  const seeds: Buffer[] = [];
  const save = (name: string, tensors: Record<string, Tensor | object>, metadata?: Record<string, string>) => {
    const f = path.join(dir, name);
    saveSafetensors(f, tensors as never, metadata ? { metadata } : undefined);
    seeds.push(fs.readFileSync(f));
    for (const v of Object.values(tensors)) if (v instanceof Tensor) v.dispose();
  };
  const vals = (n: number) => Float32Array.from({ length: n }, (_, i) => Math.sin(i + 1));
  save('f32.safetensors', { a: tensor(vals(12), [3, 4]), b: tensor(vals(5), [5]) }, { format: 'pt' });
  save('half.safetensors', { w: tensor(vals(6), [2, 3], { dtype: 'bfloat16' }), h: tensor(vals(4), [4], { dtype: 'float16' }), i: tensor([1, -2, 3], [3], { dtype: 'int32' }) });
  save('empty.safetensors', { z: tensor([], [0, 3]), s: tensor([7], []) });
  save('ints.safetensors', {
    i64: raw([1, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255], 'I64', [2]),
    u64: raw([2, 0, 0, 0, 0, 0, 0, 0], 'U64', [1]),
    u32: raw([1, 2, 3, 4], 'U32', [1]), i16: raw([1, 128, 2, 0], 'I16', [2]), u16: raw([255, 255], 'U16', [1]),
    i8: raw([200, 3], 'I8', [2]), u8: raw([200, 3, 4], 'U8', [3]), bool: raw([1, 0], 'BOOL', [2]),
  });
  save('floats.safetensors', {
    f64: raw(new Uint8Array(Float64Array.from([1.5, -2, 1e300]).buffer), 'F64', [3]),
    e4: raw([0x38, 0x7f, 0xff, 0x01], 'F8_E4M3', [2, 2]), e5: raw([0x3c, 0x7c, 0x7e, 0x80], 'F8_E5M2', [4]),
  }, { note: 'x'.repeat(40) });
  save('many.safetensors', Object.fromEntries(Array.from({ length: 12 }, (_, i) => [`layer.${i}.weight`, tensor(vals(i + 1), [i + 1])])));
  return seeds;
}

// ---- mutations ------------------------------------------------------------------------------------

const DTYPES = ['F64', 'F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2', 'I64', 'I32', 'I16', 'I8', 'U64', 'U32', 'U16', 'U8', 'BOOL'];
const BAD_DTYPES = ['F31', '', 'f32', 'F32 ', 'F4', 123, null, ['F32'], { d: 1 }, 'constructor', '__proto__', 'toString'];
const ODD_NUMBERS = [0, 1, -1, 2, 3, 7, 8, 255, 256, 1.5, -0.5, 2 ** 31, 2 ** 32, 2 ** 53 - 1, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 1e308, -1e308, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER];
const ODD_VALUES: unknown[] = [...ODD_NUMBERS, '8', '', 'NaN', null, true, false, [], {}, [1, 2], { a: 1 }, 'x'.repeat(300)];

function byteMutation(b: Buffer): Buffer {
  switch (int(7)) {
    case 0: { // flip 1-4 bits
      const out = Buffer.from(b);
      for (let k = 1 + int(4); k > 0 && out.length; k--) out[int(out.length)]! ^= 1 << int(8);
      return out;
    }
    case 1: { // interesting bytes
      const out = Buffer.from(b);
      for (let k = 1 + int(3); k > 0 && out.length; k--) out[int(out.length)] = pick([0, 0xff, 0x7f, 0x80, 0x22, 0x5c, 0x7b, 0x7d, 0x2c]);
      return out;
    }
    case 2: { // insert bytes
      const at = int(b.length + 1);
      const ins = Buffer.from(Array.from({ length: 1 + int(8) }, () => int(256)));
      return Buffer.concat([b.subarray(0, at), ins, b.subarray(at)]);
    }
    case 3: { // delete a range
      const at = int(b.length + 1);
      return Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + 1 + int(16)))]);
    }
    case 4: // truncate
      return Buffer.from(b.subarray(0, int(b.length + 1)));
    case 5: { // header length field
      const out = Buffer.from(b.length >= 8 ? b : Buffer.concat([b, Buffer.alloc(8 - b.length)]));
      const len = b.length >= 8 ? Number(out.readBigUInt64LE(0)) : 0;
      const v = pick([0, 1, 2, len - 1, len + 1, len - 8, len + 8, out.length - 8, out.length, 2 ** 32, 100 * 1024 * 1024 + 1, int(2 ** 20)]);
      out.writeBigUInt64LE(v < 0 ? 0n : v >= 2 ** 63 ? 2n ** 63n : BigInt(v), 0);
      if (next() < 0.2) out.writeBigUInt64LE(pick([2n ** 63n, 2n ** 64n - 1n, 2n ** 53n]), 0);
      return out;
    }
    default: { // append garbage
      return Buffer.concat([b, Buffer.from(Array.from({ length: 1 + int(32) }, () => int(256)))]);
    }
  }
}

function jsonMutation(b: Buffer): Buffer {
  const h = header(b);
  if (!h) return byteMutation(b);
  const json = h.json;
  let data = b.subarray(8 + h.len);
  const names = Object.keys(json).filter((k) => k !== '__metadata__');
  const name = names.length ? pick(names) : '';
  const cur = json[name];
  const e = (cur && typeof cur === 'object' && !Array.isArray(cur) ? cur : {}) as Record<string, unknown>;
  const offs = Array.isArray(e.data_offsets) ? (e.data_offsets as number[]) : [0, 0];
  switch (int(12)) {
    case 0: e.data_offsets = pick([[offs[0], offs[1]! + 1], [offs[0], offs[1]! - 1], [offs[0]! - 1, offs[1]], [offs[1], offs[0]], [0, 0],
      [0, 2 ** 53], [offs[0], 2 ** 53 + 2], [1.5, offs[1]], ['0', offs[1]], null, [offs[0]], [offs[0], offs[1], 0], [-8, offs[1]]]); break;
    case 1: { // overlap another tensor
      const other = json[pick(names)] as Record<string, unknown> | undefined;
      if (other) e.data_offsets = other.data_offsets;
      break;
    }
    case 2: e.dtype = next() < 0.5 ? pick(DTYPES) : pick(BAD_DTYPES); break;
    case 3: { // reinterpret the bytes consistently as another dtype, so decoding runs
      const bytes = (offs[1] ?? 0) - (offs[0] ?? 0);
      const dt = pick(DTYPES);
      const size = { F64: 8, I64: 8, U64: 8, F32: 4, I32: 4, U32: 4, F16: 2, BF16: 2, I16: 2, U16: 2 }[dt] ?? 1;
      if (bytes % size === 0) {
        e.dtype = dt;
        const n = bytes / size;
        e.shape = n % 2 === 0 && next() < 0.5 ? [2, n / 2] : [n];
      }
      break;
    }
    case 4: {
      const shape = Array.isArray(e.shape) ? [...(e.shape as unknown[])] : [];
      const r = int(7);
      if (r === 0) shape.push(pick(ODD_VALUES));
      else if (r === 1) shape.pop();
      else if (r === 2 && shape.length) shape[int(shape.length)] = pick(ODD_VALUES);
      else if (r === 3) shape.reverse();
      else if (r === 4) shape.unshift(0);
      else if (r === 5) shape.splice(0, shape.length, ...Array(9).fill(1));
      e.shape = r === 6 ? pick(ODD_VALUES) : shape;
      break;
    }
    case 5: delete e[pick(['dtype', 'shape', 'data_offsets'])]; break;
    case 6: e[pick(['extra', 'offsets', 'Dtype'])] = pick(ODD_VALUES); break;
    case 7: { // rename, including to reserved and odd names
      const to = pick(['', '__metadata__', '__proto__', 'constructor', 'a'.repeat(2000), 'é\u0000x', '\u001b[2J\u001b]0;t\u0007', 'a\nb\r\u202e', names[0] ?? 'x']);
      delete json[name];
      json[to] = e;
      break;
    }
    case 8: json.__metadata__ = pick([{ a: 1 }, [], 'x', null, { format: 'pt', n: { deep: true } }, { ['k'.repeat(500)]: 'v' }]); break;
    case 9: json[name] = pick(ODD_VALUES); break;
    case 10: { // the data section: shorter or longer than the offsets say
      data = next() < 0.5 ? data.subarray(0, int(data.length + 1)) : Buffer.concat([data, Buffer.alloc(1 + int(64))]);
      break;
    }
    default: { // text-level: duplicate keys, deep nesting, non-object roots
      const text = JSON.stringify(json);
      const variants = [`[${text}]`, '"x"', 'null', '1', '[]', text.replace('{', `{"${name}":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},`),
        '['.repeat(5000) + ']'.repeat(5000), `{"a":${'{"a":'.repeat(3000)}1${'}'.repeat(3000)}}`, text.slice(0, -1), `${text} `, `\uFEFF${text}`,
        text.replace('"shape":[', `"shape":${'['.repeat(200_000)}${']'.repeat(200_000)},"x":[`)];
      return withHeader(pick(variants), data);
    }
  }
  if (name && json[name] === undefined && int(4) !== 0) json[name] = e;
  const lenOverride = next() < 0.1 ? int(2 ** 16) : undefined;
  return withHeader(json, data, lenOverride);
}

function mutate(seeds: Buffer[]): Buffer {
  let b = pick(seeds);
  if (next() < 0.05) { // splice two seeds
    const c = pick(seeds);
    b = Buffer.concat([b.subarray(0, int(b.length)), c.subarray(int(c.length))]);
  }
  for (let k = 1 + int(3); k > 0; k--) b = next() < 0.55 ? jsonMutation(b) : byteMutation(b);
  return b;
}

// ---- the harness ------------------------------------------------------------------------------------

interface Tally { inputs: number; loaded: number; rejected: Map<string, number>; slowest: number; maxRatio: number; failures: string[] }

function newTally(): Tally {
  return { inputs: 0, loaded: 0, rejected: new Map(), slowest: 0, maxRatio: 0, failures: [] };
}

function keepFailure(kind: string, files: Record<string, Buffer | string>): string {
  const d = path.join(os.tmpdir(), 'lora-fuzz-failures', `${kind}-${SEED}-${Date.now()}-${int(1e9)}`);
  fs.mkdirSync(d, { recursive: true });
  for (const [n, c] of Object.entries(files)) fs.writeFileSync(path.join(d, n), c);
  return d;
}

// Runs one input. `load` returns the bytes of native memory it allocated (then freed).
function one(tally: Tally, kind: string, fileBytes: number, load: () => number, keep: () => Record<string, Buffer | string>): void {
  const before = memory();
  const started = performance.now();
  tally.inputs++;
  try {
    const bytes = load();
    tally.loaded++;
    // Widening is the most a load may add: F8/I8/U8/BOOL become 4-byte values.
    const ratio = bytes / Math.max(fileBytes, 1);
    tally.maxRatio = Math.max(tally.maxRatio, ratio);
    if (bytes > 4 * fileBytes) tally.failures.push(`${kind}: loaded ${bytes} bytes from a ${fileBytes}-byte input (${keepFailure(kind, keep())})`);
  } catch (err) {
    if (err instanceof LoraError) {
      const code = (err as LoraError).code;
      tally.rejected.set(code, (tally.rejected.get(code) ?? 0) + 1);
    } else {
      tally.failures.push(`${kind}: ${(err as Error)?.constructor?.name}: ${(err as Error)?.message?.slice(0, 200)} (${keepFailure(kind, keep())})`);
    }
  }
  const ms = performance.now() - started;
  tally.slowest = Math.max(tally.slowest, ms);
  if (ms > SLOW_MS) tally.failures.push(`${kind}: one input took ${ms.toFixed(0)} ms (${keepFailure(kind, keep())})`);
  const after = memory();
  if (after.numTensors !== before.numTensors || after.numBytes !== before.numBytes)
    tally.failures.push(`${kind}: ${after.numTensors - before.numTensors} tensors / ${after.numBytes - before.numBytes} bytes leaked (${keepFailure(kind, keep())})`);
}

function report(t: Test, kind: string, tally: Tally, min: number): void {
  const codes = [...tally.rejected].map(([c, n]) => `${c} ${n}`).join(', ');
  t.comment(`${kind}: ${tally.inputs} inputs, ${tally.loaded} loaded, rejected: ${codes}; slowest ${tally.slowest.toFixed(1)} ms; ` +
    `largest load ${tally.maxRatio.toFixed(2)}x the file size`);
  for (const f of tally.failures.slice(0, 10)) t.comment(`FAILED ${f}`);
  t.ok(tally.inputs >= min, `${kind}: ${tally.inputs} inputs (at least ${min})`);
  t.same(tally.failures.slice(0, 10), [], `${kind}: every input loads or throws a LoraError, within bounds, leaking nothing`);
  t.ok(tally.loaded > 0 && tally.rejected.size > 0, `${kind}: inputs both load and fail (the mutations reach past the first check)`);
}

const tensorBytes = (x: Tensor) => x.size * (x.dtype === 'bfloat16' || x.dtype === 'float16' ? 2 : 4);

function loadedBytes(tensors: Iterable<Tensor>): number {
  let n = 0;
  for (const x of tensors) {
    n += tensorBytes(x);
    x.dispose();
  }
  return n;
}

const rssStart = process.memoryUsage().rss;

t.test('safetensors files', (t) => {
  const seeds = seedFiles();
  for (const s of seeds) t.ok(loadedBytes(loadSafetensors(writeTo('seed.safetensors', s)).tensors.values()) >= 0, 'seed loads');
  const tally = newTally();
  const f = path.join(dir, 'input.safetensors');
  const end = Date.now() + BUDGET.safetensors;
  while (Date.now() < end || tally.inputs < MIN_INPUTS.safetensors) {
    const input = mutate(seeds);
    fs.writeFileSync(f, input);
    one(tally, 'safetensors', input.length, () => loadedBytes(loadSafetensors(f, next() < 0.2 ? { dtype: 'float32' } : undefined).tensors.values()),
      () => ({ 'input.safetensors': input }));
    if (tally.failures.length > 20) break;
  }
  report(t, 'safetensors', tally, MIN_INPUTS.safetensors);
  t.end();
});

function writeTo(name: string, b: Buffer | string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, b);
  return f;
}

// ---- PEFT adapter folders ---------------------------------------------------------------------

const P = 'base_model.model.';
interface AdapterSeed { config: Record<string, unknown>; weights: Buffer }

function adapterSeeds(): AdapterSeed[] {
  const out: AdapterSeed[] = [];
  const v = (n: number, s = 1) => Float32Array.from({ length: n }, (_, i) => Math.cos(i * s));
  const add = (config: Record<string, unknown>, tensors: Record<string, Tensor>) => {
    const f = path.join(dir, 'seed_adapter.safetensors');
    saveSafetensors(f, tensors, { metadata: { format: 'pt' }, sort: true });
    out.push({ config, weights: fs.readFileSync(f) });
    for (const x of Object.values(tensors)) x.dispose();
  };
  const q = `${P}model.layers.0.self_attn.q_proj`;
  const k = `${P}model.layers.1.self_attn.v_proj`;
  add({ peft_type: 'LORA', r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj'] }, {
    [`${q}.lora_A.weight`]: tensor(v(24), [4, 6]), [`${q}.lora_B.weight`]: tensor(v(20), [5, 4]),
    [`${k}.lora_A.weight`]: tensor(v(24, 2), [4, 6], { dtype: 'bfloat16' }), [`${k}.lora_B.weight`]: tensor(v(20, 2), [5, 4], { dtype: 'bfloat16' }),
  });
  add({ peft_type: 'LORA', r: 2, lora_alpha: 4, use_rslora: true, use_dora: true, lora_bias: true, rank_pattern: { v_proj: 3 }, alpha_pattern: { 'layers\\.1\\..*': 2 }, target_modules: '.*proj' }, {
    [`${q}.lora_A.weight`]: tensor(v(12), [2, 6]), [`${q}.lora_B.weight`]: tensor(v(10), [5, 2]), [`${q}.lora_B.bias`]: tensor(v(5), [5]),
    [`${q}.lora_magnitude_vector`]: tensor(v(5, 3), [5]),
    [`${k}.lora_A.weight`]: tensor(v(18), [3, 6], { dtype: 'float16' }), [`${k}.lora_B.weight`]: tensor(v(15), [5, 3], { dtype: 'float16' }),
  });
  // module names that a backtracking engine would take exponential time on under these patterns
  const a48 = `${P}${'a'.repeat(48)}`;
  const x40 = `${P}${'x'.repeat(40)}y`;
  add({ r: 2, lora_alpha: 2, alpha_pattern: { '(a|aa)+$x': 4, '(x+x+)+y': 3 }, rank_pattern: { '(.*a){20}b': 5 } }, {
    [`${a48}.lora_A.weight`]: tensor(v(6), [2, 3]), [`${a48}.lora_B.weight`]: tensor(v(8), [4, 2]),
    [`${x40}.lora_A.weight`]: tensor(v(6, 2), [2, 3]), [`${x40}.lora_B.weight`]: tensor(v(8, 2), [4, 2]),
  });
  add({ r: 2, lora_alpha: 2, modules_to_save: ['lm_head'] }, {
    [`${P}model.embed_tokens.lora_embedding_A`]: tensor(v(20), [2, 10]), [`${P}model.embed_tokens.lora_embedding_B`]: tensor(v(8), [4, 2]),
    [`${P}lm_head.modules_to_save.default.weight`]: tensor(v(12), [3, 4]),
  });
  return out;
}

const CONFIG_FIELDS = ['peft_type', 'r', 'lora_alpha', 'target_modules', 'exclude_modules', 'use_rslora', 'use_dora', 'fan_in_fan_out', 'bias', 'lora_bias',
  'rank_pattern', 'alpha_pattern', 'layers_to_transform', 'layers_pattern', 'modules_to_save', 'lora_dropout', 'init_lora_weights', 'base_model_name_or_path', 'task_type'];
// Patterns: catastrophic for a backtracking engine, and syntax RE2 refuses (backreferences, lookaround).
const HOSTILE_PATTERNS = ['(a|aa)+$x', '(x+x+)+y', '(.*a){20}b', '(a)\\1', '(?=q)q_proj', '(?<!x)v_proj', 'a{1001}', '(?P<n>q)_proj', '\\d+', 'x'.repeat(1200)];
const nested = (depth: number): unknown => (depth === 0 ? 'q_proj' : [nested(depth - 1)]);
const CONFIG_VALUES: unknown[] = [...ODD_VALUES, 'LORA', 'LOHA', '(', '[a-', '.*', 'q_proj', ['q_proj', 1], { q_proj: 0 }, { q_proj: 2.5 }, { q_proj: 'x' },
  { '(': 2 }, { 'v_proj': 3, '.*': 1 }, { __proto__: null, x: 1 }, ...HOSTILE_PATTERNS, ...HOSTILE_PATTERNS.map((p) => ({ [p]: 2 })), nested(70), ['layers', '(h|h)+$x']];

function mutateConfig(config: Record<string, unknown>): string {
  const c: Record<string, unknown> = JSON.parse(JSON.stringify(config));
  for (let k = 1 + int(2); k > 0; k--) {
    const r = int(10);
    if (r < 6) c[pick(CONFIG_FIELDS)] = pick(CONFIG_VALUES);
    else if (r < 8) delete c[pick(Object.keys(c).length ? Object.keys(c) : ['r'])];
    else c[pick(['rank_pattern', 'alpha_pattern'])] = { [pick(['q_proj', 'v_proj', 'layers\\.0\\..*', 'embed_tokens', '(', 'x', ...HOSTILE_PATTERNS])]: pick(ODD_NUMBERS) };
  }
  let text = JSON.stringify(c, null, 2);
  if (next() < 0.15) text = byteMutation(Buffer.from(text)).toString('latin1');
  if (next() < 0.03) text = pick(['', '[]', 'null', '"LORA"', '{', '{"r": 4, "r": -1}', `{"r": 4, "target_modules": ${'['.repeat(200_000)}${']'.repeat(200_000)}}`]);
  return text;
}

// Key-level edits that keep the file valid, so the adapter checks (ranks, shapes, suffixes) run.
function mutateKeys(weights: Buffer): Buffer {
  const h = header(weights);
  if (!h) return weights;
  const json = h.json;
  const keys = Object.keys(json).filter((k) => k !== '__metadata__');
  const key = pick(keys);
  const e = json[key] as { shape: number[]; dtype: string; data_offsets: number[] };
  if (!e || !Array.isArray(e.shape) || !Array.isArray(e.data_offsets)) return weights;
  switch (int(5)) {
    case 0: { // another suffix
      const suffixes = ['.lora_A.weight', '.lora_B.weight', '.lora_B.bias', '.lora_embedding_A', '.lora_embedding_B', '.lora_magnitude_vector', '.lora_magnitude_vector.weight', '.weight', ''];
      const stem = key.replace(/\.(lora_[A-Za-z_]+(\.weight|\.bias)?)$/, '');
      delete json[key];
      json[stem + pick(suffixes)] = e;
      break;
    }
    case 1: e.shape = [...e.shape].reverse(); break; // transpose: ranks may no longer agree
    case 2: { // reshape to the same element count
      const n = e.shape.reduce((a, b) => a * b, 1);
      e.shape = pick([[n], [1, n], [n, 1], [1, 1, n]]);
      break;
    }
    case 3: delete json[key]; break; // a missing half
    default: { // int dtype for a float tensor of the same width
      const bytes = e.data_offsets[1]! - e.data_offsets[0]!;
      e.dtype = bytes % 4 === 0 ? pick(['I32', 'U32', 'F32']) : pick(['I16', 'U16', 'F16', 'BF16']);
      e.shape = [bytes / (e.dtype.endsWith('32') ? 4 : 2)];
    }
  }
  return withHeader(json, weights.subarray(8 + h.len));
}

t.test('PEFT adapter folders', (t) => {
  const seeds = adapterSeeds();
  const d = path.join(dir, 'adapter');
  fs.mkdirSync(d);
  for (const s of seeds) {
    fs.writeFileSync(path.join(d, 'adapter_config.json'), JSON.stringify(s.config));
    fs.writeFileSync(path.join(d, 'adapter_model.safetensors'), s.weights);
    const a = loadPeftAdapter(d);
    t.ok(a.modules.size > 0, `seed adapter loads (${a.modules.size} modules)`);
    a.dispose();
  }
  const allWeights = seeds.map((s) => s.weights);
  const tally = newTally();
  const end = Date.now() + BUDGET.peft;
  while (Date.now() < end || tally.inputs < MIN_INPUTS.peft) {
    const s = pick(seeds);
    const r = int(4);
    const config = r === 0 || r === 3 ? mutateConfig(s.config) : JSON.stringify(s.config);
    const weights = r === 1 ? mutate(allWeights) : r === 2 || r === 3 ? mutateKeys(s.weights) : s.weights;
    fs.writeFileSync(path.join(d, 'adapter_config.json'), config);
    fs.writeFileSync(path.join(d, 'adapter_model.safetensors'), weights);
    one(tally, 'peft', weights.length + config.length, () => {
      const a = loadPeftAdapter(d);
      let n = 0;
      for (const m of a.modules.values()) for (const x of [m.loraA, m.loraB, m.loraBBias, m.magnitude]) if (x) n += tensorBytes(x);
      for (const x of a.extraTensors.values()) n += tensorBytes(x);
      if (a.numParameters < 0 || !Number.isFinite(a.numParameters)) throw new Error('bad numParameters');
      a.dispose();
      return n;
    }, () => ({ 'adapter_config.json': config, 'adapter_model.safetensors': weights }));
    if (tally.failures.length > 20) break;
  }
  report(t, 'peft', tally, MIN_INPUTS.peft);
  t.end();
});

// ---- sharded indexes ----------------------------------------------------------------------------

t.test('sharded model indexes', (t) => {
  const d = path.join(dir, 'sharded');
  fs.mkdirSync(d);
  const a = tensor([1, 2, 3, 4], [2, 2]);
  const b = tensor([5, 6], [2]);
  saveSafetensors(path.join(d, 'model-00001-of-00002.safetensors'), { 'x.a': a });
  saveSafetensors(path.join(d, 'model-00002-of-00002.safetensors'), { 'x.b': b });
  a.dispose();
  b.dispose();
  const index = { metadata: { total_size: 24 }, weight_map: { 'x.a': 'model-00001-of-00002.safetensors', 'x.b': 'model-00002-of-00002.safetensors' } };
  const indexFile = path.join(d, 'model.safetensors.index.json');
  fs.writeFileSync(indexFile, JSON.stringify(index));
  t.equal(loadedBytes(loadModel(d).tensors.values()), 24, 'seed index loads');
  const tally = newTally();
  const end = Date.now() + BUDGET.index;
  fs.symlinkSync('model-00001-of-00002.safetensors', path.join(d, 'link.safetensors'));
  const shardNames = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', '../escape.safetensors', '/etc/passwd', '', 'missing.safetensors',
    'sub/../model-00001-of-00002.safetensors', '.', 'model.safetensors.index.json', 7, null,
    './model-00001-of-00002.safetensors', './/model-00002-of-00002.safetensors', '././model-00001-of-00002.safetensors', 'link.safetensors'];
  while (Date.now() < end || tally.inputs < MIN_INPUTS.index) {
    const idx: Record<string, unknown> = JSON.parse(JSON.stringify(index));
    const wm = idx.weight_map as Record<string, unknown>;
    const r = int(6);
    if (r === 0) wm[pick(['x.a', 'x.b', 'x.c', '__proto__'])] = pick(shardNames);
    else if (r === 1) delete wm[pick(['x.a', 'x.b'])];
    else if (r === 2) idx.weight_map = pick(ODD_VALUES);
    else if (r === 3) idx.metadata = pick(ODD_VALUES);
    else if (r === 4) delete idx.weight_map;
    let text = JSON.stringify(r === 5 ? pick(ODD_VALUES) : idx);
    if (next() < 0.2) text = byteMutation(Buffer.from(text)).toString('latin1');
    fs.writeFileSync(indexFile, text);
    one(tally, 'index', 24 + text.length, () => loadedBytes(loadModel(d).tensors.values()), () => ({ 'model.safetensors.index.json': text }));
  }
  report(t, 'index', tally, MIN_INPUTS.index);
  t.end();
});

t.test('process memory stays bounded over the whole run', (t) => {
  const growth = (process.memoryUsage().rss - rssStart) / 2 ** 20;
  t.ok(growth < 256, `RSS grew ${growth.toFixed(0)} MiB over the fuzz run (bound 256 MiB)`);
  t.end();
});
