"""fastlm.kernels (Triton backend) against the plain-PyTorch references.

Where: on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py on a machine without a GPU), or,
in the GPU test mode (tests/_gpu.py: CUDA available, TRITON_INTERPRET unset), on CUDA tensors with the
compiled kernels; the same tests either way.

Tolerance (flash-attention's rule, tests/_tolerance.py): the kernel's error against the reference run
on upcast inputs must be at most twice eager PyTorch's own error in the low dtype, plus a small atol.
Shapes are small: the interpreter runs every program in Python.
"""
import os  # noqa: E402
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
from _gpu import DEVICE, GPU_TEST_MODE, requires_gpu_mode  # noqa: E402
from _tolerance import assert_close_to_ref  # noqa: E402

import fastlm.kernels as fk  # noqa: E402
import fastlm.kernels.decode_attention as decode_k  # noqa: E402
import fastlm.kernels.norm as norm_k  # noqa: E402
import fastlm.ops as ops  # noqa: E402
import fastlm.ops._registry as backend  # noqa: E402
import fastlm.ops.activations as act_mod  # noqa: E402
import fastlm.ops.attention as attn_mod  # noqa: E402
import fastlm.ops.layer_norm as ln_mod  # noqa: E402
import fastlm.ops.rms_norm as rms_mod  # noqa: E402

import fastlm.ops.qkv as qkv_mod  # noqa: E402
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
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=DEVICE)


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
        y, h2 = backend.impl("add_rms_norm", "triton", DEVICE)(x, res, w, 1e-5, weight_in_fp32)
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
        y, h = backend.impl("add_layer_norm", "triton", DEVICE)(x, res, w, b, 1e-5)
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
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim)
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# (name, H, Hkv, D, rotary_dim, interleaved, qkv_head_major, norm kind)
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
    pos = torch.arange(S, device=DEVICE)[None].expand(B, S) + torch.arange(B, device=DEVICE)[:, None] * 3
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
    out = backend.impl("qkv_rope", "triton", DEVICE)(*args, *tail)
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
    q = backend.impl("qkv_rope_cache", "triton", DEVICE)(qkv, cos, sin, qw, qb, kw, kb, kc, vc, positions, *tail)
    q_lo = qkv_mod.qkv_rope_cache_ref(qkv, cos, sin, qw, qb, kw, kb, kc_ref, vc_ref, positions, *tail)
    kc32, vc32 = kc.float().clone(), vc.float().clone()
    q32 = qkv_mod.qkv_rope_cache_ref(*[up(a) for a in (qkv, cos, sin, qw, qb, kw, kb)], kc32, vc32, positions, *tail)
    a = atol_for(dtype, q32)
    assert_close_to_ref(q, q32, q_lo, a, name="q")
    assert_close_to_ref(kc, kc32, kc_ref, atol_for(dtype, kc32), name="k_cache")
    assert torch.equal(vc, vc_ref), "v is copied into the cache unchanged"
    written = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    written[torch.arange(B, device=DEVICE)[:, None], pos] = True
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
    cos = sin = torch.zeros(1, 3, 0, device=DEVICE)
    q, k, v = ops.qkv_rope(qkv, cos, sin, num_heads=2, num_kv_heads=1, head_dim=64, rotary_dim=0, backend="triton")
    qr, kr, vr = qkv_mod.qkv_rope_ref(qkv, cos, sin, None, None, None, None, 2, 1, 64, 0, False, False, 1e-5)
    assert torch.equal(q, qr) and torch.equal(k, kr) and torch.equal(v, vr)


# ---------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    x = gen(3, 7, 2 * 1100, dtype=dtype, seed=30, scale=3.0)  # I = 1100: two column blocks, masked tail
    check(fk.activations.swiglu(x), act_mod.swiglu_ref, (x,), dtype, "swiglu")
    xs = gen(5, 2 * 300 + 10, dtype=dtype, seed=31)[1::2, 3:603]  # row-strided
    check(backend.impl("swiglu", "triton", DEVICE)(xs), act_mod.swiglu_ref, (xs,), dtype, "swiglu.strided")


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2(dtype):
    x = gen(2, 5, 1500, dtype=dtype, seed=32, scale=3.0)
    check(fk.activations.relu2(x), act_mod.relu2_ref, (x,), dtype, "relu2")
    xs = gen(6, 333, dtype=dtype, seed=33)[::3, 10:310]
    check(backend.impl("relu2", "triton", DEVICE)(xs), act_mod.relu2_ref, (xs,), dtype, "relu2.strided")
    z = gen(4, dtype=dtype, seed=34)
    check(fk.activations.relu2(z), act_mod.relu2_ref, (z,), dtype, "relu2.1d")


