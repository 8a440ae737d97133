"""Run-time discovery of fastlm backends: new backends registered in ``fastlm.ops`` appear here
automatically. Each answer carries a reason, so a missing backend becomes a skipped row, not an error."""
from __future__ import annotations

from dataclasses import dataclass

from fastlm.bench.suite import Unavailable
from fastlm.ops import _registry


@dataclass
class BackendInfo:
    name: str
    available: bool      # usable at all on this device type
    timed: bool          # its timings mean something (not an interpreter)
    reason: str


def discover(device_type: str, *, include_torch: bool = True) -> list[BackendInfo]:
    """Every backend in ``fastlm.ops.BACKENDS`` with its availability on ``device_type``."""
    out = []
    for name in _registry.BACKENDS:
        if name == "torch" and not include_torch:
            continue
        try:
            ok, why = _registry.backend_status(name, device_type)
        except Exception as exc:  # a broken backend must not break the benchmark
            ok, why = False, f"backend_status raised {type(exc).__name__}: {exc}"
        timed = ok
        if ok and name == "triton" and device_type == "cpu":
            timed = False
            why = ("Triton on CPU runs only under the interpreter (TRITON_INTERPRET=1), which is not a "
                   "performance path: excluded from timing")
        out.append(BackendInfo(name, ok, timed, why))
    return out


def has_impl(op: str, backend: str, device_type: str) -> bool:
    """Whether ``backend`` has its own kernel for ``op`` on ``device_type`` (else dispatch would silently
    fall back to the torch reference, which must not be reported as that backend's timing)."""
    return _registry.has_impl(op, backend, device_type)


def timed_backend(provider: str, device_type: str, op: str | None = None, *, timed: bool = True) -> str:
    """The backend a ``<kind>-<backend>`` provider names (``fastlm-cpp``, ``patched-torch``) when it can
    run here (``timed``: and its timings mean something) and implements ``op`` itself; else raises
    :class:`Unavailable` saying why."""
    name = provider.split("-", 1)[-1]
    info = {b.name: b for b in discover(device_type)}.get(name)
    if info is None:
        raise Unavailable(f"unknown backend {name!r}")
    if not (info.timed if timed else info.available):
        raise Unavailable(info.reason)
    if op is not None and not has_impl(op, name, device_type):
        raise Unavailable(f"backend {name!r} has no {op} kernel for {device_type} tensors (would fall back to the "
                          "reference)")
    return name
