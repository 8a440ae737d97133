"""add_rms_norm on every backend against its reference (tests/_tolerance.py), and the reference against HF's
RMSNorm modules (exact). Inputs: tests/ops/_inputs.py."""
import pytest
import torch

from _api import add_rms_norm, add_rms_norm_ref
from _inputs import (DTYPES, NORM_LAYOUT_PAIRS, grid, norm_cases, norm_inputs, norm_layout_triton, perturbed, randn,
                     rows_for_streaming, run_opcheck, strided_norm_inputs, targets)
from _tolerance import assert_gradients_match, assert_op_matches, reference_pair

OP = "add_rms_norm"
# (weight's dtype, weight_in_fp32): Arcee's order and Helium's, with the weight in x's dtype or in fp32
WEIGHTS = (("x", False), ("x", True), ("fp32", False), ("fp32", True))
CASES = norm_cases("rms")


def _eps(weight):
    return 1e-8 if weight == ("x", True) else 1e-5  # Helium's eps; Arcee's


def _combinations(dtype, case, residual, weight):
    """fp32 weights (a 16-bit x) on one and on 21 rows with a residual; both cast orders with and without a
    residual on the main shapes, with a residual (or, narrow rows, without) on the families' and wide rows;
    Arcee's order with a residual on the rest."""
    if weight[0] == "fp32":
        return dtype != torch.float32 and residual and case.name in ("prefill_3000", "decode_3000")
    if case.name in ("decode_3000", "prefill_3000", "rows66_80"):
        return True
    if case.name in ("2d_3000", "hidden_2560", "rows6_64"):
        return residual != (case.name == "rows6_64")
    return weight == ("x", False) and residual


def _triton_subset(dtype, case, residual, weight):
    """On Triton: the wide and narrow rows in every dtype and cast order, each family's
    hidden size in bf16, an fp32 weight once per order, and zero rows."""
    if case.name == "2d_3000":
        return residual and weight[0] == "x"
    if case.name == "rows6_64":
        return not residual and weight[0] == "x"
    if case.name == "decode_3000":
        return dtype == torch.float16 and weight[0] == "fp32"
    if case.name == "no_rows":
        return dtype == torch.float32 and residual
    if case.name.startswith("hidden_"):  # Arcee's and Helium's hidden size, in both cast orders
        return dtype == torch.bfloat16 and residual and weight[0] == "x"
    return False


@pytest.mark.parametrize("target,dtype,case,residual,weight",
                         grid(OP, DTYPES, CASES, (True, False), WEIGHTS, where=_combinations,
                              triton=_triton_subset,
                              reference=lambda dtype, case, residual, weight: dtype == torch.bfloat16 and
                              case.name.startswith("hidden_") and weight[0] == "x"))
def test_matches_reference(target, dtype, case, residual, weight):
    weight_in_fp32 = weight[1]
    x, r, w, _ = norm_inputs(case.shape, dtype, target.device, residual=residual,
                             weight_dtype=torch.float32 if weight[0] == "fp32" else dtype)
    eps = _eps(weight)
    y, h = add_rms_norm(x, r, w, eps, weight_in_fp32, backend=target.backend)
    hi, lo = reference_pair(add_rms_norm_ref, x, r, w, eps, weight_in_fp32)
    assert_op_matches(OP, target.backend, y, hi[0], lo[0], name="y")
    assert y.shape == x.shape
    if residual:
        assert torch.equal(h, lo[1]), "h must equal residual + x rounded to the dtype"
    else:
        assert h is x


@pytest.mark.parametrize("target,dtype,layouts", grid(OP, DTYPES, NORM_LAYOUT_PAIRS, triton=norm_layout_triton,
                                                      reference=lambda dtype, layouts: dtype == torch.float32))
def test_non_contiguous_inputs(target, dtype, layouts):
    """Strided, reordered and overlapping (expanded) inputs: bit for bit the result of contiguous copies, and
    (fp32, bf16) the reference's answer; in fp16 the contiguous result's accuracy is test_matches_reference's."""
    x, r, w, _ = strided_norm_inputs(target, dtype, layouts)
    for weight_in_fp32 in (False, True):
        y, h = add_rms_norm(x, r, w, 1e-6, weight_in_fp32, backend=target.backend)
        y_c, h_c = add_rms_norm(x.contiguous(), r.contiguous(), w, 1e-6, weight_in_fp32, backend=target.backend)
        assert torch.equal(y, y_c) and torch.equal(h, h_c), f"weight_in_fp32={weight_in_fp32}"
        if dtype == torch.float16:
            continue
        hi, lo = reference_pair(add_rms_norm_ref, x, r, w, 1e-6, weight_in_fp32)
        assert_op_matches(OP, target.backend, y, hi[0], lo[0], name=f"y (weight_in_fp32={weight_in_fp32})")


