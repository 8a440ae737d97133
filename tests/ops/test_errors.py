"""Bad arguments to every public op, on every backend (CPU tensors): one TypeError / ValueError that names
the argument and the problem, the same on each backend, never an internal error; torch's RuntimeError
for an in-place write into memory whose elements alias. A tensor on another device (meta) beside CPU
ones gets the reference's ValueError, from the C++ ops' fakes too."""
from __future__ import annotations

import pytest
import torch

from _api import (INTERNAL_OVERLAP_MESSAGE, add_layer_norm, add_rms_norm, decode_attention, impl, linear,
                  qkv_rope, qkv_rope_cache, quant_linear, relu2, relu2_, swiglu, swiglu_)
from _inputs import QKV_SMALL, quant_weight, randn, small_qkv, targets

OVERLAP = INTERNAL_OVERLAP_MESSAGE.split(":")[0]  # "unsupported operation"
TARGETS = targets(device="cpu")


def _qkv(b, **overrides):
    inp, _ = small_qkv()
    kwargs = dict(inp.kwargs, **overrides)
    return qkv_rope(kwargs.pop("qkv", inp.qkv), kwargs.pop("cos", inp.cos), inp.sin, **kwargs, backend=b)


def _cache(b, k_cache, v_cache, positions=None):
    inp, _ = small_qkv()
    positions = torch.zeros(2, 3, dtype=torch.long) if positions is None else positions
    return qkv_rope_cache(inp.qkv, inp.cos, inp.sin, k_cache, v_cache, positions, **inp.kwargs, backend=b)


def _decode(b, q=None, k=None, lengths=None, scale=0.25):
    q = randn(2, 4, 16) if q is None else q
    k = randn(2, 2, 4, 16, seed=1) if k is None else k
    lengths = torch.ones(2, dtype=torch.long) if lengths is None else lengths
    return decode_attention(q, k, k.clone(), lengths, scale, backend=b)


# quant_linear's arguments: int8 and int4 weights [30, 64] in groups of 32, x [2, 64]
QW8, QW4 = quant_weight(30, 64, 8, 32), quant_weight(30, 64, 4, 32)
QUANT_OK = dict(x=randn(2, 64), qweight=QW8[0], scales=QW8[1], bias=None, residual=None, bits=8, group_size=32)


def _quant_args(**overrides) -> tuple:
    a = dict(QUANT_OK, **overrides)
    return a["x"], a["qweight"], a["scales"], a["bias"], a["residual"], a["bits"], a["group_size"]


def _quant(b, **overrides):
    x, qweight, scales, bias, residual, bits, group_size = _quant_args(**overrides)
    return quant_linear(x, qweight, scales, bias, residual, bits=bits, group_size=group_size, backend=b)


# (exception, message, overrides of QUANT_OK): the public op's errors, and the C++ op's (same types and words)
QUANT_ERRORS = [
    (TypeError, "x must be float32", dict(x=torch.ones(2, 64, dtype=torch.long))),
    (TypeError, "qweight must be", dict(qweight=QW8[0].float())),
    (TypeError, "qweight must be", dict(qweight=QW4[0], scales=QW4[1])),  # uint8 for bits=8
    (TypeError, "qweight must be", dict(bits=4)),
    (ValueError, "qweight must be", dict(qweight=QW8[0][:, :32])),
    (ValueError, "qweight must be", dict(x=randn(2, 63))),
    (ValueError, "bits must be 8 or 4", dict(bits=3)),
    (ValueError, "group_size", dict(group_size=48)),
    (ValueError, "group_size", dict(group_size=0)),
    (ValueError, "group_size must be even", dict(qweight=QW4[0], scales=QW4[1], bits=4, group_size=1)),
    (TypeError, "scales must be float32", dict(scales=QW8[1].half())),
    (ValueError, "scales must have shape", dict(scales=QW8[1][:, :1])),
    (ValueError, "bias must have shape", dict(bias=randn(29))),
    (TypeError, "bias has dtype", dict(bias=randn(30).half())),
    (ValueError, "residual must have shape", dict(residual=randn(2, 29))),
    (TypeError, "residual has dtype", dict(residual=randn(2, 30).double())),
    (ValueError, "0-d", dict(x=torch.tensor(1.0))),
]

