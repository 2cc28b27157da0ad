"""PyTorch baseline for the model benchmarks (bench/cases/llm_*.ts): a random Llama written the way
transformers' eager LlamaForCausalLM runs it (RMSNorm in fp32, rotate-half RoPE, repeat_kv, eager
attention with a float mask and an fp32 softmax, SwiGLU MLP, untied or tied lm_head), and LoRA the
way PEFT's lora.Linear runs it (base(x) + lora_B(lora_A(dropout(x))) * scaling, adapter in fp32).
It is not transformers itself (not installed here); it does the same arithmetic in the same order.

  /usr/bin/python3 torch_llm.py CASE CONFIG DTYPE THREADS REPS WARMUP [key=value ...]
  CASE: prefill | decode | attention | train      CONFIG: smol | 1b      DTYPE: fp32 | bf16
  prefill: T=512 B=1 (logits of the last position, as generate() asks for)
  decode: B=1|8 prompt=128 steps=32, a DynamicCache-style cache (torch.cat per step)
  attention: T, fwd+bwd of eager attention alone (smol's heads: 9 q, 3 kv, head_dim 64)
  train: B=4 T=256 rank=16 alpha=32, all linear projections, AdamW, gc=0|1 (gradient checkpointing)
Prints one JSON line: medianMs, minMs, reps, rssAfterLoadMB, peakRssMB, plus case figures."""
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CONFIGS = {
    # a smoke-test size
    'tiny': dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=256, tied=True, theta=10000.0, eps=1e-5),
    # SmolLM2-135M's shape (config.json of HuggingFaceTB/SmolLM2-135M)
    'smol': dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152, tied=True, theta=100000.0, eps=1e-5),
    # Llama-3.2-1B's shape (head_dim 64, tied)
    '1b': dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=128256, tied=True, theta=500000.0, eps=1e-5),
}


def status_mb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    return float('nan')


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, h):
        dt = h.dtype
        h = h.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dt)


