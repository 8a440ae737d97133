"""The C++ CPU kernels (``fastlm._C``) against the plain-PyTorch references.

Tolerance (flash-attention's rule, tests/_tolerance.py): the reference is computed upcast (fp32) from
the same inputs and in the kernel's dtype; the kernel's error against the upcast reference must be at
most twice PyTorch's own low-precision error plus a small atol. The CPU build also compiles the
host/device math shared with the CUDA kernels (csrc/include/fastlm/math.h), so these tests cover it.
"""
from __future__ import annotations

import math
import subprocess
import tempfile
import sys

import pytest
import torch
import torch.nn.functional as F

try:
    from fastlm.backends import cpp as _cpp
except ImportError as exc:  # extension not built
    pytest.skip(f"fastlm._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
                allow_module_level=True)

from fastlm.ops.activations import relu2_ref, swiglu_ref
from fastlm.ops.attention import decode_attention_ref
from fastlm.ops.layer_norm import add_layer_norm_ref
from fastlm.ops.qkv import qkv_rope_cache_ref, qkv_rope_ref
from fastlm.ops.rms_norm import add_rms_norm_ref
from _tolerance import assert_close_to_ref
import fastlm.ops as fops

ops = torch.ops.fastlm
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 3e-5, torch.bfloat16: 1e-3, torch.float16: 3e-4}


def f32(t):
    return None if t is None else t.float()


def check(out, ref32, reflow, dtype, name, scale=1.0):
    assert out.dtype == reflow.dtype, f"{name}: dtype {out.dtype} != {reflow.dtype}"
    assert_close_to_ref(out, ref32, reflow, ATOL[dtype] * scale, name=name)


