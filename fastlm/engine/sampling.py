"""Token sampling inside the decode step: no host sync, no torch.Generator, capturable.

Randomness comes from a counter-based hash (``uniform``; fastlm/ops/random.py's counter_uniform): the
uniform for (sequence b, candidate j) at step ``counter`` under ``seed`` is a pure function of those four
integers, computed with int64 tensor ops (a C++ kernel on CPU, bit for bit the same). So it compiles under
``torch.compile(fullgraph=True)``, replays inside a CUDA graph (seed and counter are device tensors, advanced
by the step itself), and the same seed gives the same tokens on every run, whatever the step is run through
(eager, compiled, graph).

Sampling follows ``transformers``' order: temperature, then top-k, then top-p (nucleus), then a draw.
The draw is Gumbel-max: ``argmax(logits / T + g)``, ``g = -log(-log(u))``, which samples from
``softmax(logits / T)`` restricted to the kept candidates. ``temperature <= 0`` means greedy (argmax;
the first maximum on ties, like ``torch.argmax`` in HF).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastlm.ops.random import counter_uniform


@dataclass(frozen=True)
class SamplingConfig:
    """Static sampling parameters: a change of config means a new compiled step / captured graph."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an int >= 1 (or None), got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (or None), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def structure(self) -> "SamplingConfig":
        """The config with only what decides the step's ops (greedy or not, top_k, whether top-p
        applies): the key of a compiled step or a captured graph. Temperature and top_p themselves are
        device tensors the step reads (``sample``'s ``temperature`` / ``top_p``), so changing them
        needs no new graph."""
        if self.greedy:
            return SamplingConfig()
        return SamplingConfig(1.0, self.top_k, 0.5 if self.top_p is not None and self.top_p < 1.0 else None)


def uniform(seed: torch.Tensor, counter: torch.Tensor, shape: tuple[int, int], device, backend: str = "auto"
            ) -> torch.Tensor:
    """fp32 uniforms in (0, 1) of ``shape`` [B, N] for (seed [1] int64, counter [1] int64) on ``device``
    (fastlm/ops/random.py's counter_uniform: the C++ kernel on CPU, bit for bit its reference elsewhere)."""
    del device  # seed's own
    return counter_uniform(seed, counter, shape[0], shape[1], backend=backend)


