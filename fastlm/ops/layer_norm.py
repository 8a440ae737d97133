"""add + LayerNorm: ``h = x + residual; y = layer_norm(h, weight, bias)``, returning ``(y, h)``.

Matches ``torch.nn.LayerNorm`` (StableLM, Persimmon): fp32 mean/variance (biased), weight and
optional bias applied in fp32, one rounding to the model dtype. ``h`` is rounded to the model dtype
before the statistics, as HF's separate residual add does. Bytes: like add_rms_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import as_real, check_norm_args, device_of


@register("add_layer_norm", "torch")
def add_layer_norm_ref(x, residual, weight, bias, eps: float):
    h = x if residual is None else residual + x
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, *, backend: str = "auto"):
    """``(layer_norm(x + residual), x + residual)``; x, residual: [..., N], weight, bias: [N] in x's dtype.
    Differentiable: with grad enabled and an input requiring grad, the reference computes it."""
    fn = dispatch("add_layer_norm", backend, device_of("x", x))
    eps = eps if type(eps) is float else as_real("eps", eps)  # its range: the checks (C++ or Python)
    if not fn.checks_args:
        check_norm_args(x, residual, {"weight": weight, "bias": bias}, eps)
    try:
        y, h = fn(x, residual, weight, bias, eps)
    except (TypeError, NotImplementedError):  # see add_rms_norm
        check_norm_args(x, residual, {"weight": weight, "bias": bias}, eps)
        raise
    if y.requires_grad and fn is not add_layer_norm_ref:
        return add_layer_norm_ref(x, residual, weight, bias, eps)
    return y, h
