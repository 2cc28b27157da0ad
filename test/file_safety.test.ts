// Files people trust us with (issue 17), at the library level: tensors of 2 GiB and more (sparse
// files of 2.2 and 4.5 GiB, read and written at their far offsets without writing GBs), the
// chunked paths on small tensors, a file changed or replaced between its header and its data,
// a tampered training checkpoint, sharded indexes that name one shard many ways, JSON nested too
// deep, and errors that name the tensor. The CLI side is test/cli_safety.test.ts.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import {
  AdamW, LoraError, LoraLinear, loadModel, loadPeftAdapter, loadSafetensors, mean, mul, openModel, openModelReader,
  readSafetensorsHeader, saveSafetensors, saveSafetensorsAsync, sub, tensor, Tensor, train, CHECKPOINT_FILE,
} from '../lib/index';
import { _setIoChunkBytes } from '../lib/file_io';
import { native } from '../lib/native';
import { readTensorBytes } from '../lib/safetensors';
import { empty } from '../lib/tensor';
import { assertLoraError, leakChecked, randomData } from './helpers';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-files-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
const GiB = 2 ** 30;

function noTemps(tt: typeof t, d: string): void {
  tt.same(fs.readdirSync(d).filter((f) => f.endsWith('.tmp')), [], 'no temp files left');
}

// A safetensors file whose data section is `dataSize` bytes of holes except `writes` (offsets
// relative to the data section): a file of GiBs that costs a few KiB of disk.
function sparseFile(file: string, header: Record<string, unknown>, dataSize: number, writes: [number, Uint8Array][]): number {
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + json.length) % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  const fd = fs.openSync(file, 'w');
  try {
    fs.writeSync(fd, Buffer.concat([len, Buffer.from(json)]), 0, 8 + json.length, 0);
    for (const [at, bytes] of writes) fs.writeSync(fd, bytes, 0, bytes.length, 8 + json.length + at);
    fs.ftruncateSync(fd, 8 + json.length + dataSize);
  } finally {
    fs.closeSync(fd);
  }
  return 8 + json.length;
}

const diskBytes = (f: string) => fs.statSync(f).blocks * 512;

function readAt(file: string, position: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, n, position);
  } finally {
    fs.closeSync(fd);
  }
  return b;
}

