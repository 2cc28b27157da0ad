// What a decoding step of a CausalLM with bfloat16 frozen weights asks of the kernels: every
// projection (and the untied head) is one GEMM product that reads its bf16 weight in place with M =
// the batch's rows (the GEMM engine's decode path, M <= 16; q/k/v and gate/up as the products of
// one gemmSharedA call each), once per token, and no weight is converted
// to float32 (no convert call at all) — with and without LoRA on some projections. Spies on the
// binding; the tokens must still equal those of a float32 copy of the same weights.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import t from 'tap';

import { applyLora, Linear, LoraLinear, loadCausalLM } from '../lib/index';
import { DTYPE_ID, native, NativeStorage } from '../lib/native';
import { writeCheckpoint } from './hf_checkpoint';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'lora-decode-'));
t.teardown(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Spied {
  gemms: { bf16: boolean; M: number }[];
  converts: number;
  loras: { bf16: boolean; N: number }[];
}

/** Runs fn with the binding's gemm, convert and loraForward calls recorded. */
async function spy<T>(fn: (rec: Spied) => Promise<T>): Promise<T> {
  const rec: Spied = { gemms: [], converts: 0, loras: [] };
  const b = native as unknown as Record<string, (...a: unknown[]) => unknown>;
  const orig = { gemm: b.gemm!, gemmSharedA: b.gemmSharedA!, convert: b.convert!, loraForward: b.loraForward! };
  b.gemm = (...a: unknown[]) => {
    rec.gemms.push({ bf16: (a[2] as NativeStorage).dtype === DTYPE_ID.bfloat16, M: a[3] as number });
    return orig.gemm(...a);
  };
  // gemmSharedA(a, M, K, out0, w0, N0, out1, w1, N1, out2, w2, N2, bf16Dot): one product per weight
  b.gemmSharedA = (...a: unknown[]) => {
    for (const w of [a[4], a[7], a[10]]) if (w) rec.gemms.push({ bf16: (w as NativeStorage).dtype === DTYPE_ID.bfloat16, M: a[1] as number });
    return orig.gemmSharedA(...a);
  };
  b.convert = (...a: unknown[]) => {
    rec.converts++;
    return orig.convert(...a);
  };
  b.loraForward = (...a: unknown[]) => {
    rec.loras.push({ bf16: (a[3] as NativeStorage).dtype === DTYPE_ID.bfloat16, N: a[7] as number });
    return orig.loraForward(...a);
  };
  try {
    return await fn(rec);
  } finally {
    Object.assign(b, orig);
  }
}

const dir = path.join(tmp, 'llama-bf16');
writeCheckpoint(dir, 'llama', { dtype: 'bfloat16', seed: 5 });

for (const lora of [false, true]) {
  t.test(`bf16 decode${lora ? ' with LoRA on q_proj and v_proj' : ''}: one in-place bf16 GEMM per weight per token, no conversion`, async (t) => {
    const model = await loadCausalLM(dir);
    const wide = await loadCausalLM(dir, { dtype: 'float32' });
    try {
      if (lora) {
        applyLora(model, { targetModules: ['q_proj', 'v_proj'], rank: 2, seed: 1 });
        applyLora(wide, { targetModules: ['q_proj', 'v_proj'], rank: 2, seed: 1 });
      }
      const linears = model.namedModules().filter(([, m]) => m instanceof Linear).length;
      const loraLinears = model.namedModules().filter(([, m]) => m instanceof LoraLinear).length;
      t.equal(model.dtype, 'bfloat16');
      for (const [name, m] of model.namedModules())
        if (m instanceof Linear || m instanceof LoraLinear) t.equal((m as Linear).weight.dtype, 'bfloat16', `${name} keeps its weight in bf16`);
      const steps: Spied[] = [];
      const prompt = [3, 14, 15, 92, 65];
      const tokens = await spy(async (rec) => {
        let mark = { g: 0, l: 0, c: 0 };
        return model.generate([prompt], {
          maxNewTokens: 5, eosTokenId: null,
          onToken: () => {
            // the calls since the previous token are one step's (the first: the prefill)
            steps.push({ gemms: rec.gemms.slice(mark.g), loras: rec.loras.slice(mark.l), converts: rec.converts - mark.c });
            mark = { g: rec.gemms.length, l: rec.loras.length, c: rec.converts };
          },
        });
      });
      t.equal(steps.length, 5);
      for (const [i, s] of steps.slice(1).entries()) {
        const bf = s.gemms.filter((g) => g.bf16);
        t.equal(bf.length, linears, `step ${i + 1}: one bf16 GEMM product per Linear (${linears})`);
        t.ok(bf.every((g) => g.M === 1), `step ${i + 1}: each with M = 1 row (the decode path)`);
        t.equal(s.loras.length, loraLinears, `step ${i + 1}: one LoRA kernel per LoraLinear (${loraLinears})`);
        t.ok(s.loras.every((l) => l.bf16 && l.N === 1), `step ${i + 1}: LoRA kernels read the bf16 weight in place`);
        t.equal(s.converts, 0, `step ${i + 1}: no weight converted`);
      }
      const ref = await wide.generate([prompt], { maxNewTokens: 5, eosTokenId: null });
      t.same(tokens, ref, 'the tokens equal those of float32 weights holding the same (bf16) values');
    } finally {
      model.dispose();
      wide.dispose();
    }
  });
}
