# add + RMSNorm and add + LayerNorm (fastlm.ops.rms_norm / fastlm.ops.layer_norm), one Triton kernel.
#
# Algorithm: one program per row of [rows, N]. h = x + residual is computed in fp32 and rounded to
# the model dtype once (exactly what HF's separate `residual + x` does), written out, and its fp32
# copy feeds the statistics: sum(h^2) for RMSNorm, mean and centred sum of squares for LayerNorm
# (fp32, no E[x^2]-E[x]^2 cancellation). The normalised row is then scaled:
#   * RMSNorm, weight_in_fp32=False (Arcee):  y = w * round(h * rstd)        (two roundings, as HF)
#   * RMSNorm, weight_in_fp32=True  (Helium): y = round(w_fp32 * h * rstd)   (one rounding)
#   * LayerNorm (StableLM, Persimmon):        y = round((h - mean) * rstd * w + b)
# Rows up to MAX_BLOCK elements (every family's hidden size) stay in registers: a single pass. Wider
# rows loop over column blocks: pass 1 adds, stores h and merges per-block (count, mean, M2) with
# Chan's parallel-variance update; pass 2 re-reads h (L2-resident right after being written) and
# writes y. Any N works: the last block is masked (3000 -> a 4096-wide tile, 27% idle lanes; the
# alternative, several narrower blocks, would turn every row into the loop path).
# Row offsets are int64 (row * stride cannot overflow past 2^31 elements) and each input has its own
# row stride, so row-strided views (slices of a wider buffer) are read in place without a copy.
# The last dim is read with unit stride: Triton vectorises those loads (16-byte accesses when the
# row stride is divisible by 16, which it specialises on).
#
# Bytes moved per row (e = element size): single-block path reads x, residual, weight (weight is
# shared by all rows, so L2-resident) and writes y and h: 4*N*e from DRAM = the minimum for an op
# that must return both y and h (2*N*e with residual=None: read x, write y). The eager composition
# makes ~4 passes more (add, upcast, pow/mean, mul, cast, mul: 10+ N*e per row). The loop path adds
# one re-read of h (5*N*e), served mostly from L2.
#
# Trade-offs: one row per program keeps the reduction inside a program (no atomics, no second
# kernel); for tiny N with many rows a multi-row tile would use lanes better, but the families'
# hidden sizes are 2560-4096 where one row already fills 4-8 warps.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cast_out, check_device, launch, num_warps_for, on_device, register_op, rows_view

MAX_BLOCK = 8192  # widest row kept entirely in registers (fp32: 16 values a thread at 16 warps)


@triton.jit
def _scale_and_store(h, mean, rstd, W, B, y_row, c, mask, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_BIAS: tl.constexpr, WEIGHT_FP32: tl.constexpr):
    """Normalise and scale the row values h (model dtype) at columns c with the row's mean / rstd, store to y_row."""
    hf = h.to(tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    else:
        w = 1.0
    if IS_RMS:
        if WEIGHT_FP32:
            y = w * (hf * rstd)
        else:
            y = w * cast_out(hf * rstd, h.dtype).to(tl.float32)
    else:
        y = (hf - mean) * rstd * w
        if HAS_BIAS:
            y += tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_row + c, cast_out(y, y_row.dtype.element_ty), mask=mask)


