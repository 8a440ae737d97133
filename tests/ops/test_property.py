"""Property-based check of every public op with a kernel backend, on every kernel backend available here
(cpp; triton under the interpreter): for the same input, the backend gives the reference's answer (backend
``torch``) within the project tolerance, or raises the same exception type.

Inputs (hypothesis, built by tests/ops/_inputs.py's Spec / build): shapes (odd sizes such as head_dim 80 and
hidden 3000, 7 tokens, zero sizes), dtypes (fp32 / bf16 / fp16, and wrong ones), layouts (contiguous,
row-strided, a non-contiguous last dim, sliced, expanded: overlapping), a tensor on ``meta`` beside CPU ones,
NaN / inf values, bad scalars (eps, head counts, lengths, cache positions) and non-tensor arguments.

Results: same shape, dtype and device as the reference; NaN and inf in the same places; elsewhere the
tolerance rule and table of tests/_tolerance.py against the reference run on fp64 inputs. In-place ops and
the KV-cache write are compared on everything they write (each backend gets its own copy, same layout).
Errors: the reference's own (from the torch backend) may only be TypeError / ValueError (or torch's
RuntimeError for an in-place write into overlapping memory), never an internal error; a backend that
cannot run on a device raises BackendUnavailableError.

Deterministic (derandomize, no example database); the Triton interpreter runs every program in Python,
so its examples are fewer and small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from _api import (INTERNAL_OVERLAP_MESSAGE, BackendUnavailableError, add_layer_norm, add_layer_norm_ref, add_rms_norm,
                  add_rms_norm_ref, cpu_fp16_sdpa_widens, backend_status, decode_attention, decode_attention_ref,
                  dispatch, linear, linear_ref, prefill_attention, prefill_attention_ref, qkv_rope, qkv_rope_cache,
                  qkv_rope_cache_ref, qkv_rope_ref,
                  quant_linear, relu2, relu2_, relu2_inplace_ref, relu2_ref, swiglu, swiglu_, swiglu_inplace_ref,
                  swiglu_ref)
from _inputs import Spec, build, layout, quant_linear_fp64, quant_weight, same_layout_clone, targets
from _tolerance import assert_clean_error, assert_close_to_ref, atol_for, upcast

KERNEL_TARGETS = targets(kernels=True, device="cpu")
# the Triton interpreter evaluates NaN / inf inputs with numpy, which warns about them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
# the Triton interpreter is slow: fewer, smaller examples there
MAX_EXAMPLES = {"cpp": 400, "triton": 80}


def settings_for(backend: str, scale: float = 1.0):
    return settings(max_examples=max(5, int(MAX_EXAMPLES[backend] * scale)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=False)


# ------------------------------------------------------------------------------------------ inputs

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
GOOD_DTYPE = st.sampled_from(FLOATS)
# mostly a supported dtype, sometimes not
ANY_DTYPE = st.sampled_from(FLOATS * 10 + (torch.float64, torch.int32))
LAYOUTS = ("contiguous",) * 4 + ("row_strided", "last_dim_strided", "sliced", "expanded")


@st.composite
def specs(draw, shape, dtype, *, specials=True, meta=True, layouts=LAYOUTS, scale=1.0):
    return Spec(tuple(shape), dtype, layout=draw(st.sampled_from(layouts)),
                device="meta" if meta and rarely(draw, 24) else "cpu",
                specials=draw(st.sampled_from((0,) * 8 + (1, 3))) if specials else 0, scale=scale,
                seed=draw(st.integers(0, 2 ** 16)))


def rarely(draw, n: int) -> bool:
    """True about once in n + 1 draws. (Not `integers(0, n) == 0`: hypothesis favours the bounds.)"""
    return draw(st.integers(0, n)) == n // 2


EPS = st.sampled_from((1e-5,) * 40 + (1e-6, 0.0, 1, -1e-5, float("nan"), float("inf"), "1e-5", None))


def maybe_bad(draw, spec_value, bad=("list", "none", "int")):
    """A tensor spec, or (rarely) a non-tensor value in its place."""
    choice = draw(st.sampled_from(("tensor",) * 30 + bad))
    return {"list": [1.0, 2.0], "none": None, "int": 3}.get(choice, spec_value)


def materialise(v):
    return build(v) if isinstance(v, Spec) else v


@dataclass
class Case:
    """One call of a public op: ``op(*args, **kwargs, backend=...)``; ``written``: positions in args of
    tensors the op writes (each backend gets its own copy); ``ref_hi(*args)`` the reference's outputs
    (the op's outputs, then the written tensors) for fp64 inputs."""
    op: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    written: tuple = ()
    ref_hi: Callable | None = None


def call(case: Case, backend: str):
    """(outputs, exception): outputs are the op's tensors followed by the tensors it wrote."""
    args = [same_layout_clone(a) if i in case.written else a for i, a in enumerate(case.args)]
    try:
        out = case.op(*args, **case.kwargs, backend=backend)
    except Exception as exc:  # noqa: BLE001 (the property is about which exception)
        return None, exc
    outs = list(out) if isinstance(out, tuple) else [out]
    return outs + [args[i] for i in case.written], None


def assert_matches(op: str, i: int, out, lowp, hi, dtype) -> None:
    name = f"output {i}"
    assert isinstance(out, torch.Tensor), f"{name}: {type(out)}"
    assert out.shape == lowp.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(lowp.shape)}"
    assert out.dtype == lowp.dtype, f"{name}: dtype {out.dtype} != reference {lowp.dtype}"
    assert out.device == lowp.device, f"{name}: device {out.device} != reference {lowp.device}"
    if out.device.type == "meta" or out.numel() == 0:
        return
    out, lowp = out.detach(), lowp.detach()
    assert torch.equal(out.isnan(), lowp.isnan()), f"{name}: NaN positions differ from the reference"
    inf = lowp.isinf()
    assert torch.equal(out.isinf(), inf) and torch.equal(out[inf], lowp[inf]), \
        f"{name}: inf positions differ from the reference"
    if hi is None:
        return
    finite = lowp.isfinite() & hi.isfinite()
    zero = torch.zeros((), dtype=out.dtype)
    hi = hi.to(torch.float64).where(finite, 0.0)
    atol = atol_for(op, dtype if dtype in FLOATS else torch.float32, hi)
    assert_close_to_ref(out.where(finite, zero), hi, lowp.where(finite, zero), atol, name=name)


