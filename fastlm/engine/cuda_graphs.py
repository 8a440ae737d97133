"""CUDA graphs for the decode step: one graph per (batch bucket, sampling config), one shared pool.

All the step's inputs and outputs are the runner's static tensors (``DecodeState`` and the KV cache),
which the step updates in place; the host writes a new call's state with ``copy_`` before the first
replay and ``clone()``s ``state.out`` after each replay. Capture happens before the call's prefill,
so the warm-up steps' writes into the cache are overwritten by that prefill.

If capture fails (an op that cannot be captured, out of memory, ...), ``GraphRunner.run`` warns once
and the engine decodes eagerly from then on.
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
        self.failed: str | None = None

    def prepare(self, batch: int, config) -> bool:
        """Capture the graph for (batch, config) if needed. False (after one warning) if capture fails."""
        if self.failed is not None:
            return False
        key = (batch, config)
        if key in self.graphs:
            return True
        try:
            self.graphs[key] = self._capture(batch, config)
            return True
        except Exception as exc:  # capture is best effort: eager decode is always correct
            self.failed = f"{type(exc).__name__}: {exc}"
            self.graphs.clear()
            warnings.warn(f"fastlm: CUDA graph capture of the decode step failed ({self.failed}); "
                          "decoding eagerly instead", RuntimeWarning, stacklevel=3)
            return False

    def _capture(self, batch: int, config) -> torch.cuda.CUDAGraph:
        runner = self.runner
        side = torch.cuda.Stream(device=runner.device)
        side.wait_stream(torch.cuda.current_stream(runner.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(self.warmup_steps):  # lazy init (backend resolution, kernels, allocator)
                runner.decode_step(batch, config)
        torch.cuda.current_stream(runner.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            runner.decode_step(batch, config)
        if self.pool is None:
            self.pool = graph.pool()
        return graph

    def replay(self, batch: int, config) -> None:
        self.graphs[(batch, config)].replay()
