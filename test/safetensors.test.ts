// safetensors: byte-exact round-trips for every dtype we hold, conversion of the ones we do not,
// every malformed-file case (ERR_LORA_FORMAT naming the file and the problem), sharded models,
// and atomic writes that leave nothing behind on failure.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { LoraError, loadModel, loadSafetensors, openModel, readSafetensorsHeader, saveSafetensors, saveSafetensorsAsync, tensor } from '../lib/index';
import { assertLoraError, leakChecked, randomData } from './helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-st-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A file from a header object and a data section. */
function rawFile(name: string, header: unknown, data: Uint8Array, lengthOverride?: bigint): string {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(lengthOverride ?? BigInt(json.length));
  const f = path.join(dir, name);
  fs.writeFileSync(f, Buffer.concat([len, json, data]));
  return f;
}

function noTemps(t: Tap.Test, d = dir): void {
  t.same(fs.readdirSync(d).filter((f) => f.endsWith('.tmp')), [], 'no temp files left');
}

type Tap = typeof t;
declare namespace Tap { type Test = typeof t; }

void leakChecked(t, 'round-trip keeps every dtype byte for byte', (t) => {
  const f = path.join(dir, 'rt.safetensors');
  const a = tensor(Float32Array.from(randomData(35, 1)), [5, 7]);
  const bf = tensor(Float32Array.from(randomData(33, 2)), [3, 11], { dtype: 'bfloat16' });
  const hf = tensor(Float32Array.from(randomData(13, 3)), [13], { dtype: 'float16' });
  const ids = tensor([3, -1, 70000], [3], { dtype: 'int32' });
  const empty = tensor([], [0, 4]);
  saveSafetensors(f, { a, bf, hf, ids, empty }, { metadata: { format: 'pt', note: 'x' } });
  const h = readSafetensorsHeader(f);
  t.equal(h.dataStart % 8, 0, 'data section is 8-byte aligned');
  t.same(h.metadata, { format: 'pt', note: 'x' });
  t.same(h.entries.map((e) => [e.name, e.dtype]), [['a', 'F32'], ['bf', 'BF16'], ['hf', 'F16'], ['ids', 'I32'], ['empty', 'F32']]);
  const { tensors } = loadSafetensors(f);
  for (const [k, orig] of Object.entries({ a, bf, hf, ids, empty })) {
    const got = tensors.get(k)!;
    t.equal(got.dtype, orig.dtype, `${k} dtype`);
    t.same(got.shape, orig.shape, `${k} shape`);
    t.same(Buffer.from(got.toBytes()), Buffer.from(orig.toBytes()), `${k} bytes`);
  }
  const wide = loadSafetensors(f, { dtype: 'float32', names: ['bf'] }).tensors;
  t.same([...wide.keys()], ['bf']);
  t.equal(wide.get('bf')!.dtype, 'float32');
  t.same(Array.from(wide.get('bf')!.toFloat32Array()), Array.from(bf.toFloat32Array()), 'bf16 widens exactly');
  assertLoraError(t, () => loadSafetensors(f, { names: ['nope'] }), LoraError, 'ERR_LORA_FORMAT', /no tensor named 'nope'/, 'unknown name');
  for (const x of [a, bf, hf, ids, empty, ...tensors.values(), ...wide.values()]) x.dispose();
  noTemps(t);
});

void leakChecked(t, 'other dtypes convert: F64, I64, U8, BOOL, I16, F8', (t) => {
  const f = path.join(dir, 'other.safetensors');
  const f64 = new Float64Array([1.5, -2.25, 1e-3, 3.141592653589793]);
  const i64 = new BigInt64Array([5n, -7n, 2147483647n]);
  const f8 = new Uint8Array([0x38, 0xb8, 0x40, 0x01]); // E4M3: 1, -1, 2, 2^-9
  saveSafetensors(f, {
    f64: { dtype: 'F64', shape: [2, 2], data: new Uint8Array(f64.buffer) },
    i64: { dtype: 'I64', shape: [3], data: new Uint8Array(i64.buffer) },
    u8: { dtype: 'U8', shape: [3], data: new Uint8Array([0, 200, 255]) },
    mask: { dtype: 'BOOL', shape: [2], data: () => new Uint8Array([1, 0]) },
    i16: { dtype: 'I16', shape: [2], data: new Uint8Array(new Int16Array([-300, 300]).buffer) },
    f8: { dtype: 'F8_E4M3', shape: [4], data: f8 },
  });
  const { tensors } = loadSafetensors(f);
  t.same(Array.from(tensors.get('f64')!.toFloat32Array()), Array.from(Float32Array.from(f64)));
  t.equal(tensors.get('i64')!.dtype, 'int32');
  t.same(Array.from(new Int32Array(tensors.get('i64')!.toBytes().buffer)), [5, -7, 2147483647]);
  t.same(Array.from(tensors.get('u8')!.toFloat32Array()), [0, 200, 255]);
  t.same(Array.from(tensors.get('mask')!.toFloat32Array()), [1, 0]);
  t.same(Array.from(tensors.get('i16')!.toFloat32Array()), [-300, 300]);
  t.same(Array.from(tensors.get('f8')!.toFloat32Array()), [1, -1, 2, 2 ** -9]);
  for (const x of tensors.values()) x.dispose();
  const big = rawFile('i64big.safetensors', { x: { dtype: 'I64', shape: [1], data_offsets: [0, 8] } }, new Uint8Array(new BigInt64Array([1n << 40n]).buffer));
  assertLoraError(t, () => loadSafetensors(big), LoraError, 'ERR_LORA_DTYPE', /does not fit int32/, 'I64 outside int32');
});

