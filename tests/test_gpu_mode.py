"""The GPU test mode (tests/_gpu.py): with a CUDA device and TRITON_INTERPRET unset, the compiled kernels
on CUDA tensors. Every test here is skipped elsewhere, with a reason that names the mode.

* every fused op on each kernel backend (Triton, CUDA C++) against the plain-PyTorch reference on CUDA
  tensors, in fp32 / fp16 / bf16 (tests/test_triton_kernels.py also runs on CUDA tensors in this mode);
* whole-model parity per family in fp16 and bf16: the patched model's logits error against the fp32
  model at most twice transformers' own error in that dtype;
* the engine with CUDA graphs: greedy tokens equal to transformers' generate, mode == "cuda_graph".
"""
import math

import pytest
import torch

from _gpu import GPU_TEST_MODE, requires_gpu_mode
from _models import ONE_PER_FAMILY, build_model, left_padded_batch, random_ids
from _tolerance import assert_close_to_ref

pytestmark = requires_gpu_mode

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_BACKENDS = ["triton", "cpp"]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}


def kernel_backend(backend: str):
    """The backend's implementation table entry point on CUDA, or skip naming why it is not there."""
    from fastlm.ops import _registry as _backend

    ok, why = _backend.backend_status(backend, "cuda")
    if not ok:
        pytest.skip(f"GPU test mode: backend {backend} is unavailable on CUDA ({why})")
    return lambda op: _backend.impl(op, backend, "cuda")


def gen(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device="cuda")


def up(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def check(outs, ref_fn, args, dtype, name):
    outs = outs if isinstance(outs, tuple) else (outs,)
    r32, rlo = ref_fn(*[up(a) for a in args]), ref_fn(*args)
    r32, rlo = (r32 if isinstance(r32, tuple) else (r32,)), (rlo if isinstance(rlo, tuple) else (rlo,))
    for i, (o, a, b) in enumerate(zip(outs, r32, rlo)):
        assert o.is_cuda and o.dtype == b.dtype, (name, o.device, o.dtype)
        atol = ATOL[dtype] * max(1.0, float(a.abs().max()) if a.numel() else 1.0)
        assert_close_to_ref(o, a, b, atol, name=f"{name}[{i}]")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norms_on_cuda(backend, dtype):
    from fastlm.ops.layer_norm import add_layer_norm_ref
    from fastlm.ops.rms_norm import add_rms_norm_ref

    impl = kernel_backend(backend)
    x, r = gen(3, 5, 2560, dtype=dtype, seed=1), gen(3, 5, 2560, dtype=dtype, seed=2)
    w, b = gen(2560, dtype=dtype, seed=3) + 1, gen(2560, dtype=dtype, seed=4)
    for fp32_w in (False, True):
        ref = lambda *a, f=fp32_w: add_rms_norm_ref(*a, 1e-5, f)  # noqa: E731
        check(impl("add_rms_norm")(x, r, w, 1e-5, fp32_w), ref, (x, r, w), dtype, f"{backend}.rms")
        check(impl("add_rms_norm")(x, None, w, 1e-5, fp32_w)[0], lambda *a: ref(*a)[0], (x, None, w), dtype,
              f"{backend}.rms.nores")
    check(impl("add_layer_norm")(x + 3, r, w, b, 1e-5), lambda *a: add_layer_norm_ref(*a, 1e-5), (x + 3, r, w, b),
          dtype, f"{backend}.ln")


def rope_tables(positions, rotary_dim, dtype, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, device="cuda").float() / rotary_dim)
    emb = (positions[..., None].float() * inv).repeat(1, 1, 2)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# (name, H, Hkv, D, rotary_dim, interleaved, qkv_head_major, qk norm)
QKV_CASES = [("stablelm-12b", 8, 2, 160, 40, False, False, "per_head"),
             ("persimmon", 4, 4, 64, 32, False, True, "shared"),
             ("helium", 4, 4, 128, 128, True, False, None), ("stablelm-3b", 4, 4, 80, 20, False, False, None)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QKV_CASES, ids=[c[0] for c in QKV_CASES])
