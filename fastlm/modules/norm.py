"""Fused norm: RMSNorm (Arcee and Helium cast orders) or LayerNorm, with the residual add fused in.

``add_forward(x, residual)`` returns ``(norm(x + residual), x + residual)`` in one kernel; the
decoder layer uses it to fold the attention residual add into the post-attention norm.
``forward(x)`` keeps the HF call signature for the final norm and for external callers.
"""
from __future__ import annotations

import torch

from fastlm.modules._swap import swap_in
from fastlm.ops._registry import dispatch


class FusedNorm:
    """Mixin over an HF RMSNorm / nn.LayerNorm instance (see fastlm.modules._swap)."""

    _fastlm_kind: str  # "rms" or "layer"
    _fastlm_weight_in_fp32: bool
    _fastlm_backend: str

    # The fused modules call the backend implementation directly: their inputs are the model's own
    # tensors, so the public ops' argument checks (a few us per call, felt in CPU decode) are skipped.
    def _kernel(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """(kernel, its arguments after x and residual) for inputs on ``device`` in ``dtype``."""
        weight = self.weight
        if self._fastlm_kind == "rms":
            return (dispatch("add_rms_norm", self._fastlm_backend, device),
                    (weight, self.variance_epsilon, self._fastlm_weight_in_fp32))
        # A LayerNorm kept in fp32 beside a 16-bit model (keep_in_fp32_modules, some checkpoints): HF
        # normalises in fp32 with the fp32 weights and rounds once; the kernels take the model dtype
        # only, so the reference (F.layer_norm, exactly HF's call) runs it.
        backend = self._fastlm_backend if weight is None or weight.dtype == dtype else "torch"
        return dispatch("add_layer_norm", backend, device), (weight, self.bias, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        kernel, args = self._kernel(x.device, x.dtype)
        return kernel(x, residual, *args)

    def bound_add_forward(self, device: torch.device, dtype: torch.dtype):
        """:meth:`add_forward` for inputs on ``device`` in ``dtype``, its weights and kernel looked up now (see
        fastlm.modules._linear.bind_fused)."""
        kernel, args = self._kernel(device, dtype)
        return lambda x, residual: kernel(x, residual, *args)

    @property
    def fused_weight_in_fp32(self) -> bool:
        """The RMSNorm cast order the adapter chose: the weight multiplied in fp32 before the one rounding
        (Helium), else after the cast to the model dtype (Arcee; LayerNorm: False)."""
        return self._fastlm_weight_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return super().forward(x)
        return self.add_forward(x, None)[0]


def patch_norm(module, kind: str, backend: str, weight_in_fp32: bool = False) -> None:
    swap_in(module, FusedNorm, kind=kind, weight_in_fp32=weight_in_fp32, backend=backend)
