"""Tolerance rule for low-precision kernels (the one flash-attention's tests use).

Compute the reference twice from the same inputs: once upcast (fp32 or fp64: ``ref_fp32``) and once in
the kernel's dtype (``ref_lowp``, i.e. what eager PyTorch gives). The kernel passes when its error
against the upcast reference is at most ``factor`` times PyTorch's own error plus a small ``atol``:

    max|out - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol

so a kernel is held to "as accurate as PyTorch in that dtype", whatever the dtype and op.
"""
from __future__ import annotations

import torch


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp64 (0.0 for empty tensors); NaNs in the same places count as equal."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return float(diff.nan_to_num(nan=float("inf")).max())


def assert_close_to_ref(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, atol: float,
                        factor: float = 2.0, name: str = "output") -> tuple[float, float]:
    """Assert ``max|out - ref_fp32| <= factor * max|ref_lowp - ref_fp32| + atol``; returns both errors.

    ``out`` and ``ref_lowp`` are in the low-precision dtype under test, ``ref_fp32`` is the upcast
    reference; shapes must match exactly.
    """
    for label, t in (("ref_fp32", ref_fp32), ("ref_lowp", ref_lowp)):
        if tuple(t.shape) != tuple(out.shape):
            raise AssertionError(f"{name}: shape {tuple(out.shape)} differs from {label} {tuple(t.shape)}")
    err_kernel = max_abs_err(out, ref_fp32)
    err_torch = max_abs_err(ref_lowp, ref_fp32)
    bound = factor * err_torch + atol
    assert err_kernel <= bound, (
        f"{name} ({out.dtype}): max|kernel - ref_fp32| = {err_kernel:.3e} exceeds "
        f"{factor} * max|torch_lowp - ref_fp32| ({err_torch:.3e}) + atol ({atol:.1e}) = {bound:.3e}")
    return err_kernel, err_torch
