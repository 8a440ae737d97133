"""Ops dispatched per decoder layer in one decode step (deterministic, not a timing): plain
transformers dispatches ~27-38 non-view ops; patched with the C++ backend, at most 12."""
import pytest
from _backends import backend_params
from _models import VARIANTS, build_model

from fastlm.bench.opcount import count_decode_step_ops


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_baseline_op_count(variant):
    count = count_decode_step_ops(build_model(variant), None)
    assert 25 <= count.per_layer <= 40, count.top()


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] == "cpp"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpp_backend_op_count(variant, backend):
    model = build_model(variant)
    hf = count_decode_step_ops(model, None)
    ours = count_decode_step_ops(model, backend)
    assert ours.per_layer <= 12, ours.top(20)
    assert ours.per_layer < hf.per_layer / 2
