"""Weight-only int8 / int4 quant_linear (fastlm/ops/quantized.py): the weight formats' round trip and packing,
and every backend with a kernel of its own (cpp, triton) against the dequantize-then-matmul composition in
fp64 (tests/_tolerance.py: at most twice the fp32 reference's own error, which for 16-bit x is one rounding
of the output). Its bad arguments: tests/ops/test_errors.py; its property test: tests/ops/test_property.py.
Inputs: tests/ops/_inputs.py."""
import pytest
import torch

from _api import (DEFAULT_GROUP_SIZE, dequantize_weight, quant_linear, quant_linear_ref, quantize_weight,
                  resolve_group_size)
from _inputs import (DTYPES, QUANT_CALLS, QUANT_FORMATS, QUANT_SHAPES, QUANT_ZERO_SIZES, grid, layout,
                     quant_inputs, quant_linear_fp64, quant_weight, randn, run_opcheck, targets)
from _tolerance import assert_gradients_match, assert_op_matches

OP = "quant_linear"


# ------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("bits,group_size", [(8, 320), (8, 32), (8, 40), (4, 32), (4, 64), (4, 320), (4, 40)])
def test_round_trip_error_within_half_a_step(bits, group_size):
    g = torch.Generator().manual_seed(bits + group_size)
    w = torch.randn(50, 320, generator=g) * torch.rand(50, 1, generator=g)  # rows of different ranges
    w[3, :group_size] = 0  # an all-zero group: scale 0, dequantized to exact zeros
    qw, s = quantize_weight(w, bits, group_size)
    assert qw.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qw.shape == (50, 320 if bits == 8 else 160) and s.shape == (50, 320 // group_size)
    assert s.dtype == torch.float32 and s[3, 0] == 0
    d = dequantize_weight(qw, s, bits, group_size)
    step = s.repeat_interleave(group_size, dim=1)
    # |w - q * scale| <= scale / 2, plus the rounding of the fp32 product q * scale
    assert ((d - w).abs() <= step / 2 + w.abs() * 2 ** -23).all()
    assert torch.equal(d[3, :group_size], torch.zeros(group_size))
    q = d / torch.where(step == 0, 1, step)
    qmax = 127 if bits == 8 else 7
    assert q.round().abs().max() == qmax  # each group's absmax maps to +-qmax
    assert dequantize_weight(qw, s, bits, group_size, torch.bfloat16).dtype == torch.bfloat16


def test_int4_layout():
    """The packing the kernels read: within a block of 32 weights, byte j holds weight j (low nibble) and
    weight j + 16 (high nibble), as q + 8; a group's partial last block of t weights pairs j with j + t / 2."""
    q = torch.arange(-7, 8).repeat(8)[:96].view(1, 96).to(torch.int8)  # exact values, one group of 96
    w = q.float() * 0.5  # absmax 3.5 = 7 * 0.5: scale 0.5, q exact
    qw, s = quantize_weight(w, 4, 96)
    assert s.item() == 0.5
    nib = q[0].to(torch.int32) + 8
    for j in range(16):
        for blk in range(3):
            assert qw[0, blk * 16 + j].item() == nib[blk * 32 + j] | (nib[blk * 32 + j + 16] << 4)
    qw, s = quantize_weight(w[:, :48], 4, 48)  # one block of 32, then a block of 16: bytes 16..23
    for j in range(8):
        assert qw[0, 16 + j].item() == nib[32 + j] | (nib[40 + j] << 4)


def test_quantize_errors():
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(4, 96), 8, 64)
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize_weight(torch.randn(4, 96), 4, 3)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weight(torch.randn(4, 96), 2, 32)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(torch.tensor([[1.0, float("nan")]]), 8, 2)
    with pytest.raises(TypeError, match="weight must be float32"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int64), 8, 4)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        quantize_weight(torch.randn(4), 8, 4)


