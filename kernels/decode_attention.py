# Decode attention (fastlm.ops.attention.decode_attention): one new query token per sequence against a
# static KV cache [B, Hkv, Tmax, D], reading only each sequence's valid prefix [0, lengths[b]).
#
# Algorithm (flash-decoding, split-K, two launches):
#   1. Split kernel, grid (B * Hkv, cdiv(Tmax, CHUNK)). A program owns one (sequence, kv head), ALL
#      of its G = H / Hkv query heads (GQA: query head h reads kv head h // G, so each K/V tile is
#      loaded once for the whole group) and one fixed-size chunk of CHUNK = 256 cache slots. A chunk
#      that starts at or past the sequence's length exits at once, so the work follows the actual
#      lengths, not Tmax; the grid depends only on the shapes (no host sync, one CUDA graph for every
#      length). It walks its slots [c * CHUNK, min((c + 1) * CHUNK, length)) in BLOCK_T tiles with an
#      online softmax in the exp2 domain (running max m, running sum l, unnormalised fp32 acc) and
#      stores (m, l, acc) per (b, h, chunk).
#      * 16-bit caches (MMA=True): both products are tensor-core dots on the cache dtype with fp32
#        accumulation: s = q @ K^T (q in the cache dtype, the G query rows padded to tl.dot's 16), then
#        p = exp2(s * scale * log2e - m) is rounded to the cache dtype once and the SAME rounded p feeds
#        both acc += p @ V and l (so the weights stay a convex combination: the rounding reweights the
#        slots by at most 2^-8 relative, it never rescales the output). This is flash-attention's
#        precision (fp32 accumulators, 16-bit operands).
#      * fp32 caches (MMA=False): broadcast-multiply-reduce on the FMA units over a
#        [BLOCK_G, BLOCK_T, BLOCK_D] product with BLOCK_G = next_pow2(G) (no padding to 16 rows) and
#        BLOCK_T sized so the product is 4K elements (32 registers a thread at 4 warps): fp32 exact
#        products, like the reference's fp32 einsums.
#   2. Reduce kernel, grid (B * H): merges the chunks [0, cdiv(length, CHUNK)) of its row (it reads the
#      length itself, so the never-written partials of skipped chunks are never read), BLOCK_S chunks
#      at a time: out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i, M = max_i m_i.
# Lengths are read at their stride and clamped to Tmax (no slot past the cache is ever read); lengths
# outside [1, Tmax] raise first on CPU tensors (the interpreter), as in every backend; on CUDA
# (unchecked: a host sync) a length <= 0 gives NaN rows (0 / 0: no chunk is merged), as the
# reference does (fastlm.ops.attention's docstring).
#
# Bytes moved vs minimum: K and V are read once over the valid prefix (2 * len_b * Hkv * D elements a
# sequence, the minimum) plus q once; the partials add H * cdiv(len_b, CHUNK) * (D + 2) fp32 a sequence,
# written once and read once: 2 * G * (D + 2) * 4 B per 2 * CHUNK * D * e B of K/V, i.e. 0.8% more
# traffic for G = 1 and 3.2% for G = 4 (bf16, D = 128). Eager SDPA over the static cache reads all Tmax
# slots (Tmax / len more), materialises the mask and repeats K/V for GQA.
#
# Arithmetic per KV byte, counted in the loop body of the sm_90 PTX of the real specialisation
# (Helium-1-2B decode, D = 128, G = 1; `python -m fastlm.kernels.resources --intensity` recounts it):
#   * bf16 (MMA): one BLOCK_T = 64 tile issues 128 mma.sync.m16n8k16 (32 a warp x 4 warps; 4096 FLOP
#     each, the 15 padded rows included) and 1280 ex2 for 32 KB of K/V: 16 tensor FLOP and 0.04 ex2
#     per KV byte, against H100 SXM ridges of 989 TFLOP/s / 3.35 TB/s = 295 FLOP per byte (5% used at
#     full bandwidth) and 3.9 T ex2/s (MUFU) / 3.35 TB/s = 1.15 ex2 per byte (3% used).
#   * fp32 (FMA): one BLOCK_T = 32 tile issues 6400 fma.rn.f32 and 4352 ex2 (the [1, 32] scores are
#     replicated across the threads of the 3D product's layout) for 32 KB: 0.2 FMA and 0.13 ex2 per
#     byte against ridges of 10 FMA (33.5 T FMA/s) and 1.15 ex2 per byte.
# Either way the kernel is memory-bound with a wide margin; HBM bandwidth is its roofline.
#
# Resources (`python -m fastlm.kernels.resources`, checked in CI by tests/test_kernel_resources.py for
# sm_80/86/89/90 at every family's shapes): no spills (at most ~135 registers a thread); shared memory
# is Triton's staging of the 16-bit K and V tiles for the dots, num_stages = 2: at most 43 KB a block
# (BLOCK_T = 64 up to D = 128, 32 beyond), under the 99 KB of sm_86/89. The previous fp32
# tl.dot(ieee) formulation with G padded to 16 fp32 rows spilled 3-4 KB a thread and needed 110 KB.
#
# Trade-offs: a chunk past a short sequence's length still launches (and exits at once) because the
# grid must be static; CHUNK = 256 keeps the partials' traffic at a few % while a 2k-token sequence
# still spreads over 8 programs per kv head (smaller chunks: more programs for short batches, more
# partials).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm._checks import check_lengths