@pytest.mark.parametrize("target,dtype,residual", grid(OP, DTYPES, (True, False), backends=("cpp",)))
def test_large_outputs_streamed_cpp(target, dtype, residual):
    """The C++ kernel writes outputs of 16 MiB and more with non-temporal stores (store_chunk), and its fp32
    path then keeps h in its scratch row instead of reading it back. The per-row math is the same either
    way: bit for bit the op run on slices of rows small enough for ordinary stores. Width 3000: rows start
    at addresses that are not 64-byte aligned, so streamed and ordinary chunks mix."""
    n, es = 3000, torch.finfo(dtype).bits // 8
    rows, step = rows_for_streaming(n, 2 * es if residual else es)
    x = randn(rows, n, dtype=dtype, seed=7, shift=1.0)
    r = randn(rows, n, dtype=dtype, seed=8, scale=2.0) if residual else None
    w = randn(n, dtype=dtype, seed=9, scale=0.5, shift=1.0)
    for weight, eps, weight_in_fp32 in ((w, 1e-5, False), (w.float(), 1e-8, True)):
        y, h = add_rms_norm(x, r, weight, eps, weight_in_fp32, backend=target.backend)
        parts = [add_rms_norm(x[j:j + step], None if r is None else r[j:j + step], weight, eps, weight_in_fp32,
                              backend=target.backend) for j in range(0, rows, step)]
        assert torch.equal(y, torch.cat([p[0] for p in parts])), f"y (weight_in_fp32={weight_in_fp32})"
        if residual:
            assert torch.equal(h, torch.cat([p[1] for p in parts])), f"h (weight_in_fp32={weight_in_fp32})"
        hi, lo = reference_pair(add_rms_norm_ref, x[:64], None if r is None else r[:64], weight, eps, weight_in_fp32)
        assert_op_matches(OP, target.backend, y[:64], hi[0], lo[0], name="streamed y")


@pytest.mark.parametrize("target", targets(OP, kernels=True, device="cpu"))
def test_gradients_equal_the_references(target):
    """A kernel has no backward: with an input requiring grad the public op gives the reference's graph."""
    x, r, w = randn(3, 64), randn(3, 64, seed=1), randn(64, seed=2)

    def both_outputs(b, x_, r_, w_):
        y, h = add_rms_norm(x_, r_, w_, 1e-5, backend=b)
        return y.square().sum() + h.sum()

    assert_gradients_match(both_outputs, (x, r, w), target.backend)
    assert_gradients_match(lambda b, x_, r_, w_: add_rms_norm(x_, None, w_, 1e-5, True, backend=b)[0].square().sum(),
                           (x, r, w), target.backend)


@pytest.mark.parametrize("target", targets(OP, kernels=True))
def test_opcheck(target):
    run_opcheck(OP, target)


# ------------------------------------------------------------------------------- the reference vs HF

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("family,weight_in_fp32", [("arcee", False), ("helium", True)])
def test_reference_matches_hf(dtype, family, weight_in_fp32):
    """The two cast orders are those of ArceeRMSNorm and HeliumRMSNorm: exact in every dtype."""
    from transformers.models.arcee.modeling_arcee import ArceeRMSNorm
    from transformers.models.helium.modeling_helium import HeliumRMSNorm

    norm = perturbed({"arcee": ArceeRMSNorm, "helium": HeliumRMSNorm}[family](3000, eps=1e-5)).to(dtype)
    x, res = randn(2, 7, 3000, dtype=dtype, seed=1), randn(2, 7, 3000, dtype=dtype, seed=2)
    y, h = add_rms_norm_ref(x, res, norm.weight, 1e-5, weight_in_fp32)
    torch.testing.assert_close(h, res + x, rtol=0, atol=0)
    torch.testing.assert_close(y, norm(res + x), rtol=0, atol=0)
    y0, h0 = add_rms_norm_ref(x, None, norm.weight, 1e-5, weight_in_fp32)
    assert h0 is x
    torch.testing.assert_close(y0, norm(x), rtol=0, atol=0)


def test_cast_orders_differ_in_bf16():
    """The flag matters: the two orders give different bf16 results (else the test above proves little)."""
    w, x = randn(3000, dtype=torch.bfloat16), randn(4, 3000, dtype=torch.bfloat16, seed=1)
    assert not torch.equal(add_rms_norm_ref(x, None, w, 1e-5, False)[0], add_rms_norm_ref(x, None, w, 1e-5, True)[0])
