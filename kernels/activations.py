# MLP epilogues (fastlm.ops.activations): swiglu ([..., 2I] -> silu(gate) * up [..., I]) and relu2.
#
# Algorithm: a 2D grid (rows, column blocks) over the [rows, I] output; rows on grid axis 0 (up to
# 2^31 programs; CUDA caps axes 1/2 at 65535) and int64 row offsets. Each program loads BLOCK
# contiguous columns of gate and of up (the same row, I apart) with unit stride (vectorised 16-byte
# loads), computes silu(g) * u = g * u / (1 + exp(-g)) in fp32 and rounds once (the reference rounds
# the silu result and then the product, as HF; the kernel is at least as accurate). relu2 is
# max(x, 0)^2 in fp32, rounded once (identical to torch's single rounding of the square).
# Row strides are arguments, so row-strided views (e.g. a slice of a wider GEMM output) need no copy.
#
# Bytes: swiglu reads 2I and writes I elements a row, relu2 reads and writes I: the minimum for an
# out-of-place elementwise op. Eager swiglu makes 3 passes (silu: read I write I; mul: read 2I write
# I): 5I vs 3I. The block size is keyed on I (heuristic: up to 1024 columns a program, 4 warps).
#
# In-place forms (swiglu_ writes the gate half, relu2_ overwrites x; the fused MLP calls these on its
# own GEMM output): the same kernels with Y = X and Y's row stride = X's. Each program loads its block
# before storing to the same addresses, so aliasing is safe. They save the output allocation, not
# traffic. An input with no row view of its own memory, or whose rows overlap one another (a row
# stride below the row's width: expanded / as_strided tensors, where one program would read what
# another wrote), is computed aside and copied back, as the references do; a written tensor whose
# elements alias (a zero stride) raises torch's own error, as the references' copy_ does.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm._checks import check_no_internal_overlap

from ._utils import cast_out, check_device, launch, on_device, own_rows, register_op, rows_view


@triton.jit
def _swiglu_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x_row = X + row * stride_x
    g = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_row + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + row * stride_y + cols, cast_out(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu2_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(x < 0.0, 0.0, x)  # NaN stays NaN, as in torch.relu (tl.maximum drops it on GPUs)
    tl.store(Y + row * stride_y + cols, cast_out(x * x, Y.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1024)


def _launch_rows(kernel, x2: torch.Tensor, out: torch.Tensor, n: int) -> torch.Tensor:
    """Run ``kernel`` on the [rows, ...] input view x2 into ``out`` ([rows, n] once viewed, any row
    stride); returns out."""
    y2 = out if out.dim() == 2 else out.view(-1, n)
    block = _block(n)
    with on_device(x2):
        launch(kernel)[(x2.shape[0], triton.cdiv(n, block))](x2, y2, x2.stride(0), y2.stride(0), n, BLOCK=block,
                                                              num_warps=4)
    return out


@register_op("triton_swiglu")
def triton_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    check_device(gate_up)
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    if out.numel() == 0:
        return out
    return _launch_rows(_swiglu_kernel, rows_view(gate_up), out, n)


@register_op("triton_relu2")
def triton_relu2(x: torch.Tensor) -> torch.Tensor:
    check_device(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = rows_view(x.reshape(1) if x.dim() == 0 else x)
    return _launch_rows(_relu2_kernel, x2, out, x2.shape[1])


def _rows_in_place(t: torch.Tensor) -> torch.Tensor | None:
    """own_rows(t) when its rows are disjoint in memory (the in-place kernels' condition), else None."""
    rows = own_rows(t)
    if rows is None or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        return None
    return rows


@register_op("triton_swiglu_inplace", mutates_args=("gate_up",))
def triton_swiglu_inplace(gate_up: torch.Tensor) -> None:
    check_device(gate_up)
    n = gate_up.shape[-1] // 2
    if gate_up.numel() == 0:
        return
    check_no_internal_overlap(gate_up[..., :n])
    x2 = _rows_in_place(gate_up)
    if x2 is None:
        gate_up[..., :n].copy_(triton_swiglu(gate_up))
        return
    _launch_rows(_swiglu_kernel, x2, x2[:, :n], n)


@register_op("triton_relu2_inplace", mutates_args=("x",))
def triton_relu2_inplace(x: torch.Tensor) -> None:
    check_device(x)
    if x.numel() == 0:
        return
    check_no_internal_overlap(x)
    x2 = _rows_in_place(x)
    if x2 is None:
        x.copy_(triton_relu2(x))
        return
    _launch_rows(_relu2_kernel, x2, x2, x2.shape[1])


def swiglu(gate_up):
    """Backend entry point, the signature of fastlm.ops.activations.swiglu_ref."""
    check_device(gate_up)
    return torch.ops.fastlm.triton_swiglu(gate_up)


def relu2(x):
    """Backend entry point, the signature of fastlm.ops.activations.relu2_ref."""
    check_device(x)
    return torch.ops.fastlm.triton_relu2(x)


def swiglu_(gate_up):
    """Backend entry point, the signature of fastlm.ops.activations.swiglu_inplace_ref."""
    check_device(gate_up)
    torch.ops.fastlm.triton_swiglu_inplace(gate_up)
    return gate_up[..., : gate_up.shape[-1] // 2]


def relu2_(x):
    """Backend entry point, the signature of fastlm.ops.activations.relu2_inplace_ref."""
    check_device(x)
    torch.ops.fastlm.triton_relu2_inplace(x)
    return x



def resource_launches(fam, tag: str, batch: int, tokens: int, empty):
    """(label, thunk) for each launch of this module's kernels in one layer of ``fam`` (a
    fastlm.kernels.resources FamilyShape), for the resource table: the family's MLP activation, out of
    place and in place, on its GEMM output's shape; ``empty(*shape)`` allocates an input. An activation
    kernel added here lists its launches here too."""
    inner = fam.intermediate
    if fam.mlp == "swiglu":
        gate_up = empty(batch, tokens, 2 * inner)
        yield f"{tag} swiglu", lambda: swiglu(gate_up)
        yield f"{tag} swiglu_", lambda: swiglu_(gate_up)
    else:
        up = empty(batch, tokens, inner)
        yield f"{tag} relu2", lambda: relu2(up)
        yield f"{tag} relu2_", lambda: relu2_(up)

# op -> (entry point, its torch.library op): what the Triton backend plugin (fastlm/backends/triton.py) serves
ENTRY_POINTS = {"swiglu": (swiglu, "fastlm::triton_swiglu"), "relu2": (relu2, "fastlm::triton_relu2"),
                "swiglu_": (swiglu_, "fastlm::triton_swiglu_inplace"),
                "relu2_": (relu2_, "fastlm::triton_relu2_inplace")}
