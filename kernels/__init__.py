"""fastlm's Triton kernels (installed as ``fastlm.kernels``; never a top-level ``kernels`` package).

The source of the Triton backend, whose plugin module is fastlm/backends/triton.py. Each op's kernel is
a ``fastlm::triton_<op>`` torch.library op (its fake is the op's own, registered by the op registry)
and an entry point with the reference's signature. Kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported; otherwise they raise a clear RuntimeError.

One file per op family: ``norm`` (add + RMSNorm / LayerNorm), ``qkv_rope`` (QKV epilogue),
``activations`` (swiglu, relu2), ``decode_attention`` (split-K decode over a static cache), ``quant_linear``
(weight-only int8 / int4 projections).
``python -m fastlm.kernels.resources`` prints every kernel's registers, spills and shared memory as
compiled for sm_80/86/89/90 at the families' launch shapes (no GPU needed). CUDA tensors under the
interpreter are refused: it would copy every storage to the host per launch.
"""
from __future__ import annotations

# Imported as a top-level ``kernels`` (the source tree's root on sys.path, e.g. ``python`` run from a clone), this
# folder shadows Hugging Face's ``kernels`` package, which transformers >= 5.25 requires and imports while it loads
# (``from kernels import LayerRepository, ...``). So this file then loads the next ``kernels`` on sys.path in its
# place, and defines nothing of its own where there is none: a second copy of the modules would register the
# fastlm::triton_* ops again, over this package's. Without a version, transformers treats this folder as absent.
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _others = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _others)
    if _spec is not None and _spec.loader is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # `import kernels` returns what sys.modules holds once this file ran
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            _sys.modules.pop("kernels", None)
            raise
    del _machinery, _util, _os, _sys, _root, _others, _spec

if __name__ == "fastlm.kernels":
    from . import activations, decode_attention, norm, qkv_rope, quant_linear
    from ._utils import INTERPRET, USE_TRITON_OP, check_device

    __all__ = ["INTERPRET", "USE_TRITON_OP", "check_device", "activations", "decode_attention", "norm", "qkv_rope",
               "quant_linear"]
