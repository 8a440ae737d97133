"""Backend registry and dispatch for fastlm's fused ops.

Every op has a plain-PyTorch reference (backend ``torch``) and up to two kernel backends:
``triton`` (``fastlm.kernels``; CUDA tensors with compiled kernels, never the interpreter, or CPU
tensors under ``TRITON_INTERPRET=1``) and
``cpp`` (``fastlm._C``: C++ CPU kernels, plus CUDA C++ kernels when built with CUDA).

Backend modules register implementations with :func:`register`; they are imported lazily the first
time a backend is asked for, so ``import fastlm`` never pays for (or fails on) an optional backend.
``auto`` picks per device type: CUDA -> triton, then cpp, then torch; CPU -> cpp, then torch. It warns
once per (device type) when it has to fall back to the reference. ``FASTLM_BACKEND`` overrides
``auto`` (not an explicit choice).
"""
from __future__ import annotations

import importlib
import os
import sys
from os import environ as _environ
import warnings
from typing import Callable

import torch

from fastlm.errors import BackendUnavailableError  # noqa: F401  (re-exported by fastlm.ops)

BACKENDS = ("torch", "triton", "cpp")
BACKEND_CHOICES = ("auto",) + BACKENDS

# op name -> backend name -> implementation (same signature as the op's public function, minus backend)
_IMPLS: dict[str, dict[str, Callable]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()
_AUTO_CACHE: dict[str, str] = {}
# (op, requested backend, device, FASTLM_BACKEND for auto) -> the concrete backend's implementation; the
# hot path of every op call (decode on CPU pays for each microsecond), filled on first use.
_DISPATCH_CACHE: dict[tuple, Callable] = {}
_BACKEND_MODULES = {"triton": "fastlm.kernels", "cpp": "fastlm.ops._cpp"}


def register(op: str, backend: str, *, checks_args: bool = False):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``. ``checks_args``: ``fn``
    raises the public op's errors itself (same exception types, each naming the argument), so the
    public op skips its Python checks (~2-3 us a call, felt at decode sizes); read back as
    ``fn.checks_args``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def wrap(fn):
        fn.checks_args = checks_args
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def _load(backend: str) -> None:
    if backend in _LOADED or backend == "torch":
        return
    _LOADED.add(backend)
    try:
        importlib.import_module(_BACKEND_MODULES[backend])
    except Exception as exc:  # ImportError, missing toolchain, broken build: all mean "unavailable"
        _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"


def backend_status(backend: str, device_type: str = "cpu") -> tuple[bool, str]:
    """(available, reason) for ``backend`` on tensors of ``device_type``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_CHOICES}")
    if backend == "torch":
        return True, "plain PyTorch reference, always available"
    _load(backend)
    if backend in _LOAD_ERRORS:
        return False, f"{_BACKEND_MODULES[backend]} failed to import ({_LOAD_ERRORS[backend]})"
    if backend == "triton":
        # Whether the kernels were decorated for the interpreter (TRITON_INTERPRET as it was at import)
        interpreted = getattr(sys.modules.get(_BACKEND_MODULES["triton"]), "INTERPRET", False)
        if device_type == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1" or not interpreted):
            return False, ("Triton kernels need a CUDA device; on CPU tensors they run only under "
                           "TRITON_INTERPRET=1 (set before triton is imported)")
        if device_type not in ("cpu", "cuda"):
            return False, f"Triton backend does not support device type {device_type!r}"
        if device_type == "cuda" and interpreted:
            # The interpreter copies every storage a kernel touches to the host and back per launch (the
            # whole KV cache), which also breaks CUDA-graph capture: never for CUDA tensors.
            return False, ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when triton "
                           "was imported), which is never used for CUDA tensors; unset TRITON_INTERPRET")
        return True, "Triton kernels" + (" (interpreter)" if device_type == "cpu" else "")
    # cpp
    from fastlm.ops import _cpp

    return _cpp.status(device_type)


def resolve(backend: str, device_type: str) -> str:
    """Turn a requested backend (possibly ``auto``) into a concrete, available one."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_CHOICES}")
    if backend == "auto":
        env = os.environ.get("FASTLM_BACKEND", "").strip()
        if env and env != "auto":
            return resolve(env, device_type)
        if device_type in _AUTO_CACHE:
            return _AUTO_CACHE[device_type]
        order = ("triton", "cpp") if device_type == "cuda" else ("cpp",)
        chosen, reasons = "torch", []
        for cand in order:
            ok, why = backend_status(cand, device_type)
            if ok:
                chosen = cand
                break
            reasons.append(f"{cand}: {why}")
        if chosen == "torch":
            warnings.warn(
                "fastlm: no kernel backend is available for "
                f"{device_type} tensors, falling back to the plain PyTorch reference ("
                + "; ".join(reasons) + "). Run `python -m fastlm info` for details.",
                RuntimeWarning,
                stacklevel=3,
            )
        _AUTO_CACHE[device_type] = chosen
        return chosen
    ok, why = backend_status(backend, device_type)
    if not ok:
        raise BackendUnavailableError(f"fastlm backend {backend!r} is unavailable for {device_type} tensors: {why}")
    return backend


def has_impl(op: str, backend: str) -> bool:
    """Whether ``backend`` has its own implementation of ``op`` (not the reference fallback)."""
    _load(backend)
    return backend in _IMPLS.get(op, {})


def impl(op: str, backend: str) -> Callable:
    """The implementation of ``op`` for a concrete backend (the reference when the backend lacks it)."""
    _load(backend)
    table = _IMPLS.get(op, {})
    fn = table.get(backend)
    if fn is None:
        fn = table["torch"]
    return fn


# FASTLM_BACKEND as os.environ holds it, read from os.environ's own dict where it has one: the
# mapping's get() encodes the key on every call (~0.6 us here, a decode-sized kernel's worth).
try:
    _ENV_DATA, _ENV_KEY = _environ._data, _environ.encodekey("FASTLM_BACKEND")

    def _backend_env():
        return _ENV_DATA.get(_ENV_KEY)
except AttributeError:  # not CPython's os._Environ
    def _backend_env():
        return _environ.get("FASTLM_BACKEND")


def dispatch(op: str, backend: str, device: torch.device) -> Callable:
    # Keyed on the device object (device.type builds a new string per call, ~0.2 us); auto depends on
    # FASTLM_BACKEND, so its value is part of the key.
    key = (op, backend, device, _backend_env() if backend == "auto" else None)
    fn = _DISPATCH_CACHE.get(key)
    if fn is None:
        fn = _DISPATCH_CACHE[key] = impl(op, resolve(backend, torch.device(device).type))
    return fn
