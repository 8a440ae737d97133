"""In-place, per-instance module swapping.

fastlm turns an HF module into its fused twin by giving the *instance* a new class: a subclass of
both the fused mixin and the module's own HF class, built once per HF class. Why a class swap and
not a new module in the tree:

* ``isinstance(m, ArceeDecoderLayer)`` keeps holding, so ``transformers``' output-capture hooks
  (``output_hidden_states``, ``output_attentions``) still find the layers;
* the submodules and Parameters stay where they are, so ``state_dict`` keys do not move;
* the HF ``transformers`` classes themselves are never modified: other models in the process are
  untouched, and ``unpatch`` just restores ``__class__``.
"""
from __future__ import annotations

import torch.nn as nn

_FUSED_CLASSES: dict[tuple[type, type], type] = {}
ORIG_CLASS_ATTR = "_fastlm_orig_class"


def swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the class ``(mixin, type(module))``; remembers the original for :func:`restore_class`."""
    base = type(module)
    key = (mixin, base)
    cls = _FUSED_CLASSES.get(key)
    if cls is None:
        cls = type(f"Fastlm{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
        _FUSED_CLASSES[key] = cls
    module.__dict__[ORIG_CLASS_ATTR] = base
    module.__class__ = cls


def swap_in(module: nn.Module, mixin: type, **state) -> None:
    """Swap ``module`` to its fused twin, set its ``_fastlm_<name>`` state, then fuse its weights."""
    swap_class(module, mixin)
    for name, value in state.items():
        module.__dict__[f"_fastlm_{name}"] = value
    fuse = getattr(module, "_fastlm_fuse", None)
    if fuse is not None:
        fuse()


def retarget(module: nn.Module, backend: str) -> bool:
    """Point a fused module that names a backend at ``backend`` and re-fuse it (the attention's epilogue
    records its backend); False for a module that is not one."""
    if "_fastlm_backend" not in module.__dict__:
        return False
    module.__dict__["_fastlm_backend"] = backend
    fuse = getattr(module, "_fastlm_fuse", None)
    if fuse is not None:
        fuse()
    return True


def restore_class(module: nn.Module) -> bool:
    """Undo :func:`swap_in`: unfuse the weights (each Parameter gets its own storage), restore the class."""
    if ORIG_CLASS_ATTR not in module.__dict__:
        return False
    unfuse = getattr(module, "_fastlm_unfuse", None)
    if unfuse is not None:
        unfuse()
    base = module.__dict__.pop(ORIG_CLASS_ATTR)
    module.__class__ = base
    for name in [k for k in module.__dict__ if k.startswith("_fastlm_")]:
        del module.__dict__[name]
    return True