from ._utils import cast_out, check_device, dot16, launch, on_device, register_op

CHUNK = 256  # cache slots per split program (a multiple of every BLOCK_T)
BLOCK_S = 16  # chunks merged at a time by the reduce kernel
LOG2E = 1.4426950408889634
FMA_TILE = 4096  # elements of the fp32 path's [BLOCK_G, BLOCK_T, BLOCK_D] product


# t_max / num_chunks: not specialised (one compiled kernel for every cache length; they only bound loops
# and masks, so divisibility would buy nothing).
@triton.jit(do_not_specialize=["t_max"])
def _decode_split_kernel(Q, K, V, LEN, M_OUT, L_OUT, ACC,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                         stride_len, t_max, qk_scale,
                         HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, MMA: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // HKV
    hk = pid % HKV
    chunk = tl.program_id(1)
    length = tl.minimum(tl.load(LEN + b * stride_len).to(tl.int64), t_max).to(tl.int32)
    start = chunk * CHUNK
    if start >= length:  # past this sequence: nothing to read, and the reduce kernel never reads it
        return
    end = tl.minimum(start + CHUNK, length)

    g = tl.arange(0, BLOCK_G)
    gm = g < G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    heads = hk * G + g  # query heads of this kv head
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0)  # [BLOCK_G, BLOCK_D]
    if not MMA:
        q = q.to(tl.float32) * qk_scale  # fp32: the scale folded into q (exact products below)

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
        k = tl.load(k_base + t64[:, None] * stride_kt + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_T, BLOCK_D]
        if MMA:
            s = dot16(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_T] fp32, log2 domain
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds >= 1 valid slot
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        v = tl.load(v_base + t64[:, None] * stride_vt + d[None, :], mask=kv_mask, other=0.0)
        if MMA:
            p_lo = cast_out(p, v.dtype)  # rounded once (RTNE): the same weights for acc and l
            l_i = l_i * alpha + tl.sum(p_lo.to(tl.float32), axis=1)
            acc = acc * alpha[:, None] + dot16(p_lo, v)
        else:
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    row = (b * (HKV * G) + heads) * tl.num_programs(1) + chunk  # [B, H, chunks]
    tl.store(M_OUT + row, m_i, mask=gm)
    tl.store(L_OUT + row, l_i, mask=gm)
    tl.store(ACC + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])


