"""Ops per decoder layer per decode step (not a timing: the count goes into extra_info and is printed)."""
import pytest
from _bench_env import DEVICE, DTYPE

from fastlm.bench import cases as C
from fastlm.bench.backends import discover
from fastlm.bench.opcount import count_decode_step_ops

PROVIDERS = [("hf", None, "")] + [(f"fastlm-{b.name}", b.name, "" if b.available else b.reason)
                                  for b in discover(DEVICE.type)]


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p[0] for p in PROVIDERS])
@pytest.mark.parametrize("family", list(C.E2E_TINY))
def test_opcount(benchmark, family, provider):
    name, backend, skip = provider
    if skip:
        pytest.skip(skip)
    model = C.build_model(family, C.E2E_TINY[family], DEVICE, DTYPE)
    result = {}

    def run():
        result["oc"] = count_decode_step_ops(model, backend)

    benchmark.group = f"opcount {family}"
    benchmark.pedantic(run, rounds=1, iterations=1)
    oc = result["oc"]
    benchmark.extra_info.update(provider=name, ops_per_layer=oc.per_layer, top=oc.top(8))
    print(f"\n{family} {name}: {oc.per_layer:g} ops/layer ({oc.top(8)})")
