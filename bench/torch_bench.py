"""PyTorch baseline for the bench suite: the same work as bench/cases/<op>.ts's TypeScript twins,
done the way a PyTorch user would (F.linear, autograd with a frozen weight, optim.AdamW), on every
path PyTorch offers here, each timed: ATen (its BLAS for fp32, oneDNN for bf16) and, for fp32
inference, oneDNN through mkldnn tensors (torch.utils.mkldnn's MkldnnLinear: x to mkldnn, linear, y
back to dense). Each variant reports what actually ran: the BLAS library and the kernel OpenBLAS
picked, and the oneDNN primitives and implementations (its verbose log of one call). Buffers are
reused between runs. Prints JSON.
  python3 torch_bench.py --probe                              which BLAS and oneDNN this torch uses
  python3 torch_bench.py <op> N C OC R threads dtype reps warmup"""
import contextlib
import ctypes
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def mapped_libraries():
    with open('/proc/self/maps') as f:
        return {line.split()[-1] for line in f if '.so' in line.split()[-1]}


def blas_info():
    """The BLAS behind torch's fp32 matmuls (Debian's torch calls whatever libblas.so.3 points to)."""
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    a @ a
    ms = (time.perf_counter() - t0) * 1e3
    libs = sorted(p for p in mapped_libraries() if 'blas' in os.path.basename(p) or 'mkl' in os.path.basename(p))
    info = {'libraries': [os.path.realpath(p) for p in libs], 'kind': 'none found', 'corename': None, 'sgemm256Ms': round(ms, 3)}
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, 'openblas_get_corename'):
            lib.openblas_get_corename.restype = ctypes.c_char_p
            info.update(kind='OpenBLAS', corename=lib.openblas_get_corename().decode(), path=os.path.realpath(path))
            if hasattr(lib, 'openblas_get_config'):
                lib.openblas_get_config.restype = ctypes.c_char_p
                info['config'] = lib.openblas_get_config().decode()
            return info
        if hasattr(lib, 'mkl_get_version_string') or 'mkl' in path:
            info.update(kind='MKL', path=os.path.realpath(path))
            return info
    real = [p for p in info['libraries'] if os.path.basename(p).startswith('libblas')]
    if real:
        # Netlib's reference BLAS (Debian's libblas3): correct and hundreds of times slower
        info.update(kind='reference', path=real[0])
    return info


@contextlib.contextmanager
def stdout_to(path):
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, 'w') as f:
        os.dup2(f.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def onednn_primitives(fn):
    """'primitive:implementation' of every oneDNN call fn makes (its verbose log), in order, unique."""
    with tempfile.NamedTemporaryFile('r', suffix='.log') as log:
        with stdout_to(log.name), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            fn()
        seen = []
        for line in open(log.name):
            parts = line.split(',')
            if len(parts) > 5 and parts[0] in ('onednn_verbose', 'dnnl_verbose') and parts[1] == 'exec':
                p = f'{parts[3]}:{parts[4]}'
                if p not in seen:
                    seen.append(p)
        return seen


def probe():
    b = blas_info()
    return {'torch': torch.__version__, 'blas': b, 'mkldnn': torch.backends.mkldnn.is_available(),
            'jemalloc': any('jemalloc' in p for p in mapped_libraries()), 'mallocConf': os.environ.get('MALLOC_CONF')}


def timed(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < reps or (time.perf_counter() - start < 0.3 and len(ts) < 200):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return {'medianMs': ts[len(ts) // 2], 'minMs': ts[0], 'reps': len(ts)}


def main():
    if sys.argv[1] == '--probe':
        print(json.dumps(probe()))
        return
    op, N, C, OC, R, threads, dtype, reps, warmup = sys.argv[1:10]
    N, C, OC, R, threads, reps, warmup = map(int, (N, C, OC, R, threads, reps, warmup))
    # gemm takes turns over this many copies of W (bench/common.ts weightCopies; default 1)
    copies = int(sys.argv[10]) if len(sys.argv) > 10 else 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    wdt = torch.bfloat16 if dtype == 'bf16' else torch.float32
    x = torch.randn(N, C)
    W = (torch.randn(OC, C) * 0.1).to(wdt)
    Ws = [W] + [(torch.randn(OC, C) * 0.1).to(wdt) for _ in range(copies - 1)]
    turn = [0]

    def next_w():
        turn[0] += 1
        return turn[0] % copies
    b = torch.randn(OC)
    A = (torch.randn(R, C) * 0.1).requires_grad_()
    B = torch.randn(OC, R).requires_grad_()
    dy = torch.randn(N, OC)
    s = 2.0

    def lin(inp):
        # bf16 weights: what a user does on CPU, computing in bf16 (autocast-style) then back to fp32
        w = Ws[next_w()]
        if wdt == torch.bfloat16:
            return F.linear(inp.to(wdt), w).float() + b
        return F.linear(inp, w, b)

    def aten():
        if op in ('gemm', 'linear'):
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

    if op == 'adamw':
        p = torch.nn.Parameter(torch.randn(OC * C))
        p.grad = torch.randn(OC * C)
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01)
    variants = {'aten': aten}
    if wdt == torch.float32 and op in ('gemm', 'linear', 'lora_forward') and torch.backends.mkldnn.is_available():
        Wms, bm = [w.to_mkldnn() for w in Ws], b.to_mkldnn()

        def onednn():
            with torch.no_grad():
                y = torch._C._nn.mkldnn_linear(x.to_mkldnn(), Wms[next_w()], bm).to_dense()
                if op == 'lora_forward':
                    y + s * F.linear(F.linear(x, A), B)
        variants['onednn'] = onednn

    info = probe()
    blas = info['blas']
    blas_desc = f"{blas['kind']} {blas['corename'] or ''}".strip()
    alloc = ', jemalloc (decay off)' if info['jemalloc'] and 'decay_ms:-1' in (info['mallocConf'] or '') else \
        ', jemalloc' if info['jemalloc'] else ''
    out = {'torch': torch.__version__, 'blas': blas, 'variants': {}}
    for name, fn in variants.items():
        prims = onednn_primitives(fn) if info['mkldnn'] else []
        big = [p for p in prims if p.split(':')[0] in ('matmul', 'inner_product')]
        if name == 'onednn':
            engine = f"oneDNN {', '.join(big) or '(no primitive logged)'} via mkldnn_linear"
        elif big:
            engine = f"ATen -> oneDNN {', '.join(big)}" + (f' + {blas_desc}' if wdt == torch.float32 else '')
        else:
            engine = f'ATen -> {blas_desc}'
        r = timed(fn, reps, warmup)
        r['config'] = f'PyTorch {torch.__version__}, {engine}, {threads} thr{alloc}'
        out['variants'][name] = r
    print(json.dumps(out))


main()
