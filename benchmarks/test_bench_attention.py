"""Decode attention per fastlm backend vs transformers' SDPA decode call (cases from fastlm.bench.cases)."""
import pytest
from _bench_env import DEVICE, DTYPE, SCALE

from fastlm.bench.cases import attention_cases
from fastlm.bench.suites import Unavailable, attention_callable, attention_providers

CASES = attention_cases(SCALE)


@pytest.mark.parametrize("provider", attention_providers(DEVICE.type))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decode_attention(benchmark, case, provider):
    benchmark.group = f"attention {case.name}"
    try:
        fn, nbytes = attention_callable(case, provider, DEVICE, DTYPE)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.extra_info.update(provider=provider, bytes=nbytes, dtype=str(DTYPE), device=str(DEVICE))
    benchmark(fn)
