"""``fastlm chat`` (fastlm.engine.chat): driven in a pseudo-terminal as a person would (prompt, line
editing, Ctrl-C, Ctrl-D), and through a pipe (one message per line). Every reply is checked token for
token against transformers' greedy decode of the whole conversation (an unpatched copy), and the
per-turn line of ``--verbose`` shows that each turn prefills only its own tokens.

The templated model: a word-level tokenizer (each word one token, decoded with spaces) with a chat
template, and a tiny random Helium whose output rows for the special tokens are zero, so that greedy
replies are words: a reply's text re-tokenises to exactly the tokens generated, and the conversation
re-rendered with it extends the previous one token for token (what makes "only the new turn is
prefilled" exact, not approximate)."""
from __future__ import annotations

import codecs
import fcntl
import io
import os
import pty
import re
import select
import struct
import sys
import termios
import time

import pytest
import torch

from fastlm.engine import chat as chat_cli
from fastlm.engine.cli import DEMO_DIR
from fastlm.engine.session import common_prefix
from _models import build_model, make_config

WORDS = ("alpha beta gamma delta cat dog tree river stone cloud rain sun moon star fish bird wolf bear fox owl "
         "red blue green black white gold iron salt bread milk tea wine road gate wall tower ship sail wind "
         "fire ice snow leaf root seed apple plum pear corn rice bean book page word song drum bell horn").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {{ eos_token }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """(dir, unpatched model, tokenizer): the word-level chat model, context 4096, saved with its template."""
    tokenizer = word_tokenizer()
    config = make_config("helium_gqa", vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight[: len(SPECIALS)] = 0.0  # never a special token: replies are words
    path = tmp_path_factory.mktemp("chat_ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def conversation_ids(tokenizer, turns, message, system=None) -> list[int]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    msgs.append({"role": "user", "content": message})
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))


def hf_greedy(model, ids: list[int], new: int, **kw) -> list[int]:
    """transformers' own greedy continuation of ``ids`` (``model`` is never patched)."""
    t = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, do_sample=False,
                             repetition_penalty=1.0, **kw)
    return out[0, len(ids):].tolist()


def words(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---- a person at a terminal ------------------------------------------------------------------------------
ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>]|[@-Z\\-_])")


class PtyChat:
    """``python -m fastlm chat ARGV`` on a pseudo-terminal: ``send`` types, ``expect`` reads the screen's
    text (escape sequences, carriage returns and the echoed ^C taken out) until a pattern appears."""

    def __init__(self, argv, cwd):
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FASTLM_DEBUG", "FASTLM_BACKEND")}
        env.update(TERM="xterm", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal
            try:
                attrs = termios.tcgetattr(0)
                attrs[3] |= termios.NOFLSH  # Ctrl-C must not discard output the chat already wrote
                termios.tcsetattr(0, termios.TCSANOW, attrs)
                os.chdir(cwd)
                os.execve(sys.executable, [sys.executable, "-m", "fastlm", "chat", *map(str, argv)], env)
            finally:
                os._exit(127)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        self.pid, self.fd = pid, fd
        self.text, self.pos, self.held = "", 0, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.closed = False

    def _read(self, timeout: float) -> None:
        if self.closed or not select.select([self.fd], [], [], timeout)[0]:
            return
        try:
            chunk = os.read(self.fd, 1 << 16)
        except OSError:  # EIO: the child has closed the terminal
            chunk = b""
        if not chunk:
            self.closed = True
        data = self.held + self.decoder.decode(chunk, final=not chunk)
        cut = data.rfind("\x1b")
        if chunk and cut >= 0 and not ESCAPE.match(data, cut) and len(data) - cut < 64:
            data, self.held = data[:cut], data[cut:]  # an escape sequence split between two reads
        elif chunk and data.endswith("^"):
            data, self.held = data[:-1], "^"
        else:
            self.held = ""
        self.text += ESCAPE.sub("", data).replace("\r", "").replace("^C", "").replace("\x03", "") \
            .replace("\x01", "").replace("\x02", "")

    def expect(self, pattern: str, timeout: float = 120) -> re.Match:
        regex = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self.pos)
            if match:
                self.pos = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                raise AssertionError(f"{pattern!r} never appeared; the screen after the last match:\n"
                                     f"{self.text[self.pos:][-3000:]}")
            self._read(min(left, 1.0))

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._read(0.5)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        with_child = True
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            with_child = False
        if with_child:
            os.waitpid(self.pid, 0)


@pytest.fixture
def pty_chat(tmp_path):
    chats = []

    def start(*argv):
        chats.append(PtyChat(argv, tmp_path))
        return chats[-1]
    yield start
    for c in chats:
        if not c.closed:
            c.kill()