class LoraLinear(nn.Module):
    """PEFT lora.Linear: frozen base, fp32 adapter (PEFT upcasts adapter weights), x cast to it."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.normal_(self.lora_B.weight, std=0.02)  # nonzero so the backward does real work
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base(x)
        dt = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        return (result + self.lora_B(self.lora_A(x)) * self.scaling).to(dt)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(h, n_rep):
    b, kvh, t, d = h.shape
    if n_rep == 1:
        return h
    return h[:, :, None, :, :].expand(b, kvh, n_rep, t, d).reshape(b, kvh * n_rep, t, d)


def eager_attention(q, k, v, mask, groups):
    k = repeat_kv(k, groups)
    v = repeat_kv(v, groups)
    w = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv = c['heads'], c['kv']
        self.d = c['hidden'] // c['heads']
        self.q_proj = nn.Linear(c['hidden'], self.h * self.d, bias=False)
        self.k_proj = nn.Linear(c['hidden'], self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(c['hidden'], self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, c['hidden'], bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.d).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:  # DynamicCache.update: concatenate along the sequence
            if cache[0] is not None:
                k = torch.cat([cache[0], k], dim=-2)
                v = torch.cat([cache[1], v], dim=-2)
            cache[0], cache[1] = k, v
        o = eager_attention(q, k, v, mask, self.h // self.kv)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c['hidden'], c['inter'], bias=False)
        self.up_proj = nn.Linear(c['hidden'], c['inter'], bias=False)
        self.down_proj = nn.Linear(c['inter'], c['hidden'], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c['hidden'], c['eps'])
        self.post_attention_layernorm = RMSNorm(c['hidden'], c['eps'])

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c['vocab'], c['hidden'])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c['layers'])])
        self.norm = RMSNorm(c['hidden'], c['eps'])
        self.lm_head = nn.Linear(c['hidden'], c['vocab'], bias=False)
        if c['tied']:
            self.lm_head.weight = self.embed_tokens.weight
        d = c['hidden'] // c['heads']
        self.register_buffer('inv_freq', 1.0 / (c['theta'] ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), persistent=False)
        self.gc = False

    def rope(self, pos, dtype):
        freqs = (self.inv_freq[None, :, None].float().expand(pos.shape[0], -1, 1) @ pos[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids, pos, caches=None, last_only=False):
        x = self.embed_tokens(ids)
        b, t = ids.shape
        past = 0 if caches is None or caches[0][0] is None else caches[0][0].shape[-2]
        cos, sin = self.rope(pos, x.dtype)
        mask = None
        if t > 1:  # transformers' 4D causal mask: min-value above the diagonal
            mask = torch.full((t, past + t), torch.finfo(x.dtype).min, dtype=x.dtype).triu(past + 1)[None, None]
        for i, layer in enumerate(self.layers):
            if self.gc and self.training:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if caches is None else caches[i])
        x = self.norm(x)
        if last_only:
            x = x[:, -1:, :]
        return self.lm_head(x)


def main():
    case, cfg, dtype, threads, reps, warmup = sys.argv[1:7]
    kv = dict(a.split('=') for a in sys.argv[7:])
    threads, reps, warmup = int(threads), int(reps), int(warmup)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = CONFIGS[cfg]
    dt = torch.bfloat16 if dtype == 'bf16' else torch.float32
    out = dict(case=case, config=cfg, dtype=dtype, threads=threads, torch=torch.__version__)

    if case == 'attention':
        T = int(kv.get('T', 1024))
        d = c['hidden'] // c['heads']
        q = torch.randn(1, c['heads'], T, d, dtype=dt, requires_grad=True)
        k = torch.randn(1, c['kv'], T, d, dtype=dt, requires_grad=True)
        v = torch.randn(1, c['kv'], T, d, dtype=dt, requires_grad=True)
        mask = torch.full((T, T), torch.finfo(dt).min, dtype=dt).triu(1)[None, None]
        dy = torch.randn(1, c['heads'], T, d, dtype=dt)

        def step():
            o = eager_attention(q, k, v, mask, c['heads'] // c['kv'])
            o.backward(dy)
            q.grad = k.grad = v.grad = None
        fn = step
        out.update(T=T, heads=c['heads'], kvHeads=c['kv'], headDim=d)
    else:
        model = Llama(c)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
            for m in model.modules():
                if isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)
        model = model.to(dt)
        if case == 'train':
            B, T = int(kv.get('B', 4)), int(kv.get('T', 256))
            r, alpha = int(kv.get('rank', 16)), float(kv.get('alpha', 32))
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in model.layers:
                for holder, names in ((layer.self_attn, ('q_proj', 'k_proj', 'v_proj', 'o_proj')), (layer.mlp, ('gate_proj', 'up_proj', 'down_proj'))):
                    for n in names:
                        setattr(holder, n, LoraLinear(getattr(holder, n), r, alpha))
            model.gc = kv.get('gc', '0') == '1'
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, c['vocab'], (B, T), generator=g)
            pos = torch.arange(T)[None].expand(B, T)

            def step():
                logits = model(ids, pos)
                # transformers' ForCausalLMLoss: upcast, shift, mean over counted tokens
                logits = logits.float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, c['vocab']), ids[:, 1:].reshape(-1), ignore_index=-100)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            fn = step
            out.update(B=B, T=T, rank=r, gc=model.gc, trainable=sum(p.numel() for p in params), tokens=B * T)
        elif case == 'prefill':
            T = int(kv.get('T', 512))
            ids = torch.randint(0, c['vocab'], (1, T))
            pos = torch.arange(T)[None]

            def step():
                with torch.no_grad():
                    model(ids, pos, last_only=True)
            fn = step
            out.update(T=T, tokens=T)
        elif case == 'decode':
            B, P, S = int(kv.get('B', 1)), int(kv.get('prompt', 128)), int(kv.get('steps', 32))
            ids = torch.randint(0, c['vocab'], (B, P))

            def step():
                with torch.no_grad():
                    caches = [[None, None] for _ in model.layers]
                    logits = model(ids, torch.arange(P)[None].expand(B, P), caches, last_only=True)
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                    t0 = time.perf_counter()
                    for s in range(S):
                        logits = model(nxt, torch.full((B, 1), P + s), caches)
                        nxt = logits[:, -1].argmax(-1, keepdim=True)
                    return time.perf_counter() - t0
            fn = step
            out.update(B=B, prompt=P, steps=S, tokens=B * S)
        else:
            raise SystemExit(f'unknown case {case}')
    out['rssAfterLoadMB'] = status_mb('VmRSS')
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        inner = fn()
        times.append((inner if inner is not None else time.perf_counter() - t0) * 1e3)
    out.update(medianMs=statistics.median(times), minMs=min(times), reps=reps, peakRssMB=status_mb('VmHWM'))
    if 'tokens' in out:
        out['tokensPerS'] = out['tokens'] / (out['medianMs'] / 1e3)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
