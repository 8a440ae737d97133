"""``fastlm.patch(model)``: swap a loaded ``transformers`` model's modules for fastlm's fused twins.

In place and per instance (the ``transformers`` classes are never touched), idempotent and
reversible with :func:`unpatch`. The fused path runs when autograd is off (``torch.no_grad`` /
``inference_mode``, as ``generate()`` does); with autograd on, each patched module runs HF's own
forward, so training and gradients are exactly HF's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch.nn as nn

from fastlm.errors import UnsupportedModelError
from fastlm.families import FAMILY_ADAPTERS
from fastlm.modules import refresh_fused_weights
from fastlm.modules._swap import restore_class
from fastlm.ops._registry import BACKEND_CHOICES, resolve

SUPPORTED_MODEL_TYPES = tuple(FAMILY_ADAPTERS)
_RECORD_ATTR = "_fastlm_patch"
_PATCH_IDS = itertools.count(1)


@dataclass(frozen=True)
class PatchRecord:
    """What ``patch()`` put in place, stored on the base model (read with :func:`patch_record`)."""

    requested: str   # the backend asked for ("auto" included)
    backend: str     # the concrete backend the fused modules run (auto resolved once, at patch time)
    patch_id: int    # unique to this patch(): what the engine's cache keys on (never id() of a tensor)
    final_norm: str  # the base model's attribute holding the final norm


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlm.{fn}: model must be a torch.nn.Module (a transformers model), "
                        f"got {type(model).__name__}")


def _base_model(model: nn.Module):
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_ADAPTERS:
        got = f"model_type {model_type!r}" if config is not None else f"a {type(model).__name__} with no HF config"
        raise UnsupportedModelError(
            f"fastlm.patch does not support {got} ({type(model).__name__}); supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Arcee, StableLM, Persimmon, Helium)")
    base = getattr(model, "base_model", model)
    if not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder stack fastlm recognises "
                                    f"(expected .layers and .rotary_emb on its base model)")
    return base, model_type


def patch_record(model: nn.Module) -> PatchRecord | None:
    """The :class:`PatchRecord` of a patched model, or None."""
    return getattr(model, "base_model", model).__dict__.get(_RECORD_ATTR)


def is_patched(model: nn.Module) -> bool:
    _check_module(model, "is_patched")
    return patch_record(model) is not None


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap in fused modules for ``backend`` (auto, torch, triton, cpp). Returns ``model``.

    Raises :class:`fastlm.UnsupportedModelError` for a model outside the four families and
    :class:`fastlm.BackendUnavailableError` when an explicitly named backend cannot run here."""
    _check_module(model, "patch")
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    base, model_type = _base_model(model)
    param = next(model.parameters(), None)
    concrete = resolve(backend, param.device.type if param is not None else "cpu")  # fail now, not mid-forward
    record = patch_record(model)
    if record is not None:
        if record.backend == concrete:
            refresh_fused_weights(model)  # re-fuse what was replaced since (a no-op when nothing was)
            return model
        unpatch(model)
    final_norm = FAMILY_ADAPTERS[model_type](base, concrete)
    base.__dict__[_RECORD_ATTR] = PatchRecord(backend, concrete, next(_PATCH_IDS), final_norm)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the HF modules (bit-identical behaviour; Parameters get their own storage back)."""
    _check_module(model, "unpatch")
    base = getattr(model, "base_model", model)
    for module in base.modules():
        restore_class(module)
    base.__dict__.pop(_RECORD_ATTR, None)
    return model


def patch_id(model: nn.Module) -> int | None:
    """A number unique to the ``patch()`` that put the current fused modules in place (None: unpatched)."""
    record = patch_record(model)
    return None if record is None else record.patch_id


def patched_backend(model: nn.Module) -> str | None:
    """The concrete backend ``model``'s fused modules run, or None."""
    record = patch_record(model)
    return None if record is None else record.backend
