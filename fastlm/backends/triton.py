"""The Triton backend plugin: the kernels in ``fastlm.kernels`` (source: the top-level kernels/ folder).

They run on CUDA tensors, compiled; on CPU tensors only under ``TRITON_INTERPRET=1`` set before triton
is imported (a correctness path, never for CUDA tensors: the interpreter copies every storage a kernel
touches to the host and back per launch, the whole KV cache included, and cannot be graph-captured).
The plugin interface (``status``, ``KERNELS``, ``LIBRARY_OPS``, one function per op) is described in
fastlm/ops/_registry.py.
"""
from __future__ import annotations

import os
from types import ModuleType

import fastlm.kernels as _kernels
from fastlm.kernels import INTERPRET

# Every kernel module fastlm.kernels imports lists its ops in ENTRY_POINTS: op -> (entry point with the
# reference's signature, its torch.library op). The kernels run on CUDA tensors and, under the
# interpreter, on CPU tensors (status() says which of the two works now).
KERNELS: dict[str, tuple[str, ...]] = {}
LIBRARY_OPS: dict[str, str] = {}
for _module in vars(_kernels).values():
    if isinstance(_module, ModuleType):
        for _op, (_entry, _library_op) in getattr(_module, "ENTRY_POINTS", {}).items():
            globals()[_op] = _entry
            KERNELS[_op] = ("cpu", "cuda")
            LIBRARY_OPS[_op] = _library_op


def status(device_type: str) -> tuple[bool, str]:
    if device_type == "cpu":
        # whether the kernels were decorated for the interpreter (TRITON_INTERPRET as it was at import)
        if os.environ.get("TRITON_INTERPRET") != "1" or not INTERPRET:
            return False, ("Triton kernels need a CUDA device; on CPU tensors they run only under "
                           "TRITON_INTERPRET=1 (set before triton is imported)")
        return True, "Triton kernels (interpreter)"
    if device_type == "cuda":
        if INTERPRET:
            return False, ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 when triton "
                           "was imported), which is never used for CUDA tensors; unset TRITON_INTERPRET")
        return True, "Triton kernels"
    return False, f"Triton backend does not support device type {device_type!r}"
