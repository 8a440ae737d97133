"""The decode engine: static KV cache, prefill, a static-shape decode step run eagerly, through
``torch.compile`` or as CUDA-graph replays, and the host loop around it.

The host loop never syncs per token (except when streaming, where the caller reads every token):
emitted tokens stay on the device (``state.out`` is cloned after each step) and the host checks the
device's "all finished" flag once every ``check_every`` steps. Capacity needs no sync either: the host
knows every prompt length, so it knows when no sequence can have room left, and the step itself stops a
sequence that reaches the limit (``CACHE_FULL``) and clamps cache writes into the allocation.
"""
from __future__ import annotations

import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch

from fastlm.engine.cuda_graphs import GraphRunner, batch_bucket
from fastlm.engine.runner import CACHE_FULL, EOS, MAX_STOP_IDS, NO_TOKEN, ModelRunner
from fastlm.engine.sampling import SamplingConfig, sample
from fastlm.modules import refresh_fused_weights

LEN_ROUND = 64  # cache lengths are allocated in multiples of this (reuse across calls)


@dataclass
class GenerationResult:
    """What one ``generate`` call produced, per sequence, plus timings for the whole batch."""

    tokens: list[list[int]]          # new tokens per sequence, up to and including a stop token
    finish_reasons: list[str]        # "eos", "length" (max_new_tokens) or "cache_full"
    prompt_lengths: list[int]
    prefill_s: float = 0.0           # prefill + first token (synced)
    decode_s: float = 0.0            # every later token (synced)
    decode_steps: int = 0            # decode steps run (batch-wide)
    mode: str = "eager"              # "eager", "compiled" or "cuda_graph"
    backend: str = "torch"
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Per-sequence decode rate: decode steps per second (multiply by the batch for throughput)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Slot:
    """One call's decode resources: a runner (KV cache, RoPE tables, decode state) and what is bound to
    it (CUDA graphs, the compiled step). A call holds its slot alone from prefill to its last token."""

    runner: ModelRunner
    graphs: GraphRunner | None = None
    compiled: object = None


