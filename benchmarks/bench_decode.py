"""Decode tokens/s: fastlm's engine vs ``transformers`` ``generate`` on the random-weight models of the
``fastlm bench`` decode suite on CPU (``fastlm.bench.cases.E2E_SMALL``: each family's real head layout,
4-7 layers), batch 1, 32-token prompt, 64 new tokens, fp32 and bf16.

Decode rate = (new tokens - 1) / (time for N new tokens - time for 1 new token) for ``transformers``
(prefill and setup subtracted), and the engine's own synced decode timer (same definition) for fastlm.

    python benchmarks/bench_decode.py [--families arcee,helium] [--dtypes float32,bfloat16] [--threads N]
    pytest benchmarks/bench_decode.py --benchmark-only      # pytest-benchmark
"""
from __future__ import annotations

import argparse
import time

import torch

import fastlm
from fastlm.bench.cases import E2E_SMALL, build_model

PROMPT, NEW = 32, 64
FAMILIES = list(E2E_SMALL)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(family: str, dtype: torch.dtype):
    return build_model(family, E2E_SMALL[family], "cpu", dtype)  # eos disabled: always NEW tokens


def prompt_ids() -> torch.Tensor:
    return torch.randint(3, 32000, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def hf_decode_rate(model, ids, repeats: int = 1) -> float:
    fastlm.unpatch(model)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        return time.perf_counter() - t

    run(2)  # warm-up
    best = min(run(NEW) - run(1) for _ in range(repeats))
    return (NEW - 1) / best


def engine_decode_rate(model, ids, backend: str = "auto", compile=False, repeats: int = 1):
    fastlm.patch(model, backend)
    kw = dict(max_new_tokens=NEW, ignore_eos=True, backend=backend, compile=compile, return_result=True)
    fastlm.generate(model, ids[0], **kw)  # warm-up (allocation, backend resolution, compile)
    results = [fastlm.generate(model, ids[0], **kw) for _ in range(repeats)]
    best = max(results, key=lambda r: r.decode_tokens_per_s)
    return best.decode_tokens_per_s, best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, prompt {PROMPT}, {NEW} new tokens")
    header = f"{'family':<10} {'dtype':<9} {'params':>7} {'HF tok/s':>9} {'fastlm tok/s':>13} {'speedup':>8}  backend"
    if args.compile:
        header += f" {'compiled tok/s':>15} {'speedup':>8}"
    print(header)
    ids = prompt_ids()
    for family in args.families.split(","):
        for dname in args.dtypes.split(","):
            model = build(family, DTYPES[dname])
            params = sum(p.numel() for p in model.parameters()) / 1e6
            hf = hf_decode_rate(model, ids, args.repeats)
            ours, res = engine_decode_rate(model, ids, args.backend, repeats=args.repeats)
            line = (f"{family:<10} {dname:<9} {params:>6.0f}M {hf:>9.1f} {ours:>13.1f} {ours / hf:>7.2f}x  "
                    f"{res.backend}/{res.mode}")
            if args.compile:
                torch._dynamo.reset()
                comp, _ = engine_decode_rate(model, ids, args.backend, compile=True, repeats=args.repeats)
                line += f" {comp:>15.1f} {comp / hf:>7.2f}x"
            print(line, flush=True)
            del model


# ---- pytest-benchmark ---------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # running as a script without pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("dtype", list(DTYPES))
    @pytest.mark.parametrize("family", FAMILIES)
    @pytest.mark.parametrize("impl", ["transformers", "fastlm"])
    def test_decode(benchmark, impl, family, dtype):
        model, ids = build(family, DTYPES[dtype]), prompt_ids()
        if impl == "transformers":
            fastlm.unpatch(model)

            def run():
                with torch.inference_mode():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                   min_new_tokens=NEW, do_sample=False)
        else:
            fastlm.patch(model)

            def run():
                fastlm.generate(model, ids[0], max_new_tokens=NEW, ignore_eos=True)
        run()
        benchmark.extra_info.update(new_tokens=NEW, prompt_tokens=PROMPT)
        benchmark.pedantic(run, rounds=2, iterations=1)


if __name__ == "__main__":
    main()
