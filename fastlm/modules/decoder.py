"""Fused decoder layer: sequential (Arcee, Persimmon, Helium, StableLM) or parallel residual (StableLM).

Sequential:  h = ln1(x); a = attn(h); y, r = add_norm2(a, x)   # r = x + a, one kernel
             out = r + mlp(y)                                  # add inside the down GEMM (addmm)
Parallel:    h = ln1(x); a = attn(h); out = (x + a) + mlp(h)    # HF's summation order

Each layer still returns the full residual stream (not a (hidden, residual) pair), because
``transformers``' hidden-state capture hooks read each layer's output; the cross-layer add is
instead folded into the down projection's GEMM. Dropout is training-only and training runs HF's
own forward (autograd enabled => ``super().forward``), so gradients are HF's exactly.
"""
from __future__ import annotations

import torch

from fastlm.modules._swap import swap_in


class FusedDecoderLayer:
    """Mixin over an HF decoder-layer instance (see fastlm.modules._swap)."""

    _fastlm_parallel_residual: bool

    def forward(self, hidden_states, *args, **kwargs):
        if torch.is_grad_enabled() or args:
            return super().forward(hidden_states, *args, **kwargs)
        kwargs.pop("use_cache", None)
        h, _ = self.input_layernorm.add_forward(hidden_states, None)
        attn_out, _ = self.self_attn(hidden_states=h, **kwargs)
        if self._fastlm_parallel_residual:
            return self.mlp(h, residual=hidden_states + attn_out)
        y, residual = self.post_attention_layernorm.add_forward(attn_out, hidden_states)
        return self.mlp(y, residual=residual)



def patch_decoder_layer(module, parallel_residual: bool) -> None:
    swap_in(module, FusedDecoderLayer, parallel_residual=parallel_residual)
