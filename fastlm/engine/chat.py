"""``fastlm chat``: a multi-turn conversation with a checkpoint, its KV cache kept between turns.

Each turn renders the whole conversation with the tokenizer's chat template (``--system``: the system
message) and hands it to a :class:`fastlm.Session`, which prefills only what its cache does not hold yet:
a turn costs its own tokens, not the conversation's. A tokenizer without a chat template (the demo
checkpoint) gets plain continuation instead: each message is appended to the text so far (after a line
break; ``--system``: the text's first line) and the model continues the whole text.

On a terminal: a ``>>>`` prompt with line editing, colours (not with ``NO_COLOR`` or ``TERM=dumb``),
``/help``. Ctrl-C stops the reply being written and keeps the conversation (what was shown of the reply
stays in it); a second Ctrl-C before the reply has stopped ends the command. Ctrl-C at the prompt clears
the line; Ctrl-D or ``/exit`` ends the command, ``/reset`` starts the conversation over, ``/drop``
forgets its oldest turn. With stdin not a terminal (a pipe, a file) each line is one message and stdout
gets each reply and a line break, nothing else: no prompts, no colours; notes go to stderr.

The conversation lives in the session's KV cache of ``--max-cache-len`` tokens (default: the model's
context). A reply that reaches it stops there (never an error) and says so. A message that no longer
fits offers the choices: drop the oldest turns (until a reply of ``--max-new-tokens``, at most half
the cache, fits), reset, or cancel the message; ``--when-full`` makes the choice in advance (in a pipe
the default is ``drop``). ``--verbose`` prints a line per turn on stderr: tokens prefilled (the rest came
from the cache) and their rate, new tokens and their rate, the cache in use.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings

from fastlm.cli import ArgumentParser
from fastlm.engine.cli import (SEED_MAX, CLIError, _backend, _device, _parse_int, add_generation_options, load,
                               render_chat, resolve_model_dir, run_command)

DEFAULT_MAX_NEW_TOKENS = 256
COMMANDS_HELP = ("/reset: start over   /drop: forget the oldest turn   /exit (or Ctrl-D): quit   "
                 "Ctrl-C: stop the reply")


def cache_len_value(text: str) -> int:
    return _parse_int(text, 2)


def reply_token_count(text: str) -> int:
    return _parse_int(text, 1)


def build_parser():
    p = ArgumentParser(prog="fastlm chat", description=__doc__.split("\n\n")[0])
    add_generation_options(p, max_new_tokens=(reply_token_count, DEFAULT_MAX_NEW_TOKENS, "per reply"))
    p.add_argument("--max-cache-len", type=cache_len_value, default=None, metavar="N",
                   help="the conversation's KV cache, in tokens (default: the model's context)")
    p.add_argument("--when-full", choices=("ask", "drop", "reset"), default=None,
                   help="when a message no longer fits the cache: ask (default on a terminal), drop the oldest "
                        "turns (default in a pipe) or reset")
    p.add_argument("--verbose", action="store_true", help="a line per turn on stderr: prefill, decode, cache")
    return p


class Conversation:
    """The turns so far and the token ids they render to: the chat template over the messages, or (no
    template) the plain text, each message after a line break and continued by its reply."""

    def __init__(self, tokenizer, path: str, system: str | None, templated: bool):
        self.tokenizer, self.path, self.system, self.templated = tokenizer, path, system, templated
        self.turns: list[tuple[str, str]] = []  # (message, reply)

    def messages(self, message: str) -> list[dict]:
        msgs = [] if self.system is None else [{"role": "system", "content": self.system}]
        for user, reply in self.turns:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return msgs + [{"role": "user", "content": message}]

    def text(self, message: str) -> str:
        """Plain continuation: the text the model continues."""
        parts = [] if self.system is None else [self.system, "\n"]
        for user, reply in self.turns:
            parts += [user, reply, "\n"]
        return "".join(parts + [message])

    def ids(self, message: str) -> list[int]:
        if self.templated:
            return render_chat(self.tokenizer, self.messages(message), self.path)
        return list(self.tokenizer(self.text(message))["input_ids"])


class Terminal:
    """Where the conversation is read and written: a person at a terminal, or a pipe."""

    def __init__(self, stdin, stdout, stderr):
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = _isatty(stdin)
        colors = self.interactive and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"
        self.color, self.color_notes = colors and _isatty(stdout), colors and _isatty(stderr)
        if self.interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())

    def _paint(self, code: str, text: str, prompt: bool = False, note: bool = False) -> str:
        if not (self.color_notes if note else self.color):
            return text
        # readline counts the prompt's width: escape sequences in it go between \001 and \002
        start, end = ("\001", "\002") if prompt else ("", "")
        return f"{start}\033[{code}m{end}{text}{start}\033[0m{end}"

    def note(self, text: str) -> None:
        """A line for the person (stderr): how the chat runs, what happened to the conversation."""
        self.stdout.flush()
        self.stderr.write(self._paint("2", text, note=True) + "\n")
        self.stderr.flush()

    def read(self) -> str | None:
        """The next message (None at the end of input). Ctrl-C at a terminal's prompt clears the line."""
        if not self.interactive:
            line = self.stdin.readline()
            return None if line == "" else line.rstrip("\r\n")
        while True:
            try:
                return self._input(self._paint("1;32", ">>> ", prompt=True))
            except EOFError:
                self.stdout.write("\n")
                return None
            except KeyboardInterrupt:
                _rearm_interrupt()
                self.stdout.write("\n")
                self.note("(Ctrl-D or /exit quits)")

    def ask(self, question: str, choices: str) -> str | None:
        """One letter of ``choices`` from the person (the first is the default); None at the end of input."""
        while True:
            try:
                answer = self._input(self._paint("1;33", f"{question} ", prompt=True)).strip().lower()
            except EOFError:
                return None
            except KeyboardInterrupt:
                _rearm_interrupt()
                self.stdout.write("\n")
                return "c"
            if not answer:
                return choices[0]
            if answer[0] in choices:
                return answer[0]

    def _input(self, prompt: str) -> str:
        if self.stdin is sys.stdin and self.stdout is sys.stdout:
            return input(prompt)  # readline's line editing
        self.stdout.write(prompt)
        self.stdout.flush()
        line = self.stdin.readline()
        if line == "":
            raise EOFError
        return line.rstrip("\r\n")

    def write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_handler_at_start = None  # the SIGINT handler the command started with (fastlm.cli's)


