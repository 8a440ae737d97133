"""The op registry: which implementation runs for (op, backend, device type).

Every op is declared once, in its file under fastlm/ops, with :func:`declare`: its name, its plain-PyTorch
reference (backend ``torch``) and its one fake (shapes and dtypes, for torch.compile and meta tensors).
Kernel backends are plugins under fastlm/backends (``cpp``: fastlm._C's C++ CPU and CUDA kernels;
``triton``: fastlm.kernels). A backend module imports nothing from fastlm.ops; it answers

* ``status(device_type) -> (available, reason)``;
* ``KERNELS``: op name -> the device types it has a kernel for (data: "cpp implements decode attention
  on CPU only"), each served by the module's function of the op's name with the reference's signature;
* ``LIBRARY_OPS``: op name -> the ``torch.library`` op its kernel goes through, which gets the op's fake;
* optionally ``EAGER_KERNELS``: op name -> a faster callable of the same signature and result for code that is
  never traced by torch.compile (the engine's eager decode step, :func:`dispatch_eager`).

The registry loads a backend the first time it is asked for (so ``import fastlm`` never pays for, or
fails on, an optional backend) and falls back to the reference wherever a backend has no kernel.
``auto`` picks per device type: CUDA -> triton, then cpp, then torch; CPU -> cpp, then torch, warning once
when only the reference is left. ``FASTLM_BACKEND`` overrides ``auto`` (never an explicit choice): the
answer is cached per (device type, FASTLM_BACKEND), so changing the variable takes effect at the next call.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from os import environ as _environ
from types import ModuleType
from typing import Callable

import torch

from fastlm.errors import BackendUnavailableError

BACKENDS = ("torch", "triton", "cpp")
BACKEND_CHOICES = ("auto",) + BACKENDS
BACKEND_MODULES = {"triton": "fastlm.backends.triton", "cpp": "fastlm.backends.cpp"}
_AUTO_ORDER = {"cuda": ("triton", "cpp")}  # any other device type: ("cpp",)


@dataclass(frozen=True)
class Op:
    name: str
    ref: Callable   # the plain-PyTorch reference: the op's semantics, and every backend's signature
    fake: Callable | None = None  # the library ops' meta function (see LIBRARY_OPS)


OPS: dict[str, Op] = {}
_MODULES: dict[str, ModuleType | None] = {}  # backend -> its loaded module (None: failed, see _LOAD_ERRORS)
_LOAD_ERRORS: dict[str, str] = {}
_AUTO_CACHE: dict[tuple[str, str | None], str] = {}
# (op, requested backend, device, FASTLM_BACKEND for auto) -> implementation: the hot path of every call
# (decode on CPU pays for each microsecond), filled on first use.
_DISPATCH_CACHE: dict[tuple, Callable] = {}


def declare(name: str, ref: Callable, *, fake: Callable | None = None) -> Op:
    """Declare op ``name``: its reference and its fake. Returns the :class:`Op`."""
    op = OPS[name] = Op(name, ref, fake)
    for module in _MODULES.values():
        if module is not None:
            _register_fake(op, module)
    return op


def _register_fake(op: Op, module: ModuleType) -> None:
    qualname = getattr(module, "LIBRARY_OPS", {}).get(op.name)
    if qualname is not None and op.fake is not None:
        torch.library.register_fake(qualname)(op.fake)


def backend_module(backend: str) -> ModuleType | None:
    """The loaded plugin module of a kernel backend, or None when it failed to import (see backend_status)."""
    if backend not in _MODULES:
        try:
            module = importlib.import_module(BACKEND_MODULES[backend])
        except Exception as exc:  # ImportError, missing toolchain, broken build: all mean "unavailable"
            _LOAD_ERRORS[backend] = f"{type(exc).__name__}: {exc}"
            module = None
        _MODULES[backend] = module
        if module is not None:
            for op in OPS.values():
                _register_fake(op, module)
    return _MODULES[backend]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_CHOICES}")


def backend_status(backend: str, device_type: str = "cpu") -> tuple[bool, str]:
    """(available, reason) for ``backend`` on tensors of ``device_type``."""
    _check_backend(backend)
    if backend == "torch":
        return True, "plain PyTorch reference, always available"
    module = backend_module(backend)
    if module is None:
        return False, f"{BACKEND_MODULES[backend]} failed to import ({_LOAD_ERRORS[backend]})"
    return module.status(device_type)


# FASTLM_BACKEND as os.environ holds it (raw), for dispatch's cache key: read from os.environ's own dict
# where it has one, as the mapping's get() encodes the key on every call (~0.6 us here, a decode-sized
# kernel's worth).
try:
    _ENV_DATA, _ENV_KEY = _environ._data, _environ.encodekey("FASTLM_BACKEND")

    def _backend_env_raw():
        return _ENV_DATA.get(_ENV_KEY)
except AttributeError:  # not CPython's os._Environ
    def _backend_env_raw():
        return _environ.get("FASTLM_BACKEND")


def resolve(backend: str, device_type: str) -> str:
    """Turn a requested backend (possibly ``auto``) into a concrete, available one."""
    if backend == "auto":
        env = _environ.get("FASTLM_BACKEND")
        key = (device_type, env)
        chosen = _AUTO_CACHE.get(key)
        if chosen is None:
            chosen = _AUTO_CACHE[key] = _resolve_auto(device_type, (env or "").strip())
        return chosen
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_CHOICES}")
    ok, why = backend_status(backend, device_type)
    if not ok:
        raise BackendUnavailableError(f"fastlm backend {backend!r} is unavailable for {device_type} tensors: {why}")
    return backend


def _resolve_auto(device_type: str, env: str) -> str:
    if env and env != "auto":
        return resolve(env, device_type)
    reasons = []
    for candidate in _AUTO_ORDER.get(device_type, ("cpp",)):
        ok, why = backend_status(candidate, device_type)
        if ok:
            return candidate
        reasons.append(f"{candidate}: {why}")
    warnings.warn(f"fastlm: no kernel backend is available for {device_type} tensors, falling back to the plain "
                  f"PyTorch reference ({'; '.join(reasons)}). Run `python -m fastlm info` for details.",
                  RuntimeWarning, stacklevel=4)
    return "torch"


def has_impl(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` has its own kernel for ``op`` on ``device_type`` (not the reference fallback)."""
    _check_backend(backend)
    if backend == "torch":
        return True
    module = backend_module(backend)
    return module is not None and device_type in module.KERNELS.get(op, ())


