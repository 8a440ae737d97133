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

from typing import Callable

import torch

from fastlm.modules._swap import swap_in


def layer_body(layer, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One fused decoder layer over the residual stream x [B, S, hidden] -> [B, S, hidden]: the one
    layer body HF's forward (FusedDecoderLayer) and the engine (fastlm.engine.runner) both run.
    ``attend(h)``: the attention block on the normed input, output projection included (HF's attention
    with HF's cache and mask, or the engine's static cache and decode attention)."""
    h, _ = layer.input_layernorm.add_forward(x, None)
    a = attend(h)
    if layer.fused_parallel_residual:
        return layer.mlp(h, residual=x + a)
    y, residual = layer.post_attention_layernorm.add_forward(a, x)
    return layer.mlp(y, residual=residual)


class FusedDecoderLayer:
    """Mixin over an HF decoder-layer instance (see fastlm.modules._swap)."""

    _fastlm_parallel_residual: bool

    @property
    def fused_parallel_residual(self) -> bool:
        """Whether attention and MLP both read the layer's input (StableLM's use_parallel_residual)."""
        return self._fastlm_parallel_residual

    def forward(self, hidden_states, *args, **kwargs):
        if torch.is_grad_enabled() or args:
            return super().forward(hidden_states, *args, **kwargs)
        kwargs.pop("use_cache", None)
        return layer_body(self, hidden_states, lambda h: self.self_attn(hidden_states=h, **kwargs)[0])


def patch_decoder_layer(module, parallel_residual: bool) -> None:
    swap_in(module, FusedDecoderLayer, parallel_residual=parallel_residual)
