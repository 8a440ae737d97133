"""The CUDA-graph bookkeeping, checked on the CPU: graphs are keyed on the sampling *structure* (the
temperature and top_p are device tensors the step reads), and a failed capture disables only its key."""
from __future__ import annotations

import warnings

import pytest
import torch

import fastlm
from fastlm.engine import cuda_graphs
from fastlm.engine.sampling import SamplingConfig, sample
from _models import build_model, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("config", [SamplingConfig(0.7), SamplingConfig(1.3, top_k=5),
                                    SamplingConfig(0.9, top_p=0.8), SamplingConfig(2.0, top_k=7, top_p=0.6),
                                    SamplingConfig(1e-30, top_p=0.5)])
def test_device_tensor_parameters_sample_as_the_config(config):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    seed, counter = torch.tensor([11]), torch.tensor([4])
    want = sample(logits, config, seed, counter)
    t = torch.tensor([config.temperature])
    p = torch.tensor([config.top_p if config.top_p is not None else 1.0])
    assert torch.equal(sample(logits, config.structure(), seed, counter, t, p), want)


def test_structure_ignores_the_values():
    assert SamplingConfig(0.3).structure() == SamplingConfig(1.7).structure()
    assert SamplingConfig(0.3, top_p=0.2).structure() == SamplingConfig(0.9, top_p=0.95).structure()
    assert SamplingConfig(0.3, top_p=1.0).structure() == SamplingConfig(0.3).structure()
    assert SamplingConfig(0.3, top_k=4).structure() != SamplingConfig(0.3).structure()
    assert SamplingConfig(0.0).structure() != SamplingConfig(0.3).structure()


def test_compiled_step_is_not_rebuilt_for_a_new_temperature():
    model = build_model("helium_gqa")
    ids = random_ids(1, 5, seed=2)[0]
    first = fastlm.generate(model, ids, max_new_tokens=6, temperature=0.8, seed=3, backend="torch",
                            compile="aot_eager", return_result=True)
    engine = fastlm.engine.engine.engine_for(model, cuda_graph=True, compile="aot_eager")
    compiled = engine._idle[-1].compiled
    eager = fastlm.generate(model, ids, max_new_tokens=6, temperature=1.4, seed=3, backend="torch")
    again = fastlm.generate(model, ids, max_new_tokens=6, temperature=1.4, seed=3, backend="torch",
                            compile="aot_eager", return_result=True)
    assert first.mode == again.mode == "compiled" and again.tokens[0] == eager
    assert engine._idle[-1].compiled is compiled


def test_failed_capture_disables_only_its_key(monkeypatch):
    def capture(self, batch, config):
        if batch == 2:
            raise RuntimeError("capture broken on purpose")
        return object()

    monkeypatch.setattr(cuda_graphs.GraphRunner, "_capture", capture)
    graphs = cuda_graphs.GraphRunner(runner=None)
    assert graphs.prepare(1, SamplingConfig())
    with pytest.warns(RuntimeWarning, match="batch 2"):
        assert not graphs.prepare(2, SamplingConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for the same key
        assert not graphs.prepare(2, SamplingConfig())
        assert graphs.prepare(1, SamplingConfig()) and graphs.prepare(4, SamplingConfig())
