"""The projections of the fused modules and the engine: one call into fastlm's ``linear`` op, or into its
``quant_linear`` op for a projection that ``patch(quantize=...)`` quantized (fastlm.modules._quantized)."""
from __future__ import annotations

from typing import Callable

import torch

from fastlm.ops._registry import dispatch, dispatch_eager


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)`` through fastlm's ``linear`` op, the residual add inside it:
    at decode sizes on CPU a weight-streaming kernel, else ATen's GEMM (fastlm.ops.projection)."""
    return dispatch("linear", backend, x.device)(x, weight, bias, residual)


def project_fused(x: torch.Tensor, fused: tuple, backend: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """One fused projection: ``fused`` = (weight, bias, None) for a 16-bit one, (qweight, bias,
    (scales, bits, group_size)) for a quantized one (what :func:`fuse_linears` returns)."""
    weight, bias, quant = fused
    if quant is None:
        return dispatch("linear", backend, x.device)(x, weight, bias, residual)
    return dispatch("quant_linear", backend, x.device)(x, weight, quant[0], bias, residual, quant[1], quant[2])


def project_linear(x: torch.Tensor, linear, backend: str, residual: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`project` with an ``nn.Linear``'s weight and bias (its qweight and scales once quantized). The
    tensors are read from the module at every call, so a replaced one is never stale."""
    quant = linear.__dict__.get("_fastlm_quant")  # (bits, group_size) of a quantized projection
    if quant is None:
        return dispatch("linear", backend, x.device)(x, linear.weight, linear.bias, residual)
    buffers = linear._buffers
    return dispatch("quant_linear", backend, x.device)(x, buffers["qweight"], buffers["scales"],
                                                       linear._parameters["bias"], residual, *quant)


def bind_fused(fused: tuple, backend: str, device: torch.device, eager: bool = False) -> Callable:
    """:func:`project_fused` with its weights and kernel looked up now: ``f(x, residual=None)``. For a caller that
    rebinds whenever the weights may have changed (the engine binds at the start of each call); ``eager``: the
    kernel is never traced by torch.compile (fastlm.ops._registry.dispatch_eager)."""
    weight, bias, quant = fused
    if quant is None:
        kernel = (dispatch_eager if eager else dispatch)("linear", backend, device)
        return lambda x, residual=None: kernel(x, weight, bias, residual)
    kernel = (dispatch_eager if eager else dispatch)("quant_linear", backend, device)
    scales, bits, group_size = quant
    return lambda x, residual=None: kernel(x, weight, scales, bias, residual, bits, group_size)


def bind_linear(linear, backend: str, device: torch.device, eager: bool = False) -> Callable:
    """:func:`project_linear` bound as :func:`bind_fused` binds ``project_fused``."""
    quant = linear.__dict__.get("_fastlm_quant")
    if quant is None:
        return bind_fused((linear.weight, linear.bias, None), backend, device, eager)
    return bind_fused((linear._buffers["qweight"], linear._parameters["bias"], (linear._buffers["scales"], *quant)),
                      backend, device, eager)