void leakChecked(t, 'chunked reads and writes: every dtype through 24-byte chunks equals the one-piece path', async (t) => {
  const f = path.join(dir, 'chunks.safetensors');
  const f64 = Float64Array.from(randomData(13, 1));
  const i64 = new BigInt64Array([5n, -7n, 2147483647n, -2147483648n, 0n]);
  const a = tensor(Float32Array.from(randomData(37, 2)), [37]);
  const bf = tensor(Float32Array.from(randomData(29, 3)), [29], { dtype: 'bfloat16' });
  const hf = tensor(Float32Array.from(randomData(11, 4)), [11], { dtype: 'float16' });
  const ids = tensor([3, -1, 70000, 5, 6, 7, 8], [7], { dtype: 'int32' });
  const zeros = tensor(new Float32Array(40), [40]);
  const sources = {
    a, bf, hf, ids, zeros,
    f64: { dtype: 'F64' as const, shape: [13], data: new Uint8Array(f64.buffer) },
    i64: { dtype: 'I64' as const, shape: [5], data: new Uint8Array(i64.buffer) },
    u8: { dtype: 'U8' as const, shape: [31], data: Uint8Array.from({ length: 31 }, (_, i) => (i * 37) & 255) },
    f8: { dtype: 'F8_E4M3' as const, shape: [27], data: Uint8Array.from({ length: 27 }, (_, i) => (i * 11) & 0x7e) },
    produced: { dtype: 'F32' as const, shape: [9], data: () => tensor(Float32Array.from(randomData(9, 5)), [9]) },
    streamed: { dtype: 'U8' as const, shape: [50], data: { byteLength: 50, read: (into: Uint8Array, off: number) => { for (let i = 0; i < into.length; i++) into[i] = (off + i) % 7; } } },
  };
  saveSafetensors(f, sources, { metadata: { format: 'pt' } });
  const whole = fs.readFileSync(f);
  const one = loadSafetensors(f).tensors;
  const old = _setIoChunkBytes(24);
  try {
    const g = path.join(dir, 'chunks-small.safetensors');
    saveSafetensors(g, sources, { metadata: { format: 'pt' } });
    t.same(fs.readFileSync(g), whole, 'written in 24-byte chunks: the same file, byte for byte');
    const h = path.join(dir, 'chunks-async.safetensors');
    await saveSafetensorsAsync(h, sources, { metadata: { format: 'pt' } });
    t.same(fs.readFileSync(h), whole, 'the async writer too');
    for (const mode of ['keep', 'float32'] as const) {
      const chunked = loadSafetensors(g, { dtype: mode }).tensors;
      const ref = mode === 'keep' ? one : loadSafetensors(f, { dtype: mode }).tensors;
      for (const [k, x] of ref) {
        const y = chunked.get(k)!;
        t.same([y.dtype, y.shape], [x.dtype, x.shape], `${k} (${mode}): dtype and shape`);
        t.same(Buffer.from(y.toBytes()), Buffer.from(x.toBytes()), `${k} (${mode}): read in 24-byte chunks, the same bytes`);
      }
      for (const x of chunked.values()) x.dispose();
      if (ref !== one) for (const x of ref.values()) x.dispose();
    }
  } finally {
    _setIoChunkBytes(old);
  }
  // straight into a tensor the caller made (the loader's path), through a small reused staging buffer
  const m = openModelReader(f);
  try {
    const staging = new Uint8Array(16);
    for (const name of ['a', 'bf', 'hf', 'ids']) {
      const e = m.entries.find((x) => x.name === name)!;
      const x = one.get(name)!;
      const into = empty(x.shape, 'cpu', x.dtype);
      m.readTensorInto(e, into, staging);
      t.same(Buffer.from(into.toBytes()), Buffer.from(x.toBytes()), `${name} (${x.dtype}): read into a tensor in 16-byte pieces, the same bytes`);
      into.dispose();
    }
    const a32 = m.entries.find((x) => x.name === 'a')!, f64e = m.entries.find((x) => x.name === 'f64')!;
    const wrong = empty(a32.shape, 'cpu', 'bfloat16'), short = empty([3], 'cpu', 'float32'), wide = empty([13], 'cpu', 'float32');
    assertLoraError(t, () => m.readTensorInto(a32, wrong), LoraError, 'ERR_LORA_STATE', /float32 CPU tensor .* into but received a bfloat16/, 'another dtype than the file stores: refused');
    assertLoraError(t, () => m.readTensorInto(a32, short), LoraError, 'ERR_LORA_STATE', /received a float32 cpu tensor of 3/, 'another size: refused');
    assertLoraError(t, () => m.readTensorInto(f64e, wide), LoraError, 'ERR_LORA_STATE', /F64/, 'a dtype we convert (F64): refused, readTensor takes it');
    for (const x of [wrong, short, wide]) x.dispose();
  } finally {
    m.close();
  }
  t.same(Array.from(one.get('streamed')!.toFloat32Array()).slice(0, 9), [0, 1, 2, 3, 4, 5, 6, 0, 1], 'a ByteSource is streamed');
  for (const x of [a, bf, hf, ids, zeros, ...one.values()]) x.dispose();
  noTemps(t, dir);
});

