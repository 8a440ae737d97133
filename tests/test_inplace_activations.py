"""swiglu_ / relu2_, the in-place MLP epilogues the fused MLP calls, on every backend (Triton through
the interpreter): the same values as the out-of-place op of the same backend, written into the
caller's memory (swiglu_: the gate half; relu2_: x), nothing else touched, for contiguous,
row-strided and non-row-viewable inputs."""
import pytest
import torch

from _backends import backend_params
from fastlm import ops
from fastlm.ops._registry import impl

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _wide(shape, dtype, extra=24, seed=0):
    """Random [..., N] rows inside a wider buffer: returns (buffer, row-strided view)."""
    g = torch.Generator().manual_seed(seed)
    wide = (3 * torch.randn(*shape[:-1], shape[-1] + extra, generator=g)).to(dtype)
    return wide, wide[..., : shape[-1]]


def _layouts(shape, dtype):
    """(name, buffer, input view) per layout; the op must write through the view into the buffer."""
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    wide, strided = _wide(shape, dtype)
    # last dim not contiguous: no row view of the caller's memory exists (the kernels compute aside)
    t = (3 * torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g)).to(dtype)
    return [("contiguous", x, x), ("row-strided", wide, strided), ("transposed", t, t.transpose(-1, -2))]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 2 * 1000), (5, 2 * 40), (2, 1, 2 * 3000)])
def test_swiglu_inplace(backend, dtype, shape):
    inter = shape[-1] // 2
    for name, buf, x in _layouts(shape, dtype):
        expect = ops.swiglu(x.clone(), backend=backend)
        up_before, buf_before = x[..., inter:].clone(), buf.clone()
        out = ops.swiglu_(x, backend=backend)
        assert out.shape == (*shape[:-1], inter) and out.data_ptr() == x.data_ptr(), name
        assert out.stride() == x[..., :inter].stride(), name
        assert torch.equal(out, expect), f"{name}: in place differs from the out-of-place op"
        assert torch.equal(x[..., :inter], expect), name
        assert torch.equal(x[..., inter:], up_before), f"{name}: the up half changed"
        if name == "row-strided":  # the columns past the view are not the op's
            assert torch.equal(buf[..., shape[-1]:], buf_before[..., shape[-1]:]), name


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 1500), (33, 80), (2, 1, 3000)])
def test_relu2_inplace(backend, dtype, shape):
    for name, buf, x in _layouts(shape, dtype):
        expect = ops.relu2(x.clone(), backend=backend)
        buf_before = buf.clone()
        out = ops.relu2_(x, backend=backend)
        assert out is x, name
        assert torch.equal(x, expect), f"{name}: in place differs from the out-of-place op"
        if name == "row-strided":
            assert torch.equal(buf[..., shape[-1]:], buf_before[..., shape[-1]:]), name
    z = torch.randn(37).to(dtype)
    expect = ops.relu2(z, backend=backend)
    assert torch.equal(ops.relu2_(z, backend=backend), expect), "1-d"


@pytest.mark.parametrize("backend", backend_params())
def test_inplace_empty_and_bad_input(backend):
    e = torch.empty(0, 8)
    assert ops.swiglu_(e, backend=backend).shape == (0, 4)
    assert ops.relu2_(e, backend=backend).shape == (0, 8)
    with pytest.raises(ValueError, match="even"):
        ops.swiglu_(torch.randn(2, 5), backend=backend)
    with pytest.raises(TypeError, match="float32"):
        ops.relu2_(torch.ones(3, 4, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="0-d"):
        ops.relu2_(torch.tensor(1.0), backend=backend)


def test_kernel_backends_have_their_own_inplace_impls():
    """The in-place ops are real kernels on cpp and triton, not the reference's copy_."""
    from fastlm.ops._registry import has_impl

    for backend in ("cpp", "triton"):
        for op in ("swiglu_", "relu2_"):
            assert has_impl(op, backend, "cpu"), (backend, op)
            assert impl(op, backend, "cpu") is not impl(op, "torch", "cpu")


def test_opcheck_cpp_inplace():
    pytest.importorskip("fastlm._C", reason="the C++ extension is not built")
    assert ops.backend_status("cpp", "cpu")[0]  # loads the plugin: the registry registers the fakes

    x = torch.randn(3, 5, 64)
    torch.library.opcheck(torch.ops.fastlm.swiglu_.default, (x,))
    torch.library.opcheck(torch.ops.fastlm.relu2_.default, (x.to(torch.bfloat16),))
    torch.library.opcheck(torch.ops.fastlm.relu2_.default, (x[:, :, :40],))


def test_opcheck_triton_inplace():
    pytest.importorskip("triton", reason="triton is not installed")
    import fastlm.kernels  # noqa: F401

    x = torch.randn(2, 3, 64)
    torch.library.opcheck(torch.ops.fastlm.triton_swiglu_inplace.default, (x,))
    torch.library.opcheck(torch.ops.fastlm.triton_relu2_inplace.default, (x[..., :33],))
