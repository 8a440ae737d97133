"""``fastlm.patch(model)``: swap a loaded ``transformers`` model's modules for fastlm's fused twins.

In place and per instance (the ``transformers`` classes are never touched), idempotent and
reversible with :func:`unpatch`. The fused path runs when autograd is off (``torch.no_grad`` /
``inference_mode``, as ``generate()`` does); with autograd on, each patched module runs HF's own
forward, so training and gradients are exactly HF's.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch.nn as nn

from fastlm.errors import UnsupportedModelError
from fastlm.families import FAMILY_ADAPTERS
from fastlm.modules import refresh_fused_weights
from fastlm.modules._quantized import apply_quantization, parse_quantize, quantization_plan, release_freed_memory
from fastlm.modules._swap import restore_class, retarget
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
    quantize: str | None = None  # "int8" / "int4" (QuantSpec.name), None: 16-bit weights
    quantized: tuple[str, ...] = ()  # the quantized projections' module names (from the top model)


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


def patch(model: nn.Module, backend: str = "auto", quantize=None) -> nn.Module:
    """Swap in fused modules for ``backend`` (auto, torch, triton, cpp). Returns ``model``.

    ``quantize="int8"`` or ``"int4"``: weight-only quantization, in place (fastlm.modules._quantized). The
    projections of attention (q/k/v, o) and MLP (gate/up, down), and an untied ``lm_head``, are quantized and
    their 16-bit weights freed; the embedding table (a tied ``lm_head`` with it) and the norms stay as they
    are. It cannot be undone (:func:`unpatch` refuses): re-patching keeps it (``quantize`` must then name the
    same format), and changing it means loading the model again.

    Raises :class:`fastlm.UnsupportedModelError` for a model outside the four families,
    :class:`fastlm.BackendUnavailableError` when an explicitly named backend cannot run here, and one
    ValueError naming ``quantize`` for a bad ``quantize`` (the model then is left as it was)."""
    _check_module(model, "patch")
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    spec = parse_quantize(quantize)
    base, model_type = _base_model(model)
    param = next(model.parameters(), None)
    concrete = resolve(backend, param.device.type if param is not None else "cpu")  # fail now, not mid-forward
    record = patch_record(model)
    wanted = None if spec is None else spec.name
    if record is not None and record.quantize is not None and wanted != record.quantize:
        raise ValueError(f"quantize={quantize!r}, but this model is already quantized to {record.quantize} (its "
                         f"16-bit weights were freed at that patch): pass quantize={record.quantize!r} to re-patch "
                         "it, or load the model again to change the quantization")
    # Checked on every projection before anything changes: a bad model or format leaves the model as it was.
    plan = quantization_plan(model, spec, quantize) if spec is not None and wanted != getattr(
        record, "quantize", None) else None
    if record is not None:
        if record.backend == concrete and record.quantize == wanted:
            refresh_fused_weights(model)  # re-fuse what was replaced since (a no-op when nothing was)
            return model
        if record.quantize is not None:  # the same quantization on another backend: keep the quantized weights
            _retarget(model, concrete)
            base.__dict__[_RECORD_ATTR] = replace(record, requested=backend, backend=concrete,
                                                  patch_id=next(_PATCH_IDS))
            return model
        unpatch(model)
    # Quantized before the fused modules are built, so they fuse the quantized weights: no fused 16-bit copy.
    quantized = () if plan is None else apply_quantization(plan, concrete)
    final_norm = FAMILY_ADAPTERS[model_type](base, concrete)
    if plan is not None:
        release_freed_memory(model)  # the 16-bit weights, and the per-linear buffers the fused modules replaced
    base.__dict__[_RECORD_ATTR] = PatchRecord(backend, concrete, next(_PATCH_IDS), final_norm, wanted, quantized)
    return model


def _retarget(model: nn.Module, backend: str) -> None:
    """Point every fused module of a patched model at ``backend`` (what a quantized model gets instead of
    unpatch + patch, which would need the freed 16-bit weights)."""
    for module in model.modules():
        retarget(module, backend)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the HF modules (bit-identical behaviour; Parameters get their own storage back). A quantized
    model cannot be restored (its 16-bit weights are gone): ValueError."""
    _check_module(model, "unpatch")
    base = getattr(model, "base_model", model)
    record = patch_record(model)
    if record is not None and record.quantize is not None:
        raise ValueError(f"fastlm.unpatch: this model was patched with quantize={record.quantize!r} and its 16-bit "
                         "weights were freed then: it cannot be restored to the HF modules; load it again")
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


def patch_quantization(model: nn.Module) -> str | None:
    """The quantization ``patch()`` applied to ``model`` ("int8", "int4"), or None (16-bit weights or unpatched)."""
    record = patch_record(model)
    return None if record is None else record.quantize
