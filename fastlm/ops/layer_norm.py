"""add + LayerNorm: ``h = x + residual; y = layer_norm(h, weight, bias)``, returning ``(y, h)``.

Matches ``torch.nn.LayerNorm`` (StableLM, Persimmon): fp32 mean/variance (biased), weight and
optional bias applied in fp32, one rounding to the model dtype. ``h`` is rounded to the model dtype
before the statistics, as HF's separate residual add does. Bytes: like add_rms_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm._checks import as_real, check_norm_args, device_of
from fastlm.ops._registry import declare, dispatch
from fastlm.ops.rms_norm import add_norm_fake

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["add_layer_norm", "add_layer_norm_ref"]


def add_layer_norm_ref(x, residual, weight, bias, eps: float):
    h = x if residual is None else residual + x
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def _add_layer_norm_fake(x, residual, weight, bias, eps):
    check_norm_args(x, residual, {"weight": weight, "bias": bias}, eps)  # see add_rms_norm's fake
    return torch.empty_like(x, memory_format=torch.contiguous_format), add_norm_fake(x, residual)


OP = declare("add_layer_norm", add_layer_norm_ref, fake=_add_layer_norm_fake)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, *, backend: str = "auto"):
    """``(layer_norm(x + residual), x + residual)``; x, residual: [..., N], weight, bias: [N] in x's dtype.
    Differentiable: with grad enabled and an input requiring grad, the reference computes it."""
    fn = dispatch("add_layer_norm", backend, device_of("x", x))
    eps = as_real("eps", eps)
    check_norm_args(x, residual, {"weight": weight, "bias": bias}, eps)
    y, h = fn(x, residual, weight, bias, eps)
    if y.requires_grad and fn is not add_layer_norm_ref:  # a kernel has no backward: the reference's graph
        return add_layer_norm_ref(x, residual, weight, bias, eps)
    return y, h
