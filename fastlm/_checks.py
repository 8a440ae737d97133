"""Argument checks of fastlm's ops: each failure names the argument and the problem.

A leaf module (it imports only torch): the public ops (fastlm/ops) run these checks, and the backends
(fastlm/backends, fastlm.kernels) use the value checks that must run where the values are read (index
ranges on CPU tensors) without importing the op layer above them."""
from __future__ import annotations

import math
import numbers
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)

# torch's own message for an in-place write into a tensor whose elements alias (a zero stride), which
# the references raise through copy_ / index_put_; the kernel backends raise the same.
INTERNAL_OVERLAP_MESSAGE = ("unsupported operation: more than one element of the written-to tensor refers to a "
                            "single memory location. Please clone() the tensor before performing the operation.")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def device_of(name: str, t: torch.Tensor) -> torch.device:
    """``t.device``, or the TypeError of check_float when ``t`` is not a tensor."""
    try:
        return t.device
    except AttributeError:
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}") from None


def check_same(name: str, t: torch.Tensor | None, ref: torch.Tensor, ref_name: str, *, dtype: bool = True,
               required: bool = False) -> None:
    """t (a tensor, or None unless ``required``) on ref's device, with ref's dtype when ``dtype``."""
    if t is None and not required:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{'' if required else ' or None'}, got {type(t).__name__}")
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


def check_index(name: str, t, shape: tuple, ref: torch.Tensor, ref_name: str) -> None:
    """An int32 / int64 index tensor (lengths, cache_positions) of ``shape`` on ``ref``'s device."""
    check_tensor(name, t)
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.shape != shape:  # torch.Size against a tuple
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def as_int(name: str, value, minimum: int) -> int:
    """``value`` as an int >= minimum (an int, or what operator.index accepts: numpy ints; not bools)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_real(name: str, value) -> float:
    """``value`` (a real number, not a bool) as a Python float; the range is checked by the caller."""
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def as_eps(name: str, value) -> float:
    """A norm epsilon: a finite real >= 0 (a negative or NaN eps turns whole rows into NaN)."""
    value = as_real(name, value)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def as_finite(name: str, value) -> float:
    value = as_real(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_in_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> tuple[int, int] | None:
    """Every value of the index tensor ``t`` in [low, high], else a ValueError naming ``name``, the first
    bad entry and ``what`` (the valid range); returns (min, max) of ``t``. Only for a CPU tensor in eager
    mode, else (or when ``t`` is empty) returns None: on CUDA the values live on the device (reading them
    is a host sync), and a traced graph (torch.compile) cannot branch on them; the ops' docs say what
    happens there instead."""
    n = t.numel()
    if t.device.type != "cpu" or n == 0 or torch.compiler.is_compiling():
        return None
    if n <= 64:  # decode sizes: a list is ~2x cheaper than aminmax and two item() calls
        values = t.reshape(-1).tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < low or hi > high:
        bad = ((t < low) | (t > high)).nonzero()[0].tolist()
        index = ", ".join(map(str, bad))
        raise ValueError(f"{name}[{index}] = {int(t[tuple(bad)])} is outside {what}")
    return lo, hi


def check_no_internal_overlap(t: torch.Tensor) -> None:
    """torch's RuntimeError for an in-place write into ``t`` when its elements alias (a zero stride)."""
    if torch._debug_has_internal_overlap(t) == 1:  # 1: MemOverlap::Yes (0: No, 2: too hard to tell)
        raise RuntimeError(INTERNAL_OVERLAP_MESSAGE)


def check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, params: dict, eps: float, *,
                    params_dtype: bool = True) -> None:
    """add + norm: x float [..., N] with N > 0, residual like x, ``params`` (name -> tensor or None; the
    first, the weight, required) [N] tensors on x's device with x's dtype when ``params_dtype`` (else the
    weight may be float32 too: the Arcee / Helium RMSNorm orders), eps finite and >= 0. The C++ checks
    (csrc/checks.h, check_norm_args) raise the same errors."""
    check_float("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., N] with N > 0, got shape {tuple(x.shape)}")
    check_same("residual", residual, x, "x")
    if residual is not None:
        check_shape("residual", residual, x.shape)
    for i, (name, t) in enumerate(params.items()):
        check_same(name, t, x, "x", dtype=params_dtype, required=i == 0)
        if not params_dtype and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"{name} must have x's dtype ({x.dtype}) or float32, got {t.dtype}")
        check_shape(name, t, (x.shape[-1],))
    as_eps("eps", eps)


def check_positions(cache_positions: torch.Tensor, t_max: int) -> None:
    """cache_positions in [0, Tmax), where they are read (check_in_range): fastlm.ops.qkv's docstring says
    what happens elsewhere."""
    check_in_range("cache_positions", cache_positions, 0, t_max - 1,
                   f"the cache: positions must be in [0, Tmax) = [0, {t_max})")


def check_lengths(lengths: torch.Tensor, t_max: int) -> tuple[int, int] | None:
    """lengths in [1, Tmax], and their (min, max); None where they are not read (check_in_range)."""
    return check_in_range("lengths", lengths, 1, t_max, f"[1, Tmax] = [1, {t_max}]: each sequence attends to 1 to "
                          "Tmax cache slots")
