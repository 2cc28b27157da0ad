# Joins bench.js (lora-native) and bench_torch.py (PyTorch + PEFT) records into one markdown
# table, with the targets evaluated beside the figures. Reads JSON; measures nothing.
import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # a missing side still yields a table with blanks
        print(f"<!-- could not read {path}: {e} -->")
        return []


ours = load(sys.argv[1]) + (load(sys.argv[4]) if len(sys.argv) > 4 else [])
torch_recs = load(sys.argv[2])
check_line = ""
if len(sys.argv) > 3:
    try:
        with open(sys.argv[3]) as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith("parity (")]
            check_line = lines[-1] if lines else "parity: no summary (crashed or timed out?)"
    except Exception as e:
        check_line = f"parity: log unreadable ({e})"


def find(recs, shape, dtype, op):
    for r in recs:
        if r["shape"] == shape and r["dtype"] == dtype and r["op"] == op:
            return r
    return None


def ms(r):
    return f"{r['ms']:.3f}" if r else "–"


copy_ours = find(ours, "1GiB", "f32", "copy")
copy_torch = find(torch_recs, "1GiB", "f32", "copy")
copy_bw = (copy_ours or copy_torch or {}).get("gbps")

print("| shape (N×C×OC×R) | dtype | op | lora-native ms | PyTorch ms | PyTorch/ours | note |")
print("|---|---|---|---:|---:|---:|---|")
if copy_ours or copy_torch:
    print(f"| 1 GiB | f32 | device copy | {ms(copy_ours)} | {ms(copy_torch)} | | "
          f"ours {copy_ours['gbps'] if copy_ours else 0:.0f} GB/s, torch {copy_torch['gbps'] if copy_torch else 0:.0f} GB/s |")

shapes = []
for r in ours + torch_recs:
    if r["shape"] != "1GiB" and r["shape"] not in shapes and not r["op"].startswith("attention"):
        shapes.append(r["shape"])

targets = []
for shape in shapes:
    for dtype in ("bf16", "f32"):
        rows = [
            ("base GEMM (x·Wᵀ) vs bare matmul", "base_gemm", "matmul_ceiling"),
            ("  same, register-staged GEMM variant", "base_gemm_alt", "matmul_ceiling"),
            ("  training step, staged GEMM + SIMT adapter GEMMs", "train_step_alt", "train_step"),
            ("lora_forward", "forward", "forward"),
            ("training step (fwd+bwd)", "train_step", "train_step"),
            ("training step, dropout 0.1", "train_step_dropout0.1", None),
            ("base-only step (fwd + dx)", "base_step", "base_step"),
            ("lora_merge", "merge", "merge"),
            ("AdamW, adapter params", "adamw_adapter", "adamw_adapter"),
            ("AdamW, + weight-sized param", "adamw_weight_sized", "adamw_weight_sized"),
        ]
        for label, op_ours, op_torch in rows:
            a = find(ours, shape, dtype, op_ours)
            b = find(torch_recs, shape, dtype, op_torch) if op_torch else None
            if (not a and not b) or (op_ours.endswith("_alt") and not a):
                continue
            ratio = f"{b['ms'] / a['ms']:.2f}" if a and b and a["ms"] > 0 else ""
            note = []
            if a and "tflops" in a:
                note.append(f"ours {a['tflops']:.0f} TFLOP/s")
            if b and "tflops" in b:
                note.append(f"torch {b['tflops']:.0f} TFLOP/s")
            if a and "adapter_share" in a:
                note.append(f"adapter share {100 * a['adapter_share']:.1f}%")
            if a and "gbps" in a:
                note.append(f"ours {a['gbps']:.0f} GB/s" + (f" = {100 * a['gbps'] / copy_bw:.0f}% of copy" if copy_bw else ""))
            if b and "gbps" in b:
                note.append(f"torch {b['gbps']:.0f} GB/s")
            print(f"| {shape} | {dtype} | {label} | {ms(a)} | {ms(b)} | {ratio} | {'; '.join(note)} |")

            if dtype == "bf16" and a and b and op_ours == "base_gemm" and shape == "4096x4096x4096x16":
                targets.append(("base GEMM ≥ 70% of matmul at 4096³", b["ms"] / a["ms"] >= 0.70, f"{100 * b['ms'] / a['ms']:.0f}%"))
            if dtype == "bf16" and a and b and op_ours == "train_step":
                targets.append((f"training step ≥ 1.3× PyTorch+PEFT at {shape}", b["ms"] / a["ms"] >= 1.3, f"{b['ms'] / a['ms']:.2f}×"))
                if "adapter_share" in a:
                    targets.append((f"adapter share ≤ 10% at {shape}", a["adapter_share"] <= 0.10, f"{100 * a['adapter_share']:.1f}%"))
            if dtype == "bf16" and a and copy_bw and op_ours in ("merge", "adamw_weight_sized") or (
                    dtype == "f32" and a and copy_bw and op_ours == "adamw_weight_sized"):
                if a and "gbps" in a:
                    targets.append((f"{op_ours} ≥ 70% of copy bandwidth at {shape}", a["gbps"] >= 0.7 * copy_bw,
                                    f"{100 * a['gbps'] / copy_bw:.0f}%"))

# attention rows: shape T×H×KVH×D, fp32, causal; PyTorch's eager (transformers) and SDPA
attn_shapes = []
for r in ours + torch_recs:
    if r["op"].startswith("attention") and r["shape"] not in attn_shapes:
        attn_shapes.append(r["shape"])
for shape in attn_shapes:
    for label, op_ours, op_torch in (("attention fwd vs eager", "attention_fwd", "attention_fwd_eager"),
                                     ("attention fwd vs SDPA", "attention_fwd", "attention_fwd_sdpa"),
                                     ("attention fwd+bwd vs eager", "attention_fwd_bwd", "attention_fwd_bwd_eager"),
                                     ("attention fwd+bwd vs SDPA", "attention_fwd_bwd", "attention_fwd_bwd_sdpa"),
                                     ("attention decode (1 query) vs SDPA", "attention_decode", "attention_decode_sdpa")):
        a = find(ours, shape, "f32", op_ours)
        b = find(torch_recs, shape, "f32", op_torch)
        if not a and not b:
            continue
        ratio = f"{b['ms'] / a['ms']:.2f}" if a and b and a["ms"] > 0 else ""
        note = [f"{who} {r['tflops']:.1f} TFLOP/s" for who, r in (("ours", a), ("torch", b)) if r and "tflops" in r]
        note += [f"{who} {r['gbps']:.0f} GB/s" for who, r in (("ours", a), ("torch", b)) if r and "gbps" in r]
        print(f"| {shape} (T×H×KVH×D) | f32 | {label} | {ms(a)} | {ms(b)} | {ratio} | {'; '.join(note)} |")

print()
print("Timing: lora-native = wall clock over back-to-back calls ending in a stream sync (median of 5);")
print("PyTorch = CUDA events (median of 5). fp32 on both sides is plain FP32 (no TF32).")
if check_line:
    print()
    print(f"Correctness vs the float64 references — {check_line}")
if targets:
    print()
    print("| target (bf16 unless noted) | met | measured |")
    print("|---|---|---|")
    for name, ok, val in targets:
        print(f"| {name} | {'yes' if ok else 'NO'} | {val} |")
