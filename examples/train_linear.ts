// The README's first example, runnable: a LoraLinear trained toward a random target with AdamW.
// Only loraA and loraB train; the loss falls, then merge() folds the adapter into the weight.
// (Imports '../lib/index'; in your project it is 'lora-native'.)
import { AdamW, LoraLinear, mean, memory, mul, randn, sub, tidy } from '../lib/index';

const layer = new LoraLinear({ inFeatures: 64, outFeatures: 32, rank: 8, alpha: 16, seed: 1 });
const x = randn([128, 64], { seed: 2 });
const target = randn([128, 32], { seed: 3 });
const opt = new AdamW(layer.parameters(), { lr: 1e-2 }); // trains loraA and loraB only

let first = NaN;
let last = NaN;
for (let step = 0; step < 200; step++) {
  tidy(() => { // frees every intermediate tensor
    const d = sub(layer.forward(x), target);
    const loss = mean(mul(d, d));
    loss.backward();
    const v = loss.item();
    if (step === 0) first = v;
    last = v;
    if (step % 50 === 0 || step === 199) console.log(`step ${step}  loss ${v.toFixed(4)}`);
  });
  opt.step();
  opt.zeroGrad();
}
layer.merge(); // W += scaling·B·A
console.log(`loss ${first.toFixed(4)} -> ${last.toFixed(4)}${last < first ? ' (falling)' : ' (NOT falling)'}`);
for (const t of [x, target]) t.dispose();
opt.dispose();
layer.dispose();
console.log(`live tensors at exit: ${memory().numTensors}`);
if (!(last < first)) process.exitCode = 1;
