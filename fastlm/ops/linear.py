"""Projections at decode sizes: ``linear(x, weight, bias, residual) = x @ weight.T (+ bias) (+ residual)``.

At decode a projection multiplies a few rows of x by the whole weight, so its cost is reading the
weight from memory once. The C++ CPU kernel (csrc/cpu/linear.cpp) streams the weight at close to the
machine's read bandwidth for up to 16 rows of x and hands larger x (a real GEMM) to ATen. The
reference is ATen itself (``F.linear``, or ``addmm`` with the residual folded in); on CUDA every
backend uses it (cuBLAS is already bandwidth-bound there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_float, check_same, check_shape


@register("linear", "torch")
def linear_ref(x, weight, bias=None, residual=None):
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is None:
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
        return out.view(residual.shape)
    return residual + F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)``; x: [..., K], weight: [N, K], bias: [N], residual: [..., N]."""
    check_float("x", x)
    check_same("weight", weight, x, "x")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    check_same("bias", bias, x, "x")
    check_shape("bias", bias, (weight.shape[0],))
    check_same("residual", residual, x, "x")
    check_shape("residual", residual, (*x.shape[:-1], weight.shape[0]))
    return dispatch("linear", backend, x.device)(x, weight, bias, residual)
