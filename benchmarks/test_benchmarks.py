"""pytest-benchmark entry points over the ``fastlm bench`` suites: the same cases, providers and builds
(fastlm.bench.suite), timed by pytest-benchmark instead of the driver. Knobs: ``FASTLM_BENCH_SCALE``
(tiny | quick | full; default quick), ``FASTLM_BENCH_DEVICE`` (default: cuda when available, else cpu),
``FASTLM_BENCH_DTYPE`` (default: bfloat16 on cuda, float32 on cpu). Without ``--benchmark-enable`` (the
repository default is ``--benchmark-disable``) each case runs once, as a smoke check."""
import os

import pytest
import torch

from fastlm.bench import SUITES
from fastlm.bench.driver import parse_dtypes
from fastlm.bench.suite import Unavailable, synced
from fastlm.bench.suites import make_suites

SCALE = os.environ.get("FASTLM_BENCH_SCALE", "quick")
DEVICE = torch.device(os.environ.get("FASTLM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE = parse_dtypes(os.environ.get("FASTLM_BENCH_DTYPE"), DEVICE)[0]
PARAMS = [pytest.param(suite, case, provider, id=f"{suite.label or suite.name}/{case.name}/{provider}")
          for suite in make_suites(SUITES) for case in suite.cases(SCALE, DEVICE)
          for provider in suite.providers(DEVICE.type)]


@pytest.mark.parametrize(("suite", "case", "provider"), PARAMS)
def test_benchmark(benchmark, suite, case, provider):
    try:
        built = suite.build(case, provider, DEVICE, DTYPE)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.group = f"{suite.label or suite.name} {case.name}"
    benchmark.extra_info.update(provider=provider, dtype=str(DTYPE), device=str(DEVICE), bytes=built.nbytes)
    fn = synced(built.fn, DEVICE)
    if built.rounds:  # slow calls (generate, op counts): a fixed number of rounds, one warm-up
        result = benchmark.pedantic(fn, rounds=built.rounds, iterations=1, warmup_rounds=int(built.rounds > 1))
    else:
        result = benchmark(fn)
    if built.info is not None:
        benchmark.extra_info.update(built.info(result))