void leakChecked(t, 'native byte ranges: bounds checked, and offsets past 4 GiB in a lazily allocated 4.5 GiB tensor', (t) => {
  const small = empty([4], 'cpu', 'float32');
  native.writeBytes(small._storage, 4, new Float32Array([7, 8]));
  const back = new Float32Array(2);
  native.readBytes(small._storage, 4, back);
  t.same(Array.from(back), [7, 8]);
  assertLoraError(t, () => native.writeBytes(small._storage, 12, new Float32Array(2)), LoraError, 'ERR_LORA_RANGE', /byte range \[12, \+8\) lies outside the 16-byte tensor/, 'write past the end');
  assertLoraError(t, () => native.readBytes(small._storage, 17, new Uint8Array(0)), LoraError, 'ERR_LORA_RANGE', /outside/, 'offset past the end');
  small.dispose();
  // untouched pages of a fresh allocation cost no memory: only the two pages written here are touched
  const huge = empty([2304, 2 ** 20], 'cpu', 'bfloat16'); // 4.5 GiB
  const far = 4.5 * GiB - 6;
  native.writeBytes(huge._storage, far, new Uint8Array([1, 2, 3, 4, 5, 6]));
  const got = new Uint8Array(6);
  native.readBytes(huge._storage, far, got);
  t.same(Array.from(got), [1, 2, 3, 4, 5, 6], `bytes at offset ${far} (past 2^32) round-trip`);
  assertLoraError(t, () => native.readBytes(huge._storage, far, new Uint8Array(7)), LoraError, 'ERR_LORA_RANGE', /lies outside the 4831838208-byte tensor/, 'one byte too far');
  assertLoraError(t, () => huge.toBytes(), LoraError, 'ERR_LORA_UNSUPPORTED', /fits one typed array \(2\^32 elements\) for toBytes\(\) but it holds 4831838208 bytes; saveSafetensors\(\) writes larger ones in chunks/, 'toBytes() of 4.5 GiB: a clear error, not a bare RangeError');
  huge.dispose();
  native.releaseCached();
});

// Two sparse files: 2.2 GiB (a float32 tensor of 2292 MiB, then a small one past 2^31) and 4.5 GiB
// (a bfloat16 tensor of 4.5 GiB, then a small one past 2^32). A marker near each big tensor's end
// sits past 2^31 (2^32) too.
const BIG = [
  { name: '2.2 GiB', file: path.join(dir, 'big22.safetensors'), dtype: 'F32', shape: [573, 2 ** 20], elem: 4 },
  { name: '4.5 GiB', file: path.join(dir, 'big45.safetensors'), dtype: 'BF16', shape: [2304, 2 ** 20], elem: 2 },
] as const;
const MARKER = Uint8Array.from([0x3f, 0x80, 0x00, 0x40, 0x11, 0x22, 0x33, 0x44]);
const TAIL = Float32Array.from([1.5, -2, 3.25, 1e-3]);
const bigBytes = (b: (typeof BIG)[number]) => b.shape[0] * b.shape[1] * b.elem;
for (const b of BIG) {
  const n = bigBytes(b);
  sparseFile(b.file, {
    __metadata__: { format: 'pt' },
    big: { dtype: b.dtype, shape: b.shape, data_offsets: [0, n] },
    tail: { dtype: 'F32', shape: [4], data_offsets: [n, n + 16] },
  }, n + 16, [[n - 64, MARKER], [n, new Uint8Array(TAIL.buffer)]]);
}

// Reading GiBs, even of holes, costs what touching that much memory costs on these VMs (about
// 6 s per GiB): the default run reads and writes only at the far offsets; LORA_NATIVE_BIG_TESTS=1 also
// streams and loads the whole tensors (test/cli_safety.test.ts has the merges).
const bigSkip = process.env.LORA_NATIVE_BIG_TESTS === '1' ? false : 'reads 6.7 GiB and loads 2.2 and 4.5 GiB into memory (minutes here): set LORA_NATIVE_BIG_TESTS=1';

// A big tensor's bytes made up on the fly (zeros and the marker), so writing one reads nothing.
function madeUp(n: number) {
  return {
    byteLength: n,
    read(into: Uint8Array, off: number): void {
      into.fill(0);
      for (let k = 0; k < MARKER.length; k++) {
        const at = n - 64 + k - off;
        if (at >= 0 && at < into.length) into[at] = MARKER[k]!;
      }
    },
  };
}

