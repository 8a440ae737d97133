"""The projections of the fused modules and the engine: one call into fastlm's ``linear`` op."""
from __future__ import annotations

import torch

from fastlm.ops._backend import dispatch


def project(x: torch.Tensor, linear, backend: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x) (+ residual)`` for an ``nn.Linear``, through fastlm's ``linear`` op with the residual add
    inside it: at decode sizes on CPU a weight-streaming kernel, else ATen's GEMM (fastlm.ops.linear)."""
    return dispatch("linear", backend, x.device)(x, linear.weight, linear.bias, residual)