def test_qkv_rope_on_cuda(backend, dtype, case):
    from fastlm.ops.qkv import qkv_rope_cache_ref, qkv_rope_ref

    impl = kernel_backend(backend)
    _, H, Hkv, D, R, il, ph, norm = case
    B, S, T = 2, 7, 20
    qkv = gen(B, S, (H + 2 * Hkv) * D, dtype=dtype, seed=5)
    pos = torch.arange(S, device="cuda")[None].expand(B, S) + torch.arange(B, device="cuda")[:, None] * 3
    cos, sin = rope_tables(pos, R, dtype)
    if norm == "per_head":
        norms = (gen(H, D, dtype=dtype, seed=6) + 1, None, gen(Hkv, D, dtype=dtype, seed=7) + 1, None)
    elif norm == "shared":
        norms = tuple(gen(D, dtype=dtype, seed=8 + i) for i in range(4))
    else:
        norms = (None,) * 4
    static = (H, Hkv, D, R, il, ph, 1e-5)
    args = (qkv, cos, sin, *norms)
    check(impl("qkv_rope")(*args, *static), lambda *a: qkv_rope_ref(*a, *static), args, dtype, f"{backend}.qkv")
    kc, vc = gen(B, Hkv, T, D, dtype=dtype, seed=20), gen(B, Hkv, T, D, dtype=dtype, seed=21)
    kc_lo, vc_lo, kc32, vc32 = kc.clone(), vc.clone(), kc.float(), vc.float()
    q = impl("qkv_rope_cache")(*args, kc, vc, pos, *static)
    q_lo = qkv_rope_cache_ref(*args, kc_lo, vc_lo, pos, *static)
    q32 = qkv_rope_cache_ref(*[up(a) for a in args], kc32, vc32, pos, *static)
    for name, out, r32, rlo in (("q", q, q32, q_lo), ("k_cache", kc, kc32, kc_lo)):
        atol = ATOL[dtype] * max(1.0, float(r32.abs().max()))
        assert_close_to_ref(out, r32, rlo, atol, name=f"{backend}.qkv_cache.{name}")
    assert torch.equal(vc, vc_lo), "v is copied into the cache unchanged"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_on_cuda(backend, dtype):
    from fastlm.ops.activations import relu2_inplace_ref, relu2_ref, swiglu_inplace_ref, swiglu_ref

    impl = kernel_backend(backend)
    x = gen(3, 5, 2 * 1100, dtype=dtype, seed=30, scale=3.0)
    check(impl("swiglu")(x), swiglu_ref, (x,), dtype, f"{backend}.swiglu")
    check(impl("relu2")(x), relu2_ref, (x,), dtype, f"{backend}.relu2")
    for op, ref in (("swiglu_", swiglu_inplace_ref), ("relu2_", relu2_inplace_ref)):
        mine = x.clone()
        out = impl(op)(mine)  # in place: a view of mine
        check(out, lambda t, ref=ref: ref(t.clone()), (x,), dtype, f"{backend}.{op}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,D,T,lengths", [(20, 4, 128, 5000, [1, 4097, 5000, 256]),  # AFM's GQA, long
                                               (8, 8, 80, 300, [300, 17]), (4, 2, 160, 600, [513, 3])])