def row_strided(t, extra=24):
    """A copy of ``t`` whose rows are strided (a slice of a wider tensor: last dim contiguous)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] + extra, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    out = wide[..., : t.shape[-1]]
    return out


# ---------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3000), (3, 7, 3000), (2, 33, 80)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_add_rms_norm(dtype, shape, with_residual, weight_in_fp32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    r = (3 * torch.randn(shape, generator=g)).to(dtype) if with_residual else None
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    eps = 1e-5 if not weight_in_fp32 else 1e-8
    y, h = _cpp.add_rms_norm(x, r, w, eps, weight_in_fp32)
    y32, h32 = add_rms_norm_ref(f32(x), f32(r), f32(w), eps, weight_in_fp32)
    ylo, hlo = add_rms_norm_ref(x, r, w, eps, weight_in_fp32)
    check(y, y32, ylo, dtype, "y")
    if with_residual:
        assert torch.equal(h, hlo), "h must equal residual + x rounded to the dtype"
    else:
        assert h is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_fp32_weight(dtype):
    # Arcee order with an fp32 weight promotes (as the reference); Helium order rounds to x's dtype.
    x, r = torch.randn(3, 7, 3000).to(dtype), torch.randn(3, 7, 3000).to(dtype)
    w = 1 + 0.5 * torch.randn(3000)
    for wf in (False, True):
        y, _ = _cpp.add_rms_norm(x, r, w, 1e-5, wf)
        y32, _ = add_rms_norm_ref(f32(x), f32(r), w, 1e-5, wf)
        ylo, _ = add_rms_norm_ref(x, r, w, 1e-5, wf)
        check(y, y32, ylo, dtype, f"y (weight_in_fp32={wf})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_norms_non_contiguous(dtype, layout):
    x, r = torch.randn(3, 7, 3000).to(dtype), torch.randn(3, 7, 3000).to(dtype)
    w, b = (1 + torch.randn(3000)).to(dtype), torch.randn(3000).to(dtype)
    if layout == "row_strided":
        xn, rn = row_strided(x), row_strided(r)
    else:  # leading dims that do not collapse into one row stride
        xn, rn = x.transpose(0, 1).contiguous().transpose(0, 1), r.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xn.is_contiguous()
    for wf in (False, True):
        y, h = _cpp.add_rms_norm(xn, rn, w, 1e-5, wf)
        y_c, h_c = _cpp.add_rms_norm(x, r, w, 1e-5, wf)
        assert torch.equal(y, y_c) and torch.equal(h, h_c)
    y, h = _cpp.add_layer_norm(xn, rn, w, b, 1e-5)
    y_c, h_c = _cpp.add_layer_norm(x, r, w, b, 1e-5)
    assert torch.equal(y, y_c) and torch.equal(h, h_c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3000), (3, 7, 2560), (2, 33, 80)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_add_layer_norm(dtype, shape, with_residual, with_bias):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) + 2).to(dtype)  # non-zero mean exercises the two-pass variance
    r = (3 * torch.randn(shape, generator=g)).to(dtype) if with_residual else None
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = torch.randn(shape[-1], generator=g).to(dtype) if with_bias else None
    y, h = _cpp.add_layer_norm(x, r, w, b, 1e-5)
    y32, _ = add_layer_norm_ref(f32(x), f32(r), f32(w), f32(b), 1e-5)
    ylo, hlo = add_layer_norm_ref(x, r, w, b, 1e-5)
    check(y, y32, ylo, dtype, "y")
    if with_residual:
        assert torch.equal(h, hlo)
    else:
        assert h is x


# ------------------------------------------------------------------------------------------ qkv_rope


def rope_tables(B, S, R, dtype, theta=10000.0, offset=0):
    inv_freq = 1.0 / theta ** (torch.arange(0, R, 2, dtype=torch.float32) / max(R, 1))
    pos = torch.arange(offset, offset + S, dtype=torch.float32).view(1, S).expand(B, S) + torch.arange(B).view(B, 1) * 3
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# name: (H, Hkv, D, R, interleaved, qkv_head_major, norm) with norm in
# None | "shared" (weight [D]) | "shared_bias" | "per_head" ([heads, D]) | "per_head_bias"
QKV_CONFIGS = {
    "arcee_gqa": (4, 2, 80, 80, False, False, None),
    "stablelm": (4, 4, 80, 20, False, False, "per_head"),
    "persimmon": (3, 3, 64, 32, False, True, "shared_bias"),
    "helium": (4, 1, 128, 128, True, False, None),
    "odd_d40": (4, 2, 40, 20, True, False, "per_head_bias"),
    "d64_rot32_interleaved_shared": (2, 2, 64, 32, True, True, "shared"),
    "no_rope": (2, 1, 64, 0, False, False, "shared_bias"),
    # head_dim over the register-resident qk-norm's limit (8 registers): the buffer-sweeping path
    "wide_d136": (2, 1, 136, 68, False, False, "per_head_bias"),
}


def make_qkv(cfg, B, S, dtype, seed=0, cos_batch=True):
    H, Hkv, D, R, inter, per_head, norm = cfg
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(B, S, (H + 2 * Hkv) * D, generator=g)).to(dtype)
    cos, sin = rope_tables(B if cos_batch else 1, S, R, dtype)
    nw = {"q_norm_weight": None, "q_norm_bias": None, "k_norm_weight": None, "k_norm_bias": None}
    if norm is not None:
        for p, heads in (("q", H), ("k", Hkv)):
            shape = (D,) if norm.startswith("shared") else (heads, D)
            nw[f"{p}_norm_weight"] = (1 + 0.3 * torch.randn(shape, generator=g)).to(dtype)
            if norm.endswith("bias"):
                nw[f"{p}_norm_bias"] = (0.2 * torch.randn(shape, generator=g)).to(dtype)
    return qkv, cos, sin, nw


def qkv_args(qkv, cos, sin, nw, cfg, eps=1e-5):
    H, Hkv, D, R, inter, per_head, _ = cfg
    return (qkv, cos, sin, nw["q_norm_weight"], nw["q_norm_bias"], nw["k_norm_weight"], nw["k_norm_bias"], H, Hkv, D,
            R, inter, per_head, eps)


def up(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("BS", [(1, 1), (3, 7), (1, 33)])
@pytest.mark.parametrize("name", list(QKV_CONFIGS))
def test_qkv_rope(name, BS, dtype):
    cfg = QKV_CONFIGS[name]
    qkv, cos, sin, nw = make_qkv(cfg, *BS, dtype, cos_batch=BS[0] > 1)
    args = qkv_args(qkv, cos, sin, nw, cfg)
    outs = _cpp.qkv_rope(*args)
    refs32 = qkv_rope_ref(*up(args))
    refslo = qkv_rope_ref(*args)
    for label, o, r32, rlo in zip("qkv", outs, refs32, refslo):
        assert o.is_contiguous()
        check(o, r32, rlo, dtype, f"{name}:{label}", scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["stablelm", "persimmon", "helium"])
def test_qkv_rope_non_contiguous(name, dtype):
    cfg = QKV_CONFIGS[name]
    qkv, cos, sin, nw = make_qkv(cfg, 3, 7, dtype)
    qkv_n = row_strided(qkv)
    cos_n, sin_n = cos.expand(3, 7, cfg[3]), sin.expand(3, 7, cfg[3])  # already [B, S, R]; use broadcast too
    outs_c = _cpp.qkv_rope(*qkv_args(qkv, cos, sin, nw, cfg))
    outs_n = _cpp.qkv_rope(*qkv_args(qkv_n, cos_n, sin_n, nw, cfg))
    for a, b in zip(outs_c, outs_n):
        assert torch.equal(a, b)
    # cos/sin broadcast over the batch ([1, S, R]), and a table wider than rotary_dim.
    cos1, sin1 = rope_tables(1, 7, cfg[3], dtype)
    outs_b = _cpp.qkv_rope(*qkv_args(qkv, cos1, sin1, nw, cfg))
    refs_b = qkv_rope_ref(*up(qkv_args(qkv, cos1, sin1, nw, cfg)))
    refs_lo = qkv_rope_ref(*qkv_args(qkv, cos1, sin1, nw, cfg))
    for o, r32, rlo in zip(outs_b, refs_b, refs_lo):
        check(o, r32, rlo, dtype, f"{name} broadcast tables", scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [(32, 16, 80, 20, False, False, "per_head"),
                                 (24, 24, 64, 32, False, True, "shared_bias")], ids=["stablelm_gqa", "persimmon"])
def test_qkv_rope_large_outputs_streamed(cfg, dtype):
    """Outputs of 16 MiB and more are written through a stage with non-temporal stores (kStreamOutBytes in
    csrc/cpu/qkv_rope.cpp). The per-token math is the same either way, so the result must equal, bit for
    bit, the op run on slices of the sequence small enough for ordinary stores; the odd slice length puts
    the runs at unaligned addresses, so the partial cache lines at both ends of a run are covered."""
    H, Hkv, D = cfg[:3]
    S = 1027 if dtype == torch.float32 else 2053
    assert S * (H + 2 * Hkv) * D * torch.finfo(dtype).bits // 8 >= 16 << 20
    qkv, cos, sin, nw = make_qkv(cfg, 1, S, dtype, seed=11)
    outs = _cpp.qkv_rope(*qkv_args(qkv, cos, sin, nw, cfg))
    step = 257
    pieces = [_cpp.qkv_rope(*qkv_args(qkv[:, i:i + step], cos[:, i:i + step], sin[:, i:i + step], nw, cfg))
              for i in range(0, S, step)]
    for label, o, parts in zip("qkv", outs, zip(*pieces)):
        assert torch.equal(o, torch.cat(parts, dim=2)), label
    args = qkv_args(qkv[:, :64], cos[:, :64], sin[:, :64], nw, cfg)
    for label, o, r32, rlo in zip("qkv", outs, qkv_rope_ref(*up(args)), qkv_rope_ref(*args)):
        check(o[:, :, :64], r32, rlo, dtype, f"streamed:{label}", scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("name", ["arcee_gqa", "stablelm", "persimmon", "helium", "odd_d40"])
@pytest.mark.parametrize("BS", [(1, 1), (3, 7)])
def test_qkv_rope_cache(name, BS, pos_dtype, dtype):
    cfg = QKV_CONFIGS[name]
    Hkv, D = cfg[1], cfg[2]
    B, S = BS
    Tmax = 40
    qkv, cos, sin, nw = make_qkv(cfg, B, S, dtype, seed=3)
    g = torch.Generator().manual_seed(5)
    pos = torch.stack([torch.randperm(Tmax, generator=g)[:S] for _ in range(B)]).to(pos_dtype)
    kc, vc = torch.randn(B, Hkv, Tmax, D, generator=g).to(dtype), torch.randn(B, Hkv, Tmax, D, generator=g).to(dtype)
    base = qkv_args(qkv, cos, sin, nw, cfg)

    def with_cache(args, k, v):
        return args[:7] + (k, v, pos) + args[7:]

    k_k, v_k = kc.clone(), vc.clone()
    q = _cpp.qkv_rope_cache(*with_cache(base, k_k, v_k))
    k32, v32 = kc.float(), vc.float()
    q32 = qkv_rope_cache_ref(*with_cache(up(base), k32, v32))
    klo, vlo = kc.clone(), vc.clone()
    qlo = qkv_rope_cache_ref(*with_cache(base, klo, vlo))
    check(q, q32, qlo, dtype, f"{name}:q", scale=4)
    check(k_k, k32, klo, dtype, f"{name}:k_cache", scale=4)
    check(v_k, v32, vlo, dtype, f"{name}:v_cache")
    untouched = torch.ones(B, Tmax, dtype=torch.bool)
    untouched[torch.arange(B).view(B, 1), pos.long()] = False
    assert torch.equal(k_k.transpose(1, 2)[untouched], kc.transpose(1, 2)[untouched])


def test_qkv_rope_cache_bad_position():
    cfg = QKV_CONFIGS["arcee_gqa"]
    qkv, cos, sin, nw = make_qkv(cfg, 1, 1, torch.float32)
    kc = torch.zeros(1, 2, 4, 80)
    args = qkv_args(qkv, cos, sin, nw, cfg)
    with pytest.raises(ValueError, match="outside the cache"):  # the public op's error type (CPU)
        _cpp.qkv_rope_cache(*args[:7], kc, kc.clone(), torch.tensor([[4]]), *args[7:])


# -------------------------------------------------------------------------------- streamed outputs


def _rows_for_streaming(n, bytes_per_element):
    """Rows of width n whose outputs reach kStreamOutBytes (16 MiB, csrc/cpu/vec_util.h), and a slice
    length whose outputs stay far below it."""
    rows = -(-(16 << 20) // (n * bytes_per_element)) + 5
    return rows, 97


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_norms_large_outputs_streamed(dtype, with_residual):
    """Norm outputs of 16 MiB and more are written with non-temporal stores (store_chunk), and the fp32 path
    then keeps h in its scratch row instead of reading it back. The per-row math is the same either way, so
    the result must equal, bit for bit, the op run on slices of rows small enough for ordinary stores.
    Width 3000: rows start at addresses that are not 64-byte aligned, so streamed and ordinary chunks mix."""
    n, es = 3000, torch.finfo(dtype).bits // 8
    rows, step = _rows_for_streaming(n, 2 * es if with_residual else es)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(rows, n, generator=g) + 1).to(dtype)
    r = (2 * torch.randn(rows, n, generator=g)).to(dtype) if with_residual else None
    w, b = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype), torch.randn(n, generator=g).to(dtype)
    w32 = w.float()
    calls = [lambda x_, r_: _cpp.add_rms_norm(x_, r_, w, 1e-5, False),
             lambda x_, r_: _cpp.add_rms_norm(x_, r_, w32, 1e-8, True),
             lambda x_, r_: _cpp.add_layer_norm(x_, r_, w, b, 1e-5)]
    for i, call in enumerate(calls):
        y, h = call(x, r)
        parts = [call(x[j:j + step], None if r is None else r[j:j + step]) for j in range(0, rows, step)]
        assert torch.equal(y, torch.cat([p[0] for p in parts])), f"call {i}: y"
        if with_residual:
            assert torch.equal(h, torch.cat([p[1] for p in parts])), f"call {i}: h"
    y32, _ = add_layer_norm_ref(f32(x[:64]), f32(None if r is None else r[:64]), f32(w), f32(b), 1e-5)
    ylo, _ = add_layer_norm_ref(x[:64], None if r is None else r[:64], w, b, 1e-5)
    check(y[:64], y32, ylo, dtype, "streamed layer norm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_large_outputs_streamed(dtype):
    """swiglu / relu2 outputs of 16 MiB and more are written with non-temporal stores; bit for bit the
    same as on slices of rows, and as the in-place forms (which never stream)."""
    n, es = 3000, torch.finfo(dtype).bits // 8
    rows, step = _rows_for_streaming(n, es)
    g = torch.Generator().manual_seed(8)
    gu = (3 * torch.randn(rows, 2 * n, generator=g)).to(dtype)
    x = gu[:, :n].contiguous()
    gu_in_place, x_in_place = gu.clone(), x.clone()
    ops.swiglu_(gu_in_place)
    ops.relu2_(x_in_place)
    for name, out, sliced, in_place in (
        ("swiglu", _cpp.swiglu(gu), lambda j: _cpp.swiglu(gu[j:j + step]), gu_in_place[:, :n]),
        ("relu2", _cpp.relu2(x), lambda j: _cpp.relu2(x[j:j + step]), x_in_place),
    ):
        assert torch.equal(out, torch.cat([sliced(j) for j in range(0, rows, step)])), name
        assert torch.equal(out, in_place), name
    check(_cpp.swiglu(gu)[:64], swiglu_ref(gu[:64].float()), swiglu_ref(gu[:64]), dtype, "streamed swiglu")


# ---------------------------------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 2 * 3000), (3, 7, 2 * 1000), (33, 2 * 40)])
@pytest.mark.parametrize("strided", [False, True])
def test_swiglu_relu2(dtype, shape, strided):
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    xin = row_strided(x) if strided else x
    check(_cpp.swiglu(xin), swiglu_ref(x.float()), swiglu_ref(x), dtype, "swiglu", scale=10)
    check(_cpp.relu2(xin), relu2_ref(x.float()), relu2_ref(x), dtype, "relu2", scale=10)


def test_swiglu_fp32_silu_within_torchs_ulps():
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
    out = _cpp.swiglu(torch.stack([g, torch.ones_like(g)], 1)).squeeze(1)
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


# ------------------------------------------------------------------------------------------ linear


@pytest.mark.parametrize("dtype", DTYPES)
# > 4 / > 16 rows: ATen (16-bit / fp32)
@pytest.mark.parametrize("rows", [(1, 1), (1, 3), (2, 2), (7,), (1, 16), (17,)])
@pytest.mark.parametrize("nk", [(3000, 80), (5, 3000), (37, 129)])  # odd N (tail rows), odd K (tail chunks)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_linear(dtype, rows, nk, bias, residual):
    from fastlm.ops.projection import linear_ref

    N, K = nk
    g = torch.Generator().manual_seed(N + K + len(rows))
    x = torch.randn(*rows, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    r = torch.randn(*rows, N, generator=g).to(dtype) if residual else None
    args = (x, w, b, r)
    ref32 = linear_ref(*(None if t is None else t.double() for t in args)).float()
    check(_cpp.linear(*args), ref32, linear_ref(*args), dtype, "linear", scale=K ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_strided(dtype):
    # rows of x strided (a slice of a wider activation), weight a row view into a fused [3N, K] storage
    g = torch.Generator().manual_seed(5)
    x = row_strided(torch.randn(3, 5, 96, generator=g).to(dtype))
    fused = (torch.randn(3 * 40, 96, generator=g) / 10).to(dtype)
    w = fused[40:80]
    out = _cpp.linear(x, w)
    ref32 = (x.double() @ w.double().t()).float()
    check(out, ref32, x @ w.t(), dtype, "linear strided", scale=10)
    assert out.is_contiguous() and out.shape == (3, 5, 40)


BAD_INPUTS = [  # (exception, message, call): the C++ op raises the Python checks' exception types
    (ValueError, "weight must have shape", lambda b: fops.add_rms_norm(torch.randn(4, 64), None, torch.ones(32), 1e-5,
                                                                       backend=b)),
    (TypeError, "residual has dtype", lambda b: fops.add_rms_norm(torch.randn(4, 64), torch.randn(4, 64).double(),
                                                                  torch.ones(64), 1e-5, backend=b)),
    (ValueError, "residual must have shape", lambda b: fops.add_layer_norm(torch.randn(4, 64), torch.randn(4, 32),
                                                                           torch.ones(64), None, 1e-5, backend=b)),
    (TypeError, "x must be float32", lambda b: fops.add_layer_norm(torch.ones(4, 64, dtype=torch.long), None,
                                                                   torch.ones(64), None, 1e-5, backend=b)),
    (TypeError, "bias has dtype", lambda b: fops.add_layer_norm(torch.randn(4, 64), None, torch.ones(64),
                                                                torch.zeros(64).half(), 1e-5, backend=b)),
    (TypeError, "x must be a torch.Tensor", lambda b: fops.add_layer_norm([1.0], None, torch.ones(1), None, 1e-5,
                                                                          backend=b)),
    (ValueError, "last dim must be even", lambda b: fops.swiglu(torch.randn(2, 5), backend=b)),
    (ValueError, "last dim must be even", lambda b: fops.swiglu_(torch.randn(2, 5), backend=b)),
    (TypeError, "gate_up must be float32", lambda b: fops.swiglu(torch.ones(2, 4, dtype=torch.int32), backend=b)),
    (ValueError, "0-d", lambda b: fops.relu2(torch.tensor(1.0), backend=b)),
    (TypeError, "x must be float32", lambda b: fops.relu2_(torch.ones(3, dtype=torch.int32), backend=b)),
]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_public_ops_raise_the_same_errors_on_every_backend(case, backend):
    """The public ops check their arguments in Python before any backend runs; the C++ ops check them
    again (csrc/checks.h: a direct torch.ops.fastlm call must not read out of bounds) with the same
    exception types, naming the same arguments."""
    exc, message, call = BAD_INPUTS[case]
    with pytest.raises(exc, match=message):
        call(backend)


def test_eager_calls_are_dispatcher_calls():
    """Eager, the C++ backend calls fastlm._C.call_<op> (an unboxed dispatcher call), not the OpOverload:
    modes still see the fastlm op, fake tensors still get the fake implementation, and torch.compile
    (which traces the OpOverload) still captures the op in one graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, r, w, b = torch.randn(2, 64), torch.randn(2, 64), 1 + torch.randn(64), torch.randn(64)
    with Seen() as seen:
        fops.add_layer_norm(x, r, w, b, 1e-5, backend="cpp")
        fops.relu2(x, backend="cpp")
    assert seen.ops == ["fastlm.add_layer_norm.default", "fastlm.relu2.default"]
    with FakeTensorMode():
        y, h = fops.add_rms_norm(torch.randn(3, 64), torch.randn(3, 64), torch.ones(64), 1e-5, backend="cpp")
    assert type(y).__name__ == "FakeTensor" and y.shape == (3, 64) and h.shape == (3, 64)
    compiled = torch.compile(lambda a, c: fops.add_layer_norm(a, c, w, b, 1e-5, backend="cpp")[0] * 2,
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, r), fops.add_layer_norm(x, r, w, b, 1e-5, backend="cpp")[0] * 2)


