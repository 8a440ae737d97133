"""Fused modules: per-instance twins of the HF norm, attention, MLP and decoder-layer modules."""
from fastlm.modules._fused_storage import refresh_fused_weights
from fastlm.modules.attention import AttentionSpec, FusedAttention, patch_attention
from fastlm.modules.decoder import FusedDecoderLayer, patch_decoder_layer
from fastlm.modules.mlp import FusedMLP, MLPSpec, patch_mlp
from fastlm.modules.norm import FusedNorm, patch_norm
from fastlm.modules._quantized import PRESETS, QuantFormat, QuantizedLinear, QuantSpec

__all__ = ["AttentionSpec", "FusedAttention", "patch_attention", "FusedDecoderLayer",
           "patch_decoder_layer", "FusedMLP", "MLPSpec", "patch_mlp", "FusedNorm", "patch_norm",
           "refresh_fused_weights", "PRESETS", "QuantFormat", "QuantizedLinear", "QuantSpec"]
