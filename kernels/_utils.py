# Shared helpers for fastlm's Triton kernels: device checks, 2D row views without copies, launch
# heuristics and the torch.library registration path.
#
# Registration: on a real GPU build every op is a `torch.library.triton_op` whose body launches the
# kernels through `wrap_triton`, so torch.compile/inductor can see (and CUDA-graph) the kernels. Under
# TRITON_INTERPRET=1 that path runs in eager mode, but tracing it (opcheck's aot_dispatch test,
# torch.compile) makes the interpreter dereference FakeTensor storage and fails, so there each op is
# a plain `torch.library.custom_op` around the same launcher (opaque to the compiler, but fully
# traceable through its fake implementation). FASTLM_TRITON_FORCE_TRITON_OP=1 forces the triton_op
# path even under the interpreter (used to smoke-test it eagerly on CPU).
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _probe():
    pass


# Whether triton.jit produced interpreter functions: decided when triton read TRITON_INTERPRET,
# i.e. when the kernels were decorated, not when they are called.
INTERPRET = isinstance(_probe, InterpretedFunction)
USE_TRITON_OP = (not INTERPRET) or os.environ.get("FASTLM_TRITON_FORCE_TRITON_OP") == "1"


# [0]: CPU tensors may reach the launchers. True under the interpreter; fastlm.kernels.resources sets it
# while it drives the launchers with a stand-in GPU driver (compiled, never launched).
CPU_LAUNCHES = [INTERPRET]


def check_device(*tensors: torch.Tensor | None) -> None:
    """Raise a clear RuntimeError where Triton cannot run on these tensors (instead of crashing inside it)."""
    for t in tensors:
        if t is None:
            continue
        dev = t.device.type
        if dev == "cuda":
            if INTERPRET:
                raise RuntimeError(
                    "fastlm.kernels: the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when "
                    "triton was imported), which is never used for CUDA tensors (it copies every storage to the "
                    "host per launch); unset TRITON_INTERPRET for compiled kernels")
            continue
        if dev == "cpu":
            if CPU_LAUNCHES[0]:
                continue
            raise RuntimeError(
                "fastlm.kernels: Triton kernels need CUDA tensors; CPU tensors run only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before triton is imported). Use backend='torch' or "
                "'cpp' for CPU tensors.")
        raise RuntimeError(f"fastlm.kernels: Triton kernels do not support device type {dev!r}")


_NO_GUARD = contextlib.nullcontext()


def on_device(t: torch.Tensor):
    """Context under which ``t``'s CUDA device is current: Triton launches on the current device's current
    stream, so a model on cuda:1 while cuda:0 is current would otherwise launch on the wrong GPU.
    Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else _NO_GUARD


def own_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` [..., N] as a 2D [rows, N] view of its own memory (unit last-dim stride, one row stride),
    or None where no such view exists (what in-place kernels need to know)."""
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        return None
    try:
        return t.view(-1, n)
    except RuntimeError:
        return None


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` [..., N] as a 2D [rows, N] view with unit last-dim stride and one row stride.

    Row-strided inputs (slices along a leading dim, a narrowed last dim) come back as views, no copy;
    only layouts that cannot be expressed with a single row stride are copied.
    """
    view = own_rows(t)
    return view if view is not None else t.contiguous().view(-1, t.shape[-1])


def num_warps_for(block: int) -> int:
    """4 warps up to 2K elements a row tile, 8 up to 8K, 16 beyond (one row per program)."""
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a cached host-side property, no sync); 132 elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def launch(kernel):
    """``kernel`` as it must be launched from the registered op body (wrap_triton under triton_op)."""
    if USE_TRITON_OP:
        from torch.library import wrap_triton

        return wrap_triton(kernel)
    return kernel


def register_op(name: str, mutates_args=()):
    """Decorator: register a launcher as ``fastlm::<name>`` (triton_op or custom_op, see header)."""
    if USE_TRITON_OP:
        from torch.library import triton_op

        return triton_op(f"fastlm::{name}", mutates_args=mutates_args)
    return torch.library.custom_op(f"fastlm::{name}", mutates_args=mutates_args)


# The interpreter converts fp32 -> bf16 by truncation (round toward zero); GPUs round to nearest even.
# Under the interpreter, kernels round bf16 outputs explicitly (RTNE on the fp32 bits, then an exact
# cast), so the numerics tested on CPU are the GPU's. Compiled kernels skip this (constexpr False).
FIX_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x`` (fp32) rounded to ``dtype`` with round-to-nearest-even, also under the interpreter."""
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dot16(a, b):
    """tl.dot of two 16-bit tiles with fp32 accumulation (tensor cores). The interpreter's bf16 dot is wrong
    (Triton 3.9 reads the bf16 bits as another type), so there the bf16 operands are upcast: bf16 products
    are exact in fp32, so the result is the MMA's up to the summation order."""
    if FIX_BF16 and a.dtype == tl.bfloat16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)

