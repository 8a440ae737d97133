"""One contiguous storage for weights that one GEMM consumes together (QKV, gate/up, per-head norms).

The HF Parameters stay registered under their own names but become row views into the fused
tensor, so ``state_dict`` keys and values are unchanged and the weights are held once, not twice.
``transformers.save_pretrained`` clones disjoint views before writing safetensors, so a patched
model saves a plain HF checkpoint. ``.to()``/``.half()`` replace each Parameter's data separately,
which breaks the sharing: the fused modules re-fuse after every ``_apply``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def fuse_parameters(params: list[nn.Parameter]) -> torch.Tensor:
    """Concatenate ``params`` along dim 0 and re-point each one at its slice. Returns the fused tensor."""
    fused = torch.cat([p.detach() for p in params], dim=0)
    offset = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[offset:offset + n]
        offset += n
    return fused


def unfuse_parameters(params: list[nn.Parameter]) -> None:
    """Give each Parameter its own storage again (the fused tensor is freed once all are cloned)."""
    for p in params:
        p.data = p.data.clone()