class EndChat(KeyboardInterrupt):
    """A second Ctrl-C while a reply was stopping: end the command (status 130, as fastlm.cli does)."""


def _rearm_interrupt() -> None:
    """A Ctrl-C that was handled (at the prompt): the next one is a first one again. fastlm.cli's
    handler turns itself into "end the process now" after the first press."""
    if _handler_at_start is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler_at_start)


@contextlib.contextmanager
def ctrl_c_stops_reply():
    """While a reply is written: the first Ctrl-C asks the reply to stop (it stops after the token being
    made, and the session keeps everything it fed); a second one, before it has, ends the command."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed.is_set
        return

    def on_sigint(signum, frame):
        if pressed.is_set():
            signal.signal(signal.SIGINT, _handler_at_start or signal.default_int_handler)
            raise EndChat
        pressed.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed.is_set
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)


class Chat:
    def __init__(self, args, session, conversation: Conversation, term: Terminal):
        self.args, self.session, self.conv, self.term = args, session, conversation, term
        self.capacity = session.max_cache_len
        self.turn = 0
        self.when_full = args.when_full or ("ask" if term.interactive else "drop")

    # ---- commands ----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command -> False when the chat should end."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.reset()
            self.term.note("conversation reset")
        elif name == "/drop":
            if self.conv.turns:
                self.conv.turns.pop(0)
                self.term.note(f"dropped the oldest turn ({len(self.conv.turns)} left)")
            else:
                self.term.note("nothing to drop: the conversation is empty")
        elif name in ("/help", "/?"):
            self.term.note(COMMANDS_HELP)
        else:
            self.term.note(f"unknown command {name} ({COMMANDS_HELP})")
        return True

    def reset(self) -> None:
        self.conv.turns.clear()
        self.session.reset()

    # ---- capacity ----------------------------------------------------------------------------------
    def fit(self, message: str) -> list[int] | None:
        """The ids of the conversation with ``message``, made to fit the cache (asking, or as
        --when-full says); None when the message is not sent."""
        ids = self.conv.ids(message)
        if len(ids) < self.capacity:
            return ids
        action = self.when_full
        if action == "ask":
            action = {"d": "drop", "r": "reset", "c": "cancel", None: "exit"}[self.term.ask(
                f"The conversation with this message is {len(ids)} tokens; the cache holds {self.capacity}. "
                "[d]rop the oldest turns, [r]eset, or [c]ancel this message? [d]", "drc")]
        else:
            self.term.note(f"the conversation with this message is {len(ids)} tokens; the cache holds "
                           f"{self.capacity} (--when-full {action})")
        if action == "exit":
            raise EOFError
        if action == "cancel":
            self.term.note("message not sent")
            return None
        if action == "reset":
            self.reset()
            self.term.note("conversation reset")
            ids = self.conv.ids(message)
        else:
            room = min(self.args.max_new_tokens, self.capacity // 2)
            dropped = 0
            while self.conv.turns and len(ids) + room > self.capacity:
                self.conv.turns.pop(0)
                dropped += 1
                ids = self.conv.ids(message)
            self.term.note(f"dropped the {dropped} oldest turn{'s' if dropped != 1 else ''} "
                           f"(the conversation is now {len(ids)} tokens)")
        if len(ids) >= self.capacity:
            self.term.note(f"this message alone is {len(ids)} tokens: it does not fit the cache of "
                           f"{self.capacity} tokens; not sent")
            return None
        return ids

    # ---- one turn ----------------------------------------------------------------------------------
    def reply(self, message: str) -> None:
        ids = self.fit(message)
        if ids is None:
            return
        import torch

        from fastlm.engine.detok import IncrementalDetokenizer, StopStringFilter
        from fastlm.engine.engine import GenerationResult

        args = self.args
        seed = None if args.seed is None else (args.seed + self.turn) % (SEED_MAX + 1)
        self.turn += 1
        result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[])
        detok, stops = IncrementalDetokenizer(self.conv.tokenizer, ids), StopStringFilter(args.stop)
        shown: list[str] = []
        new_tokens = 0
        started = time.perf_counter()
        with warnings.catch_warnings(), ctrl_c_stops_reply() as stop_requested, torch.inference_mode():
            # a reply that fills the cache: said below, in the chat's words
            warnings.filterwarnings("ignore", message=r"fastlm: .*KV cache capacity", category=RuntimeWarning)
            stream = self.session.stream(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=seed, ignore_eos=args.ignore_eos,
                                         stop_strings=args.stop or None, result=result)
            try:
                for token in stream:
                    new_tokens += 1
                    piece = stops.push(detok.push(token))
                    shown.append(piece)
                    self.term.write(piece)
                    if stop_requested():
                        break
                else:  # finished: the detokeniser's and the stop filter's held-back tails
                    tail = stops.push(detok.flush())
                    tail += "" if stops.stopped else stops.flush()
                    shown.append(tail)
                    self.term.write(tail)
            finally:
                stream.close()  # the session keeps what was fed, however the reply ended
            interrupted = stop_requested()
        text = "".join(shown)
        self.term.write("\n")  # a reply ends its line (in a pipe: one reply, then a line break)
        self.conv.turns.append((message, text))
        reason = "interrupted" if interrupted else (result.finish_reasons[0] if result.finish_reasons else "length")
        if interrupted:
            self.term.note("[reply stopped: Ctrl-C; the conversation keeps what was shown]")
        elif reason == "cache_full":
            what = {"ask": "the next message will offer to drop the oldest turns or reset (or: /drop, /reset)",
                    "drop": "the next message will drop the oldest turns (--when-full drop)",
                    "reset": "the next message will reset the conversation (--when-full reset)"}[self.when_full]
            self.term.note(f"[the conversation reached the cache's capacity of {self.capacity} tokens: the reply "
                           f"stopped there; {what}]")
        if args.verbose:
            self.term.note(self.stats(ids, result, new_tokens, reason, time.perf_counter() - started))

    def stats(self, ids: list[int], result, new_tokens: int, reason: str, elapsed: float) -> str:
        prefilled = self.session.last_prefill_tokens
        cached = len(ids) - prefilled
        line = f"turn {self.turn}: prompt {len(ids)} tokens, prefill {prefilled} tokens ({cached} cached)"
        if result.finish_reasons:  # the reply finished (an interrupted one has no engine timings)
            if result.prefill_s > 0:
                line += f" at {prefilled / result.prefill_s:.1f} tokens/s"
            line += f", {new_tokens} new tokens"
            if result.decode_steps and result.decode_s > 0:
                line += f" at {result.decode_tokens_per_s:.1f} tokens/s"
        else:
            line += f", {new_tokens} new tokens in {elapsed:.2f} s"
        return line + f", finish {reason}, cache {len(self.session.tokens)}/{self.capacity} tokens"

    def loop(self) -> None:
        while True:
            message = self.term.read()
            if message is None:
                return
            if not message.strip():
                continue
            if message.startswith("/") and not message.startswith("//"):
                if not self.command(message):
                    return
                continue
            try:
                self.reply(message[1:] if message.startswith("//") else message)
            except EOFError:
                return
            except EndChat:
                raise
            except KeyboardInterrupt:  # Ctrl-C before the reply began (the message was being rendered)
                _rearm_interrupt()
                self.term.write("\n")
                self.term.note("[stopped before the reply began; the conversation is unchanged]")


def run(args) -> int:
    global _handler_at_start
    if args.when_full == "ask" and not _isatty(sys.stdin):
        raise CLIError("--when-full ask needs a terminal to ask on (stdin is not one): choose drop or reset")
    path = resolve_model_dir(args.model)
    device = _device(args.device)
    backend = _backend(args.backend, device)
    model, tokenizer, _ = load(path, args.dtype, device, backend=backend, quantize=args.quantize)

    import fastlm

    term = Terminal(sys.stdin, sys.stdout, sys.stderr)
    templated = bool(getattr(tokenizer, "chat_template", None))
    context = getattr(model.config, "max_position_embeddings", None)
    capacity = args.max_cache_len or context
    session = fastlm.Session(model, tokenizer, backend=backend, max_cache_len=capacity,
                             cuda_graph=not args.no_cuda_graph, compile=args.compile)
    name = "the demo checkpoint" if args.model is None else path
    if not templated:
        term.note(f"{name} has no chat template: plain continuation (each message is added to the text so far "
                  "and the model continues it)")
    if term.interactive:
        term.note(f"fastlm chat: {name} ({model.config.model_type}), KV cache {session.max_cache_len} tokens, "
                  f"backend {backend}{f', {args.quantize} weights' if args.quantize else ''}; /help for commands, "
                  "Ctrl-D to quit")
    _handler_at_start = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        Chat(args, session, Conversation(tokenizer, path, args.system, templated), term).loop()
    finally:
        session.close()
    return 0


def main(argv=None) -> int:
    """``fastlm chat`` with ``argv`` -> exit status (fastlm.engine.cli.run_command; fastlm/cli.py for Ctrl-C
    outside a reply)."""
    return run_command("fastlm chat", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    from fastlm.cli import main as fastlm_main

    sys.exit(fastlm_main(["chat", *sys.argv[1:]]))
