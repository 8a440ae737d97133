"""Weight-only quantized projections: ``quant_linear(x, qweight, scales, ...) = x @ dequantize(qweight, scales).T
(+ bias) (+ residual)``.

Formats (symmetric, no zero point; ``G`` = group_size, ``N`` output channels, ``K`` input features):

- ``bits=8``: ``qweight`` int8 [N, K], values in [-127, 127].
- ``bits=4``: ``qweight`` uint8 [N, K // 2], values q in [-7, 7] stored as the nibble ``q + 8`` (1..15). Within
  each group of G weights (G even), every block of 32 consecutive weights is 16 bytes: byte j holds weight j in
  its low nibble and weight j + 16 in its high nibble; a last partial block of t < 32 weights (G % 32 != 0)
  is t / 2 bytes, byte j holding weights j and j + t / 2. The CPU kernel (csrc/cpu/quant_linear.cpp) widens
  16 bytes to 16 int32 lanes once and takes both halves of the block from them with one mask and one shift,
  each half lining up with 16 consecutive elements of x.
- ``scales`` float32 [N, K // G]: ``scale = absmax(group) / qmax`` (qmax 127 or 7) in fp32, 0 for an all-zero
  group; ``q = round(w / scale)`` (to nearest, ties to even), so ``|w - q * scale| <= scale / 2``. G = K is
  one scale per output channel. fp32 rather than 16-bit scales: exact to compute, no fp16 range limits
  (a group with absmax below ~8e-3 would get a subnormal fp16 scale at int8), and cheap in bytes where it
  matters: 4 / G bytes a weight, at G = 64 the same 0.5625 bytes a weight as llama.cpp's Q4_0 (fp16 scales,
  G = 32); 16-bit scales would save 11% of int4's bytes at G = 32.

Computation order (the reference ``quant_linear_ref``, which every backend matches to fp32 rounding): the
weight is dequantized to fp32 (``q * scale``, one fp32 product per weight), x, bias and residual are widened
to fp32, the product is accumulated in fp32 and bias and residual are added in fp32, and the result is
rounded once to x's dtype. The kernels may sum a group's ``x * q`` first and multiply by its scale after
(a different fp32 rounding, not a different result beyond it). No activation is quantized.

DEFAULT_GROUP_SIZE (None: one group per output channel, G = K). Relative RMS error of the dequantized weight
(``||w - dequantize(quantize(w))|| / ||w||``) over the 29 matrices of fastlm/demo's checkpoint, and on a
Gaussian [256, 2048] weight:

    =============  =================  ===============  ===============  ==============
    format         bytes / weight     demo weights     Gaussian         llama.cpp
    =============  =================  ===============  ===============  ==============
    int8 per-chan  1.0                0.73%            0.82%
    int8 G=32      1.125              0.56%            0.53%            Q8_0: 1.0625
    int4 G=32      0.625              10.3%            9.7%             Q4_0: 0.5625
    int4 G=64      0.5625             11.4%            10.7%
    =============  =================  ===============  ===============  ==============

Perplexity on the demo checkpoint's held-out text (``python -m fastlm.bench.quality``, bf16 baseline 46.48;
fp32 itself is +0.00%): int8 per channel -0.01%, int8 G=32 -0.02%, int4 G=32 +2.11%, int4 G=64 +2.84%
(top-1 agreement with bf16 98.6%, 98.8%, 88.2%, 87.0%).

- int8: per output channel. G=32 is no better in perplexity (both are within the noise of fp32 against
  bf16), while per channel moves 11% fewer bytes (1.0 a weight, 6% fewer than Q8_0) and its decode
  loop has no per-group multiply.
- int4: groups of 32. G=64 leaves too little room under the 3% perplexity bound (2.84%) for 11% fewer
  bytes; at decode the int4 loop is bound by its instructions, not by the bytes, on the 2-core Zen 4
  (csrc/cpu/quant_linear.cpp: G=64 widens ~9% faster per weight from cache, ~equal from DRAM). G=32 also
  has the bf16 dot-product decode kernel for bf16 x on CPUs with AVX512-BF16 (a pair of groups a step).
"""
from __future__ import annotations

