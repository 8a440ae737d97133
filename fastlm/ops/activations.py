"""MLP epilogues on the up-projection GEMM output.

* ``swiglu(gate_up)``: ``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dim
  ([..., 2I] -> [..., I]): the output of one fused gate/up GEMM. Reads 2I, writes I per row.
* ``relu2(x)``: ``relu(x) ** 2`` (Arcee, Persimmon). Reads and writes I per row.

In-place forms, which the fused MLP calls on the GEMM output it owns: ``swiglu_(gate_up)`` writes the
result into the gate half and returns that view ([..., I], row stride 2I, which the down projection's
GEMM reads as is); ``relu2_(x)`` overwrites x. Same traffic as out of place, minus the allocation: at
prefill sizes on CPU a fresh output costs page faults worth as much as the kernel (37 MB for one
Arcee layer at T = 512), and the lines written were just read, so they are still cached.

The references round where HF rounds (silu result, then the product); kernels compute in fp32 and
round once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm._checks import check_float, device_of
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["swiglu", "swiglu_", "relu2", "relu2_", "swiglu_ref", "relu2_ref", "swiglu_inplace_ref",
           "relu2_inplace_ref"]


def swiglu_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def relu2_ref(x):
    return torch.square(F.relu(x))


def swiglu_inplace_ref(gate_up):
    gate = gate_up[..., : gate_up.shape[-1] // 2]
    if gate_up.requires_grad and torch.is_grad_enabled():
        # autograd forbids writing into one of chunk's views, and silu saved gate for its backward
        return gate.copy_(swiglu_ref(gate_up.clone()))
    return gate.copy_(swiglu_ref(gate_up))


def relu2_inplace_ref(x):
    return x.copy_(relu2_ref(x))


def _swiglu_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _relu2_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _in_place_fake(x):  # the in-place library ops return nothing; the entry points return the written view
    return None


SWIGLU = declare("swiglu", swiglu_ref, fake=_swiglu_fake)
RELU2 = declare("relu2", relu2_ref, fake=_relu2_fake)
SWIGLU_ = declare("swiglu_", swiglu_inplace_ref, fake=_in_place_fake)
RELU2_ = declare("relu2_", relu2_inplace_ref, fake=_in_place_fake)


def _check_swiglu(gate_up):
    check_float("gate_up", gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got shape {tuple(gate_up.shape)}")


def _check_relu2(x):
    check_float("x", x)
    if x.dim() < 1:
        raise ValueError("relu2 needs at least one dim, got a 0-d tensor")


# The kernel backends have no backward: with grad enabled and an input requiring grad, the public ops
# return the reference's result (and graph) instead. Out of place, the kernel's output tells (it requires
# grad exactly then, one attribute read); in place, it must be known before anything is written.


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` -> [..., I]."""
    fn = dispatch("swiglu", backend, device_of("gate_up", gate_up))
    _check_swiglu(gate_up)
    out = fn(gate_up)
    if out.requires_grad and fn is not swiglu_ref:
        return swiglu_ref(gate_up)
    return out


def swiglu_(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """:func:`swiglu` written into ``gate_up``'s gate half; returns that view, ``gate_up[..., :I]``."""
    fn = dispatch("swiglu_", backend, device_of("gate_up", gate_up))
    if gate_up.requires_grad and torch.is_grad_enabled():
        fn = swiglu_inplace_ref
    _check_swiglu(gate_up)
    return fn(gate_up)


def relu2(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``relu(x) ** 2``."""
    fn = dispatch("relu2", backend, device_of("x", x))
    _check_relu2(x)
    out = fn(x)
    if out.requires_grad and fn is not relu2_ref:
        return relu2_ref(x)
    return out


def relu2_(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """:func:`relu2` in place; returns ``x``."""
    fn = dispatch("relu2_", backend, device_of("x", x))
    if x.requires_grad and torch.is_grad_enabled():
        fn = relu2_inplace_ref
    _check_relu2(x)
    return fn(x)
