# Decode attention (fastlm.ops.attention.decode_attention): one new query token per sequence against a
# static KV cache [B, Hkv, Tmax, D], reading only each sequence's valid prefix [0, lengths[b]).
#
# Algorithm (flash-decoding, two launches):
#   1. Split kernel, grid (B * Hkv, NUM_SPLITS). A program owns one (sequence, kv head) and ALL of
#      its G = H / Hkv query heads (GQA: query head h reads kv head h // G), stacked as the rows of a
#      [BLOCK_G, BLOCK_D] fp32 tile (BLOCK_G = max(16, next_pow2(G)): tl.dot's minimum), so each K/V
#      tile is loaded once for the whole group instead of G times. It walks its slice of the
#      sequence, [split * chunk, min((split + 1) * chunk, length)), in BLOCK_T tiles with an online
#      softmax in the exp2 domain (scale * log2(e) folded into q): running max m, running sum l and
#      an unnormalised fp32 accumulator; it stores (m, l, acc) per (b, h, split). The loop bound
#      comes from the lengths tensor on the device: slots past a sequence's length are never read,
#      and a split that starts past it stores (-inf, 0, 0). A length is clamped to Tmax, so no slot
#      past the cache is ever read; lengths outside [1, Tmax] raise first on CPU tensors (the
#      interpreter), as in every backend, and on CUDA (unchecked: a host sync) a length <= 0 gives
#      NaN rows, as the reference does (fastlm.ops.attention's docstring).
#   2. Reduce kernel, grid (B * H): out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i, M = max_i m_i.
# NUM_SPLITS depends only on Tmax and B * Hkv (never on the lengths' values: no host sync, one
# shape for CUDA-graph capture): enough programs to fill the GPU about twice, no split shorter than
# MIN_CHUNK slots, at most MAX_SPLITS.
# All arithmetic is fp32: K and V tiles are upcast after loading and the dots run with
# input_precision="ieee" (no TF32), matching the reference's fp32 einsums. Decode is memory-bound
# (one query row per K row), so fp32 FMAs cost nothing measurable against the K/V traffic.
#
# Bytes moved vs minimum: K and V are read once over the valid prefix (2 * len_b * Hkv * D elements
# per sequence, the minimum) plus q once; the partials add B * H * NUM_SPLITS * (D + 2) fp32 written
# and read once (small against the cache reads for len >> NUM_SPLITS). Eager SDPA over the static
# cache reads all Tmax slots (Tmax / len more), materialises the mask and repeats K/V for GQA.
#
# Trade-offs: padding G up to 16 rows wastes MMA lanes when G < 16 (no GQA: 16x the flops), which is
# still far below the memory roofline for decode; a split that lands entirely past a short
# sequence's length still launches (and exits at once) because the split count must be static.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.ops.attention import check_lengths

from ._utils import cast_out, check_device, launch, register_op, sm_count

MIN_CHUNK = 256
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(Q, K, V, LEN, M_OUT, L_OUT, ACC,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                         stride_len, t_max, chunk, qk_scale,
                         HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // HKV
    hk = pid % HKV
    split = tl.program_id(1)
    length = tl.minimum(tl.load(LEN + b * stride_len).to(tl.int64), t_max).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    gm = g < G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    heads = hk * G + g  # query heads of this kv head
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0).to(tl.float32) * qk_scale

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    tt = tl.arange(0, BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tt
        tm = t < end
        t64 = t.to(tl.int64)
        kv_mask = tm[:, None] & dm[None, :]
        k = tl.load(k_base + t64[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_G, BLOCK_T], log2 domain
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds >= 1 valid slot
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + t64[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new

    row = (b * (HKV * G) + heads) * NUM_SPLITS + split  # [B, H, NUM_SPLITS]
    tl.store(M_OUT + row, m_i, mask=gm)
    tl.store(L_OUT + row, l_i, mask=gm)
    tl.store(ACC + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])


@triton.jit
def _decode_reduce_kernel(M_IN, L_IN, ACC, O, stride_ob, stride_oh,
                          H: tl.constexpr, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    sp = tl.arange(0, BLOCK_S)
    sm = sp < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    row = pid * NUM_SPLITS + sp
    m = tl.load(M_IN + row, mask=sm, other=float("-inf"))
    l = tl.load(L_IN + row, mask=sm, other=0.0)
    m_max = tl.max(m, axis=0)  # finite: split 0 always holds slot 0 (lengths >= 1)
    w = tl.exp2(m - m_max)  # 0 for empty / padded splits
    denom = tl.sum(w * l, axis=0)
    acc = tl.load(ACC + row[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / denom
    tl.store(O + b * stride_ob + h * stride_oh + d, cast_out(out, O.dtype.element_ty), mask=dm)


def num_splits_for(t_max: int, batch_kv_heads: int, device: torch.device) -> int:
    """Static split count from Tmax and B * Hkv only (never the lengths: no host sync)."""
    want = triton.cdiv(2 * sm_count(device), max(batch_kv_heads, 1))
    return max(1, min(want, triton.cdiv(t_max, MIN_CHUNK), MAX_SPLITS))


def _decode(q, k_cache, v_cache, lengths, scale, num_splits=None):
    check_device(q, k_cache, v_cache, lengths)
    B, H, D = q.shape
    Hkv, t_max = k_cache.shape[1], k_cache.shape[2]
    check_lengths(lengths, t_max)  # CPU tensors only (fastlm.ops.attention)
    out = q.new_empty((B, H, D))
    if B * H == 0 or D == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    G = H // Hkv
    splits = num_splits or num_splits_for(t_max, B * Hkv, q.device)
    block_t = 64 if D <= 128 else 32
    chunk = triton.cdiv(triton.cdiv(max(t_max, 1), splits), block_t) * block_t
    block_d = max(16, triton.next_power_of_2(D))
    block_g = max(16, triton.next_power_of_2(G))
    m = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, H, splits, D), dtype=torch.float32, device=q.device)
    launch(_decode_split_kernel)[(B * Hkv, splits)](
        q, k_cache, v_cache, lengths, m, l, acc,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), lengths.stride(0), t_max, chunk, scale * LOG2E,
        HKV=Hkv, G=G, D=D, NUM_SPLITS=splits, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    launch(_decode_reduce_kernel)[(B * H,)](
        m, l, acc, out, out.stride(0), out.stride(1), H=H, D=D, NUM_SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)
    return out


@register_op("triton_decode_attention")
def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            scale: float) -> torch.Tensor:
    return _decode(q, k_cache, v_cache, lengths, scale)


@triton_decode_attention.register_fake
def _(q, k_cache, v_cache, lengths, scale):
    return q.new_empty(q.shape)


def decode_attention(q, k_cache, v_cache, lengths, scale: float):
    """Backend entry point, the signature of fastlm.ops.attention.decode_attention_ref."""
    check_device(q, k_cache, v_cache, lengths)
    return torch.ops.fastlm.triton_decode_attention(q, k_cache, v_cache, lengths, float(scale))

