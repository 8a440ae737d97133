"""MLP epilogues on the up-projection GEMM output.

* ``swiglu(gate_up)``: ``silu(gate) * up`` where ``gate_up = [gate | up]`` along the last dim
  ([..., 2I] -> [..., I]): the output of one fused gate/up GEMM. Reads 2I, writes I per row.
* ``relu2(x)``: ``relu(x) ** 2`` (Arcee, Persimmon). Reads and writes I per row.

The references round where HF rounds (silu result, then the product); kernels compute in fp32 and
round once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_float


@register("swiglu", "torch")
def swiglu_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@register("relu2", "torch")
def relu2_ref(x):
    return torch.square(F.relu(x))


def swiglu(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` -> [..., I]."""
    check_float("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even ([gate | up]), got {gate_up.shape[-1]}")
    return dispatch("swiglu", backend, gate_up.device)(gate_up)


def relu2(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``relu(x) ** 2``."""
    check_float("x", x)
    return dispatch("relu2", backend, x.device)(x)
