# The PyTorch side of bench/gpu: the same work as bench.js on the same GPU, timed with CUDA
# events. A plain torch.nn.Linear wrapped by PEFT LoRA (r = R, scaling 2, no dropout), a bare
# matmul as the ceiling, PEFT's merge, fused AdamW, attention (eager as transformers runs it, and
# SDPA), and a device copy for the bandwidth ceiling.
# Writes JSON records for table.py. TF32 stays off (PyTorch's default for matmul), as in ours.
import argparse
import json
import sys
from collections import OrderedDict

import torch

p = argparse.ArgumentParser()
p.add_argument("--out", default="torch.json")
p.add_argument("--quick", action="store_true")
args = p.parse_args()

SHAPES = [(256, 256, 256, 16)] if args.quick else [(4096, 4096, 4096, 16), (8192, 4096, 11008, 64)]
records = []
dev = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def time_ms(fn, iters, samples=5):
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    times.sort()
    return times[len(times) // 2], times[0]


def record(shape, dtype, op, t, impl, **extra):
    r = {"impl": impl, "shape": "x".join(str(v) for v in shape) if isinstance(shape, tuple) else shape,
         "dtype": dtype, "op": op, "ms": t[0], "min_ms": t[1], **extra}
    records.append(r)
    print(json.dumps(r), flush=True)


print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}), flush=True)
try:
    import peft
    from peft import LoraConfig, get_peft_model
    print(json.dumps({"peft": peft.__version__}), flush=True)
except Exception as e:  # the table still gets the matmul ceiling and copy bandwidth
    print(json.dumps({"peft_error": str(e)}), flush=True)
    get_peft_model = None

n = 256 * 1024 * 1024
a = torch.ones(n, device=dev)
b = torch.empty_like(a)
t = time_ms(lambda: b.copy_(a), 10)
record("1GiB", "f32", "copy", t, "torch", gbps=2 * n * 4 / (t[0] * 1e6))
del a, b

for shape in SHAPES:
    N, C, OC, R = shape
    flops = 2 * N * C * OC
    iters = 5 if N * C * OC > 1e11 else 10
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
        torch.manual_seed(0)
        x = torch.randn(N, C, device=dev, dtype=dt)
        dy = torch.randn(N, OC, device=dev, dtype=dt)
        lin = torch.nn.Linear(C, OC, bias=False, device=dev, dtype=dt)
        w = lin.weight.detach()
        t = time_ms(lambda: torch.mm(x, w.t()), iters)
        record(shape, name, "matmul_ceiling", t, "torch", tflops=flops / (t[0] * 1e9))

        # Plain nn.Linear training step (frozen weight, dx only): what the base costs in PyTorch.
        xg = x.clone().requires_grad_(True)
        lin.weight.requires_grad_(False)

        def base_step():
            xg.grad = None
            lin(xg).backward(dy)

        record(shape, name, "base_step", time_ms(base_step, iters), "torch")
        if get_peft_model is None:
            continue
        model = torch.nn.Sequential(OrderedDict(lin=lin))
        cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["lin"], lora_dropout=0.0)
        pm = get_peft_model(model, cfg)
        layer = pm.base_model.model.lin
        for prm in layer.parameters():  # PEFT initialises B to zero; give it values like ours
            if prm.requires_grad:
                torch.nn.init.normal_(prm, std=0.01)

        def forward():
            with torch.no_grad():
                pm(x)

        t = time_ms(forward, iters)
        record(shape, name, "forward", t, "torch", tflops=flops / (t[0] * 1e9))

        def step():
            xg.grad = None
            for prm in layer.parameters():
                prm.grad = None
            pm(xg).backward(dy)

        record(shape, name, "train_step", time_ms(step, iters), "torch")

        def merge():  # PEFT's merge and unmerge each add s·B·A into W once
            layer.merge()
            layer.unmerge()

        t = time_ms(merge, 5)
        t = (t[0] / 2, t[1] / 2)
        record(shape, name, "merge", t, "torch", gbps=OC * C * w.element_size() * 2 / (t[0] * 1e6))

        if dt == torch.float32:
            lora_params = [prm for prm in layer.parameters() if prm.requires_grad]
            for prm in lora_params:
                prm.grad = torch.randn_like(prm)
            opt = torch.optim.AdamW(lora_params, lr=1e-4, weight_decay=0.01, fused=True)
            t = time_ms(opt.step, 20)
            na = sum(prm.numel() for prm in lora_params)
            record(shape, "f32", "adamw_adapter", t, "torch", gbps=na * 28 / (t[0] * 1e6))
            big = torch.nn.Parameter(torch.randn(OC, C, device=dev) * 0.01)
            big.grad = torch.randn_like(big)
            opt2 = torch.optim.AdamW(lora_params + [big], lr=1e-4, weight_decay=0.01, fused=True)
            t = time_ms(opt2.step, 10)
            nf = na + big.numel()
            record(shape, "f32", "adamw_weight_sized", t, "torch", gbps=nf * 28 / (t[0] * 1e6), params=nf)
            del big, opt, opt2
        del pm, model, layer, lin, x, xg, dy, w
        torch.cuda.empty_cache()

