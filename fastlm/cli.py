"""The ``fastlm`` command: ``fastlm info``, ``fastlm generate``, ``fastlm bench``."""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "info": ("fastlm.info", "versions, device and backend availability"),
    "generate": ("fastlm.engine.cli", "generate text from a checkpoint (static KV cache, CUDA graphs)"),
    "bench": ("fastlm.bench.cli", "run the benchmark suites"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: fastlm <command> [options]\n\ncommands:\n{rows}\n\n`fastlm <command> --help` for a command's options."


def set_allocator_defaults() -> None:
    """Large CPU tensors backed by transparent huge pages, for the ``fastlm`` command only.

    torch's CPU allocator hands every large tensor to fresh pages: on Linux each first touch of a
    4 KiB page faults, and on this project's machines that costs more than the kernels themselves for
    prefill-sized activations (allocating and filling a 37 MB tensor: ~10 ms with 4 KiB pages, ~2.6 ms
    with huge pages; the copy alone is 1.6 ms). c10 reads ``THP_MEM_ALLOC_ENABLE`` once, at the first
    allocation, so it is set here before torch is imported, unless the user set it. It applies to every
    provider a benchmark compares (``hf`` and ``eager`` included); ``import fastlm`` never sets it.
    """
    if sys.platform.startswith("linux") and "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None) -> int:
    set_allocator_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastlm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
