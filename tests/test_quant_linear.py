"""Weight-only int8 / int4 ``quant_linear`` (fastlm/ops/quantized.py): the formats' round trip, and every
backend against the dequantize-then-reference composition.

Parity: the reference computes in fp32 and rounds once to x's dtype (the module docstring); a backend's
error against the same composition in fp64 (exact dequantized weights) must be at most twice the fp32
reference's own error plus a small atol (tests/_tolerance.py), which for 16-bit x is one rounding of the
output: exact to fp32 rounding."""
from __future__ import annotations

import pytest
import torch

from fastlm import ops as fops
from fastlm.ops._registry import backend_status, dispatch, has_impl
from fastlm.ops.quantized import (DEFAULT_GROUP_SIZE, dequantize_weight, quant_linear_ref, quantize_weight,
                                     resolve_group_size)
from _tolerance import assert_close_to_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 3e-5, torch.bfloat16: 1e-3, torch.float16: 3e-4}


def _kernel_backends():
    params = []
    for backend in ("cpp", "triton"):
        ok, why = backend_status(backend, "cpu")
        if ok and not has_impl("quant_linear", backend, "cpu"):
            ok, why = False, f"backend {backend} has no quant_linear kernel"
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {backend} unavailable: {why}")]
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


KERNEL_BACKENDS = _kernel_backends()


