"""The C++ backend plugin (``fastlm._C``): the thin Python entry points of the ``fastlm::`` C++ ops.

Importing this module imports ``fastlm._C``, which registers the ``TORCH_LIBRARY(fastlm)`` schemas
(csrc/op_list.h) and their CPU kernels (plus CUDA kernels when the build has them). If the extension
is not built (or cannot load), the import raises ImportError and the backend reports itself unavailable.
The plugin interface (``status``, ``KERNELS``, ``LIBRARY_OPS``, one function per op) is described in
fastlm/ops/_registry.py; each op's fake lives with its declaration in fastlm/ops.

The entry points keep the references' signatures. Eager, they call ``fastlm._C.call_<op>``: the op
through the dispatcher, unboxed, as ATen's own bindings call it; under torch.compile, the
``OpOverload`` (``torch.ops.fastlm.<op>.default``). The C++ ops check their arguments themselves
(csrc/checks.h: a kernel never reads out of bounds, whoever calls it), with the public ops' messages.
``add_*_norm`` ops return an empty ``h`` when ``residual`` is None (a functional op may not return an
alias of its input); the entry points return ``x`` there, as the references do.
"""
from __future__ import annotations

import inspect
import platform

import torch



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


def _kernel_devices() -> dict[str, tuple[str, ...]]:
    """op -> the device types fastlm._C registered a kernel for, read off the dispatcher: the C++ op list
    (csrc/op_list.h) is the one place that says which op has a CPU and which a CUDA kernel."""
    found = {}
    for qualname in torch._C._dispatch_get_all_op_names():
        namespace, _, op = qualname.partition("::")
        if namespace != "fastlm" or not hasattr(_C, f"call_{op}"):  # (fastlm::triton_* ops are Triton's)
            continue
        found[op] = tuple(d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                          if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    return found


KERNELS = _kernel_devices()
LIBRARY_OPS = {op: f"fastlm::{op}" for op in KERNELS}


# ---------------------------------------------------------------------------------------------------
# Entry points (signatures of the references).

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


def add_rms_norm(x, residual, weight, eps: float, weight_in_fp32: bool = False):
    y, h = (_add_rms_norm if _is_compiling() else _add_rms_norm_eager)(x, residual, weight, eps, weight_in_fp32)
    return y, (x if residual is None else h)


def add_layer_norm(x, residual, weight, bias, eps: float):
    y, h = (_add_layer_norm if _is_compiling() else _add_layer_norm_eager)(x, residual, weight, bias, eps)
    return y, (x if residual is None else h)


def qkv_rope(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads: int,
             num_kv_heads: int, head_dim: int, rotary_dim: int, interleaved: bool, qkv_head_major: bool,
             qk_norm_eps: float):
    return (_qkv_rope if _is_compiling() else _qkv_rope_eager)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, num_heads, num_kv_heads, head_dim,
        rotary_dim, interleaved, qkv_head_major, qk_norm_eps)


def qkv_rope_cache(qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache,
                   cache_positions, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                   interleaved: bool, qkv_head_major: bool, qk_norm_eps: float):
    return (_qkv_rope_cache if _is_compiling() else _qkv_rope_cache_eager)(
        qkv, cos, sin, q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, k_cache, v_cache, cache_positions,
        num_heads, num_kv_heads, head_dim, rotary_dim, interleaved, qkv_head_major, qk_norm_eps)


def swiglu(gate_up):
    return (_swiglu if _is_compiling() else _swiglu_eager)(gate_up)


def relu2(x):
    return (_relu2 if _is_compiling() else _relu2_eager)(x)


def swiglu_(gate_up):
    (_swiglu_inplace if _is_compiling() else _swiglu_inplace_eager)(gate_up)
    return gate_up[..., : gate_up.shape[-1] // 2]


def relu2_(x):
    (_relu2_inplace if _is_compiling() else _relu2_inplace_eager)(x)
    return x


def decode_attention(q, k_cache, v_cache, lengths, scale: float):
    return (_decode_attention if _is_compiling() else _decode_attention_eager)(q, k_cache, v_cache, lengths, scale)


def linear(x, weight, bias=None, residual=None):
    return (_linear if _is_compiling() else _linear_eager)(x, weight, bias, residual)


def _entry_point(op: str):
    """The entry point of an op whose C++ op returns what its reference returns, with the reference's
    positional arguments: the op list's ops need no hand-written line here (those above adapt a result:
    the norms' empty h, the in-place ops' view, or spell the arguments out to save the *args packing)."""
    overload, eager = getattr(_ops, op).default, getattr(_C, f"call_{op}")

    def run(*args):
        return (overload if _is_compiling() else eager)(*args)

    run.__name__ = run.__qualname__ = op
    # what inspect.signature reports: the reference's parameters (the schema's names), positional as run takes them
    run.__signature__ = inspect.Signature([inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_ONLY)
                                           for a in overload._schema.arguments])
    return run


for _op in KERNELS:
    if _op not in globals():
        globals()[_op] = _entry_point(_op)

# The eager calls themselves where an entry point only chooses between them and the OpOverload (every op but
# the norms and the in-place activations, whose entry points adapt the result): for fastlm.ops._registry's
# dispatch_eager, which the engine's eager decode step binds once per call.
EAGER_KERNELS = {op: getattr(_C, f"call_{op}") for op in KERNELS
                 if op not in ("add_rms_norm", "add_layer_norm", "swiglu_", "relu2_")}
