"""The one table of benchmark sizes: each family's real checkpoint (the config values that set a size),
and every benchmark size derived from it.

* Kernel and attention shapes are read off the fused modules ``fastlm.patch`` builds for that config
  (on the meta device: nothing is allocated), so a case calls an op exactly as the patched model does.
* End-to-end models: the checkpoint's own size on CUDA; on CPU the same layer scaled to about 100M
  parameters (same head_dim, query heads per KV head, rotary fraction, MLP ratio, norms and options);
  test-sized for the smoke tests (``tiny``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Shape-setting values of each checkpoint's config.json (RoPE theta and scaling change no size).
CHECKPOINTS = {
    "arcee": ("arcee-ai/AFM-4.5B", dict(
        hidden_size=2560, intermediate_size=18432, num_hidden_layers=36, num_attention_heads=20,
        num_key_value_heads=4, head_dim=128, vocab_size=128004, hidden_act="relu2", rms_norm_eps=1e-5)),
    "stablelm": ("stabilityai/stablelm-2-1_6b", dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=100352, hidden_act="silu", layer_norm_eps=1e-5,
        partial_rotary_factor=0.25, use_qkv_bias=True, qk_layernorm=False, use_parallel_residual=False)),
    "persimmon": ("adept/persimmon-8b-base", dict(
        hidden_size=4096, intermediate_size=16384, num_hidden_layers=36, num_attention_heads=64,
        vocab_size=262144, hidden_act="relu2", layer_norm_eps=1e-5, partial_rotary_factor=0.5,
        qk_layernorm=True)),
    # Helium: the config transformers documents (HeliumConfig's defaults, kyutai/helium-1-preview)
    "helium": ("kyutai/helium-1-preview-2b", dict(
        hidden_size=2560, intermediate_size=7040, num_hidden_layers=24, num_attention_heads=20,
        num_key_value_heads=20, head_dim=128, vocab_size=48000, hidden_act="silu", rms_norm_eps=1e-8)),
}
FAMILIES = tuple(CHECKPOINTS)

# An option the adapters support that the checkpoints above leave off gets its own kernel cases, so its
# kernel path is measured too: (family, label, config overrides, the ops it changes).
OPTIONS = (("stablelm", "qk-norm", dict(qk_layernorm=True), ("qkv_rope", "qkv_rope_cache")),)  # as StableLM-2-12B

CPU_MODEL_PARAMS = 100e6


def checkpoint(family: str) -> str:
    return CHECKPOINTS[family][0]


def make_config(family: str, sizes: dict):
    """The ``transformers`` config for ``sizes`` (untied embeddings; eos disabled, so generation runs the
    full number of tokens)."""
    from transformers import ArceeConfig, HeliumConfig, PersimmonConfig, StableLmConfig

    cls = {"arcee": ArceeConfig, "stablelm": StableLmConfig, "persimmon": PersimmonConfig,
           "helium": HeliumConfig}[family]
    kw = dict(sizes)
    kw.setdefault("max_position_embeddings", 4096)
    return cls(pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False, **kw)


def meta_model(family: str, sizes: dict):
    """The model on the meta device: shapes and parameter counts, nothing allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(make_config(family, sizes), attn_implementation="sdpa")


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _layers_for(family: str, sizes: dict, params: float) -> int:
    """Decoder layers that bring a model of ``sizes`` to about ``params`` parameters (counted on meta)."""
    one, two = (num_params(meta_model(family, dict(sizes, num_hidden_layers=n))) for n in (1, 2))
    per_layer = two - one
    return max(1, round((params - (one - per_layer)) / per_layer))


def _scaled(family: str, *, width: int, vocab: int, head_dim: int | None = None, layers: int | None = None,
            params: float = CPU_MODEL_PARAMS) -> dict:
    """The checkpoint's layer at about ``width`` hidden units: its head_dim (or ``head_dim``), query heads
    per KV head, rotary fraction, MLP ratio and options; ``layers`` layers, or as many as make ``params``."""
    real = CHECKPOINTS[family][1]
    heads = real["num_attention_heads"]
    group = heads // real.get("num_key_value_heads", heads)
    dim = head_dim or real.get("head_dim") or real["hidden_size"] // heads
    kv_heads = max(1, round(width / (dim * group)))
    hidden = kv_heads * group * dim
    sizes = dict(real, hidden_size=hidden, num_attention_heads=kv_heads * group, vocab_size=vocab,
                 intermediate_size=16 * round(hidden * real["intermediate_size"] / real["hidden_size"] / 16))
    if "num_key_value_heads" in real:
        sizes["num_key_value_heads"] = kv_heads
    if "head_dim" in real:
        sizes["head_dim"] = dim
    sizes["num_hidden_layers"] = layers or _layers_for(family, sizes, params)
    return sizes


@functools.lru_cache(maxsize=None)
def _sizes(family: str, kind: str) -> tuple:
    if kind == "real":
        sizes = dict(CHECKPOINTS[family][1])
    elif kind == "tiny":
        sizes = _scaled(family, width=64, head_dim=16, vocab=256, layers=2)
    else:
        sizes = _scaled(family, width=768, vocab=32000)
    return tuple(sizes.items())


