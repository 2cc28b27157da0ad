// The CUDA backend: how it is found and loaded (runs everywhere: missing driver, missing or
// broken library, a fake driver without devices), and, where a GPU is present, CUDA ops against
// the CPU backend through the public API on awkward shapes. Every op at the binding level is
// covered by bench/gpu/check.js on the GPU machine; this file keeps to what users call.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import {
  add, AdamW, applyLora, CausalLM, crossEntropy, features, loadCausalLM, loadLoraAdapter, LoraError, LoraLinear, matmul, mul, randn,
  relu, reshape, saveLoraAdapter, sigmoid, silu, sum, tanh, tensor, Tensor, tidy, exp, max, mean, train, TransformerLM, loadDataset, loadTokenizer,
} from '../lib/index';
import { assertClose, assertLoraError, leakChecked, randomData } from './helpers';
import { tinyLlama, writeCheckpoint } from './hf_checkpoint';

const root = path.resolve(__dirname, '..');
const f = features();
const noCuda = f.cuda ? false : `CUDA unavailable: ${f.reason}`;

// features() in a fresh process with extra environment (the loader runs once per process). The
// child loads lib/ through tap's TypeScript import hook when we run under tap, else dist/.
const tsImport = process.execArgv.filter((a) => a.includes('@tapjs/typescript'));
const distNative = path.join(root, 'dist', 'lib', 'native.js');
const spawnSkip = tsImport.length || fs.existsSync(distNative) ? false : 'needs tap\'s TypeScript hook or a built dist/';
function childFeatures(env: Record<string, string>): { cuda: boolean; reason?: string; devices: unknown[]; cudaLibrary: string } {
  const target = tsImport.length ? path.join(root, 'lib', 'native') : distNative;
  const script = `process.stdout.write(JSON.stringify(require(${JSON.stringify(target)}).native.features()))`;
  const out = execFileSync(process.execPath, [...tsImport, '-e', script], { env: { ...process.env, ...env }, encoding: 'utf8' });
  return JSON.parse(out);
}

t.test('features() describes CUDA availability', async (t) => {
  t.type(f.cuda, 'boolean');
  t.ok(Array.isArray(f.devices), 'devices is an array');
  t.match(f.cudaLibrary, f.cudaEmulated ? /liblora_cuda_emu\.so$/ : /liblora_cuda\.so$/, 'names the library it tried');
  if (f.cuda) {
    t.equal(f.reason, undefined, 'no reason when CUDA works');
    t.ok(f.devices.length >= 1, 'at least one device');
    for (const d of f.devices) {
      t.type(d.name, 'string');
      t.match(d.computeCapability, /^\d+\.\d+$/);
      t.ok(d.memory > 0, 'memory in bytes');
    }
  } else {
    t.type(f.reason, 'string');
    t.ok((f.reason ?? '').length > 10, `reason says why: ${f.reason}`);
  }
});

