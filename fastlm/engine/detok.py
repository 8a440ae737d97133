"""Incremental detokenisation for streaming.

Decoding token by token and concatenating is wrong for byte-level BPE (a character split over several
tokens decodes to U+FFFD until its last byte arrives) and for SentencePiece-style tokenizers (a token's
leading space depends on what precedes it). So, as text-generation-inference does, keep a window of
ids: decode ``ids[prefix:read]`` and ``ids[prefix:]``, emit the difference when it is complete (does not
end in U+FFFD), then slide the window. The window starts with the prompt's last few tokens so the first
new token decodes in context.
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
