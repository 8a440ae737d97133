"""The C++ backend (``fastlm._C``): fake (meta) implementations of the ``fastlm::`` C++ ops and the
thin Python entry points that fastlm's dispatch table calls.

Importing this module imports ``fastlm._C``, which registers the ``TORCH_LIBRARY(fastlm)`` schemas
and their CPU kernels (plus CUDA kernels when the build has them). If the extension is not built (or
cannot load), the import raises ImportError and the backend reports itself unavailable.

The entry points keep the ``*_ref`` signatures. Eager, they call ``fastlm._C.call_<op>``: the op
through the dispatcher, unboxed, as ATen's own bindings call it; under torch.compile, the
``OpOverload`` (``torch.ops.fastlm.<op>.default``). Those registered with ``checks_args`` leave the
argument checks to the C++ op (csrc/checks.h raises the Python checks' TypeError / ValueError), so
the public op skips its own. ``add_*_norm`` ops return an empty ``h`` when ``residual`` is None (a functional op
may not return an alias of its input); the wrappers return ``x`` there, as the references do.
"""
from __future__ import annotations

import platform

import torch

from fastlm.ops._backend import register
from fastlm.ops._checks import check_norm_args, check_same


def _check_cpu_isa() -> None:
    # An x86-64 build targets one SIMD level (setup.py: FASTLM_CPU_ISA, auto-detected on the building
    # machine) and must not even be loaded on a CPU without it: its static initialisers may already
    # use those instructions. Only a build copied to another machine can hit this.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        from fastlm import _build_config as cfg
        built_for = cfg.CPU_ISA + ("+bf16" if getattr(cfg, "AVX512_BF16", False) else "")
    except ImportError:  # a build from before the ISA was recorded: it targets avx2
        built_for = "avx2"
    probes = {"avx2": ["_is_avx2_supported"], "avx512": ["_is_avx512_supported"],
              "avx512+bf16": ["_is_avx512_supported", "_is_avx512_bf16_supported"]}.get(built_for, [])
    checks = [getattr(torch.cpu, p, None) for p in probes]
    if any(c is not None and not c() for c in checks):
        import os

        if os.environ.get("FASTLM_CPP_ALLOW_ISA_MISMATCH") != "1":
            raise ImportError(f"this CPU lacks {built_for.upper()}, which fastlm._C was built for; rebuild "
                              f"fastlm on this machine (FASTLM_CPU_ISA=auto picks what it supports)")


_check_cpu_isa()

import fastlm._C as _C  # noqa: E402  (raises ImportError when the extension is not built)

_HAS_CUDA = bool(_C.has_cuda_kernels())
CPU_ISA = _C.cpu_isa()
_ops = torch.ops.fastlm


def status(device_type: str) -> tuple[bool, str]:
    if device_type == "cpu":
        return True, f"C++ CPU kernels (fastlm._C, {CPU_ISA})"
    if device_type == "cuda":
        if _HAS_CUDA:
            return True, "CUDA C++ kernels (fastlm._C)"
        return False, ("fastlm._C was built without CUDA kernels (CPU-only torch, no nvcc, or "
                       "FASTLM_SKIP_CUDA_BUILD=1)")
    return False, f"fastlm._C has no kernels for device type {device_type!r}"


# ---------------------------------------------------------------------------------------------------
# Fake implementations: shapes/dtypes only (torch.compile, FakeTensor, meta).
#
# The dispatcher runs them also for a call mixing meta and real tensors (a meta weight beside a CPU x:
# the Meta key outranks CPU), where the C++ kernel and its checks never run; so each first checks that
# its tensor arguments share the first one's device, raising the C++ checks' ValueError. The norms,
# whose public ops leave every check to the C++ op (checks_args), run the Python twin of its checks
# (same errors, same order).


def _same_device(ref_name, ref, **tensors):
    for name, t in tensors.items():
        check_same(name, t, ref, ref_name, dtype=False)


def _norm_fake(x, residual):
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty((0,))
    return h


