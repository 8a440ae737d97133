"""Weight-only int8 / int4 projections on CPU: fastlm's ``quant_linear`` (C++ backend) against ATen's own
weight-only kernels (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``: what torchao
calls on CPU) and against fastlm's 16-bit and fp32 ``linear``, at decode (M = 1, 4) and prefill (M = 512)
rows of x, on the projection shapes of a 2048-hidden model (StableLM-2-1.6B: qkv, MLP up / down, lm_head).

Each provider's time is the median of interleaved rounds (every provider once per round, so that the
machine's drift falls on all of them alike); within a round, fastlm.bench.timing.measure's median. At
decode each call takes the next of enough copies of its weight to fill 256 MiB, so that no call finds its
weight in a cache; GB/s counts the weight's bytes (with its scales) once a call.

    python -m fastlm.bench.quant [--rows 1,4,512] [--rounds 3] [--shapes 2048x2048,...] [--providers ...]

Not a kernels-suite case: the suite times one fastlm op against its own reference, while this compares
different ops (and weight formats) on the same projection.
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from fastlm.bench import timing
from fastlm.ops import _registry
from fastlm.ops.quantized import _unpack_int4, quantize_weight

# (K, N): hidden 2048 square (o_proj), fused qkv, MLP up (one of gate / up), MLP down, a 50304-token lm_head
SHAPES = [(2048, 2048), (2048, 6144), (2048, 5632), (5632, 2048), (2048, 50304)]
PREFILL_SHAPES = SHAPES[:4]  # the lm_head at M = 512 is ~0.5 s a call per provider: --shapes to add it
WEIGHT_SET_BYTES = 256 * 2**20
MAX_COPIES = 64

PROVIDERS = {
    # name: (kind, bits, group size or None for per channel (quantized) / 16-bit GEMM mode (linear), x dtype)
    "fastlm-int8": ("fastlm", 8, None, torch.bfloat16),
    "fastlm-int8-g32": ("fastlm", 8, 32, torch.bfloat16),
    "fastlm-int4-g32": ("fastlm", 4, 32, torch.bfloat16),
    "fastlm-int4-g64": ("fastlm", 4, 64, torch.bfloat16),
    "aten-int8": ("aten8", 8, None, torch.bfloat16),
    "aten-int8-fp32x": ("aten8", 8, None, torch.float32),
    "aten-int4-g32": ("aten4", 4, 32, torch.bfloat16),
    "aten-int4-g64": ("aten4", 4, 64, torch.bfloat16),
    "fastlm-bf16": ("linear", 16, None, torch.bfloat16),
    "fastlm-fp32": ("linear", 32, None, torch.float32),
    # 16-bit linear with its 16-bit GEMM mode forced (fastlm/ops/projection.py): the fp32 GEMM on
    # widened panels, or ATen's 16-bit GEMM; without a mode (above and fastlm-fp16) as this CPU picks
    "fastlm-bf16-widen": ("linear", 16, "widen", torch.bfloat16),
    "fastlm-bf16-aten": ("linear", 16, "aten", torch.bfloat16),
    "fastlm-fp16": ("linear", 16, None, torch.float16),
    "fastlm-fp16-widen": ("linear", 16, "widen", torch.float16),
    "fastlm-fp16-aten": ("linear", 16, "aten", torch.float16),
}
# run by default: the weight formats as this CPU runs them (the forced modes on request)
DEFAULT_PROVIDERS = [p for p in PROVIDERS if not p.endswith(("-widen", "-aten"))]


@dataclass
class Prepared:
    call: Callable[[], object]
    weight_bytes: int


def _copies(t_bytes: int) -> int:
    return min(MAX_COPIES, max(1, math.ceil(WEIGHT_SET_BYTES / max(t_bytes, 1))))


def prepare(provider: str, weight: torch.Tensor, M: int, decode: bool) -> Prepared:
    """The zero-argument call of ``provider`` on x [M, K] and (copies of) its form of ``weight`` [N, K]."""
    kind, bits, group, xdtype = PROVIDERS[provider]
    N, K = weight.shape
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(xdtype)
    if kind == "linear":
        w = weight.to(xdtype)
        fn = _registry.impl("linear", "cpp", "cpu")
        args = (w,)
        if group is None:
            call_one = lambda w: fn(x, w, None, None)  # noqa: E731
        else:  # the mode is process-wide: set for each call (one atomic store), restored after
            from fastlm import _C

            def call_one(w, mode=group):
                prev = _C.set_cpu_gemm16(mode)
                try:
                    return fn(x, w, None, None)
                finally:
                    _C.set_cpu_gemm16(prev)
    elif kind == "fastlm":
        G = K if group is None else group
        qw, s = quantize_weight(weight, bits, G)
        fn = _registry.impl("quant_linear", "cpp", "cpu")
        args = (qw, s)
        call_one = lambda qw, s: fn(x, qw, s, None, None, bits, G)  # noqa: E731
    elif kind == "aten8":
        qw, s = quantize_weight(weight, 8, K)
        args = (qw, s[:, 0].to(xdtype))
        call_one = lambda qw, s: torch._weight_int8pack_mm(x, qw, s)  # noqa: E731
    else:  # aten4: our nibbles (q + 8) in ATen's packing, zero points 0
        qw, s = quantize_weight(weight, 4, group)
        nibbles = (_unpack_int4(qw, group).to(torch.int32) + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        scale_zeros = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).to(xdtype).contiguous()  # [K/G, N, 2]
        args = (packed, scale_zeros)
        call_one = lambda p, sz: torch._weight_int4pack_mm_for_cpu(x, p, group, sz)  # noqa: E731
    nbytes = sum(a.numel() * a.element_size() for a in args)
    if not decode:
        return Prepared(lambda: call_one(*args), nbytes)
    sets = [args] + [tuple(a.clone() for a in args) for _ in range(_copies(nbytes) - 1)]
    cycle = itertools.cycle(sets)
    return Prepared(lambda: call_one(*next(cycle)), nbytes)


def run(shapes=None, rows=(1, 4, 512), rounds: int = 3, providers=None, policy=timing.QUICK, printer=print,
        baseline: str = "fastlm-bf16"):
    """{(K, N, M, provider): (median us, GB/s of weight bytes, best round's p20 us)}; prints a table per
    (shape, M), each provider's speed as a ratio to ``baseline``'s."""
    providers = list(providers or DEFAULT_PROVIDERS)
    results = {}
    for M in rows:
        decode = M <= 16
        for K, N in (shapes or (SHAPES if decode else PREFILL_SHAPES)):
            weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * K ** -0.5
            prepared = {p: prepare(p, weight, M, decode) for p in providers}
            samples = {p: [] for p in providers}
            for _ in range(rounds):
                for p in providers:
                    samples[p].append(timing.measure(prepared[p].call, "cpu", policy))
            medians = {p: statistics.median(st.median_us for st in samples[p]) for p in providers}
            base = medians.get(baseline)
            printer(f"K={K} N={N} M={M}")
            for p in providers:
                us = medians[p]
                best = min(st.p20_us for st in samples[p])  # on a loaded machine: closer to the kernel's own speed
                gbs = prepared[p].weight_bytes / us / 1e3
                results[(K, N, M, p)] = (us, gbs, best)
                ratio = f"  {base / us:5.2f}x {baseline.removeprefix('fastlm-')}" if base else ""
                printer(f"  {p:18s} {us:10.1f} us  {gbs:6.1f} GB/s{ratio}   (best p20 {best:9.1f} us, "
                        f"{prepared[p].weight_bytes / best / 1e3:6.1f} GB/s)")
            del prepared
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", default=None,
                    help="KxN,KxN,... or 'e2e' (the end-to-end CPU models' projections; default: the module's SHAPES)")
    ap.add_argument("--providers", default=None, help=f"comma-separated, of {', '.join(PROVIDERS)}")
    ap.add_argument("--baseline", default="fastlm-bf16", help="the provider the ratios divide (default: fastlm-bf16)")
    a = ap.parse_args(argv)
    if a.shapes == "e2e":
        shapes = e2e_shapes()
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes else None
    providers = a.providers.split(",") if a.providers else None
    unknown = sorted(set(providers or ()) - set(PROVIDERS) | ({a.baseline} - set(PROVIDERS)))
    if unknown:
        ap.error(f"unknown providers {unknown}: choose from {', '.join(PROVIDERS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastlm._C {_cpu_isa()}, "
          f"16-bit GEMM widened for bf16/fp16: {_widens()}")
    run(shapes, [int(r) for r in a.rows.split(",")], a.rounds, providers, baseline=a.baseline)


def e2e_shapes() -> list[tuple[int, int]]:
    """(K, N) of every projection of the end-to-end suite's CPU models (fastlm.bench.configs), once each."""
    from fastlm.bench import configs

    shapes = []
    for family in configs.FAMILIES:
        layer = configs.patched_layer(family, configs.model_sizes(family, "full", "cpu"))
        shapes += [(p.in_features, p.out_features) for p in layer.projections]
    return list(dict.fromkeys(shapes))


def _widens() -> str:
    from fastlm import _C

    return "/".join(str(_C.cpu_gemm16_widens(d)) for d in ("bfloat16", "float16"))


def _cpu_isa() -> str:
    from fastlm.backends import cpp

    return cpp.CPU_ISA


if __name__ == "__main__":
    main()
