"""The QKV epilogue ops ``qkv_rope`` and ``qkv_rope_cache``: split the fused QKV GEMM output, optional
qk-layernorm, partial RoPE, optional KV-cache write.

Input ``qkv``: [B, S, W], the output of one GEMM against the fused QKV weight, in one of two layouts:

* ``qkv_head_major=False`` ("split"): W = (H + 2*Hkv) * D, laid out [q heads | k heads | v heads].
* ``qkv_head_major=True`` (Persimmon, "head-major"): W = 3 * H * D, laid out [H, 3, D]: q_h, k_h, v_h of
  each head side by side. (Not to be confused with StableLM's per-head qk-norm below, a weight per head.)

Then, per head vector of D elements:

1. qk-layernorm (optional, q and k only): LayerNorm over D with fp32 statistics. ``*_norm_weight`` is
   [D] (shared across heads, Persimmon, with bias) or [heads, D] (one per head, StableLM, no bias).
2. RoPE on the first ``rotary_dim`` elements (even, <= D); the rest passes through. ``cos``/``sin``
   are HF's tables, [B or 1, S, rotary_dim] with each frequency twice (``cat(freqs, freqs)``); only
   the first rotary_dim/2 columns are read. Pairs are (i, i + rotary_dim/2) ("neox", half-split) or
   (2i, 2i+1) when ``interleaved`` (GPT-J; Helium).
3. Outputs q [B, H, S, D], k and v [B, Hkv, S, D]; or, in ``qkv_rope_cache``, k/v are written into
   a static cache [B, Hkv, Tmax, D] at ``cache_positions`` [B, S] and only q is returned.

Cache positions outside [0, Tmax) raise a ValueError on CPU tensors in every backend, before anything
is written. On CUDA they are not checked (their values live on the device: a check is a host sync per
call), nor by the reference inside a torch.compile graph (which cannot branch on them): the kernels
(Triton, CUDA C++) skip the k/v rows of such a position and never write out of bounds; the reference
indexes as PyTorch does (an index error past Tmax, a device-side assert on CUDA; a negative position
counts from the end). The CUDA C++ kernel takes head_dim <= 256 (a ValueError beyond).

The reference rounds where HF rounds (LN output, each RoPE product); kernels work in fp32 and round
once. A fused kernel reads qkv (and the rotary_dim/2 cos/sin columns) once and writes q, k, v once:
the minimum. The eager composition makes ~10 passes (views aside: norm, 2 muls, rotate, cat, add, cat).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlm._checks import (as_eps, as_int, check_float, check_index, check_no_internal_overlap, check_positions,
                            check_same, device_of)
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["qkv_rope", "qkv_rope_cache", "qkv_rope_ref", "qkv_rope_cache_ref"]


def split_heads(qkv, num_heads, num_kv_heads, head_dim, qkv_head_major):
    """Views of q [B, S, H, D], k and v [B, S, Hkv, D] into the fused QKV output (no copy)."""
    B, S, _ = qkv.shape
    if qkv_head_major:
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


def rope_tables(cos, sin, rotary_dim, interleaved):
    """rope_ref's multipliers from HF's [B or 1, S, >= rotary_dim] tables, built once for q and k from
    their first rotary_dim/2 columns, as the kernels read them (HF's tables repeat those columns: the
    same values there, and the kernels' answer for any table). cos [.., 1, S, 1, R/2] and the signed
    sin [.., 1, S, 2, R/2] for the half-split pairs; [.., R/2, 1] and [.., R/2, 2] for interleaved ones."""
    half = rotary_dim // 2
    c, s = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)  # [B or 1, 1, S, R/2]
    pair_dim = -1 if interleaved else -2
    return c.unsqueeze(pair_dim), torch.stack((-s, s), dim=pair_dim)


def rope_ref(x, cos, sin, rotary_dim, interleaved):
    """RoPE on x [B, heads, S, D] with rope_tables' multipliers, in x's dtype: per pair (x0, x1),
    (x0 * c - x1 * s, x1 * c + x0 * s), each product and sum rounded as HF's
    ``rot * cos + rotate_half(rot) * sin`` rounds them."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    pairs = rot.unflatten(-1, (half, 2) if interleaved else (2, half))
    out = (pairs * cos + pairs.flip(-1 if interleaved else -2) * sin).flatten(-2)
    return out if rotary_dim == x.shape[-1] else torch.cat((out, rest), dim=-1)


def qkv_rope_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads: int,
                 num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, qkv_head_major: bool,
                 qk_norm_eps: float):
    q, k, v = split_heads(qkv, num_heads, num_kv_heads, head_dim, qkv_head_major)
    q = qk_norm_ref(q, q_norm_weight, q_norm_bias, qk_norm_eps).transpose(1, 2)
    k = qk_norm_ref(k, k_norm_weight, k_norm_bias, qk_norm_eps).transpose(1, 2)
    if rotary_dim:
        cos, sin = rope_tables(cos, sin, rotary_dim, interleaved)
        q = rope_ref(q, cos, sin, rotary_dim, interleaved)
        k = rope_ref(k, cos, sin, rotary_dim, interleaved)
    return q, k, v.transpose(1, 2)


