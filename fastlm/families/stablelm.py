"""StableLM: LayerNorm with bias, partial NeoX RoPE, optional per-head qk-LayerNorm, SwiGLU,
sequential or parallel residual."""
from fastlm.families._common import (AttentionSpec, MLPSpec, eager_attention_of, mlp_activation, patch_layers,
                                     rotary_dim_of)


def patch_stablelm(base_model, backend: str) -> str:
    config = base_model.config
    rotary_dim = rotary_dim_of(base_model)

    def attention_spec(attn):
        return AttentionSpec(num_heads=attn.num_heads, num_kv_heads=attn.num_key_value_heads,
                             head_dim=attn.head_dim, rotary_dim=rotary_dim, interleaved=False,
                             qkv_head_major=False, qk_norm_eps=config.layer_norm_eps,
                             qk_norm="per_head" if attn.qk_layernorm else "none", eager_fn=eager_attention_of(attn))

    mlp = MLPSpec(gated=True, up_name="up_proj", down_name="down_proj",
                  activation=mlp_activation(config.hidden_act, gated=True))
    return patch_layers(base_model, backend, norm_kind="layer", attention_spec=attention_spec, mlp_spec=mlp,
                        final_norm="norm", parallel_residual=bool(config.use_parallel_residual))
