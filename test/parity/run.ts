// Runs the backend-parity suite on one device and prints one line per case and a summary, the
// last line `parity: N passed, M failed`; exit code 1 when a case fails. The device is the
// argument (cpu or cuda; the CPU's ISA level follows LORA_NATIVE_ISA, the CUDA library
// LORA_NATIVE_CUDA_LIB); LORA_NATIVE_PARITY_ONLY=prefix[,prefix] runs the cases whose names start
// with one of them.
//   node dist/test/parity/run.js cuda        (bench/gpu/check.js does this on the GPU machine)
import { features } from '../../lib/index';
import { parityCases as attention } from '../ref/attention_ref';
import { parityCases as gated } from '../ref/gated_act_ref';
import { parityCases as loss } from '../ref/loss_ref';
import { parityCases as lora } from '../ref/lora_ref';
import { parityCases as nn } from '../ref/nn_ops_ref';
import { parityCases as ops } from '../ref/ops_ref';
import { parityCases as optim } from '../ref/optim_ref';
import { Device, ParityCase, runParity } from './suite';

/** Every op's table, general kernels first. */
export const ALL_CASES: readonly ParityCase[] = [...ops, ...lora, ...optim, ...nn, ...loss, ...attention, ...gated];

export function main(argv: string[] = process.argv.slice(2)): number {
  const device = (argv[0] ?? 'cpu') as Device;
  if (device !== 'cpu' && device !== 'cuda') {
    console.error(`usage: run.js cpu|cuda (received ${device})`);
    return 2;
  }
  const f = features();
  const label = device === 'cpu' ? `cpu ${f.isa}` : `cuda ${f.devices[0]?.name ?? ''}`;
  if (device === 'cuda' && !f.cuda) {
    console.log(`parity (cuda): skipped, CUDA unavailable: ${f.reason}`);
    return 0;
  }
  const only = process.env.LORA_NATIVE_PARITY_ONLY ?? '';
  const results = runParity(ALL_CASES, device, only, (line) => console.log(line));
  const failed = results.filter((r) => !r.ok);
  if (failed.length) console.log(`failed: ${failed.map((r) => r.name).join(' | ')}`);
  console.log(`parity (${label}): ${results.length - failed.length} passed, ${failed.length} failed`);
  return failed.length ? 1 : 0;
}

if (require.main === module) process.exitCode = main();
