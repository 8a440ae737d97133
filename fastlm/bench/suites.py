"""The suites by name, and the driver's plan: every case of the requested suites as a :class:`Task`
(so the driver knows the total for its progress bar). ``prefill`` and ``decode`` are one end-to-end
suite: both come from the same generate timings."""
from __future__ import annotations

import torch

from fastlm.bench.attention import Attention
from fastlm.bench.e2e import EndToEnd
from fastlm.bench.kernels import Kernels
from fastlm.bench.opcount import Opcount
from fastlm.bench.suite import Suite, Task


def make_suites(names, quantize=()) -> list[Suite]:
    """Suite objects for ``names`` (in fastlm.bench.SUITES order); ``quantize``: weight quantizations the
    end-to-end suites also run (``int8``, ``int4``)."""
    names = set(names)
    suites: list[Suite] = []
    if "kernels" in names:
        suites.append(Kernels())
    if "attention" in names:
        suites.append(Attention())
    e2e = [s for s in ("prefill", "decode") if s in names]
    if e2e:
        suites.append(EndToEnd(e2e, quantize))
    if "opcount" in names:
        suites.append(Opcount())
    return suites


def plan(names, scale: str, dtypes: list[torch.dtype], device: torch.device, quantize=()) -> list[Task]:
    return [t for suite in make_suites(names, quantize) for t in suite.tasks(scale, dtypes, device)]