@triton.jit
def _add_norm_kernel(X, R, W, B, Y, H, stride_x, stride_r, stride_y, stride_h, N, eps,
                     HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                     WEIGHT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    y_row = Y + row * stride_y
    h_row = H + row * stride_h
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_row + cols, mask=mask, other=0.0)
            h = cast_out(x.to(tl.float32) + r.to(tl.float32), x.dtype)  # HF rounds the residual stream
            tl.store(h_row + cols, h, mask=mask)
        else:
            h = x
        hf = h.to(tl.float32)
        if IS_RMS:
            mean = 0.0
            var = tl.sum(hf * hf, axis=0) / N
        else:
            mean = tl.sum(hf, axis=0) / N
            d = tl.where(mask, hf - mean, 0.0)
            var = tl.sum(d * d, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        _scale_and_store(h, mean, rstd, W, B, y_row, cols, mask, IS_RMS, HAS_W, HAS_BIAS, WEIGHT_FP32)
    else:
        # Pass 1: h = x + residual (stored), running (count, mean, M2) merged block by block.
        cnt = 0.0
        mean = 0.0
        m2 = 0.0
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            x = tl.load(x_row + c, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(r_row + c, mask=mask, other=0.0)
                h = cast_out(x.to(tl.float32) + r.to(tl.float32), x.dtype)
                tl.store(h_row + c, h, mask=mask)
            else:
                h = x
            hf = h.to(tl.float32)
            if IS_RMS:
                m2 += tl.sum(hf * hf, axis=0)
            else:
                cnt_b = tl.minimum(N - off, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(hf, axis=0) / cnt_b
                d = tl.where(mask, hf - mean_b, 0.0)
                m2_b = tl.sum(d * d, axis=0)
                tot = cnt + cnt_b
                delta = mean_b - mean
                mean = mean + delta * (cnt_b / tot)
                m2 = m2 + m2_b + delta * delta * (cnt * cnt_b / tot)
                cnt = tot
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        if HAS_RES:
            tl.debug_barrier()  # h written above by this program is re-read below
        # Pass 2: normalise and scale.
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            if HAS_RES:
                h = tl.load(h_row + c, mask=mask, other=0.0)
            else:
                h = tl.load(x_row + c, mask=mask, other=0.0)
            _scale_and_store(h, mean, rstd, W, B, y_row, c, mask, IS_RMS, HAS_W, HAS_BIAS, WEIGHT_FP32)


def block_for(n: int) -> int:
    """Heuristic keyed on the hidden size: the whole row in one tile up to MAX_BLOCK, else MAX_BLOCK-wide loops."""
    return min(triton.next_power_of_2(max(n, 1)), MAX_BLOCK)


def _add_norm(x, residual, weight, bias, eps, is_rms, weight_in_fp32, out_dtype, block_n=None):
    check_device(x, residual, weight, bias)
    n = x.shape[-1]
    x2 = rows_view(x)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    if rows == 0 or n == 0:
        return y, h
    r2 = rows_view(residual) if residual is not None else x2
    y2 = y.view(-1, n)
    h2 = h.view(-1, n) if residual is not None else y2
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else w
    block = block_n or block_for(n)
    with on_device(x):
        launch(_add_norm_kernel)[(rows,)](
            x2, r2, w, b, y2, h2, x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), n, eps,
            HAS_RES=residual is not None, IS_RMS=is_rms, HAS_W=weight is not None, HAS_BIAS=bias is not None,
            WEIGHT_FP32=weight_in_fp32, BLOCK_N=block, SINGLE=block >= n, num_warps=num_warps_for(block))
    return y, h


def _rms_out_dtype(x, weight, weight_in_fp32):
    # Arcee's order multiplies the model-dtype normalised row by the weight: torch type promotion.
    return x.dtype if weight_in_fp32 else torch.promote_types(x.dtype, weight.dtype)


@register_op("triton_add_rms_norm")
def triton_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                        weight_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h); h is a 0-element tensor when residual is None (the caller then uses x: ops may not alias inputs)."""
    return _add_norm(x, residual, weight, None, eps, True, weight_in_fp32, _rms_out_dtype(x, weight, weight_in_fp32))


@register_op("triton_add_layer_norm")
def triton_add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h); h is a 0-element tensor when residual is None."""
    return _add_norm(x, residual, weight, bias, eps, False, False, x.dtype)


def add_rms_norm(x, residual, weight, eps: float, weight_in_fp32: bool = False):
    """Backend entry point, the signature of fastlm.ops.rms_norm.add_rms_norm_ref."""
    check_device(x, residual, weight)
    y, h = torch.ops.fastlm.triton_add_rms_norm(x, residual, weight, float(eps), bool(weight_in_fp32))
    return y, (h if residual is not None else x)


def add_layer_norm(x, residual, weight, bias, eps: float):
    """Backend entry point, the signature of fastlm.ops.layer_norm.add_layer_norm_ref."""
    check_device(x, residual, weight, bias)
    y, h = torch.ops.fastlm.triton_add_layer_norm(x, residual, weight, bias, float(eps))
    return y, (h if residual is not None else x)


# op -> (entry point, its torch.library op): what the Triton backend plugin (fastlm/backends/triton.py) serves
ENTRY_POINTS = {"add_rms_norm": (add_rms_norm, "fastlm::triton_add_rms_norm"),
                "add_layer_norm": (add_layer_norm, "fastlm::triton_add_layer_norm")}
