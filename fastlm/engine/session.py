"""A session: one sequence's KV cache kept between calls, so a conversation prefills only its new turn.

Each call gives the *whole* token sequence so far (a chat template re-rendered over the conversation,
or a plain text continued). The session knows which tokens its cache holds (``tokens``), finds the
longest common prefix with the new sequence, and prefills only the rest: turn N costs turn N's tokens,
not the conversation's. A sequence that diverges from the cache (an edited turn, a template that
re-tokenises differently, dropped old turns) just keeps the shared prefix and prefills the remainder,
so the result is always what a fresh call on the whole sequence would give.

What the cache holds after a call: the prompt and every new token. A token is written to the cache
when a step feeds it, so a session's call runs one step more than a plain call, after its last token,
to feed that one too (skipped when the cache is full). A stream closed early (Ctrl-C in ``fastlm chat``)
keeps what it fed until then: every token it showed but the last.

The session owns its slot (a runner: cache and decode state) until ``close()``, and grows it (copying
the cached prefix) when a call needs more room, up to ``max_cache_len``. The cache is reused only
under the weights that filled it: re-patching the model, or replacing or updating any Parameter in
place, empties it (the next call prefills the whole sequence).
"""
from __future__ import annotations

import itertools
import threading

import torch

from fastlm.engine.runner import NO_TOKEN


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Session:
    """``fastlm.Session(model)``: generate / stream over one growing sequence with a persistent KV cache.

    ``generate`` and ``stream`` take the same arguments as :func:`fastlm.generate` /
    :func:`fastlm.stream` for one sequence (no batch, no ``attention_mask``), and ``max_cache_len``
    (default: the model's context) is the session's capacity in tokens."""

    def __init__(self, model, tokenizer=None, *, backend: str = "auto", max_cache_len: int | None = None,
                 cuda_graph: bool = True, compile: bool | str = False):
        from fastlm.engine.api import _int_arg, _prepare_model

        self.model, self.tokenizer = model, tokenizer
        self.backend, self.cuda_graph, self.compile = backend, cuda_graph, compile
        _prepare_model(model, backend)
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_cache_len = _int_arg("max_cache_len", max_cache_len, minimum=1, optional=True) or context
        self.tokens: list[int] = []   # what the cache holds, slot by slot
        self._slot = None
        self._busy = threading.Lock()
        self._cached_key = None
        self.last_prefill_tokens = 0  # tokens the last call prefilled (the rest came from the cache)

    def _weights_key(self):
        """Changes whenever the model is re-patched or any Parameter (or a quantized projection's qweight /
        scales buffer) is replaced or updated in place (``_version`` counts in-place writes): the cache is only
        reused under the weights that filled it."""
        from fastlm.patching import patch_id

        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        return patch_id(self.model), tuple((t.data_ptr(), t._version) for t in tensors)

    # ---- the engine's side -------------------------------------------------------------------
    def lease(self, prompt: list[int], length: int):
        """-> (slot, start): a slot with room for ``length`` tokens and the first slot to prefill."""
        from fastlm.engine.engine import LEN_ROUND, _Slot
        from fastlm.engine.runner import ModelRunner

        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this Session is already generating (finish or close its stream first)")
        try:
            if self._weights_key() != self._cached_key:  # the cached keys and values are of other weights
                self.tokens, self._slot = [], None
            # Keep at least the last prompt token to prefill: its logits give the first new token.
            start = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
            slot = self._slot
            if slot is None or slot.runner.max_len < length:
                size = min(max(-(-length // LEN_ROUND) * LEN_ROUND, 2 * (slot.runner.max_len if slot else 0)),
                           max(self.max_cache_len, length))
                with torch.inference_mode():
                    grown = _Slot(ModelRunner(self.model, 1, size))
                    if slot is not None and start:
                        for dst, src in zip(grown.runner.cache.k + grown.runner.cache.v,
                                            slot.runner.cache.k + slot.runner.cache.v):
                            dst[:, :, :start].copy_(src[:, :, :start])
                self._slot = slot = grown
            self.tokens = self.tokens[:start]
            self.last_prefill_tokens = len(prompt) - start
            return slot, start
        except BaseException:
            self._busy.release()
            raise

    def record(self, prompt: list[int], emitted: list[torch.Tensor], fed_last: bool = False) -> None:
        """After a call (finished, or closed early): the cache holds the prompt and the fed tokens (the
        last new token too when ``fed_last``)."""
        try:
            new = [t for t in torch.cat(emitted).tolist() if t != NO_TOKEN] if emitted else []
            if new:
                self.tokens = list(prompt) + (new if fed_last else new[:-1])
            else:
                self.tokens = list(prompt[: len(self.tokens)])
            self._cached_key = self._weights_key()
        finally:
            self._busy.release()

    # ---- the user's side ---------------------------------------------------------------------
    def _call(self, fn, input_ids, kw):
        if "attention_mask" in kw:
            raise TypeError("Session calls take one unpadded sequence: no attention_mask")
        for name, value in (("backend", self.backend), ("cuda_graph", self.cuda_graph),
                            ("compile", self.compile), ("max_cache_len", self.max_cache_len)):
            kw.setdefault(name, value)
        kw.setdefault("tokenizer", self.tokenizer)
        return fn(self.model, input_ids, session=self, **kw)

    def generate(self, input_ids, **kw):
        """:func:`fastlm.generate` on the session's sequence (``input_ids``: the whole sequence so far)."""
        from fastlm.engine.api import generate

        return self._call(generate, input_ids, kw)

    def stream(self, input_ids, **kw):
        """:func:`fastlm.stream` on the session's sequence (``input_ids``: the whole sequence so far)."""
        from fastlm.engine.api import stream

        return self._call(stream, input_ids, kw)

    def reset(self) -> None:
        """Forget the cached sequence (the cache itself is kept for the next call)."""
        self.tokens = []

    def close(self) -> None:
        """Free the session's cache."""
        self.tokens, self._slot = [], None