t.test('without a GPU, asking for cuda throws ERR_LORA_NO_CUDA with the reason', { skip: f.cuda ? 'CUDA is available here' : false }, async (t) => {
  const reason = new RegExp(escapeRegExp((f.reason ?? '').slice(0, 40)));
  assertLoraError(t, () => tensor([1, 2, 3], [3], { device: 'cuda' }), LoraError, 'ERR_LORA_NO_CUDA', reason, 'tensor(..., {device: cuda})');
  const x = tensor([1, 2, 3], [3]);
  assertLoraError(t, () => x.to('cuda'), LoraError, 'ERR_LORA_NO_CUDA', /CUDA is not available/, 'Tensor#to(cuda)');
  x.dispose();
  if (!fs.existsSync('/usr/lib/x86_64-linux-gnu/libcuda.so.1') && !fs.existsSync('/lib/x86_64-linux-gnu/libcuda.so.1'))
    t.match(f.reason, /no NVIDIA driver \(libcuda\.so\.1 not found: /, 'names the missing driver');
});

t.test('LORA_NATIVE_CUDA_LIB pointing at a missing file: the reason names the file', { skip: spawnSkip }, async (t) => {
  const missing = path.join(os.tmpdir(), `lora-native-missing-${process.pid}`, 'liblora_cuda.so');
  const c = childFeatures({ LORA_NATIVE_CUDA_LIB: missing });
  t.equal(c.cuda, false);
  t.equal(c.cudaLibrary, missing);
  t.match(c.reason, new RegExp(`could not be loaded \\(${escapeRegExp(missing)}: cannot open shared object file: No such file or directory\\)`));
  t.match(c.reason, /node scripts\/build-cuda\.js/, 'says how to build it');
});

t.test('LORA_NATIVE_CUDA_LIB pointing at a file that is not a library', { skip: spawnSkip }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-cuda-'));
  const bogus = path.join(dir, 'liblora_cuda.so');
  fs.writeFileSync(bogus, 'this is not an ELF shared object, just text long enough to have a header\n'.repeat(4));
  try {
    const c = childFeatures({ LORA_NATIVE_CUDA_LIB: bogus });
    t.equal(c.cuda, false);
    t.match(c.reason, new RegExp(`${escapeRegExp(bogus)}: (invalid ELF header|file too short)`));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

t.test('LORA_NATIVE_CUDA_LIB pointing at a library that is not the CUDA backend', { skip: spawnSkip }, async (t) => {
  const other = path.join(f.addonDir, 'lora_native.node');  // a real shared object without the CUDA backend's exports
  const c = childFeatures({ LORA_NATIVE_CUDA_LIB: other });
  t.equal(c.cuda, false);
  t.match(c.reason, /is not a lora-native CUDA backend \(no lora_cuda_backend_init\/abi/);
});

// A stand-in libcuda.so.1 (built here with cc) drives the driver-probe branches without a GPU.
const cc = ['cc', 'gcc'].find((c) => spawnSync(c, ['--version']).status === 0);
const fakeSkip = spawnSkip || (cc ? false : 'no C compiler to build a fake libcuda.so.1');
t.test('a driver that reports errors or no devices', { skip: fakeSkip }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-fakecuda-'));
  try {
    const src = path.join(dir, 'fake.c');
    fs.writeFileSync(src, `
#include <stdio.h>
#include <stdlib.h>
static int env(const char* k, int d) { const char* v = getenv(k); return v ? atoi(v) : d; }
int cuInit(unsigned f) { (void)f; return env("FAKE_CU_INIT", 0); }
int cuDeviceGetCount(int* c) { *c = env("FAKE_CU_COUNT", 0); return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return 0; }
int cuDeviceGetName(char* n, int len, int d) { snprintf(n, (size_t)len, "Fake GPU %d", d); return 0; }
int cuDeviceGetAttribute(int* v, int a, int d) { (void)d; *v = a == 75 ? 9 : 0; return 0; }
int cuDeviceTotalMem_v2(size_t* b, int d) { (void)d; *b = (size_t)80 << 30; return 0; }
int cuGetErrorString(int r, const char** s) { *s = r == 100 ? "no CUDA-capable device is detected" : "fake error"; return 0; }
`);
    execFileSync(cc!, ['-shared', '-fPIC', '-o', path.join(dir, 'libcuda.so.1'), src]);
    // LORA_NATIVE_CUDA_LIB '': the library beside the addon, even when this run uses the emulator.
    const env = { LD_LIBRARY_PATH: `${dir}${process.env.LD_LIBRARY_PATH ? `:${process.env.LD_LIBRARY_PATH}` : ''}`, LORA_NATIVE_CUDA_LIB: '' };

    const noDevice = childFeatures({ ...env, FAKE_CU_INIT: '100' });
    t.equal(noDevice.cuda, false);
    t.match(noDevice.reason, /^the NVIDIA driver failed to initialise: no CUDA-capable device is detected \(CUresult 100\)/);

    const zero = childFeatures({ ...env, FAKE_CU_COUNT: '0' });
    t.equal(zero.cuda, false);
    t.match(zero.reason, /^no CUDA device \(the driver is installed but reports no GPU\)/);

    // Devices are listed from the driver even when the backend then cannot start on it.
    const two = childFeatures({ ...env, FAKE_CU_COUNT: '2', LORA_NATIVE_CUDA_LIB: path.join(dir, 'missing.so') });
    t.equal(two.cuda, false);
    t.same(two.devices, [
      { name: 'Fake GPU 0', computeCapability: '9.0', memory: 80 * 2 ** 30 },
      { name: 'Fake GPU 1', computeCapability: '9.0', memory: 80 * 2 ** 30 },
    ]);
    t.match(two.reason, /^the CUDA backend library could not be loaded/, 'only the library is missing');

    // A backend library built against another version of native/backend/backend.h is refused
    // before its constructor runs.
    const stale = path.join(dir, 'stale.c');
    fs.writeFileSync(stale, 'void* lora_cuda_backend_init(char* e, unsigned long n) { (void)e; (void)n; return 0; }\nunsigned lora_cuda_backend_abi(void) { return 1; }\n');
    execFileSync(cc!, ['-shared', '-fPIC', '-o', path.join(dir, 'libstale.so'), stale]);
    const old = childFeatures({ ...env, FAKE_CU_COUNT: '1', LORA_NATIVE_CUDA_LIB: path.join(dir, 'libstale.so') });
    t.equal(old.cuda, false);
    t.match(old.reason, /libstale\.so was built for backend interface version 1 but this addon needs version \d+; rebuild it/, 'a stale library is named as such');

    // With the real liblora_cuda.so, its static CUDA runtime meets the fake driver and refuses:
    // lora_cuda_create's failure comes back as the reason (no crash, no exit).
    if (fs.existsSync(path.join(f.addonDir, 'liblora_cuda.so'))) {
      const real = childFeatures({ ...env, FAKE_CU_COUNT: '1', LORA_NATIVE_CUDA_LIB: '' });
      t.equal(real.cuda, false);
      t.equal(real.devices.length, 1);
      // The fake driver has no cuDriverGetVersion, so the static runtime finds it too old: the
      // reason says what to do about it.
      t.match(real.reason, /^the CUDA backend failed to start: the NVIDIA driver (supports CUDA \d+\.\d+ but liblora_cuda\.so was built with|is too old for liblora_cuda\.so, which was built with) CUDA \d+\.\d+ \(CUDA 13 needs a driver of the R580 series or newer\)\. Update the driver, or rebuild liblora_cuda\.so .*\(cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime version \(cudaErrorInsufficientDriver\)\)$/);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// ---- on a GPU: the same results as the CPU backend ----------------------------------------------
const FP32 = { atol: 1e-4, rtol: 1e-4 };

function pair(n: number, shape: number[], seed: number, scale = 1): [Tensor, Tensor] {
  const data = Float32Array.from(randomData(n, seed, scale));
  return [tensor(data, shape), tensor(data, shape, { device: 'cuda' })];
}

t.test('CUDA matches the CPU', { skip: noCuda }, async (t) => {
  await leakChecked(t, 'round trip cpu -> cuda -> cpu is exact', (t) => {
    const [a, onDevice] = pair(1001, [7, 11, 13], 1);
    t.same(Array.from(onDevice.toFloat32Array()), Array.from(a.toFloat32Array()), 'tensor(..., {device: cuda}) holds the data');
    onDevice.dispose();
    const back = tidy(() => a.to('cuda').to('cpu'));
    t.same(Array.from(back.toFloat32Array()), Array.from(a.toFloat32Array()));
    const moved = a.to('cuda');
    t.equal(moved.device, 'cuda');
    moved.dispose();
    a.dispose();
    back.dispose();
  });

  await leakChecked(t, 'matmul at awkward shapes, batched and broadcast', (t) => {
    for (const [aShape, bShape] of [[[1, 1], [1, 1]], [[37, 129], [129, 65]], [[3, 17, 300], [300, 33]], [[2, 5, 64, 7], [7, 129]], [[130, 1000], [1000, 16]]]) {
      const na = aShape.reduce((x, y) => x * y, 1), nb = bShape.reduce((x, y) => x * y, 1);
      const [ac, ag] = pair(na, aShape, na), [bc, bg] = pair(nb, bShape, nb + 7);
      const rc = matmul(ac, bc), rg = matmul(ag, bg);
      t.equal(rg.device, 'cuda');
      assertClose(t, rg.toFloat32Array(), rc.toFloat32Array(), { atol: 1e-4 * Math.sqrt(aShape[aShape.length - 1]!), rtol: 1e-4 }, `matmul ${aShape} x ${bShape}`);
      for (const x of [ac, ag, bc, bg, rc, rg]) x.dispose();
    }
  });

  await leakChecked(t, 'elementwise with broadcasting, unary ops and reductions', (t) => {
    const [ac, ag] = pair(3 * 1 * 129, [3, 1, 129], 11), [bc, bg] = pair(4 * 129, [4, 129], 12);
    const fns: [string, (a: Tensor, b: Tensor) => Tensor][] = [
      ['add', add], ['mul', mul], ['relu', (a) => relu(a)], ['tanh', (a) => tanh(a)], ['sigmoid', (a) => sigmoid(a)],
      ['silu', (a) => silu(a)], ['exp', (a) => exp(a)], ['sum', (a, b) => sum(add(a, b), 1)],
      ['mean', (a, b) => mean(mul(a, b), [0, 2])], ['max', (a, b) => max(add(a, b), -1)],
    ];
    for (const [name, fn] of fns) {
      const rc = tidy(() => fn(ac, bc)), rg = tidy(() => fn(ag, bg));
      assertClose(t, rg.toFloat32Array(), rc.toFloat32Array(), { atol: 1e-5, rtol: 1e-5 }, name);
      rc.dispose();
      rg.dispose();
    }
    for (const x of [ac, ag, bc, bg]) x.dispose();
  });

  await leakChecked(t, 'mixing devices is ERR_LORA_DEVICE', (t) => {
    const [ac, ag] = pair(6, [2, 3], 21);
    assertLoraError(t, () => add(ac, ag), LoraError, 'ERR_LORA_DEVICE', /one device/, 'add(cpu, cuda)');
    ac.dispose();
    ag.dispose();
  });

  for (const [N, C, OC, R, p, bf16] of [[37, 61, 45, 3, 0, false], [130, 257, 129, 16, 0.1, false], [33, 64, 257, 8, 0, true]] as const) {
    await leakChecked(t, `LoraLinear (${N}, ${C}, ${OC}, ${R}) dropout ${p}${bf16 ? ' bf16 weight' : ''}: forward, backward, AdamW`, (t) => {
      const make = () => {
        const layer = new LoraLinear({ inFeatures: C, outFeatures: OC, rank: R, alpha: 2 * R, dropout: p, seed: 5 });
        tidy(() => layer.loraB.assign(Float32Array.from(randomData(OC * R, 9, 0.1))));
        if (bf16) {
          const w = layer.weight;
          layer.weight = w.toDtype('bfloat16');
          w.dispose();
        }
        return layer;
      };
      const cpu = make(), gpu = make().to('cuda');
      t.equal(gpu.loraA.device, 'cuda');
      const [xc, xg] = pair(N * C, [N, C], 31);
      const [gc, gg] = pair(N * OC, [N, OC], 32);
      const results = [cpu, gpu].map((layer, i) => {
        const x = i === 0 ? xc : xg, g = i === 0 ? gc : gg;
        const opt = new AdamW(layer.parameters(), { lr: 1e-2 });
        const y = layer.forward(x);
        const out = y.toFloat32Array();
        tidy(() => sum(mul(y, g)).backward());
        const dA = layer.loraA.grad!.toFloat32Array(), dB = layer.loraB.grad!.toFloat32Array();
        opt.step();
        const A1 = layer.loraA.toFloat32Array();
        opt.dispose();
        y.dispose();
        return { out, dA, dB, A1 };
      });
      const tol = bf16 ? { atol: 2e-2, rtol: 2e-2 } : FP32;  // bf16: activations rounded on tensor cores
      assertClose(t, results[1]!.out, results[0]!.out, tol, 'forward y');
      assertClose(t, results[1]!.dA, results[0]!.dA, FP32, 'dA');
      assertClose(t, results[1]!.dB, results[0]!.dB, FP32, 'dB');
      assertClose(t, results[1]!.A1, results[0]!.A1, FP32, 'loraA after one AdamW step');
      for (const x of [xc, xg, gc, gg]) x.dispose();
      cpu.dispose();
      gpu.dispose();
    });
  }

  await leakChecked(t, 'a small TransformerLM with LoRA trains on cuda as on the CPU, and its adapter round-trips', async (t) => {
    // Embedding, attention, layer norm, GELU MLP, cross-entropy with label smoothing, LoRA dropout,
    // accumulation, clipping, AdamW with a cosine schedule: the whole training path on the device.
    const B = 3, T = 9, V = 13;
    const run = async (device: 'cpu' | 'cuda') => {
      const model = new TransformerLM({ vocabSize: V, dModel: 32, nHeads: 4, nLayers: 2, maxSeqLen: 16, seed: 7 });
      applyLora(model, { targetModules: 'all-linear', rank: 4, alpha: 8, dropout: 0.1, seed: 3 });
      model.to(device);
      const losses: number[] = [];
      await train({
        model, steps: 4, gradientAccumulation: 2, clipGradNorm: 0.5, schedule: 'cosine', progress: 'none',
        optimizer: { lr: 3e-3, weightDecay: 0.01 },
        data: (i: number) => i,
        loss: (m, i) => {
          const ids = tensor(Float32Array.from({ length: B * T }, (_, j) => (j * 7 + i * 3) % V), [B, T], { dtype: 'int32', device });
          const tg = tensor(Float32Array.from({ length: B * T }, (_, j) => (j % 5 === 0 ? -100 : (j * 5 + i) % V)), [B * T], { dtype: 'int32', device });
          return crossEntropy(reshape(m.forward(ids), [B * T, V]), tg, { ignoreIndex: -100, labelSmoothing: 0.1 });
        },
        onStep: (s) => { losses.push(s.loss); },
      });
      return { model, losses };
    };
    const cpu = await run('cpu'), gpu = await run('cuda');
    t.equal(gpu.model.namedParameters().every(([, p]) => p.device === 'cuda'), true, 'every parameter on cuda');
    assertClose(t, Float32Array.from(gpu.losses), Float32Array.from(cpu.losses), { atol: 1e-4, rtol: 1e-4 }, 'losses of 4 steps');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-cuda-adapter-'));
    try {
      saveLoraAdapter(gpu.model, dir);
      const fresh = new TransformerLM({ vocabSize: V, dModel: 32, nHeads: 4, nLayers: 2, maxSeqLen: 16, seed: 7 });
      applyLora(fresh, { targetModules: 'all-linear', rank: 4, alpha: 8, seed: 99 });
      loadLoraAdapter(fresh, dir);
      const ids = tensor([1, 2, 3, 4, 5, 6], [1, 6], { dtype: 'int32' });
      const onGpu = tidy(() => { gpu.model.eval(); return gpu.model.forward(ids.to('cuda')).toFloat32Array(); });
      const reloaded = tidy(() => { fresh.eval(); return fresh.forward(ids).toFloat32Array(); });
      assertClose(t, onGpu, reloaded, FP32, 'the adapter saved from cuda gives the same logits on the CPU');
      ids.dispose();
      fresh.dispose();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    cpu.model.dispose();
    gpu.model.dispose();
  });

  await leakChecked(t, 'randn on cuda has the requested shape and device', (t) => {
    const r = randn([17, 33], { device: 'cuda' });
    t.equal(r.device, 'cuda');
    t.same(r.shape, [17, 33]);
    r.dispose();
  });
});

t.test('a Hugging Face checkpoint on cuda: the CPU\'s logits and tokens', { skip: noCuda }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-native-cuda-hf-'));
  try {
    const rows = [[3, 17, 42, 5, 8, 90, 1], [7, 7, 2, 60, 33, 11, 4]];
    const mask = [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]];
    for (const arch of ['llama', 'gpt2'] as const) {
      writeCheckpoint(path.join(dir, arch), arch, { dtype: arch === 'llama' ? 'bfloat16' : 'float32', seed: 2 });
      const cpu = await loadCausalLM(path.join(dir, arch));
      const gpu = await loadCausalLM(path.join(dir, arch), { device: 'cuda' });
      t.ok(gpu.namedParameters().every(([, p]) => p.device === 'cuda'), `${arch}: every weight on cuda`);
      const logits = (m: CausalLM) => tidy(() => m.forward(tensor(rows.flat(), [2, 7], { dtype: 'int32', device: m.device }),
        { attentionMask: tensor(mask.flat(), [2, 7], { dtype: 'int32', device: m.device }) }).toFloat32Array().slice(2 * cpu.vocabSize));
      assertClose(t, logits(gpu), logits(cpu), FP32, `${arch}: left-padded logits`);
      const prompts = [[1, 2, 3], [4, 5]];
      t.same(await gpu.generate(prompts, { maxNewTokens: 5, eosTokenId: null }), await cpu.generate(prompts, { maxNewTokens: 5, eosTokenId: null }), `${arch}: greedy tokens`);
      cpu.dispose();
      gpu.dispose();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

t.test('train(model, dataset) on cuda follows the CPU run (packed rows, accumulation)', { skip: noCuda }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-cuda-train-'));
  try {
    const modelDir = tinyLlama(path.join(dir, 'model'));
    const file = path.join(dir, 'train.jsonl');
    fs.writeFileSync(file, ['Hello world', 'A short row.', 'Rows packed into one sequence stay apart.', 'Three words here'].map((text) => JSON.stringify({ text })).join('\n'));
    const data = await loadDataset(file, { tokenizer: loadTokenizer(modelDir), maxSeqLength: 24, packing: true });
    const losses: number[][] = [];
    for (const device of ['cpu', 'cuda'] as const) {
      const m = await loadCausalLM(modelDir, { device });
      applyLora(m, { targetModules: 'all-linear', rank: 2, seed: 1 });
      const r = await train(m, data, { optimizer: { lr: 1e-2 }, steps: 3, batchSize: 1, gradientAccumulation: 2, progress: 'none' });
      losses.push(r.losses);
      m.dispose();
    }
    assertClose(t, losses[1]!, losses[0]!, { atol: 1e-4, rtol: 1e-4 }, 'losses of 3 steps');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
