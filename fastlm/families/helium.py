"""Helium: Llama layout, RMSNorm (weight applied in fp32, one rounding), interleaved (GPT-J) RoPE, SwiGLU."""
from fastlm.families._common import patch_llama_layout


def patch_helium(base_model, backend: str) -> str:
    return patch_llama_layout(base_model, backend, interleaved=True, gated=True, rms_weight_in_fp32=True)
