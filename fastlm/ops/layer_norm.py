"""add + LayerNorm: ``h = x + residual; y = layer_norm(h, weight, bias)``, returning ``(y, h)``.

Matches ``torch.nn.LayerNorm`` (StableLM, Persimmon): fp32 mean/variance (biased), weight and
optional bias applied in fp32, one rounding to the model dtype. ``h`` is rounded to the model dtype
before the statistics, as HF's separate residual add does. Bytes: like add_rms_norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_float, check_same, check_shape


@register("add_layer_norm", "torch")
def add_layer_norm_ref(x, residual, weight, bias, eps: float):
    h = x if residual is None else residual + x
    return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None, eps: float, *, backend: str = "auto"):
    """``(layer_norm(x + residual), x + residual)``; x, residual: [..., N], weight, bias: [N]."""
    check_float("x", x)
    check_same("residual", residual, x, "x")
    if residual is not None:
        check_shape("residual", residual, x.shape)
    for name, t in (("weight", weight), ("bias", bias)):
        check_same(name, t, x, "x")
        check_shape(name, t, (x.shape[-1],))
    return dispatch("add_layer_norm", backend, x.device)(x, residual, weight, bias, float(eps))
