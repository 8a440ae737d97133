"""The ``kernels`` suite: each fused op at each family's layer (fastlm.bench.configs), against its
``*_ref`` composition (``eager``), ``torch.compile`` of it (``compile``) and each fastlm backend's
implementation as patch() calls it, without the public op's argument checks (``fastlm-<backend>``).
Providers time the same inputs; bytes moved count each input read once and each output written once."""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from fastlm import ops
from fastlm.bench import configs
from fastlm.bench.backends import discover, timed_backend
from fastlm.bench.suite import Built, Suite, Unavailable, snapshot
from fastlm.ops.activations import relu2_ref, swiglu_ref
from fastlm.ops.attention import prefill_attention_ref
from fastlm.ops.layer_norm import add_layer_norm_ref
from fastlm.ops.projection import linear_ref
from fastlm.ops.qkv import qkv_rope_cache_ref, qkv_rope_ref
from fastlm.ops.rms_norm import add_rms_norm_ref

QUICK_COMPILE_SKIP = ("skipped in --quick: torch.compile is measured on the prefill shape only (compiling every "
                      "decode shape takes minutes on CPU); run without --quick")
# At decode every projection streams its weight from memory: each call takes the next of enough copies
# to fill this much memory, so that no call finds its weight in a cache.
LINEAR_WEIGHT_SET_BYTES = 256 * 2**20
LINEAR_MAX_COPIES = 64


@dataclass(frozen=True)
class Step:
    name: str
    batch: int
    tokens: int

    @property
    def decode(self) -> bool:
        return self.tokens == 1


def steps(scale: str) -> list[Step]:
    if scale == "tiny":
        return [Step("prefill-T8", 1, 8), Step("decode-B2", 2, 1)]
    prefill = [Step("prefill-T512", 1, 512)] + ([Step("prefill-T2048", 1, 2048)] if scale == "full" else [])
    return prefill + [Step("decode-B1", 1, 1), Step("decode-B8", 8, 1)]


@dataclass
class Bound:
    """One case's inputs on a device."""
    ref: Callable                                     # the *_ref function (compiled for ``compile``)
    call: Callable[[Callable], Callable[[], object]]  # fn -> zero-arg call of fn on the inputs
    nbytes: int
    # fn -> zero-arg call of a backend's implementation (what patch() runs, with the reference's signature)
    # on the inputs, when that differs from ``call`` (in-place ops: each backend its own copy)
    kernel: Callable[[Callable], Callable[[], object]] | None = None


def _on(*args) -> Callable[[Callable], Callable[[], object]]:
    return lambda fn: (lambda: fn(*args))


@dataclass(eq=False)
class KernelCase:
    op: str                  # the fastlm op (its registry key)
    variant: str             # family, option or projection
    step: Step
    layer: configs.Layer
    scale: str
    make: Callable[["KernelCase", torch.device, torch.dtype], Bound]  # builds the inputs
    projection: configs.Projection | None = None  # linear: which of the layer's GEMMs

    @property
    def name(self) -> str:
        return f"{self.op}[{self.variant}]/{self.step.name}"

    @property
    def group(self) -> str:
        return f"{self.op}[{self.variant}]"

    @property
    def shape(self) -> str:
        return self.step.name


def _randn(shape, dtype, device, g, scale=1.0):
    # generated on CPU for reproducibility, then moved
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _build_rms(case: KernelCase, device, dtype) -> Bound:
    s, B, T = case.layer, case.step.batch, case.step.tokens
    g = torch.Generator().manual_seed(0)
    x, res = _randn((B, T, s.hidden), dtype, device, g), _randn((B, T, s.hidden), dtype, device, g)
    w = _randn((s.hidden,), dtype, device, g, 0.1) + 1
    args = (x, res, w, s.norm_eps, s.rms_weight_in_fp32)
    return Bound(add_rms_norm_ref, _on(*args), 4 * _nbytes(x) + _nbytes(w))


def _build_ln(case: KernelCase, device, dtype) -> Bound:
    s, B, T = case.layer, case.step.batch, case.step.tokens
    g = torch.Generator().manual_seed(1)
    x, res = _randn((B, T, s.hidden), dtype, device, g), _randn((B, T, s.hidden), dtype, device, g)
    w, bias = _randn((s.hidden,), dtype, device, g, 0.1) + 1, _randn((s.hidden,), dtype, device, g, 0.1)
    args = (x, res, w, bias, s.norm_eps)
    return Bound(add_layer_norm_ref, _on(*args), 4 * _nbytes(x) + _nbytes(w, bias))


