"""Arcee (AFM): Llama layout, RMSNorm (weight applied after the cast), full NeoX RoPE, up -> relu2 -> down."""
from fastlm.families._common import (AttentionSpec, MLPSpec, eager_attention_of, mlp_activation, patch_layers,
                                     rotary_dim_of)


def patch_arcee(base_model, backend: str) -> None:
    config = base_model.config
    rotary_dim = rotary_dim_of(base_model)

    def attention_spec(attn):
        return AttentionSpec(num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                             head_dim=attn.head_dim, rotary_dim=rotary_dim, interleaved=False,
                             per_head_layout=False, eager_fn=eager_attention_of(attn))

    mlp = MLPSpec(gated=False, up_name="up_proj", down_name="down_proj",
                  activation=mlp_activation(config.hidden_act, gated=False))
    patch_layers(base_model, backend, norm_kind="rms", attention_spec=attention_spec, mlp_spec=mlp,
                 final_norm="norm", rms_weight_in_fp32=False)
