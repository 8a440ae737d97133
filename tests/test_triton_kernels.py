"""fastlm.kernels (Triton backend) against the plain-PyTorch references, under TRITON_INTERPRET=1 on CPU.

Tolerance (flash-attention's rule, tests/_tolerance.py): the kernel's error against the reference run
on upcast inputs must be at most twice eager PyTorch's own error in the low dtype, plus a small atol.
Shapes are small: the interpreter runs every program in Python.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede any import of triton

import inspect  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _tolerance import assert_close_to_ref  # noqa: E402

import fastlm.kernels as fk  # noqa: E402
import fastlm.kernels.decode_attention as decode_k  # noqa: E402
import fastlm.kernels.norm as norm_k  # noqa: E402
import fastlm.ops as ops  # noqa: E402
import fastlm.ops._backend as backend  # noqa: E402
import fastlm.ops.activations as act_mod  # noqa: E402
import fastlm.ops.attention as attn_mod  # noqa: E402
import fastlm.ops.layer_norm as ln_mod  # noqa: E402
import fastlm.ops.rms_norm as rms_mod  # noqa: E402

qkv_mod = sys.modules["fastlm.ops.qkv_rope"]  # the package exports a function of the same name
_LOADER = "import fastlm.ops, fastlm.kernels\n"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}
OPS = ["add_rms_norm", "add_layer_norm", "qkv_rope", "qkv_rope_cache", "swiglu", "relu2", "decode_attention"]


def atol_for(dtype, ref):
    """Small absolute slack, scaled by the output's magnitude."""
    return ATOL[dtype] * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0)


def up(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check(out, ref_fn, args, dtype, name):
    """Kernel output(s) vs ref_fn on upcast args (ref_fp32) and on the same args (ref_lowp)."""
    ref32 = ref_fn(*[up(a) for a in args])
    reflo = ref_fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    r32 = ref32 if isinstance(ref32, tuple) else (ref32,)
    rlo = reflo if isinstance(reflo, tuple) else (reflo,)
    for i, (o, a, b) in enumerate(zip(outs, r32, rlo)):
        assert o.dtype == b.dtype, f"{name}[{i}]: dtype {o.dtype} != reference {b.dtype}"
        assert_close_to_ref(o, a, b, atol_for(dtype, a), name=f"{name}[{i}]")


def gen(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_in_fp32", [False, True])
@pytest.mark.parametrize("shape,block,has_res", [((3, 3000), None, True), ((2, 3, 64), None, False),
                                                 ((2, 3000), 1024, True), ((1, 1000), 256, False)])
def test_add_rms_norm(dtype, weight_in_fp32, shape, block, has_res):
    n = shape[-1]
    x, r = gen(*shape, dtype=dtype, seed=1), gen(*shape, dtype=dtype, seed=2)
    w = gen(n, dtype=dtype, seed=3) + 1
    res = r if has_res else None
    y, h = norm_k._add_norm(x, res, w, None, 1e-5, True, weight_in_fp32, dtype, block_n=block)
    if block is None:  # the registered backend entry point (default block heuristic)
        y, h2 = backend.impl("add_rms_norm", "triton")(x, res, w, 1e-5, weight_in_fp32)
        h = h2
    ref_fn = lambda x_, r_, w_: rms_mod.add_rms_norm_ref(x_, r_, w_, 1e-5, weight_in_fp32)  # noqa: E731
    ref_lo = ref_fn(x, res, w)
    check(y, ref_fn, (x, res, w), dtype, "rms.y")
    if has_res:
        assert torch.equal(h, ref_lo[1]), "h = x + residual must match torch's rounding exactly"
    elif block is None:
        assert h is x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block,has_res,has_bias", [((3, 3000), None, True, True),
                                                          ((2, 3, 80), None, False, False),
                                                          ((2, 3000), 1024, True, False),
                                                          ((1, 1000), 256, False, True)])