def turn_stats(chat: PtyChat, n: int) -> tuple[int, int, int]:
    """The ``--verbose`` line of turn n -> (prompt tokens, prefilled tokens, cached tokens)."""
    m = chat.expect(rf"turn {n}: prompt (\d+) tokens, prefill (\d+) tokens \((\d+) cached\)[^\n]*\n")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_three_turns_in_a_terminal_match_hf_and_prefill_only_their_own_tokens(templated, pty_chat):
    path, model, tokenizer = templated
    chat = pty_chat("--model", path, "--max-new-tokens", 8, "--verbose")
    chat.expect(r"fastlm chat: .*cache 4096 tokens")
    turns: list[tuple[str, str]] = []
    previous = None  # (ids, reply tokens) of the turn before
    for n, message in enumerate(["cat dog tree", "river stone", "alpha beta gamma delta"], start=1):
        chat.expect(r">>> $")
        chat.send(message + "\r")
        reply = chat.expect(rf"{message}\n(.*?)\n(?=turn {n}: )").group(1)
        prompt_tokens, prefilled, cached = turn_stats(chat, n)
        ids = conversation_ids(tokenizer, turns, message)
        expected = hf_greedy(model, ids, 8)
        assert words(tokenizer, reply) == expected, (n, reply)
        assert prompt_tokens == len(ids) and prefilled + cached == len(ids)
        if previous is None:
            assert prefilled == len(ids)
        else:
            # The conversation so far re-renders to the previous prompt and reply, token for token; this
            # turn's own tokens are the rest (the reply's closing, this message, the assistant prompt).
            prev_ids, prev_reply = previous
            assert ids[: len(prev_ids) + len(prev_reply)] == prev_ids + prev_reply
            own = len(ids) - len(prev_ids) - len(prev_reply)
            # Prefilled: exactly those (the session fed the previous reply's last token when it ended).
            assert prefilled == own < len(ids) // 2
        turns.append((message, reply))
        previous = (ids, expected)

    chat.expect(r">>> $")
    chat.send("/reset\r")
    chat.expect(r"conversation reset\n")
    chat.expect(r">>> $")
    chat.send("sun moon\r")
    reply = chat.expect(r"sun moon\n(.*?)\n(?=turn 4: )").group(1)
    ids = conversation_ids(tokenizer, [], "sun moon")
    assert turn_stats(chat, 4) == (len(ids), len(ids), 0)  # a reset conversation prefills all of it
    assert words(tokenizer, reply) == hf_greedy(model, ids, 8)
    chat.expect(r">>> $")
    chat.send("\x04")  # Ctrl-D at the prompt
    assert chat.exit_status() == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session_then_the_cache_fills(templated, pty_chat):
    path, model, tokenizer = templated
    capacity = 600
    chat = pty_chat("--model", path, "--max-new-tokens", 4000, "--max-cache-len", capacity, "--verbose",
                    "--backend", "torch")
    chat.expect(r">>> $")
    chat.send("cat dog\r")
    chat.expect(r"cat dog\n")
    start = chat.pos
    chat.expect(r"(\S+ ){6}")  # the reply is being written: interrupt it
    chat.send("\x03")
    m = chat.expect(r"\n\[reply stopped: Ctrl-C[^\n]*\]\n")
    partial = chat.text[start: m.start()]
    stats = chat.expect(r"turn 1: prompt \d+ tokens, prefill \d+ tokens \(0 cached\), (\d+) new tokens in ")
    shown = words(tokenizer, partial)
    ids1 = conversation_ids(tokenizer, [], "cat dog")
    assert 6 <= len(shown) == int(stats.group(1)) < capacity - len(ids1) - 1  # stopped early, all of it shown
    assert shown == hf_greedy(model, ids1, len(shown))

    # The next turn works: its reply is HF's on the conversation with the reply as far as it was shown,
    # and only the new turn is prefilled. It runs until the conversation fills the cache.
    chat.expect(r">>> $")
    chat.send("river stone\r")
    reply = chat.expect(r"river stone\n(.*?)\n(?=\[the conversation reached)").group(1)
    chat.expect(rf"\[the conversation reached the cache's capacity of {capacity} tokens: the reply stopped there; "
                r"the next message will offer to drop the oldest turns or reset")
    ids2 = conversation_ids(tokenizer, [("cat dog", partial)], "river stone")
    assert ids2[: len(ids1) + len(shown)] == ids1 + shown
    _, prefilled, _ = turn_stats(chat, 2)
    assert prefilled == len(ids2) - len(ids1) - len(shown) + 1
    got = words(tokenizer, reply)
    assert len(ids2) + len(got) - 1 == capacity  # filled to the last slot, never past it
    assert got == hf_greedy(model, ids2, len(got))

    # A message that no longer fits: the chat says so and offers the choices.
    chat.expect(r">>> $")
    chat.send("alpha beta\r")
    chat.expect(rf"The conversation with this message is \d+ tokens; the cache holds {capacity}\. "
                r"\[d\]rop the oldest turns, \[r\]eset, or \[c\]ancel this message\? \[d\] $")
    chat.send("c\r")
    chat.expect(r"message not sent\n")
    chat.expect(r">>> $")
    chat.send("/exit\r")
    assert chat.exit_status() == 0


