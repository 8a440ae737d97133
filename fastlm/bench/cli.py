"""``fastlm bench``: run the benchmark suites and write results.csv, summary.md and plots."""
from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    from fastlm.bench import SUITES
    from fastlm.cli import ArgumentParser

    p = ArgumentParser(prog="fastlm bench", description=__doc__)  # one-line argparse errors
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"suites to run (default: all): {', '.join(SUITES)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (< 10 min on a 2-core CPU)")
    p.add_argument("--out", default="bench-results", metavar="DIR", help="output directory (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated: float32, bfloat16, float16 (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quantize", default=None, metavar="Q",
                   help="comma-separated weight quantizations the prefill/decode suites also time: int8, int4 "
                        "(against llama.cpp's Q8_0 / Q4_0 when FASTLM_LLAMA_CPP names a build)")
    p.add_argument("--filter", default=None, metavar="REGEX",
                   help="only cases whose 'suite/case' matches this regex (or substring), e.g. 'kernels/swiglu'")
    p.add_argument("--providers", default=None, metavar="REGEX",
                   help="only providers whose name matches this regex (or substring), e.g. 'fastlm-cpp|llama.cpp'")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="timed rounds per prefill/decode case (default: 3 with --quick, else 5)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile providers")
    p.add_argument("--compile-timeout", type=float, default=None, metavar="S",
                   help="cap on hf-static-compile (compile + timing) per model, seconds")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip PNG plots")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--list", action="store_true", help="list the planned cases and exit")
    p.add_argument("--merge", nargs="+", metavar="RUN_DIR", default=None,
                   help="run nothing: combine earlier runs' outputs into --out, suite by suite (later wins)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # test-sized cases (smoke tests)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from fastlm.bench import SUITES
    from fastlm.bench.alloc import set_allocator_defaults
    from fastlm.cli import import_torch

    set_allocator_defaults()  # before anything imports torch

    bad = [s for s in args.suites if s not in SUITES]
    if bad:
        print(f"fastlm bench: unknown suite(s) {bad}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.list:
        torch = import_torch()

        from fastlm.bench import suites as S
        from fastlm.bench.driver import make_filter, parse_dtypes, parse_quantize

        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        scale = "tiny" if args.tiny else "quick" if args.quick else "full"
        sel = make_filter(args.filter)
        try:
            dtypes, quantize = parse_dtypes(args.dtype, dev), parse_quantize(args.quantize)
        except ValueError as exc:
            print(f"fastlm bench: {exc}", file=sys.stderr)
            return 2
        for t in S.plan(args.suites or list(SUITES), scale, dtypes, dev, quantize):
            for s, c in t.keys:
                if sel(s, c):
                    print(f"{s}/{c}")
        return 0
    if args.merge:
        from fastlm.bench.driver import merge_results

        rows = merge_results(args.out, args.merge, plots=args.plots)
        print(f"fastlm bench: merged {len(rows)} rows from {', '.join(args.merge)} -> {args.out}/summary.md")
        _say_if_no_plots(args)
        return 0
    import_torch()
    from fastlm.bench.driver import run_benchmarks

    try:
        rows = run_benchmarks(args.out, suites=args.suites or None, quick=args.quick, tiny=args.tiny,
                              device=args.device, dtype=args.dtype, filter=args.filter, compile=args.compile,
                              compile_timeout_s=args.compile_timeout, plots=args.plots, progress=args.progress,
                              command="fastlm bench " + shlex.join(argv), quantize=args.quantize,
                              providers=args.providers, rounds=args.rounds)
    except ValueError as exc:
        print(f"fastlm bench: {exc}", file=sys.stderr)
        return 2
    ok = sum(r.ok for r in rows)
    print(f"fastlm bench: {len(rows)} rows ({ok} measured, {len(rows) - ok} skipped/failed) -> "
          f"{args.out}/results.csv, {args.out}/summary.md")
    _say_if_no_plots(args)
    return 0


def _say_if_no_plots(args) -> None:
    """Plots were asked for (the default) but cannot be drawn: say so here, not only in summary.md."""
    if args.plots:
        from fastlm.bench.report import plotting_unavailable

        problem = plotting_unavailable()
        if problem:
            print(f"fastlm bench: no plots: {problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
