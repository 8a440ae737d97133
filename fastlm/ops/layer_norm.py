"""add + LayerNorm: ``h = x + residual; y = layer_norm(h, weight, bias)``, returning ``(y, h)``.

Matches ``torch.nn.LayerNorm`` (StableLM, Persimmon): fp32 mean/variance (biased), weight and
optional bias applied in fp32, one rounding to the model dtype. ``h`` is rounded to the model dtype
before the statistics, as HF's separate residual add does. Bytes: like add_rms_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_norm_args, device_of


@register("add_layer_norm", "torch")
def add_layer_norm_ref(x, residual, weight, bias, eps: float):
    h = x if residual is None else residual + x
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, *, backend: str = "auto"):
    """``(layer_norm(x + residual), x + residual)``; x, residual: [..., N], weight, bias: [N]."""
    fn = dispatch("add_layer_norm", backend, device_of("x", x))
    if not fn.checks_args:
        check_norm_args(x, residual, {"weight": weight, "bias": bias})
    return fn(x, residual, weight, bias, float(eps))
