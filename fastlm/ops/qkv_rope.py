"""QKV epilogue: split the fused QKV GEMM output, optional qk-layernorm, partial RoPE, optional KV-cache write.

Input ``qkv``: [B, S, W], the output of one GEMM against the fused QKV weight, in one of two layouts:

* ``per_head_layout=False`` ("split"): W = (H + 2*Hkv) * D, laid out [q heads | k heads | v heads].
* ``per_head_layout=True`` (Persimmon): W = 3 * H * D, laid out [H, 3, D]: q_h, k_h, v_h per head.

Then, per head vector of D elements:

1. qk-layernorm (optional, q and k only): LayerNorm over D with fp32 statistics. ``*_norm_weight`` is
   [D] (shared across heads, Persimmon, with bias) or [heads, D] (one per head, StableLM, no bias).
2. RoPE on the first ``rotary_dim`` elements (even, <= D); the rest passes through. ``cos``/``sin``
   are HF's tables, [B or 1, S, rotary_dim] with each frequency twice (``cat(freqs, freqs)``); only
   the first rotary_dim/2 columns are read. Pairs are (i, i + rotary_dim/2) ("neox", half-split) or
   (2i, 2i+1) when ``interleaved`` (GPT-J; Helium).
3. Outputs q [B, H, S, D], k and v [B, Hkv, S, D]; or, in ``qkv_rope_cache``, k/v are written into
   a static cache [B, Hkv, Tmax, D] at ``cache_positions`` [B, S] and only q is returned.

The reference rounds where HF rounds (LN output, each RoPE product); kernels work in fp32 and round
once. A fused kernel reads qkv (and the rotary_dim/2 cos/sin columns) once and writes q, k, v once:
the minimum. The eager composition makes ~10 passes (views aside: norm, 2 muls, rotate, cat, add, cat).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlm.ops._backend import dispatch, register
from fastlm.ops._checks import check_float, check_same


def split_heads(qkv, num_heads, num_kv_heads, head_dim, per_head_layout):
    """Views of q [B, S, H, D], k and v [B, S, Hkv, D] into the fused QKV output (no copy)."""
    B, S, _ = qkv.shape
    if per_head_layout:
        t = qkv.view(B, S, num_heads, 3, head_dim)
        return t[..., 0, :], t[..., 1, :], t[..., 2, :]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (q.view(B, S, num_heads, head_dim), k.view(B, S, num_kv_heads, head_dim),
            v.view(B, S, num_kv_heads, head_dim))


def qk_norm_ref(x, weight, bias, eps):
    """LayerNorm over D of x [B, S, heads, D]; weight [D] (shared) or [heads, D] (per head)."""
    if weight is None:
        return x
    if weight.dim() == 1:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    # Per-head weights: one LayerNorm per head, as HF's StableLmLayerNormPerHead does (exact in every dtype).
    D = x.shape[-1]
    return torch.stack([F.layer_norm(x[..., h, :], (D,), weight[h], None if bias is None else bias[h], eps)
                        for h in range(weight.shape[0])], dim=-2)


def rope_ref(x, cos, sin, rotary_dim, interleaved):
    """RoPE on x [B, heads, S, D] with HF's [B or 1, S, rotary_dim] tables, in x's dtype (as HF)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    if interleaved:
        cos = cos[..., :half].repeat_interleave(2, dim=-1)
        sin = sin[..., :half].repeat_interleave(2, dim=-1)
        rotated = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rotary_dim == x.shape[-1] else torch.cat((out, rest), dim=-1)


@register("qkv_rope", "torch")
def qkv_rope_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads: int,
                 num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, per_head_layout: bool,
                 qk_norm_eps: float):
    q, k, v = split_heads(qkv, num_heads, num_kv_heads, head_dim, per_head_layout)
    q = qk_norm_ref(q, q_norm_weight, q_norm_bias, qk_norm_eps).transpose(1, 2)
    k = qk_norm_ref(k, k_norm_weight, k_norm_bias, qk_norm_eps).transpose(1, 2)
    if rotary_dim:
        q = rope_ref(q, cos, sin, rotary_dim, interleaved)
        k = rope_ref(k, cos, sin, rotary_dim, interleaved)
    return q, k, v.transpose(1, 2)


