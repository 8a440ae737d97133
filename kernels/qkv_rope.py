# QKV epilogue (fastlm.ops.qkv): split + optional qk-layernorm + partial RoPE (+ KV-cache write),
# one kernel launch per call.
#
# Algorithm: grid (B*S tokens, blocks of BLOCK_H "head slots"). Slot j in [0, H + 2*Hkv) is q head j,
# k head j-H or v head j-H-Hkv; a program holds a [BLOCK_H, BLOCK_D] tile (BLOCK_D =
# next_power_of_2(D), masked, so D = 40/80 work) of one token's head vectors, read straight from the
# fused GEMM output in either layout: "split" [q heads | k heads | v heads] (slot j at column j*D) or
# Persimmon's head-major [H, 3, D] (q_h at 3hD, k_h at 3hD+D, v_h at 3hD+2D), no copy, any token/batch
# strides. Per row, in fp32:
#   1. qk-layernorm (q rows if q weights given, k rows if k weights given): mean/var over D, then
#      * w[d] (+ b[d]); w is [D] (shared, Persimmon; head stride 0) or [heads, D] (StableLM).
#   2. RoPE on d < rotary_dim: out[d] = x[d]*cos[f(d)] + sign(d)*x[p(d)]*sin[f(d)] with partner p and
#      frequency f: neox p(d) = d +/- r/2, f(d) = d mod r/2, sign - for the first half; gptj
#      (interleaved) p(d) = d ^ 1, f(d) = d // 2, sign - for even d. Only the first r/2 columns of
#      HF's cos/sin tables are read; a batch dim of 1 is broadcast with a zero stride.
#      The partner values are a second, gathered load of the same row (L1/L2 hit, no extra DRAM
#      traffic) normalised with the same row statistics: Triton has no intra-tile lane shuffle.
#   3. One rounding, then stores: q -> [B, H, S, D]; k, v -> [B, Hkv, S, D], or (cache variant) into
#      k_cache / v_cache [B, Hkv, Tmax, D] at row cache_positions[b, s] (cast to the cache dtype). The
#      stores of a position outside [0, Tmax) are masked off: never out of bounds. On CPU tensors (the
#      interpreter) such positions raise first, as in every backend; on CUDA checking them would be a
#      host sync (fastlm.ops.qkv's docstring).
# Offsets are int64 (batch, token, cache position and head index are widened before multiplying).
#
# Bytes moved vs minimum: qkv is read once ((H + 2Hkv) * D elements a token), the r/2 cos and sin
# columns once a token (tiny, and shared by all heads of the token: cached), norm weights once per
# program (L2-resident); q, k, v written once. That is the minimum (read input once, write outputs
# once). The eager composition (split views, layer_norm, 2 muls, rotate_half cat, add, cat with the
# pass-through part, transpose copies, index_copy into the cache) makes ~10 passes over q and k.
#
# Trade-offs: the tile mixes q/k/v rows, so every row pays the (masked) norm and rope instructions;
# the op is memory-bound and the alternative (one launch per section) costs launches. BLOCK_H is
# chosen from D so a tile is ~2K elements: enough work per program without starving decode
# (B*S = batch) of parallelism. H, Hkv, D and rotary_dim are compile-time constants (one
# specialisation per model shape), which makes the slot -> section arithmetic free.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm._checks import check_positions

from ._utils import cast_out, check_device, launch, on_device, register_op

TILE = 2048  # elements per program (BLOCK_H * BLOCK_D)


