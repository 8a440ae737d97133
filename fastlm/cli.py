"""The ``fastlm`` command: ``fastlm info``, ``fastlm generate``, ``fastlm bench``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("fastlm.info", "versions, device and backend availability"),
    "generate": ("fastlm.engine.cli", "generate text from a checkpoint (static KV cache, CUDA graphs)"),
    "bench": ("fastlm.bench.cli", "run the benchmark suites"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
    return f"usage: fastlm <command> [options]\n\ncommands:\n{rows}\n\n`fastlm <command> --help` for a command's options."


def main(argv=None) -> int:
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