t.test('tensors of 2.2 and 4.5 GiB: headers, reads and chunked writes at the far offsets, clear limits', async (t) => {
  for (const b of BIG) {
    const n = bigBytes(b);
    const h = readSafetensorsHeader(b.file);
    const tail = h.entries.find((e) => e.name === 'tail')!;
    t.ok(tail.start > (b.elem === 4 ? 2 ** 31 : 2 ** 32), `${b.name}: the tail tensor starts at byte ${tail.start}`);
    const { tensors } = loadSafetensors(b.file, { names: ['tail'] });
    t.same(Array.from(tensors.get('tail')!.toFloat32Array()), Array.from(TAIL), `${b.name}: a tensor past the big one reads back`);
    tensors.get('tail')!.dispose();
    const m = openModelReader(b.file);
    const big = m.entries.find((e) => e.name === 'big')!;
    const near = new Uint8Array(8);
    m.bytes(big).read(near, n - 64);
    t.same(Array.from(near), Array.from(MARKER), `${b.name}: bytes ${n - 64} into the big tensor (file byte ${big.start + n - 64}) read through the open handle`);
    if (n > 2 ** 32) assertLoraError(t, () => readTensorBytes(big), LoraError, 'ERR_LORA_UNSUPPORTED', /'big' .* is 4831838208 bytes, more than one buffer holds/, `${b.name}: one buffer cannot hold it: a clear error`);
    m.close();
    // write one: only the marker's chunk and the tail are written, the rest stay holes
    const out = path.join(dir, `made-${b.elem}.safetensors`);
    const tailT = tensor(TAIL, [4]);
    const sources = { big: { dtype: b.dtype, shape: b.shape, data: madeUp(n) }, tail: tailT };
    try {
      if (b.elem === 4) saveSafetensors(out, sources);
      else await saveSafetensorsAsync(out, sources);
    } finally {
      tailT.dispose();
    }
    const oh = readSafetensorsHeader(out);
    t.equal(fs.statSync(out).size, oh.dataStart + n + 16, `${b.name}: written at its full size`);
    t.same(readAt(out, oh.dataStart + n - 64, 8), Buffer.from(MARKER), `${b.name}: the marker at file byte ${oh.dataStart + n - 64}`);
    t.same(readAt(out, oh.dataStart + n - 128, 8), Buffer.alloc(8), `${b.name}: zeros before it`);
    const back = loadSafetensors(out, { names: ['tail'] }).tensors.get('tail')!;
    t.same(Array.from(back.toFloat32Array()), Array.from(TAIL), `${b.name}: the tail after it`);
    back.dispose();
    if (diskBytes(b.file) < 1e8) t.ok(diskBytes(out) < 1e8, `${b.name}: zero chunks left as holes (${diskBytes(out)} bytes on disk)`);
    fs.rmSync(out);
  }
  noTemps(t, dir);
});

t.test('tensors of 2.2 and 4.5 GiB stream from file to file and load whole into native memory', { skip: bigSkip }, async (t) => {
  for (const b of BIG) {
    const n = bigBytes(b);
    const m = openModelReader(b.file);
    const out = path.join(dir, `copy-${b.elem}.safetensors`);
    try {
      await saveSafetensorsAsync(out, Object.fromEntries(m.entries.map((e) => [e.name, { dtype: e.dtype, shape: e.shape, data: m.bytes(e) }])));
    } finally {
      m.close();
    }
    const oh = readSafetensorsHeader(out);
    t.same(readAt(out, oh.dataStart + n - 64, 8), Buffer.from(MARKER), `${b.name}: copied, marker in place`);
    fs.rmSync(out);
    const { tensors } = loadSafetensors(b.file, { names: ['big'] });
    const x = tensors.get('big')!;
    t.same([x.dtype, x.shape], [b.elem === 4 ? 'float32' : 'bfloat16', b.shape], `${b.name}: dtype and shape`);
    const got = new Uint8Array(8);
    native.readBytes(x._storage, n - 64, got);
    t.same(Array.from(got), Array.from(MARKER), `${b.name}: the marker lands at byte ${n - 64} of the tensor`);
    x.dispose();
    native.releaseCached();
  }
});

