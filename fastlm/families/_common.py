"""Helpers the family adapters share: walk the layers, build specs, swap in the fused modules."""
from __future__ import annotations

import sys

from fastlm.modules import AttentionSpec, MLPSpec, patch_attention, patch_decoder_layer, patch_mlp, patch_norm


def rotary_dim_of(base_model) -> int:
    """Rotated dims per head, read off the model's own rotary table (``inv_freq`` has rotary_dim/2
    entries for every rope_type), so partial_rotary_factor and head_dim quirks need no re-derivation."""
    return 2 * base_model.rotary_emb.inv_freq.numel()


def eager_attention_of(attn) -> object:
    """The family's own ``eager_attention_forward`` (used when config._attn_implementation == "eager")."""
    return getattr(sys.modules[type(attn).__module__], "eager_attention_forward")


def mlp_activation(hidden_act: str, gated: bool) -> str:
    if gated and hidden_act in ("silu", "swish"):
        return "silu"
    if not gated and hidden_act == "relu2":
        return "relu2"
    return "other"


def patch_layers(base_model, backend: str, *, norm_kind: str, attention_spec, mlp_spec: MLPSpec,
                 final_norm: str, rms_weight_in_fp32: bool = False, parallel_residual: bool = False) -> str:
    """Swap every decoder layer's norms, attention, MLP and the layer itself, then the final norm.
    ``attention_spec(attn) -> AttentionSpec`` builds each layer's (identical) spec. Returns ``final_norm``
    (kept in the model's fastlm.patching.PatchRecord)."""
    for layer in base_model.layers:
        patch_norm(layer.input_layernorm, norm_kind, backend, rms_weight_in_fp32)
        if layer.post_attention_layernorm is not None:
            patch_norm(layer.post_attention_layernorm, norm_kind, backend, rms_weight_in_fp32)
        patch_attention(layer.self_attn, attention_spec(layer.self_attn), backend)
        patch_mlp(layer.mlp, mlp_spec, backend)
        patch_decoder_layer(layer, parallel_residual)
    patch_norm(getattr(base_model, final_norm), norm_kind, backend, rms_weight_in_fp32)
    return final_norm


def patch_llama_layout(base_model, backend: str, *, interleaved: bool, gated: bool,
                       rms_weight_in_fp32: bool) -> str:
    """Arcee and Helium share Llama's layout (RMSNorm, separate q/k/v/o with GQA, full-head RoPE,
    ``model.norm``); they differ in the RoPE pairing, the MLP and the RMSNorm cast order."""
    config = base_model.config
    rotary_dim = rotary_dim_of(base_model)

    def attention_spec(attn):
        return AttentionSpec(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                             head_dim=attn.head_dim, rotary_dim=rotary_dim, interleaved=interleaved,
                             qkv_head_major=False, eager_fn=eager_attention_of(attn))

    mlp = MLPSpec(gated=gated, up_name="up_proj", down_name="down_proj",
                  activation=mlp_activation(config.hidden_act, gated=gated))
    return patch_layers(base_model, backend, norm_kind="rms", attention_spec=attention_spec, mlp_spec=mlp,
                        final_norm="norm", rms_weight_in_fp32=rms_weight_in_fp32)


__all__ = ["patch_llama_layout", "AttentionSpec", "MLPSpec", "rotary_dim_of", "eager_attention_of", "mlp_activation",
           "patch_layers"]
