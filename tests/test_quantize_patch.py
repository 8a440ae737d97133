"""``fastlm.patch(model, quantize="int8" | "int4")``: the quantized model is exactly the model with its weights
replaced by their dequantized values (to fp32 rounding), for every family; ``generate()`` and the engine
work on it and agree; the 16-bit weights are really freed; bad arguments get one error naming ``quantize``;
re-patching, ``state_dict`` loads and ``.to()`` keep it right (fastlm.modules._quantized)."""
from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch
import torch.nn as nn

import fastlm
from fastlm.engine.engine import engine_for
from fastlm.modules import PRESETS, QuantFormat, QuantSpec
from fastlm.ops.quantized import dequantize_weight, quantize_weight
from fastlm.patching import patch_record
from _backends import backend_params
from _models import ONE_PER_FAMILY, build_model, make_config, random_ids

IDS = random_ids(2, 9, seed=3)
pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def projections(model) -> dict[str, nn.Linear]:
    """What the presets quantize: every Linear of each layer's attention and MLP, and the (untied) lm_head."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for part in ("self_attn", "mlp"):
            for name, m in getattr(layer, part).named_modules():
                if isinstance(m, nn.Linear):
                    out[f"model.layers.{i}.{part}.{name}"] = m
    if model.lm_head.weight is not model.model.embed_tokens.weight:  # a tied lm_head is the embedding: kept
        out["lm_head"] = model.lm_head
    return out


def dequantized_twin(model, quantize: str):
    """A copy of the unpatched ``model`` whose quantized projections hold dequantize(quantize(w)) (fp32 weights)."""
    twin = copy.deepcopy(model)
    spec = PRESETS[quantize]
    with torch.no_grad():
        for name, linear in projections(twin).items():
            fmt = spec.lm_head if name == "lm_head" else spec.projections
            group = fmt.group_size_for(linear.in_features)
            q, s = quantize_weight(linear.weight, fmt.bits, group)
            linear.weight.copy_(dequantize_weight(q, s, fmt.bits, group, linear.weight.dtype))
    return twin


# ---- parity: quantized == dequantize-then-reference, to fp32 rounding ------------------------------------
def parity_cases():
    """Every family and format on the torch and cpp backends; Triton (its other kernels interpreted: slow) once."""
    backends = {p.id: p for p in backend_params()}
    cases = [pytest.param(v, q, *backends[b].values, marks=backends[b].marks, id=f"{v}-{q}-{b}")
             for v in ONE_PER_FAMILY for q in ("int8", "int4") for b in ("torch", "cpp")]
    return cases + [pytest.param("helium_gqa", "int4", *backends["triton"].values, marks=backends["triton"].marks,
                                 id="helium_gqa-int4-triton")]


@pytest.mark.parametrize("variant, quantize, backend", parity_cases())
def test_logits_equal_the_dequantized_model(variant, quantize, backend):
    model = build_model(variant)
    twin = fastlm.patch(dequantized_twin(model, quantize), backend)
    fastlm.patch(model, backend, quantize=quantize)
    got, want = logits(model), logits(twin)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert (got - logits(fastlm.patch(build_model(variant), backend))).abs().max() > 1e-4  # it did quantize


@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_generate_and_engine_agree(variant):
    quantize = "int4" if variant in ONE_PER_FAMILY[::2] else "int8"
    model = fastlm.patch(build_model(variant), quantize=quantize)
    prompt = IDS[0]
    with torch.no_grad():
        hf = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=10,
                            min_new_tokens=10, do_sample=False)[0, prompt.numel():].tolist()
    assert fastlm.generate(model, prompt, max_new_tokens=10, ignore_eos=True) == hf
    twin = fastlm.patch(dequantized_twin(build_model(variant), quantize))
    assert fastlm.generate(twin, prompt, max_new_tokens=10, ignore_eos=True) == hf


# ---- memory: the 16-bit weights are freed -----------------------------------------------------------
@pytest.mark.parametrize("variant", ["helium_gqa", "persimmon_qknorm"])
def test_16bit_weights_are_freed(variant):
    model = build_model(variant, dtype=torch.bfloat16)
    linears = projections(model)
    weights = [weakref.ref(m.weight) for m in linears.values()]
    kept = {k: v.data_ptr() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in linears
            or k.endswith(".bias")}
    fastlm.patch(model, quantize="int4")
    gc.collect()
    assert all(w() is None for w in weights)
    record = patch_record(model)
    assert record.quantize == "int4" and set(record.quantized) == set(linears)
    for name, m in linears.items():
        assert "weight" not in m._parameters and not hasattr(m, "weight"), name
        # an untied lm_head: int8 for both presets
        assert m.qweight.dtype == (torch.int8 if name == "lm_head" else torch.uint8) and m.scales.dtype == torch.float32
    # Every byte held: the kept 16-bit tensors (embedding, norms, biases) and the quantized buffers, once each.
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if n.endswith(("qweight", "scales"))]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    held = sum(t.numel() * t.element_size() for t in tensors)
    assert sum(storages.values()) == held
    quantized = sum(m.qweight.nbytes + m.scales.nbytes for m in linears.values())
    assert held == quantized + sum(p.numel() * p.element_size() for p in model.parameters())
    assert all(model.state_dict()[k].data_ptr() == ptr for k, ptr in kept.items() if "layers" not in k)


def test_tied_lm_head_keeps_the_embedding():
    config = make_config("helium_gqa", tie_word_embeddings=True)
    model = build_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    table = model.model.embed_tokens.weight.detach().clone()
    fastlm.patch(model, quantize="int8")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, table)
    assert "lm_head" not in patch_record(model).quantized
    twin = fastlm.patch(dequantized_twin(build_model(config), "int8"))
    torch.testing.assert_close(logits(model), logits(twin), rtol=2e-5, atol=2e-5)


# ---- bad arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["int3", "INT8", 8, "int8-g32", True])
def test_bad_quantize_values(bad):
    model = build_model("helium_gqa")
    with pytest.raises(ValueError, match=r"^quantize must be None, 'int8' or 'int4'"):
        fastlm.patch(model, quantize=bad)
    assert not fastlm.is_patched(model)


def test_models_that_cannot_be_quantized_are_left_as_they_were():
    model = build_model("helium_gqa").double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"quantize='int8' needs float32, bfloat16 or float16 weights, but "
                                         r"model\.layers\.0\.self_attn\.q_proj\.weight is torch\.float64"):
        fastlm.patch(model, quantize="int8")
    assert not fastlm.is_patched(model) and model.state_dict().keys() == before.keys()
    model = fastlm.patch(build_model("helium_gqa"))  # patched (16-bit) before: still patched, unchanged, after
    record = patch_record(model)
    model.model.layers[1].mlp.down_proj.weight = nn.Parameter(torch.zeros(64, 128, dtype=torch.int8),
                                                              requires_grad=False)  # e.g. another library's int8
    with pytest.raises(ValueError, match=r"quantize='int4' needs .*model\.layers\.1\.mlp\.down_proj\.weight is "
                                         r"torch\.int8"):
        fastlm.patch(model, quantize="int4")
    assert patch_record(model) is record
    groups_of_48 = QuantSpec(QuantFormat(4, 48), lm_head=None)  # K = 64 is no multiple of 48
    with pytest.raises(ValueError, match=r"^quantize=QuantSpec.*cannot quantize model\.layers\.0\.self_attn\.q_proj "
                                         r"\[64, 64\]: group_size \(48\) must divide"):
        fastlm.patch(build_model("arcee_gqa_bias_yarn"), quantize=groups_of_48)


def test_quantization_cannot_be_changed_or_undone():
    model = fastlm.patch(build_model("stablelm_default"), quantize="int8")
    for other in (None, "int4"):
        with pytest.raises(ValueError, match=rf"^quantize={other!r}, but this model is already quantized to int8"):
            fastlm.patch(model, quantize=other)
    with pytest.raises(ValueError, match=r"^fastlm.unpatch: this model was patched with quantize='int8'"):
        fastlm.unpatch(model)
    assert patch_record(model).quantize == "int8"


# ---- re-patching, the engine's key ------------------------------------------------------------------
def test_repatch_keeps_the_quantization_and_renews_the_engine():
    model = fastlm.patch(build_model("stablelm_hd80_qknorm_parallel"), "cpp" if fastlm.ops.backend_status(
        "cpp")[0] else "torch", quantize="int4")
    record = patch_record(model)
    want, tokens = logits(model), fastlm.generate(model, IDS[0], max_new_tokens=6, ignore_eos=True)
    first = engine_for(model, cuda_graph=False, compile=False)
    assert fastlm.patch(model, quantize="int4") is model and patch_record(model) is record  # idempotent
    assert fastlm.generate(model, IDS[0], max_new_tokens=6, ignore_eos=True, backend="torch") == tokens
    moved = patch_record(model)
    assert (moved.backend, moved.quantize, moved.quantized) == ("torch", "int4", record.quantized)
    assert moved.patch_id != record.patch_id and engine_for(model, cuda_graph=False, compile=False) is not first
    torch.testing.assert_close(logits(model), want, rtol=2e-5, atol=2e-5)
    plain = fastlm.patch(build_model("stablelm_hd80_qknorm_parallel"))
    fastlm.patch(plain, quantize="int4")  # a 16-bit patched model can be quantized later
    torch.testing.assert_close(logits(plain), want, rtol=2e-5, atol=2e-5)


# ---- state_dict -------------------------------------------------------------------------------------
def test_state_dict_holds_the_quantized_weights_and_loads_back():
    model = build_model("arcee_gqa_bias_yarn")
    hf_keys = set(model.state_dict())
    fastlm.patch(model, quantize="int8")
    sd = model.state_dict()
    names = set(patch_record(model).quantized)
    assert set(sd) == (hf_keys - {f"{n}.weight" for n in names}) | {f"{n}.{b}" for n in names
                                                                    for b in ("qweight", "scales")}
    other = fastlm.patch(build_model("arcee_gqa_bias_yarn", seed=4), quantize="int8")
    assert (logits(other) - logits(model)).abs().max() > 1e-3
    for assign in (False, True):
        clone = copy.deepcopy(other)
        clone.load_state_dict(sd, assign=assign)
        torch.testing.assert_close(logits(clone), logits(model), rtol=0, atol=0)
        assert fastlm.generate(clone, IDS[0], max_new_tokens=5) == fastlm.generate(model, IDS[0], max_new_tokens=5)


def test_16bit_state_dict_is_requantized_and_mismatches_raise():
    model = fastlm.patch(build_model("helium_gqa", dtype=torch.bfloat16), quantize="int4")
    source = build_model("helium_gqa", seed=7)  # fp32: cast to the model's bf16, then quantized
    model.load_state_dict(source.state_dict())
    want = fastlm.patch(source.to(torch.bfloat16), quantize="int4")
    torch.testing.assert_close(logits(model), logits(want), rtol=0, atol=0)
    int8 = fastlm.patch(build_model("helium_gqa"), quantize="int8").state_dict()
    with pytest.raises(RuntimeError, match=r"q_proj\.qweight is torch\.int8, but this projection is quantized to "
                                           r"int4"):
        model.load_state_dict(int8)
    both = {**want.state_dict(), "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}
    with pytest.raises(RuntimeError, match=r"both a 16-bit model\.layers\.0\.mlp\.up_proj\.weight and its quantized"):
        model.load_state_dict(both)
    wrong = {**build_model("helium_gqa").state_dict(), "model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32)}
    with pytest.raises(RuntimeError, match=r"up_proj\.weight: expected a weight of shape \(128, 64\) to quantize"):
        model.load_state_dict(wrong)


def test_to_dtype_casts_activations_only_and_autograd_runs():
    model = fastlm.patch(build_model("persimmon_qknorm"), quantize="int8")
    qkv = model.model.layers[0].self_attn.query_key_value
    qweight, scales, want = qkv.qweight.clone(), qkv.scales.clone(), logits(model)
    model.to(torch.bfloat16)
    assert qkv.qweight.dtype == torch.int8 and torch.equal(qkv.qweight, qweight) and torch.equal(qkv.scales, scales)
    got = logits(model)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.05
    model = fastlm.patch(build_model("persimmon_qknorm"), quantize="int8")
    twin = fastlm.patch(dequantized_twin(build_model("persimmon_qknorm"), "int8"))
    with torch.enable_grad():  # HF's own forward through the quantized projections (quant_linear's reference)
        out = model(IDS).logits
        out.float().square().mean().backward()
    torch.testing.assert_close(out.detach(), logits(twin), rtol=2e-5, atol=2e-5)
    assert model.model.layers[0].input_layernorm.weight.grad is not None


def test_cli_generate_quantize(capsys):
    from fastlm.engine.cli import main

    assert main(["--prompt", "The list", "--max-new-tokens", "6", "--quantize", "int4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["quantize"] == "int4" and row["resident_memory_bytes"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastlm.engine.cli import DEMO_DIR, weight_bytes

    model = fastlm.patch(AutoModelForCausalLM.from_pretrained(DEMO_DIR), quantize="int4")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    assert row["token_ids"] == fastlm.generate(model, "The list", tokenizer=tokenizer, max_new_tokens=6)
    assert row["weight_bytes"] == weight_bytes(model)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_checkpoint_file_mapping_is_released(tmp_path):
    """transformers loads a safetensors checkpoint of the same dtype as views of the file's mmap: once quantized,
    no tensor is left in it (the kept 16-bit ones are copied out), so the file's pages leave the resident set."""
    from transformers import AutoModelForCausalLM

    from fastlm.modules._quantized import _file_mappings

    build_model("helium_gqa", dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    weights = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith(weights) for line in f)

    def in_files(t) -> bool:
        return any(start <= t.data_ptr() < end for start, end in _file_mappings())

    if not (mapped() and any(in_files(p) for p in model.parameters())):
        pytest.skip("this transformers copies the checkpoint's tensors (no mmap views): nothing to release")
    fastlm.patch(model, quantize="int8")
    gc.collect()
    assert not any(in_files(t) for t in [*model.parameters(), *model.buffers()])
    assert not mapped()


