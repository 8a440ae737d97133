"""The one place the op tests take fastlm's names from.

The op tests import fastlm only through this module: the public ops and their references (all re-exported
by fastlm.ops), the op registry (``BACKENDS``, ``backend_status``, ``impl(op, backend, device_type)``),
the in-place overlap message (fastlm/_checks.py), the torch.library op each kernel backend registers, the
quantized weight format (fastlm/ops/quantized.py) and the families' real configs.
"""
from __future__ import annotations

import torch

from fastlm._checks import INTERNAL_OVERLAP_MESSAGE  # noqa: F401
from fastlm.bench.configs import CHECKPOINTS  # noqa: F401  (shape-setting config.json values per family)
from fastlm.errors import BackendUnavailableError  # noqa: F401
# fp16 prefill attention on CPU: fp32 SDPA where the CPU has no native fp16 dot products (fastlm.ops.attention)
from fastlm.ops.attention import _cpu_fp16_widens as cpu_fp16_sdpa_widens  # noqa: F401,E402
from fastlm.ops import (BACKENDS, OPS, add_layer_norm, add_layer_norm_ref, add_rms_norm, add_rms_norm_ref,  # noqa: F401
                        backend_status, counter_uniform, counter_uniform_ref, decode_attention, decode_attention_ref,
                        dequantize_weight, dispatch, impl, linear, linear_ref, prefill_attention,
                        prefill_attention_ref, qkv_rope, qkv_rope_cache, qkv_rope_cache_ref, qkv_rope_ref,
                        quant_linear, quant_linear_ref, quantize_weight, relu2, relu2_, relu2_inplace_ref, relu2_ref,
                        swiglu, swiglu_, swiglu_inplace_ref, swiglu_ref)
from fastlm.ops._registry import backend_module
from fastlm.ops.quantized import DEFAULT_GROUP_SIZE, resolve_group_size  # noqa: F401


def qkv_rope_reference(qkv, cos, sin, *, num_heads, num_kv_heads, head_dim, rotary_dim, interleaved=False,
                       qkv_head_major=False, q_norm_weight=None, q_norm_bias=None, k_norm_weight=None,
                       k_norm_bias=None, qk_norm_eps=1e-5):
    """qkv_rope_ref called with the public op's keywords (any float dtype, fp64 included)."""
    return qkv_rope_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads, num_kv_heads,
                        head_dim, rotary_dim, bool(interleaved), bool(qkv_head_major), qk_norm_eps)


def qkv_rope_cache_reference(qkv, cos, sin, k_cache, v_cache, cache_positions, *, num_heads, num_kv_heads, head_dim,
                             rotary_dim, interleaved=False, qkv_head_major=False, q_norm_weight=None,
                             q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm_eps=1e-5):
    """qkv_rope_cache_ref called with the public op's keywords."""
    return qkv_rope_cache_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                              cache_positions, num_heads, num_kv_heads, head_dim, rotary_dim, bool(interleaved),
                              bool(qkv_head_major), qk_norm_eps)


# ------------------------------------------------------------------------------ registered torch ops

# The public ops each kernel backend has a kernel of its own for on CPU tensors (the C++ CPU kernels; the
# Triton kernels under the interpreter), each through a torch.library op that opcheck runs on
KERNEL_OPS = {
    "cpp": ("add_rms_norm", "add_layer_norm", "qkv_rope", "qkv_rope_cache", "swiglu", "relu2", "swiglu_", "relu2_",
            "decode_attention", "linear", "quant_linear", "prefill_attention", "counter_uniform"),
    "triton": ("add_rms_norm", "add_layer_norm", "qkv_rope", "qkv_rope_cache", "swiglu", "relu2", "swiglu_",
               "relu2_", "decode_attention", "quant_linear"),
}


def registered_ops(backend: str) -> tuple:
    return KERNEL_OPS.get(backend, ())


def registered_op(backend: str, op: str):
    """The torch.library OpOverload that ``backend`` registers for the public op ``op``, with its fake (the
    registry registers the op's fake when it loads the backend)."""
    ok, why = backend_status(backend, "cpu")  # loads the plugin
    module = backend_module(backend) if backend != "torch" else None
    if module is None or op not in module.LIBRARY_OPS:
        raise ValueError(f"backend {backend!r} registers no torch op for {op!r} ({why})")
    namespace, name = module.LIBRARY_OPS[op].split("::")
    return getattr(getattr(torch.ops, namespace), name).default
