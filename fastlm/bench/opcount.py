"""Ops dispatched per decoder layer per decode step.

:func:`count_ops_per_layer` runs one decode-step forward (one new token per sequence after a short
prefill into a ``DynamicCache``) under a ``TorchDispatchMode`` and counts the non-view ops that
reach the dispatcher while a decoder layer is executing (forward pre/post hooks on
``base_model.layers[i]``). Ops outside the layers (embedding, rotary tables, mask, final norm,
lm_head) are excluded exactly, with no need to count 1- and 2-layer models and take a difference.
A fused op registered through ``torch.library`` counts as one op; a plain-PyTorch composition
counts each aten op it calls. On a GPU each counted op is (at least) one kernel launch.
"""
from __future__ import annotations

import collections
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.bench import configs
from fastlm.bench.backends import discover, timed_backend
from fastlm.bench.suite import Built, Suite, error_text


# Ops with no alias annotation in their schema that still only re-describe an existing buffer.
_METADATA_ONLY = {"aten._unsafe_view", "aten.lift_fresh", "aten.alias", "aten.detach", "aten._reshape_alias"}


def is_view_op(func) -> bool:
    """Whether an OpOverload only makes a view/alias (no kernel runs): transpose, view, slice, ..."""
    try:
        if str(func.overloadpacket) in _METADATA_ONLY:
            return True
        if func.is_view:
            return True
        returns = func._schema.returns
        return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
    except Exception:
        return False


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.depth = 0
        self.inside = collections.Counter()
        self.outside = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_view_op(func):
            self.views += 1
        else:
            (self.inside if self.depth > 0 else self.outside)[str(func)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class OpCount:
    per_layer: float                 # non-view ops inside decoder layers / number of layers
    num_layers: int
    inside_layers: int               # total over all layers
    outside_layers: int              # embedding, rotary, mask, final norm, lm_head, sampling-free
    by_op: collections.Counter = field(default_factory=collections.Counter)  # inside layers, all layers

    def top(self, n: int = 8) -> str:
        L = max(self.num_layers, 1)
        return ", ".join(f"{name.replace('aten.', '').replace('.default', '')}x{c / L:g}"
                         for name, c in self.by_op.most_common(n))


def _base(model):
    return getattr(model, "base_model", model)


@contextmanager
def _patched_as(model, backend):
    """Temporarily run ``model`` patched with ``backend`` (or unpatched for None); restores the
    model's previous patch state afterwards."""
    import fastlm
    from fastlm.patching import patched_backend

    before = patched_backend(model) if fastlm.is_patched(model) else None
    try:
        if backend is None:
            if before is not None:
                fastlm.unpatch(model)
        else:
            fastlm.patch(model, backend)
        yield model
    finally:
        now = patched_backend(model) if fastlm.is_patched(model) else None
        if now != before:
            if before is None:
                fastlm.unpatch(model)
            else:
                fastlm.patch(model, before)


def count_decode_step_ops(model, backend: str | None = None, *, batch: int = 1, context: int = 8,
                          input_ids: torch.Tensor | None = None, cache=None) -> OpCount:
    """Count ops for one decode step of ``model`` (a ``*ForCausalLM`` or base model).

    ``backend``: a fastlm backend (``"torch"``, ``"cpp"``, ``"triton"``, ``"auto"``) to patch with for
    the count, or None for plain ``transformers`` (a patched model is unpatched for the count). The
    model's patch state is restored afterwards. ``context`` prompt tokens (random ids, or
    ``input_ids`` [B, S]) are prefilled into a fresh ``DynamicCache`` (or ``cache``) uncounted, then
    one token per sequence is run under the counter."""
    from transformers import DynamicCache

    base = _base(model)
    layers = list(base.layers)
    param = next(model.parameters())
    device = param.device
    if input_ids is None:
        vocab = int(getattr(model.config, "vocab_size", 256))
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, vocab, (batch, context + 1), generator=g).to(device)
    prompt, step = input_ids[:, :-1], input_ids[:, -1:]
    counter = _Counter()

    def pre(module, args, kwargs=None):
        counter.depth += 1

    def post(module, args, out):
        counter.depth -= 1

    # transformers >= 5.24 names the cache argument `cache` (`past_key_values` before)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with _patched_as(model, backend), torch.no_grad():
        if cache is None:
            cache = DynamicCache(config=model.config)
        model(input_ids=prompt, use_cache=True, **{cache_arg: cache})
        handles = [m.register_forward_pre_hook(pre) for m in layers]
        handles += [m.register_forward_hook(post) for m in layers]
        try:
            with counter:
                model(input_ids=step, use_cache=True, **{cache_arg: cache})
        finally:
            for h in handles:
                h.remove()
    inside = sum(counter.inside.values())
    return OpCount(inside / max(len(layers), 1), len(layers), inside, sum(counter.outside.values()),
                   counter.inside)


def count_ops_per_layer(model, backend: str | None = None, *, batch: int = 1, context: int = 8,
                        input_ids: torch.Tensor | None = None) -> float:
    """Non-view aten (or fused ``fastlm::``) ops dispatched per decoder layer for one decode step.

    ``backend=None`` counts plain ``transformers``; a backend name counts ``fastlm.patch(model,
    backend)``. The model is returned to its previous patch state. See :func:`count_decode_step_ops`
    for the per-op breakdown."""
    return count_decode_step_ops(model, backend, batch=batch, context=context, input_ids=input_ids).per_layer


@dataclass(frozen=True)
class OpcountCase:
    family: str
    name = property(lambda self: f"{self.family}/decode-step")
    group = property(lambda self: self.family)
    shape = "decode-step"


class Opcount(Suite):
    """The ``opcount`` suite: ops per decoder layer per decode step, per family (test-sized models: the
    count does not depend on the sizes), plain ``transformers`` (``hf``) and patched per backend (an
    interpreter counts too: it dispatches the same ops)."""
    name = "opcount"
    per_dtype = False

    def __init__(self):
        self._model = None  # (family, device, dtype, model)

    def cases(self, scale=None, device=None):
        return [OpcountCase(f) for f in configs.FAMILIES]

    def providers(self, device_type):
        return ["hf"] + [f"fastlm-{b.name}" for b in discover(device_type)]

    def build(self, case, provider, device, dtype):
        backend = None if provider == "hf" else timed_backend(provider, torch.device(device).type, timed=False)
        key = (case.family, torch.device(device), dtype)
        if self._model is None or self._model[0] != key:
            self._model = None
            sizes = configs.model_sizes(case.family, "tiny", torch.device(device).type)
            self._model = (key, configs.build_model(case.family, sizes, device, dtype))
        model = self._model[1]
        return Built(lambda: count_decode_step_ops(model, backend), rounds=1,
                     info=lambda oc: dict(ops_per_layer=oc.per_layer, top=oc.top(8)))

    def rows(self, ctx, case, dtype):
        out = []
        for provider in self.providers(ctx.device.type):
            built, row = self.prepare(ctx, case, provider, dtype)
            if built is not None:
                row = self.row(ctx, case, provider, dtype)
                try:
                    oc = built.fn()
                    row.ops_per_layer = oc.per_layer
                    row.note = f"top ops/layer: {oc.top(6)}; outside layers: {oc.outside_layers}"
                    if provider == "fastlm-triton" and ctx.device.type == "cpu":
                        row.note = "counted under the Triton interpreter; " + row.note
                except Exception as exc:
                    row.status, row.note = "failed", error_text(exc)
            out.append(row)
        return out
