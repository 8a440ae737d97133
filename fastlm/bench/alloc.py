"""CPU allocation settings for benchmark processes: ``fastlm bench`` applies them before torch is
imported (and ``pytest benchmarks`` where it still can); ``import fastlm``, ``fastlm generate`` and the
other commands never change them. Each applies to every provider a benchmark compares (``hf`` and
``eager`` included), and each is skipped where the user set it already.

torch's CPU allocator takes every tensor from malloc and returns it on free, and glibc serves large
chunks (over 32 MB always, smaller ones depending on its history) with fresh mmaps that it unmaps on
free: the next tensor of that size faults every page in again, zero-filled by the kernel. On this
project's machines that costs as much as the kernels themselves at prefill sizes (allocating and
filling a 37 MB tensor: ~10 ms with 4 KiB pages, ~2.6 ms with huge pages; the copy alone is 1.6 ms),
and which sizes pay it changes from run to run.

* ``THP_MEM_ALLOC_ENABLE=1``: large tensors on transparent huge pages (c10 reads it once, at the first
  allocation, so it is set before torch is imported).
* glibc keeps freed memory for reuse (``mallopt``, and ``GLIBC_TUNABLES`` for child processes), as a
  caching allocator would; ``FASTLM_MALLOC_KEEP=0`` or the user's own ``GLIBC_TUNABLES`` turn it off.
  The heap then stays at its peak size until the process exits.
"""
from __future__ import annotations

import os
import sys

# glibc malloc: never mmap a chunk (mmap_max=0) and keep up to 1 GiB of freed memory at the heap top
# (trim_threshold), i.e. reuse freed tensors' pages instead of handing them back to the kernel.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_TRIM_BYTES = 1 << 30
_KEEP_TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_KEEP_TRIM_BYTES}"


def _keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory in this process (mallopt) and in the processes it starts
    (GLIBC_TUNABLES, read at their start). False where it does not apply (not glibc, or refused)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_BYTES) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        os.environ["GLIBC_TUNABLES"] = _KEEP_TUNABLES
        os.environ["FASTLM_MALLOC_KEEP"] = "1"  # read back by fastlm.bench.machine for the summary
    return ok


def set_allocator_defaults() -> None:
    """Apply the settings above (Linux only; nothing once torch is imported: c10 has read them)."""
    if not sys.platform.startswith("linux") or "torch" in sys.modules:
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if os.environ.get("FASTLM_MALLOC_KEEP", "1") == "1" and "GLIBC_TUNABLES" not in os.environ:
        _keep_freed_memory()
