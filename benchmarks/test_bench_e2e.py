"""End-to-end generate (prompt + N new tokens) per family: transformers vs fastlm.patch'ed models vs
the fastlm engine (cases from fastlm.bench.cases; the driver splits prefill and decode time)."""
import pytest
import torch
from _bench_env import DEVICE, DTYPE, SCALE

import fastlm
from fastlm.bench import cases as C
from fastlm.bench.suites import _engine_generate, e2e_providers

SHAPE = C.e2e_shapes(SCALE, DEVICE.type)[0]
PROVIDERS = [(p, kind, b, skip) for p, kind, b, skip in e2e_providers(DEVICE.type) if kind != "static-compile"]


@pytest.fixture(scope="module", params=list(C.e2e_sizes(SCALE, DEVICE.type)))
def family_model(request):
    fam = request.param
    sizes = C.e2e_sizes(SCALE, DEVICE.type)[fam]
    return fam, sizes, C.build_model(fam, sizes, DEVICE, DTYPE)


@pytest.mark.parametrize("provider", PROVIDERS, ids=[p[0] for p in PROVIDERS])
def test_generate(benchmark, family_model, provider):
    fam, sizes, model = family_model
    name, kind, backend, skip = provider
    if skip:
        pytest.skip(skip)
    benchmark.group = f"generate {fam}/{SHAPE.decode_name}"
    ids = C.random_ids(SHAPE.batch, SHAPE.prompt, sizes["vocab_size"], DEVICE)
    n = SHAPE.new_tokens
    fastlm.unpatch(model)
    if kind == "engine":
        gen, _ = _engine_generate()
        run = lambda: gen(model, ids, max_new_tokens=n, backend=backend)  # noqa: E731
    else:
        if kind == "patched":
            fastlm.patch(model, backend)

        def run():
            with torch.no_grad():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    benchmark.extra_info.update(provider=name, new_tokens=n, batch=SHAPE.batch, prompt=SHAPE.prompt)
    try:
        benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    finally:
        fastlm.unpatch(model)
