// binding.gyp (node-gyp) and CMakeLists.txt (cmake-js) build the same addon from the same sources:
// both binaries must export the same functions and run the same kernel to the same result.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

const root = path.join(__dirname, '..');
const builds = {
  'node-gyp': path.join(root, 'build', 'Release', 'lora_native.node'),
  'cmake-js': path.join(root, 'build-cmake', 'Release', 'lora_native.node'),
};

// Loads one addon in a child process (two copies of one addon in a process would share nothing
// useful) and reports its exports and one small GEMM.
function probe(file: string): { exports: string[]; product: number[] } {
  const out = execFileSync(process.execPath, ['-e', `
    const b = require(${JSON.stringify(file)});
    const a = b.fromHost(0, 0, new Float32Array([1, 2, 3, 4, 5, 6]));
    const w = b.fromHost(0, 0, new Float32Array([1, 0, -1, 2, 1, 0]));
    const c = b.alloc(0, 0, 4);
    b.gemm(c, a, w, 2, 2, 3, false, true, 3, 3, 2, 1, 0, 1, 0, 0, 0);
    console.log(JSON.stringify({ exports: Object.keys(b).sort(), product: Array.from(new Float32Array(b.toHost(c))) }));
  `], { encoding: 'utf8' });
  return JSON.parse(out);
}

t.test('both builds export the same functions and compute the same', async (t) => {
  const missing = Object.entries(builds).filter(([, f]) => !fs.existsSync(f)).map(([k, f]) => `${k} (${path.relative(root, f)})`);
  if (missing.length) {
    t.skip(`not built here: ${missing.join(', ')}; run npm run build:native and npm run build:cmake (CI builds both)`);
    return;
  }
  const gyp = probe(builds['node-gyp']);
  const cmake = probe(builds['cmake-js']);
  t.ok(gyp.exports.length > 20, `node-gyp build exports ${gyp.exports.length} functions`);
  t.same(cmake.exports, gyp.exports, 'cmake-js build exports the same names');
  // [[1,2,3],[4,5,6]]·[[1,0,-1],[2,1,0]]ᵀ = [[1-3, 2+2], [4-6, 8+5]]
  t.same(gyp.product, [-2, 4, -2, 13], 'node-gyp build multiplies correctly');
  t.same(cmake.product, gyp.product, 'cmake-js build gives the same product');
});

// liblora_cuda.so is built separately against native/backend.h; the loader accepts it only when its
// kBackendAbiVersion equals the addon's. This keeps the version honest: each version maps to the
// digest of backend.h's code (comments and blank space aside). Changing the file without bumping
// the version (and adding its digest here) fails.
const BACKEND_DIGESTS: Record<number, string> = {
  2: '7534d377c86b3ac977e6848fd00d9e8d8beb5527c211fe9168feac765bfc7e26',
  3: 'f2321b179a85dffa4eb175eefb377646d6cd2f9662d4f75adb3ad1bfb55ea86f',
};

t.test('native/backend.h: the interface version moves with the interface', async (t) => {
  const src = fs.readFileSync(path.join(root, 'native', 'backend.h'), 'utf8');
  const version = Number(src.match(/kBackendAbiVersion = (\d+);/)?.[1]);
  t.ok(Number.isInteger(version), `kBackendAbiVersion is ${version}`);
  const code = src.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '').replace(/^.*kBackendAbiVersion = \d+;.*$/m, '')
    .replace(/\s+/g, ' ').trim();
  const digest = (await import('node:crypto')).createHash('sha256').update(code).digest('hex');
  t.equal(digest, BACKEND_DIGESTS[version], digest === BACKEND_DIGESTS[version]
    ? `backend.h matches the digest of version ${version}`
    : `backend.h changed: bump kBackendAbiVersion to ${version + 1} and add ${version + 1}: '${digest}' to BACKEND_DIGESTS`);
});

