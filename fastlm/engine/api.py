"""``fastlm.generate`` and ``fastlm.stream``: the Python API over the engine.

Inputs (``input_ids_or_prompts``), one of:

* a 1-D tensor or a list of ints: one sequence;
* a 2-D tensor [B, S] (with ``attention_mask``, left- or right-padded: only positions where the mask is
  1 are kept), or a list of lists of ints: a batch;
* a string or a list of strings: tokenised with ``tokenizer`` (special tokens added as the tokenizer does).

Outputs. ``generate`` returns the **new** token ids only, as Python lists: ``list[int]`` for a single
sequence (1-D tensor, list of ints, string), ``list[list[int]]`` for a batch, one list per sequence, of
its own length (no padding): a sequence that stopped on a stop token ends with that token. With
``return_result=True`` it returns a :class:`GenerationResult` (tokens, finish reasons, timings).
``stream`` yields as tokens come: an ``int`` per step for a single sequence; for a batch, a list with
one entry per sequence, ``None`` for a sequence that has already finished.

Stop tokens: ``eos_token_id`` (int or list), else the model's ``generation_config.eos_token_id``, else
``config.eos_token_id``, else the tokenizer's; ``ignore_eos=True`` disables them. ``stop_strings`` (a
string or a list; needs ``tokenizer``) are matched on the detokenised text: a sequence whose text reaches
one ends with the token that completed it (finish reason ``stop``; the text itself is for the caller to
cut). ``generate`` checks them every ``check_every`` steps, in one host transfer of those steps' tokens (so
a batch may decode a few steps past its last match); ``stream`` checks every token. Generation stops at
``max_new_tokens``, or at the KV cache capacity: ``max_cache_len`` tokens per sequence (prompt
included; default ``max_position_embeddings``); a sequence that hits it finishes with reason ``cache_full``
(and a warning), never writing past the cache.

Sampling: ``temperature=0`` is greedy; otherwise temperature, then ``top_k``, then ``top_p``, drawn on
the device from a counter-based generator keyed by ``seed`` (the same seed gives the same tokens; no
seed draws one from ``torch``'s global generator).

The model: any Arcee / StableLM / Persimmon / Helium ``*ForCausalLM``. It is patched in place with
:func:`fastlm.patch` if it is not already (``backend="auto"`` keeps a patched model's backend; another
backend re-patches it). On CUDA the decode step is replayed as CUDA graphs unless ``cuda_graph=False``;
``compile=True`` runs it through ``torch.compile(fullgraph=True)`` instead of eagerly (CPU; a string names
the torch.compile backend, e.g. ``"aot_eager"``). ``check_every`` (default 8): steps between the host's
checks of the on-device "all finished" flag (the only syncs of a non-streaming decode).
"""
from __future__ import annotations

import operator
from typing import Iterator, Sequence

import torch

from fastlm.engine.detok import StopStringWatch
from fastlm.engine.engine import GenerationResult, engine_for, finalize
from fastlm.engine.runner import NO_TOKEN
from fastlm.engine.sampling import SamplingConfig


def _int_arg(name: str, value, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a Python int (anything with ``__index__``, not bool), or one ValueError / TypeError
    naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int{' (or None)' if optional else ''}, got {type(value).__name__} "
                        f"{value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float_arg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _id_rows(name: str, value) -> list[list[int]]:
    """A 1-D/2-D integer tensor or (nested) list of ints -> rows of Python ints (one error naming ``name``)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a {value.dtype} tensor")
        if value.dim() not in (1, 2):
            raise ValueError(f"{name} must be 1-D [S] or 2-D [B, S], got shape {tuple(value.shape)}")
        rows = value.tolist()
        return [rows] if value.dim() == 1 else rows
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of ints, got {type(value).__name__}")
    if all(not isinstance(v, (list, tuple, torch.Tensor)) for v in value):
        value = [value]
    rows = []
    for r in value:
        if isinstance(r, torch.Tensor):
            if r.dim() != 1:
                raise ValueError(f"each sequence in {name} must be 1-D, got shape {tuple(r.shape)}")
            rows.extend(_id_rows(name, r))
            continue
        if not isinstance(r, (list, tuple)):
            raise TypeError(f"{name} must be a list of ints or a list of lists of ints, got an element "
                            f"{type(r).__name__} {r!r}")
        for t in r:
            if isinstance(t, (bool, float)) or not hasattr(type(t), "__index__"):
                raise TypeError(f"{name} must hold integer token ids, got {type(t).__name__} {t!r}")
        rows.append([operator.index(t) for t in r])
    return rows


def _as_prompts(inputs, tokenizer, attention_mask) -> tuple[list[list[int]], bool]:
    """-> (prompts as lists of ids, whether the input was a single sequence)."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (pass tokenizer=...)")
        if attention_mask is not None:
            raise ValueError("attention_mask applies to token ids; text prompts are tokenised without padding")
        if not isinstance(inputs, str) and not all(isinstance(t, str) for t in inputs):
            raise TypeError("a list of prompts must be all strings or all token ids")
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        return [list(tokenizer(t)["input_ids"]) for t in texts], single
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise ValueError("input_ids is empty: no prompts given")
    single = (isinstance(inputs, torch.Tensor) and inputs.dim() == 1) or (
        isinstance(inputs, (list, tuple)) and all(not isinstance(v, (list, tuple, torch.Tensor)) for v in inputs))
    rows = _id_rows("input_ids", inputs)
    if attention_mask is not None:
        mask = _id_rows("attention_mask", attention_mask.long() if isinstance(attention_mask, torch.Tensor)
                        and attention_mask.dtype == torch.bool else attention_mask)
        shape = [len(r) for r in rows]
        if [len(r) for r in mask] != shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else [len(r) for r in mask]
            want = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else shape
            raise ValueError(f"attention_mask must have input_ids' shape {want}, got {got}")
        if any(m not in (0, 1) for r in mask for m in r):
            raise ValueError("attention_mask must hold only 0 and 1")
        rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
        if any(not r for r in rows):
            raise ValueError("attention_mask masks out every token of a prompt")
    return rows, single


