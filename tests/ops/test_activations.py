"""The MLP epilogues swiglu / relu2 and their in-place forms swiglu_ / relu2_ (which the fused MLP calls) on
every backend: against the references (tests/_tolerance.py), the in-place forms against the out-of-place
op of the same backend (same values, written into the caller's memory, nothing else touched), and the
references against HF's activations (exact). Inputs: tests/ops/_inputs.py."""
import pytest
import torch
import torch.nn.functional as F

from _api import (INTERNAL_OVERLAP_MESSAGE, relu2, relu2_, relu2_ref, swiglu, swiglu_, swiglu_ref)
from _inputs import (ACTIVATION_CASES, DTYPES, activation_input, grid, layout, randn, rows_for_streaming, run_opcheck,
                     targets)
from _tolerance import assert_gradients_match, assert_op_matches, reference_pair

OPS = {"swiglu": (swiglu, swiglu_ref), "relu2": (relu2, relu2_ref)}
IN_PLACE = {"swiglu": swiglu_, "relu2": relu2_}
OVERLAP = INTERNAL_OVERLAP_MESSAGE.split(":")[0]  # "unsupported operation"
# Cases each op runs out of place, in each layout; the families' widths in their own activation
OUT_OF_PLACE = {"contiguous": ("decode_6000", "prefill_2000", "rows33_80", "two_blocks_swiglu", "rows10_relu2",
                               "one_row_3000", "1d_4", "1d_37", "no_rows"),
                "row_strided": ("decode_6000", "prefill_2000", "rows33_80"),
                "strided_rows": ("two_blocks_swiglu", "rows10_relu2", "rows33_80")}


def _ops_for(case) -> tuple:
    """A case named for an activation (the families' widths) in that one; the others in both (swiglu needs an
    even width)."""
    if case.name.endswith(("_swiglu", "_relu2")):
        return (case.name.rsplit("_", 1)[1],)
    return tuple(op for op in OPS if op == "relu2" or case.shape[-1] % 2 == 0)


def _triton_out_of_place(dtype, case, lay):
    """Two column blocks with a masked tail and strided rows in every dtype, 1-d inputs, one family each."""
    if case.name in ("two_blocks_swiglu", "rows10_relu2", "1d_4", "1d_37"):
        return True
    return dtype == torch.bfloat16 and case.name in ("helium_swiglu", "arcee_relu2", "no_rows")


@pytest.mark.parametrize("target,dtype,case,lay", grid(
    None, DTYPES, ACTIVATION_CASES, tuple(OUT_OF_PLACE),
    where=lambda dtype, case, lay: case.name in OUT_OF_PLACE[lay] or lay == "contiguous" and case.name.endswith(
        ("_swiglu", "_relu2")),
    triton=_triton_out_of_place,
    reference=lambda dtype, case, lay: dtype == torch.bfloat16 and case.name.endswith(("_swiglu", "_relu2"))))
def test_matches_reference(target, dtype, case, lay):
    x = layout(activation_input(case.shape, dtype, target.device), lay)[0]
    for op in _ops_for(case):
        fn, ref = OPS[op]
        out = fn(x, backend=target.backend)
        hi, lo = reference_pair(ref, x)
        assert_op_matches(op, target.backend, out, hi, lo, name=f"{op} {lay}")
        assert out.is_contiguous()


# in-place: contiguous, rows of a wider buffer, and a non-contiguous last dim (no row view of the caller's
# memory exists: the kernels compute aside and copy back)
IN_PLACE_LAYOUTS = ("contiguous", "row_strided", "last_dim_strided")
IN_PLACE_CASES = {"swiglu": ("prefill_2000", "rows5_80", "one_row_6000"),
                  "relu2": ("prefill_1500", "rows33_80", "one_row_3000", "1d_37")}


@pytest.mark.parametrize("target,dtype,case,op", grid(
    None, DTYPES, ACTIVATION_CASES, tuple(OPS), where=lambda dtype, case, op: case.name in IN_PLACE_CASES[op]))
