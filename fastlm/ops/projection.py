"""The ``linear`` op, projections at decode sizes: ``linear(x, weight, bias, residual) = x @ weight.T (+ bias)
(+ residual)``.

At decode a projection multiplies a few rows of x by the whole weight, so its cost is reading the
weight from memory once. The C++ CPU kernel (csrc/cpu/linear.cpp) streams the weight at close to the
machine's read bandwidth for up to 16 rows of x and hands larger x (a real GEMM) to ATen. The
reference is ATen itself (``F.linear``, or ``addmm`` with the residual folded in); on CUDA every
backend uses it (cuBLAS is already bandwidth-bound there).

16-bit (bf16 / fp16) x and weight beyond decode sizes, on CPU: ATen's 16-bit GEMM is fast only where the
CPU has native dot products for the dtype (AVX512-BF16 or AMX-BF16; AVX512-FP16 or AMX-FP16); elsewhere it
runs several times slower than its fp32 GEMM. There the kernel streams the weight for a few more rows and
beyond runs the fp32 GEMM on weight panels widened to fp32 in cache (exact), fp32 accumulation, bias and
residual added in fp32, one rounding to the dtype (csrc/cpu/widened_gemm.h). The choice is made at run
time from the CPU (cpuid), not from the build:

* ``ONEDNN_MAX_CPU_ISA`` (oneDNN's own cap, which ATen honours) caps it too: with ``AVX2`` or
  ``AVX512_CORE`` neither dtype is native. To measure an AVX2 machine on a newer CPU, set
  ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` and use a
  ``FASTLM_CPU_ISA=avx2`` build; for an AVX-512 CPU without BF16, ``ONEDNN_MAX_CPU_ISA=AVX512_CORE``.
* ``FASTLM_CPU_GEMM16=auto|widen|aten`` (read once) forces the widened path or ATen's 16-bit GEMM;
  ``fastlm._C.set_cpu_gemm16(mode)`` sets it at run time (returning the previous mode) and
  ``fastlm._C.cpu_gemm16_widens("bfloat16" | "float16")`` tells which path a dtype takes.

fp32 GEMMs beyond decode sizes on CPU (fp32 x, and the widened panels above) run on oneDNN's matmul
(ATen's ``mkldnn::_linear_pointwise`` op, the weight as it is) where torch has it, on x86: at prefill
shapes 1.2-1.7x faster than ``addmm``'s MKL on the 2-core Zen 4, whose two-thread scaling is poor there.
``FASTLM_CPU_GEMM32=auto|onednn|aten`` (read once) or ``fastlm._C.set_cpu_gemm32(mode)`` chooses;
``fastlm._C.cpu_gemm32_library()`` says which one runs. The widened panels' GEMM
(``FASTLM_CPU_PANEL_GEMM=auto|packed|library`` or ``fastlm._C.set_cpu_panel_gemm(mode)``;
``fastlm._C.cpu_panel_gemm()`` says which runs): on AVX2 builds fastlm's own packed AVX2 + FMA kernel
(csrc/cpu/packed_gemm.h), which reads x in place instead of packing it again for every panel; on AVX-512
builds that library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm._checks import check_float, check_same, check_shape
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["linear", "linear_ref"]


def linear_ref(x, weight, bias=None, residual=None):
    if residual is None:
        return F.linear(x, weight, bias)
    if bias is None:
        rows = residual.shape[:-1].numel()  # not -1: ambiguous for zero-size rows
        out = torch.addmm(residual.reshape(rows, residual.shape[-1]), x.reshape(rows, x.shape[-1]), weight.t())
        return out.view(residual.shape)
    return residual + F.linear(x, weight, bias)


def _linear_fake(x, weight, bias=None, residual=None):
    # also run for a call mixing meta and real tensors, where no kernel checks the devices
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        check_same(name, t, x, "x", dtype=False)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


LINEAR = declare("linear", linear_ref, fake=_linear_fake)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``x @ weight.T (+ bias) (+ residual)``; x: [..., K], weight: [N, K], bias: [N], residual: [..., N].
    Differentiable: with grad enabled and an input requiring grad, the reference computes it."""
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must be [..., K], got a 0-d tensor")
    check_same("weight", weight, x, "x", required=True)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [N, K] with K = x.shape[-1] = {x.shape[-1]}, got {tuple(weight.shape)}")
    check_same("bias", bias, x, "x")
    check_shape("bias", bias, (weight.shape[0],))
    check_same("residual", residual, x, "x")
    check_shape("residual", residual, (*x.shape[:-1], weight.shape[0]))
    fn = dispatch("linear", backend, x.device)
    out = fn(x, weight, bias, residual)
    if out.requires_grad and fn is not linear_ref:  # a kernel has no backward: the reference's graph
        return linear_ref(x, weight, bias, residual)
    return out
