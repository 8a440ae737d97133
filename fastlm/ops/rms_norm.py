"""add + RMSNorm: ``h = x + residual; y = rmsnorm(h) * weight``, returning ``(y, h)``.

The residual stream ``h`` is rounded to the model dtype before the statistics, exactly as HF's
``residual + hidden_states`` does, and returned so the caller carries it to the next residual add.
Statistics are fp32. Two cast orders exist in the families (their HF RMSNorm forwards):

* Arcee (``weight_in_fp32=False``): ``weight * (h.float() * rstd).to(dtype)``: normalise, round, then
  multiply by the weight in the model dtype (a second rounding in bf16/fp16).
* Helium (``weight_in_fp32=True``): ``(weight.float() * h.float() * rstd).to(dtype)``: one rounding.

Using the wrong order costs ~7e-2 logit error in bf16, so every backend takes the flag.
A fused kernel reads x, residual and weight once and writes y and h once: 2 reads + 2 writes of
[rows, N] (1 read + 1 write when ``residual`` is None), against 4 passes for the eager composition.
"""
from __future__ import annotations

import torch

from fastlm._checks import as_real, check_norm_args, device_of
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["add_rms_norm", "add_rms_norm_ref"]


def add_rms_norm_ref(x, residual, weight, eps: float, weight_in_fp32: bool = False):
    h = x if residual is None else residual + x
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_in_fp32:
        y = (weight.float() * normed).to(h.dtype)
    else:
        y = weight * normed.to(h.dtype)
    return y, h


def add_norm_fake(x, residual):
    """The add + norm library ops' ``h``: x + residual, or a 0-element tensor when ``residual`` is None (a
    functional op may not return an alias of its input; the entry points return ``x`` there)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty((0,))


def _add_rms_norm_fake(x, residual, weight, eps, weight_in_fp32=False):
    # Also run for a call mixing meta and real tensors (the Meta key outranks CPU), where no kernel
    # checks anything: the checks first.
    check_norm_args(x, residual, {"weight": weight}, eps, params_dtype=False)
    dtype = x.dtype if weight_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
    return torch.empty(x.shape, dtype=dtype, device=x.device), add_norm_fake(x, residual)


OP = declare("add_rms_norm", add_rms_norm_ref, fake=_add_rms_norm_fake)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_in_fp32: bool = False, *, backend: str = "auto"):
    """``(rmsnorm(x + residual) * weight, x + residual)``; x, residual: [..., N], weight: [N] (x's dtype or
    float32). Differentiable: with grad enabled and an input requiring grad, the reference computes it."""
    fn = dispatch("add_rms_norm", backend, device_of("x", x))
    eps = as_real("eps", eps)
    check_norm_args(x, residual, {"weight": weight}, eps, params_dtype=False)
    y, h = fn(x, residual, weight, eps, bool(weight_in_fp32))
    if y.requires_grad and fn is not add_rms_norm_ref:  # a kernel has no backward: the reference's graph
        return add_rms_norm_ref(x, residual, weight, eps, bool(weight_in_fp32))
    return y, h