// scripts/build-cuda.js builds only what this machine needs by default: the GPUs present, or with
// none one small default; LORA_NATIVE_CUDA_ARCHS (or the old LORA_CUDA_ARCHS) overrides it.
t.test('scripts/build-cuda.js: which CUDA architectures a build gets', async (t) => {
  type Choice = { archs?: string[] | null; why?: string; skip?: string; error?: string };
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { chooseArchitectures } = require(path.join(root, 'scripts', 'build-cuda.js')) as {
    chooseArchitectures: (env: Record<string, string>, gpus: number[] | null, nvcc: number[] | null) => Choice;
  };
  const nvcc13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
  const none = chooseArchitectures({}, null, nvcc13);
  t.same(none.archs, ['90-real', '80-virtual'], 'no GPU: sm_90 SASS + compute_80 PTX');
  t.match(none.why, /no GPU found here.*LORA_NATIVE_CUDA_ARCHS=all builds every supported GPU architecture/, 'and says how to get all');
  t.same(chooseArchitectures({}, [86, 90], nvcc13).archs, ['86-real', '90-real'], 'the GPUs present, SASS only');
  t.same(chooseArchitectures({}, [75, 90], nvcc13).archs, ['90-real'], 'a GPU older than sm_80 is left out');
  t.same(chooseArchitectures({}, [75], nvcc13), { skip: "the GPUs here have compute capability 7.5; lora-native's CUDA kernels need 8.0 or newer (the CPU backend is ready)" });
  t.same(chooseArchitectures({}, [130], nvcc13).archs, ['121-virtual'], 'a GPU newer than nvcc knows: its newest PTX, JIT-compiled');
  t.same(chooseArchitectures({ LORA_NATIVE_CUDA_ARCHS: 'all' }, [90], nvcc13).archs, null, 'all: the full list of cuda/CMakeLists.txt');
  const old = chooseArchitectures({ LORA_CUDA_ARCHS: '86-real,90-real' }, null, nvcc13);
  t.same([old.archs, old.why], [['86-real', '90-real'], '86-real, 90-real (LORA_CUDA_ARCHS)'], 'the old variable still works');
  t.same(chooseArchitectures({ LORA_NATIVE_CUDA_ARCHS: '89-real', LORA_CUDA_ARCHS: '80-real' }, null, nvcc13).archs, ['89-real'], 'the new name wins');
  t.same(chooseArchitectures({ LORA_NATIVE_CUDA_ARCHS: 'sm90' }, null, nvcc13), { error: "LORA_NATIVE_CUDA_ARCHS=sm90 is not a list of CUDA architectures like 90-real,80-virtual (or 'all'): 'sm90'" });

  // the script end to end with a stand-in nvidia-smi on PATH (and a stand-in nvcc when there is none)
  const bin = fs.mkdtempSync(path.join(os.tmpdir(), 'fake-gpu-'));
  t.teardown(() => fs.rmSync(bin, { recursive: true, force: true }));
  fs.writeFileSync(path.join(bin, 'nvidia-smi'), '#!/bin/sh\nprintf "8.9\\n8.9\\n"\n', { mode: 0o755 });
  fs.writeFileSync(path.join(bin, 'nvcc'), '#!/bin/sh\nprintf "sm_80\\nsm_89\\nsm_90\\n"\n', { mode: 0o755 });
  fs.writeFileSync(path.join(bin, 'cmake'), '#!/bin/sh\nexit 1\n', { mode: 0o755 });
  const env = { ...process.env, PATH: `${bin}${path.delimiter}${process.env.PATH}`, CUDACXX: path.join(bin, 'nvcc') };
  delete env.LORA_NATIVE_CUDA_ARCHS;
  delete env.LORA_CUDA_ARCHS;
  delete env.LORA_NATIVE_SKIP_CUDA;
  const out = execFileSync(process.execPath, [path.join(root, 'scripts', 'build-cuda.js'), '--print-archs'], { env, encoding: 'utf8' });
  t.same(JSON.parse(out).archs, ['89-real'], `two sm_89 GPUs: one architecture (${out.trim()})`);
});
