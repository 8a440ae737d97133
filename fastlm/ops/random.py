"""The sampler's randomness: ``counter_uniform(seed, counter, rows, cols)``, fp32 uniforms in (0, 1) [rows, cols]
that are a pure function of (seed, counter, row-major index): no torch.Generator, no host sync, capturable, and
the same numbers on every device and through every path (eager, compiled, graph). fastlm/engine/sampling.py
draws its Gumbel noise from it.

The hash is lowbias32 (Wellons), a good 32-bit integer mixer: key = h(seed ^ h(counter * 0x9E3779B1)) for the step,
then u[i] = (h(h(i + key) ^ key) >> 9 + 0.5) / 2**23 for the i-th element (all mod 2**32; the low 32 bits of seed
and counter): in [2**-24, 1 - 2**-24], never 0 or 1. (With 24 bits, 2**24 - 1 + 0.5 rounded to 2**24 in fp32: u = 1,
a Gumbel noise of +inf, and the draw took that candidate whatever its score, masked or not, about once in 500 tokens
of a 32,000-token vocabulary.) The reference spells it in int64 tensor ops (no int64 overflow: 32-bit products by
16-bit halves), ~40 elementwise passes over the [rows, cols] indices: over a 32,000-token vocabulary 0.6 ms a draw
on CPU, as much as a sixth of a small model's token. The C++ kernel computes it in uint32 registers in one pass, bit
for bit the same (every step is exact integer arithmetic, and the conversion to fp32 is exact).
"""
from __future__ import annotations

import torch

from fastlm._checks import as_int, check_tensor
from fastlm.ops._registry import declare, dispatch

# the public op(s) and reference(s), re-exported by fastlm.ops
__all__ = ["counter_uniform", "counter_uniform_ref"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without int64 overflow (16-bit split of c)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform_ref(seed, counter, rows: int, cols: int):
    """seed [1], counter [1] (int64, one device) -> fp32 uniforms in (0, 1) [rows, cols]."""
    key = _hash32((seed & _M32) ^ _hash32(_mul32(counter & _M32, 0x9E3779B1)))  # [1]
    idx = torch.arange(rows * cols, device=seed.device, dtype=torch.int64).view(rows, cols)
    x = _hash32(_hash32((idx + key) & _M32) ^ key)
    return ((x >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # 23 bits + 0.5: exact in fp32


def _counter_uniform_fake(seed, counter, rows: int, cols: int):
    return seed.new_empty((rows, cols), dtype=torch.float32)


COUNTER_UNIFORM = declare("counter_uniform", counter_uniform_ref, fake=_counter_uniform_fake)


def _check_key(name: str, t) -> None:
    check_tensor(name, t)
    if t.dtype != torch.int64 or t.shape != (1,):
        raise ValueError(f"{name} must be an int64 tensor of shape (1,), got {t.dtype} of shape {tuple(t.shape)}")


def counter_uniform(seed: torch.Tensor, counter: torch.Tensor, rows: int, cols: int, *,
                    backend: str = "auto") -> torch.Tensor:
    """fp32 uniforms in (0, 1) of shape [rows, cols] for the step ``counter`` under ``seed`` (each an int64
    tensor of shape (1,), on the device the result is made on; their low 32 bits count)."""
    _check_key("seed", seed)
    _check_key("counter", counter)
    if counter.device != seed.device:
        raise ValueError(f"counter is on {counter.device} but seed is on {seed.device}")
    rows, cols = as_int("rows", rows, 0), as_int("cols", cols, 0)
    return dispatch("counter_uniform", backend, seed.device)(seed, counter, rows, cols)