def test_in_place_matches_out_of_place(target, dtype, case, op):
    fn, fn_ = OPS[op][0], IN_PLACE[op]
    for lay in IN_PLACE_LAYOUTS if len(case.shape) > 1 else ("contiguous",):
        x, buf = layout(activation_input(case.shape, dtype, target.device, seed=1), lay, pad=24, offset=0)
        expect = fn(x.clone(), backend=target.backend)
        buf_before = buf.clone()
        if op == "swiglu":
            inter = case.shape[-1] // 2
            up_before = x[..., inter:].clone()
            out = fn_(x, backend=target.backend)
            assert out.shape == (*case.shape[:-1], inter) and out.data_ptr() == x.data_ptr(), lay
            assert out.stride() == x[..., :inter].stride(), lay
            assert torch.equal(out, expect), f"{lay}: in place differs from the out-of-place op"
            assert torch.equal(x[..., :inter], expect), lay
            assert torch.equal(x[..., inter:], up_before), f"{lay}: the up half changed"
        else:
            out = fn_(x, backend=target.backend)
            assert out is x, lay
            assert torch.equal(x, expect), f"{lay}: in place differs from the out-of-place op"
        if lay == "row_strided":  # the columns past the view are not the op's
            assert torch.equal(buf[..., case.shape[-1]:], buf_before[..., case.shape[-1]:]), lay


@pytest.mark.parametrize("target", targets("swiglu_"))
def test_in_place_on_empty_inputs(target):
    e = torch.empty(0, 8, device=target.device)
    assert swiglu_(e, backend=target.backend).shape == (0, 4)
    assert relu2_(e, backend=target.backend).shape == (0, 8)


@pytest.mark.parametrize("target", targets("swiglu_", device="cpu"))
def test_in_place_on_overlapping_rows_gives_the_references_values(target):
    """Rows that overlap one another (a row stride below the row width) with no element aliased within
    the written part: the references compute out of place and copy back; so must the kernels (in place,
    one row would read what another already overwrote)."""
    def swiglu_input():  # rows [b0..b7], [b4..b11], ...: row i's up half is row i+1's gate half
        return layout(randn(4, 8), "overlapping_rows")[0]

    def relu2_input():  # 2 x 3 with a row stride of 2: element [0, 2] is element [1, 0]
        return randn(8, seed=1).as_strided((2, 3), (2, 1))

    for make, fn_ in ((swiglu_input, swiglu_), (relu2_input, relu2_)):
        ref_in, got_in = make(), make()
        try:
            expect = fn_(ref_in, backend="torch")
        except RuntimeError as exc:
            with pytest.raises(RuntimeError, match=str(exc)[:20]):
                fn_(got_in, backend=target.backend)
            continue
        got = fn_(got_in, backend=target.backend)
        torch.testing.assert_close(got, expect)
        torch.testing.assert_close(got_in, ref_in)


@pytest.mark.parametrize("target", targets("swiglu_", device="cpu"))
def test_in_place_on_a_leaf_that_requires_grad_raises_like_torch(target):
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        relu2_(randn(3, 4).requires_grad_(), backend=target.backend)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        swiglu_(randn(3, 4).requires_grad_(), backend=target.backend)
    with torch.no_grad():  # no graph to protect: the kernel runs in place
        x = randn(3, 4).requires_grad_()
        assert relu2_(x, backend=target.backend) is x


@pytest.mark.parametrize("target", targets("swiglu_", device="cpu"))
def test_in_place_on_expanded_inputs_raises_torchs_error(target):
    """Elements that alias (a zero stride): torch's RuntimeError for an in-place write, from every backend."""
    with pytest.raises(RuntimeError, match=OVERLAP):
        relu2_(layout(randn(4, 8), "expanded")[0], backend=target.backend)
    with pytest.raises(RuntimeError, match=OVERLAP):
        swiglu_(layout(randn(4, 8), "expanded")[0], backend=target.backend)
    with pytest.raises(RuntimeError, match=OVERLAP):
        relu2_(randn(3, 1).expand(3, 5), backend=target.backend)


@pytest.mark.parametrize("target,dtype", grid("swiglu", DTYPES, backends=("cpp",)))
def test_large_outputs_streamed_cpp(target, dtype):
    """swiglu / relu2 outputs of 16 MiB and more are written with non-temporal stores; bit for bit the
    same as on slices of rows, and as the in-place forms (which never stream)."""
    n, es = 3000, torch.finfo(dtype).bits // 8
    rows, step = rows_for_streaming(n, es)
    gu = randn(rows, 2 * n, dtype=dtype, seed=8, scale=3.0)
    x = gu[:, :n].contiguous()
    gu_in_place, x_in_place = gu.clone(), x.clone()
    swiglu_(gu_in_place, backend=target.backend)
    relu2_(x_in_place, backend=target.backend)
    b = target.backend
    for name, out, sliced, in_place in (
        ("swiglu", swiglu(gu, backend=b), lambda j: swiglu(gu[j:j + step], backend=b), gu_in_place[:, :n]),
        ("relu2", relu2(x, backend=b), lambda j: relu2(x[j:j + step], backend=b), x_in_place),
    ):
        assert torch.equal(out, torch.cat([sliced(j) for j in range(0, rows, step)])), name
        assert torch.equal(out, in_place), name
    hi, lo = reference_pair(swiglu_ref, gu[:64])
    assert_op_matches("swiglu", b, swiglu(gu, backend=b)[:64], hi, lo, name="streamed swiglu")