def test_add_layer_norm(dtype, shape, block, has_res, has_bias):
    n = shape[-1]
    # An offset mean exercises the centred variance (and Chan's merge in the loop path).
    x, r = gen(*shape, dtype=dtype, seed=4, scale=2.0) + 3, gen(*shape, dtype=dtype, seed=5)
    w, b = gen(n, dtype=dtype, seed=6), (gen(n, dtype=dtype, seed=7) if has_bias else None)
    res = r if has_res else None
    if block is None:
        y, h = backend.impl("add_layer_norm", "triton")(x, res, w, b, 1e-5)
    else:
        y, h = norm_k._add_norm(x, res, w, b, 1e-5, False, False, dtype, block_n=block)
    ref_fn = lambda x_, r_, w_, b_: ln_mod.add_layer_norm_ref(x_, r_, w_, b_, 1e-5)  # noqa: E731
    check(y, ref_fn, (x, res, w, b), dtype, "ln.y")
    if has_res:
        assert torch.equal(h, ref_fn(x, res, w, b)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_row_strided_inputs(dtype):
    """Slices of wider buffers are read in place (no copy) and give the same result as contiguous copies."""
    big_x = gen(6, 3100, dtype=dtype, seed=8)
    big_r = gen(4, 5, 3000, dtype=dtype, seed=9)
    x = big_x[::2, 50:3050]  # row stride 6200, offset start
    r = big_r[1:4, 2]  # [3, 3000], row stride 15000
    assert not x.is_contiguous() and not r.is_contiguous()
    assert norm_k.rows_view(x).data_ptr() == x.data_ptr()  # a view, not a copy
    w, b = gen(3000, dtype=dtype, seed=10), gen(3000, dtype=dtype, seed=11)
    y, h = fk.norm.add_rms_norm(x, r, w, 1e-6, False)
    yc, hc = fk.norm.add_rms_norm(x.contiguous(), r.contiguous(), w, 1e-6, False)
    assert torch.equal(y, yc) and torch.equal(h, hc)
    check(y, lambda a, c, d: rms_mod.add_rms_norm_ref(a, c, d, 1e-6, False), (x, r, w), dtype, "rms.strided")
    y, h = fk.norm.add_layer_norm(x, r, w, b, 1e-5)
    check(y, lambda a, c, d, e: ln_mod.add_layer_norm_ref(a, c, d, e, 1e-5), (x, r, w, b), dtype, "ln.strided")
    # 3D with a narrowed last dim: [B, S, N] slice of [B, S, N + 8]
    x3 = gen(2, 3, 72, dtype=dtype, seed=12)[..., 4:68]
    y3, h3 = fk.norm.add_rms_norm(x3, None, w[:64], 1e-5, True)
    check(y3, lambda a, d: rms_mod.add_rms_norm_ref(a, None, d, 1e-5, True)[0], (x3, w[:64]), dtype, "rms.3d")


# ------------------------------------------------------------------------------------------- qkv rope
def rope_tables(positions, rotary_dim, dtype, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# (name, H, Hkv, D, rotary_dim, interleaved, per_head_layout, norm kind)
QKV_CASES = [
    ("stablelm", 4, 2, 80, 20, False, False, "per_head"),
    ("persimmon", 2, 2, 64, 32, False, True, "shared"),
    ("helium", 2, 1, 128, 128, True, False, None),
    ("arcee40", 3, 3, 40, 40, False, False, None),
]


def qkv_inputs(case, dtype, B, S, cos_batch, seed=0, stride_pad=0):
    _, H, Hkv, D, R, il, ph, norm = case
    W = (H + 2 * Hkv) * D
    qkv = gen(B, S, W + stride_pad, dtype=dtype, seed=seed)[..., stride_pad // 2: stride_pad // 2 + W]
    pos = torch.arange(S)[None].expand(B, S) + torch.arange(B)[:, None] * 3
    cos, sin = rope_tables(pos[:1] if cos_batch == 1 else pos, R, dtype)
    if norm == "per_head":
        qw, qb, kw, kb = gen(H, D, dtype=dtype, seed=seed + 1) + 1, None, gen(Hkv, D, dtype=dtype, seed=seed + 2), None
    elif norm == "shared":
        qw, qb, kw, kb = (gen(D, dtype=dtype, seed=seed + i) for i in range(1, 5))
    else:
        qw = qb = kw = kb = None
    return qkv, cos, sin, qw, qb, kw, kb, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QKV_CASES, ids=[c[0] for c in QKV_CASES])
def test_qkv_rope(dtype, case):
    _, H, Hkv, D, R, il, ph, _n = case
    B, S = (3, 7) if dtype == torch.float32 else (1, 7)
    cos_batch = 1 if case[0] in ("stablelm", "helium") else B  # broadcast and per-batch tables
    qkv, cos, sin, qw, qb, kw, kb, _ = qkv_inputs(case, dtype, B, S, cos_batch, stride_pad=16 * (case[0] == "arcee40"))
    tail = (H, Hkv, D, R, il, ph, 1e-5)
    args = (qkv, cos, sin, qw, qb, kw, kb)
    out = backend.impl("qkv_rope", "triton")(*args, *tail)
    assert [tuple(o.shape) for o in out] == [(B, H, S, D), (B, Hkv, S, D), (B, Hkv, S, D)]
    check(out, lambda *a: qkv_mod.qkv_rope_ref(*a, *tail), args, dtype, f"qkv_rope.{case[0]}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QKV_CASES, ids=[c[0] for c in QKV_CASES])
def test_qkv_rope_cache(dtype, case):
    _, H, Hkv, D, R, il, ph, _n = case
    B, S, T = (3, 2, 12) if dtype != torch.bfloat16 else (1, 3, 5)
    qkv, cos, sin, qw, qb, kw, kb, pos = qkv_inputs(case, dtype, B, S, B, seed=3)
    tail = (H, Hkv, D, R, il, ph, 1e-5)
    positions = pos.to(torch.int32)
    kc = gen(B, Hkv, T, D, dtype=dtype, seed=20)
    vc = gen(B, Hkv, T, D, dtype=dtype, seed=21)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = backend.impl("qkv_rope_cache", "triton")(qkv, cos, sin, qw, qb, kw, kb, kc, vc, positions, *tail)
    q_lo = qkv_mod.qkv_rope_cache_ref(qkv, cos, sin, qw, qb, kw, kb, kc_ref, vc_ref, positions, *tail)
    kc32, vc32 = kc.float().clone(), vc.float().clone()
    q32 = qkv_mod.qkv_rope_cache_ref(*[up(a) for a in (qkv, cos, sin, qw, qb, kw, kb)], kc32, vc32, positions, *tail)
    a = atol_for(dtype, q32)
    assert_close_to_ref(q, q32, q_lo, a, name="q")
    assert_close_to_ref(kc, kc32, kc_ref, atol_for(dtype, kc32), name="k_cache")
    assert torch.equal(vc, vc_ref), "v is copied into the cache unchanged"
    written = torch.zeros(B, T, dtype=torch.bool)
    written[torch.arange(B)[:, None], pos] = True
    untouched = ~written[:, None, :, None].expand_as(kc)
    assert torch.equal(kc[untouched], kc_ref[untouched])


def test_qkv_rope_long_sequence_fp32():
    """S = 33 tokens (more than one power-of-two block of tokens), GQA, partial rotary, per-head norm."""
    case = QKV_CASES[0]
    qkv, cos, sin, qw, qb, kw, kb, _ = qkv_inputs(case, torch.float32, 1, 33, 1, seed=5)
    tail = case[1:7] + (1e-5,)
    out = fk.qkv_rope.qkv_rope(qkv, cos, sin, qw, qb, kw, kb, *tail)
    check(out, lambda *a: qkv_mod.qkv_rope_ref(*a, *tail), (qkv, cos, sin, qw, qb, kw, kb), torch.float32, "qkv33")


def test_qkv_rope_public_api_and_no_rotary():
    """Through fastlm.ops with backend='triton'; rotary_dim=0 passes values through."""
    qkv = gen(2, 3, (2 + 2) * 64, dtype=torch.float32, seed=7)
    cos = sin = torch.zeros(1, 3, 0)
    q, k, v = ops.qkv_rope(qkv, cos, sin, num_heads=2, num_kv_heads=1, head_dim=64, rotary_dim=0, backend="triton")
    qr, kr, vr = qkv_mod.qkv_rope_ref(qkv, cos, sin, None, None, None, None, 2, 1, 64, 0, False, False, 1e-5)
    assert torch.equal(q, qr) and torch.equal(k, kr) and torch.equal(v, vr)


# ---------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    x = gen(3, 7, 2 * 1100, dtype=dtype, seed=30, scale=3.0)  # I = 1100: two column blocks, masked tail
    check(fk.activations.swiglu(x), act_mod.swiglu_ref, (x,), dtype, "swiglu")
    xs = gen(5, 2 * 300 + 10, dtype=dtype, seed=31)[1::2, 3:603]  # row-strided
    check(backend.impl("swiglu", "triton")(xs), act_mod.swiglu_ref, (xs,), dtype, "swiglu.strided")


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2(dtype):
    x = gen(2, 5, 1500, dtype=dtype, seed=32, scale=3.0)
    check(fk.activations.relu2(x), act_mod.relu2_ref, (x,), dtype, "relu2")
    xs = gen(6, 333, dtype=dtype, seed=33)[::3, 10:310]
    check(backend.impl("relu2", "triton")(xs), act_mod.relu2_ref, (xs,), dtype, "relu2.strided")
    z = gen(4, dtype=dtype, seed=34)
    check(fk.activations.relu2(z), act_mod.relu2_ref, (z,), dtype, "relu2.1d")


# ----------------------------------------------------------------------------------- decode attention
def sdpa_decode(q, k_cache, v_cache, lengths, scale):
    """Independent reference: SDPA (GQA via enable_gqa) with a length mask, in q's dtype math."""
    T = k_cache.shape[2]
    mask = (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=mask, scale=scale,
                                         enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.squeeze(2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,T,lengths,splits", [
    (4, 2, 64, 320, [1, 17, 300], None),  # GQA, ragged, default split count (2 splits here)
    (2, 2, 80, 40, [33, 7], None),  # no GQA, head_dim 80 (masked), one split
    (8, 2, 40, 300, [300], 5),  # G = 4, head_dim 40, many splits: most end early / are empty
])
def test_decode_attention(dtype, H, Hkv, D, T, lengths, splits):
    B = len(lengths)
    q = gen(B, H, D, dtype=dtype, seed=40)
    # Garbage (large) values past each length: must never be read.
    kc, vc = gen(B, Hkv, T, D, dtype=dtype, seed=41), gen(B, Hkv, T, D, dtype=dtype, seed=42)
    L = torch.tensor(lengths, dtype=torch.int32)
    for b, n in enumerate(lengths):
        kc[b, :, n:] = 1e4
        vc[b, :, n:] = float("nan")
    scale = 1 / math.sqrt(D)
    if splits is None:
        out = backend.impl("decode_attention", "triton")(q, kc, vc, L, scale)
    else:
        out = decode_k._decode(q, kc, vc, L, scale, num_splits=splits)
    assert out.shape == (B, H, D) and out.dtype == dtype
    assert not torch.isnan(out).any()
    clean = lambda c: torch.where(torch.arange(T)[None, None, :, None] < L.view(B, 1, 1, 1), c, 0)  # noqa: E731
    kc0, vc0 = clean(kc), clean(vc)
    ref32 = sdpa_decode(q.float(), kc0.float(), vc0.float(), L, scale)
    ref_lo = sdpa_decode(q, kc0, vc0, L, scale)
    assert_close_to_ref(out, ref32, ref_lo, atol_for(dtype, ref32), name="decode_attention")
    # and the contract's reference
    ref_c = attn_mod.decode_attention_ref(q.float(), kc0.float(), vc0.float(), L, scale)
    assert_close_to_ref(out, ref_c, ref_lo, atol_for(dtype, ref_c), name="decode_attention_ref")


def test_decode_split_count_is_static():
    """Split count comes from Tmax and B * Hkv only (no lengths, no host sync)."""
    params = inspect.signature(decode_k.num_splits_for).parameters
    assert list(params) == ["t_max", "batch_kv_heads", "device"]
    cpu = torch.device("cpu")
    assert decode_k.num_splits_for(100, 4, cpu) == 1
    assert 1 < decode_k.num_splits_for(4096, 4, cpu) <= decode_k.MAX_SPLITS
    assert decode_k.num_splits_for(4096, 4096, cpu) == 1


# ------------------------------------------------------------------------------- registration, opcheck
def test_backend_table_matches_reference_signatures():
    for op in OPS:
        table = backend._IMPLS[op]
        assert "triton" in table, op
        ref_params = list(inspect.signature(table["torch"]).parameters)
        assert list(inspect.signature(table["triton"]).parameters) == ref_params, op
        assert hasattr(torch.ops.fastlm, f"triton_{op}"), op
    assert backend.backend_status("triton", "cpu")[0]


def _opcheck_args():
    f32 = torch.float32
    x, r, w, b = gen(3, 48, dtype=f32, seed=1), gen(3, 48, dtype=f32, seed=2), gen(48, dtype=f32), gen(48, dtype=f32)
    case = ("t", 2, 1, 40, 20, False, False, "per_head")
    qkv, cos, sin, qw, qb, kw, kb, pos = qkv_inputs(case, f32, 2, 3, 1)
    tail = (2, 1, 40, 20, False, False, 1e-5)
    kc, vc = torch.zeros(2, 1, 8, 40), torch.zeros(2, 1, 8, 40)
    q = gen(2, 2, 40, dtype=f32, seed=3)
    kd, vd = gen(2, 1, 8, 40, dtype=f32, seed=4), gen(2, 1, 8, 40, dtype=f32, seed=5)
    return {
        "add_rms_norm": [(x, r, w, 1e-5, False), (x, None, w, 1e-5, True)],
        "add_layer_norm": [(x, r, w, b, 1e-5), (x, None, w, None, 1e-5)],
        "qkv_rope": [(qkv, cos, sin, qw, qb, kw, kb, *tail)],
        "qkv_rope_cache": [(qkv, cos, sin, qw, qb, kw, kb, kc, vc, pos, *tail)],
        "swiglu": [(gen(2, 3, 64, dtype=f32),)],
        "relu2": [(gen(2, 3, 33, dtype=f32),)],
        "decode_attention": [(q, kd, vd, torch.tensor([3, 8]), 40 ** -0.5)],
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args in _opcheck_args()[op]:
        torch.library.opcheck(getattr(torch.ops.fastlm, f"triton_{op}").default, args)


def test_refuses_cpu_tensors_without_interpreter():
    """Without TRITON_INTERPRET=1 the backend reports itself unavailable and the kernels raise clearly."""
    code = _LOADER + r'''
import torch
from fastlm.ops._backend import backend_status
import fastlm.kernels as fk
import fastlm.ops as ops
ok, why = backend_status("triton", "cpu")
assert not ok and "TRITON_INTERPRET" in why, why
x = torch.randn(2, 8)
for call in (lambda: fk.norm.add_rms_norm(x, None, torch.ones(8), 1e-5, False),
             lambda: fk.activations.relu2(x), lambda: torch.ops.fastlm.triton_swiglu(x)):
    try:
        call()
    except RuntimeError as exc:
        assert "TRITON_INTERPRET" in str(exc), exc
    else:
        raise AssertionError("no error")
try:
    ops.add_rms_norm(x, None, torch.ones(8), 1e-5, backend="triton")
except ops.BackendUnavailableError as exc:
    assert "TRITON_INTERPRET" in str(exc)
else:
    raise AssertionError("no error")
print("OK")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_compile_fullgraph():
    """The registered ops trace into one graph (fake impls; no graph breaks): the CPU proxy for capture."""
    def step(x, r, w, q, kc, vc, lengths, gu):
        y, h = fk.norm.add_rms_norm(x, r, w, 1e-5, False)
        o = fk.decode_attention.decode_attention(q, kc, vc, lengths, 0.125)
        return y, h, o, fk.activations.swiglu(gu)

    args = (gen(2, 64, dtype=torch.float32, seed=1), gen(2, 64, dtype=torch.float32, seed=2),
            gen(64, dtype=torch.float32, seed=3), gen(2, 4, 64, dtype=torch.float32, seed=4),
            gen(2, 2, 16, 64, dtype=torch.float32, seed=5), gen(2, 2, 16, 64, dtype=torch.float32, seed=6),
            torch.tensor([3, 16]), gen(2, 128, dtype=torch.float32, seed=7))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), step(*args)):
        assert torch.equal(a, b)


_COMPILE_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastlm.kernels import activations, decode_attention, norm, qkv_rope
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except Exception as exc:
    print("SKIP no CUDA backend:", exc); raise SystemExit(0)

def sig(names, types, consts):
    s = dict(zip(names, types))
    s.update({k: "constexpr" for k in consts})
    return s

jobs = []
nn = ["X", "R", "W", "B", "Y", "H", "stride_x", "stride_r", "stride_y", "stride_h", "N", "eps"]
for single in (True, False):
    for rms in (True, False):
        c = dict(HAS_RES=True, IS_RMS=rms, HAS_W=True, HAS_BIAS=not rms, WEIGHT_FP32=False, BLOCK_N=4096, SINGLE=single)
        jobs.append((norm._add_norm_kernel, sig(nn, ["*bf16"] * 6 + ["i32"] * 5 + ["fp32"], c), c))
an = ["X", "Y", "stride_x", "stride_y", "N"]
for kern in (activations._swiglu_kernel, activations._relu2_kernel):
    jobs.append((kern, sig(an, ["*bf16", "*bf16", "i32", "i32", "i32"], {"BLOCK": 1024}), {"BLOCK": 1024}))
qn = ["QKV", "COS", "SIN", "QW", "QB", "KW", "KB", "Q", "K", "V", "POS", "S", "stride_xb", "stride_xs",
      "stride_cb", "stride_cs", "stride_cd", "stride_sb", "stride_ss", "stride_sd", "qw_hs", "qb_hs", "kw_hs",
      "kb_hs", "stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb",
      "stride_vh", "stride_vs", "stride_pb", "stride_ps", "t_max", "eps"]
qt = ["*bf16"] * 10 + ["*i64"] + ["i32"] * 25 + ["fp32"]
for H, HKV, D, ROT, il, ph, qn_, cache in [(32, 8, 80, 20, False, False, True, True),
                                           (64, 64, 64, 32, False, True, True, False),
                                           (20, 20, 128, 128, True, False, False, True)]:
    c = dict(H=H, HKV=HKV, D=D, ROT=ROT, INTERLEAVED=il, PER_HEAD=ph, HAS_QN=qn_, HAS_QB=ph, HAS_KN=qn_,
             HAS_KB=ph, CACHE=cache, BLOCK_H=max(1, 2048 // triton.next_power_of_2(D)),
             BLOCK_D=triton.next_power_of_2(D))
    jobs.append((qkv_rope._qkv_rope_kernel, sig(qn, qt, c), c))
dn = ["Q", "K", "V", "LEN", "M_OUT", "L_OUT", "ACC", "stride_qb", "stride_qh", "stride_kb", "stride_kh",
      "stride_kt", "stride_vb", "stride_vh", "stride_vt", "stride_len", "t_max", "chunk", "qk_scale"]
dt = ["*bf16"] * 3 + ["*i32"] + ["*fp32"] * 3 + ["i32"] * 11 + ["fp32"]
for G, D in [(4, 128), (1, 80)]:
    c = dict(HKV=8, G=G, D=D, NUM_SPLITS=8, BLOCK_G=16, BLOCK_T=64, BLOCK_D=triton.next_power_of_2(D))
    jobs.append((decode_attention._decode_split_kernel, sig(dn, dt, c), c))
rn = ["M_IN", "L_IN", "ACC", "O", "stride_ob", "stride_oh"]
c = dict(H=32, D=80, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128)
jobs.append((decode_attention._decode_reduce_kernel, sig(rn, ["*fp32"] * 3 + ["*bf16", "i32", "i32"], c), c))
for cc in (80, 90):
    for fn, s, c in jobs:
        k = triton.compile(ASTSource(fn, s, c), target=GPUTarget("cuda", cc, 32))
        assert "cubin" in k.asm or "ptx" in k.asm, fn
        print(f"sm_{cc} {fn.__name__} ok")
print("OK")
'''


def test_kernels_compile_for_sm80_sm90():
    """Every kernel compiles (no interpreter) through ttir/ttgir/llir/ptx for sm_80 and sm_90: GPU code
    paths the interpreter does not check (types of loop-carried values, tl.dot shapes, constexpr use)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-c", _LOADER + _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tempfile.gettempdir())
    if "SKIP" in res.stdout:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-5000:]
