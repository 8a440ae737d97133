"""linear (x @ weight.T + bias + residual) on every backend with a kernel of its own (cpp; Triton runs the
reference: tests/test_backends.py) against the reference in fp64 (tests/_tolerance.py). Inputs:
tests/ops/_inputs.py."""
import pytest
import torch

from _api import linear, linear_ref
from _inputs import DTYPES, LINEAR_NK, LINEAR_ROWS, grid, layout, linear_inputs, randn, run_opcheck, targets
from _tolerance import assert_gradients_match, assert_op_matches, reference_pair

OP = "linear"


@pytest.mark.parametrize("target,dtype,rows,nk,bias,residual", grid(
    OP, DTYPES, LINEAR_ROWS, LINEAR_NK, (False, True), (False, True),
    reference=lambda dtype, rows, nk, bias, residual: dtype == torch.bfloat16 and nk == (37, 129) and rows == (7,)))
def test_matches_reference(target, dtype, rows, nk, bias, residual):
    """Up to 16 rows in the C++ kernel, more through ATen; odd N (tail rows) and odd K (tail chunks)."""
    x, w, b, r = linear_inputs(rows, *nk, dtype, target.device, bias=bias, residual=residual)
    out = linear(x, w, b, r, backend=target.backend)
    hi, lo = reference_pair(linear_ref, x, w, b, r, upcast_to=torch.float64)
    assert out.shape == (*rows, nk[0])
    assert_op_matches(OP, target.backend, out, hi, lo)


@pytest.mark.parametrize("target,dtype", grid(OP, DTYPES))
def test_strided_inputs(target, dtype):
    """Rows of x strided (a slice of a wider activation), the weight a row view into a fused [3N, K] storage."""
    x = layout(randn(3, 5, 96, dtype=dtype, device=target.device, seed=5), "row_strided", pad=24, offset=0)[0]
    fused = randn(3 * 40, 96, dtype=dtype, device=target.device, seed=6, scale=0.1)
    w = fused[40:80]
    out = linear(x, w, backend=target.backend)
    hi, lo = reference_pair(linear_ref, x, w, upcast_to=torch.float64)
    assert_op_matches(OP, target.backend, out, hi, lo, name="linear strided")
    assert out.is_contiguous() and out.shape == (3, 5, 40)


@pytest.mark.parametrize("target", targets(OP, kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    x, r, w = randn(3, 64), randn(3, 64, seed=1), randn(64, seed=2)
    assert_gradients_match(
        lambda b, x_, r_, w_: linear(x_, torch.stack([w_, 2 * w_, -w_]), w_[:3], r_[..., :3], backend=b).square().sum(),
        (x, r, w), target.backend)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)
