"""add_layer_norm on every backend against its reference (tests/_tolerance.py), and the reference against
torch.nn.LayerNorm (exact). Inputs: tests/ops/_inputs.py."""
import pytest
import torch

from _api import add_layer_norm, add_layer_norm_ref
from _inputs import (DTYPES, NORM_LAYOUT_PAIRS, grid, norm_cases, norm_inputs, norm_layout_triton, perturbed, randn,
                     rows_for_streaming, run_opcheck, strided_norm_inputs, targets)
from _tolerance import assert_gradients_match, assert_op_matches, reference_pair

OP = "add_layer_norm"
CASES = norm_cases("layer")


def _combinations(dtype, case, residual, bias):
    """With and without residual and bias on the main shapes, neither on narrow rows, both on the rest."""
    if case.name in ("decode_3000", "prefill_2560", "rows66_80"):
        return True
    return not residual and not bias if case.name == "rows6_64" else residual and bias


def _triton_subset(dtype, case, residual, bias):
    """On Triton: wide rows with residual and bias and narrow ones without in every dtype,
    StableLM's and Persimmon's hidden sizes in bf16, one decode row, zero rows."""
    if case.name == "2d_3000":
        return residual and bias
    if case.name == "rows6_64":
        return not residual and not bias
    if case.name.startswith("hidden_"):
        return dtype == torch.bfloat16 and residual and bias
    if case.name == "decode_3000":
        return dtype == torch.float16 and residual != bias
    return case.name == "no_rows" and dtype == torch.float32 and residual and bias


@pytest.mark.parametrize("target,dtype,case,residual,bias", grid(
    OP, DTYPES, CASES, (True, False), (True, False), where=_combinations, triton=_triton_subset,
    reference=lambda dtype, case, residual, bias: dtype == torch.bfloat16 and case.name.startswith("hidden_")))
def test_matches_reference(target, dtype, case, residual, bias):
    # x's mean offset from 0 exercises the centred (two-pass) variance and the loop path's merges
    x, r, w, b = norm_inputs_shifted(case.shape, dtype, target.device, residual, bias)
    y, h = add_layer_norm(x, r, w, b, 1e-5, backend=target.backend)
    hi, lo = reference_pair(add_layer_norm_ref, x, r, w, b, 1e-5)
    assert_op_matches(OP, target.backend, y, hi[0], lo[0], name="y")
    if residual:
        assert torch.equal(h, lo[1]), "h must equal residual + x rounded to the dtype"
    else:
        assert h is x


def norm_inputs_shifted(shape, dtype, device, residual, bias, seed=1):
    return norm_inputs(shape, dtype, device, residual=residual, bias=bias, seed=seed, shift=2.0)


@pytest.mark.parametrize("target,dtype,layouts", grid(OP, DTYPES, NORM_LAYOUT_PAIRS, triton=norm_layout_triton,
                                                      reference=lambda dtype, layouts: dtype == torch.float32))
def test_non_contiguous_inputs(target, dtype, layouts):
    """Strided, reordered and overlapping (expanded) inputs: bit for bit the result of contiguous copies, and
    (fp32, bf16) the reference's answer; in fp16 the contiguous result's accuracy is test_matches_reference's."""
    x, r, w, b = strided_norm_inputs(target, dtype, layouts, bias=True, shift=2.0)
    y, h = add_layer_norm(x, r, w, b, 1e-5, backend=target.backend)
    y_c, h_c = add_layer_norm(x.contiguous(), r.contiguous(), w, b, 1e-5, backend=target.backend)
    assert torch.equal(y, y_c) and torch.equal(h, h_c)
    if dtype != torch.float16:
        hi, lo = reference_pair(add_layer_norm_ref, x, r, w, b, 1e-5)
        assert_op_matches(OP, target.backend, y, hi[0], lo[0], name="y")


@pytest.mark.parametrize("target,dtype,residual", grid(OP, DTYPES, (True, False), backends=("cpp",)))
def test_large_outputs_streamed_cpp(target, dtype, residual):
    """Outputs of 16 MiB and more go through the C++ kernel's non-temporal stores: bit for bit the op on
    slices of rows small enough for ordinary stores (see test_add_rms_norm.py's twin), and the reference's
    answer."""
    n, es = 3000, torch.finfo(dtype).bits // 8
    rows, step = rows_for_streaming(n, 2 * es if residual else es)
    x = randn(rows, n, dtype=dtype, seed=7, shift=1.0)
    r = randn(rows, n, dtype=dtype, seed=8, scale=2.0) if residual else None
    w, b = randn(n, dtype=dtype, seed=9, scale=0.5, shift=1.0), randn(n, dtype=dtype, seed=10)
    y, h = add_layer_norm(x, r, w, b, 1e-5, backend=target.backend)
    parts = [add_layer_norm(x[j:j + step], None if r is None else r[j:j + step], w, b, 1e-5, backend=target.backend)
             for j in range(0, rows, step)]
    assert torch.equal(y, torch.cat([p[0] for p in parts])), "y"
    if residual:
        assert torch.equal(h, torch.cat([p[1] for p in parts])), "h"
    hi, lo = reference_pair(add_layer_norm_ref, x[:64], None if r is None else r[:64], w, b, 1e-5)
    assert_op_matches(OP, target.backend, y[:64], hi[0], lo[0], name="streamed y")


@pytest.mark.parametrize("target", targets(OP, kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    x, r, w = randn(3, 64), randn(3, 64, seed=1), randn(64, seed=2)
    assert_gradients_match(
        lambda b, x_, r_, w_: add_layer_norm(x_, r_, w_, w_ * 0.5, 1e-5, backend=b)[0].square().sum(), (x, r, w),
        target.backend)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_torch_layer_norm(dtype, bias):
    """StableLM's and Persimmon's nn.LayerNorm, exact in every dtype."""
    norm = perturbed(torch.nn.LayerNorm(3000, eps=1e-5, bias=bias)).to(dtype)
    x, res = randn(7, 3000, dtype=dtype, seed=1), randn(7, 3000, dtype=dtype, seed=2)
    y, h = add_layer_norm_ref(x, res, norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(h, res + x, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(res + x), rtol=0, atol=0)