# ----------------------------------------------------------------------------------- decode attention
def sdpa_decode(q, k_cache, v_cache, lengths, scale):
    """Independent reference: SDPA (GQA via enable_gqa) with a length mask, in q's dtype math."""
    T = k_cache.shape[2]
    mask = (torch.arange(T, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, T]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k_cache, v_cache, attn_mask=mask, scale=scale,
                                         enable_gqa=k_cache.shape[1] != q.shape[1])
    return out.squeeze(2)


def decode_case(B, H, Hkv, D, T, lengths, dtype, seed=40, lengths_dtype=torch.int32, strided=False):
    """(q, k_cache, v_cache, lengths) with garbage past each length: 1e4 in K, NaN in V (never to be read).
    ``strided``: lengths as a stride-3 view whose neighbours hold out-of-range values."""
    q = gen(B, H, D, dtype=dtype, seed=seed)
    kc, vc = gen(B, Hkv, T, D, dtype=dtype, seed=seed + 1), gen(B, Hkv, T, D, dtype=dtype, seed=seed + 2)
    for b, n in enumerate(lengths):
        kc[b, :, n:] = 1e4
        vc[b, :, n:] = float("nan")
    L = torch.tensor(lengths, dtype=lengths_dtype, device=DEVICE)
    if strided:
        wide = torch.full((B, 3), T + 1000, dtype=lengths_dtype, device=DEVICE)
        wide[:, 0] = L
        L = wide[:, 0]
        assert L.stride(0) == 3
    return q, kc, vc, L


def check_decode(out, q, kc, vc, L, scale):
    B, _, T, _ = kc.shape
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any(), "a slot past a length was read (NaN there)"
    valid = torch.arange(T, device=kc.device)[None, None, :, None] < L.view(B, 1, 1, 1)
    kc0, vc0 = torch.where(valid, kc, 0), torch.where(valid, vc, 0)
    ref32 = sdpa_decode(q.float(), kc0.float(), vc0.float(), L, scale)
    ref_lo = sdpa_decode(q, kc0, vc0, L, scale)
    assert_close_to_ref(out, ref32, ref_lo, atol_for(q.dtype, ref32), name="decode_attention")
    # and the contract's reference
    ref_c = attn_mod.decode_attention_ref(q.float(), kc0.float(), vc0.float(), L, scale)
    assert_close_to_ref(out, ref_c, ref_lo, atol_for(q.dtype, ref_c), name="decode_attention_ref")


DECODE_CASES = [  # (H, Hkv, D, Tmax, lengths)
    (4, 2, 64, 600, [1, 300, 600]),  # GQA G=2, ragged: 1 slot, across a chunk boundary, Tmax (not a multiple of 256)
    (5, 1, 80, 40, [33, 7]),  # G=5 (padded rows), head_dim 80 (masked columns), one chunk
    (2, 2, 160, 300, [257]),  # no GQA, head_dim 160 (BLOCK_D 256, BLOCK_T 32), one slot into the 2nd chunk
    (2, 1, 16, 1, [1]),  # context 1
    (2, 1, 16, 4096, [4096, 2500]),  # context 4k: 16 chunks, 10 of them empty for the second row
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,T,lengths", DECODE_CASES, ids=[f"H{c[0]}-Hkv{c[1]}-D{c[2]}-T{c[3]}"
                                                                  for c in DECODE_CASES])
