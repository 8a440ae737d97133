"""fastlm.patch on tiny models of every family variant: parity with transformers, and every
transformers workflow (generate, caches, padding, heads, save/load) still working after patching."""
import copy

import pytest
import torch
from _backends import backend_params
from _models import ONE_PER_FAMILY, VARIANTS, build_model, left_padded_batch, make_config, random_ids
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig

import fastlm
from fastlm.modules import FusedAttention, FusedDecoderLayer

BACKENDS = backend_params()


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_logits_match_hf(variant, backend):
    model = build_model(variant)
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits
        fastlm.patch(model, backend=backend)
        out = model(ids).logits
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_error_within_twice_hf_error(variant, backend):
    """flash-attention's rule: patched bf16 error vs fp32 is at most 2x HF's own bf16 error + atol."""
    ref_model = build_model(variant)
    bf16_model = build_model(variant).to(torch.bfloat16)
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = ref_model(ids).logits
        hf_err = (bf16_model(ids).logits.float() - ref).abs().max().item()
        fastlm.patch(bf16_model, backend=backend)
        ours_err = (bf16_model(ids).logits.float() - ref).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generate_left_padded_batch(variant, backend):
    model = build_model(variant)
    ids, mask = left_padded_batch([9, 5], seed=1)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kwargs)
    fastlm.patch(model, backend=backend)
    out = model.generate(ids, **kwargs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_generate_with_static_cache_and_without_cache(variant):
    model = build_model(variant)
    ids, mask = left_padded_batch([7, 4], seed=2)
    common = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    refs = [model.generate(ids, cache_implementation="static", **common),
            model.generate(ids, use_cache=False, **common)]
    fastlm.patch(model, backend="torch")
    outs = [model.generate(ids, cache_implementation="static", **common),
            model.generate(ids, use_cache=False, **common)]
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_hidden_states_attentions_and_logits_to_keep(variant):
    model = build_model(variant, attn_implementation="eager")
    ids = random_ids(2, 6)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, output_attentions=True, logits_to_keep=2)
        fastlm.patch(model, backend="torch")
        out = model(ids, output_hidden_states=True, output_attentions=True, logits_to_keep=2)
    assert out.logits.shape == ref.logits.shape == (2, 2, model.config.vocab_size)
    assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert rel_err(a, b) <= 1e-4
    assert len(out.attentions) == len(ref.attentions) == model.config.num_hidden_layers
    for a, b in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert rel_err(out.logits, ref.logits) <= 1e-4


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_state_dict_unchanged_and_memory_not_doubled(variant):
    model = build_model(variant)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fastlm.patch(model, backend="torch")
    after = model.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key]), key
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == param_bytes  # the fused QKV / gate-up tensors are the only copy
    attn = model.model.layers[0].self_attn
    names = attn._fastlm_spec.qkv_names
    if len(names) == 3:  # the HF q/k/v Parameters are views into the fused storage
        ptr = attn._fastlm_qkv_fused[0].untyped_storage().data_ptr()
        assert all(getattr(attn, n).weight.untyped_storage().data_ptr() == ptr for n in names)


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_save_pretrained_round_trip(variant, tmp_path):
    model = build_model(variant)
    ids = random_ids(1, 8)
    with torch.no_grad():
        ref = model(ids).logits
    fastlm.patch(model, backend="torch")
    model.save_pretrained(tmp_path / "ckpt")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()  # an unpatched model loads it
    assert not fastlm.is_patched(plain)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ref)
        fastlm.patch(plain, backend="torch")
        assert rel_err(plain(ids).logits, ref) <= 1e-4
        assert rel_err(model(ids).logits, ref) <= 1e-4  # saving did not disturb the patched model


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_unpatch_is_exact_and_patch_is_idempotent(variant):
    model = build_model(variant)
    ids = random_ids(2, 7)
    classes = [type(m) for m in model.modules()]
    with torch.no_grad():
        ref = model(ids).logits
        fastlm.patch(model, backend="torch")
        assert fastlm.is_patched(model)
        layer_cls = type(model.model.layers[0])
        fastlm.patch(model, backend="torch")  # a no-op
        assert type(model.model.layers[0]) is layer_cls
        assert isinstance(model.model.layers[0], FusedDecoderLayer)
        fastlm.unpatch(model)
        assert not fastlm.is_patched(model)
        assert [type(m) for m in model.modules()] == classes
        assert not any(k.startswith("_fastlm") for m in model.modules() for k in m.__dict__)
        assert torch.equal(model(ids).logits, ref)  # bit-identical HF behaviour
    ptrs = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))  # every Parameter owns its storage again


