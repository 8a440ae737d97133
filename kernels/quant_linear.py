# Weight-only int8 / int4 projection (fastlm.ops.quantized): y = x @ dequantize(qweight, scales)^T (+ bias)
# (+ residual), with the formats of fastlm/ops/quantized.py and its computation order: fp32 weights
# q * scale, fp32 accumulation, one rounding to x's dtype.
#
# Algorithm: a 2D grid of (BLOCK_M rows of x, BLOCK_N output channels) tiles. Each program walks K in
# BLOCK_K steps: it loads its [BLOCK_N, BLOCK_K] slice of the quantized weight (1 byte a weight for int8,
# half a byte for int4: each byte is read by the two lanes whose nibbles it holds, from the same cache
# line), widens it in registers to q * scale in fp32 (the scales gathered per group), and accumulates
# x_tile @ w_tile with an fp32 (IEEE, not TF32) dot. The weight never exists in fp32 in memory: at decode
# the kernel moves the quantized bytes plus scales (4 / G bytes a weight) once, the minimum. The int4
# nibble positions follow the packing (within a group, blocks of 32 weights: byte j holds weights j and
# j + 16; a partial last block of t weights pairs j with j + t / 2), computed per lane from k.
#
# Decode tiles are narrow in N (BLOCK_N = 16, BLOCK_K = 64) so that even a 2048-wide projection spreads over
# 128 programs; prefill tiles are 32 x 32 x 32. The fp32 IEEE dot holds its operands in registers: decode
# tiles with BLOCK_K = 128 and 64 x 64 prefill tiles spilled with fp32 x (sm_86 / 89 / 90); these use up to
# 249 registers and spill nothing (python -m fastlm.kernels.resources). tl.dot needs 16 rows: a decode step
# computes 15 masked rows.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast_out, check_device, launch, on_device, register_op, rows_view


@triton.jit
def _quant_linear_kernel(X, QW, S, BIAS, RES, Y, M, N, K, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym,
                         BITS: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    FULL: tl.constexpr = G // 32 * 32  # weights of a group in whole 32-blocks
    TAIL: tl.constexpr = G - FULL      # weights of its partial last block (even)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(X + rm64[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        if BITS == 8:
            q = tl.load(QW + rn64[None, :] * stride_qn + rk[:, None], mask=w_mask, other=0).to(tl.float32)
        else:
            j = rk % G            # position within the group
            g_byte = (rk - j) // 2  # the group's first byte
            byte = g_byte + (j // 32) * 16 + j % 16
            high = (j // 16) % 2
            if TAIL > 0:
                o = j - FULL
                in_tail = o >= 0
                byte = tl.where(in_tail, g_byte + FULL // 2 + o % (TAIL // 2), byte)
                high = tl.where(in_tail, (o >= TAIL // 2).to(tl.int32), high)
            b = tl.load(QW + rn64[None, :] * stride_qn + byte[:, None], mask=w_mask, other=8).to(tl.int32)
            q = (((b >> (high[:, None] * 4)) & 0xF) - 8).to(tl.float32)
        s = tl.load(S + rn64[None, :] * stride_sn + (rk // G)[:, None], mask=w_mask, other=0.0)
        acc += tl.dot(x.to(tl.float32), q * s, input_precision="ieee")  # [BLOCK_M, BLOCK_K] @ [BLOCK_K, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        acc += tl.load(RES + rm64[:, None] * stride_rm + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
    tl.store(Y + rm64[:, None] * stride_ym + rn[None, :], cast_out(acc, Y.dtype.element_ty), mask=out_mask)


DECODE_ROWS = 16  # rows of x up to which the narrow decode tiles run


def _blocks(M: int) -> tuple[int, int, int]:
    return (16, 16, 64) if M <= DECODE_ROWS else (32, 32, 32)


@register_op("triton_quant_linear")
def triton_quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    check_device(x, qweight, scales, bias, residual)
    N, K = qweight.shape[0], x.shape[-1]
    y = x.new_empty((*x.shape[:-1], N))
    if y.numel() == 0:
        return y
    if K == 0:  # nothing to accumulate: bias and residual only, added in fp32 as the reference does
        out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
        if bias is not None:
            out += bias.float()
        if residual is not None:
            out += residual.float()
        return y.copy_(out)
    x2 = rows_view(x)
    M = x2.shape[0]
    y2 = y.view(M, N)
    qw = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    s = scales.contiguous()
    r2 = rows_view(residual) if residual is not None else None
    bias_c = bias.contiguous() if bias is not None else None
    bm, bn, bk = _blocks(M)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    with on_device(x):
        launch(_quant_linear_kernel)[grid](
            x2, qw, s, bias_c if bias_c is not None else s, r2 if r2 is not None else y2, y2, M, N, K,
            x2.stride(0), qw.stride(0), s.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0),
            BITS=bits, G=group_size, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    return y


def quant_linear(x, qweight, scales, bias, residual, bits, group_size):
    """Backend entry point, the signature of fastlm.ops.quantized.quant_linear_ref."""
    check_device(x)
    return torch.ops.fastlm.triton_quant_linear(x, qweight, scales, bias, residual, bits, group_size)


# op -> (entry point, its torch.library op): what the Triton backend plugin (fastlm/backends/triton.py) serves
ENTRY_POINTS = {"quant_linear": (quant_linear, "fastlm::triton_quant_linear")}