@triton.jit(do_not_specialize=["t_max", "num_chunks"])
def _decode_reduce_kernel(M_IN, L_IN, ACC, LEN, O, stride_ob, stride_oh, stride_len, t_max, num_chunks,
                          H: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    length = tl.minimum(tl.load(LEN + b * stride_len).to(tl.int64), t_max).to(tl.int32)
    n = tl.cdiv(length, CHUNK)  # chunks the split kernel wrote for this row (<= 0 for a length <= 0)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    base = pid * num_chunks
    m_run = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)
    l_run = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for c0 in range(0, n, BLOCK_S):
        c = c0 + tl.arange(0, BLOCK_S)
        cm = c < n
        m = tl.load(M_IN + base + c, mask=cm, other=float("-inf"))
        l = tl.load(L_IN + base + c, mask=cm, other=0.0)
        part = tl.load(ACC + (base + c)[:, None] * D + d[None, :], mask=cm[:, None] & dm[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))  # finite: chunk c0 holds >= 1 valid slot
        w = tl.exp2(m - m_new)  # 0 for the masked tail
        alpha = tl.exp2(m_run - m_new)  # 0 on the first block (m_run = -inf)
        l_run = l_run * alpha + tl.sum(w * l, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        m_run = m_new
    out = acc / l_run  # 0 / 0 = NaN for a length <= 0, as the reference
    tl.store(O + b * stride_ob + h * stride_oh + d, cast_out(out, O.dtype.element_ty), mask=dm)


def blocks_for(dtype: torch.dtype, G: int, D: int) -> tuple[bool, int, int, int]:
    """(mma, BLOCK_G, BLOCK_T, BLOCK_D) for a cache dtype, group size G and head dim D."""
    block_d = max(16, triton.next_power_of_2(D))
    if dtype in (torch.float16, torch.bfloat16):
        return True, max(16, triton.next_power_of_2(G)), (64 if block_d <= 128 else 32), block_d
    block_g = triton.next_power_of_2(G)
    return False, block_g, max(1, min(64, FMA_TILE // (block_g * block_d))), block_d


def num_chunks_for(t_max: int) -> int:
    """Split programs per (sequence, kv head): from Tmax only (never the lengths: no host sync)."""
    return triton.cdiv(max(t_max, 1), CHUNK)


def _decode(q, k_cache, v_cache, lengths, scale):
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
    mma, block_g, block_t, block_d = blocks_for(k_cache.dtype, G, D)
    chunks = num_chunks_for(t_max)
    m = torch.empty((B, H, chunks), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, H, chunks, D), dtype=torch.float32, device=q.device)
    with on_device(q):
        launch(_decode_split_kernel)[(B * Hkv, chunks)](
            q, k_cache, v_cache, lengths, m, l, acc,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), lengths.stride(0), t_max, scale * LOG2E,
            HKV=Hkv, G=G, D=D, CHUNK=CHUNK, BLOCK_G=block_g, BLOCK_T=block_t, BLOCK_D=block_d, MMA=mma,
            num_warps=4, num_stages=2)
        launch(_decode_reduce_kernel)[(B * H,)](
            m, l, acc, lengths, out, out.stride(0), out.stride(1), lengths.stride(0), t_max, chunks,
            H=H, D=D, CHUNK=CHUNK, BLOCK_S=BLOCK_S, BLOCK_D=block_d, num_warps=4)
    return out


@register_op("triton_decode_attention")
def triton_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                            scale: float) -> torch.Tensor:
    return _decode(q, k_cache, v_cache, lengths, scale)


def decode_attention(q, k_cache, v_cache, lengths, scale: float):
    """Backend entry point, the signature of fastlm.ops.attention.decode_attention_ref."""
    check_device(q, k_cache, v_cache, lengths)
    return torch.ops.fastlm.triton_decode_attention(q, k_cache, v_cache, lengths, float(scale))


# op -> (entry point, its torch.library op): what the Triton backend plugin (fastlm/backends/triton.py) serves
ENTRY_POINTS = {"decode_attention": (decode_attention, "fastlm::triton_decode_attention")}
