// A minimal MLP: learn y = sin(3x)·x on [-1, 1] with the train() loop (cosine schedule, AdamW),
// then print predictions next to the truth. (Imports '../lib/index'; in your project 'lora-native'.)
import { memory, MLP, mse, noGrad, tensor, Tensor, tidy, train } from '../lib/index';

const f = (x: number) => Math.sin(3 * x) * x;
const xs = Array.from({ length: 256 }, (_, i) => -1 + (2 * i) / 255);
const model = new MLP([1, 32, 32, 1], { activation: 'tanh', seed: 1 });

const toTensors = (batch: number[]): [Tensor, Tensor] => [
  tensor(batch, [batch.length, 1]),
  tensor(batch.map(f), [batch.length, 1]),
];

async function main(): Promise<void> {
  const result = await train({
    model, data: xs, batchSize: 32, steps: 600, seed: 2, progress: 'none',
    loss: (m, batch) => {
      const [x, y] = toTensors(batch as number[]);
      return mse(m.forward(x), y);
    },
    optimizer: { lr: 1e-2, weightDecay: 0 }, schedule: { type: 'cosine', warmupSteps: 20 },
  });
  const first = result.losses[0]!;
  const last = result.losses.slice(-20).reduce((a, b) => a + b, 0) / 20;
  console.log(`mse ${first.toFixed(4)} -> ${last.toFixed(5)} in ${result.steps} steps (${result.seconds.toFixed(2)} s)`);
  const probe = [-0.9, -0.5, 0, 0.5, 0.9];
  const pred = noGrad(() => tidy(() => model.forward(tensor(probe, [probe.length, 1])).toFloat32Array()));
  probe.forEach((x, i) => console.log(`  x=${x.toFixed(1)}  f(x)=${f(x).toFixed(3)}  mlp=${pred[i]!.toFixed(3)}`));
  model.dispose();
  console.log(`live tensors at exit: ${memory().numTensors}`);
  if (!(last < first / 10)) process.exitCode = 1;
}

main().catch((err) => { console.error(err); process.exitCode = 1; });