@register("qkv_rope_cache", "torch")
def qkv_rope_cache_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                       cache_positions, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                       interleaved: bool, per_head_layout: bool, qk_norm_eps: float):
    q, k, v = qkv_rope_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads,
                           num_kv_heads, head_dim, rotary_dim, interleaved, per_head_layout, qk_norm_eps)
    B, S = cache_positions.shape
    batch = torch.arange(B, device=qkv.device).unsqueeze(1).expand(B, S)
    pos = cache_positions.long()
    k_cache[batch, :, pos] = k.transpose(1, 2).to(k_cache.dtype)  # [B, S, Hkv, D] rows
    v_cache[batch, :, pos] = v.transpose(1, 2).to(v_cache.dtype)
    return q


def _check(qkv, cos, sin, norms, num_heads, num_kv_heads, head_dim, rotary_dim, per_head_layout):
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, S, W], got shape {tuple(qkv.shape)}")
    if per_head_layout and num_kv_heads != num_heads:
        raise ValueError(f"per-head [H, 3, D] layout needs num_kv_heads == num_heads, got {num_kv_heads} != {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.shape[-1] != width:
        raise ValueError(f"qkv's last dim must be (H + 2*Hkv) * D = {width}, got {qkv.shape[-1]}")
    if rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={head_dim}], got {rotary_dim}")
    B, S = qkv.shape[:2]
    for name, t in (("cos", cos), ("sin", sin)):
        check_same(name, t, qkv, "qkv")
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or t.shape[2] < rotary_dim:
            raise ValueError(f"{name} must be [B or 1, S, rotary_dim] = [{B} or 1, {S}, {rotary_dim}], "
                             f"got {tuple(t.shape)}")
    for name, t, heads in norms:
        check_same(name, t, qkv, "qkv")
        if t is not None and tuple(t.shape) not in ((head_dim,), (heads, head_dim)):
            raise ValueError(f"{name} must be [D] = [{head_dim}] or [heads, D] = [{heads}, {head_dim}], "
                             f"got {tuple(t.shape)}")


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, num_kv_heads: int,
             head_dim: int, rotary_dim: int, interleaved: bool = False, per_head_layout: bool = False,
             q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm_eps: float = 1e-5,
             backend: str = "auto"):
    """Split + qk-norm + RoPE. Returns q [B, H, S, D], k, v [B, Hkv, S, D]."""
    norms = (("q_norm_weight", q_norm_weight, num_heads), ("q_norm_bias", q_norm_bias, num_heads),
             ("k_norm_weight", k_norm_weight, num_kv_heads), ("k_norm_bias", k_norm_bias, num_kv_heads))
    _check(qkv, cos, sin, norms, num_heads, num_kv_heads, head_dim, rotary_dim, per_head_layout)
    return dispatch("qkv_rope", backend, qkv.device)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, int(num_heads), int(num_kv_heads),
        int(head_dim), int(rotary_dim), bool(interleaved), bool(per_head_layout), float(qk_norm_eps))


def qkv_rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_positions: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                   head_dim: int, rotary_dim: int, interleaved: bool = False, per_head_layout: bool = False,
                   q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                   qk_norm_eps: float = 1e-5, backend: str = "auto"):
    """Like :func:`qkv_rope`, but writes k/v into ``k_cache``/``v_cache`` [B, Hkv, Tmax, D] at
    ``cache_positions`` [B, S] and returns only q [B, H, S, D]. Positions must be < Tmax (not
    checked on the device, which would cost a host sync; the engine bounds them)."""
    norms = (("q_norm_weight", q_norm_weight, num_heads), ("q_norm_bias", q_norm_bias, num_heads),
             ("k_norm_weight", k_norm_weight, num_kv_heads), ("k_norm_bias", k_norm_bias, num_kv_heads))
    _check(qkv, cos, sin, norms, num_heads, num_kv_heads, head_dim, rotary_dim, per_head_layout)
    B, S = qkv.shape[:2]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_same(name, c, qkv, "qkv")
        if c.dim() != 4 or c.shape[0] != B or c.shape[1] != num_kv_heads or c.shape[3] != head_dim:
            raise ValueError(f"{name} must be [B, Hkv, Tmax, D] = [{B}, {num_kv_heads}, Tmax, {head_dim}], "
                             f"got {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if cache_positions.dtype not in (torch.int32, torch.int64) or tuple(cache_positions.shape) != (B, S):
        raise ValueError(f"cache_positions must be an int32/int64 [B, S] = [{B}, {S}] tensor, got "
                         f"{cache_positions.dtype} {tuple(cache_positions.shape)}")
    check_same("cache_positions", cache_positions, qkv, "qkv", dtype=False)
    return dispatch("qkv_rope_cache", backend, qkv.device)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache, cache_positions,
        int(num_heads), int(num_kv_heads), int(head_dim), int(rotary_dim), bool(interleaved), bool(per_head_layout),
        float(qk_norm_eps))