# Attention (bench.js's shapes, fp32, causal, one sequence): transformers' eager code (repeat_kv,
# matmul, additive mask, fp32 softmax) and PyTorch's fused SDPA over the repeated k, v.
import torch.nn.functional as F  # noqa: E402

ATTN = [(256, 9, 3, 64)] if args.quick else [(1024, 9, 3, 64), (4096, 9, 3, 64), (4096, 32, 8, 64)]
for (T, H, KVH, D) in ATTN:
    shape = (T, H, KVH, D)
    q = torch.randn(1, H, T, D, device=dev, requires_grad=True)
    k = torch.randn(1, KVH, T, D, device=dev, requires_grad=True)
    v = torch.randn(1, KVH, T, D, device=dev, requires_grad=True)
    g = torch.randn(1, H, T, D, device=dev)
    mask = torch.full((T, T), torch.finfo(torch.float32).min, device=dev).triu(1)[None, None]

    def rep(x):
        return x[:, :, None].expand(1, KVH, H // KVH, T, D).reshape(1, H, T, D)

    def eager():
        w = torch.matmul(q, rep(k).transpose(2, 3)) * D ** -0.5 + mask
        return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32), rep(v))

    def sdpa():
        return F.scaled_dot_product_attention(q, rep(k), rep(v), is_causal=True)

    fwd_flops = 4 * T * T * D * H / 2
    iters = 3 if T >= 4096 else 10
    for name, fn in (("eager", eager), ("sdpa", sdpa)):
        try:
            with torch.no_grad():
                t = time_ms(fn, iters)
            record(shape, "f32", f"attention_fwd_{name}", t, "torch", tflops=fwd_flops / (t[0] * 1e9))

            def step(fn=fn):
                fn().backward(g)
                q.grad = k.grad = v.grad = None
            t = time_ms(step, iters)
            record(shape, "f32", f"attention_fwd_bwd_{name}", t, "torch", tflops=3.5 * fwd_flops / (t[0] * 1e9))
        except Exception as e:  # e.g. out of memory for eager's (H, T, T) matrices
            print(json.dumps({"attention_error": f"{name} {shape}: {e}"}), flush=True)
    q1 = q[:, :, -1:].detach()
    with torch.no_grad():
        t = time_ms(lambda: F.scaled_dot_product_attention(q1, rep(k), rep(v)), 20)
    record(shape, "f32", "attention_decode_sdpa", t, "torch", gbps=2 * T * KVH * D * 4 / (t[0] * 1e6))
    del q, k, v, g, mask
    torch.cuda.empty_cache()

with open(args.out, "w") as f:
    json.dump(records, f, indent=1)
print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)
