"""Persimmon: LayerNorm with bias, fused head-major [H, 3, D] ``query_key_value`` (read in place),
shared qk-LayerNorm with bias, partial NeoX RoPE, h -> 4h -> relu2 -> h with biases."""
from fastlm.families._common import (AttentionSpec, MLPSpec, eager_attention_of, mlp_activation, patch_layers,
                                     rotary_dim_of)


def patch_persimmon(base_model, backend: str) -> str:
    config = base_model.config
    rotary_dim = rotary_dim_of(base_model)

    def attention_spec(attn):
        return AttentionSpec(num_heads=attn.num_heads, num_kv_heads=attn.num_heads, head_dim=attn.head_dim,
                             rotary_dim=rotary_dim, interleaved=False, qkv_head_major=True,
                             qk_norm_eps=config.layer_norm_eps, qkv_names=("query_key_value",), out_name="dense",
                             qk_norm="shared" if attn.qk_layernorm else "none", eager_fn=eager_attention_of(attn))

    mlp = MLPSpec(gated=False, up_name="dense_h_to_4h", down_name="dense_4h_to_h",
                  activation=mlp_activation(config.hidden_act, gated=False))
    return patch_layers(base_model, backend, norm_kind="layer", attention_spec=attention_spec, mlp_spec=mlp,
                        final_norm="final_layernorm")
