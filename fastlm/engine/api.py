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
``config.eos_token_id``, else the tokenizer's; ``ignore_eos=True`` disables them. Generation stops at
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

from typing import Iterator, Sequence

import torch

from fastlm.engine.engine import GenerationResult, engine_for, finalize
from fastlm.engine.runner import NO_TOKEN
from fastlm.engine.sampling import SamplingConfig


def _as_prompts(inputs, tokenizer, attention_mask) -> tuple[list[list[int]], bool]:
    """-> (prompts as lists of ids, whether the input was a single sequence)."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], str)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (pass tokenizer=...)")
        single = isinstance(inputs, str)
        texts = [inputs] if single else list(inputs)
        return [list(tokenizer(t)["input_ids"]) for t in texts], single
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 1:
            return [inputs.tolist()], True
        if inputs.dim() != 2:
            raise ValueError(f"input_ids must be 1-D or 2-D, got shape {tuple(inputs.shape)}")
        rows = inputs.tolist()
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).bool().tolist()
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
        return rows, False
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("no prompts given")
        if all(isinstance(t, int) for t in inputs):
            return [list(inputs)], True
        rows = [list(r.tolist() if isinstance(r, torch.Tensor) else r) for r in inputs]
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask).bool().tolist()
            rows = [[t for t, m in zip(r, mr) if m] for r, mr in zip(rows, mask)]
        return rows, False
    raise TypeError(f"unsupported prompt type {type(inputs).__name__}")


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
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def _prepare_model(model, backend: str):
    from fastlm.ops._backend import resolve
    from fastlm.patching import is_patched, patch, patched_backend

    if not hasattr(model, "lm_head") or not hasattr(model, "base_model"):
        raise TypeError(f"fastlm.generate needs a *ForCausalLM model, got {type(model).__name__}")
    want = patched_backend(model) if (backend == "auto" and is_patched(model)) else backend
    concrete = resolve(want, model.lm_head.weight.device.type)
    if patched_backend(model) != concrete:
        patch(model, concrete)
    return model


def _start(model, input_ids_or_prompts, *, tokenizer, max_new_tokens, temperature, top_k, top_p, seed,
           eos_token_id, ignore_eos, attention_mask, backend, cuda_graph, compile, max_cache_len, check_every):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts, single = _as_prompts(input_ids_or_prompts, tokenizer, attention_mask)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.get_input_embeddings().weight.shape[0]
    if any(t < 0 or t >= vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    config = SamplingConfig(float(temperature or 0.0), top_k, top_p)
    _prepare_model(model, backend)
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    limit = int(max_cache_len) if max_cache_len else context  # an explicit cache length may exceed the context
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context of {limit} tokens")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    stop_ids = _stop_ids(model, tokenizer, eos_token_id, ignore_eos)
    result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[len(p) for p in prompts])
    engine = engine_for(model, cuda_graph=cuda_graph, compile=compile)
    steps = engine.run(prompts, config=config, max_new_tokens=max_new_tokens, stop_ids=stop_ids, seed=int(seed),
                       limit=limit, result=result, check_every=check_every) if max_new_tokens > 0 else iter(())
    return prompts, single, result, steps


def generate(model, input_ids_or_prompts, tokenizer=None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, attention_mask=None,
             backend: str = "auto", cuda_graph: bool = True, *, compile: bool | str = False,
             max_cache_len: int | None = None, return_result: bool = False, check_every: int | None = None):
    """Generate new tokens (see the module docstring for inputs, outputs and stopping)."""
    prompts, single, result, steps = _start(
        model, input_ids_or_prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos,
        attention_mask=attention_mask, backend=backend, cuda_graph=cuda_graph, compile=compile,
        max_cache_len=max_cache_len, check_every=check_every)
    per_step = list(steps)
    finalize(result, per_step, result.prompt_lengths, max_new_tokens)
    if return_result:
        return result
    return result.tokens[0] if single else result.tokens


def stream(model, input_ids_or_prompts, tokenizer=None, max_new_tokens: int = 32, temperature: float = 0.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           eos_token_id: int | Sequence[int] | None = None, ignore_eos: bool = False, attention_mask=None,
           backend: str = "auto", cuda_graph: bool = True, *, compile: bool | str = False,
           max_cache_len: int | None = None, result: GenerationResult | None = None) -> Iterator:
    """Yield new tokens as they are generated (see the module docstring). Pass a
    :class:`GenerationResult` as ``result`` to receive finish reasons and timings when the stream ends."""
    prompts, single, res, steps = _start(
        model, input_ids_or_prompts, tokenizer=tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, ignore_eos=ignore_eos,
        attention_mask=attention_mask, backend=backend, cuda_graph=cuda_graph, compile=compile,
        max_cache_len=max_cache_len, check_every=1)
    per_step = []
    for emitted in steps:
        per_step.append(emitted)
        row = emitted.tolist()  # the one host sync per token a stream needs
        if all(t == NO_TOKEN for t in row):
            break
        if single:
            yield row[0]
        else:
            yield [None if t == NO_TOKEN else t for t in row]
    for _ in steps:  # drain (no-op after a break; lets the engine record its timings)
        pass
    finalize(res, per_step, res.prompt_lengths, max_new_tokens)
    if result is not None:
        result.__dict__.update(res.__dict__)
