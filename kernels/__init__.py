"""fastlm's Triton backend (installed as ``fastlm.kernels``; never a top-level ``kernels`` package).

Importing this module registers, for each fused op, a ``fastlm::triton_<op>`` torch.library op (with a
fake implementation) and the backend-table entry ``fastlm.ops._backend.register("<op>", "triton")``
whose signature is the op's ``*_ref`` signature. Kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported; otherwise they raise a clear RuntimeError.

One file per op family: ``norm`` (add + RMSNorm / LayerNorm), ``qkv_rope`` (QKV epilogue),
``activations`` (swiglu, relu2), ``decode_attention`` (split-K decode over a static cache), ``quant_linear``
(weight-only int8 / int4 projections).
``python -m fastlm.kernels.resources`` prints every kernel's registers, spills and shared memory as
compiled for sm_80/86/89/90 at the families' launch shapes (no GPU needed). CUDA tensors under the
interpreter are refused: it would copy every storage to the host per launch.
"""
from __future__ import annotations

# Imported as a top-level ``kernels`` (the source tree's root on sys.path: transformers imports a package
# of that name to probe for Hugging Face's ``kernels``), this file must define nothing: a second copy of
# the modules would register the fastlm::triton_* ops again, over this package's. Without a version,
# transformers treats it as absent.
if __name__ == "fastlm.kernels":
    from fastlm.ops._backend import register

    from . import activations, decode_attention, norm, qkv_rope, quant_linear
    from ._utils import INTERPRET, USE_TRITON_OP, check_device

    _ENTRY_POINTS = {
        "add_rms_norm": norm.add_rms_norm,
        "add_layer_norm": norm.add_layer_norm,
        "qkv_rope": qkv_rope.qkv_rope,
        "qkv_rope_cache": qkv_rope.qkv_rope_cache,
        "swiglu": activations.swiglu,
        "relu2": activations.relu2,
        "swiglu_": activations.swiglu_,
        "relu2_": activations.relu2_,
        "decode_attention": decode_attention.decode_attention,
        "quant_linear": quant_linear.quant_linear,
    }
    for _op, _fn in _ENTRY_POINTS.items():
        register(_op, "triton")(_fn)

    __all__ = ["INTERPRET", "USE_TRITON_OP", "check_device", "activations", "decode_attention", "norm", "qkv_rope",
               "quant_linear"]
