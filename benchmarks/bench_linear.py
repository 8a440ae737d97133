"""CPU benchmark: fastlm's decode ``linear`` (csrc/cpu/linear.cpp) against ATen's ``F.linear`` at decode
shapes (1 and 8 rows of x), fp32 and bf16, on weights cycled through ~200 MB so every call reads
them from DRAM, as at decode. GB/s = weight bytes / time.

    python benchmarks/bench_linear.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fastlm.ops._cpp  # noqa: F401  (registers torch.ops.fastlm.linear; needs fastlm._C)

SHAPES = [(768, 768), (3072, 768), (768, 3072), (32000, 768)]  # [N, K]: projections and lm_head of ~100M models


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'dtype':<9} {'M':>2} {'N x K':>12} {'ATen GB/s':>10} {'fastlm GB/s':>12}")
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 8):
            for n, k in SHAPES:
                nbytes = n * k * dtype.itemsize
                weights = [torch.randn(n, k, dtype=dtype) for _ in range(max(1, int(200e6 // nbytes)))]
                x = torch.randn(m, k, dtype=dtype)
                i = [0]

                def step(op):
                    i[0] = (i[0] + 1) % len(weights)
                    return op(x, weights[i[0]])

                aten = per_call_us(lambda: step(F.linear))
                ours = per_call_us(lambda: step(torch.ops.fastlm.linear))
                print(f"{str(dtype)[6:]:<9} {m:>2} {f'{n}x{k}':>12} {nbytes / aten / 1e3:>10.1f} {nbytes / ours / 1e3:>12.1f}")


if __name__ == "__main__":
    main()
