"""The static KV cache: one [B, Hkv, Tmax, D] key and value tensor per layer, allocated once.

Sequence b lives in row b from slot 0 (no left padding): its tokens occupy slots [0, length_b).
Prefill writes slots [0, S) of every row (slots past a shorter prompt's length hold pad garbage that
decode never reads and overwrites as the sequence grows). Batch buckets use the leading rows
(``view(batch)``: contiguous views of the same storage), so CUDA graphs of every bucket share it.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.batch, self.max_len = batch, max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def layer(self, i: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) for the first ``batch`` rows: views, no copy."""
        return self.k[i][:batch], self.v[i][:batch]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
