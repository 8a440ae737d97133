"""fastlm's fused ops: one file per op, each holding its plain-PyTorch reference and the public function."""
from fastlm.ops._backend import BACKEND_CHOICES, BACKENDS, BackendUnavailableError, backend_status, resolve
from fastlm.ops.activations import relu2, relu2_, swiglu, swiglu_
from fastlm.ops.attention import decode_attention, prefill_attention
from fastlm.ops.layer_norm import add_layer_norm
from fastlm.ops.linear import linear
from fastlm.ops.quant_linear import dequantize_weight, quant_linear, quantize_weight
from fastlm.ops.qkv_rope import qkv_rope, qkv_rope_cache
from fastlm.ops.rms_norm import add_rms_norm

__all__ = ["BACKENDS", "BACKEND_CHOICES", "BackendUnavailableError", "backend_status", "resolve", "add_rms_norm",
           "add_layer_norm", "qkv_rope", "qkv_rope_cache", "swiglu", "swiglu_", "relu2", "relu2_",
           "decode_attention",
           "prefill_attention", "linear", "quant_linear", "quantize_weight", "dequantize_weight"]