def check_case(case: Case, backend: str, dtype) -> None:
    ref, ref_exc = call(case, "torch")
    out, exc = call(case, backend)
    if ref_exc is not None:
        assert_clean_error(ref_exc, INTERNAL_OVERLAP_MESSAGE)
    # the op runs on its first tensor's device: a backend without kernels there says so (before or
    # after the argument checks, by op)
    first = case.args[0]
    if isinstance(first, torch.Tensor) and not backend_status(backend, first.device.type)[0]:
        allowed = (BackendUnavailableError,) + (() if ref_exc is None else (type(ref_exc),))
        assert type(exc) in allowed, f"{backend} on {first.device}: {exc!r}, expected one of {allowed}"
        return
    if ref_exc is not None:
        assert exc is not None, f"{backend} returned a result where the reference raised {ref_exc!r}"
        assert type(exc) is type(ref_exc), f"{backend} raised {exc!r}; the reference raised {ref_exc!r}"
        return
    assert exc is None, f"{backend} raised {exc!r}; the reference returned a result"
    devices = {a.device.type for a in case.args if isinstance(a, torch.Tensor)}
    hi = None
    if case.ref_hi is not None and "meta" not in devices:
        hi_args = [same_layout_clone(a) if i in case.written else a for i, a in enumerate(case.args)]
        hi_args = [upcast(a, torch.float64) for a in hi_args]
        hi = case.ref_hi(*hi_args)
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_matches(case.op.__name__, i, o, r, None if hi is None else hi[i], dtype)


# ------------------------------------------------------------------------------------------- norms


