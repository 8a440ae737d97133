"""pytest-benchmark files for fastlm: ``pytest benchmarks --benchmark-enable``.

They reuse the case definitions of ``fastlm.bench`` (the ``fastlm bench`` driver): same shapes, same
providers. Environment knobs: ``FASTLM_BENCH_SCALE`` (tiny | quick | full; default quick),
``FASTLM_BENCH_DEVICE`` (default: cuda when available, else cpu), ``FASTLM_BENCH_DTYPE`` (default:
bfloat16 on cuda, float32 on cpu). Without ``--benchmark-enable`` (the repository default
``--benchmark-disable``) each benchmark runs once, as a smoke check.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from fastlm.bench.driver import parse_dtypes  # noqa: E402

SCALE = os.environ.get("FASTLM_BENCH_SCALE", "quick")
DEVICE = torch.device(os.environ.get("FASTLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = parse_dtypes(os.environ.get("FASTLM_BENCH_DTYPE"), DEVICE)[0]