def _qkv_inputs(case: KernelCase, device, dtype):
    a, B, T = case.layer.attention, case.step.batch, case.step.tokens
    H, Hkv, D, r = a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim
    g = torch.Generator().manual_seed(2)
    qkv = _randn((B, T, (H + 2 * Hkv) * D), dtype, device, g)
    # HF-style tables: cat(freqs, freqs) at random positions
    pos = torch.randint(0, 4096, (B, T), generator=g).float()
    freqs = pos[..., None] / (10000 ** (torch.arange(0, r, 2).float() / max(r, 1)))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    norm = {}
    if a.qk_norm == "per_head":
        norm = dict(q_norm_weight=_randn((H, D), dtype, device, g, 0.1) + 1,
                    k_norm_weight=_randn((Hkv, D), dtype, device, g, 0.1) + 1)
    elif a.qk_norm == "shared":
        norm = dict(q_norm_weight=_randn((D,), dtype, device, g, 0.1) + 1,
                    q_norm_bias=_randn((D,), dtype, device, g, 0.1),
                    k_norm_weight=_randn((D,), dtype, device, g, 0.1) + 1,
                    k_norm_bias=_randn((D,), dtype, device, g, 0.1))
    static = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, rotary_dim=r, interleaved=a.interleaved,
                  qkv_head_major=a.qkv_head_major, qk_norm_eps=a.qk_norm_eps)
    norm_args = tuple(norm.get(k) for k in ("q_norm_weight", "q_norm_bias", "k_norm_weight", "k_norm_bias"))
    nbytes = 2 * _nbytes(qkv) + 2 * B * T * (r // 2) * qkv.element_size() + _nbytes(*norm.values())
    return (qkv, cos, sin), norm, norm_args, static, nbytes


def _build_qkv(case: KernelCase, device, dtype) -> Bound:
    tensors, norm, norm_args, st, nbytes = _qkv_inputs(case, device, dtype)
    return Bound(qkv_rope_ref, _on(*tensors, *norm_args, *st.values()), nbytes)


def _build_qkv_cache(case: KernelCase, device, dtype) -> Bound:
    tensors, norm, norm_args, st, nbytes = _qkv_inputs(case, device, dtype)
    B, T = case.step.batch, case.step.tokens
    t_max = 256 if case.layer.hidden > 256 else 16
    kc = torch.zeros(B, st["num_kv_heads"], t_max, st["head_dim"], device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    g = torch.Generator().manual_seed(3)
    positions = (torch.randint(0, t_max - T, (B, 1), generator=g) + torch.arange(T).view(1, T)).to(device)
    caches = (kc, vc, positions)
    return Bound(qkv_rope_cache_ref, _on(*tensors, *norm_args, *caches, *st.values()), nbytes + _nbytes(positions))


def _build_swiglu(case: KernelCase, device, dtype) -> Bound:
    B, T, I = case.step.batch, case.step.tokens, case.layer.intermediate
    gu = _randn((B, T, 2 * I), dtype, device, torch.Generator().manual_seed(4))
    return Bound(swiglu_ref, _on(gu), 3 * B * T * I * gu.element_size())


def _relu2_input(case: KernelCase, device, dtype) -> torch.Tensor:
    B, T, I = case.step.batch, case.step.tokens, case.layer.intermediate
    return _randn((B, T, I), dtype, device, torch.Generator().manual_seed(5))


def _build_relu2(case: KernelCase, device, dtype) -> Bound:
    x = _relu2_input(case, device, dtype)
    return Bound(relu2_ref, _on(x), 2 * _nbytes(x))


def _in_place(x):
    """Each backend times its own copy of ``x``, which every call overwrites."""
    return lambda fn: (lambda w: (lambda: fn(w)))(x.clone())


def _build_swiglu_inplace(case: KernelCase, device, dtype) -> Bound:
    """swiglu_ as the fused MLP calls it, on its GEMM output, against the composition it replaces (HF's
    out-of-place silu(gate) * up, on the same input). Every call overwrites the input, so the input is a
    fixed point: gate in [-2, -0.05], up = 1 + exp(-gate) makes silu(gate) * up = gate, and the map
    contracts there (derivative 1 + gate * sigmoid(-gate) in (-1, 1)), so rounding does not drift.
    Random data would decay into denormals within a few dozen calls, which slow exp ~1.5x on this CPU
    and are not what a GEMM output holds."""
    B, T, I = case.step.batch, case.step.tokens, case.layer.intermediate
    gate = torch.rand((B, T, I), generator=torch.Generator().manual_seed(4)) * -1.95 - 0.05
    gu = torch.cat([gate, 1 + torch.exp(-gate)], dim=-1).to(device=device, dtype=dtype)
    return Bound(swiglu_ref, _on(gu), 3 * B * T * I * gu.element_size(), kernel=_in_place(gu))


def _build_relu2_inplace(case: KernelCase, device, dtype) -> Bound:
    """relu2_ as the fused MLP calls it, against HF's out-of-place relu then square on the same input.
    Repeated calls drive every element to 0 or inf within the warm-up calls (no denormals after), and
    max / multiply cost the same on those."""
    x = _relu2_input(case, device, dtype)
    return Bound(relu2_ref, _on(x), 2 * _nbytes(x), kernel=_in_place(x))


def _build_linear(case: KernelCase, device, dtype) -> Bound:
    """A layer's projection as the fused modules call ``linear`` at decode: a few rows of x against the
    whole weight (the residual add folded in for the MLP's down projection)."""
    p, B, T = case.projection, case.step.batch, case.step.tokens
    g = torch.Generator().manual_seed(7)
    weight = _randn((p.out_features, p.in_features), dtype, device, g, p.in_features ** -0.5)
    copies = min(LINEAR_MAX_COPIES, max(1, math.ceil(LINEAR_WEIGHT_SET_BYTES / _nbytes(weight))))
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    x = _randn((B, T, p.in_features), dtype, device, g)
    bias = _randn((p.out_features,), dtype, device, g, 0.1) if p.bias else None
    residual = _randn((B, T, p.out_features), dtype, device, g) if p.residual else None

    def call(fn):
        cycle = itertools.cycle(weights)  # each caller starts at the first copy
        return lambda: fn(x, next(cycle), bias, residual)

    return Bound(linear_ref, call, _nbytes(weight, x, bias, residual) + B * T * p.out_features * x.element_size())


def _build_prefill_attention(case: KernelCase, device, dtype) -> Bound:
    """Causal prefill attention as the engine calls it: q, k and v views of [B, T, heads, D] (what the QKV
    epilogue and the cache hold), against SDPA (its reference, the fp32 widening for fp16 included)."""
    a, B, T = case.layer.attention, case.step.batch, case.step.tokens
    g = torch.Generator().manual_seed(11)
    q, k, v = (_randn((B, T, h, a.head_dim), dtype, device, g).transpose(1, 2)
               for h in (a.num_heads, a.num_kv_heads, a.num_kv_heads))
    return Bound(prefill_attention_ref, _on(q, k, v, True, a.head_dim ** -0.5), 2 * _nbytes(q) + _nbytes(k, v))


def _layer_cases(layer: configs.Layer, step: Step, scale: str) -> list[KernelCase]:
    """The family's norm (RMS with its cast order, or LayerNorm), its QKV epilogue (plus the cache-writing
    twin at decode, causal prefill attention beyond), its MLP activation out of place and in place
    (``relu2_`` always, ``swiglu_`` beyond decode sizes, as fastlm.modules.mlp calls them), and at decode
    each projection (``linear``)."""
    v = layer.variant
    ops_ = [("add_rms_norm", f"{v}:" + ("w-fp32" if layer.rms_weight_in_fp32 else "w-after-cast"), _build_rms)
            if layer.norm == "rms" else ("add_layer_norm", v, _build_ln), ("qkv_rope", v, _build_qkv)]
    if step.decode:
        ops_.append(("qkv_rope_cache", v, _build_qkv_cache))
    else:
        ops_.append(("prefill_attention", v, _build_prefill_attention))
    if layer.mlp.activation == "silu":
        ops_.append(("swiglu", v, _build_swiglu))
        if not step.decode:
            ops_.append(("swiglu_", v, _build_swiglu_inplace))
    elif layer.mlp.activation == "relu2":
        ops_ += [("relu2", v, _build_relu2), ("relu2_", v, _build_relu2_inplace)]
    cases = [KernelCase(op, variant, step, layer, scale, make) for op, variant, make in ops_
             if layer.only_ops is None or op in layer.only_ops]
    if step.decode and layer.only_ops is None:
        cases += [KernelCase("linear", f"{v}:{p.name}", step, layer, scale, _build_linear, p)
                  for p in layer.projections]
    return cases


def kernel_cases(scale: str = "quick") -> list[KernelCase]:
    return [c for step in steps(scale) for layer in configs.layers(scale) for c in _layer_cases(layer, step, scale)]


_COMPILED: dict = {}


def compiled(fn):
    if fn not in _COMPILED:
        import torch._dynamo.config as dcfg

        for knob in ("recompile_limit", "cache_size_limit"):  # many shapes and static args per ref
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 256))
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


