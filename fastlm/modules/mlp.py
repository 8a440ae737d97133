"""Fused MLP: SwiGLU over one fused gate/up GEMM, or up -> relu^2 -> down; the residual add folded
into the down projection (fastlm's ``linear`` op) when the layer passes one. The activation runs in
place on the GEMM output (``swiglu_`` / ``relu2_``): that buffer is ours, and skipping the output
allocation is most of the activation's cost on CPU at prefill sizes. At decode sizes (fewer
than ``INPLACE_SWIGLU_MIN_ROWS`` rows) SwiGLU stays out of place: its output is small and cheap to
allocate, while the in-place form's returned gate-half view costs ~1.5 us of host time (measured:
8.7 us against 6.8 us a call at batch 1 on CPU).

``_fastlm_gate_up_fused``: (weight [2I, hidden], bias, quantized) of the fused projection
(fastlm.modules._fused_storage.fuse_linears), the storage the HF gate/up Parameters (or, quantized, their
qweight / scales buffers) are views of. Activations other than silu (SwiGLU) and relu2 run through HF's
``act_fn`` unfused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlm.ops._registry import dispatch, dispatch_eager
from fastlm.modules._fused_storage import _is_compiling, data_ptrs, fuse_linears, unfuse_linears
from fastlm.modules._linear import bind_fused, bind_linear, project_fused, project_linear
from fastlm.modules._quantized import weight_tensors
from fastlm.modules._swap import swap_in


INPLACE_SWIGLU_MIN_ROWS = 17  # beyond the decode-sized row counts (linear's streaming kernel: <= 16)


def _swiglu_in_place(gate_up: torch.Tensor) -> bool:
    """Whether SwiGLU runs in place on this gate/up output (``swiglu_``, an [..., I] view) or out of place."""
    return gate_up.numel() // max(gate_up.shape[-1], 1) >= INPLACE_SWIGLU_MIN_ROWS


@dataclass
class MLPSpec:
    gated: bool            # SwiGLU-style gate/up/down, else up/down
    up_name: str           # "up_proj" / "dense_h_to_4h"
    down_name: str         # "down_proj" / "dense_4h_to_h"
    activation: str        # "silu", "relu2" or "other" (HF act_fn, unfused)
    gate_name: str = "gate_proj"


class FusedMLP:
    """Mixin over an HF MLP instance (see fastlm.modules._swap)."""

    _fastlm_spec: MLPSpec
    _fastlm_backend: str

    def _fastlm_gate_up(self):
        return [getattr(self, self._fastlm_spec.gate_name), getattr(self, self._fastlm_spec.up_name)]

    def _fastlm_sources(self) -> list[torch.Tensor]:
        """The HF Parameters the fused gate/up GEMM reads (see fastlm.modules._fused_storage)."""
        if not self._fastlm_spec.gated:
            return []
        gate, up = self._fastlm_gate_up()
        return weight_tensors(gate) + weight_tensors(up) + ([gate.bias, up.bias] if gate.bias is not None else [])

    def _fastlm_fuse(self) -> None:
        if self._fastlm_spec.gated:
            self.__dict__["_fastlm_gate_up_fused"] = fuse_linears(self._fastlm_gate_up())
        self.__dict__["_fastlm_source_ptrs"] = data_ptrs(self._fastlm_sources())

    def _fastlm_refresh(self) -> None:
        """Re-fuse if a gate/up Parameter no longer is what was fused (replaced, copied, re-pointed)."""
        if _is_compiling() or not self._fastlm_spec.gated:  # see fastlm.modules._fused_storage
            return
        if data_ptrs(self._fastlm_sources()) != self.__dict__["_fastlm_source_ptrs"]:
            self._fastlm_fuse()

    def _fastlm_unfuse(self) -> None:
        if self._fastlm_spec.gated:
            unfuse_linears(self._fastlm_gate_up())

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._fastlm_fuse()
        return result

    def fused_spec(self) -> MLPSpec:
        """The projection names and activation this module was patched with."""
        return self._fastlm_spec

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """Up projection(s) and activation: [..., hidden] -> [..., I]."""
        spec = self._fastlm_spec
        if spec.gated:
            gate_up = project_fused(x, self.__dict__["_fastlm_gate_up_fused"], self._fastlm_backend)
            if spec.activation == "silu":
                op = "swiglu_" if _swiglu_in_place(gate_up) else "swiglu"
                return dispatch(op, self._fastlm_backend, gate_up.device)(gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate) * up
        h = project_linear(x, getattr(self, spec.up_name), self._fastlm_backend)
        if spec.activation == "relu2":
            return dispatch("relu2_", self._fastlm_backend, h.device)(h)
        return self.act_fn(h)

    def bound_forward(self, device: torch.device, eager: bool = False):
        """:meth:`forward` without autograd, its weights and kernels looked up now (and no refresh: see
        fastlm.modules._linear.bind_fused): ``f(x, residual=None)``."""
        spec, backend = self._fastlm_spec, self._fastlm_backend
        down = bind_linear(getattr(self, spec.down_name), backend, device, eager)
        if spec.gated and spec.activation == "silu":
            gate_up = bind_fused(self.__dict__["_fastlm_gate_up_fused"], backend, device, eager)
            swiglu = (dispatch_eager if eager else dispatch)("swiglu", backend, device)
            swiglu_inplace = dispatch("swiglu_", backend, device)

            def forward(x, residual=None):
                h = gate_up(x)
                return down((swiglu_inplace if _swiglu_in_place(h) else swiglu)(h), residual)
        elif not spec.gated and spec.activation == "relu2":
            up, relu2 = bind_linear(getattr(self, spec.up_name), backend, device, eager), dispatch("relu2_", backend,
                                                                                                    device)

            def forward(x, residual=None):
                return down(relu2(up(x)), residual)
        else:  # HF's act_fn, unfused
            def forward(x, residual=None):
                return down(self.activate(x), residual)
        return forward

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            out = super().forward(x)
            return out if residual is None else out + residual
        self._fastlm_refresh()
        return project_linear(self.activate(x), getattr(self, self._fastlm_spec.down_name), self._fastlm_backend,
                              residual)



def patch_mlp(module, spec, backend: str) -> None:
    swap_in(module, FusedMLP, spec=spec, backend=backend)
