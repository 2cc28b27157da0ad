#!/usr/bin/env python3
"""lora-native against Hugging Face PEFT itself, on the device machine (torch and peft are there,
not on our build machines). Run by bench/gpu/run.sh in four steps over one folder D:

  python3 peft_interop.py make D     PEFT makes adapters for a small model (plain, rsLoRA with
                                     rank/alpha patterns, DoRA, an embedding), B and magnitudes
                                     random, and merges each itself (D/peft_merged/)
  node peft_interop.js D             lora-native's CLI merges each adapter (D/ours_merged/) and
                                     loads and re-saves it (D/roundtrip/)
  python3 peft_interop.py reload D   PEFT loads lora-native's saved adapters and merges them
                                     (D/rt_peft_merged/)
  python3 peft_interop.py compare D  numpy only: every merged tensor against PEFT's; prints a
                                     table and exits 1 on a mismatch

The model is CPU-sized; the merges are fp32 on both sides, so they must agree to a few ulps.
"""
import json
import os
import struct
import sys

CASES = {
    'plain': dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj']),
    'rslora_patterns': dict(r=4, lora_alpha=8, use_rslora=True, target_modules=['q_proj', 'v_proj'],
                            rank_pattern={'v_proj': 2}, alpha_pattern={'v_proj': 6}),
    'dora': dict(r=4, lora_alpha=8, use_dora=True, target_modules=['q_proj', 'v_proj']),
    'embedding': dict(r=3, lora_alpha=6, target_modules=['emb', 'q_proj']),
}
TOLERANCE = 1e-5  # max |ours - peft| / max |peft| per tensor


def net_class():
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 24)
            self.q_proj = torch.nn.Linear(24, 16)
            self.v_proj = torch.nn.Linear(16, 8, bias=False)

        def forward(self, ids):
            return self.v_proj(torch.relu(self.q_proj(self.emb(ids))))

    return Net


def save_state(state, path):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, path)


def make(d):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    Net = net_class()
    torch.manual_seed(0)
    base_sd = {k: v.detach().clone().contiguous() for k, v in Net().state_dict().items()}
    os.makedirs(d, exist_ok=True)
    save_file(base_sd, os.path.join(d, 'base.safetensors'))
    for i, (name, cfg) in enumerate(CASES.items()):
        model = Net()
        model.load_state_dict(base_sd)
        peft_model = get_peft_model(model, LoraConfig(**cfg))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if 'lora_magnitude_vector' in n:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                elif 'lora_' in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        peft_model.save_pretrained(os.path.join(d, 'adapters', name))
        save_state(peft_model.merge_and_unload().state_dict(), os.path.join(d, 'peft_merged', name + '.safetensors'))
        print(f'made {name}')


def reload(d):
    from peft import PeftModel
    from safetensors.torch import load_file

    Net = net_class()
    base_sd = load_file(os.path.join(d, 'base.safetensors'))
    for name in CASES:
        rt = os.path.join(d, 'roundtrip', name)
        if not os.path.isdir(rt):
            print(f'no round-tripped adapter for {name}')
            continue
        model = Net()
        model.load_state_dict(base_sd)
        merged = PeftModel.from_pretrained(model, rt).merge_and_unload()
        save_state(merged.state_dict(), os.path.join(d, 'rt_peft_merged', name + '.safetensors'))
        print(f'reloaded {name}')


def read_safetensors(path):
    """numpy-only reader: 8-byte little-endian header length, JSON header, data; values as float64."""
    import numpy as np
    with open(path, 'rb') as f:
        raw = f.read()
    (n,) = struct.unpack('<Q', raw[:8])
    header = json.loads(raw[8:8 + n])
    kinds = {'F32': '<f4', 'F16': '<f2', 'F64': '<f8', 'I64': '<i8', 'I32': '<i4', 'BF16': '<u2'}
    out = {}
    for key, info in header.items():
        if key == '__metadata__':
            continue
        if info['dtype'] not in kinds:
            raise ValueError(f'{path}: {key} is {info["dtype"]}, which this reader does not know')
        b, e = info['data_offsets']
        v = np.frombuffer(raw[8 + n + b:8 + n + e], dtype=kinds[info['dtype']])
        if info['dtype'] == 'BF16':
            v = (v.astype(np.uint32) << 16).view(np.float32)
        out[key] = v.astype(np.float64).reshape(info['shape'])
    return out


def worst(a_file, b_file):
    """Largest per-tensor max|a - b| / max|b| over the tensors of b_file, and the tensor's name."""
    import numpy as np
    a, b = read_safetensors(a_file), read_safetensors(b_file)
    missing = sorted(set(b) - set(a))
    if missing:
        return float('inf'), f'missing {missing}'
    rel, where = 0.0, ''
    for k, ref in b.items():
        if a[k].shape != ref.shape:
            return float('inf'), f'{k}: shape {a[k].shape} vs {ref.shape}'
        scale = (float(np.max(np.abs(ref))) if ref.size else 0.0) or 1.0
        r = float(np.max(np.abs(a[k] - ref))) / scale if ref.size else 0.0
        if r > rel:
            rel, where = r, k
    return rel, where


def compare(d):
    rows, ok = [], True
    for name in CASES:
        peft = os.path.join(d, 'peft_merged', name + '.safetensors')
        if not os.path.exists(peft):
            rows.append(f'| {name} | – | – | NO (PEFT made nothing) |')
            ok = False
            continue
        cells = []
        case_ok = True
        for other in (os.path.join(d, 'ours_merged', name + '.safetensors'),
                      os.path.join(d, 'rt_peft_merged', name + '.safetensors')):
            if not os.path.exists(other):
                cells.append('missing')
                case_ok = False
                continue
            rel, where = worst(other, peft)
            cells.append(f'{rel:.1e} ({where})' if where else f'{rel:.1e}')
            case_ok = case_ok and rel <= TOLERANCE
        ok = ok and case_ok
        rows.append(f'| {name} | {cells[0]} | {cells[1]} | {"yes" if case_ok else "NO"} |')
    print('| adapter (made by PEFT) | lora-native merge vs PEFT merge_and_unload | PEFT on the adapter lora-native re-saved | agree |')
    print('|---|---|---|---|')
    print('\n'.join(rows))
    print(f'\npeft_interop: {"all agree" if ok else "MISMATCH"} (max |diff| / max |PEFT| per tensor, tolerance {TOLERANCE:g})')
    return 0 if ok else 1


if __name__ == '__main__':
    if len(sys.argv) != 3 or sys.argv[1] not in ('make', 'reload', 'compare'):
        print(__doc__)
        sys.exit(2)
    step, folder = sys.argv[1], sys.argv[2]
    sys.exit({'make': make, 'reload': reload, 'compare': compare}[step](folder) or 0)