@torch.library.register_fake("fastlm::add_rms_norm")
def _(x, residual, weight, eps, weight_in_fp32=False):
    check_norm_args(x, residual, {"weight": weight}, eps, params_dtype=False)
    dtype = x.dtype if weight_in_fp32 else torch.promote_types(x.dtype, weight.dtype)
    return torch.empty(x.shape, dtype=dtype, device=x.device), _norm_fake(x, residual)


@torch.library.register_fake("fastlm::add_layer_norm")
def _(x, residual, weight, bias, eps):
    check_norm_args(x, residual, {"weight": weight, "bias": bias}, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format), _norm_fake(x, residual)


@torch.library.register_fake("fastlm::qkv_rope")
def _(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads, num_kv_heads, head_dim,
      rotary_dim, interleaved, per_head_layout, qk_norm_eps):
    _same_device("qkv", qkv, cos=cos, sin=sin, q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias,
                 k_norm_weight=k_norm_weight, k_norm_bias=k_norm_bias)
    B, S = qkv.shape[0], qkv.shape[1]
    return (qkv.new_empty((B, num_heads, S, head_dim)), qkv.new_empty((B, num_kv_heads, S, head_dim)),
            qkv.new_empty((B, num_kv_heads, S, head_dim)))


@torch.library.register_fake("fastlm::qkv_rope_cache")
def _(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache, cache_positions,
      num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, per_head_layout, qk_norm_eps):
    _same_device("qkv", qkv, cos=cos, sin=sin, q_norm_weight=q_norm_weight, q_norm_bias=q_norm_bias,
                 k_norm_weight=k_norm_weight, k_norm_bias=k_norm_bias, k_cache=k_cache, v_cache=v_cache,
                 cache_positions=cache_positions)
    return qkv.new_empty((qkv.shape[0], num_heads, qkv.shape[1], head_dim))


@torch.library.register_fake("fastlm::swiglu")
def _(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.register_fake("fastlm::relu2")
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlm::swiglu_")
def _(gate_up):
    return None


@torch.library.register_fake("fastlm::relu2_")
def _(x):
    return None


@torch.library.register_fake("fastlm::decode_attention")
def _(q, k_cache, v_cache, lengths, scale):
    _same_device("q", q, k_cache=k_cache, v_cache=v_cache, lengths=lengths)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastlm::linear")
def _(x, weight, bias=None, residual=None):
    _same_device("x", x, weight=weight, bias=bias, residual=residual)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("fastlm::quant_linear")
def _(x, qweight, scales, bias, residual, bits, group_size):
    _same_device("x", x, qweight=qweight, scales=scales, bias=bias, residual=residual)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


# ---------------------------------------------------------------------------------------------------
# Entry points for fastlm's dispatch table (signatures of the *_ref functions).

# Each op twice: the OpOverload (torch.ops.fastlm.<op>.default), which torch.compile traces through its
# fake implementation, and fastlm._C.call_<op> (csrc/ops.cpp, DispatchCall), which eager calls use: the
# same op through the same dispatcher, without the OpOverload's Python boxing of every argument (~2 us
# a call, as much as a decode-sized kernel: at B=1 it decided whether add + LayerNorm beat eager).
_is_compiling = torch.compiler.is_compiling
_add_rms_norm, _add_rms_norm_eager = _ops.add_rms_norm.default, _C.call_add_rms_norm
_add_layer_norm, _add_layer_norm_eager = _ops.add_layer_norm.default, _C.call_add_layer_norm
_qkv_rope, _qkv_rope_eager = _ops.qkv_rope.default, _C.call_qkv_rope
_qkv_rope_cache, _qkv_rope_cache_eager = _ops.qkv_rope_cache.default, _C.call_qkv_rope_cache
_swiglu, _swiglu_eager = _ops.swiglu.default, _C.call_swiglu
_relu2, _relu2_eager = _ops.relu2.default, _C.call_relu2
_swiglu_inplace, _swiglu_inplace_eager = _ops.swiglu_.default, _C.call_swiglu_
_relu2_inplace, _relu2_inplace_eager = _ops.relu2_.default, _C.call_relu2_
_decode_attention, _decode_attention_eager = _ops.decode_attention.default, _C.call_decode_attention
_linear, _linear_eager = _ops.linear.default, _C.call_linear
_quant_linear, _quant_linear_eager = _ops.quant_linear.default, _C.call_quant_linear


@register("add_rms_norm", "cpp", checks_args=True)
def add_rms_norm_cpp(x, residual, weight, eps: float, weight_in_fp32: bool = False):
    y, h = (_add_rms_norm if _is_compiling() else _add_rms_norm_eager)(x, residual, weight, eps, weight_in_fp32)
    return y, (x if residual is None else h)


@register("add_layer_norm", "cpp", checks_args=True)
def add_layer_norm_cpp(x, residual, weight, bias, eps: float):
    y, h = (_add_layer_norm if _is_compiling() else _add_layer_norm_eager)(x, residual, weight, bias, eps)
    return y, (x if residual is None else h)


@register("qkv_rope", "cpp", checks_args=True)
def qkv_rope_cpp(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads: int,
                 num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, per_head_layout: bool,
                 qk_norm_eps: float):
    return (_qkv_rope if _is_compiling() else _qkv_rope_eager)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads, num_kv_heads, head_dim,
        rotary_dim, interleaved, per_head_layout, qk_norm_eps)