X64 = randn(4, 64)
ERRORS = [  # (op, exception, message, call(backend))
    # ---- add_rms_norm / add_layer_norm
    ("add_rms_norm", ValueError, "weight must have shape", lambda b: add_rms_norm(X64, None, torch.ones(32), 1e-5,
                                                                                  backend=b)),
    ("add_rms_norm", TypeError, "residual has dtype", lambda b: add_rms_norm(X64, X64.double(), torch.ones(64), 1e-5,
                                                                             backend=b)),
    ("add_rms_norm", ValueError, "x must be \\[..., N\\] with N > 0", lambda b: add_rms_norm(
        torch.tensor(1.0), None, torch.ones(1), 1e-5, backend=b)),
    ("add_rms_norm", ValueError, "eps must be a finite number >= 0", lambda b: add_rms_norm(
        randn(2, 8), None, torch.ones(8), -1e-6, backend=b)),
    ("add_rms_norm", TypeError, "eps must be a real number, got str", lambda b: add_rms_norm(
        randn(2, 8), None, torch.ones(8), "1e-5", backend=b)),
    ("add_rms_norm", TypeError, "residual must be a torch.Tensor or None, got list", lambda b: add_rms_norm(
        randn(2, 8), [1.0], torch.ones(8), 1e-5, backend=b)),
    ("add_rms_norm", TypeError, "weight must have x's dtype", lambda b: add_rms_norm(
        randn(2, 8, dtype=torch.bfloat16), None, torch.ones(8, dtype=torch.float16), 1e-5, backend=b)),
    ("add_rms_norm", TypeError, "weight must have x's dtype", lambda b: add_rms_norm(
        randn(2, 8), None, torch.ones(8, dtype=torch.int32), 1e-5, backend=b)),
    ("add_layer_norm", ValueError, "residual must have shape", lambda b: add_layer_norm(
        X64, randn(4, 32), torch.ones(64), None, 1e-5, backend=b)),
    ("add_layer_norm", TypeError, "x must be float32", lambda b: add_layer_norm(
        torch.ones(4, 64, dtype=torch.long), None, torch.ones(64), None, 1e-5, backend=b)),
    ("add_layer_norm", TypeError, "bias has dtype", lambda b: add_layer_norm(
        X64, None, torch.ones(64), torch.zeros(64).half(), 1e-5, backend=b)),
    ("add_layer_norm", TypeError, "x must be a torch.Tensor", lambda b: add_layer_norm(
        [1.0], None, torch.ones(1), None, 1e-5, backend=b)),
    ("add_layer_norm", ValueError, "x must be \\[..., N\\] with N > 0", lambda b: add_layer_norm(
        torch.ones(3, 0), None, torch.ones(0), None, 1e-5, backend=b)),
    ("add_layer_norm", ValueError, "eps must be a finite number >= 0", lambda b: add_layer_norm(
        randn(2, 8), None, torch.ones(8), None, float("nan"), backend=b)),
    ("add_layer_norm", TypeError, "weight must be a torch.Tensor, got NoneType", lambda b: add_layer_norm(
        randn(2, 8), None, None, None, 1e-5, backend=b)),
    # ---- activations
    ("swiglu", ValueError, "last dim must be even", lambda b: swiglu(randn(2, 5), backend=b)),
    ("swiglu", TypeError, "gate_up must be float32", lambda b: swiglu(torch.ones(2, 4, dtype=torch.int32), backend=b)),
    ("swiglu_", ValueError, "last dim must be even", lambda b: swiglu_(randn(2, 5), backend=b)),
    ("swiglu_", ValueError, "last dim must be even", lambda b: swiglu_(torch.tensor(2.0), backend=b)),
    ("relu2", ValueError, "0-d", lambda b: relu2(torch.tensor(1.0), backend=b)),
    ("relu2", TypeError, "x must be a torch.Tensor", lambda b: relu2([1.0, 2.0], backend=b)),
    ("relu2_", TypeError, "x must be float32", lambda b: relu2_(torch.ones(3, 4, dtype=torch.int32), backend=b)),
    ("relu2_", ValueError, "0-d", lambda b: relu2_(torch.tensor(1.0), backend=b)),
    # ---- qkv_rope / qkv_rope_cache
    ("qkv_rope", ValueError, "qkv's last dim", lambda b: _qkv(b, num_kv_heads=1)),
    ("qkv_rope", ValueError, "rotary_dim must be even", lambda b: _qkv(b, rotary_dim=7)),
    ("qkv_rope", ValueError, "cos must be", lambda b: _qkv(b, cos=small_qkv()[0].cos[:, :1])),
    ("qkv_rope", ValueError, "head-major", lambda b: _qkv(b, qkv=randn(2, 3, 3 * 4 * 16), qkv_head_major=True)),
    ("qkv_rope", ValueError, "num_kv_heads must be >= 1, got 0", lambda b: _qkv(b, num_kv_heads=0)),
    ("qkv_rope", ValueError, "num_heads must be >= 1, got -2", lambda b: _qkv(b, num_heads=-2)),
    ("qkv_rope", ValueError, "head_dim must be >= 1, got 0", lambda b: _qkv(b, head_dim=0)),
    ("qkv_rope", TypeError, "head_dim must be an int, got float", lambda b: _qkv(b, head_dim=16.0)),
    ("qkv_rope", TypeError, "num_heads must be an int, got bool", lambda b: _qkv(b, num_heads=True)),
    ("qkv_rope", ValueError, "rotary_dim must be >= 0", lambda b: _qkv(b, rotary_dim=-2)),
    ("qkv_rope", ValueError, "qk_norm_eps must be a finite number >= 0", lambda b: _qkv(b, qk_norm_eps=-1.0)),
    ("qkv_rope", ValueError, "q_norm_bias needs q_norm_weight", lambda b: _qkv(b, q_norm_bias=torch.ones(16))),
    ("qkv_rope", TypeError, "qkv must be float32", lambda b: _qkv(b, qkv=torch.ones(2, 3, 128, dtype=torch.int64))),
    ("qkv_rope", TypeError, "cos must be a torch.Tensor", lambda b: qkv_rope(
        randn(1, 1, 128), 1.0, 1.0, **QKV_SMALL.dims(), backend=b)),
    ("qkv_rope_cache", ValueError, "k_cache and v_cache must be different tensors", lambda b: (
        lambda c: _cache(b, c, c))(torch.zeros(2, 2, 6, 16))),
    ("qkv_rope_cache", RuntimeError, OVERLAP, lambda b: _cache(
        b, torch.zeros(1, 2, 6, 16).expand(2, 2, 6, 16), torch.zeros(2, 2, 6, 16))),
    ("qkv_rope_cache", ValueError, "k_cache's last dim must be contiguous", lambda b: _cache(
        b, torch.zeros(2, 2, 16, 6).transpose(-1, -2), torch.zeros(2, 2, 6, 16))),
    # ---- decode_attention
    ("decode_attention", TypeError, "lengths must be int32 or int64", lambda b: _decode(
        b, lengths=torch.tensor([1.0, 2.0]))),
    ("decode_attention", ValueError, "k_cache must be", lambda b: _decode(b, k=randn(2, 3, 8, 16))),
    ("decode_attention", ValueError, "k_cache must be \\[B, Hkv, Tmax, D\\] with B=2, D=16 and Hkv > 0",
     lambda b: _decode(b, k=torch.ones(2, 0, 4, 16))),
    ("decode_attention", TypeError, "lengths must be a torch.Tensor", lambda b: _decode(b, lengths=[1, 2])),
    ("decode_attention", ValueError, "scale must be finite", lambda b: _decode(b, scale=float("inf"))),
    ("decode_attention", ValueError, r"lengths\[1\] = .* is outside \[1, Tmax\] = \[1, 9\]", lambda b: _decode(
        b, k=randn(2, 2, 9, 16, seed=1), lengths=torch.tensor([3, 0]))),
    ("decode_attention", ValueError, r"lengths\[1\] = .* is outside \[1, Tmax\] = \[1, 9\]", lambda b: _decode(
        b, k=randn(2, 2, 9, 16, seed=1), lengths=torch.tensor([3, -1]))),
    ("decode_attention", ValueError, r"lengths\[1\] = .* is outside \[1, Tmax\] = \[1, 9\]", lambda b: _decode(
        b, k=randn(2, 2, 9, 16, seed=1), lengths=torch.tensor([3, 10]))),
    ("decode_attention", ValueError, r"lengths\[0\] = 1 is outside \[1, Tmax\] = \[1, 0\]", lambda b: _decode(
        b, k=randn(2, 2, 0, 16), lengths=torch.tensor([1, 1]))),
    # ---- linear
    ("linear", ValueError, "weight must be \\[N, K\\]", lambda b: linear(randn(2, 8), randn(4, 7), backend=b)),
    ("linear", TypeError, "weight has dtype", lambda b: linear(randn(2, 8), randn(4, 8).double(), backend=b)),
    ("linear", ValueError, "residual must have shape", lambda b: linear(randn(2, 8), randn(4, 8), residual=randn(2, 5),
                                                                        backend=b)),
    ("linear", ValueError, "x must be \\[..., K\\], got a 0-d tensor", lambda b: linear(
        torch.tensor(1.0), torch.ones(1, 1), backend=b)),
    ("linear", TypeError, "weight must be a torch.Tensor", lambda b: linear(randn(2, 8), "w", backend=b)),
]
ERRORS += [("quant_linear", exc, message, lambda b, over=over: _quant(b, **over))
           for exc, message, over in QUANT_ERRORS]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", ERRORS, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERRORS)])