# ---- a pipe ------------------------------------------------------------------------------------------------
def run_piped(monkeypatch, capsys, lines: list[str], *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = chat_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pipe_demo_checkpoint_continues_the_whole_text(monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_piped(monkeypatch, capsys, ["The list", "", "The dict", "/exit", "not read"],
                               "--max-new-tokens", 20, "--verbose")
    assert code == 0, err
    assert "has no chat template: plain continuation" in err
    assert ">>>" not in out + err and "\x1b" not in out + err  # no prompts, no colours
    replies = out.split("\n")
    assert len(replies) >= 3 and replies[-1] == ""
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    text, cached = "", []
    prefills = [int(x) for x in re.findall(r"turn \d+: prompt \d+ tokens, prefill (\d+) tokens", err)]
    assert len(prefills) == 2
    for n, message in enumerate(["The list", "The dict"]):
        text += ("\n" if text else "") + message
        ids = list(tokenizer(text)["input_ids"])
        expected = hf_greedy(model, ids, 20)
        reply = tokenizer.decode(expected, skip_special_tokens=True)
        assert out.startswith(reply + "\n"), (out, reply)
        out = out[len(reply) + 1:]
        assert prefills[n] == len(ids) - min(common_prefix(cached, ids), len(ids) - 1)
        cached = ids + expected  # the session fed the reply's last token too
        text += reply
    assert out == ""  # "/exit" ended it: the last line was never read


def test_pipe_full_conversation_drops_the_oldest_turn_or_resets(templated, monkeypatch, capsys):
    path, model, tokenizer = templated
    messages = ["cat dog tree", "river stone moon sun fish", "red blue green white gold"]
    capacity, new = 44, 12
    for when_full in ("drop", "reset"):
        choice = ["--when-full", "reset"] if when_full == "reset" else []  # drop: a pipe's default
        code, out, err = run_piped(monkeypatch, capsys, messages, "--model", path, "--max-new-tokens", new,
                                   "--max-cache-len", capacity, *choice)
        assert code == 0, err
        replies = out.split("\n")[:-1]
        assert len(replies) == 3
        turns = []
        for n, (message, reply) in enumerate(zip(messages, replies)):
            ids = conversation_ids(tokenizer, turns, message)
            assert (len(ids) >= capacity) == (n == 2)  # the third message no longer fits
            if n == 2:
                assert f"the conversation with this message is {len(ids)} tokens; the cache holds {capacity} " \
                       f"(--when-full {when_full})" in err
                if when_full == "drop":  # the oldest turn goes: the rest leaves room for a reply of `new`
                    turns = turns[1:]
                    ids = conversation_ids(tokenizer, turns, message)
                    assert len(ids) + new <= capacity
                    assert f"dropped the 1 oldest turn (the conversation is now {len(ids)} tokens)" in err
                else:
                    assert "conversation reset" in err
                    turns = []
                    ids = conversation_ids(tokenizer, turns, message)
            assert words(tokenizer, reply) == hf_greedy(model, ids, new)
            turns.append((message, reply))


def test_pipe_stop_string_and_commands(templated, monkeypatch, capsys):
    path, model, tokenizer = templated
    first = hf_greedy(model, conversation_ids(tokenizer, [], "cat dog"), 10)
    stop = " " + tokenizer.decode(first[3:5])  # two words: the stop string spans two tokens
    code, out, err = run_piped(monkeypatch, capsys, ["cat dog", "/drop", "/drop", "/nonsense", "sun moon"],
                               "--model", path, "--max-new-tokens", 10, "--stop", stop, "--verbose")
    assert code == 0, err
    reply1, reply2 = out.split("\n")[:2]
    assert reply1 == before_stop(tokenizer, first, stop)  # cut before the stop string, which is not printed
    assert len(words(tokenizer, reply1)) <= 3 and "finish stop" in err
    assert "dropped the oldest turn (0 left)" in err and "nothing to drop" in err and "unknown command /nonsense" in err
    assert reply2 == before_stop(tokenizer, hf_greedy(model, conversation_ids(tokenizer, [], "sun moon"), 10), stop)


def before_stop(tokenizer, tokens: list[int], stop: str) -> str:
    """The reply as the chat shows it (each word after a space), up to the first stop string."""
    text = " " + tokenizer.decode(tokens)
    return text if stop not in text else text[: text.index(stop)]


def test_chat_argument_errors(monkeypatch, capsys, templated):
    path, _, _ = templated
    code, out, err = run_piped(monkeypatch, capsys, ["hi"], "--model", path, "--when-full", "ask")
    assert code == 2 and out == ""
    assert err.strip() == ("fastlm chat: error: --when-full ask needs a terminal to ask on (stdin is not one): "
                           "choose drop or reset")
    with pytest.raises(SystemExit) as exc:
        chat_cli.main(["--max-cache-len", "1"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "fastlm chat: error: argument --max-cache-len: must be >= 2, got 1"
