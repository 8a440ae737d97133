"""RoPE tables for the engine.

For every rope type whose (cos, sin) at a position does not depend on anything else (default, linear,
yarn, llama3, proportional), the engine asks the model's own ``rotary_emb`` once for positions
[0, max_len) and gathers rows by the position tensor in each step: static shapes, no host sync, exact
same values as HF (HF's table is an elementwise function of the position).

``dynamic`` (NTK) and ``longrope`` tables depend on the longest position in the call (HF recomputes
``inv_freq`` from ``max(position_ids) + 1``, with a host sync for ``dynamic``). For those the engine
calls ``rotary_emb`` eagerly every step, exactly as HF does; such models decode eagerly (no CUDA graph,
no ``torch.compile``), with one warning.
"""
from __future__ import annotations

import torch

EAGER_ROPE_TYPES = ("dynamic", "longrope")


def rope_type_of(rotary_emb) -> str:
    rope_type = getattr(rotary_emb, "rope_type", "default")
    return rope_type if isinstance(rope_type, str) else "default"


def needs_eager_rope(rotary_emb) -> bool:
    rope_type = rope_type_of(rotary_emb)
    return any(t in rope_type for t in EAGER_ROPE_TYPES)


class RopeTables:
    def __init__(self, rotary_emb, max_len: int, dtype: torch.dtype, device: torch.device):
        self.rotary_emb = rotary_emb
        self.eager = needs_eager_rope(rotary_emb)
        self.dtype, self.device = dtype, device
        self.cos = self.sin = None
        if not self.eager:
            dummy = torch.empty(0, dtype=dtype, device=device)
            positions = torch.arange(max_len, device=device).unsqueeze(0)
            cos, sin = rotary_emb(dummy, positions)  # [1, max_len, rotary_dim]
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    def _eager(self, position_ids: torch.Tensor):
        dummy = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.rotary_emb(dummy, position_ids)

    def prefill(self, seq_len: int, start: int = 0):
        """(cos, sin) [1, S, rotary_dim] for positions start..start+S-1."""
        if self.eager:
            return self._eager(torch.arange(start, start + seq_len, device=self.device).unsqueeze(0))
        end = start + seq_len
        return self.cos[start:end].unsqueeze(0), self.sin[start:end].unsqueeze(0)

    def decode(self, positions: torch.Tensor):
        """(cos, sin) [B, 1, rotary_dim] for positions [B] (already clamped to the table)."""
        if self.eager:
            return self._eager(positions.unsqueeze(1))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