def test_bad_arguments_get_one_clear_error(target, case):
    _, exc, message, call = case
    with pytest.raises(exc, match=message):
        call(target.backend)


# --------------------------------------------------------------------------- a tensor on another device

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("where", ["weight", "bias", "residual"])
def test_norms_reject_a_meta_argument_beside_a_cpu_x(target, where):
    """The C++ norms once returned uninitialised memory for a meta weight beside a CPU x."""
    x = randn(3, 64)
    args = {"residual": randn(3, 64, seed=1), "weight": randn(64, seed=2), "bias": randn(64, seed=3)}
    args[where] = torch.empty_like(args[where], device="meta")
    r, w, b = args["residual"], args["weight"], args["bias"]
    calls = [lambda: add_layer_norm(x, r, w, b, 1e-5, backend=target.backend)]
    if where != "bias":  # RMSNorm has no bias
        calls += [lambda: add_rms_norm(x, r, w, 1e-5, backend=target.backend),
                  lambda: add_rms_norm(x, r, w, 1e-5, True, backend=target.backend)]
    for fn in calls:
        with pytest.raises(ValueError, match=f"{where} is on meta but x is on cpu"):
            fn()


@pytest.mark.parametrize("target", TARGETS)
def test_other_ops_reject_a_meta_argument(target):
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    b = target.backend
    x, w = randn(2, 8), randn(4, 8)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        linear(x, meta(w), backend=b)
    with pytest.raises(ValueError, match="bias is on meta but x is on cpu"):
        linear(x, w, meta(randn(4)), backend=b)
    inp, (kc, vc) = small_qkv()
    with pytest.raises(ValueError, match="sin is on meta but qkv is on cpu"):
        qkv_rope(inp.qkv, inp.cos, meta(inp.sin), **inp.kwargs, backend=b)
    with pytest.raises(ValueError, match="v_cache is on meta but qkv is on cpu"):
        qkv_rope_cache(inp.qkv, inp.cos, inp.sin, kc, meta(vc), torch.zeros(2, 3, dtype=torch.long), **inp.kwargs,
                       backend=b)
    q, k = randn(2, 4, 16), randn(2, 2, 5, 16)
    with pytest.raises(ValueError, match="lengths is on meta but q is on cpu"):
        decode_attention(q, k, k, torch.ones(2, dtype=torch.long, device="meta"), 0.25, backend=b)
    with pytest.raises(ValueError, match="qweight is on meta but x is on cpu"):
        _quant(b, qweight=meta(QW8[0]))
    with pytest.raises(ValueError, match="scales is on meta but x is on cpu"):
        _quant(b, scales=meta(QW8[1]))