def test_quality_bench_windows_score_every_token_once():
    from fastlm.bench.quality import parse_spec, windows

    for n, context in ((1000, 256), (256, 256), (300, 256), (2, 256)):
        scored = []
        for start, end, first in windows(n, context):
            assert end - start <= context and (start == 0 or first - start >= context // 2)
            scored += range(first, end)
        assert scored == list(range(1, n))
    assert parse_spec("int4") == ("int4", False)
    spec, untie = parse_spec("int4-g64+head:int8-channel")
    assert untie and spec == QuantSpec(QuantFormat(4, 64), lm_head=QuantFormat(8, 0)) and spec.name == (
        "int4-g64+lm_head:int8-channel")
    with pytest.raises(ValueError, match="a weight format is int8 or int4"):
        parse_spec("int5")


def test_session_cache_follows_the_quantized_weights():
    model = fastlm.patch(build_model("helium_gqa"), quantize="int8")
    session = fastlm.Session(model)
    seq = IDS[1].tolist()
    seq += session.generate(seq, max_new_tokens=3, ignore_eos=True)
    again = session.generate(seq, max_new_tokens=3, ignore_eos=True, return_result=True)
    assert again.extra["prefill_tokens"] < len(seq)  # the cached prefix was reused
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.qweight.neg_()  # a buffer changed in place, no Parameter
    result = session.generate(seq, max_new_tokens=4, ignore_eos=True, return_result=True)
    assert result.extra["prefill_tokens"] == len(seq)
    assert result.tokens[0] == fastlm.generate(model, seq, max_new_tokens=4, ignore_eos=True)