def _stop_ids(model, tokenizer, eos_token_id, ignore_eos: bool) -> list[int]:
    if ignore_eos:
        return []
    ids = eos_token_id
    if ids is None:
        gen = getattr(model, "generation_config", None)
        ids = getattr(gen, "eos_token_id", None) if gen is not None else None
    if ids is None:
        ids = getattr(model.config, "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [_int_arg("eos_token_id", i, minimum=0) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _prepare_model(model, backend: str):
    from fastlm.ops._registry import resolve
    from fastlm.patching import is_patched, patch, patch_quantization, patched_backend

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "lm_head") or not hasattr(model, "base_model"):
        raise TypeError(f"fastlm.generate needs a *ForCausalLM model, got {type(model).__name__}")
    want = patched_backend(model) if (backend == "auto" and is_patched(model)) else backend
    concrete = resolve(want, model.get_input_embeddings().weight.device.type)
    if patched_backend(model) != concrete:
        patch(model, concrete, quantize=patch_quantization(model))  # another backend keeps the quantization
    return model


def _stop_strings(stop_strings, tokenizer) -> list[str]:
    if stop_strings is None:
        return []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) for s in stop_strings):
        raise TypeError(f"stop_strings must be a string or a list of strings, got {stop_strings!r}")
    if any(not s for s in stop_strings):
        raise ValueError("stop_strings must not contain an empty string")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings are matched on decoded text: pass tokenizer=...")
    return list(stop_strings)


def _start(model, input_ids_or_prompts, *, tokenizer, max_new_tokens, temperature, top_k, top_p, seed,
           eos_token_id, ignore_eos, attention_mask, backend, cuda_graph, compile, max_cache_len, check_every,
           session=None, stop_strings=None):
    """Check every argument, patch the model if needed, and return the engine's (not yet started) steps
    and the stop-string watch (None without ``stop_strings``)."""
    from fastlm.ops._registry import BACKEND_CHOICES

    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, minimum=0)
    max_cache_len = _int_arg("max_cache_len", max_cache_len, minimum=1, optional=True)
    check_every = _int_arg("check_every", check_every, minimum=1, optional=True)
    seed = _int_arg("seed", seed, minimum=0, optional=True)
    if seed is not None and seed >= 2**32:  # the sampler keys on 32 bits (fastlm.engine.sampling)
        raise ValueError(f"seed must be < 2**32, got {seed}")
    config = SamplingConfig(_float_arg("temperature", 0.0 if temperature is None else temperature),
                            _int_arg("top_k", top_k, minimum=1, optional=True),
                            None if top_p is None else _float_arg("top_p", top_p))
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be a bool or a torch.compile backend name, got {type(compile).__name__}")
    stop_strings = _stop_strings(stop_strings, tokenizer)
    prompts, single = _as_prompts(input_ids_or_prompts, tokenizer, attention_mask)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if session is not None and not single:
        raise ValueError("a Session holds one sequence: pass one prompt (1-D ids, a list of ints or a string)")
    _prepare_model(model, backend)
    vocab = model.get_input_embeddings().weight.shape[0]
    bad = next((t for p in prompts for t in p if t < 0 or t >= vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad}")
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    limit = max_cache_len or context  # an explicit cache length may exceed the context
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context of {limit} tokens")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    stop_ids = _stop_ids(model, tokenizer, eos_token_id, ignore_eos)
    from fastlm.patching import patched_backend

    result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[len(p) for p in prompts],
                              backend=patched_backend(model))
    watch = StopStringWatch(tokenizer, prompts, stop_strings, NO_TOKEN) if stop_strings else None
    engine = engine_for(model, cuda_graph=bool(cuda_graph), compile=compile)
    steps = engine.run(prompts, config=config, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=seed,
                       limit=limit, result=result, check_every=check_every, session=session,
                       stop_check=None if watch is None else watch.check) if max_new_tokens > 0 else iter(())
    return prompts, single, result, steps, watch


