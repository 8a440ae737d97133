"""CPU benchmark: each fused C++ op (fastlm._C) against the eager PyTorch composition it replaces (the
``*_ref`` functions), at the four families' prefill and decode shapes, fp32 and bf16.

    python benchmarks/bench_cpu_ops.py [--quick]      # prints a table (+ the machine's copy bandwidth)
    pytest benchmarks/bench_cpu_ops.py --benchmark-enable

GB/s counts the bytes a fused op must move (inputs read once, outputs written once); the same count is
used for the eager time, so the two GB/s columns compare directly with the copy bandwidth
(``dst.copy_(src)`` on 256 MB: read + write).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastlm.ops import _cpp  # noqa: E402  (needs fastlm._C)
from fastlm.ops.activations import relu2_ref, swiglu_ref  # noqa: E402
from fastlm.ops.attention import decode_attention_ref  # noqa: E402
from fastlm.ops.layer_norm import add_layer_norm_ref  # noqa: E402
from fastlm.ops.qkv_rope import qkv_rope_cache_ref, qkv_rope_ref  # noqa: E402
from fastlm.ops.rms_norm import add_rms_norm_ref  # noqa: E402

# name: (H, Hkv, D, R, interleaved, per_head_layout, norm kind)
FAMILIES = {
    "arcee": (32, 8, 80, 80, False, False, None),
    "stablelm": (32, 32, 80, 20, False, False, "per_head"),
    "persimmon": (64, 64, 64, 32, False, True, "shared_bias"),
    "helium": (20, 20, 128, 128, True, False, None),
}
PREFILL = [(1, 512), (1, 2048)]
DECODE = [(1, 1), (8, 1)]


def timeit(fn, min_time=0.25, max_iters=200):
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # min: robust to other load on a shared machine


def copy_bandwidth():
    src = torch.empty(256 * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), min_time=1.0)
    return 2 * src.numel() * 4 / t / 1e9


def rope_tables(B, S, R, dtype, offset=0):
    inv = 1.0 / 10000 ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    f = torch.arange(offset, offset + S, dtype=torch.float32)[None, :, None] * inv
    emb = torch.cat((f, f), -1).expand(B, S, R)
    return emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def qkv_inputs(fam, B, S, dtype):
    H, Hkv, D, R, inter, per_head, norm = FAMILIES[fam]
    qkv = torch.randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    cos, sin = rope_tables(B, S, R, dtype, offset=100)
    nw = [None] * 4
    if norm == "per_head":
        nw = [torch.randn(H, D, dtype=dtype), None, torch.randn(Hkv, D, dtype=dtype), None]
    elif norm == "shared_bias":
        nw = [torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype),
              torch.randn(D, dtype=dtype)]
    args = (qkv, cos, sin, *nw, H, Hkv, D, R, inter, per_head, 1e-5)
    return args, nbytes(qkv, cos[..., : R // 2], sin[..., : R // 2]) + nbytes(qkv)


def cases(dtype, quick=False):
    """Yield (op, shape label, fused fn, eager fn, bytes)."""
    shapes = [("prefill", B, S) for B, S in PREFILL] + [("decode", B, S) for B, S in DECODE]
    if quick:
        shapes = [("prefill", 1, 512), ("decode", 1, 1)]
    for kind, B, S in shapes:
        lbl = f"{kind} B={B} T={S}"
        # add + RMSNorm (Arcee order, hidden 2560; Helium order, hidden 2560) and add + LayerNorm (4096, bias)
        for hidden, wf, fam in ((2560, False, "arcee"), (2560, True, "helium")):
            x, r = torch.randn(B, S, hidden, dtype=dtype), torch.randn(B, S, hidden, dtype=dtype)
            w = torch.randn(hidden, dtype=dtype)
            yield (f"add_rms_norm[{fam}]", lbl, lambda x=x, r=r, w=w, wf=wf: _cpp.add_rms_norm_cpp(x, r, w, 1e-5, wf),
                   lambda x=x, r=r, w=w, wf=wf: add_rms_norm_ref(x, r, w, 1e-5, wf), nbytes(x, r, w) + 2 * nbytes(x))
        x, r = torch.randn(B, S, 4096, dtype=dtype), torch.randn(B, S, 4096, dtype=dtype)
        w, b = torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype)
        yield ("add_layer_norm[persimmon]", lbl, lambda x=x, r=r, w=w, b=b: _cpp.add_layer_norm_cpp(x, r, w, b, 1e-5),
               lambda x=x, r=r, w=w, b=b: add_layer_norm_ref(x, r, w, b, 1e-5), nbytes(x, r, w, b) + 2 * nbytes(x))
        for fam in FAMILIES:
            args, nb = qkv_inputs(fam, B, S, dtype)
            if kind == "prefill":
                yield (f"qkv_rope[{fam}]", lbl, lambda a=args: _cpp.qkv_rope_cpp(*a), lambda a=args: qkv_rope_ref(*a), nb)
            else:  # decode: the cache-writing variant, as the engine uses it
                H, Hkv, D = FAMILIES[fam][:3]
                kc, vc = torch.zeros(B, Hkv, 2048, D, dtype=dtype), torch.zeros(B, Hkv, 2048, D, dtype=dtype)
                pos = torch.full((B, S), 1000, dtype=torch.int64)
                a = args[:7] + (kc, vc, pos) + args[7:]
                yield (f"qkv_rope_cache[{fam}]", lbl, lambda a=a: _cpp.qkv_rope_cache_cpp(*a),
                       lambda a=a: qkv_rope_cache_ref(*a), nb)
        inter = 6912
        gu = torch.randn(B, S, 2 * inter, dtype=dtype)
        yield ("swiglu[stablelm I=6912]", lbl, lambda gu=gu: _cpp.swiglu_cpp(gu), lambda gu=gu: swiglu_ref(gu),
               nbytes(gu) * 3 // 2)
        xr = torch.randn(B, S, 16384, dtype=dtype)
        yield ("relu2[persimmon I=16384]", lbl, lambda xr=xr: _cpp.relu2_cpp(xr), lambda xr=xr: relu2_ref(xr),
               2 * nbytes(xr))
        if kind == "decode":
            H, Hkv, D, T, L = 32, 8, 80, 2048, 1024
            q = torch.randn(B, H, D, dtype=dtype)
            kc, vc = torch.randn(B, Hkv, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype)
            lengths = torch.full((B,), L, dtype=torch.int64)
            sc = 1 / math.sqrt(D)
            yield ("decode_attention[H32/8 D80 len1024]", lbl,
                   lambda q=q, kc=kc, vc=vc, le=lengths: _cpp.decode_attention_cpp(q, kc, vc, le, sc),
                   lambda q=q, kc=kc, vc=vc, le=lengths: decode_attention_ref(q, kc, vc, le, sc),
                   2 * B * Hkv * L * D * kc.element_size() + 2 * nbytes(q))


def run_table(quick=False):
    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, fastlm._C ISA={_cpp.CPU_ISA}")
    print(f"copy bandwidth (dst.copy_(src), 256 MB fp32): {bw:.1f} GB/s\n")
    hdr = f"{'op':38s} {'shape':22s} {'dtype':5s} {'fused us':>10s} {'eager us':>10s} {'speedup':>8s} {'GB/s':>7s} {'%copy':>6s}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for op, lbl, fused, eager, nb in cases(dtype, quick):
            tf, te = timeit(fused), timeit(eager)
            gbs = nb / tf / 1e9
            dt = "fp32" if dtype == torch.float32 else "bf16"
            rows.append((op, lbl, dt, tf, te, gbs))
            print(f"{op:38s} {lbl:22s} {dt:5s} {tf * 1e6:10.1f} {te * 1e6:10.1f} {te / tf:7.2f}x {gbs:7.1f} "
                  f"{100 * gbs / bw:5.0f}%", flush=True)
    return bw, rows


# ---- pytest-benchmark entry points (one representative shape per op; the table covers the grid) ----
try:
    import pytest

    _CASES = {(op, lbl, "bf16"): (f, e) for op, lbl, f, e, _ in cases(torch.bfloat16, quick=True)}

    @pytest.mark.parametrize("impl", ["fused", "eager"])
    @pytest.mark.parametrize("key", sorted(_CASES), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}".replace(" ", ""))
    def test_bench(benchmark, key, impl):
        fused, eager = _CASES[key]
        benchmark(fused if impl == "fused" else eager)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one prefill and one decode shape")
    run_table(ap.parse_args().quick)