_ARGMAX_CHUNK = 128  # candidates a chunk in first_argmax


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1)`` of fp32 scores [B, V] -> [B] int64, the same index (the first maximum;
    a NaN counts as the maximum, the first NaN wins). On CPU in two passes over chunks of _ARGMAX_CHUNK
    candidates: each chunk's maximum (amax: vectorised), the first chunk holding the largest, then the first
    maximum within it. ATen's CPU argmax over one row is a scalar loop: over 32,000 candidates 52-79 us against
    14-35 us this way (2-core Zen 4, a token's decode is 4-7 ms). Elsewhere torch.argmax itself."""
    B, V = scores.shape
    if scores.device.type != "cpu" or V < 2 * _ARGMAX_CHUNK:
        return torch.argmax(scores, dim=-1)
    pad = -V % _ARGMAX_CHUNK
    if pad:  # -inf after the last candidate: never before a real maximum, and never a NaN
        scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
    chunks = scores.reshape(B, (V + pad) // _ARGMAX_CHUNK, _ARGMAX_CHUNK)  # [B, V / c, c]
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [B]: the first chunk whose maximum is the largest (or a NaN)
    within = chunks.gather(1, best.view(B, 1, 1).expand(B, 1, _ARGMAX_CHUNK)).squeeze(1).argmax(dim=-1)
    return best * _ARGMAX_CHUNK + within


def _gumbel_noise(seed, counter, shape: tuple[int, int], device, backend: str) -> torch.Tensor:
    """log(-log(u)) [B, N]: the draw is argmax(scores - noise)."""
    return torch.log(-torch.log(uniform(seed, counter, shape, device, backend)))


def _gumbel_argmax(scores: torch.Tensor, seed, counter, backend: str) -> torch.Tensor:
    return first_argmax(scores - _gumbel_noise(seed, counter, tuple(scores.shape), scores.device, backend))


def _nucleus(sorted_scores: torch.Tensor, sorted_probs: torch.Tensor, top_p) -> torch.Tensor:
    """Scores sorted descending and their probabilities -> the scores with the candidates after the nucleus set to
    -inf: those with more than top_p of the mass strictly above them (keeps >= 1). A prefix by construction
    (cummax): a rounding in the running sum cannot keep a candidate after a dropped one."""
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each candidate
    return sorted_scores.masked_fill((before > top_p).cummax(dim=-1).values, float("-inf"))


def _top_p_mask(sorted_scores: torch.Tensor, top_p) -> torch.Tensor:
    """Scores sorted descending -> the same outside the nucleus of their own softmax set to -inf (after top-k)."""
    return _nucleus(sorted_scores, sorted_scores.softmax(dim=-1), top_p)


# Candidates the CPU's top-p first tries (_top_p_in_prefix) before sorting the whole vocabulary: torch.sort over
# 32,000 fp32 scores is a 2.3 ms scalar sort on CPU, torch.topk of 1,024 of them ~0.1 ms (2-core Zen 4).
_TOP_P_PREFIX = 1024


def _top_p_sorted(scores: torch.Tensor, probs: torch.Tensor, noise: torch.Tensor, top_p) -> torch.Tensor:
    """Top-p without top-k: the whole vocabulary sorted descending, ties by index (stable), the nucleus of the
    probabilities ``probs`` (the softmax of the unsorted scores, gathered), then the Gumbel draw by sorted position
    (noise [B, V]) -> tokens [B]."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    kept = _nucleus(values, probs.gather(-1, indices), top_p)
    return indices.gather(-1, first_argmax(kept - noise).unsqueeze(-1)).squeeze(-1)


def _top_p_in_prefix(scores: torch.Tensor, probs: torch.Tensor, noise: torch.Tensor, top_p,
                     k: int = _TOP_P_PREFIX) -> torch.Tensor | None:
    """_top_p_sorted's tokens from the k best candidates alone, or None where they do not decide it. Taken when
    every row's nucleus closes before the first candidate holding the k-th best score: all candidates before it
    score higher, so they are the full sort's first ones in its order (topk's, re-sorted stably by index), with
    the same probabilities, running sums (a sequential cumsum) and noise (sliced from the same [B, V] tensor);
    from it on both mask everything. A row led by a NaN or an infinity (topk and sort order those apart) or a
    nucleus reaching the k-th score: None."""
    values, indices = torch.topk(scores, k, dim=-1)  # [B, k] descending, ties in any order
    by_index = indices.argsort(dim=-1)
    values, indices = values.gather(-1, by_index), indices.gather(-1, by_index)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    indices = indices.gather(-1, order)
    kept = _nucleus(values, probs.gather(-1, indices), top_p)
    first_tie = (values == values[:, -1:]).to(torch.uint8).argmax(dim=-1, keepdim=True)  # [B, 1]
    closed = kept.gather(-1, first_tie) == float("-inf")
    if not bool(torch.isfinite(values[:, 0]).all() and closed.all()):
        return None
    return indices.gather(-1, first_argmax(kept - noise[:, :k]).unsqueeze(-1)).squeeze(-1)


def sample(logits: torch.Tensor, config: SamplingConfig, seed: torch.Tensor, counter: torch.Tensor,
           temperature: torch.Tensor | None = None, top_p: torch.Tensor | None = None, *, backend: str = "auto"
           ) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next tokens [B] int64, entirely on the device. ``temperature``
    and ``top_p`` ([1] fp32 device tensors) override ``config``'s values (whose structure still decides
    the ops: see :meth:`SamplingConfig.structure`). ``backend`` runs the noise's op (the same numbers on
    every backend)."""
    if config.greedy:
        # widening is exact (same maximum, same first index on ties)
        return first_argmax(logits.float())
    # Shifted so the maximum is 0 before dividing: logits / T overflows to inf for tiny T (and inf - inf
    # is NaN in the softmax of top-p); shifted, a tiny T just tends to greedy, as it should.
    scores = logits.float()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / (config.temperature if temperature is None
                                                             else temperature)
    p = config.top_p if top_p is None else top_p
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        values, indices = torch.topk(scores, config.top_k, dim=-1)  # sorted descending
        if config.top_p is not None and config.top_p < 1.0:
            values = _top_p_mask(values, p)
        return indices.gather(-1, _gumbel_argmax(values, seed, counter, backend).unsqueeze(-1)).squeeze(-1)
    if config.top_p is not None and config.top_p < 1.0:
        probs = scores.softmax(dim=-1)  # [B, V] over the whole vocabulary (HF's top-p), in vocabulary order
        noise = _gumbel_noise(seed, counter, tuple(scores.shape), scores.device, backend)
        if scores.device.type == "cpu" and scores.shape[-1] > 2 * _TOP_P_PREFIX and not torch.compiler.is_compiling():
            tokens = _top_p_in_prefix(scores, probs, noise, p)  # the same tokens, or None (a host sync: CPU only)
            if tokens is not None:
                return tokens
        return _top_p_sorted(scores, probs, noise, p)
    return _gumbel_argmax(scores, seed, counter, backend)
