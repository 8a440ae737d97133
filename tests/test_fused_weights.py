"""Fused weights never go stale: whatever changes an HF Parameter after ``patch`` (state_dict loads with
and without ``assign``, in-place updates of a shared Parameter, deepcopy, ``.to()``, tying, replacing a
Parameter) is seen by the next fused forward and by the engine. And mixed precision as HF runs it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastlm
from _models import ONE_PER_FAMILY, build_model, random_ids
from _tolerance import assert_close_to_ref

BACKENDS = ["torch", "cpp"]
IDS = random_ids(2, 7, seed=11)


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def hf_logits(model, ids=IDS):
    """The same weights through HF's own modules (a deepcopy, unpatched)."""
    ref = copy.deepcopy(model)
    fastlm.unpatch(ref)
    return logits(ref, ids)


def assert_matches_hf(model, ids=IDS):
    torch.testing.assert_close(logits(model, ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)


def greedy_hf(model, ids, new=8):
    ref = copy.deepcopy(model)
    fastlm.unpatch(ref)
    with torch.no_grad():
        out = ref.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)
    return out[0, ids.shape[0]:].tolist()


def greedy_engine(model, ids, backend, new=8):
    return fastlm.generate(model, ids, max_new_tokens=new, ignore_eos=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_deepcopy_then_load_state_dict(variant, backend):
    model = fastlm.patch(build_model(variant), backend)
    other = build_model(variant, seed=5)
    clone = copy.deepcopy(model)
    clone.load_state_dict(other.state_dict())
    torch.testing.assert_close(logits(clone), logits(other), rtol=1e-4, atol=1e-4)
    assert greedy_engine(clone, IDS[0], backend) == greedy_hf(other, IDS[0])
    assert_matches_hf(model)  # the original is untouched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_load_state_dict_assign(variant, backend):
    model = fastlm.patch(build_model(variant), backend)
    fastlm.generate(model, IDS[0], max_new_tokens=2, backend=backend)  # an engine exists already
    other = build_model(variant, seed=6)
    model.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(logits(model), logits(other), rtol=1e-4, atol=1e-4)
    assert greedy_engine(model, IDS[0], backend) == greedy_hf(other, IDS[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_shared_by_two_layers_updated_in_place(backend):
    model = build_model("helium_gqa")
    layers = model.model.layers
    for name in ("q_proj", "v_proj"):
        getattr(layers[1].self_attn, name).weight = getattr(layers[0].self_attn, name).weight
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    fastlm.patch(model, backend)
    with torch.no_grad():  # as an optimizer step would
        layers[0].self_attn.q_proj.weight.add_(0.5)
        layers[0].mlp.up_proj.weight.mul_(-1.5)
        layers[1].self_attn.v_proj.weight.mul_(2.0)
    assert_matches_hf(model)
    assert greedy_engine(model, IDS[0], backend) == greedy_hf(model, IDS[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_and_tied_parameters(backend):
    model = fastlm.patch(build_model("stablelm_hd80_qknorm_parallel"), backend)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[1].mlp
    g = torch.Generator().manual_seed(3)
    attn.k_proj.weight = nn.Parameter(torch.randn(attn.k_proj.weight.shape, generator=g) * 0.05,
                                      requires_grad=False)
    attn.q_layernorm.norms[1].weight = nn.Parameter(torch.randn(attn.head_dim, generator=g))
    mlp.gate_proj.weight = model.model.layers[0].mlp.gate_proj.weight  # tie across layers
    assert_matches_hf(model)
    assert greedy_engine(model, IDS[0], backend) == greedy_hf(model, IDS[0])
    mlp.gate_proj.weight = nn.Parameter(mlp.gate_proj.weight.detach().clone() * 0.5)  # untie again
    assert_matches_hf(model)
    p = fastlm.patch(build_model("persimmon_qknorm"), backend)  # its fused QKV and shared qk-norm, as is
    a = p.model.layers[0].self_attn
    a.query_key_value.weight = nn.Parameter(a.query_key_value.weight.detach() * -1.0)
    a.k_layernorm.bias = nn.Parameter(torch.randn(a.head_dim, generator=g))
    assert_matches_hf(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpatch_load_patch_rounds_match_hf(backend):
    """Each round's engine sees that round's weights (a cache keyed on id() of a tensor could be hit)."""
    model = build_model("stablelm_hd80_qknorm_parallel")
    for seed in range(4):
        fastlm.patch(model, backend)
        got = greedy_engine(model, IDS[1], backend)
        assert got == greedy_hf(model, IDS[1]), f"round {seed}"
        fastlm.unpatch(model)
        model.load_state_dict(build_model("stablelm_hd80_qknorm_parallel", seed=20 + seed).state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_dtype_round_trip_refuses(backend):
    model = fastlm.patch(build_model("arcee_gqa_bias_yarn"), backend)
    model.to(torch.bfloat16).to(torch.float32)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.k_proj.weight.untyped_storage().data_ptr()
    assert_matches_hf(model)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["stablelm_hd80_qknorm_parallel", "stablelm_default", "persimmon_qknorm",
                                     "helium_gqa"])
def test_16bit_model_with_fp32_norms_runs_as_hf(variant, backend):
    """bf16 weights with the norms kept in fp32 (keep_in_fp32_modules, some checkpoints): HF runs it, so
    the patched model and the engine do too, as accurately as HF."""
    def mixed(seed=0):
        m = build_model(variant, dtype=torch.bfloat16, seed=seed)
        for module in m.modules():
            if "Norm" in type(module).__name__:
                module.float()
        return m

    model = mixed()
    ref_fp32 = logits(build_model(variant))
    hf = logits(model)
    fastlm.patch(model, backend)
    assert_close_to_ref(logits(model).float(), ref_fp32, hf.float(), atol=1e-2, name=variant)
    assert greedy_engine(model, IDS[0], backend) == greedy_hf(model, IDS[0])