@st.composite
def norm_cases(draw, layer: bool):
    dtype = draw(ANY_DTYPE)
    lead = draw(st.sampled_from(((1,), (3,), (2, 3), (7,), (0,), (1, 1))))
    n = draw(st.sampled_from((8, 33, 64, 80, 1, 8, 33, 3000, 0)))
    shape = lead + (n,) if not rarely(draw, 30) else ()  # rarely a 0-d x
    x = draw(specs(shape, dtype))
    residual = draw(specs(shape, dtype)) if draw(st.booleans()) else None
    w_dtype = dtype if layer or draw(st.booleans()) else torch.float32  # RMSNorm takes fp32 weights too
    if rarely(draw, 20):
        w_dtype = draw(ANY_DTYPE)
    w_shape = shape[-1:] if not rarely(draw, 20) else (n + 1,)
    weight = maybe_bad(draw, draw(specs(w_shape, w_dtype, specials=False, layouts=("contiguous", "sliced"))))
    eps = draw(EPS)
    if layer:
        bias = draw(specs(w_shape, w_dtype, specials=False)) if draw(st.booleans()) else None
        args = (x, residual, weight, bias, eps)
        return Case(add_layer_norm, tuple(map(materialise, args)), ref_hi=add_layer_norm_ref), dtype
    args = (x, residual, weight, eps, draw(st.booleans()))
    return Case(add_rms_norm, tuple(map(materialise, args)), ref_hi=add_rms_norm_ref), dtype




# ------------------------------------------------------------------------------------- activations


@st.composite
def activation_cases(draw, op: str):
    dtype = draw(ANY_DTYPE)
    lead = draw(st.sampled_from(((1,), (3,), (2, 3), (7,), (0,), (4, 1))))
    n = draw(st.sampled_from((2, 8, 66, 160, 0, 3000)))
    if op == "relu2" or op == "relu2_":
        n = n + draw(st.sampled_from((0, 1)))
    elif rarely(draw, 15):
        n += 1  # an odd [gate | up] width
    shape = lead + (n,) if not rarely(draw, 30) else ()
    x = materialise(draw(specs(shape, dtype, scale=3.0)))
    if op == "swiglu":
        return Case(swiglu, (x,), ref_hi=lambda a: (swiglu_ref(a),)), dtype
    if op == "relu2":
        return Case(relu2, (x,), ref_hi=lambda a: (relu2_ref(a),)), dtype
    if op == "swiglu_":
        return Case(swiglu_, (x,), written=(0,), ref_hi=lambda a: (swiglu_inplace_ref(a), a)), dtype
    return Case(relu2_, (x,), written=(0,), ref_hi=lambda a: (relu2_inplace_ref(a), a)), dtype



# ---------------------------------------------------------------------------------------- qkv rope

HEADS = st.sampled_from(((2, 1), (2, 2), (4, 2), (3, 1), (1, 1)))