def _finish(result: GenerationResult, per_step: list[torch.Tensor], watch, max_new_tokens: int) -> None:
    """finalize, with each sequence that reached a stop string cut after the token that completed it."""
    stopped = []
    if watch is not None and per_step:
        watch.check()  # the steps since the last check
        stopped = [b for b, n in enumerate(watch.stop_at) if n is not None]
        if stopped:
            table = torch.stack(per_step)  # [steps, B]
            codes = result.extra.get("reason_codes")
            for b in stopped:
                table[watch.stop_at[b]:, b] = NO_TOKEN
                if codes is not None:
                    codes[b] = 0  # whatever the device saw after the stop string does not count
            per_step = list(table.unbind(0))
    finalize(result, per_step, result.prompt_lengths, max_new_tokens)
    for b in stopped:
        result.finish_reasons[b] = "stop"


def generate(model, input_ids_or_prompts, tokenizer=None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, attention_mask=None,
             backend: str = "auto", cuda_graph: bool = True, *, compile: bool | str = False,
             max_cache_len: int | None = None, return_result: bool = False, check_every: int | None = None,
             session=None, stop_strings: str | Sequence[str] | None = None):
    """Generate new tokens (see the module docstring for inputs, outputs and stopping). ``session``: a
    :class:`fastlm.Session` whose cache continues (used by ``Session.generate``)."""
    prompts, single, result, steps, watch = _start(
        model, input_ids_or_prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos,
        attention_mask=attention_mask, backend=backend, cuda_graph=cuda_graph, compile=compile,
        max_cache_len=max_cache_len, check_every=check_every, session=session, stop_strings=stop_strings)
    per_step = [] if watch is None else watch.per_step  # the watch reads it at the engine's checks
    per_step.extend(steps)
    _finish(result, per_step, watch, operator.index(max_new_tokens))
    if return_result:
        return result
    return result.tokens[0] if single else result.tokens


def stream(model, input_ids_or_prompts, tokenizer=None, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, attention_mask=None,
           backend: str = "auto", cuda_graph: bool = True, *, compile: bool | str = False,
           max_cache_len: int | None = None, result: GenerationResult | None = None, session=None,
           stop_strings: str | Sequence[str] | None = None) -> Iterator:
    """Yield new tokens as they are generated (see the module docstring). Pass a
    :class:`GenerationResult` as ``result`` to receive finish reasons and timings when the stream ends.
    Arguments are checked (and the model patched) at the call, not at the first ``next()``; the stream
    owns its KV cache and decode state, so streams and other calls on the same model can interleave."""
    prompts, single, res, steps, watch = _start(
        model, input_ids_or_prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos,
        attention_mask=attention_mask, backend=backend, cuda_graph=cuda_graph, compile=compile,
        max_cache_len=max_cache_len, check_every=1, session=session, stop_strings=stop_strings)
    if result is not None and not isinstance(result, GenerationResult):
        raise TypeError(f"result must be a fastlm GenerationResult (or None), got {type(result).__name__}")
    return _stream(single, res, steps, result, operator.index(max_new_tokens), watch)


def _stream(single: bool, res: GenerationResult, steps, result: GenerationResult | None, max_new_tokens: int,
            watch) -> Iterator:
    per_step = [] if watch is None else watch.per_step
    try:
        for emitted in steps:
            per_step.append(emitted)
            row = emitted.tolist()  # the one host sync per token a stream needs
            if watch is not None:  # a sequence that reached a stop string emits nothing more
                before = list(watch.done)
                watch.feed_row(row)
                row = [NO_TOKEN if was_done else t for t, was_done in zip(row, before)]
            if all(t == NO_TOKEN for t in row):
                break
            if single:
                yield row[0]
            else:
                yield [None if t == NO_TOKEN else t for t in row]
        for _ in steps:  # drain (no-op after a break; lets the engine record its timings)
            pass
    finally:
        if hasattr(steps, "close"):  # (max_new_tokens=0: an empty iterator)
            steps.close()  # closed early (the caller's close(), an exception): the slot goes back now
    _finish(res, per_step, watch, max_new_tokens)
    if result is not None:
        result.__dict__.update(res.__dict__)