// ---- a file that changes underneath -----------------------------------------------------------

function twoTensorFile(file: string, seed: number, metadata: Record<string, string> = { format: 'pt' }): void {
  const a = tensor(Float32Array.from(randomData(64, seed)), [8, 8]);
  const b = tensor(Float32Array.from(randomData(64, seed + 1)), [8, 8]);
  saveSafetensors(file, { a, b }, { metadata });
  a.dispose();
  b.dispose();
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

void leakChecked(t, 'a file changed or replaced between its header and its data is refused, never mixed', async (t) => {
  const f = path.join(dir, 'changing.safetensors');
  const cases: [string, () => void, RegExp][] = [
    // the case: a rewrite whose header is 32 bytes longer shifts every tensor
    ['rewritten in place with a longer header', () => {
      const other = path.join(dir, 'other.safetensors');
      twoTensorFile(other, 7, { format: 'pt', note: 'x'.repeat(32) });
      fs.writeFileSync(f, fs.readFileSync(other));
    }, /its size went from \d+ to \d+ bytes/],
    ['the same size, modified in place', () => {
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, Buffer.from([1, 2, 3, 4]), 0, 4, fs.fstatSync(fd).size - 4);
      fs.closeSync(fd);
    }, /it was modified/],
    ['replaced by a rename (another job writing atomically)', () => {
      const other = path.join(dir, 'other2.safetensors');
      twoTensorFile(other, 9);
      fs.renameSync(other, f);
    }, /another file was moved to its path/],
    ['deleted', () => fs.rmSync(f), /it was deleted or moved/],
  ];
  for (const [what, change, reason] of cases) {
    twoTensorFile(f, 1);
    const m = openModelReader(f);
    const a = m.readTensor(m.entries[0]!);
    await sleep(30); // past the file system's timestamp granularity
    change();
    assertLoraError(t, () => m.readTensor(m.entries[1]!), LoraError, 'ERR_LORA_IO', new RegExp(`changing\\.safetensors changed while it was being read \\(${reason.source}`), what);
    assertLoraError(t, () => m.verify(), LoraError, 'ERR_LORA_IO', reason, `${what}: verify()`);
    // the streamed bytes of a merge's pass-through tensors are checked the same way
    const out = path.join(dir, 'mixed.safetensors');
    t.throws(() => saveSafetensors(out, { a, b: { dtype: 'F32', shape: [8, 8], data: m.bytes(m.entries[1]!) } }), { code: 'ERR_LORA_IO', message: reason }, `${what}: a write streaming from it fails`);
    t.notOk(fs.existsSync(out), `${what}: and writes nothing`);
    a.dispose();
    m.close();
  }
  twoTensorFile(f, 1);
  const same = loadSafetensors(f).tensors;
  t.equal(same.size, 2, 'an unchanged file loads');
  for (const x of same.values()) x.dispose();
  noTemps(t, dir);
});

// ---- sharded indexes ----------------------------------------------------------------------------