@register("qkv_rope_cache", "cpp", checks_args=True)
def qkv_rope_cache_cpp(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                       cache_positions, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                       interleaved: bool, per_head_layout: bool, qk_norm_eps: float):
    return (_qkv_rope_cache if _is_compiling() else _qkv_rope_cache_eager)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache, cache_positions,
        num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, per_head_layout, qk_norm_eps)


@register("swiglu", "cpp", checks_args=True)
def swiglu_cpp(gate_up):
    return (_swiglu if _is_compiling() else _swiglu_eager)(gate_up)


@register("relu2", "cpp", checks_args=True)
def relu2_cpp(x):
    return (_relu2 if _is_compiling() else _relu2_eager)(x)


@register("swiglu_", "cpp", checks_args=True)
def swiglu_inplace_cpp(gate_up):
    (_swiglu_inplace if _is_compiling() else _swiglu_inplace_eager)(gate_up)
    return gate_up[..., : gate_up.shape[-1] // 2]


@register("relu2_", "cpp", checks_args=True)
def relu2_inplace_cpp(x):
    (_relu2_inplace if _is_compiling() else _relu2_inplace_eager)(x)
    return x


@register("decode_attention", "cpp")
def decode_attention_cpp(q, k_cache, v_cache, lengths, scale: float):
    if q.device.type != "cpu":
        # No CUDA C++ decode kernel yet: the CUDA build covers norms, the QKV epilogue and the MLP
        # epilogues; decode attention on CUDA goes to the reference (Triton has its own kernel).
        from fastlm.ops.attention import decode_attention_ref

        return decode_attention_ref(q, k_cache, v_cache, lengths, scale)
    return (_decode_attention if _is_compiling() else _decode_attention_eager)(q, k_cache, v_cache, lengths, scale)


@register("linear", "cpp")
def linear_cpp(x, weight, bias=None, residual=None):
    if x.device.type != "cpu":  # CPU kernel only: on CUDA, cuBLAS through the reference
        from fastlm.ops.linear import linear_ref

        return linear_ref(x, weight, bias, residual)
    return (_linear if _is_compiling() else _linear_eager)(x, weight, bias, residual)


@register("quant_linear", "cpp")
def quant_linear_cpp(x, qweight, scales, bias, residual, bits: int, group_size: int):
    if x.device.type != "cpu":  # CPU kernel only: on CUDA the reference (the Triton backend has a kernel)
        from fastlm.ops.quant_linear import quant_linear_ref

        return quant_linear_ref(x, qweight, scales, bias, residual, bits, group_size)
    return (_quant_linear if _is_compiling() else _quant_linear_eager)(x, qweight, scales, bias, residual, bits,
                                                                         group_size)
