"""PyTorch baseline for the bench suite: the same work as bench/cases/<op>.py's TypeScript twins,
done the way a PyTorch user would (F.linear, autograd with a frozen weight, optim.AdamW). Buffers
are reused between runs. Prints JSON.  python3 torch_bench.py <op> N C OC R threads dtype reps warmup"""
import json
import sys
import time

import torch
import torch.nn.functional as F

op, N, C, OC, R, threads, dtype, reps, warmup = sys.argv[1:]
N, C, OC, R, threads, reps, warmup = map(int, (N, C, OC, R, threads, reps, warmup))
torch.set_num_threads(threads)
torch.manual_seed(0)
wdt = torch.bfloat16 if dtype == 'bf16' else torch.float32
x = torch.randn(N, C)
W = (torch.randn(OC, C) * 0.1).to(wdt)
b = torch.randn(OC)
A = (torch.randn(R, C) * 0.1).requires_grad_()
B = torch.randn(OC, R).requires_grad_()
s = 2.0


def lin(inp):
    # bf16 weights: what a user does on CPU, computing in bf16 (autocast-style) then back to fp32
    if wdt == torch.bfloat16:
        return F.linear(inp.to(wdt), W).float() + b
    return F.linear(inp, W, b)


def run():
    if op == 'gemm':
        with torch.no_grad():
            lin(x)
    elif op == 'linear':
        with torch.no_grad():
            lin(x)
    elif op == 'lora_forward':
        with torch.no_grad():
            lin(x) + s * F.linear(F.linear(x, A), B)
    elif op == 'lora_step':
        xi = x.detach().requires_grad_()
        y = lin(xi) + s * F.linear(F.linear(xi, A), B)
        y.backward(dy)
        A.grad = None
        B.grad = None
    elif op == 'lora_merge':
        with torch.no_grad():
            W.add_((s * (B @ A)).to(wdt))
    elif op == 'adamw':
        opt.step()


dy = torch.randn(N, OC)
if op == 'adamw':
    p = torch.nn.Parameter(torch.randn(OC * C))
    p.grad = torch.randn(OC * C)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
for _ in range(warmup):
    run()
ts = []
start = time.perf_counter()
while len(ts) < reps or (time.perf_counter() - start < 0.3 and len(ts) < 200):
    t0 = time.perf_counter()
    run()
    ts.append((time.perf_counter() - t0) * 1e3)
ts.sort()
print(json.dumps({'medianMs': ts[len(ts) // 2], 'minMs': ts[0], 'reps': len(ts), 'torch': torch.__version__}))