void leakChecked(t, 'a shard named 5,000 ways is opened once; 100,000 index entries are checked in one pass', (t) => {
  const t0 = Date.now();
  const d = path.join(dir, 'spellings');
  fs.mkdirSync(d);
  const names = Array.from({ length: 5000 }, (_, i) => `w.${i}`);
  const data = new Uint8Array(4 * names.length);
  saveSafetensors(path.join(d, 's.safetensors'), Object.fromEntries(names.map((n, i) => [n, { dtype: 'F32' as const, shape: [1], data: data.subarray(4 * i, 4 * i + 4) }])));
  fs.symlinkSync('s.safetensors', path.join(d, 'link.safetensors'));
  const wm: Record<string, string> = {};
  // 5,000 spellings of one path: './' or './/' for each bit of the index, then the name
  const spelling = (i: number) => Array.from({ length: 13 }, (_, b) => ((i >> b) & 1 ? './/' : './')).join('') + 's.safetensors';
  names.forEach((n, i) => { wm[n] = i === 0 ? 'link.safetensors' : spelling(i); });
  fs.writeFileSync(path.join(d, 'model.safetensors.index.json'), JSON.stringify({ weight_map: wm }));
  // count opens through the fs module object the library reads its functions from
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const nodeFs = require('node:fs') as { openSync: typeof fs.openSync };
  const opened: string[] = [];
  const realOpen = nodeFs.openSync;
  nodeFs.openSync = ((p: fs.PathLike, ...rest: unknown[]) => {
    opened.push(String(p));
    return (realOpen as (...a: unknown[]) => number)(p, ...rest);
  }) as typeof fs.openSync;
  let m;
  try {
    m = openModel(d);
  } finally {
    nodeFs.openSync = realOpen;
  }
  t.equal(m.files.length, 1, 'one file');
  t.equal(opened.filter((p) => p.endsWith('.safetensors')).length, 1, `opened once (${opened.length} opens in all)`);
  t.equal(m.entries.length, 5000, 'every tensor found');
  const { tensors } = loadModel(d);
  t.equal(tensors.size, 5000, 'and loaded');
  for (const x of tensors.values()) x.dispose();

  const big = path.join(dir, 'wide');
  fs.mkdirSync(big);
  const n = 100_000;
  const wide = Object.fromEntries(Array.from({ length: n }, (_, i) => [`t.${i}`, { dtype: 'U8' as const, shape: [1], data: new Uint8Array([i & 255]) }]));
  saveSafetensors(path.join(big, 'model-00001-of-00001.safetensors'), wide);
  fs.writeFileSync(path.join(big, 'model.safetensors.index.json'), JSON.stringify({ weight_map: Object.fromEntries(Object.keys(wide).map((k) => [k, 'model-00001-of-00001.safetensors'])) }));
  const t1 = Date.now();
  t.equal(openModel(big).entries.length, n, `${n} entries of one index`);
  t.comment(`timing ${t1 - t0} ms, ${Date.now() - t1} ms`);
});

// ---- JSON nested too deep, tensors named in errors ----------------------------------------------

void leakChecked(t, 'JSON nested 200,000 deep is ERR_LORA_FORMAT in configs, indexes and headers', (t) => {
  const deep = '['.repeat(200_000) + ']'.repeat(200_000);
  const ad = path.join(dir, 'deep-adapter');
  fs.mkdirSync(ad);
  fs.writeFileSync(path.join(ad, 'adapter_config.json'), `{"r": 4, "target_modules": ${deep}}`);
  assertLoraError(t, () => loadPeftAdapter(ad), LoraError, 'ERR_LORA_FORMAT', /adapter_config\.json: nested deeper than 64 levels/, 'adapter config');
  const idx = path.join(dir, 'deep.index.json');
  fs.writeFileSync(idx, `{"metadata": {"x": ${deep}}, "weight_map": {}}`);
  assertLoraError(t, () => openModel(idx), LoraError, 'ERR_LORA_FORMAT', /deep\.index\.json: nested deeper than 64 levels/, 'index');
  const h = path.join(dir, 'deep.safetensors');
  const json = Buffer.from(`{"x": {"dtype": "F32", "shape": ${deep}, "data_offsets": [0, 0]}}`);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(h, Buffer.concat([len, json]));
  assertLoraError(t, () => loadSafetensors(h), LoraError, 'ERR_LORA_FORMAT', /deep\.safetensors: header is nested deeper than 64 levels/, 'safetensors header');
  const ok = `{"r": 4, "target_modules": ${'['.repeat(60)}"q"${']'.repeat(60)}}`;
  fs.writeFileSync(path.join(ad, 'adapter_config.json'), ok);
  t.throws(() => loadPeftAdapter(ad), { code: 'ERR_LORA_FORMAT', message: /target_modules must be a list/ }, '60 levels parse and meet the ordinary checks');
});