@pytest.mark.parametrize("target", targets("swiglu", backends=("cpp",)))
def test_swiglu_fp32_silu_within_torchs_ulps_cpp(target):
    """The CPU kernels' own exp (vec_util.h exp_u1) in silu: every 997th fp32 bit pattern of [-104, 89]
    against silu in fp64, in units in the last place of the fp32 result. ATen's silu (1-ulp Sleef exp)
    is at most 2.26 ulp off there; ours must be within 2.5. Below -88.7, 1 + exp(-x) overflows fp32 in
    both, giving -0 for a true value under 1e-36 in magnitude."""
    def floats(hi_bits, negative):  # fp32 values whose bit patterns are every 997th of [0, hi_bits)
        b = torch.arange(0, hi_bits, 997, dtype=torch.int64)
        return ((b | 0x80000000) - (1 << 32) if negative else b).to(torch.int32).view(torch.float32)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 88.72, 88.73, -88.72, -103.9,
                             1e-45, -1e-45, 3e38, -3e38])
    g = torch.cat([floats(0x42D00000, True), floats(0x42B20000, False), specials])  # [-104, 89]
    out = swiglu(torch.stack([g, torch.ones_like(g)], 1), backend=target.backend).squeeze(1)
    g64 = g.double()
    ref = g64 / (1 + torch.exp(-g64))
    ref32 = ref.float().abs()
    ulp = (torch.nextafter(ref32, torch.tensor(float("inf"))) - ref32).double()
    finite = torch.isfinite(ref) & (g > -88.7)
    err_ulp = ((out.double() - ref).abs() / ulp)[finite]
    torch_ulp = ((F.silu(g).double() - ref).abs() / ulp)[finite]
    assert err_ulp.max() <= 2.5, f"silu: {err_ulp.max():.2f} ulp at x = {g[finite][err_ulp.argmax()]}"
    assert torch_ulp.max() >= 1.0  # the measure itself sees torch's rounding
    tail = (g <= -88.7) & torch.isfinite(g)
    assert (out[tail].double() - ref[tail]).abs().max() < 1e-36
    same_class = torch.isnan(out) == torch.isnan(F.silu(g))
    assert same_class.all() and torch.equal(torch.isinf(out), torch.isinf(F.silu(g)))


GRAD_LOSSES = {
    "swiglu": lambda b, x, r, w: swiglu(x * w, backend=b).square().sum(),
    "relu2": lambda b, x, r, w: relu2(x - r, backend=b).sum(),
    "swiglu_": lambda b, x, r, w: swiglu_(x * w, backend=b).square().sum(),
    "relu2_": lambda b, x, r, w: relu2_(x - r, backend=b).sum(),
}


@pytest.mark.parametrize("target", targets("swiglu", kernels=True, device="cpu"))
@pytest.mark.parametrize("op", sorted(GRAD_LOSSES))
def test_gradients_equal_the_references(target, op):
    x, r, w = randn(3, 64), randn(3, 64, seed=1), randn(64, seed=2)
    assert_gradients_match(GRAD_LOSSES[op], (x, r, w), target.backend)


@pytest.mark.parametrize("target", targets(None, kernels=True))
@pytest.mark.parametrize("op", ["swiglu", "relu2", "swiglu_", "relu2_"])
def test_opcheck(target, op):
    """The in-place forms too are real kernels of their own on each kernel backend (not the reference's copy_)."""
    run_opcheck(op, target)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_references_match_hf(dtype):
    from transformers.activations import ACT2FN

    x = randn(7, 2 * 3000, dtype=dtype)
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(swiglu_ref(x), ACT2FN["silu"](gate) * up, rtol=0, atol=0)
    torch.testing.assert_close(relu2_ref(x), ACT2FN["relu2"](x), rtol=0, atol=0)
