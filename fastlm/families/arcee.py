"""Arcee (AFM): Llama layout, RMSNorm (weight applied after the cast), full NeoX RoPE, up -> relu2 -> down."""
from fastlm.families._common import patch_llama_layout


def patch_arcee(base_model, backend: str) -> str:
    return patch_llama_layout(base_model, backend, interleaved=False, gated=False, rms_weight_in_fp32=False)
