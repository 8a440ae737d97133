"""Every config option each family's HF implementation supports, through fastlm.patch (fp32 parity)."""
import pytest
import torch
from _models import build_model, make_config, random_ids

import fastlm


def _rope(rope_type, rotary_half):
    base = {"rope_type": rope_type}
    if rope_type in ("linear", "dynamic"):
        base["factor"] = 2.0
    elif rope_type == "yarn":
        base.update(factor=4.0, original_max_position_embeddings=64)
    elif rope_type == "longrope":
        base.update(short_factor=[1.0 + 0.1 * i for i in range(rotary_half)],
                    long_factor=[2.0 + 0.1 * i for i in range(rotary_half)], original_max_position_embeddings=32)
    elif rope_type == "llama3":
        base.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    return base


ROPE_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3"]


def _parity(config, seq=40):
    model = build_model(config)
    ids = random_ids(2, seq)  # 40 tokens > 32: longrope switches to its long factors
    with torch.no_grad():
        ref = model(ids).logits
        fastlm.patch(model, backend="torch")
        out = model(ids).logits
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-4, err


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
@pytest.mark.parametrize("variant,rotary_half", [("arcee_gqa_bias_yarn", 8), ("helium_gqa", 8),
                                                 ("stablelm_default", 2), ("persimmon_qknorm", 4)])
def test_every_rope_type(variant, rotary_half, rope_type):
    config = make_config(variant)
    params = dict(config.rope_parameters)
    params = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor")}
    params.update(_rope(rope_type, rotary_half))
    config.rope_parameters = params
    _parity(config)


def test_dynamic_rope_past_max_positions():
    config = make_config("helium_gqa", max_position_embeddings=16)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e5}
    _parity(config, seq=40)


@pytest.mark.parametrize("overrides", [
    dict(attention_bias=False, mlp_bias=False), dict(attention_bias=True, mlp_bias=False),
    dict(num_key_value_heads=1), dict(head_dim=32), dict(tie_word_embeddings=True)])
def test_arcee_options(overrides):
    _parity(make_config("arcee_gqa_bias_yarn", **overrides))


@pytest.mark.parametrize("overrides", [dict(attention_bias=True, mlp_bias=True), dict(num_key_value_heads=4),
                                       dict(num_key_value_heads=1), dict(tie_word_embeddings=True)])
def test_helium_options(overrides):
    _parity(make_config("helium_gqa", **overrides))


@pytest.mark.parametrize("overrides", [
    dict(qk_layernorm=True), dict(use_parallel_residual=True), dict(use_qkv_bias=True),
    dict(num_key_value_heads=2), dict(num_key_value_heads=2, qk_layernorm=True, use_parallel_residual=True),
    dict(tie_word_embeddings=True)])
def test_stablelm_options(overrides):
    _parity(make_config("stablelm_default", **overrides))


@pytest.mark.parametrize("overrides", [dict(qk_layernorm=False), dict(tie_word_embeddings=True)])
def test_persimmon_options(overrides):
    _parity(make_config("persimmon_qknorm", **overrides))


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
def test_stablelm_partial_rotary_factors(factor):
    config = make_config("stablelm_hd80_qknorm_parallel")
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": factor}
    _parity(config)