def make(N, K, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    return quantize_weight(w, bits, group_size)


def ref64(x, qweight, scales, bias, residual, bits, group_size):
    """The composition in fp64: exact dequantized weights (q * scale is exact in fp64), fp64 products."""
    w = dequantize_weight(qweight, scales, bits, group_size, torch.float64)
    out = x.double() @ w.t()
    if bias is not None:
        out = out + bias.double()
    if residual is not None:
        out = out + residual.double()
    return out.float()


def check(out, args, dtype, K, name):
    assert out.dtype == dtype, f"{name}: dtype {out.dtype} != {dtype}"
    assert_close_to_ref(out, ref64(*args), quant_linear_ref(*args), ATOL[dtype] * max(K, 1) ** 0.5, name=name)


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


# ------------------------------------------------------------------------------------------- parity

# (N, K) and the formats each is tested in: odd N (tail rows of a block), K not a multiple of 32 for
# per-channel formats (each row's last weights one at a time), groups of 40 (a partial block per group).
# The interpreted Triton kernel runs one program at a time: fewer output channels there.
FORMATS = [(8, None), (8, 32), (8, 40), (4, 32), (4, 64), (4, None), (4, 40)]
SHAPES = {"cpp": [(1003, 80), (37, 960)], "triton": [(37, 80), (21, 960)]}


def _cases():
    for backend in KERNEL_BACKENDS:
        for N, K in SHAPES[backend.values[0]]:
            for bits, G in FORMATS:
                G = K if G is None else G
                if K % G == 0:
                    yield pytest.param(backend.values[0], N, K, bits, G, marks=backend.marks,
                                       id=f"{backend.values[0]}-N{N}-K{K}-int{bits}-g{G}")


@pytest.mark.parametrize("backend,N,K,bits,group_size", list(_cases()))
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity(backend, N, K, bits, group_size, dtype):
    qw, s = make(N, K, bits, group_size, seed=N + K + bits)
    g = torch.Generator().manual_seed(1)
    # M = 16: the last row count of the decode kernel (C++), 17 and 64 the prefill path
    for i, M in enumerate((0, 1, 7, 16, 17, 64)):
        x = torch.randn(M, K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g).to(dtype) if i % 2 else None
        residual = torch.randn(M, N, generator=g).to(dtype) if i % 3 == 1 or i == 5 else None
        args = (x, qw, s, bias, residual, bits, group_size)
        out = fops.quant_linear(x, qw, s, bias, residual, bits=bits, group_size=group_size, backend=backend)
        assert out.shape == (M, N)
        check(out, args, dtype, K, f"quant_linear M={M}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("bits,group_size", [(8, 96), (4, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(backend, bits, group_size, dtype):
    """x with leading dims and strided rows (a slice of a wider activation), x whose rows do not collapse into
    one stride (a transpose), a qweight that is a row range of a fused weight, and one whose last dim is
    strided."""
    N, K = 40, 96
    qfused, sfused = make(3 * N, K, bits, group_size)
    qw, s = qfused[N:2 * N], sfused[N:2 * N]
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 5, K + 24, generator=g).to(dtype)
    xs = [wide[..., :K], torch.randn(K, 2, 3, generator=g).to(dtype).permute(1, 2, 0)]
    strided_q = qw.t().contiguous().t()  # same values, stride(1) != 1
    for x in xs:
        for q in (qw, strided_q):
            res = torch.randn(*x.shape[:-1], N, generator=g).to(dtype)
            out = fops.quant_linear(x, q, s, None, res, bits=bits, group_size=group_size, backend=backend)
            assert out.shape == (*x.shape[:-1], N) and out.is_contiguous()
            check(out, (x, q, s, None, res, bits, group_size), dtype, K, "quant_linear layout")


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("M,N,K", [(0, 8, 64), (3, 0, 64), (3, 8, 0), (20, 8, 0), (0, 0, 0)])
def test_zero_sizes(backend, M, N, K):
    bits, G = (4, 32) if K else (8, 1)
    qw, s = quantize_weight(torch.randn(N, K), bits, G)
    x = torch.randn(M, K)
    bias = torch.randn(N)
    out = fops.quant_linear(x, qw, s, bias, None, bits=bits, group_size=G, backend=backend)
    assert out.shape == (M, N)
    expected = ref64(x, qw, s, bias, None, bits, G)
    assert torch.allclose(out, expected, atol=1e-5)


def test_grad_through_reference():
    qw, s = make(16, 64, 4, 32)
    x = torch.randn(2, 64, requires_grad=True)
    out = fops.quant_linear(x, qw, s, bits=4, group_size=32)
    out.sum().backward()
    w = dequantize_weight(qw, s, 4, 32)
    assert torch.allclose(x.grad, w.sum(0).expand(2, 64), atol=1e-5)


def test_auto_dispatch_is_the_cpp_kernel():
    if not has_impl("quant_linear", "cpp", "cpu"):
        pytest.skip("fastlm._C is not built")
    from fastlm.backends import cpp as _cpp

    assert dispatch("quant_linear", "auto", torch.device("cpu")) is _cpp.quant_linear


# ------------------------------------------------------------------------------------------- bad input


def _bad_cases():
    qw8, s8 = make(30, 64, 8, 32)
    qw4, s4 = make(30, 64, 4, 32)
    x = torch.randn(2, 64)
    ok = dict(x=x, qweight=qw8, scales=s8, bias=None, residual=None, bits=8, group_size=32)
    return [  # (exception, message, overrides of ok)
        (TypeError, "x must be float32", dict(x=x.long())),
        (TypeError, "qweight must be", dict(qweight=qw8.float())),
        (TypeError, "qweight must be", dict(qweight=qw4, scales=s4)),  # uint8 for bits=8
        (TypeError, "qweight must be", dict(qweight=qw8, bits=4)),
        (ValueError, "qweight must be", dict(qweight=qw8[:, :32])),
        (ValueError, "qweight must be", dict(x=torch.randn(2, 63))),
        (ValueError, "bits must be 8 or 4", dict(bits=3)),
        (ValueError, "group_size", dict(group_size=48)),
        (ValueError, "group_size", dict(group_size=0)),
        (ValueError, "group_size must be even", dict(qweight=qw4, scales=s4, bits=4, group_size=1)),
        (TypeError, "scales must be float32", dict(scales=s8.half())),
        (ValueError, "scales must have shape", dict(scales=s8[:, :1])),
        (ValueError, "bias must have shape", dict(bias=torch.randn(29))),
        (TypeError, "bias has dtype", dict(bias=torch.randn(30).half())),
        (ValueError, "residual must have shape", dict(residual=torch.randn(2, 29))),
        (TypeError, "residual has dtype", dict(residual=torch.randn(2, 30).double())),
        (ValueError, "0-d", dict(x=torch.tensor(1.0))),
    ], ok


BAD, OK = _bad_cases()


@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case, backend):
    exc, message, over = BAD[case]
    a = {**OK, **over}
    with pytest.raises(exc, match=message):
        fops.quant_linear(a["x"], a["qweight"], a["scales"], a["bias"], a["residual"], bits=a["bits"],
                          group_size=a["group_size"], backend=backend)


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input_cpp_op(case):
    """The C++ op checks its own arguments (the direct dispatch path skips the Python checks): the same
    exception types, naming the same argument."""
    if not has_impl("quant_linear", "cpp", "cpu"):
        pytest.skip("fastlm._C is not built")
    exc, message, over = BAD[case]
    a = {**OK, **over}
    with pytest.raises(exc, match=message):
        torch.ops.fastlm.quant_linear(a["x"], a["qweight"], a["scales"], a["bias"], a["residual"], a["bits"],
                                      a["group_size"])


def test_opcheck():
    if not has_impl("quant_linear", "cpp", "cpu"):
        pytest.skip("fastlm._C is not built")
    qw, s = make(24, 64, 4, 32)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fastlm.quant_linear.default, (x, qw, s, None, None, 4, 32))
    qw, s = make(24, 64, 8, 64)
    torch.library.opcheck(torch.ops.fastlm.quant_linear.default,
                          (torch.randn(20, 64), qw, s, torch.randn(24), torch.randn(20, 24), 8, 64))