def test_linear_bad_input():
    import fastlm.ops as fops

    x, w = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be \\[N, K\\]"):
        fops.linear(x, torch.randn(4, 7), backend="cpp")
    with pytest.raises(TypeError, match="weight has dtype"):
        fops.linear(x, w.double(), backend="cpp")
    with pytest.raises(ValueError, match="residual must have shape"):
        fops.linear(x, w, residual=torch.randn(2, 5), backend="cpp")
    with pytest.raises(ValueError, match="weight must be \\[N, K\\]"):  # the C++ op checks too, same type
        _cpp.linear(x, torch.randn(4, 7))


# ----------------------------------------------------------------------------------- decode attention


def sdpa_decode(q, kc, vc, lengths, scale):
    B, H, D = q.shape
    T = kc.shape[2]
    mask = (torch.arange(T).view(1, T) < lengths.view(B, 1)).view(B, 1, 1, T)
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mask, scale=scale,
                                         enable_gqa=kc.shape[1] != H)
    return out.squeeze(2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx", [1, 17, 300])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 80), (6, 3, 40)])
@pytest.mark.parametrize("B", [1, 3])
def test_decode_attention(B, heads, ctx, dtype):
    H, Hkv, D = heads
    Tmax = ctx + 5
    g = torch.Generator().manual_seed(ctx + B)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = (2 * torch.randn(B, Hkv, Tmax, D, generator=g)).to(dtype)
    vc = torch.randn(B, Hkv, Tmax, D, generator=g).to(dtype)
    lengths = torch.tensor([ctx, max(1, ctx // 2), 1][:B], dtype=torch.int32 if B == 1 else torch.int64)
    scale = 1 / math.sqrt(D)
    # Poison every slot past each length: the kernel must never read them.
    kp, vp = kc.clone(), vc.clone()
    for b in range(B):
        kp[b, :, lengths[b]:] = float("nan")
        vp[b, :, lengths[b]:] = float("nan")
    out = _cpp.decode_attention(q, kp, vp, lengths, scale)
    ref32 = sdpa_decode(q.float(), kc.float(), vc.float(), lengths, scale)
    reflo = sdpa_decode(q, kc, vc, lengths, scale)
    torch.testing.assert_close(decode_attention_ref(q.float(), kc.float(), vc.float(), lengths, scale), ref32,
                               atol=1e-5, rtol=1e-5)
    check(out, ref32, reflo, dtype, "decode_attention")


def test_decode_attention_strided_q():
    q = torch.randn(2, 8, 3, 64)[:, :, 1]  # [B, H, D] with non-contiguous head stride
    kc, vc = torch.randn(2, 2, 20, 64), torch.randn(2, 2, 20, 64)
    lengths = torch.tensor([20, 7])
    out = _cpp.decode_attention(q, kc, vc, lengths, 0.125)
    torch.testing.assert_close(out, decode_attention_ref(q, kc, vc, lengths, 0.125), atol=2e-5, rtol=1e-5)


# -------------------------------------------------------------------------------- library plumbing


def test_public_api_uses_cpp_backend():
    import fastlm.ops as fops
    from fastlm.ops._registry import backend_status

    assert backend_status("cpp", "cpu")[0]
    x, r, w = torch.randn(2, 3, 64), torch.randn(2, 3, 64), torch.randn(64)
    y, h = fops.add_rms_norm(x, r, w, 1e-5, backend="cpp")
    y_ref, h_ref = add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(y, y_ref)
    ok, why = _cpp.status("cuda")
    assert ok == bool(torch._C._dispatch_has_kernel_for_dispatch_key("fastlm::add_rms_norm", "CUDA")), why


def test_kernels_run_on_torchs_threads():
    # at::parallel_for without OpenMP at build time runs every kernel on one thread, silently.
    import fastlm._C as C

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert C.parallel_threads_used(64) == 2, "fastlm._C was built without OpenMP: kernels are single-threaded"
        torch.set_num_threads(1)
        assert C.parallel_threads_used(64) == 1
    finally:
        torch.set_num_threads(before)


def test_build_isa_matches_record():
    from fastlm._build_config import CPU_ISA

    assert _cpp.CPU_ISA == CPU_ISA


def _opcheck_cases():
    bf = torch.bfloat16
    x, r, w, b = torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.randn(64), torch.randn(64)
    cfg = QKV_CONFIGS["persimmon"]
    qkv, cos, sin, nw = make_qkv(cfg, 2, 3, torch.float32)
    qa = qkv_args(qkv, cos, sin, nw, cfg)
    cfg2 = QKV_CONFIGS["odd_d40"]
    qkv2, cos2, sin2, nw2 = make_qkv(cfg2, 2, 3, bf)
    qa2 = qkv_args(qkv2, cos2, sin2, nw2, cfg2)
    kc, vc = torch.zeros(2, 2, 6, 40, dtype=bf), torch.zeros(2, 2, 6, 40, dtype=bf)
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    q, kca, vca = torch.randn(2, 4, 32), torch.randn(2, 2, 9, 32), torch.randn(2, 2, 9, 32)
    lens = torch.tensor([9, 4])
    return [
        ("add_rms_norm", (x, r, w, 1e-5, False)),
        ("add_rms_norm", (x.to(bf), None, w.to(bf), 1e-5, True)),
        ("add_layer_norm", (x, r, w, b, 1e-5)),
        ("add_layer_norm", (x, None, w, None, 1e-5)),
        ("qkv_rope", qa),
        ("qkv_rope_cache", qa2[:7] + (kc, vc, pos) + qa2[7:]),
        ("swiglu", (x,)),
        ("relu2", (x.to(bf),)),
        ("linear", (x, torch.randn(24, 64), None, None)),
        ("linear", (x[:1, :1].to(bf), torch.randn(24, 64, dtype=bf), torch.randn(24, dtype=bf),
                    torch.randn(1, 1, 24, dtype=bf))),
        ("decode_attention", (q, kca, vca, lens, 0.2)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    name, args = case[0], case[1]
    kwargs = case[2] if len(case) > 2 else {}
    torch.library.opcheck(getattr(ops, name).default, args, kwargs)


ORDER_SCRIPT = """
import torch
def register_python_op():
    @torch.library.custom_op("fastlm::_order_probe_{tag}", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1
    probe.register_fake(lambda x: torch.empty_like(x))
    lib = torch.library.Library("fastlm", "FRAGMENT")
    lib.define("_order_frag_{tag}(Tensor x) -> Tensor")
    lib.impl("_order_frag_{tag}", lambda x: x * 2, "CompositeExplicitAutograd")
    return lib
{first}
{second}
x = torch.ones(3)
assert torch.equal(torch.ops.fastlm._order_probe_{tag}(x), x + 1)
assert torch.equal(torch.ops.fastlm._order_frag_{tag}(x), x * 2)
y, h = torch.ops.fastlm.add_rms_norm(x.view(1, 3), None, torch.ones(3), 1e-5, False)
assert y.shape == (1, 3)
print("ok")
"""


@pytest.mark.parametrize("cpp_first", [True, False])
def test_import_order_with_python_fragments(cpp_first):
    # Load the extension file directly (importing the fastlm package would pull in transformers: slow).
    load_cpp = ("import importlib.util as u; s = u.spec_from_file_location('fastlm._C', %r); "
                "m = u.module_from_spec(s); s.loader.exec_module(m)" % _cpp._C.__file__)
    load_py = "_lib = register_python_op()"
    first, second = (load_cpp, load_py) if cpp_first else (load_py, load_cpp)
    script = ORDER_SCRIPT.format(tag="a" if cpp_first else "b", first=first, second=second)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())  # the installed fastlm, not the source tree
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
