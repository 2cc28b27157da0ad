// The binding's contract with lib/: the ids of native/backend/backend.h match lib/native.ts's
// constants name for name (every dtype, device and elementwise op; the kernel ops lib/ names), lib/binding_types.ts is what the compiled addon describes, every kernel
// op has a binding function, and supports() answers for each.
import { spawnSync } from 'node:child_process';
import * as path from 'node:path';

import t from 'tap';

import { BINARY_OP, DEVICE_ID, DTYPE_ID, native, OP, REDUCE_OP, UNARY_OP } from '../lib/native';

const root = path.resolve(__dirname, '..');
const enums = native.enums();

t.test('the addon names every id as lib/native.ts does', async (t) => {
  const byId = (o: Record<string, number>) => Object.entries(o).sort((a, b) => a[1] - b[1]).map(([k]) => k);
  t.same(enums.dtype, byId(DTYPE_ID), 'dtypes');
  t.same(enums.device, byId(DEVICE_ID), 'devices');
  t.same(enums.unary, byId(UNARY_OP), 'unary ops');
  t.same(enums.binary, byId(BINARY_OP), 'binary ops');
  t.same(enums.reduce, byId(REDUCE_OP), 'reduce ops');
  // OP names the kernels lib/ asks supports() about: each must have the addon's id
  for (const [name, id] of Object.entries(OP)) t.equal(enums.op[id], name, `op ${name} is id ${id}`);
  t.ok(Number.isInteger(enums.abiVersion) && enums.abiVersion > 0, `backend interface version ${enums.abiVersion}`);
});

t.test('every kernel op has its binding function, and supports() answers for it', async (t) => {
  const described = native.describe();
  const names = new Set(described.map((f) => f.name));
  enums.op.forEach((op, id) => {
    t.ok(names.has(op), `${op} is exported`);
    t.equal(described.find((f) => f.name === op)?.op, op, `${op} serves op ${op}`);
    t.equal(native.supports(DEVICE_ID.cpu, id, DTYPE_ID.float32), true, `the CPU supports ${op} in float32`);
  });
  t.equal(native.supports(DEVICE_ID.cpu, OP.gemm, DTYPE_ID.bfloat16), true, 'the CPU has the bf16-weight GEMM');
  t.equal(native.supports(DEVICE_ID.cpu, OP.loraForward, DTYPE_ID.bfloat16), true, 'and bf16 LoRA weights');
  t.equal(native.supports(DEVICE_ID.cpu, OP.softmax, DTYPE_ID.bfloat16), false, 'softmax is float32 only');
  t.equal(native.supports(DEVICE_ID.cpu, enums.op.length, DTYPE_ID.float32), false, 'an op id past the last is not supported');
  t.equal(native.supports(DEVICE_ID.cpu, -1, DTYPE_ID.float32), false, 'nor a negative one');
  t.equal(native.supports(DEVICE_ID.cpu, OP.gemm, 99), false, 'nor an unknown dtype');
  for (const f of described) t.match(f.signature, /^\(.*\): .+$/, `${f.name} has a TypeScript signature`);
  const exported = Object.keys(native).filter((k) => k !== 'Storage').sort();
  t.same(exported, [...names].sort(), 'describe() lists exactly the exported functions');
});

t.test('lib/binding_types.ts is what the addon describes', async (t) => {
  const r = spawnSync(process.execPath, [path.join(root, 'scripts', 'binding-types.js'), '--check'], { encoding: 'utf8', env: { ...process.env, LORA_NATIVE_ADDON: native.features().addonPath } });
  t.equal(r.status, 0, r.status === 0 ? 'up to date' : `stale: ${r.stderr.trim()}`);
});