void leakChecked(t, 'a FIFO or a folder where a file belongs is refused at once, never waited on', (t) => {
  const fifo = path.join(dir, 'pipe.safetensors');
  const made = spawnSync('mkfifo', [fifo]);
  if (made.status !== 0) t.comment('no mkfifo here: the FIFO case is skipped');
  else {
    assertLoraError(t, () => loadSafetensors(fifo), LoraError, 'ERR_LORA_IO', /pipe\.safetensors: not a regular file/, 'a FIFO as a model file');
    const ad = path.join(dir, 'fifo-adapter');
    fs.mkdirSync(ad);
    spawnSync('mkfifo', [path.join(ad, 'adapter_config.json')]);
    assertLoraError(t, () => loadPeftAdapter(ad), LoraError, 'ERR_LORA_IO', /adapter_config\.json: not a regular file/, 'a FIFO as an adapter config');
  }
  assertLoraError(t, () => loadSafetensors(dir), LoraError, 'ERR_LORA_IO', /not a regular file/, 'a folder');
});

void leakChecked(t, 'write errors name the tensor', (t) => {
  const f = path.join(dir, 'named.safetensors');
  const a = tensor([1, 2], [2]);
  const b = tensor([3, 4], [2]);
  b.dispose();
  assertLoraError(t, () => saveSafetensors(f, { a, b }), LoraError, 'ERR_LORA_DISPOSED', /for tensor 'b' but received a disposed tensor/, 'a disposed tensor');
  const c = tensor([3, 4], [2]);
  c.dispose();
  assertLoraError(t, () => saveSafetensors(f, { a, c: { dtype: 'F32', shape: [2], data: () => c } }), LoraError, 'ERR_LORA_DISPOSED', /for tensor 'c'/, 'a producer returning a disposed tensor');
  const failing = { byteLength: 8, read: () => { throw Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' }); } };
  assertLoraError(t, () => saveSafetensors(f, { a, d: { dtype: 'F32', shape: [2], data: failing } }), LoraError, 'ERR_LORA_IO', /Could not write tensor 'd' to .*named\.safetensors: an input\/output error \(EIO\)/, 'an I/O error while writing one');
  t.notOk(fs.existsSync(f), 'nothing written');
  a.dispose();
  noTemps(t, dir);
});

// ---- checkpoints ------------------------------------------------------------------------------------

void leakChecked(t, 'a tampered checkpoint is refused naming the file and the field, and the model is left as it was', async (t) => {
  const ck = path.join(dir, 'ckpt');
  const x = tensor(Float32Array.from(randomData(8 * 6, 20)), [8, 6]);
  const y = tensor(Float32Array.from(randomData(8 * 4, 21)), [8, 4]);
  const loss = (m: { forward(v: Tensor): Tensor }) => { const d = sub(m.forward(x), y); return mean(mul(d, d)); };
  const layer = () => new LoraLinear({ inFeatures: 6, outFeatures: 4, rank: 2, seed: 3 });
  const m0 = layer();
  await train({ model: m0, data: () => null, loss, steps: 3, optimizer: { lr: 0.05 }, checkpointDir: ck, checkpointEvery: 3, progress: 'none' });
  m0.dispose();
  const file = path.join(ck, CHECKPOINT_FILE);
  const pristine = fs.readFileSync(file);
  const { tensors, metadata } = loadSafetensors(file);
  const sq = [...tensors.keys()].find((k) => k.endsWith('.exp_avg_sq'))!;
  const param = [...tensors.keys()].find((k) => k.startsWith('param.'))!;
  const edit = (change: (ts: Map<string, Tensor>, meta: Record<string, string>) => void) => {
    const ts = new Map([...tensors].map(([k, v]) => [k, v]));
    const meta = { ...metadata };
    change(ts, meta);
    saveSafetensors(file, ts, { metadata: meta });
  };
  const withValue = (k: string, v: number) => (ts: Map<string, Tensor>) => {
    const d = ts.get(k)!.toFloat32Array();
    d[1] = v;
    ts.set(k, tensor(d, ts.get(k)!.shape));
  };
  const trainer = (f: (s: Record<string, unknown>) => void) => (_: Map<string, Tensor>, meta: Record<string, string>) => {
    const s = JSON.parse(meta.trainer!);
    f(s);
    meta.trainer = JSON.stringify(s);
  };
  const cases: [string, (ts: Map<string, Tensor>, meta: Record<string, string>) => void, string, RegExp][] = [
    ['negative exp_avg_sq', withValue(sq, -1), 'ERR_LORA_FORMAT', new RegExp(`${sq.replace(/\./g, '\\.')} holds -1 at element 1 \\(expected finite values >= 0\\)`)],
    ['NaN exp_avg_sq', withValue(sq, NaN), 'ERR_LORA_FORMAT', /exp_avg_sq holds NaN at element 1/],
    ['Inf parameter', withValue(param, Infinity), 'ERR_LORA_FORMAT', new RegExp(`${param.replace(/\./g, '\\.')} holds Infinity at element 1 \\(expected finite values\\)`)],
    ['negative step', trainer((s) => { s.step = -4; }), 'ERR_LORA_FORMAT', /expected a non-negative integer for trainer\.step but it holds -4/],
    ['a corrupt generator state', trainer((s) => { s.dataRng = ['x', 1, null]; }), 'ERR_LORA_FORMAT', /expected a generator state for trainer\.dataRng but it holds/],
    ['negative optimizer step', trainer((s) => { const st = (s.optimizer as { steps: Record<string, number> }).steps; st[Object.keys(st)[0]!] = -1; }), 'ERR_LORA_FORMAT', /trainer\.optimizer\.steps\['.*'\] but it holds -1/],
    ['a transposed moment', (ts) => { const k = [...ts.keys()].find((n) => n.endsWith('.exp_avg'))!; const v = ts.get(k)!; ts.set(k, tensor(v.toFloat32Array(), [...v.shape].reverse())); }, 'ERR_LORA_SHAPE', /exp_avg of shape \[\d+, \d+\] but the model's is/],
  ];
  for (const [what, change, code, msg] of cases) {
    const extra: Tensor[] = [];
    edit((ts, meta) => {
      const before = new Set(ts.values());
      change(ts, meta);
      for (const v of ts.values()) if (!before.has(v)) extra.push(v);
    });
    for (const v of extra) v.dispose();
    const m = layer();
    const start = m.parameters().map((p) => [...p.toFloat32Array()]);
    const opt = new AdamW(m.parameters(), { lr: 0.05 });
    await t.rejects(train({ model: m, data: () => null, loss, steps: 6, optimizer: opt, checkpointDir: ck, checkpointEvery: 3, progress: 'none' }),
      { code, message: new RegExp(`${CHECKPOINT_FILE.replace('.', '\\.')}`) }, `${what}: refused (names the file)`);
    await t.rejects(train({ model: m, data: () => null, loss, steps: 6, optimizer: opt, checkpointDir: ck, checkpointEvery: 3, progress: 'none' }), { code, message: msg }, `${what}: names the field`);
    t.same(m.parameters().map((p) => [...p.toFloat32Array()]), start, `${what}: the model is as it was`);
    opt.dispose();
    m.dispose();
  }
  fs.writeFileSync(file, pristine);
  const m = layer();
  const r = await train({ model: m, data: () => null, loss, steps: 6, optimizer: { lr: 0.05 }, checkpointDir: ck, checkpointEvery: 3, progress: 'none' });
  t.same([r.resumedFrom, r.steps, r.skippedSteps], [3, 6, 0], 'the untouched checkpoint resumes');
  m.dispose();
  for (const v of [...tensors.values(), x, y]) v.dispose();
});
