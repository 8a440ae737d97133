"""add + RMSNorm: ``h = x + residual; y = rmsnorm(h) * weight``, returning ``(y, h)``.

The residual stream ``h`` is rounded to the model dtype before the statistics, exactly as HF's
``residual + hidden_states`` does, and returned so the caller carries it to the next residual add.
Statistics are fp32. Two cast orders exist in the families (FAMILIES.md):

* Arcee (``weight_in_fp32=False``): ``weight * (h.float() * rstd).to(dtype)``: normalise, round, then
  multiply by the weight in the model dtype (a second rounding in bf16/fp16).
* Helium (``weight_in_fp32=True``): ``(weight.float() * h.float() * rstd).to(dtype)``: one rounding.

Using the wrong order costs ~7e-2 logit error in bf16, so every backend takes the flag.
A fused kernel reads x, residual and weight once and writes y and h once: 2 reads + 2 writes of
[rows, N] (1 read + 1 write when ``residual`` is None), against 4 passes for the eager composition.
"""
from __future__ import annotations

import torch

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_norm_args, device_of


@register("add_rms_norm", "torch")
def add_rms_norm_ref(x, residual, weight, eps: float, weight_in_fp32: bool = False):
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:
        y = (weight.float() * normed).to(h.dtype)
    else:
        y = weight * normed.to(h.dtype)
    return y, h


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_in_fp32: bool = False, *, backend: str = "auto"):
    """``(rmsnorm(x + residual) * weight, x + residual)``; x, residual: [..., N], weight: [N]."""
    fn = dispatch("add_rms_norm", backend, device_of("x", x))
    if not fn.checks_args:
        check_norm_args(x, residual, {"weight": weight}, params_dtype=False)
    return fn(x, residual, weight, float(eps), bool(weight_in_fp32))
