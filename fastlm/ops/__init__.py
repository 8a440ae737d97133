"""fastlm's fused ops. Each op is declared once, in its own file: its plain-PyTorch reference, its one fake,
its public function (argument checks, then the backend's implementation) and its entry in the registry
(fastlm/ops/_registry.py), which maps (op, backend, device type) to a backend plugin's kernel or the reference.

Files: rms_norm (add_rms_norm), layer_norm (add_layer_norm), qkv (qkv_rope, qkv_rope_cache), activations
(swiglu, relu2 and their in-place forms), attention (decode_attention; prefill_attention, SDPA where a mask is given),
projection (linear), quantized (quant_linear: weight-only int8 / int4 linear), random (counter_uniform: the
sampler's counter-based uniforms). Each file's ``__all__`` (its public ops
and references) is re-exported here.
"""
from fastlm.errors import BackendUnavailableError
from fastlm.ops import activations, attention, layer_norm, projection, qkv, quantized, random, rms_norm
from fastlm.ops._registry import BACKEND_CHOICES, BACKENDS, OPS, backend_status, dispatch, has_impl, impl, resolve
from fastlm.ops.activations import *  # noqa: F401,F403
from fastlm.ops.attention import *  # noqa: F401,F403
from fastlm.ops.layer_norm import *  # noqa: F401,F403
from fastlm.ops.projection import *  # noqa: F401,F403
from fastlm.ops.qkv import *  # noqa: F401,F403
from fastlm.ops.quantized import *  # noqa: F401,F403
from fastlm.ops.random import *  # noqa: F401,F403
from fastlm.ops.rms_norm import *  # noqa: F401,F403

__all__ = ["BACKENDS", "BACKEND_CHOICES", "BackendUnavailableError", "OPS", "backend_status", "dispatch", "has_impl",
           "impl", "resolve"]
for _module in (rms_norm, layer_norm, qkv, activations, attention, projection, quantized, random):
    __all__ += _module.__all__
