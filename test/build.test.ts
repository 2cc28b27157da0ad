// binding.gyp (node-gyp) and CMakeLists.txt (cmake-js) build the same addon from the same sources:
// both binaries must export the same functions and run the same kernel to the same result.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
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
