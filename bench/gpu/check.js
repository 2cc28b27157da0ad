// The backend-parity suite (test/parity/: every op of the kernel interface on seeded awkward shapes
// against the float64 references of test/ref/) on the GPU, from dist/ (plain node, no tap: it runs
// on the GPU machine; `npm run build:ts` compiles the suite into dist/test/). One line per case,
// the last `parity (cuda ...): N passed, M failed`; exit 1 when a case fails.
//   node bench/gpu/check.js [cpu|cuda]                 (default cuda)
//   LORA_NATIVE_PARITY_ONLY=lora node bench/gpu/check.js   (cases whose names start with a prefix)
'use strict';

const fs = require('fs');
const path = require('path');

const run = path.join(__dirname, '..', '..', 'dist', 'test', 'parity', 'run.js');
if (!fs.existsSync(run)) {
  console.error(`no compiled suite at ${path.relative(process.cwd(), run)}: run \`npm run build:ts\` before carrying dist`);
  process.exitCode = 1;
} else {
  process.exitCode = require(run).main([process.argv[2] || 'cuda']);
}