def impl(op: str, backend: str, device_type: str) -> Callable:
    """What a concrete ``backend`` runs for ``op`` on ``device_type``: its kernel, else the reference."""
    if has_impl(op, backend, device_type) and backend != "torch":
        return getattr(_MODULES[backend], op)
    return OPS[op].ref


def dispatch_eager(op: str, backend: str, device: torch.device) -> Callable:
    """:func:`dispatch` for calls that torch.compile never traces: the backend's ``EAGER_KERNELS`` entry where
    it has one (the cpp backend's unboxed call without the per-call ``is_compiling`` test), else dispatch's."""
    fn = dispatch(op, backend, device)
    device_type = torch.device(device).type
    chosen = resolve(backend, device_type)
    if chosen == "torch" or not has_impl(op, chosen, device_type):  # the reference: no eager form
        return fn
    return getattr(_MODULES[chosen], "EAGER_KERNELS", {}).get(op, fn)


def dispatch(op: str, backend: str, device: torch.device) -> Callable:
    """:func:`impl` for a requested backend (``auto`` included) on ``device``, cached."""
    # Keyed on the device object (device.type builds a new string per call, ~0.2 us); auto depends on
    # FASTLM_BACKEND, so its value is part of the key.
    key = (op, backend, device, _backend_env_raw() if backend == "auto" else None)
    fn = _DISPATCH_CACHE.get(key)
    if fn is None:
        device_type = torch.device(device).type
        fn = _DISPATCH_CACHE[key] = impl(op, resolve(backend, device_type), device_type)
    return fn
