"""Fused ops vs eager / torch.compile, per fastlm backend (cases from fastlm.bench.cases)."""
import pytest
from _bench_env import DEVICE, DTYPE, SCALE

from fastlm.bench.cases import kernel_cases
from fastlm.bench.suites import Unavailable, kernel_callable, kernel_providers

CASES = kernel_cases(SCALE)
PROVIDERS = [p for p, _, _ in kernel_providers(DEVICE.type)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kernel(benchmark, case, provider):
    benchmark.group = f"kernels {case.name}"
    try:
        fn, nbytes = kernel_callable(case, provider, DEVICE, DTYPE)
    except Unavailable as why:
        pytest.skip(str(why))
    benchmark.extra_info.update(provider=provider, bytes=nbytes, dtype=str(DTYPE), device=str(DEVICE))
    benchmark(fn)
