"""Attention: SDPA prefill and decode over a static KV cache with per-sequence lengths (GQA).

* ``prefill_attention(q, k, v, ...)``: q [B, H, S, D], k/v [B, Hkv, T, D]. Eager SDPA (or flash-attn
  when installed and on CUDA); GQA through ``enable_gqa``. No fused kernel: SDPA is the baseline.
* ``decode_attention(q, k_cache, v_cache, lengths, scale)``: one new token per sequence, q [B, H, D],
  caches [B, Hkv, Tmax, D], ``lengths`` [B] (int32/int64, each in [1, Tmax]): sequence b attends to
  cache slots [0, lengths[b]). Query head h reads kv head h // (H / Hkv). fp32 accumulation.
  A kernel reads each sequence's valid K/V once (2 * len * Hkv * D elements) and q once; eager SDPA
  over the full static cache reads Tmax slots and materialises a mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_float, check_same


@register("decode_attention", "torch")
def decode_attention_ref(q, k_cache, v_cache, lengths, scale: float):
    B, H, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]: query heads grouped by their kv head
    scores = torch.einsum("bkgd,bktd->bkgt", qg, k_cache.float()) * scale
    valid = torch.arange(T, device=q.device).view(1, 1, 1, T) < lengths.view(B, 1, 1, 1)
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bkgt,bktd->bkgd", probs, v_cache.float())
    return out.reshape(B, H, D).to(q.dtype)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence over the first ``lengths[b]`` cache slots -> [B, H, D]."""
    check_float("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    B, H, D = q.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_same(name, c, q, "q")
        if c.dim() != 4 or c.shape[0] != B or c.shape[3] != D or H % c.shape[1]:
            raise ValueError(f"{name} must be [B, Hkv, Tmax, D] with B={B}, D={D} and Hkv dividing H={H}, "
                             f"got {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if lengths.dtype not in (torch.int32, torch.int64) or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an int32/int64 [B] = [{B}] tensor, got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    check_same("lengths", lengths, q, "q", dtype=False)
    return dispatch("decode_attention", backend, q.device)(q, k_cache, v_cache, lengths, float(scale))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      *, is_causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """SDPA over q [B, H, S, D], k/v [B, Hkv, T, D] -> [B, H, S, D]. A mask overrides ``is_causal``."""
    if q.is_cuda and attn_mask is None and q.dtype != torch.float32:
        flash = _flash_attn()
        if flash is not None:
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                        causal=is_causal and q.shape[2] > 1)
            return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None
                                          and q.shape[2] > 1, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


_FLASH = []


def _flash_attn():
    if not _FLASH:
        try:
            from flash_attn import flash_attn_func  # optional accelerator
        except Exception:
            flash_attn_func = None
        _FLASH.append(flash_attn_func)
    return _FLASH[0]