class Engine:
    """Decodes with one patched model. Every call (``run``) leases a slot of its own, so interleaved
    streams and concurrent threads never share a KV cache or decode state; a finished call returns
    its slot, and the next call that fits reuses it (its cache and graphs) instead of allocating."""

    MAX_IDLE = 1  # idle slots kept for reuse (each holds a whole KV cache)

    def __init__(self, model, *, cuda_graph: bool = True, compile: bool | str = False, check_every: int = 8):
        """``compile``: False (eager), True (``torch.compile`` with inductor) or a torch.compile backend name."""
        self.model = model
        self.cuda_graph = cuda_graph
        self.compile = compile
        self.check_every = max(1, int(check_every))
        self._idle: list[_Slot] = []
        self._lock = threading.Lock()
        self._warned_eager_rope = False

    @property
    def runner(self) -> ModelRunner | None:
        """The runner the next fitting call would reuse (the most recently returned), or None."""
        with self._lock:
            return self._idle[-1].runner if self._idle else None

    # ---- capacity --------------------------------------------------------------------------
    def _acquire(self, rows: int, length: int) -> _Slot:
        """A slot with room for ``rows`` x ``length``: an idle one that fits, else a new one (after
        freeing the idle ones that do not fit, so their caches are not held while allocating)."""
        with self._lock:
            for i in range(len(self._idle) - 1, -1, -1):
                r = self._idle[i].runner
                if r.batch >= rows and r.max_len >= length:
                    return self._idle.pop(i)
            self._idle.clear()
        with torch.inference_mode():
            return _Slot(ModelRunner(self.model, rows, length))

    def _release(self, slot: _Slot) -> None:
        slot.runner.unbind()  # an idle slot holds no references to this call's weights
        with self._lock:
            self._idle.append(slot)
            del self._idle[:-self.MAX_IDLE]

    def _mode(self, slot: _Slot) -> str:
        runner = slot.runner
        want_fast = (runner.device.type == "cuda" and self.cuda_graph) or self.compile
        if want_fast and runner.rope.eager:
            if not self._warned_eager_rope:
                warnings.warn(f"fastlm: rope_type {runner.base.rotary_emb.rope_type!r} recomputes its tables "
                              "from the sequence length every step; decoding eagerly (no CUDA graph / compile)",
                              RuntimeWarning, stacklevel=4)
                self._warned_eager_rope = True
            return "eager"
        if runner.device.type == "cuda" and self.cuda_graph:
            if slot.graphs is None:
                slot.graphs = GraphRunner(runner)
            return "cuda_graph"
        if self.compile:
            return "compiled"
        return "eager"

    def _step_fn(self, slot: _Slot, mode: str):
        if mode == "compiled":
            if slot.compiled is None:
                backend = self.compile if isinstance(self.compile, str) else "inductor"
                slot.compiled = torch.compile(slot.runner.decode_step, fullgraph=True, dynamic=False,
                                              backend=backend)
            return slot.compiled
        return slot.runner.decode_step

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, prompts: list[list[int]], *, config: SamplingConfig, max_new_tokens: int, stop_ids: list[int],
            seed: int, limit: int, result: GenerationResult, check_every: int | None = None, session=None,
            stop_check=None) -> Iterator[torch.Tensor]:
        """Yield each step's emitted tokens: a device tensor [B] (NO_TOKEN = finished). Fills ``result``.

        The call leases its own slot for as long as it runs (until the generator finishes, or is
        closed or collected), so a paused stream keeps its cache while other calls decode. With a
        ``session`` (fastlm.engine.session, one prompt) the slot is the session's: only the prompt's
        tokens past what the session's cache already holds are prefilled. ``stop_check``: a callable asked
        at each "all finished" check whether the caller wants no more tokens (its stop strings matched)."""
        B = len(prompts)
        lengths_host = [len(p) for p in prompts]
        S = max(lengths_host)
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"at most {MAX_STOP_IDS} stop token ids are supported, got {len(stop_ids)}")
        model_device = self.model.get_input_embeddings().weight.device  # (a quantized lm_head has no weight)
        uses_graph = model_device.type == "cuda" and self.cuda_graph
        rows = batch_bucket(B) if uses_graph else B
        need = min(S + max_new_tokens - 1, limit)
        alloc = min(-(-need // LEN_ROUND) * LEN_ROUND, limit)
        if session is None:
            slot, start = self._acquire(rows, max(alloc, need)), 0
        else:
            slot, start = session.lease(prompts[0], max(alloc, need))
        fed_last = None if session is None else [False]
        steps = self._run(slot, prompts, rows, start, config=config, max_new_tokens=max_new_tokens,
                          stop_ids=stop_ids, seed=seed, limit=limit, result=result, check_every=check_every,
                          stop_check=stop_check, fed_last=fed_last)
        if session is None:
            try:
                yield from steps
            finally:
                self._release(slot)
            return
        emitted: list[torch.Tensor] = []  # what the session's cache now holds past the prompt
        try:
            for out in steps:
                emitted.append(out)
                yield out
        finally:
            steps.close()  # an early close: finish the inner generator before recording
            slot.runner.unbind()
            session.record(prompts[0], emitted, fed_last[0])

    def _run(self, slot: _Slot, prompts, rows: int, start: int, *, config, max_new_tokens, stop_ids,
             seed, limit, result, check_every, stop_check=None, fed_last: list | None = None
             ) -> Iterator[torch.Tensor]:
        """The call on ``slot``: prefill of every prompt's tokens from ``start`` on, then decode steps.
        ``fed_last`` (a session's call): a one-item list, set to
        True when the last new token was fed through the model too (the loop ran to its end and the
        cache had room)."""
        B = len(prompts)
        lengths_host = [len(p) for p in prompts]
        S = max(lengths_host) - start
        runner = slot.runner
        result.extra["prefill_tokens"] = sum(lengths_host) - B * start
        refresh_fused_weights(self.model)  # re-fuse where an HF Parameter was replaced since the last call
        limit = min(limit, runner.max_len)
        mode = self._mode(slot)
        if mode == "compiled":
            runner.unbind()
        else:  # eager steps and CUDA-graph captures run the pieces bound to this call's weights (refreshed above)
            runner.bind(rows, eager=True)
        check_every = self.check_every if check_every is None else max(1, int(check_every))
        result.mode, result.backend = mode, runner.backend
        device = runner.device
        # The step's ops depend on the sampling structure only; temperature / top_p are device tensors.
        step_config = config.structure()
        if mode == "cuda_graph" and not slot.graphs.prepare(rows, step_config):
            mode = result.mode = "eager"
        step = self._step_fn(slot, mode)

        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            ids = torch.zeros(B, S, dtype=torch.int64)
            for b, p in enumerate(prompts):
                ids[b, : len(p) - start] = torch.as_tensor(p[start:], dtype=torch.int64)
            ids = ids.to(device, non_blocking=True)
            lengths = torch.tensor(lengths_host, dtype=torch.int64).to(device, non_blocking=True)
            st = runner.state
            st.seed.fill_(seed)
            st.temperature.fill_(config.temperature if not config.greedy else 1.0)
            st.top_p.fill_(config.top_p if config.top_p is not None else 1.0)
            st.counter.zero_()
            st.limit.fill_(limit)
            stops = torch.full((MAX_STOP_IDS,), NO_TOKEN, dtype=torch.int64)
            stops[: len(stop_ids)] = torch.as_tensor(stop_ids, dtype=torch.int64)
            st.stop_ids.copy_(stops.to(device, non_blocking=True))
            logits = runner.prefill(ids, lengths, start)
            first = sample(logits, config, st.seed, st.counter, st.temperature, st.top_p, backend=runner.backend)
            is_stop = (first.unsqueeze(1) == st.stop_ids.unsqueeze(0)).any(dim=1)
            # Rows past B (bucket padding) are finished dummies: they decode at slot 0 and emit nothing.
            st.tokens.zero_()
            st.positions.zero_()
            st.out.fill_(NO_TOKEN)
            st.done.fill_(True)
            st.reason.fill_(EOS)
            st.tokens[:B].copy_(first)
            st.positions[:B].copy_(lengths)
            st.done[:B].copy_(is_stop)
            st.reason[:B].copy_(torch.where(is_stop, EOS, 0))
            st.out[:B].copy_(first)
            st.counter.fill_(1)
            out = st.out[:B].clone()
            _sync(device)
            result.prefill_s = time.perf_counter() - t0
        yield out

        t1 = time.perf_counter()
        steps = 0
        min_len = min(lengths_host)
        for s in range(1, max_new_tokens):
            if min_len + s - 1 >= limit:  # every sequence has finished or is out of room
                break
            if s % check_every == 0 and (bool(st.done[:B].all()) or (stop_check is not None and stop_check())):
                break
            with torch.inference_mode():
                if mode == "cuda_graph":
                    slot.graphs.replay(rows, step_config)
                else:
                    step(rows, step_config)
                out = st.out[:B].clone()
            steps += 1
            yield out
        _sync(device)
        result.decode_s = time.perf_counter() - t1
        result.decode_steps = steps
        result.extra["reason_codes"] = st.reason[:B].tolist()
        result.extra["limit"] = limit
        if fed_last is not None and min(lengths_host) + steps < limit:
            # A session's reply ends with a token that no step has fed yet: one more step writes its keys
            # and values (its own sample is dropped), so the next call prefills only its new tokens.
            with torch.inference_mode():
                if mode == "cuda_graph":
                    slot.graphs.replay(rows, step_config)
                else:
                    step(rows, step_config)
            fed_last[0] = True


def finalize(result: GenerationResult, per_step: list[torch.Tensor], prompt_lengths: list[int], max_new_tokens: int
             ) -> GenerationResult:
    """Turn the per-step device tensors into per-sequence token lists and finish reasons."""
    B = len(prompt_lengths)
    table = torch.stack(per_step, dim=1).tolist() if per_step else [[] for _ in range(B)]
    codes, limit = result.extra.get("reason_codes", [0] * B), result.extra.get("limit", 0)
    tokens, reasons = [], []
    for b in range(B):
        row = table[b]
        n = row.index(NO_TOKEN) if NO_TOKEN in row else len(row)
        tokens.append(row[:n])
        if codes[b] == EOS:
            reasons.append("eos")
        elif codes[b] == CACHE_FULL:
            reasons.append("cache_full")
        elif n >= max_new_tokens:
            reasons.append("length")
        elif prompt_lengths[b] + n - 1 >= limit:
            reasons.append("cache_full")
        else:
            reasons.append("length")
    result.tokens, result.finish_reasons, result.prompt_lengths = tokens, reasons, list(prompt_lengths)
    full = reasons.count("cache_full")
    if full:
        warnings.warn(f"fastlm: {full} sequence(s) stopped at the KV cache capacity of {limit} tokens "
                      "(finish reason 'cache_full')", RuntimeWarning, stacklevel=3)
    return result


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model, *, cuda_graph: bool, compile: bool) -> Engine:
    """The engine cached on ``model``, rebuilt when the model was (re-)patched or its dtype, device,
    quantization or the options changed. Keyed on ``patch()``'s own id for the patch, never on ``id()`` of a
    tensor (ids are reused); weight changes need no new engine: each call re-checks the fused weights."""
    from fastlm.patching import patch_id, patch_quantization

    embed = model.get_input_embeddings().weight  # the model's dtype and device (a quantized lm_head has no weight)
    key = (patch_id(model), patch_quantization(model), embed.dtype, embed.device, bool(cuda_graph), compile)
    with _ENGINES_LOCK:
        entry = _ENGINES.get(model)
        if entry is None or entry[0] != key:
            entry = (key, Engine(model, cuda_graph=cuda_graph, compile=compile))
            _ENGINES[model] = entry
        return entry[1]