def model_sizes(family: str, scale: str, device_type: str) -> dict:
    """HF config values of the end-to-end model: the checkpoint's on CUDA, ~100M parameters on CPU, or
    test-sized (``tiny``)."""
    kind = "tiny" if scale == "tiny" else "real" if device_type == "cuda" else "cpu"
    return dict(_sizes(family, kind))


def layer_sizes(family: str, scale: str) -> dict:
    """HF config values the kernel and attention shapes come from: the checkpoint's, or test-sized."""
    return dict(_sizes(family, "tiny" if scale == "tiny" else "real"))


def build_model(family: str, sizes: dict, device, dtype, seed: int = 0):
    """A random-weight ``*ForCausalLM`` in eval mode (SDPA attention, greedy, eos disabled)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, sizes), attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    return model


@dataclass(frozen=True)
class Projection:
    """One of a layer's weight GEMMs as the fused modules call fastlm's ``linear``."""
    name: str          # qkv, o, gate_up / up, down
    out_features: int
    in_features: int
    bias: bool
    residual: bool     # the residual add is folded into it (the MLP's down projection)


@dataclass(frozen=True, eq=False)
class Layer:
    """One decoder layer as ``fastlm.patch`` builds it for a config."""
    family: str
    variant: str               # the family, or "<family>:<option>"
    hidden: int
    norm: str                  # "rms" or "layer"
    norm_eps: float
    rms_weight_in_fp32: bool
    attention: object          # the adapter's AttentionSpec
    mlp: object                # the adapter's MLPSpec
    intermediate: int
    projections: tuple[Projection, ...]
    only_ops: tuple[str, ...] | None = None  # an option's variant: the ops it changes (None: every op)


def _stale(what: str, module) -> RuntimeError:
    return RuntimeError(f"fastlm.patch left no {what} on {type(module).__name__}: fastlm.bench.configs.layer reads "
                        "the fused modules' state and needs updating")


def _fused(module, cls):
    """``module`` as the fused module ``cls`` that patch() must have made of it."""
    if not isinstance(module, cls):
        raise _stale(cls.__name__, module)
    return module


def _projection(name: str, linears: list, residual: bool = False) -> Projection:
    """``linears`` fused into one GEMM (q/k/v, gate/up) as the fused modules hold them."""
    return Projection(name, sum(m.out_features for m in linears), linears[0].in_features,
                      linears[0].bias is not None, residual)


def patched_layer(family: str, sizes: dict, variant: str | None = None, only_ops=None) -> Layer:
    """The specs the family adapter builds for ``sizes``: a one-layer model on the meta device, patched
    with the reference backend."""
    import fastlm
    from fastlm.modules import FusedAttention, FusedMLP, FusedNorm

    model = fastlm.patch(meta_model(family, dict(sizes, num_hidden_layers=1)), "torch")
    block = model.base_model.layers[0]
    attn, mlp, norm = block.self_attn, block.mlp, block.post_attention_layernorm
    attention, mlp_spec = _fused(attn, FusedAttention).fused_spec(), _fused(mlp, FusedMLP).fused_spec()
    qkv = [getattr(attn, n) for n in attention.qkv_names]
    up = getattr(mlp, mlp_spec.up_name)
    projections = (_projection("qkv", qkv), _projection("o", [getattr(attn, attention.out_name)]),
                   _projection("gate_up", [getattr(mlp, mlp_spec.gate_name), up]) if mlp_spec.gated
                   else _projection("up", [up]),
                   _projection("down", [getattr(mlp, mlp_spec.down_name)], residual=True))
    layer_norm = isinstance(norm, torch.nn.LayerNorm)
    return Layer(family, variant or family, sizes["hidden_size"], "layer" if layer_norm else "rms",
                 norm.eps if layer_norm else norm.variance_epsilon, _fused(norm, FusedNorm).fused_weight_in_fp32,
                 attention, mlp_spec, up.out_features, projections, only_ops)


@functools.lru_cache(maxsize=None)
def layer(family: str, scale: str, option: str | None = None) -> Layer:
    """The kernel shapes' layer: the checkpoint's (or test-sized), or its ``option`` variant (:data:`OPTIONS`)."""
    sizes = layer_sizes(family, scale)
    if option is None:
        return patched_layer(family, sizes)
    _, _, overrides, only_ops = next(o for o in OPTIONS if o[:2] == (family, option))
    return patched_layer(family, {**sizes, **overrides}, f"{family}:{option}", only_ops)


def layers(scale: str) -> list[Layer]:
    """Every family's layer, then each option's."""
    return [layer(f, scale) for f in FAMILIES] + [layer(f, scale, o) for f, o, _, _ in OPTIONS]


def random_ids(batch: int, seq: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g).to(device)


def describe(family: str, sizes: dict, params: int) -> str:
    """One line for the summary: where the model's sizes come from and what they are."""
    heads = sizes["num_attention_heads"]
    return (f"{params / 1e6:.0f}M params (from {checkpoint(family)}), hidden {sizes['hidden_size']}, "
            f"{sizes['num_hidden_layers']} layers, heads {heads}/{sizes.get('num_key_value_heads', heads)} (q/kv), "
            f"vocab {sizes['vocab_size']}")