class Kernels(Suite):
    name = "kernels"
    compiling = ("compile",)

    def __init__(self):
        self._last = None  # (case, device, dtype, bound, eager output): shared by the case's providers

    def cases(self, scale, device=None):
        return kernel_cases(scale)

    def providers(self, device_type):
        return ["eager", "compile"] + [f"fastlm-{b.name}" for b in discover(device_type, include_torch=False)]

    def _inputs(self, case, device, dtype):
        if self._last is None or self._last[:3] != (case, device, dtype):
            self._last = None  # free the previous case's tensors first
            bound = case.make(case, device, dtype)
            self._last = (case, device, dtype, bound, snapshot(bound.call(bound.ref)()))
        return self._last[3], self._last[4]

    def build(self, case, provider, device, dtype):
        device = torch.device(device)
        if provider == "compile" and case.scale == "quick" and case.step.decode:
            raise Unavailable(QUICK_COMPILE_SKIP)
        backend = timed_backend(provider, device.type, case.op) if provider.startswith("fastlm-") else None
        bound, expected = self._inputs(case, device, dtype)
        if provider == "eager":
            return Built(bound.call(bound.ref), bound.nbytes)
        if provider == "compile":
            fn = bound.call(compiled(bound.ref))
            t0 = time.perf_counter()
            fn()
            return Built(fn, bound.nbytes, note=f"first call (compile) {time.perf_counter() - t0:.1f}s")
        if backend is None:
            raise Unavailable(f"unknown kernels provider {provider!r}")
        return Built((bound.kernel or bound.call)(ops.impl(case.op, backend, device.type)), bound.nbytes,
                     expected=lambda: expected)