def test_decode_attention_on_cuda(dtype, H, Hkv, D, T, lengths):
    """The Triton decode kernel on CUDA (the C++ backend has none: CUDA tensors take the reference there)."""
    from fastlm.ops.attention import decode_attention_ref

    impl = kernel_backend("triton")
    B = len(lengths)
    q, kc, vc = gen(B, H, D, dtype=dtype, seed=40), gen(B, Hkv, T, D, dtype=dtype, seed=41), \
        gen(B, Hkv, T, D, dtype=dtype, seed=42)
    L = torch.tensor(lengths, device="cuda")
    valid = torch.arange(T, device="cuda")[None, None, :, None] < L.view(B, 1, 1, 1)
    kc, vc = torch.where(valid, kc, 1e4), torch.where(valid, vc, float("nan"))  # garbage past the lengths
    scale = 1 / math.sqrt(D)
    out = impl("decode_attention")(q, kc, vc, L, scale)
    assert not torch.isnan(out).any()
    kc0, vc0 = torch.where(valid, kc, 0), torch.where(valid, vc, 0)
    check(out, lambda *a: decode_attention_ref(*a, L, scale), (q, kc0, vc0), dtype, "triton.decode")


@pytest.mark.skipif(GPU_TEST_MODE and torch.cuda.device_count() < 2,
                    reason="GPU test mode with 2 GPUs only: launches on a tensor's device while another is current")
def test_triton_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every Triton launch goes to cuda:1 (a device guard)."""
    from fastlm.ops.activations import swiglu_ref
    from fastlm.ops.attention import decode_attention_ref
    from fastlm.ops.rms_norm import add_rms_norm_ref

    impl = kernel_backend("triton")
    torch.cuda.set_device(0)
    x, w = gen(4, 256, dtype=torch.bfloat16, seed=1).to("cuda:1"), gen(256, dtype=torch.bfloat16, seed=2).to("cuda:1")
    y, _ = impl("add_rms_norm")(x, None, w, 1e-5, False)
    assert y.device.index == 1
    assert torch.allclose(y.float(), add_rms_norm_ref(x, None, w, 1e-5, False)[0].float(), rtol=2e-2, atol=2e-2)
    g = gen(4, 512, dtype=torch.float32, seed=3).to("cuda:1")
    assert torch.allclose(impl("swiglu")(g), swiglu_ref(g), rtol=1e-5, atol=1e-6)
    q, k, v = (gen(*s, dtype=torch.float32, seed=i).to("cuda:1") for i, s in enumerate([(2, 4, 64), (2, 2, 300, 64),
                                                                                          (2, 2, 300, 64)]))
    L = torch.tensor([300, 7], device="cuda:1")
    assert torch.allclose(impl("decode_attention")(q, k, v, L, 0.125), decode_attention_ref(q, k, v, L, 0.125),
                          rtol=1e-4, atol=1e-5)
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------------------- models
def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_model_parity_on_cuda(variant, dtype, backend):
    """Patched logits in fp16/bf16 vs the fp32 model: at most 2x transformers' own error + atol."""
    import fastlm

    kernel_backend(backend)
    ref_model = build_model(variant).cuda()
    low = build_model(variant).to(device="cuda", dtype=dtype)
    ids = random_ids(2, 9).cuda()
    with torch.no_grad():
        ref = ref_model(ids).logits
        hf_err = (low(ids).logits.float() - ref).abs().max().item()
        fastlm.patch(low, backend=backend)
        ours_err = (low(ids).logits.float() - ref).abs().max().item()
    assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("variant", ONE_PER_FAMILY)
def test_engine_cuda_graphs_greedy_matches_transformers(variant, backend):
    import fastlm

    kernel_backend(backend)
    model = build_model(variant).cuda()
    ids, mask = left_padded_batch([5, 11, 3], seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    new = 16
    fastlm.unpatch(model)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)[:, ids.shape[1]:].tolist()
    expected = [row[: row.index(2) + 1] if 2 in row else row for row in hf]  # fastlm stops at (keeps) EOS
    result = fastlm.generate(model, ids, attention_mask=mask, max_new_tokens=new, backend=backend, return_result=True)
    assert result.mode == "cuda_graph" and result.backend == backend
    assert result.tokens == expected


def test_mode_is_on():
    """In this mode the Triton kernels are compiled, never interpreted."""
    import fastlm.kernels as fk

    assert GPU_TEST_MODE and torch.cuda.is_available() and not fk.INTERPRET
