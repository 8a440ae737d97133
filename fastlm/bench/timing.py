"""Timing: warmup, then repeated timed batches; median / p20 / p80 of the per-call time in µs.

Each sample times a batch of ``inner`` calls (chosen so a batch lasts at least ``min_batch_s``), so
µs-scale ops are not dominated by timer overhead. On CUDA, samples are CUDA events around the batch,
with a synchronize before and after; on CPU, ``time.perf_counter``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Stats:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int
    inner: int = 1

    @staticmethod
    def from_samples_us(samples: list[float], inner: int = 1) -> "Stats":
        s = sorted(samples)
        return Stats(_pct(s, 50), _pct(s, 20), _pct(s, 80), len(s), inner)


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass
class TimingPolicy:
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 0.5      # stop adding samples after this much measured time (once min_reps are in)
    min_batch_s: float = 2e-4  # each sample lasts at least this long (inner calls per sample)


QUICK = TimingPolicy(warmup=2, min_reps=5, max_reps=30, budget_s=0.25)
FULL = TimingPolicy(warmup=3, min_reps=10, max_reps=200, budget_s=1.0)
TINY = TimingPolicy(warmup=1, min_reps=2, max_reps=3, budget_s=0.01, min_batch_s=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device | str, policy: TimingPolicy = QUICK) -> Stats:
    """Per-call time of ``fn()`` (µs): warmup, calibrate the batch size, then sample."""
    device = torch.device(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    min_reps = policy.min_reps
    if first > policy.budget_s:  # a slow call (100s of ms): one warmup is enough, fewer samples
        min_reps = min(min_reps, 3)
    else:
        for _ in range(policy.warmup - 1):
            fn()
        _sync(device)
    # calibrate: how many calls make one sample last min_batch_s
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(10_000, int(math.ceil(policy.min_batch_s / one))))
    samples: list[float] = []
    spent = 0.0
    cuda = device.type == "cuda"
    while len(samples) < policy.max_reps and (len(samples) < min_reps or spent < policy.budget_s):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(device)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            _sync(device)
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt / inner * 1e6)
    return Stats.from_samples_us(samples, inner)


def time_once(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall seconds of one call (synchronised on CUDA)."""
    device = torch.device(device)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0
