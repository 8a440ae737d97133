"""Incremental detokenisation for streaming.

Decoding token by token and concatenating is wrong for byte-level BPE (a character split over several
tokens decodes to U+FFFD until its last byte arrives) and for SentencePiece-style tokenizers (a token's
leading space depends on what precedes it). So, as text-generation-inference does, keep a window of
ids: decode ``ids[prefix:read]`` and ``ids[prefix:]``, emit the difference when it is complete (does not
end in U+FFFD), then slide the window. The window starts with the prompt's last few tokens so the first
new token decodes in context.

Stop strings are matched on that text (:class:`StopStringFilter`), so a stop string split over several
tokens, or inside one, is found all the same; :class:`StopStringWatch` does it for every sequence of a call.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids=(), skip_special_tokens: bool = True, context: int = 5):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids)[-context:]
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (a trailing partial character comes out as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""


class StopStringFilter:
    """Stop strings checked on detokenised text. ``push(piece)`` takes each piece of text as it is
    decoded and returns the text that is safe to show: everything before a stop string, never the stop
    string itself, and never a tail that may still become one (that tail is held back until the next
    pieces decide). ``stopped`` turns True at the piece that completes a stop string."""

    def __init__(self, stop_strings):
        self.stops = [s for s in stop_strings if s]
        self.held = ""        # a tail of the text that is a prefix of some stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        # ``held`` holds no whole stop string, so a match here ends in ``piece``; the earliest one wins
        found = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if found >= 0:
            self.stopped, self.held = True, ""
            return text[:found]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, at the end of a text that never reached a stop string."""
        held, self.held = self.held, ""
        return "" if self.stopped else held


class StopStringWatch:
    """Per sequence of a batch: its detokeniser and stop-string filter, fed token ids as they come (a
    stream feeds each step's row; ``check()`` reads the steps appended to ``per_step`` since the last
    check, when the engine asks every few steps: no host sync per token). ``stop_at[b]``: the number of
    new tokens up to and including the one that completed a stop string (None while none has). Used by
    :func:`fastlm.generate` / :func:`fastlm.stream` for ``stop_strings``."""

    def __init__(self, tokenizer, prompts, stop_strings, finished_token: int):
        self.detoks = [IncrementalDetokenizer(tokenizer, p) for p in prompts]
        self.filters = [StopStringFilter(stop_strings) for _ in prompts]
        self.fed = [0] * len(prompts)
        self.done = [False] * len(prompts)  # stopped on a string, or finished on the device
        self.stop_at: list[int | None] = [None] * len(prompts)
        self.finished_token = finished_token
        self.per_step: list = []  # the call's emitted tokens, a device tensor [B] per step (its consumer appends)
        self.rows_seen = 0

    def feed_row(self, row) -> bool:
        """One step's tokens (one per sequence) -> whether every sequence is done."""
        for b, tok in enumerate(row):
            if self.done[b]:
                continue
            if tok == self.finished_token:
                self.done[b] = True
                continue
            self.fed[b] += 1
            self.filters[b].push(self.detoks[b].push(tok))
            if self.filters[b].stopped:
                self.done[b], self.stop_at[b] = True, self.fed[b]
        self.rows_seen += 1
        return all(self.done)

    def check(self) -> bool:
        """Feed the steps of ``per_step`` not seen yet (one host transfer) -> whether every sequence is done."""
        if len(self.per_step) > self.rows_seen:
            import torch

            for row in torch.stack(self.per_step[self.rows_seen:]).tolist():  # [steps, B]
                self.feed_row(row)
        return all(self.done)
