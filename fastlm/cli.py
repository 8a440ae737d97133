"""The ``fastlm`` command: ``fastlm info``, ``fastlm generate``, ``fastlm chat``, ``fastlm bench``.

Errors are one line on stderr (``fastlm <command>: error: ...``), exit status 2 for bad arguments.
Ctrl-C, at any point (the imports of torch and transformers included), ends the command with one line
(``fastlm <command>: interrupted``) and exit status 130, no traceback; a closed stdout (``| head``) ends
it quietly with status 141. ``FASTLM_DEBUG=1`` re-raises instead, for a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

COMMANDS = {
    "info": ("fastlm.info", "versions, device and backend availability"),
    "generate": ("fastlm.engine.cli", "generate text from a checkpoint (static KV cache, CUDA graphs)"),
    "chat": ("fastlm.engine.chat", "a multi-turn chat over the chat template, the KV cache kept between turns"),
    "bench": ("fastlm.bench.cli", "run the benchmark suites"),
}


EXIT_USAGE = 2          # bad arguments or input
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: as for a command ended by its reader going away (`fastlm info | head`)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: message``, exit status 2) instead of the usage
    block before it; ``--help`` prints the full help as usual."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def debugging() -> bool:
    """``FASTLM_DEBUG=1``: let errors and interrupts raise, with their traceback."""
    return os.environ.get("FASTLM_DEBUG", "") not in ("", "0")


def usage() -> str:
    rows = "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
    return (f"usage: fastlm <command> [options]\n\ncommands:\n{rows}\n\n"
            "`fastlm <command> --help` for a command's options.")


_interrupt_line = b"fastlm: interrupted\n"


def _exit_at_once(signum, frame) -> None:
    """SIGINT after the first one: the command is already winding down (or something swallowed the first
    KeyboardInterrupt); end the process now, quietly. os.write: no Python buffer is touched here."""
    try:
        os.write(2, _interrupt_line)  # empty once main() has said it
    except OSError:  # stderr closed: nothing to say it on
        pass
    os._exit(EXIT_INTERRUPTED)


_interrupts_taken = 0  # SIGINTs that _first_interrupt turned into a KeyboardInterrupt


def _first_interrupt(signum, frame) -> None:
    global _interrupts_taken
    _interrupts_taken += 1
    signal.signal(signal.SIGINT, _exit_at_once)
    raise KeyboardInterrupt


def import_torch():
    """``import torch``, for a command's first use of it. torch's C++ start-up imports numpy and takes any error
    there, a KeyboardInterrupt included, for "numpy is absent": a Ctrl-C in that moment was lost and the
    command went on to the end (exit 0). The interrupt is raised again here, once the import returns."""
    taken = _interrupts_taken
    import torch

    if _interrupts_taken != taken:
        raise KeyboardInterrupt
    return torch


def _unraisable(previous):
    """A KeyboardInterrupt raised inside a __del__ or a callback cannot reach main(): Python would print
    it with a traceback and carry on. Treat it as the interrupt it is."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and not debugging():
            _exit_at_once(signal.SIGINT, None)
        previous(unraisable)
    return hook


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastlm: error: unknown command {name!r} (choose from {', '.join(COMMANDS)}; `fastlm --help` "
              "for more)", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


def main(argv=None) -> int:
    """Run ``fastlm <command> ...`` (``argv`` without the program name; default ``sys.argv[1:]``) and
    return its exit status. Ctrl-C returns 130 after one line on stderr; from then on a second Ctrl-C
    ends the process at once."""
    global _interrupt_line
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"fastlm {argv[0]}" if argv and argv[0] in COMMANDS else "fastlm"
    _interrupt_line = f"{prog}: interrupted\n".encode()
    previous_sigint, previous_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    # Signal handlers live in the main thread; an ignored SIGINT (a background job of a script) stays so.
    handle_sigint = threading.current_thread() is threading.main_thread() and previous_sigint is not signal.SIG_IGN
    try:
        # The handler goes in first: the command's imports (torch, transformers) take seconds.
        if handle_sigint:
            signal.signal(signal.SIGINT, _first_interrupt)
        sys.unraisablehook = _unraisable(previous_hook)
        return _dispatch(argv)
    except KeyboardInterrupt:
        if debugging():
            raise
        line, _interrupt_line = _interrupt_line, b""
        sys.stderr.write(line.decode())
        sys.stderr.flush()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if debugging():
            raise
        # stdout's reader is gone: point stdout at /dev/null so that the flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        sys.unraisablehook = previous_hook
        # Put the caller's handler back unless a SIGINT came: then _exit_at_once stays for the wind-down.
        if handle_sigint and signal.getsignal(signal.SIGINT) is _first_interrupt:
            # None: the previous handler was not installed from Python; Python's own is the closest
            signal.signal(signal.SIGINT, signal.default_int_handler if previous_sigint is None else previous_sigint)


if __name__ == "__main__":
    sys.exit(main())