def qkv_rope_cache_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                       cache_positions, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                       interleaved: bool, qkv_head_major: bool, qk_norm_eps: float):
    check_positions(cache_positions, k_cache.shape[2])  # before writing anything
    q, k, v = qkv_rope_ref(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads,
                           num_kv_heads, head_dim, rotary_dim, interleaved, qkv_head_major, qk_norm_eps)
    B, S = cache_positions.shape
    batch = torch.arange(B, device=qkv.device).unsqueeze(1).expand(B, S)
    pos = cache_positions.long()
    k_cache[batch, :, pos] = k.transpose(1, 2).to(k_cache.dtype)  # [B, S, Hkv, D] rows
    v_cache[batch, :, pos] = v.transpose(1, 2).to(v_cache.dtype)
    return q


def _same_device(qkv, **tensors):
    for name, t in tensors.items():
        check_same(name, t, qkv, "qkv", dtype=False)


def _qkv_rope_fake(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads, num_kv_heads,
                   head_dim, rotary_dim, interleaved, qkv_head_major, qk_norm_eps):
    # also run for a call mixing meta and real tensors, where no kernel checks the devices
    _same_device(qkv, cos=cos, sin=sin, q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias,
                 k_norm_weight=k_norm_weight, k_norm_bias=k_norm_bias)
    B, S = qkv.shape[0], qkv.shape[1]
    return (qkv.new_empty((B, num_heads, S, head_dim)), qkv.new_empty((B, num_kv_heads, S, head_dim)),
            qkv.new_empty((B, num_kv_heads, S, head_dim)))


def _qkv_rope_cache_fake(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                         cache_positions, num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, qkv_head_major,
                         qk_norm_eps):
    _same_device(qkv, cos=cos, sin=sin, q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias,
                 k_norm_weight=k_norm_weight, k_norm_bias=k_norm_bias, k_cache=k_cache, v_cache=v_cache,
                 cache_positions=cache_positions)
    return qkv.new_empty((qkv.shape[0], num_heads, qkv.shape[1], head_dim))


QKV_ROPE = declare("qkv_rope", qkv_rope_ref, fake=_qkv_rope_fake)
QKV_ROPE_CACHE = declare("qkv_rope_cache", qkv_rope_cache_ref, fake=_qkv_rope_cache_fake)


def _as_static(num_heads, num_kv_heads, head_dim, rotary_dim, qk_norm_eps):
    """The static arguments as validated Python numbers (the common case, plain ints and a float in
    range, in a few comparisons: these checks run on every public call)."""
    if (type(num_heads) is not int or type(num_kv_heads) is not int or type(head_dim) is not int
            or type(rotary_dim) is not int or num_heads < 1 or num_kv_heads < 1 or head_dim < 1 or rotary_dim < 0):
        num_heads, num_kv_heads = as_int("num_heads", num_heads, 1), as_int("num_kv_heads", num_kv_heads, 1)
        head_dim, rotary_dim = as_int("head_dim", head_dim, 1), as_int("rotary_dim", rotary_dim, 0)
    if type(qk_norm_eps) is not float or not 0.0 <= qk_norm_eps < math.inf:
        qk_norm_eps = as_eps("qk_norm_eps", qk_norm_eps)
    return num_heads, num_kv_heads, head_dim, rotary_dim, qk_norm_eps