t.test('every malformed file is ERR_LORA_FORMAT naming the file and the problem', (t) => {
  const ok = { dtype: 'F32', shape: [2], data_offsets: [0, 8] };
  const d8 = new Uint8Array(8);
  const cases: [string, () => string, RegExp][] = [
    ['empty', () => { const f = path.join(dir, 'empty.safetensors'); fs.writeFileSync(f, ''); return f; }, /the file is empty/],
    ['short', () => { const f = path.join(dir, 'short.safetensors'); fs.writeFileSync(f, Buffer.alloc(5)); return f; }, /shorter than the 8-byte/],
    ['header past end', () => rawFile('past.safetensors', { x: ok }, d8, 4096n), /runs past the end/],
    ['absurd header', () => rawFile('absurd.safetensors', { x: ok }, d8, 1n << 60n), /absurd/],
    ['not JSON', () => rawFile('notjson.safetensors', '{"x": ', d8), /not valid JSON/],
    ['not an object', () => rawFile('array.safetensors', '[1,2]', d8), /not a JSON object/],
    ['bad utf-8', () => rawFile('utf.safetensors', Buffer.from([0x7b, 0xff, 0x7d]).toString('latin1'), d8), /not valid (UTF-8|JSON)/],
    ['missing offsets', () => rawFile('nooff.safetensors', { x: { dtype: 'F32', shape: [2] } }, d8), /missing or invalid data_offsets/],
    ['reversed offsets', () => rawFile('rev.safetensors', { x: { dtype: 'F32', shape: [0], data_offsets: [8, 0] } }, d8), /reversed/],
    ['overlap', () => rawFile('overlap.safetensors', { x: ok, y: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, d8), /overlaps/],
    ['gap', () => rawFile('gap.safetensors', { x: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, d8), /gap of 4 bytes/],
    ['past end', () => rawFile('pastend.safetensors', { x: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, d8), /past the end of the data/],
    ['trailing bytes', () => rawFile('trail.safetensors', { x: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, d8), /not covered/],
    ['unknown dtype', () => rawFile('dtype.safetensors', { x: { dtype: 'F31', shape: [2], data_offsets: [0, 8] } }, d8), /unknown dtype "F31"/],
    ['negative dim', () => rawFile('neg.safetensors', { x: { dtype: 'F32', shape: [-2, -1], data_offsets: [0, 8] } }, d8), /negative dim/],
    ['overflowing shape', () => rawFile('ovf.safetensors', { x: { dtype: 'F32', shape: [2 ** 30, 2 ** 30, 2 ** 30], data_offsets: [0, 8] } }, d8), /overflows/],
    ['shape/bytes mismatch', () => rawFile('mismatch.safetensors', { x: { dtype: 'F32', shape: [3], data_offsets: [0, 8] } }, d8), /has 8 bytes but shape \[3\] of F32 needs 12/],
    ['non-string metadata', () => rawFile('meta.safetensors', { __metadata__: { a: 1 }, x: ok }, d8), /__metadata__\.a is not a string/],
    ['fractional dim', () => rawFile('frac.safetensors', { x: { dtype: 'F32', shape: [1.5], data_offsets: [0, 8] } }, d8), /non-integer dim/],
  ];
  for (const [what, make, msg] of cases) {
    const f = make();
    assertLoraError(t, () => loadSafetensors(f), LoraError, 'ERR_LORA_FORMAT', new RegExp(`${path.basename(f).replace('.', '\\.')}: .*${msg.source}`), what);
  }
  assertLoraError(t, () => loadSafetensors(path.join(dir, 'missing.safetensors')), LoraError, 'ERR_LORA_IO', /ENOENT/, 'missing file');
  t.end();
});

void leakChecked(t, 'truncated and bit-flipped files never crash', (t) => {
  const f = path.join(dir, 'fuzz-src.safetensors');
  const a = tensor(Float32Array.from(randomData(12, 9)), [3, 4]);
  const b = tensor(Float32Array.from(randomData(6, 10)), [6], { dtype: 'bfloat16' });
  saveSafetensors(f, { a, b });
  a.dispose();
  b.dispose();
  const good = fs.readFileSync(f);
  const g = path.join(dir, 'fuzz.safetensors');
  let rejected = 0;
  let loaded = 0;
  for (let i = 0; i < 300; i++) {
    const buf = Buffer.from(good);
    const mutated = i < 100 ? buf.subarray(0, (i * 37) % good.length) : buf;
    if (i >= 100) for (let k = 0; k < 1 + (i % 3); k++) mutated[(i * 7919 + k * 104729) % good.length]! ^= 1 << (i % 8);
    fs.writeFileSync(g, mutated);
    try {
      const { tensors } = loadSafetensors(g);
      loaded++;
      for (const x of tensors.values()) x.dispose();
    } catch (err) {
      if (!(err instanceof LoraError) || !['ERR_LORA_FORMAT', 'ERR_LORA_DTYPE'].includes((err as LoraError).code)) throw err;
      rejected++;
    }
  }
  t.equal(loaded + rejected, 300, `${rejected} rejected with ERR_LORA_FORMAT, ${loaded} still valid (data-only flips)`);
  t.ok(rejected >= 100, 'every truncation is rejected');
});

void leakChecked(t, 'writes are atomic: a failure leaves the old file and no temp file', async (t) => {
  const f = path.join(dir, 'atomic.safetensors');
  const a = tensor(Float32Array.from(randomData(4, 11)), [4]);
  saveSafetensors(f, { a });
  const before = fs.readFileSync(f);
  t.throws(() => saveSafetensors(f, { a, boom: { dtype: 'F32', shape: [2], data: () => { throw new Error('disk on fire'); } } }), /disk on fire/);
  t.same(fs.readFileSync(f), before, 'old file intact after a failing producer');
  assertLoraError(t, () => saveSafetensors(f, { a, short: { dtype: 'F32', shape: [3], data: new Uint8Array(8) } }), LoraError, 'ERR_LORA_SHAPE', /Expected 12 bytes for tensor 'short'/, 'wrong byte count');
  t.same(fs.readFileSync(f), before, 'old file intact after a short tensor');
  assertLoraError(t, () => saveSafetensors(path.join(dir, 'no', 'such', 'dir.safetensors'), { a }), LoraError, 'ERR_LORA_IO', /Could not write/, 'unwritable path');
  await t.rejects(saveSafetensorsAsync(f, { a, boom: { dtype: 'F32', shape: [1], data: () => { throw new Error('async fire'); } } }), /async fire/);
  t.same(fs.readFileSync(f), before, 'old file intact after a failing async write');
  const b = tensor(Float32Array.from(randomData(6, 12)), [2, 3], { dtype: 'float16' });
  await saveSafetensorsAsync(f, { b }, { metadata: { format: 'pt' } });
  const { tensors } = loadSafetensors(f);
  t.same(Buffer.from(tensors.get('b')!.toBytes()), Buffer.from(b.toBytes()), 'async write round-trips');
  for (const x of [a, b, ...tensors.values()]) x.dispose();
  noTemps(t);
});

void leakChecked(t, 'sharded models through model.safetensors.index.json', (t) => {
  const sd = path.join(dir, 'sharded');
  fs.mkdirSync(sd);
  const w1 = tensor(Float32Array.from(randomData(6, 13)), [2, 3]);
  const w2 = tensor(Float32Array.from(randomData(5, 14)), [5], { dtype: 'bfloat16' });
  saveSafetensors(path.join(sd, 'model-00001-of-00002.safetensors'), { 'l.0.weight': w1 });
  saveSafetensors(path.join(sd, 'model-00002-of-00002.safetensors'), { 'l.1.weight': w2 });
  const index = { metadata: { total_size: 44 }, weight_map: { 'l.0.weight': 'model-00001-of-00002.safetensors', 'l.1.weight': 'model-00002-of-00002.safetensors' } };
  fs.writeFileSync(path.join(sd, 'model.safetensors.index.json'), JSON.stringify(index));
  const m = openModel(sd);
  t.equal(m.files.length, 2);
  t.same(m.entries.map((e) => e.name), ['l.0.weight', 'l.1.weight']);
  const { tensors } = loadModel(sd);
  t.same(Buffer.from(tensors.get('l.0.weight')!.toBytes()), Buffer.from(w1.toBytes()));
  t.same(Buffer.from(tensors.get('l.1.weight')!.toBytes()), Buffer.from(w2.toBytes()));
  for (const x of [w1, w2, ...tensors.values()]) x.dispose();
  const bad = (name: string, wm: unknown, msg: RegExp) => {
    const f = path.join(sd, name);
    fs.writeFileSync(f, JSON.stringify({ weight_map: wm }));
    assertLoraError(t, () => openModel(f), LoraError, 'ERR_LORA_FORMAT', msg, name);
  };
  bad('escape.index.json', { x: '../outside.safetensors' }, /not a file name inside the folder/);
  bad('absent.index.json', { 'l.9.weight': 'model-00001-of-00002.safetensors' }, /tensor 'l\.9\.weight' is mapped to model-00001-of-00002\.safetensors, which does not hold it/);
  bad('notmap.index.json', [1], /weight_map is missing or not an object/);
});