def test_default_group_sizes():
    assert resolve_group_size(8, 192) == (DEFAULT_GROUP_SIZE[8] or 192)
    assert resolve_group_size(4, 192) == (DEFAULT_GROUP_SIZE[4] or 192)
    qw, s = quantize_weight(torch.randn(8, 192), 4)
    assert s.shape == (8, 192 // resolve_group_size(4, 192))


# ------------------------------------------------------------------------------- every backend

def _group(fmt, nk):
    return nk[1] if fmt[1] is None else fmt[1]


@pytest.mark.parametrize("target,dtype,nk,fmt", grid(
    OP, DTYPES, QUANT_SHAPES, QUANT_FORMATS, where=lambda dtype, nk, fmt: nk[1] % _group(fmt, nk) == 0,
    triton=lambda dtype, nk, fmt: nk in ((37, 80), (21, 960)),
    reference=lambda dtype, nk, fmt: dtype == torch.bfloat16 and nk == (37, 80)))
def test_matches_reference(target, dtype, nk, fmt):
    """Each format on odd N and K, at 0 to 64 rows with and without bias and residual."""
    N, K = nk
    for M, bias, residual in QUANT_CALLS:
        args = quant_inputs(M, N, K, fmt[0], _group(fmt, nk), dtype, target.device, bias=bias, residual=residual)
        out = quant_linear(*args[:5], bits=args[5], group_size=args[6], backend=target.backend)
        assert out.shape == (M, N)
        assert_op_matches(OP, target.backend, out, quant_linear_fp64(*args), quant_linear_ref(*args),
                          name=f"{OP} M={M}")


@pytest.mark.parametrize("target,dtype,fmt", grid(OP, (torch.float32, torch.bfloat16), ((8, 96), (4, 32)),
                                                  reference=lambda dtype, fmt: dtype == torch.float32))
def test_strided_inputs(target, dtype, fmt):
    """x with leading dims as rows of a wider activation, as rows that do not collapse into one stride and with
    its last dim strided; a qweight that is a row range of a fused weight, and one whose last dim is strided."""
    N, K = 40, 96
    bits, group_size = fmt
    fused_q, fused_s = quant_weight(3 * N, K, bits, group_size, target.device)
    qw, s = fused_q[N:2 * N], fused_s[N:2 * N]
    for i, x_layout in enumerate(("row_strided", "leading_transposed", "last_dim_strided")):
        x = layout(randn(3, 5, K, dtype=dtype, device=target.device, seed=2 + i), x_layout, pad=24)[0]
        for q in (qw, layout(qw, "last_dim_strided")[0]):
            res = randn(3, 5, N, dtype=dtype, device=target.device, seed=9 + i)
            out = quant_linear(x, q, s, None, res, bits=bits, group_size=group_size, backend=target.backend)
            assert out.shape == (3, 5, N) and out.is_contiguous()
            args = (x, q, s, None, res, bits, group_size)
            assert_op_matches(OP, target.backend, out, quant_linear_fp64(*args), quant_linear_ref(*args),
                              name=f"{OP} x {x_layout}, qweight strides {q.stride()}")


@pytest.mark.parametrize("target,mnk", grid(OP, QUANT_ZERO_SIZES))
def test_zero_sizes(target, mnk):
    M, N, K = mnk
    bits, group_size = (4, 32) if K else (8, 1)
    qw, s = quant_weight(N, K, bits, group_size, target.device)
    x, bias = randn(M, K, device=target.device), randn(N, device=target.device, seed=1)
    out = quant_linear(x, qw, s, bias, None, bits=bits, group_size=group_size, backend=target.backend)
    assert out.shape == (M, N)
    args = (x, qw, s, bias, None, bits, group_size)
    assert_op_matches(OP, target.backend, out, quant_linear_fp64(*args), quant_linear_ref(*args))


@pytest.mark.parametrize("target", targets(OP, kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    """A kernel has no backward: with x, bias or residual requiring grad the public op gives the reference's."""
    qw, s = quant_weight(16, 64, 4, 32)
    assert_gradients_match(
        lambda b, x_, bias_, res_: quant_linear(x_, qw, s, bias_, res_, bits=4, group_size=32,
                                                backend=b).square().sum(),
        (randn(2, 64), randn(16, seed=1), randn(2, 16, seed=2)), target.backend, all_inputs=True)


def test_reference_gradient_is_the_dequantized_weight():
    qw, s = quant_weight(16, 64, 4, 32)
    x = randn(2, 64).requires_grad_(True)
    quant_linear(x, qw, s, bits=4, group_size=32, backend="torch").sum().backward()
    torch.testing.assert_close(x.grad, dequantize_weight(qw, s, 4, 32).sum(0).expand(2, 64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)
