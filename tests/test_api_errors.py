"""Bad input to patch / unpatch / is_patched / generate / stream: one clear error naming the argument,
raised at the call (before any work), never a wrong answer or an internal exception."""
from __future__ import annotations

import math

import pytest
import torch

import fastlm
from _models import build_model, left_padded_batch, random_ids


@pytest.fixture(scope="module")
def model():
    return fastlm.patch(build_model("helium_gqa"), "cpp")


IDS = random_ids(2, 10, seed=4)


@pytest.mark.parametrize("fn", ["patch", "unpatch", "is_patched"])
@pytest.mark.parametrize("bad", ["x", 3, None, torch.zeros(2)])
def test_patching_functions_name_a_non_model(fn, bad):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        getattr(fastlm, fn)(bad)


def test_patch_backend_is_checked(model):
    for bad in ("nope", None, 3):
        with pytest.raises(ValueError, match="backend must be one of"):
            fastlm.patch(model, bad)


@pytest.mark.parametrize("mask_shape", [(2, 5), (1, 10), (2, 11), (10,)])
def test_attention_mask_must_match_input_ids(model, mask_shape):
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 10\)"):
        fastlm.generate(model, IDS, attention_mask=torch.ones(mask_shape, dtype=torch.long), max_new_tokens=2)


def test_attention_mask_with_one_sequence_is_applied(model):
    ids, mask = left_padded_batch([7], seed=1)
    expected = fastlm.generate(model, ids[0, -7:], max_new_tokens=6, ignore_eos=True)
    assert fastlm.generate(model, ids[0], attention_mask=mask[0], max_new_tokens=6, ignore_eos=True) == expected
    assert fastlm.generate(model, ids[0], attention_mask=mask[0].bool(), max_new_tokens=6,
                           ignore_eos=True) == expected
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        fastlm.generate(model, ids[0], attention_mask=mask[0, 1:], max_new_tokens=2)


@pytest.mark.parametrize("mask, match", [([[1] * 10, [0] * 10], "masks out every token"),
                                         ([[1] * 10, [2] * 10], "only 0 and 1"),
                                         (torch.ones(2, 10), "attention_mask must hold integer")])
def test_attention_mask_values(model, mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastlm.generate(model, IDS, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("bad, exc", [(IDS.float(), TypeError), (IDS.bool(), TypeError), ([1.0, 2.0], TypeError),
                                      ([[1, 2], [3, "a"]], TypeError), (torch.tensor(5), ValueError),
                                      (IDS[None], ValueError), ([], ValueError), ([[1, 2], []], ValueError),
                                      ([1, 999], ValueError), ([1, -1], ValueError), (3, TypeError)])
def test_input_ids_are_checked(model, bad, exc):
    with pytest.raises(exc, match="input_ids|prompt|token"):
        fastlm.generate(model, bad, max_new_tokens=2)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(temperature=math.nan), ValueError, "temperature"), (dict(temperature=math.inf), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"), (dict(temperature="hot"), TypeError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"), (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_p=0.0), ValueError, "top_p"), (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens"), (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(seed=-1), ValueError, "seed"), (dict(seed="s"), TypeError, "seed"), (dict(seed=2**32), ValueError, "seed"),
    (dict(max_cache_len=0), ValueError, "max_cache_len"), (dict(eos_token_id="x"), TypeError, "eos_token_id"),
    (dict(backend="gpu"), ValueError, "backend"), (dict(compile=3), TypeError, "compile"),
])
def test_generation_arguments_are_checked(model, kw, exc, name):
    with pytest.raises(exc, match=name):
        fastlm.generate(model, IDS[0], **{"max_new_tokens": 2, **kw})
    with pytest.raises(exc, match=name):
        fastlm.stream(model, IDS[0], **{"max_new_tokens": 2, **kw})  # at the call, not at the first next()


def test_tiny_temperature_tends_to_greedy(model):
    greedy = fastlm.generate(model, IDS[0], max_new_tokens=8, ignore_eos=True)
    for kw in (dict(), dict(top_p=0.9), dict(top_k=5)):
        assert fastlm.generate(model, IDS[0], max_new_tokens=8, ignore_eos=True, temperature=1e-40, seed=1,
                               **kw) == greedy


def test_generate_needs_a_causal_lm():
    with pytest.raises(TypeError, match="needs a \\*ForCausalLM"):
        fastlm.generate("model", [1, 2])


def test_zero_new_tokens_reports_the_real_backend(model):
    result = fastlm.generate(model, IDS[0], max_new_tokens=0, return_result=True)
    assert result.tokens == [[]] and result.backend == "cpp"