def test_patch_leaves_other_models_and_hf_classes_untouched():
    a, b = build_model("helium_gqa"), build_model("helium_gqa")
    hf_forward = type(b.model.layers[0]).forward
    fastlm.patch(a, backend="torch")
    assert isinstance(a.model.layers[0].self_attn, FusedAttention)
    assert not isinstance(b.model.layers[0].self_attn, FusedAttention)
    assert type(b.model.layers[0]).forward is hf_forward


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_to_dtype_after_patch_refuses_storage(variant):
    """.to() replaces each Parameter's data; the fused modules re-fuse, so patch-then-cast equals cast-then-patch."""
    model = build_model(variant)
    fastlm.patch(model, backend="torch")
    model.to(torch.bfloat16)
    twin = fastlm.patch(build_model(variant).to(torch.bfloat16), backend="torch")
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    attn = model.model.layers[0].self_attn
    assert attn._fastlm_qkv_fused[0].dtype == torch.bfloat16
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == param_bytes


@pytest.mark.parametrize("head", ["AutoModel", "ForSequenceClassification", "ForTokenClassification",
                                  "ArceeForQuestionAnswering"])
def test_base_and_head_models(head):
    import transformers

    variant = "arcee_gqa_bias_yarn"
    config = make_config(variant)
    torch.manual_seed(0)
    if head == "AutoModel":
        model = AutoModel.from_config(config)
    elif head == "ArceeForQuestionAnswering":
        model = transformers.ArceeForQuestionAnswering(config)
    else:
        model = getattr(transformers, f"Arcee{head}")(config)
    model.eval()
    ids = random_ids(2, 6)
    with torch.no_grad():
        ref = model(ids)
        fastlm.patch(model, backend="torch")
        out = model(ids)
    assert fastlm.is_patched(model)
    for key in ref.keys():
        if isinstance(ref[key], torch.Tensor):
            assert rel_err(out[key], ref[key]) <= 1e-4, key


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_training_gradients_match_hf(variant):
    model = build_model(variant)
    twin = copy.deepcopy(model)
    model.train(), twin.train()
    fastlm.patch(model, backend="torch")
    ids = random_ids(2, 6)
    model(ids, labels=ids).loss.backward()
    twin(ids, labels=ids).loss.backward()
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6)


def test_unsupported_model_gets_a_clear_error():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(fastlm.UnsupportedModelError, match="llama.*arcee, stablelm, persimmon, helium"):
        fastlm.patch(model)
    assert issubclass(fastlm.UnsupportedModelError, ValueError)
    with pytest.raises(fastlm.UnsupportedModelError, match="Linear"):
        fastlm.patch(torch.nn.Linear(2, 2))


def test_unknown_backend_rejected():
    model = build_model("helium_gqa")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastlm.patch(model, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["helium_gqa", "arcee_gqa_bias_yarn"])
def test_mlp_activation_in_place_beyond_decode_sizes(variant, backend, monkeypatch):
    """The fused MLP runs relu2_ always and swiglu_ from INPLACE_SWIGLU_MIN_ROWS rows (out of place
    below): both paths are exercised here and match HF."""
    import fastlm.modules.mlp as mlp_mod

    called = []
    real_dispatch = mlp_mod.dispatch
    monkeypatch.setattr(mlp_mod, "dispatch", lambda op, *a: called.append(op) or real_dispatch(op, *a))
    model = build_model(variant)
    gated = model.config.model_type == "helium"
    rows_in_place = mlp_mod.INPLACE_SWIGLU_MIN_ROWS
    for batch, tokens in ((1, 1), (1, rows_in_place - 1), (1, rows_in_place), (3, 9)):
        ids = random_ids(batch, tokens)
        called.clear()
        with torch.no_grad():
            ref = model(ids).logits
            fastlm.patch(model, backend=backend)
            out = model(ids).logits
            fastlm.unpatch(model)
        assert rel_err(out, ref) <= 1e-4, (batch, tokens)
        want = ("swiglu_" if batch * tokens >= rows_in_place else "swiglu") if gated else "relu2_"
        assert called and set(called) == {want}, (batch, tokens, called)
