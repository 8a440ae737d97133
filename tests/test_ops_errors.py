"""Regressions for the op-level defects of issue 13, on every backend available here (cpp; triton under
the interpreter): one behaviour for all backends, the reference's answer or the same clear error.

1. KV-cache positions outside [0, Tmax) (a zero-length cache segfaulted the C++ backend; the
   reference wrote slot -1 = the last): ValueError on CPU, caches untouched; the kernels' own guard
   (what runs unchecked on CUDA) drops such rows instead of writing out of bounds.
2. A meta / other-device weight, bias or residual beside a CPU x (the C++ norms returned uninitialised
   memory): the reference's ValueError.
3. In-place activations on overlapping memory (expanded: wrong values in C++): torch's RuntimeError;
   rows that overlap without aliasing elements: the reference's values.
4. Inputs requiring grad: the public ops' gradients are the reference's, on every backend.
5. decode_attention: NaN / inf in slots past the lengths never reach the output; lengths outside
   [1, Tmax] raise on CPU; a strided lengths tensor is read correctly; the Triton kernel's own guard.
6. Bad arguments get one TypeError / ValueError naming the argument, never an internal error.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (tests/conftest.py does too)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastlm.ops as ops  # noqa: E402
from _backends import backend_params  # noqa: E402
from fastlm._checks import INTERNAL_OVERLAP_MESSAGE  # noqa: E402

BACKENDS = backend_params()
KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]
OVERLAP = INTERNAL_OVERLAP_MESSAGE.split(":")[0]  # "unsupported operation"


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv_inputs(B=2, S=3, H=4, Hkv=2, D=16, t_max=6, dtype=torch.float32):
    qkv = randn(B, S, (H + 2 * Hkv) * D, dtype=dtype)
    freqs = randn(1, S, D // 2, seed=1)
    cos, sin = torch.cat((freqs.cos(), freqs.cos()), -1).to(dtype), torch.cat((freqs.sin(), freqs.sin()), -1).to(dtype)
    caches = randn(B, Hkv, t_max, D, dtype=dtype, seed=2), randn(B, Hkv, t_max, D, dtype=dtype, seed=3)
    return qkv, cos, sin, caches, dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=D)


# ------------------------------------------------------------------ 1. cache positions out of range


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t_max,bad", [(0, 0), (6, -1), (6, 6), (6, 1 << 40)])
def test_cache_positions_outside_the_cache_raise_and_write_nothing(backend, t_max, bad):
    qkv, cos, sin, (kc, vc), dims = qkv_inputs(t_max=t_max)
    pos = torch.tensor([[0, 1, 2], [3, bad, 4]]) if t_max else torch.full((2, 3), bad)
    kc0, vc0 = kc.clone(), vc.clone()
    with pytest.raises(ValueError, match=r"cache_positions\[.*\] = .* is outside the cache.*\[0, Tmax\) = \[0, "
                                         f"{t_max}\\)"):
        ops.qkv_rope_cache(qkv, cos, sin, kc, vc, pos, **dims, backend=backend)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_positions_int32_and_strided(backend):
    qkv, cos, sin, (kc, vc), dims = qkv_inputs()
    wide = torch.tensor([[5, 9, 0, 9, 2, 9], [1, 9, 4, 9, 3, 9]], dtype=torch.int32)
    pos = wide[:, ::2]  # [B, S] with a stride of 2
    ref_k, ref_v = kc.clone(), vc.clone()
    q_ref = ops.qkv_rope_cache(qkv, cos, sin, ref_k, ref_v, pos.contiguous().long(), **dims, backend="torch")
    q = ops.qkv_rope_cache(qkv, cos, sin, kc, vc, pos, **dims, backend=backend)
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(kc, ref_k)
    torch.testing.assert_close(vc, ref_v)


def test_triton_kernel_drops_rows_outside_the_cache(monkeypatch):
    """On CUDA nothing checks the positions (a host sync): the kernel itself must not write out of
    bounds. Here the CPU check is switched off and each cache sits inside a guard buffer."""
    pytest.importorskip("triton", reason="triton is not installed")
    import fastlm.kernels.qkv_rope as kq

    monkeypatch.setattr(kq, "check_positions", lambda *a: None)
    qkv, cos, sin, _, dims = qkv_inputs()
    t_max = 6
    kbuf, vbuf = torch.full((2, 2, t_max + 2, 16), 7.0), torch.full((2, 2, t_max + 2, 16), 7.0)
    kc, vc = kbuf[:, :, 1:-1], vbuf[:, :, 1:-1]  # one guard slot either side of each cache
    pos = torch.tensor([[0, -1, 2], [t_max, 3, 1 << 33]])
    ops.qkv_rope_cache(qkv, cos, sin, kc, vc, pos, **dims, backend="triton")
    _, k, v = ops.qkv_rope(qkv, cos, sin, **dims, backend="torch")  # [B, Hkv, S, D]
    written = {(0, 0): 0, (0, 2): 2, (1, 3): 1}  # (b, slot) -> token s, for the in-range positions
    for b in range(2):
        for t in range(-1, t_max + 1):
            if (b, t) in written:
                torch.testing.assert_close(kc[b, :, t], k[b, :, written[b, t]])
                torch.testing.assert_close(vc[b, :, t], v[b, :, written[b, t]])
            else:  # untouched, guard slots (t = -1, Tmax) included
                assert (kbuf[b, :, t + 1] == 7.0).all() and (vbuf[b, :, t + 1] == 7.0).all(), (b, t)


# ---------------------------------------------------------------- 2. devices of every tensor argument


def _norm_calls(backend, x, r, w, b):
    return [lambda: ops.add_rms_norm(x, r, w, 1e-5, backend=backend),
            lambda: ops.add_rms_norm(x, r, w, 1e-5, True, backend=backend),
            lambda: ops.add_layer_norm(x, r, w, b, 1e-5, backend=backend)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["weight", "bias", "residual"])
def test_norms_reject_a_meta_argument_beside_a_cpu_x(backend, where):
    x = randn(3, 64)
    args = {"r": randn(3, 64, seed=1), "w": randn(64, seed=2), "b": randn(64, seed=3)}
    key = {"weight": "w", "bias": "b", "residual": "r"}[where]
    args[key] = torch.empty_like(args[key], device="meta")
    for i, fn in enumerate(_norm_calls(backend, x, args["r"], args["w"], args["b"])):
        if where == "bias" and i < 2:
            continue  # RMSNorm has no bias
        with pytest.raises(ValueError, match=f"{where} is on meta but x is on cpu"):
            fn()


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ops_reject_a_meta_argument(backend):
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    x, w = randn(2, 8), randn(4, 8)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        ops.linear(x, meta(w), backend=backend)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        ops.linear(x, w, meta(randn(4)), backend=backend)
    qkv, cos, sin, (kc, vc), dims = qkv_inputs()
    with pytest.raises(ValueError, match="sin is on meta but qkv is on cpu"):
        ops.qkv_rope(qkv, cos, meta(sin), **dims, backend=backend)
    with pytest.raises(ValueError, match="v_cache is on meta but qkv is on cpu"):
        ops.qkv_rope_cache(qkv, cos, sin, kc, meta(vc), torch.zeros(2, 3, dtype=torch.long), **dims, backend=backend)
    q, k = randn(2, 4, 16), randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="lengths is on meta but q is on cpu"):
        ops.decode_attention(q, k, k, torch.ones(2, dtype=torch.long, device="meta"), 0.25, backend=backend)


def test_cpp_meta_path_checks_devices():
    """A direct call of the C++ op with a meta weight and a CPU x reaches the op's fake (Meta) kernel,
    not the CPU kernel and its checks: the fake raises the same error."""
    pytest.importorskip("fastlm._C", reason="the C++ extension is not built")
    assert ops.backend_status("cpp", "cpu")[0]  # loads the plugin: the registry registers the fakes

    x = randn(3, 64)
    meta_w = torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        torch.ops.fastlm.add_rms_norm(x, None, meta_w, 1e-5, False)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        torch.ops.fastlm.add_layer_norm(x, None, meta_w, None, 1e-5)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        torch.ops.fastlm.linear(x, torch.empty(4, 64, device="meta"))
    y, h = torch.ops.fastlm.add_rms_norm(x.to("meta"), None, meta_w, 1e-5, False)  # all meta: shapes only
    assert y.device.type == "meta" and y.shape == (3, 64)


# ---------------------------------------------------------------------------- 3. in-place overlap


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_expanded_tensors_raises_torchs_error(backend):
    with pytest.raises(RuntimeError, match=OVERLAP):
        ops.relu2_(randn(1, 8).expand(4, 8), backend=backend)
    with pytest.raises(RuntimeError, match=OVERLAP):
        ops.swiglu_(randn(1, 8).expand(4, 8), backend=backend)
    with pytest.raises(RuntimeError, match=OVERLAP):
        ops.relu2_(randn(3, 1).expand(3, 5), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_overlapping_rows_gives_the_references_values(backend):
    """Rows that overlap one another (a row stride below the row width) with no element aliased within
    the written part: the references compute out of place and copy back; so must the kernels (in place,
    one row would read what another already overwrote)."""
    def swiglu_input():  # rows [b0..b7], [b4..b11], ...: row i's up half is row i+1's gate half
        return randn(24).as_strided((4, 8), (4, 1))

    def relu2_input():  # 2 x 3 with a row stride of 2: element [0, 2] is element [1, 0]
        return randn(8, seed=1).as_strided((2, 3), (2, 1))

    for make, op in ((swiglu_input, "swiglu_"), (relu2_input, "relu2_")):
        ref_in, got_in = make(), make()
        try:
            expect = getattr(ops, op)(ref_in, backend="torch")
        except RuntimeError as exc:
            with pytest.raises(RuntimeError, match=str(exc)[:20]):
                getattr(ops, op)(got_in, backend=backend)
            continue
        got = getattr(ops, op)(got_in, backend=backend)
        torch.testing.assert_close(got, expect)
        torch.testing.assert_close(got_in, ref_in)


# -------------------------------------------------------------------------------------- 4. autograd


def _grads(loss_fn, tensors):
    for t in tensors:
        t.grad = None
    loss_fn().backward()
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


GRAD_CASES = {
    "add_rms_norm": lambda b, x, r, w: ops.add_rms_norm(x, r, w, 1e-5, backend=b)[0].square().sum()
    + ops.add_rms_norm(x, r, w, 1e-5, backend=b)[1].sum(),
    "add_rms_norm_fp32": lambda b, x, r, w: ops.add_rms_norm(x, None, w, 1e-5, True, backend=b)[0].square().sum(),
    "add_layer_norm": lambda b, x, r, w: ops.add_layer_norm(x, r, w, w * 0.5, 1e-5, backend=b)[0].square().sum(),
    "swiglu": lambda b, x, r, w: ops.swiglu(x * w, backend=b).square().sum(),
    "relu2": lambda b, x, r, w: ops.relu2(x - r, backend=b).sum(),
    "swiglu_": lambda b, x, r, w: ops.swiglu_(x * w, backend=b).square().sum(),
    "relu2_": lambda b, x, r, w: ops.relu2_(x - r, backend=b).sum(),
    "linear": lambda b, x, r, w: ops.linear(x, torch.stack([w, 2 * w, -w]), w[:3], r[..., :3],
                                            backend=b).square().sum(),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients_equal_the_references(backend, case):
    fn = GRAD_CASES[case]
    x, r, w = randn(3, 64), randn(3, 64, seed=1), randn(64, seed=2)
    leaves_ref, leaves = _leaves(x, r, w), _leaves(x, r, w)
    expect = _grads(lambda: fn("torch", *leaves_ref), leaves_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not torch's "autograd kernel was not registered" warning either
        got = _grads(lambda: fn(backend, *leaves), leaves)
    assert [g is None for g in got] == [e is None for e in expect]
    for g, e in zip(got, expect):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_of_qkv_rope_and_decode_attention(backend):
    qkv, cos, sin, (kc, vc), dims = qkv_inputs()
    qn, kn = randn(16, seed=5), randn(16, seed=6)

    def qkv_loss(b, qkv_, qn_, kn_):
        q, k, v = ops.qkv_rope(qkv_, cos, sin, **dims, q_norm_weight=qn_, k_norm_weight=kn_, backend=b)
        return (q.square().sum() + (k * v).sum())

    def cache_loss(b, qkv_, qn_, kn_):
        k_cache, v_cache = kc.clone(), vc.clone()
        q = ops.qkv_rope_cache(qkv_, cos, sin, k_cache, v_cache, torch.tensor([[0, 1, 2], [3, 4, 5]]),
                               **dims, q_norm_weight=qn_, k_norm_weight=kn_, backend=b)
        return q.square().sum() + (k_cache * v_cache).sum()

    def decode_loss(b, q_, k_, v_):
        return ops.decode_attention(q_, k_, v_, torch.tensor([3, 6]), 0.25, backend=b).square().sum()

    for loss, inputs in ((qkv_loss, (qkv, qn, kn)), (cache_loss, (qkv, qn, kn)),
                         (decode_loss, (randn(2, 4, 16, seed=7), kc, vc))):
        leaves_ref, leaves = _leaves(*inputs), _leaves(*inputs)
        expect = _grads(lambda: loss("torch", *leaves_ref), leaves_ref)
        got = _grads(lambda: loss(backend, *leaves), leaves)
        for g, e in zip(got, expect):
            assert g is not None and e is not None
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_a_leaf_that_requires_grad_raises_like_torch(backend):
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.relu2_(randn(3, 4).requires_grad_(), backend=backend)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.swiglu_(randn(3, 4).requires_grad_(), backend=backend)
    with torch.no_grad():  # no graph to protect: the kernel runs in place
        x = randn(3, 4).requires_grad_()
        assert ops.relu2_(x, backend=backend) is x


# ------------------------------------------------------------------------------ 5. decode attention


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_decode_ignores_garbage_past_the_lengths(backend, fill):
    q, kc, vc = randn(3, 4, 16), randn(3, 2, 9, 16, seed=1), randn(3, 2, 9, 16, seed=2)
    lengths = torch.tensor([2, 9, 5])
    expect = ops.decode_attention(q, kc, vc, lengths, 0.25, backend="torch")
    for b, n in enumerate(lengths.tolist()):
        kc[b, :, n:], vc[b, :, n:] = fill, fill
    out = ops.decode_attention(q, kc, vc, lengths, 0.25, backend=backend)
    assert out.isfinite().all()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [0, -1, 10])
def test_decode_lengths_outside_one_to_tmax_raise(backend, bad):
    q, kc = randn(2, 4, 16), randn(2, 2, 9, 16, seed=1)
    with pytest.raises(ValueError, match=r"lengths\[1\] = .* is outside \[1, Tmax\] = \[1, 9\]"):
        ops.decode_attention(q, kc, kc, torch.tensor([3, bad]), 0.25, backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] = 1 is outside \[1, Tmax\] = \[1, 0\]"):
        ops.decode_attention(q, kc[:, :, :0], kc[:, :, :0], torch.tensor([1, 1]), 0.25, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_reads_strided_lengths(backend):
    q, kc, vc = randn(3, 4, 16), randn(3, 2, 9, 16, seed=1), randn(3, 2, 9, 16, seed=2)
    lengths = torch.tensor([[2, 100], [9, 100], [5, 100]], dtype=torch.int32)[:, 0]  # stride 2
    assert lengths.stride(0) == 2
    expect = ops.decode_attention(q, kc, vc, lengths.contiguous().long(), 0.25, backend="torch")
    torch.testing.assert_close(ops.decode_attention(q, kc, vc, lengths, 0.25, backend=backend), expect)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on the NaN rows
def test_triton_decode_kernel_guards_lengths(monkeypatch):
    """What runs unchecked on CUDA: a length past Tmax reads only the Tmax slots there are (as the
    reference, which masks by slot index), a length of 0 gives NaN rows (as the reference's softmax
    over no slots)."""
    pytest.importorskip("triton", reason="triton is not installed")
    import fastlm.kernels.decode_attention as kd

    monkeypatch.setattr(kd, "check_lengths", lambda *a: None)
    guard = torch.full((2, 2, 12, 16), float("nan"))
    guard[:, :, :9] = randn(2, 2, 9, 16, seed=1)
    kc = vc = guard[:, :, :9]  # slots past Tmax hold NaN: a read past the cache would show
    q = randn(2, 4, 16)
    out = ops.decode_attention(q, kc, vc, torch.tensor([12, 0]), 0.25, backend="triton")
    expect = ops.decode_attention(q, kc, vc, torch.tensor([9, 9]), 0.25, backend="torch")
    torch.testing.assert_close(out[0], expect[0])
    assert out[1].isnan().all()


# -------------------------------------------------------------------------- 6. clear errors, named


def _qkv_call(backend, **overrides):
    qkv, cos, sin, _, dims = qkv_inputs()
    kwargs = dict(dims, **overrides)
    return ops.qkv_rope(kwargs.pop("qkv", qkv), cos, sin, **kwargs, backend=backend)


BAD_ARGUMENTS = [  # (exception, message, call(backend))
    (ValueError, "num_kv_heads must be >= 1, got 0", lambda b: _qkv_call(b, num_kv_heads=0)),
    (ValueError, "num_heads must be >= 1, got -2", lambda b: _qkv_call(b, num_heads=-2)),
    (ValueError, "head_dim must be >= 1, got 0", lambda b: _qkv_call(b, head_dim=0)),
    (TypeError, "head_dim must be an int, got float", lambda b: _qkv_call(b, head_dim=16.0)),
    (TypeError, "num_heads must be an int, got bool", lambda b: _qkv_call(b, num_heads=True)),
    (ValueError, "rotary_dim must be >= 0", lambda b: _qkv_call(b, rotary_dim=-2)),
    (ValueError, "qk_norm_eps must be a finite number >= 0", lambda b: _qkv_call(b, qk_norm_eps=-1.0)),
    (ValueError, "q_norm_bias needs q_norm_weight", lambda b: _qkv_call(b, q_norm_bias=torch.ones(16))),
    (TypeError, "qkv must be float32", lambda b: _qkv_call(b, qkv=torch.ones(2, 3, 128, dtype=torch.int64))),
    (TypeError, "cos must be a torch.Tensor", lambda b: ops.qkv_rope(randn(1, 1, 128), 1.0, 1.0, num_heads=4,
                                                                     num_kv_heads=2, head_dim=16, rotary_dim=16,
                                                                     backend=b)),
    (ValueError, "x must be \\[..., N\\] with N > 0", lambda b: ops.add_rms_norm(torch.tensor(1.0), None,
                                                                                torch.ones(1), 1e-5, backend=b)),
    (ValueError, "x must be \\[..., N\\] with N > 0", lambda b: ops.add_layer_norm(torch.ones(3, 0), None,
                                                                                  torch.ones(0), None, 1e-5,
                                                                                  backend=b)),
    (ValueError, "eps must be a finite number >= 0", lambda b: ops.add_rms_norm(randn(2, 8), None, torch.ones(8),
                                                                               -1e-6, backend=b)),
    (ValueError, "eps must be a finite number >= 0", lambda b: ops.add_layer_norm(randn(2, 8), None, torch.ones(8),
                                                                                 None, float("nan"), backend=b)),
    (TypeError, "eps must be a real number, got str", lambda b: ops.add_rms_norm(randn(2, 8), None, torch.ones(8),
                                                                                "1e-5", backend=b)),
    (TypeError, "residual must be a torch.Tensor or None, got list",
     lambda b: ops.add_rms_norm(randn(2, 8), [1.0], torch.ones(8), 1e-5, backend=b)),
    (TypeError, "weight must be a torch.Tensor, got NoneType",
     lambda b: ops.add_layer_norm(randn(2, 8), None, None, None, 1e-5, backend=b)),
    (TypeError, "weight must have x's dtype", lambda b: ops.add_rms_norm(randn(2, 8, dtype=torch.bfloat16), None,
                                                                        torch.ones(8, dtype=torch.float16), 1e-5,
                                                                        backend=b)),
    (TypeError, "weight must have x's dtype", lambda b: ops.add_rms_norm(randn(2, 8), None,
                                                                        torch.ones(8, dtype=torch.int32), 1e-5,
                                                                        backend=b)),
    (ValueError, "0-d", lambda b: ops.relu2(torch.tensor(2.0), backend=b)),
    (ValueError, "last dim must be even", lambda b: ops.swiglu_(torch.tensor(2.0), backend=b)),
    (TypeError, "x must be a torch.Tensor", lambda b: ops.relu2([1.0, 2.0], backend=b)),
    (ValueError, "x must be \\[..., K\\], got a 0-d tensor", lambda b: ops.linear(torch.tensor(1.0), torch.ones(1, 1),
                                                                                 backend=b)),
    (TypeError, "weight must be a torch.Tensor", lambda b: ops.linear(randn(2, 8), "w", backend=b)),
    (ValueError, "k_cache must be \\[B, Hkv, Tmax, D\\] with B=2, D=16 and Hkv > 0",
     lambda b: ops.decode_attention(randn(2, 4, 16), torch.ones(2, 0, 4, 16), torch.ones(2, 0, 4, 16),
                                    torch.ones(2, dtype=torch.long), 0.25, backend=b)),
    (TypeError, "lengths must be a torch.Tensor", lambda b: ops.decode_attention(
        randn(2, 4, 16), randn(2, 2, 4, 16), randn(2, 2, 4, 16), [1, 2], 0.25, backend=b)),
    (ValueError, "scale must be finite", lambda b: ops.decode_attention(
        randn(2, 4, 16), randn(2, 2, 4, 16), randn(2, 2, 4, 16), torch.ones(2, dtype=torch.long), float("inf"),
        backend=b)),
    (ValueError, "k_cache and v_cache must be different tensors", lambda b: (lambda q, c: ops.qkv_rope_cache(
        q[0], q[1], q[2], c, c, torch.zeros(2, 3, dtype=torch.long), **q[4], backend=b))(qkv_inputs(),
                                                                                         torch.zeros(2, 2, 6, 16))),
    (RuntimeError, OVERLAP, lambda b: (lambda q: ops.qkv_rope_cache(
        q[0], q[1], q[2], torch.zeros(1, 2, 6, 16).expand(2, 2, 6, 16), torch.zeros(2, 2, 6, 16),
        torch.zeros(2, 3, dtype=torch.long), **q[4], backend=b))(qkv_inputs())),
    (ValueError, "k_cache's last dim must be contiguous", lambda b: (lambda q: ops.qkv_rope_cache(
        q[0], q[1], q[2], torch.zeros(2, 2, 16, 6).transpose(-1, -2), torch.zeros(2, 2, 6, 16),
        torch.zeros(2, 3, dtype=torch.long), **q[4], backend=b))(qkv_inputs())),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)))
def test_bad_arguments_get_one_clear_error(backend, case):
    exc, message, call = BAD_ARGUMENTS[case]
    with pytest.raises(exc, match=message):
        call(backend)


PREFILL_BAD = [  # (exception, message, q, k, v, mask, kwargs)
    (ValueError, "q must be \\[B, H, S, D\\]", randn(4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), None, {}),
    (ValueError, "k must be \\[B, Hkv, T, D\\] with B=1", randn(1, 4, 3, 8), randn(2, 2, 3, 8), randn(2, 2, 3, 8),
     None, {}),
    (ValueError, "Hkv > 0 dividing H=4", randn(1, 4, 3, 8), randn(1, 3, 3, 8), randn(1, 3, 3, 8), None, {}),
    (ValueError, "k must have q's head dim D=8", randn(1, 4, 3, 8), randn(1, 2, 3, 16), randn(1, 2, 3, 8), None, {}),
    (ValueError, "v must be \\[B, Hkv, T, Dv\\]", randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 5, 8), None, {}),
    (TypeError, "k has dtype torch.float16 but q has dtype torch.float32", randn(1, 4, 3, 8),
     randn(1, 2, 3, 8, dtype=torch.float16), randn(1, 2, 3, 8), None, {}),
    (ValueError, "v is on meta but q is on cpu", randn(1, 4, 3, 8), randn(1, 2, 3, 8),
     torch.empty(1, 2, 3, 8, device="meta"), None, {}),
    (ValueError, "attn_mask must broadcast to \\[B, H, S, T\\] = \\[1, 4, 3, 5\\]", randn(1, 4, 3, 8),
     randn(1, 2, 5, 8), randn(1, 2, 5, 8), torch.ones(1, 1, 3, 4, dtype=torch.bool), {}),
    (TypeError, "attn_mask must be bool or q's dtype", randn(1, 4, 3, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8),
     torch.ones(3, 5, dtype=torch.int64), {}),
    (TypeError, "q must be float32", torch.ones(1, 4, 3, 8, dtype=torch.int32), randn(1, 2, 3, 8),
     randn(1, 2, 3, 8), None, {}),
    (TypeError, "v must be a torch.Tensor", randn(1, 4, 3, 8), randn(1, 2, 3, 8), None, None, {}),
    (ValueError, "scale must be finite", randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), None,
     {"scale": float("nan")}),
]


@pytest.mark.parametrize("case", range(len(PREFILL_BAD)))
def test_prefill_attention_checks_its_arguments(case):
    exc, message, q, k, v, mask, kwargs = PREFILL_BAD[case]
    with pytest.raises(exc, match=message):
        ops.prefill_attention(q, k, v, mask, **kwargs)


def test_prefill_attention_accepts_gqa_masks_and_scales():
    q, k, v = randn(2, 4, 3, 8), randn(2, 2, 5, 8, seed=1), randn(2, 2, 5, 8, seed=2)
    mask = torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    out = ops.prefill_attention(q, k, v, mask, scale=0.2)
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(out, expect)


def _check_head_dim_1040(backend, S, norm):
    H = Hkv = 1
    D = 1040
    qkv = randn(1, S, 3 * D)
    freqs = randn(1, S, D // 2, seed=1)
    cos, sin = torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((freqs.sin(), freqs.sin()), -1)
    norms = dict(q_norm_weight=randn(H, D, seed=2), k_norm_weight=randn(Hkv, D, seed=3)) if norm else {}
    dims = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=D // 2, **norms)
    expect = ops.qkv_rope(qkv, cos, sin, **dims, backend="torch")
    for got, ref in zip(ops.qkv_rope(qkv, cos, sin, **dims, backend=backend), expect):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_head_dim_past_the_cpu_kernels_stack_scratch(backend):
    """head_dim 1040, over the C++ kernel's 1024-wide stack scratch (it used to refuse it with a
    RuntimeError while the reference ran): the reference's answer, with qk-norm."""
    _check_head_dim_1040(backend, 3, norm=True)


def test_head_dim_past_the_stack_scratch_streamed_cpp():
    """The same through the C++ kernel's streamed-output path (>= 16 MiB out: 1400 tokens of 3 * 1040 fp32)."""
    pytest.importorskip("fastlm._C", reason="the C++ extension is not built")
    _check_head_dim_1040("cpp", 1400, norm=False)
