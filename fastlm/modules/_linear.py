"""The projections of the fused modules and the engine: one call into fastlm's ``linear`` op."""
from __future__ import annotations

import torch

from fastlm.ops._registry import dispatch


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` through fastlm's ``linear`` op, the residual add inside it:
    at decode sizes on CPU a weight-streaming kernel, else ATen's GEMM (fastlm.ops.projection)."""
    return dispatch("linear", backend, x.device)(x, weight, bias, residual)


def project_linear(x: torch.Tensor, linear, backend: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`project` with an ``nn.Linear``'s weight and bias."""
    return project(x, linear.weight, linear.bias, backend, residual)