def _check(qkv, cos, sin, norms, H, Hkv, D, R, qkv_head_major, eps) -> None:
    """The qkv_rope arguments (csrc/checks.h, check_qkv_args, raises the same errors); ``norms``: the
    q/k norm weight and bias (or None); the static ones already through :func:`_as_static`."""
    check_float("qkv", qkv)
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, S, W], got shape {tuple(qkv.shape)}")
    if qkv_head_major and Hkv != H:
        raise ValueError(f"head-major [H, 3, D] layout needs num_kv_heads == num_heads, got {Hkv} != {H}")
    if H % Hkv:
        raise ValueError(f"num_heads ({H}) must be a multiple of num_kv_heads ({Hkv})")
    width = (H + 2 * Hkv) * D
    if qkv.shape[-1] != width:
        raise ValueError(f"qkv's last dim must be (H + 2*Hkv) * D = {width}, got {qkv.shape[-1]}")
    if R % 2 or R > D:
        raise ValueError(f"rotary_dim must be even and in [0, head_dim={D}], got {R}")
    B, S = qkv.shape[:2]
    for name, t in (("cos", cos), ("sin", sin)):
        check_same(name, t, qkv, "qkv", required=True)
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != S or t.shape[2] < R:
            raise ValueError(f"{name} must be [B or 1, S, rotary_dim] = [{B} or 1, {S}, {R}], got {tuple(t.shape)}")
    qw, qb, kw, kb = norms
    if qw is not None or qb is not None or kw is not None or kb is not None:
        for name, t, heads in (("q_norm_weight", qw, H), ("q_norm_bias", qb, H), ("k_norm_weight", kw, Hkv),
                               ("k_norm_bias", kb, Hkv)):
            check_same(name, t, qkv, "qkv")
            if t is not None and tuple(t.shape) not in ((D,), (heads, D)):
                raise ValueError(f"{name} must be [D] = [{D}] or [heads, D] = [{heads}, {D}], got {tuple(t.shape)}")
        for kind, weight, bias in (("q", qw, qb), ("k", kw, kb)):
            if bias is not None and weight is None:  # the reference would drop the bias
                raise ValueError(f"{kind}_norm_bias needs {kind}_norm_weight")


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, num_heads: int, num_kv_heads: int,
             head_dim: int, rotary_dim: int, interleaved: bool = False, qkv_head_major: bool = False,
             q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None, qk_norm_eps: float = 1e-5,
             backend: str = "auto"):
    """Split + qk-norm + RoPE. Returns q [B, H, S, D], k, v [B, Hkv, S, D]. Differentiable: with grad
    enabled and an input requiring grad, the reference computes it."""
    norms = (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    fn = dispatch("qkv_rope", backend, device_of("qkv", qkv))
    H, Hkv, D, R, eps = _as_static(num_heads, num_kv_heads, head_dim, rotary_dim, qk_norm_eps)
    _check(qkv, cos, sin, norms, H, Hkv, D, R, qkv_head_major, eps)
    args = (qkv, cos, sin, *norms, H, Hkv, D, R, bool(interleaved), bool(qkv_head_major), eps)
    q, k, v = fn(*args)
    if q.requires_grad and fn is not qkv_rope_ref:  # a kernel has no backward: the reference's graph
        return qkv_rope_ref(*args)
    return q, k, v


def qkv_rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, cache_positions: torch.Tensor, *, num_heads: int, num_kv_heads: int,
                   head_dim: int, rotary_dim: int, interleaved: bool = False, qkv_head_major: bool = False,
                   q_norm_weight=None, q_norm_bias=None, k_norm_weight=None, k_norm_bias=None,
                   qk_norm_eps: float = 1e-5, backend: str = "auto"):
    """Like :func:`qkv_rope`, but writes k/v into ``k_cache``/``v_cache`` [B, Hkv, Tmax, D] (qkv's dtype,
    unit stride along D, written in place) at ``cache_positions`` [B, S] and returns only q [B, H, S, D].
    Positions must be in [0, Tmax): see the module docstring for what happens otherwise."""
    norms = (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    fn = dispatch("qkv_rope_cache", backend, device_of("qkv", qkv))
    H, Hkv, D, R, eps = _as_static(num_heads, num_kv_heads, head_dim, rotary_dim, qk_norm_eps)
    _check_cache(qkv, cos, sin, norms, k_cache, v_cache, cache_positions, H, Hkv, D, R, qkv_head_major, eps)
    args = (qkv, cos, sin, *norms, k_cache, v_cache, cache_positions, H, Hkv, D, R, bool(interleaved),
            bool(qkv_head_major), eps)
    q = fn(*args)
    if q.requires_grad and fn is not qkv_rope_cache_ref:  # rewrites the caches with the reference's rows
        return qkv_rope_cache_ref(*args)
    return q


def _check_cache(qkv, cos, sin, norms, k_cache, v_cache, cache_positions, H, Hkv, D, R, qkv_head_major, eps):
    """The qkv_rope_cache arguments (csrc/checks.h, check_qkv_args and check_caches, raise the same errors)."""
    _check(qkv, cos, sin, norms, H, Hkv, D, R, qkv_head_major, eps)
    B, S = qkv.shape[:2]
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_same(name, c, qkv, "qkv", required=True)
        if c.dim() != 4 or c.shape[0] != B or c.shape[1] != Hkv or c.shape[3] != D:
            raise ValueError(f"{name} must be [B, Hkv, Tmax, D] = [{B}, {Hkv}, Tmax, {D}], got {tuple(c.shape)}")
        if not c.is_contiguous():  # (a contiguous tensor passes both checks)
            if c.stride(3) != 1 and D > 1:
                raise ValueError(f"{name}'s last dim must be contiguous (it is written in place), got strides "
                                 f"{c.stride()}")
            check_no_internal_overlap(c)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    if k_cache.data_ptr() == v_cache.data_ptr() and k_cache.numel():
        raise ValueError("k_cache and v_cache must be different tensors (both are written)")
    check_index("cache_positions", cache_positions, (B, S), qkv, "qkv")
