"""CUDA graphs for the decode step: one graph per (batch bucket, sampling structure), one shared pool.

All the step's inputs and outputs are the runner's static tensors (``DecodeState`` and the KV cache),
which the step updates in place; the host writes a new call's state with ``copy_`` / ``fill_`` before
the first replay (temperature and top_p included: they are device tensors, so a new temperature needs
no new graph) and ``clone()``s ``state.out`` after each replay. Capture happens before the call's
prefill, so the warm-up steps' writes into the cache are overwritten by that prefill.

Capture and replay run under the runner's device (a model on ``cuda:1`` while ``cuda:0`` is current)
and capture on an explicit side stream. If capture fails for one key (an op that cannot be captured,
out of memory, ...), that key decodes eagerly from then on, with one warning; other buckets keep
their graphs.
"""
from __future__ import annotations

import warnings

import torch


def batch_bucket(batch: int) -> int:
    """1, 2, 4, 8, ...: the batch a graph is captured for (extra rows run as finished sequences)."""
    bucket = 1
    while bucket < batch:
        bucket *= 2
    return bucket


class GraphRunner:
    def __init__(self, runner, warmup_steps: int = 2):
        self.runner = runner
        self.warmup_steps = warmup_steps
        self.graphs: dict = {}
        self.pool = None
        self.failed: dict = {}  # key -> why its capture failed (that key decodes eagerly)

    def prepare(self, batch: int, config) -> bool:
        """Capture the graph for (batch, config) if needed. False (after one warning) if capture fails."""
        key = (batch, config)
        if key in self.failed:
            return False
        if key in self.graphs:
            return True
        try:
            self.graphs[key] = self._capture(batch, config)
            return True
        except Exception as exc:  # capture is best effort: eager decode is always correct
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"fastlm: CUDA graph capture of the decode step failed for batch {batch} "
                          f"({self.failed[key]}); decoding that batch eagerly", RuntimeWarning, stacklevel=3)
            return False

    def _capture(self, batch: int, config) -> torch.cuda.CUDAGraph:
        runner = self.runner
        device = runner.device
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup_steps):  # lazy init (backend resolution, kernels, allocator)
                    runner.decode_step(batch, config)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=side), torch.inference_mode():
                runner.decode_step(batch, config)
            torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def replay(self, batch: int, config) -> None:
        with torch.cuda.device(self.runner.device):
            self.graphs[(batch, config)].replay()
