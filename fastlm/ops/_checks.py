"""Argument checks shared by the public op functions: each failure names the argument and the problem."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def device_of(name: str, t: torch.Tensor) -> torch.device:
    """``t.device``, or the TypeError of check_float when ``t`` is not a tensor."""
    try:
        return t.device
    except AttributeError:
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}") from None


def check_same(name: str, t: torch.Tensor | None, ref: torch.Tensor, ref_name: str, *, dtype: bool = True) -> None:
    if t is None:
        return
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_shape(name: str, t: torch.Tensor | None, shape: tuple) -> None:
    # torch.Size is a tuple: compare as is (converting both costs ~0.2 us a call, felt at decode sizes)
    if t is not None and t.shape != shape:
        if tuple(t.shape) == tuple(shape):  # shape given as a list or another sequence
            return
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, params: dict, *, params_dtype: bool = True) -> None:
    """add + norm: x float, residual like x, each of ``params`` (name -> tensor or None) an [N] tensor on
    x's device, with x's dtype when ``params_dtype``."""
    check_float("x", x)
    check_same("residual", residual, x, "x")
    if residual is not None:
        check_shape("residual", residual, x.shape)
    for name, t in params.items():
        check_same(name, t, x, "x", dtype=params_dtype)
        check_shape(name, t, (x.shape[-1],))