@triton.jit
def _affine_rows(xf, y, sel, head, cidx, cmask, W, B, w_hs, b_hs, HAS_B: tl.constexpr):
    """xf with the rows selected by sel replaced by y * w[head] (+ b[head]) at head-dim columns cidx."""
    m = cmask & sel[:, None]
    yw = y * tl.load(W + head[:, None] * w_hs + cidx, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        yw += tl.load(B + head[:, None] * b_hs + cidx, mask=m, other=0.0).to(tl.float32)
    return tl.where(sel[:, None], yw, xf)


@triton.jit
def _qk_affine(xf, cidx, cmask, mean, rstd, hq, hk, is_q, is_k, QW, QB, KW, KB, qw_hs, qb_hs, kw_hs, kb_hs,
               HAS_QN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KN: tl.constexpr, HAS_KB: tl.constexpr):
    """qk-layernorm of the values xf at head-dim columns cidx ([BLOCK_H, BLOCK_D]), rows' mean/rstd given."""
    y = (xf - mean[:, None]) * rstd[:, None]
    if HAS_QN:
        xf = _affine_rows(xf, y, is_q, hq, cidx, cmask, QW, QB, qw_hs, qb_hs, HAS_QB)
    if HAS_KN:
        xf = _affine_rows(xf, y, is_k, hk, cidx, cmask, KW, KB, kw_hs, kb_hs, HAS_KB)
    return xf


# t_max (the cache length) only masks the cache stores: not specialised, so every cache length shares one
# compiled kernel.
@triton.jit(do_not_specialize=["t_max"])
def _qkv_rope_kernel(QKV, COS, SIN, QW, QB, KW, KB, Q, K, V, POS,
                     S, stride_xb, stride_xs,
                     stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,
                     qw_hs, qb_hs, kw_hs, kb_hs,
                     stride_qb, stride_qh, stride_qs,
                     stride_kb, stride_kh, stride_ks,
                     stride_vb, stride_vh, stride_vs,
                     stride_pb, stride_ps, t_max, eps,
                     H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr,
                     INTERLEAVED: tl.constexpr, HEAD_MAJOR: tl.constexpr,
                     HAS_QN: tl.constexpr, HAS_QB: tl.constexpr, HAS_KN: tl.constexpr, HAS_KB: tl.constexpr,
                     CACHE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // S
    s = tok % S
    slot = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    is_q = slot < H
    is_k = (slot >= H) & (slot < H + HKV)
    is_v = (slot >= H + HKV) & (slot < H + 2 * HKV)
    hq = slot.to(tl.int64)
    hk = hq - H
    hv = hq - H - HKV
    if HEAD_MAJOR:
        col = tl.where(is_q, hq * (3 * D), tl.where(is_k, hk * (3 * D) + D, hv * (3 * D) + 2 * D))
    else:
        col = hq * D
    row = QKV + b * stride_xb + s * stride_xs + col[:, None]
    m2 = (slot < H + 2 * HKV)[:, None] & dmask[None, :]
    x = tl.load(row + d[None, :], mask=m2, other=0.0).to(tl.float32)

    if HAS_QN or HAS_KN:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        x = _qk_affine(x, d[None, :], m2, mean, rstd, hq, hk, is_q, is_k, QW, QB, KW, KB,
                       qw_hs, qb_hs, kw_hs, kb_hs, HAS_QN, HAS_QB, HAS_KN, HAS_KB)
    else:
        mean = tl.zeros((BLOCK_H,), tl.float32)
        rstd = mean

    if ROT > 0:
        HALF: tl.constexpr = ROT // 2
        in_rot = d < ROT
        if INTERLEAVED:
            partner = d ^ 1
            fidx = d // 2
            first = (d % 2) == 0
        else:
            first = d < HALF
            partner = tl.where(first, d + HALF, d - HALF)
            fidx = tl.where(first, d, d - HALF)
        pm = m2 & in_rot[None, :] & (is_q | is_k)[:, None]
        xp = tl.load(row + partner[None, :], mask=pm, other=0.0).to(tl.float32)
        if HAS_QN or HAS_KN:
            xp = _qk_affine(xp, partner[None, :], pm, mean, rstd, hq, hk, is_q, is_k, QW, QB, KW, KB,
                            qw_hs, qb_hs, kw_hs, kb_hs, HAS_QN, HAS_QB, HAS_KN, HAS_KB)
        c = tl.load(COS + b * stride_cb + s * stride_cs + fidx * stride_cd, mask=in_rot, other=1.0).to(tl.float32)
        sn = tl.load(SIN + b * stride_sb + s * stride_ss + fidx * stride_sd, mask=in_rot, other=0.0).to(tl.float32)
        sn = tl.where(first, -sn, sn)
        x = tl.where(pm, x * c[None, :] + xp * sn[None, :], x)

    k_mask = m2 & is_k[:, None]
    v_mask = m2 & is_v[:, None]
    if CACHE:
        t = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)
        t_rows = t + tl.zeros((BLOCK_H,), tl.int64)  # a [BLOCK_H] mask: the interpreter rejects scalar ones
        in_cache = ((t_rows >= 0) & (t_rows < t_max))[:, None]
        k_mask = k_mask & in_cache
        v_mask = v_mask & in_cache
    else:
        t = s
    dd = d[None, :]
    tl.store(Q + b * stride_qb + hq[:, None] * stride_qh + s * stride_qs + dd, cast_out(x, Q.dtype.element_ty),
             mask=m2 & is_q[:, None])
    tl.store(K + b * stride_kb + hk[:, None] * stride_kh + t * stride_ks + dd, cast_out(x, K.dtype.element_ty),
             mask=k_mask)
    tl.store(V + b * stride_vb + hv[:, None] * stride_vh + t * stride_vs + dd, cast_out(x, V.dtype.element_ty),
             mask=v_mask)


def _norm_param(t, heads):
    """(tensor, head stride): [D] -> stride 0 (shared), [heads, D] -> row stride."""
    if t is None:
        return None, 0
    t = t.contiguous()
    return t, (0 if t.dim() == 1 else t.stride(0))


def _launch(qkv, cos, sin, qw, qb, kw, kb, q, k, v, pos, H, HKV, D, ROT, interleaved, head_major, eps):
    B, S, _ = qkv.shape
    if B * S == 0:
        return
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    qw, qw_hs = _norm_param(qw, H)
    qb, qb_hs = _norm_param(qb, H)
    kw, kw_hs = _norm_param(kw, HKV)
    kb, kb_hs = _norm_param(kb, HKV)
    if ROT > 0:
        cb = 0 if cos.shape[0] == 1 else cos.stride(0)
        sb = 0 if sin.shape[0] == 1 else sin.stride(0)
        cos_args = (cb, cos.stride(1), cos.stride(2), sb, sin.stride(1), sin.stride(2))
    else:
        cos_args = (0, 0, 0, 0, 0, 0)
    cache = pos is not None
    pos_args = (pos.stride(0), pos.stride(1), k.shape[2]) if cache else (0, 0, S)
    dummy = qkv
    block_d = triton.next_power_of_2(D)
    slots = H + 2 * HKV
    block_h = max(1, min(triton.next_power_of_2(slots), TILE // block_d))
    grid = (B * S, triton.cdiv(slots, block_h))
    with on_device(qkv):
        launch(_qkv_rope_kernel)[grid](
            qkv, cos if ROT > 0 else dummy, sin if ROT > 0 else dummy,
            qw if qw is not None else dummy, qb if qb is not None else dummy,
            kw if kw is not None else dummy, kb if kb is not None else dummy,
            q, k, v, pos if cache else dummy,
            S, qkv.stride(0), qkv.stride(1), *cos_args, qw_hs, qb_hs, kw_hs, kb_hs,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *pos_args, eps,
            H=H, HKV=HKV, D=D, ROT=ROT, INTERLEAVED=interleaved, HEAD_MAJOR=head_major,
            HAS_QN=qw is not None, HAS_QB=qw is not None and qb is not None,
            HAS_KN=kw is not None, HAS_KB=kw is not None and kb is not None,
            CACHE=cache, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)


@register_op("triton_qkv_rope")
def triton_qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_norm_weight: torch.Tensor | None,
                    q_norm_bias: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                    k_norm_bias: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int,
                    rotary_dim: int, interleaved: bool, qkv_head_major: bool,
                    qk_norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device(qkv, cos, sin)
    B, S, _ = qkv.shape
    q = qkv.new_empty((B, num_heads, S, head_dim))
    k = qkv.new_empty((B, num_kv_heads, S, head_dim))
    v = qkv.new_empty((B, num_kv_heads, S, head_dim))
    _launch(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, q, k, v, None, num_heads,
            num_kv_heads, head_dim, rotary_dim, interleaved, qkv_head_major, qk_norm_eps)
    return q, k, v


@register_op("triton_qkv_rope_cache", mutates_args=("k_cache", "v_cache"))
def triton_qkv_rope_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          q_norm_weight: torch.Tensor | None, q_norm_bias: torch.Tensor | None,
                          k_norm_weight: torch.Tensor | None, k_norm_bias: torch.Tensor | None,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, cache_positions: torch.Tensor,
                          num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool,
                          qkv_head_major: bool, qk_norm_eps: float) -> torch.Tensor:
    check_device(qkv, cos, sin, k_cache, v_cache, cache_positions)
    if any(c.stride(-1) != 1 and head_dim > 1 and not c.is_contiguous() for c in (k_cache, v_cache)):
        raise ValueError("fastlm.kernels: k_cache/v_cache need a unit stride along head_dim (written in place)")
    check_positions(cache_positions, k_cache.shape[2])  # CPU tensors only (fastlm.ops.qkv)
    B, S, _ = qkv.shape
    q = qkv.new_empty((B, num_heads, S, head_dim))
    _launch(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, q, k_cache, v_cache,
            cache_positions, num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, qkv_head_major,
            qk_norm_eps)
    return q


def qkv_rope(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads: int,
             num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, qkv_head_major: bool,
             qk_norm_eps: float):
    """Backend entry point, the signature of fastlm.ops.qkv.qkv_rope_ref."""
    check_device(qkv, cos, sin)
    return torch.ops.fastlm.triton_qkv_rope(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias,
                                            num_heads, num_kv_heads, head_dim, rotary_dim, interleaved,
                                            qkv_head_major, qk_norm_eps)


def qkv_rope_cache(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                   cache_positions, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                   interleaved: bool, qkv_head_major: bool, qk_norm_eps: float):
    """Backend entry point, the signature of fastlm.ops.qkv.qkv_rope_cache_ref."""
    check_device(qkv, cos, sin, k_cache, v_cache, cache_positions)
    return torch.ops.fastlm.triton_qkv_rope_cache(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight,
                                                  k_norm_bias, k_cache, v_cache, cache_positions, num_heads,
                                                  num_kv_heads, head_dim, rotary_dim, interleaved,
                                                  qkv_head_major, qk_norm_eps)


# op -> (entry point, its torch.library op): what the Triton backend plugin (fastlm/backends/triton.py) serves
ENTRY_POINTS = {"qkv_rope": (qkv_rope, "fastlm::triton_qkv_rope"),
                "qkv_rope_cache": (qkv_rope_cache, "fastlm::triton_qkv_rope_cache")}