import torch

from fastlm._checks import as_int, check_float, check_same, check_shape, check_tensor
from fastlm.ops._registry import declare, dispatch
from fastlm.ops.projection import linear_ref

# the public op, its reference and the weight format's functions, re-exported by fastlm.ops
__all__ = ["quant_linear", "quant_linear_ref", "quantize_weight", "dequantize_weight"]

# bits -> group size used when none is given (None: per output channel). Why: the module docstring.
DEFAULT_GROUP_SIZE: dict[int, int | None] = {8: None, 4: 32}
QMAX = {8: 127, 4: 7}
QWEIGHT_DTYPE = {8: torch.int8, 4: torch.uint8}
_BLOCK = 32  # int4 packing block (weights); see the module docstring


def _check_bits(bits) -> int:
    bits = as_int("bits", bits, 0)
    if bits not in QMAX:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    return bits


def resolve_group_size(bits: int, K: int, group_size: int | None = None) -> int:
    """The group size for a [N, K] weight: ``group_size``, or ``DEFAULT_GROUP_SIZE[bits]`` when None (and K,
    per output channel, where that is None). ValueError naming group_size unless it is >= 1 and divides K
    (and, for bits=4, is even)."""
    bits = _check_bits(bits)
    if group_size is None:
        group_size = DEFAULT_GROUP_SIZE[bits]
        if group_size is None:
            return max(int(K), 1)
    group_size = as_int("group_size", group_size, 1)
    if K % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the weight's K = {K}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"group_size must be even for bits=4 (two weights a byte), got {group_size}")
    return group_size