def test_decode_attention(dtype, H, Hkv, D, T, lengths):
    q, kc, vc, L = decode_case(len(lengths), H, Hkv, D, T, lengths, dtype)
    scale = 1 / math.sqrt(D)
    check_decode(backend.impl("decode_attention", "triton", DEVICE)(q, kc, vc, L, scale), q, kc, vc, L, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths_dtype", [torch.int32, torch.int64])
def test_decode_attention_strided_lengths(dtype, lengths_dtype):
    """lengths read at their stride: a stride-3 view whose neighbours are out of range (and int64)."""
    q, kc, vc, L = decode_case(3, 4, 2, 32, 300, [5, 300, 129], dtype, seed=50, lengths_dtype=lengths_dtype,
                               strided=True)
    check_decode(decode_k.decode_attention(q, kc, vc, L, 0.2), q, kc, vc, L, 0.2)


@requires_gpu_mode
def test_decode_attention_lengths_clamped_on_cuda():
    """On CUDA lengths are not checked (a host sync): one above Tmax attends to all Tmax slots, never past
    the cache, as the reference does (fastlm.ops.attention's docstring)."""
    q, kc, vc, L = decode_case(2, 4, 2, 64, 100, [100, 100], torch.bfloat16, seed=60)
    over = torch.tensor([100 + 5000, 100], dtype=torch.int32, device=DEVICE)
    out = decode_k.decode_attention(q, kc, vc, over, 0.125)
    assert torch.equal(out, decode_k.decode_attention(q, kc, vc, L, 0.125))


def test_decode_grid_is_static():
    """The grid comes from Tmax (and the shapes) only: the lengths' values never reach the host."""
    assert list(inspect.signature(decode_k.num_chunks_for).parameters) == ["t_max"]
    assert decode_k.num_chunks_for(1) == 1
    assert decode_k.num_chunks_for(decode_k.CHUNK) == 1
    assert decode_k.num_chunks_for(32768) == 32768 // decode_k.CHUNK
    assert 128 <= decode_k.CHUNK <= 512 and decode_k.CHUNK % 64 == 0  # a few hundred slots, whole tiles
    for dtype in DTYPES:
        for G, D in ((1, 64), (5, 128), (4, 160)):
            mma, block_g, block_t, block_d = decode_k.blocks_for(dtype, G, D)
            assert decode_k.CHUNK % block_t == 0 and block_d >= D and block_g >= G
            assert mma == (dtype != torch.float32)
            assert mma or block_g == triton_next_pow2(G), "the fp32 path does not pad the group to 16 rows"


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


# ------------------------------------------------------------------------------- registration, opcheck
def test_backend_table_matches_reference_signatures():
    assert backend.backend_status("triton", DEVICE)[0]
    for op in OPS:
        assert backend.has_impl(op, "triton", DEVICE), op
        ref_params = list(inspect.signature(backend.OPS[op].ref).parameters)
        assert list(inspect.signature(backend.impl(op, "triton", DEVICE)).parameters) == ref_params, op
        assert hasattr(torch.ops.fastlm, f"triton_{op}"), op


def test_interpreter_never_for_cuda_tensors():
    """The interpreter copies whole storages to the host per launch: the backend refuses CUDA tensors
    under it (and in the GPU test mode the kernels are compiled)."""
    ok, why = backend.backend_status("triton", "cuda")
    if GPU_TEST_MODE:
        assert ok and not fk.INTERPRET, why
    else:
        assert fk.INTERPRET and not ok and "interpreter" in why and "TRITON_INTERPRET" in why, why


def _opcheck_args():
    f32 = torch.float32
    x, r, w, b = gen(3, 48, dtype=f32, seed=1), gen(3, 48, dtype=f32, seed=2), gen(48, dtype=f32), gen(48, dtype=f32)
    case = ("t", 2, 1, 40, 20, False, False, "per_head")
    qkv, cos, sin, qw, qb, kw, kb, pos = qkv_inputs(case, f32, 2, 3, 1)
    tail = (2, 1, 40, 20, False, False, 1e-5)
    kc, vc = torch.zeros(2, 1, 8, 40, device=DEVICE), torch.zeros(2, 1, 8, 40, device=DEVICE)
    q = gen(2, 2, 40, dtype=f32, seed=3)
    kd, vd = gen(2, 1, 8, 40, dtype=f32, seed=4), gen(2, 1, 8, 40, dtype=f32, seed=5)
    return {
        "add_rms_norm": [(x, r, w, 1e-5, False), (x, None, w, 1e-5, True)],
        "add_layer_norm": [(x, r, w, b, 1e-5), (x, None, w, None, 1e-5)],
        "qkv_rope": [(qkv, cos, sin, qw, qb, kw, kb, *tail)],
        "qkv_rope_cache": [(qkv, cos, sin, qw, qb, kw, kb, kc, vc, pos, *tail)],
        "swiglu": [(gen(2, 3, 64, dtype=f32),)],
        "relu2": [(gen(2, 3, 33, dtype=f32),)],
        "decode_attention": [(q, kd, vd, torch.tensor([3, 8], device=DEVICE), 40 ** -0.5)],
    }


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    for args in _opcheck_args()[op]:
        torch.library.opcheck(getattr(torch.ops.fastlm, f"triton_{op}").default, args)


def test_refuses_cpu_tensors_without_interpreter():
    """Without TRITON_INTERPRET=1 the backend reports itself unavailable and the kernels raise clearly."""
    code = _LOADER + r'''
import torch
from fastlm.ops._registry import backend_status
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
            torch.tensor([3, 16], device=DEVICE), gen(2, 128, dtype=torch.float32, seed=7))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), step(*args)):
        assert torch.equal(a, b)


def test_top_level_kernels_import_defines_nothing():
    """From the source tree's root, `import kernels` (transformers probes for a package of that name)
    finds this backend's folder: it must not load a second copy that registers the ops again."""
    code = _LOADER + r'''
import sys
sys.path.insert(0, sys.argv[1])
import kernels
assert kernels.__file__ and not hasattr(kernels, "activations"), dir(kernels)
assert not [m for m in sys.modules if m.startswith("kernels.")]
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()
print("OK")
'''
    res = subprocess.run([sys.executable, "-c", code, str(HERE.parent)], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