@st.composite
def qkv_cases(draw, cache: bool):
    dtype = draw(ANY_DTYPE)
    H, Hkv = draw(HEADS)
    D = draw(st.sampled_from((8, 16, 80, 6)))
    per_head = H == Hkv and draw(st.booleans())
    B = draw(st.sampled_from((1, 2, 1, 0)))
    S = draw(st.sampled_from((1, 3, 7, 0)))
    R = draw(st.sampled_from((D,) * 8 + (D // 2 - (D // 2) % 2, 0, 2) * 4 + (3, D + 2)))
    width = (H + 2 * Hkv) * D
    qkv = draw(specs((B, S, width if not rarely(draw, 20) else width + D), dtype,
                     layouts=("contiguous", "row_strided", "sliced", "last_dim_strided")))
    table = (draw(st.sampled_from((1, B))), S, max(R, 0) + draw(st.sampled_from((0, 0, 2))))
    cos = draw(specs(table, dtype, specials=False, layouts=("contiguous", "row_strided", "expanded")))
    sin = draw(specs(table, dtype, specials=False, layouts=("contiguous", "row_strided")))
    norm = draw(st.sampled_from(("none", "none", "shared", "shared", "per_head", "per_head", "bias_only")))
    wq = wk = bq = bk = None
    if norm == "shared":
        wq, bq = Spec((D,), dtype, seed=1), Spec((D,), dtype, seed=2)
        wk, bk = Spec((D,), dtype, seed=3), Spec((D,), dtype, seed=4)
    elif norm == "per_head":
        wq, wk = Spec((H, D), dtype, seed=5), Spec((Hkv, D), dtype, seed=6)
    elif norm == "bias_only":
        bq = Spec((D,), dtype, seed=7)
    ints = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=R)
    bad = draw(st.sampled_from((None,) * 40 + ("num_heads", "num_kv_heads", "head_dim", "rotary_dim")))
    if bad is not None:
        ints[bad] = draw(st.sampled_from((0, -1, 2.0, True, "2")))
    kwargs = dict(ints, interleaved=draw(st.booleans()), qkv_head_major=per_head,
                  q_norm_weight=materialise(wq), q_norm_bias=materialise(bq), k_norm_weight=materialise(wk),
                  k_norm_bias=materialise(bk), qk_norm_eps=draw(EPS))
    static = (H, Hkv, D, R, kwargs["interleaved"], per_head, kwargs["qk_norm_eps"])
    tensors = tuple(map(materialise, (qkv, cos, sin)))

    def norms():
        names = ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias")
        return tuple(upcast(kwargs[k], torch.float64) for k in names)

    if not cache:
        def ref_hi(qkv_, cos_, sin_):
            return qkv_rope_ref(qkv_, cos_, sin_, *norms(), *static)

        return Case(qkv_rope, tensors, kwargs, ref_hi=ref_hi), dtype
    t_max = draw(st.sampled_from((1, 4, 9, 4, 9, 0)))
    c_dtype = dtype if not rarely(draw, 30) else draw(ANY_DTYPE)
    c_shape = (B, Hkv, t_max, D)
    k_cache = draw(specs(c_shape, c_dtype, meta=False, layouts=("contiguous",) * 12 + ("sliced",) * 4 + (
        "expanded", "last_dim_strided")))
    v_cache = draw(specs(c_shape, c_dtype, meta=False, layouts=("contiguous", "sliced")))
    # distinct in-range positions per sequence (duplicates make the write order visible), or bad ones
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    pos = torch.stack([torch.randperm(max(t_max, S), generator=g)[:S] for _ in range(B)]) if B * S else \
        torch.zeros(B, S, dtype=torch.long)
    pos_case = draw(st.sampled_from(("ok",) * 16 + ("negative", "past", "float") + ("int32", "strided") * 2))
    if pos_case == "negative" and pos.numel():
        pos[0, -1] = -1
    elif pos_case == "past" and pos.numel():
        pos[-1, 0] = t_max
    elif pos_case == "int32":
        pos = pos.int()
    elif pos_case == "float":
        pos = pos.float()
    elif pos_case == "strided":
        pos = torch.stack([pos, pos], dim=-1)[..., 0]
    caches = (materialise(k_cache), materialise(v_cache), pos)

    def ref_hi(qkv_, cos_, sin_, kc, vc, pos_):
        q = qkv_rope_cache_ref(qkv_, cos_, sin_, *norms(), kc, vc, pos_, *static)
        return q, kc, vc

    return Case(qkv_rope_cache, tensors + caches, kwargs, written=(3, 4), ref_hi=ref_hi), dtype



# -------------------------------------------------------------------------------- decode attention


@st.composite
def decode_cases(draw):
    dtype = draw(ANY_DTYPE)
    H, Hkv = draw(HEADS)
    if rarely(draw, 30):
        Hkv = draw(st.sampled_from((0, 3)))  # no kv heads, or not dividing H
    B = draw(st.sampled_from((1, 2, 3, 0)))
    D = draw(st.sampled_from((8, 16, 80, 64)))
    t_max = draw(st.sampled_from((1, 4, 9, 130)))
    q = draw(specs((B, H, D), dtype, layouts=("contiguous", "sliced", "last_dim_strided", "row_strided")))
    kv_layouts = ("contiguous", "contiguous", "sliced", "last_dim_strided", "expanded")
    k = draw(specs((B, Hkv, t_max, D), dtype, specials=False, layouts=kv_layouts))
    v = draw(specs((B, Hkv, t_max, D), dtype, specials=False, layouts=kv_layouts))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    lengths = torch.randint(1, t_max + 1, (B,), generator=g)
    len_case = draw(st.sampled_from(("ok",) * 16 + ("zero", "past", "negative", "float") + ("int32", "strided") * 2))
    if len_case in ("zero", "past", "negative") and B:
        lengths[-1] = {"zero": 0, "past": t_max + 1, "negative": -2}[len_case]
    elif len_case == "int32":
        lengths = lengths.int()
    elif len_case == "float":
        lengths = lengths.float()
    elif len_case == "strided":
        lengths = torch.stack([lengths, lengths + 1], dim=-1)[:, 0]
    k, v = materialise(k), materialise(v)
    garbage = draw(st.sampled_from(("none", "none", "nan", "inf")))
    if garbage != "none" and k.is_floating_point() and k.device.type == v.device.type == "cpu" and B and Hkv:
        # slots past each length hold NaN / inf (a reused cache): never part of the answer
        k, v = k.contiguous(), v.contiguous()
        fill = float("nan") if garbage == "nan" else float("inf")
        for b in range(B):
            k[b, :, int(lengths[b].clamp(0, t_max)):] = fill
            v[b, :, int(lengths[b].clamp(0, t_max)):] = fill
    scale = draw(st.sampled_from((D ** -0.5,) * 20 + (1.0, 1.0, float("nan"), "0.1")))
    args = (materialise(q), k, v, lengths, scale)
    return Case(decode_attention, args, ref_hi=lambda *a: (decode_attention_ref(*a),)), dtype



# ------------------------------------------------------------------------------------------ linear


@st.composite
def linear_cases(draw):
    dtype = draw(ANY_DTYPE)
    lead = draw(st.sampled_from(((1,), (2,), (4,), (5,), (17,), (2, 3), (0,))))
    K = draw(st.sampled_from((8, 33, 64, 1, 0)))
    N = draw(st.sampled_from((16, 7, 1, 0)))
    x = draw(specs(lead + (K,) if not rarely(draw, 30) else (), dtype))
    w_shape = (N, K) if not rarely(draw, 20) else (N, K + 1)
    w = maybe_bad(draw, draw(specs(w_shape, dtype, specials=False, layouts=("contiguous", "last_dim_strided"))))
    bias = draw(specs((N,), dtype, specials=False)) if draw(st.booleans()) else None
    residual = draw(specs(lead + (N,), dtype)) if draw(st.booleans()) else None
    args = tuple(map(materialise, (x, w, bias, residual)))
    return Case(linear, args, ref_hi=lambda *a: (linear_ref(*a),)), dtype



# ------------------------------------------------------------------------------------ quant_linear


@st.composite
def quant_linear_cases(draw):
    dtype = draw(ANY_DTYPE)
    lead = draw(st.sampled_from(((1,), (2,), (5,), (17,), (2, 3), (0,))))
    K = draw(st.sampled_from((32, 64, 96, 40, 0)))
    N = draw(st.sampled_from((16, 7, 1, 0)))
    bits = draw(st.sampled_from((8, 4)))
    # a group size dividing K (per channel, 32, 8), sometimes one that does not or is odd for int4
    per_channel = K or 2  # (K = 0: any even group size divides it)
    group_size = draw(st.sampled_from((per_channel, per_channel, 32 if K % 32 == 0 and K else per_channel,
                                       8 if K % 8 == 0 and K else per_channel)))
    qweight, scales = quant_weight(N, K, bits, group_size, seed=draw(st.integers(0, 2 ** 16)))
    bad_group = draw(st.sampled_from((None,) * 20 + (3, 0, 48, "32")))
    if draw(st.sampled_from((False,) * 4 + (True,))):
        qweight = layout(qweight, "last_dim_strided")[0]
    if rarely(draw, 20):
        qweight = qweight.float() if draw(st.booleans()) else qweight[:, 1:]  # the wrong dtype or K
    if rarely(draw, 20):
        scales = scales.half() if draw(st.booleans()) else scales[:1]
    if rarely(draw, 24):
        qweight = torch.empty_like(qweight, device="meta")
    x = draw(specs(lead + (K,) if not rarely(draw, 30) else (), dtype))
    bias = draw(specs((N,), dtype, specials=False)) if draw(st.booleans()) else None
    residual = draw(specs(lead + (N,), dtype)) if draw(st.booleans()) else None
    group = group_size if bad_group is None else bad_group
    args = (materialise(x), qweight, scales, materialise(bias), materialise(residual))
    return Case(quant_linear, args, dict(bits=bits if not rarely(draw, 30) else 2, group_size=group),
                ref_hi=lambda *a: (quant_linear_fp64(*a, bits, group_size),)), dtype


# ------------------------------------------------------------- every op with backends, every backend

# op -> (its cases, the share of MAX_EXAMPLES it gets)
OP_CASES = {
    "add_rms_norm": (lambda: norm_cases(layer=False), 1.0),
    "add_layer_norm": (lambda: norm_cases(layer=True), 1.0),
    "swiglu": (lambda: activation_cases("swiglu"), 0.5),
    "relu2": (lambda: activation_cases("relu2"), 0.5),
    "swiglu_": (lambda: activation_cases("swiglu_"), 0.5),
    "relu2_": (lambda: activation_cases("relu2_"), 0.5),
    "qkv_rope": (lambda: qkv_cases(cache=False), 1.0),
    "qkv_rope_cache": (lambda: qkv_cases(cache=True), 1.0),
    "decode_attention": (decode_cases, 1.0),
    "linear": (linear_cases, 0.5),
    "quant_linear": (quant_linear_cases, 0.5),
}


@pytest.mark.parametrize("target", KERNEL_TARGETS)
@pytest.mark.parametrize("op", list(OP_CASES))
def test_backend_matches_reference(target, op):
    backend = target.backend
    cases, share = OP_CASES[op]

    # (the source of prop is that of the test this one replaced: hypothesis derives the examples from it)
    @settings_for(backend, share)
    @given(cases())
    def prop(case_and_dtype):
        case, dtype = case_and_dtype
        check_case(case, backend, dtype)

    prop()


# ------------------------------------------------------------------------------- prefill attention


@st.composite
def prefill_cases(draw):
    dtype = draw(ANY_DTYPE)
    B = draw(st.sampled_from((1, 2)))
    H, Hkv = draw(HEADS)
    if rarely(draw, 10):
        Hkv = draw(st.sampled_from((0, 3)))
    S, T = draw(st.sampled_from(((3, 3), (1, 4), (7, 7), (2, 5))))
    D = draw(st.sampled_from((8, 16)))
    bad = draw(st.sampled_from((None,) * 10 + ("kD", "vB", "qdim", "kdtype", "vdevice")))
    q = Spec((B, H, S, D) if bad != "qdim" else (H, S, D), dtype)
    k = Spec((B, Hkv, T, D + (bad == "kD")), dtype if bad != "kdtype" else torch.float64)
    v = Spec((B + (bad == "vB"), Hkv, T, D), dtype, device="meta" if bad == "vdevice" else "cpu")
    mask_case = draw(st.sampled_from(("none", "none", "bool", "additive", "bad_shape", "bad_dtype", "list")))
    mask = {"bool": Spec((1, 1, S, T), torch.bool), "additive": Spec((B, 1, S, T), dtype),
            "bad_shape": Spec((B, 1, S + 1, T), torch.bool), "bad_dtype": Spec((S, T), torch.int32),
            "list": [[True]]}.get(mask_case)
    scale = draw(st.sampled_from((None, None, 0.3, float("nan"))))
    return tuple(map(materialise, (q, k, v, mask))), dict(is_causal=draw(st.booleans()), scale=scale)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(prefill_cases())
def test_prefill_attention(case):
    """Bad input gets a TypeError / ValueError; good input SDPA's answer: exactly where SDPA computes it (a
    mask), within the low-precision rule of fp64 SDPA where the default backend's kernel does (no mask)."""
    (q, k, v, mask), kwargs = case
    try:
        out = prefill_attention(q, k, v, mask, **kwargs)
    except Exception as exc:  # noqa: BLE001
        assert_clean_error(exc, INTERNAL_OVERLAP_MESSAGE)
        return
    # SDPA's answer; fp16 on a CPU without native fp16 dot products: fp32 SDPA's, rounded once (the op's rule)
    widen = q.dtype == torch.float16 and q.device.type == "cpu" and cpu_fp16_sdpa_widens()
    wide = (lambda t: t.float() if t is not None and t.dtype != torch.bool else t) if widen else (lambda t: t)
    expect = torch.nn.functional.scaled_dot_product_attention(wide(q), wide(k), wide(v), attn_mask=wide(mask),
                                            scale=kwargs["scale"],
                                            is_causal=kwargs["is_causal"] and mask is None and q.shape[2] > 1,
                                            enable_gqa=k.shape[1] != q.shape[1]).to(q.dtype)
    assert torch.equal(out.isnan(), expect.isnan())
    if mask is not None or dispatch("prefill_attention", "auto", q.device) is prefill_attention_ref:
        torch.testing.assert_close(out, expect, equal_nan=True)
        return
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), scale=kwargs["scale"], is_causal=kwargs["is_causal"] and q.shape[2] > 1,
        enable_gqa=k.shape[1] != q.shape[1])
    assert_close_to_ref(out, exact, expect, atol_for("prefill_attention", q.dtype, exact))