def _pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q: int [N, K] in [-7, 7] -> uint8 [N, K // 2] in the bits=4 layout (module docstring)."""
    N, K = q.shape
    groups = K // group_size
    nib = (q + 8).to(torch.uint8).view(N, groups, group_size)
    full = (group_size // _BLOCK) * _BLOCK
    blocks = nib[..., :full].reshape(N, groups, full // _BLOCK, 2, _BLOCK // 2)  # [.., block, half, 16]
    packed_full = (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(N, groups, full // 2)
    tail = nib[..., full:]
    half = tail.shape[-1] // 2
    packed_tail = tail[..., :half] | (tail[..., half:] << 4)
    return torch.cat([packed_full, packed_tail], dim=-1).reshape(N, K // 2)


def _unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 [N, K // 2] in the bits=4 layout -> int8 [N, K] in [-8, 7] (the inverse of _pack_int4)."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    groups = K // group_size
    b = qweight.reshape(N, groups, group_size // 2)
    lo, hi = (b & 0xF).to(torch.int8) - 8, (b >> 4).to(torch.int8) - 8
    full = (group_size // _BLOCK) * (_BLOCK // 2)  # bytes of the whole blocks of a group
    blocks = (N, groups, group_size // _BLOCK, _BLOCK // 2)
    whole = torch.stack([lo[..., :full].reshape(blocks), hi[..., :full].reshape(blocks)], dim=-2)
    whole = whole.reshape(N, groups, 2 * full)
    tail = torch.cat([lo[..., full:], hi[..., full:]], dim=-1)
    return torch.cat([whole, tail], dim=-1).reshape(N, K)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight float [N, K] -> (qweight, scales) in the format of ``bits`` (module docstring); group_size
    None: ``DEFAULT_GROUP_SIZE[bits]``; group_size = K: one scale per output channel."""
    check_float("weight", weight)
    bits = _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    group_size = resolve_group_size(bits, K, group_size)
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight has non-finite values (inf or NaN): they cannot be quantized")
    groups = K // group_size
    wg = w.reshape(N, groups, group_size)
    scales = wg.abs().amax(dim=-1) / QMAX[bits] if K else w.new_zeros((N, 0))  # [N, groups]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(wg / safe[..., None]).clamp_(-QMAX[bits], QMAX[bits]).reshape(N, K)
    if bits == 8:
        return q.to(torch.int8).contiguous(), scales.contiguous()
    return _pack_int4(q.to(torch.int8), group_size).contiguous(), scales.contiguous()


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(qweight, scales) -> the float [N, K] weight ``q * scale`` (computed in fp32, then cast to dtype)."""
    N = qweight.shape[0]
    q = qweight if bits == 8 else _unpack_int4(qweight, group_size)
    K = q.shape[1]
    w = q.to(torch.float32).view(N, K // group_size, group_size) * scales.to(torch.float32)[..., None]
    return w.view(N, K).to(dtype)


def quant_linear_ref(x, qweight, scales, bias, residual, bits: int, group_size: int):
    w = dequantize_weight(qweight, scales, bits, group_size, torch.float32)
    out = linear_ref(x.float(), w, None if bias is None else bias.float(),
                     None if residual is None else residual.float())
    return out.to(x.dtype)


def _quant_linear_fake(x, qweight, scales, bias, residual, bits, group_size):
    # also run for a call mixing meta and real tensors, where no kernel checks the devices
    for name, t in (("qweight", qweight), ("scales", scales), ("bias", bias), ("residual", residual)):
        check_same(name, t, x, "x", dtype=False)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


QUANT_LINEAR = declare("quant_linear", quant_linear_ref, fake=_quant_linear_fake)


def check_quant_args(x, qweight, scales, bias, residual, bits, group_size) -> tuple[int, int]:
    """The public op's checks (each error names its argument); returns (bits, group_size) as ints. The C++
    op (csrc/cpu/quant_linear.cpp) raises the same errors."""
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must be [..., K], got a 0-d tensor")
    bits = _check_bits(bits)
    K = x.shape[-1]
    check_same("qweight", qweight, x, "x", dtype=False, required=True)
    if qweight.dtype != QWEIGHT_DTYPE[bits]:
        raise TypeError(f"qweight must be {QWEIGHT_DTYPE[bits]} for bits={bits}, got {qweight.dtype}")
    packed_k = K if bits == 8 else K // 2
    if qweight.dim() != 2 or qweight.shape[1] != packed_k:
        raise ValueError(f"qweight must be [N, {'K' if bits == 8 else 'K // 2'}] = [N, {packed_k}] for x's "
                         f"K = {K}, got {tuple(qweight.shape)}")
    N = qweight.shape[0]
    group_size = as_int("group_size", group_size, 1)
    if K % group_size:
        raise ValueError(f"group_size ({group_size}) must divide x's K = {K}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"group_size must be even for bits=4 (two weights a byte), got {group_size}")
    check_tensor("scales", scales)
    check_same("scales", scales, x, "x", dtype=False, required=True)
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    check_shape("scales", scales, (N, K // group_size))
    check_same("bias", bias, x, "x")
    check_shape("bias", bias, (N,))
    check_same("residual", residual, x, "x")
    check_shape("residual", residual, (*x.shape[:-1], N))
    return bits, group_size


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, *, bits: int, group_size: int,
                 backend: str = "auto") -> torch.Tensor:
    """``x @ dequantize_weight(qweight, scales, bits, group_size).T (+ bias) (+ residual)`` in x's dtype;
    x: [..., K] float32 / bfloat16 / float16, qweight and scales from ``quantize_weight``, bias [N] and
    residual [..., N] in x's dtype. Computed in fp32 and rounded once (module docstring). Differentiable in
    x, bias and residual: with grad enabled and one of them requiring grad, the reference computes it."""
    bits, group_size = check_quant_args(x, qweight, scales, bias, residual, bits, group_size)
    fn = dispatch("quant_linear", backend, x.device)
    out = fn(x, qweight, scales, bias, residual, bits, group_size)
    if out.requires_grad and fn is not quant_linear_ref:  # a kernel has no backward: the reference's graph
        return quant_linear_ref(x, qweight, scales, bias, residual, bits, group_size)
    return out