@pytest.mark.parametrize("target", targets(backends=("cpp",), device="cpu"))
def test_cpp_ops_check_devices_on_their_meta_path(target):
    """A direct call of the C++ op with a meta weight and a CPU x reaches the op's fake (Meta) kernel,
    not the CPU kernel and its checks: the fake raises the same error."""
    from _api import registered_op

    x, meta_w = randn(3, 64), torch.empty(64, device="meta")
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        registered_op("cpp", "add_rms_norm")(x, None, meta_w, 1e-5, False)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        registered_op("cpp", "add_layer_norm")(x, None, meta_w, None, 1e-5)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        registered_op("cpp", "linear")(x, torch.empty(4, 64, device="meta"), None, None)
    with pytest.raises(ValueError, match="qweight is on meta but x is on cpu"):
        registered_op("cpp", "quant_linear")(*_quant_args(qweight=QW8[0].to("meta")))
    y, h = registered_op("cpp", "add_rms_norm")(x.to("meta"), None, meta_w, 1e-5, False)  # all meta: shapes only
    assert y.device.type == "meta" and y.shape == (3, 64)


@pytest.mark.parametrize("target", targets("linear", backends=("cpp",), device="cpu"))
def test_cpp_linear_checks_its_arguments_itself(target):
    """The C++ entry point, called directly (as the fused modules do), raises the public op's error type."""
    with pytest.raises(ValueError, match="weight must be \\[N, K\\]"):
        impl("linear", target.backend, "cpu")(randn(2, 8), randn(4, 7), None, None)


@pytest.mark.parametrize("target", targets("quant_linear", backends=("cpp",), device="cpu"))
@pytest.mark.parametrize("case", QUANT_ERRORS, ids=[f"{i}-{c[1]}" for i, c in enumerate(QUANT_ERRORS)])
def test_cpp_quant_linear_checks_its_arguments_itself(target, case):
    """The C++ entry point, called directly (the dispatch path, without the public op's checks), raises the
    public op's exception types, naming the same argument."""
    exc, message, over = case
    with pytest.raises(exc, match=message):
        impl("quant_linear", target.backend, "cpu")(*_quant_args(**over))
