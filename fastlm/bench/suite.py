"""What every suite exposes, to the ``fastlm bench`` driver and to the pytest-benchmark files in
``benchmarks/`` alike: ``cases(scale, device)``, ``providers(device_type)`` and
``build(case, provider, device, dtype)``, which returns a :class:`Built` or raises :class:`Unavailable`.
The driver turns each case into result rows with ``rows(ctx, case, dtype)``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastlm.bench.results import Row
from fastlm.bench.timing import Stats, TimingPolicy, measure


class Unavailable(Exception):
    """A provider cannot run this case here; the message says why (a skipped row, or a pytest skip)."""


@dataclass
class Built:
    """One (case, provider), ready to run. Use it before building the next: builds may share inputs and
    models (a model is patched for the provider being built)."""
    fn: Callable[[], object]               # what is timed: one op call, one generate(N), one op count
    nbytes: float = math.nan               # bytes the op must move (kernels, attention)
    expected: Callable[[], object] | None = None  # the baseline's output, to check this provider's against
    note: str = ""
    generate: Callable[[int], object] | None = None  # end to end: generate n new tokens
    rounds: int | None = None              # pytest-benchmark: fixed rounds for slow calls (None: calibrated)
    info: Callable[[object], dict] | None = None  # pytest-benchmark extra_info from fn's result


@dataclass
class Context:
    """What the driver knows while it runs the cases."""
    device: torch.device
    scale: str                       # tiny | quick | full
    policy: TimingPolicy
    copy_bw_gbs: float = math.nan
    read_bw_gbs: float = math.nan    # decode rows: weight + KV bytes per token against this
    compile: bool = True
    compile_timeout_s: float = 300.0
    progress: object = None
    selected: Callable[[str, str], bool] = field(default=lambda suite, case: True)
    provider_selected: Callable[[str], bool] = field(default=lambda provider: True)  # --providers
    rounds: int | None = None        # end-to-end: timed rounds per case (None: the mode's)
    info: dict = field(default_factory=dict)  # extra facts for the summary (model sizes)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.note(text)


@dataclass
class Task:
    """One case of one suite in one dtype: the driver's unit of progress."""
    suite: str
    label: str
    run: Callable[[Context], list[Row]]
    keys: list = field(default_factory=list)  # (suite, case) pairs this task can produce, for --filter


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def snapshot(out) -> list[torch.Tensor]:
    """Copies of an output's tensors (an in-place op or a reused buffer may overwrite them later)."""
    return [t.clone() for t in _flat(out)]


def mismatch_note(out, expected, dtype: torch.dtype) -> str:
    """A warning when ``out`` differs from ``expected`` beyond rounding (max difference / max |expected|)."""
    try:
        worst = 0.0
        for x, y in zip(_flat(out), _flat(expected)):
            x, y = x.float(), y.float()
            worst = max(worst, (x - y).abs().max().item() / max(y.abs().max().item(), 1e-6))
    except Exception as exc:
        return f"could not compare with eager ({error_text(exc)})"
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    return f"WARNING: output differs from eager (max rel diff {worst:.2e})" if worst > tol else ""


def fill_stats(row: Row, stats: Stats, ctx: Context, nbytes: float = math.nan) -> Row:
    row.median_us, row.p20_us, row.p80_us, row.reps = stats.median_us, stats.p20_us, stats.p80_us, stats.reps
    if nbytes == nbytes:  # not NaN
        row.bytes = nbytes
        row.gb_per_s = nbytes / (stats.median_us * 1e-6) / 1e9
        if not math.isnan(ctx.copy_bw_gbs):
            row.copy_bw_frac = row.gb_per_s / ctx.copy_bw_gbs
    return row


class Suite:
    """Base of the suites. Subclasses set ``name`` and implement ``cases``, ``providers`` and ``build``;
    a case has ``name``, ``group`` and ``shape``. The default ``rows`` times ``Built.fn`` per provider."""
    name: str = ""
    label: str = ""                  # the tasks' progress label, when it is not the name
    compiling: tuple[str, ...] = ()  # providers that run torch.compile (skipped with --no-compile)
    per_dtype = True                 # False: one task per case, in the first dtype (results do not depend on it)

    def cases(self, scale: str, device: torch.device) -> list:
        raise NotImplementedError

    def providers(self, device_type: str) -> list[str]:
        raise NotImplementedError

    def build(self, case, provider: str, device: torch.device, dtype: torch.dtype) -> Built:
        raise NotImplementedError

    def keys(self, case) -> list[tuple[str, str]]:
        return [(self.name, case.name)]

    def tasks(self, scale: str, dtypes: list[torch.dtype], device: torch.device) -> list[Task]:
        return [Task(self.name, f"{self.label or self.name} {case.name} {dtype_name(dtype)}",
                     lambda ctx, case=case, dtype=dtype: self.rows(ctx, case, dtype), self.keys(case))
                for dtype in (dtypes if self.per_dtype else dtypes[:1]) for case in self.cases(scale, device)]

    def row(self, ctx: Context, case, provider: str, dtype: torch.dtype, **kw) -> Row:
        return Row(self.name, case.name, provider, dtype_name(dtype), str(ctx.device), group=case.group,
                   shape=case.shape, **kw)

    def prepare(self, ctx: Context, case, provider: str, dtype: torch.dtype) -> tuple[Built | None, Row | None]:
        """(built, None), or (None, a skipped / failed row saying why)."""
        if provider in self.compiling and not ctx.compile:
            return None, self.row(ctx, case, provider, dtype, status="skipped",
                                  note="torch.compile disabled (--no-compile)")
        try:
            return self.build(case, provider, ctx.device, dtype), None
        except Unavailable as why:
            return None, self.row(ctx, case, provider, dtype, status="skipped", note=str(why))
        except Exception as exc:
            return None, self.row(ctx, case, provider, dtype, status="failed", note=error_text(exc))

    def rows(self, ctx: Context, case, dtype: torch.dtype) -> list[Row]:
        out = []
        for provider in filter(ctx.provider_selected, self.providers(ctx.device.type)):
            built, row = self.prepare(ctx, case, provider, dtype)
            if built is not None:
                ctx.note(provider)
                row = self.row(ctx, case, provider, dtype)
                try:
                    check = mismatch_note(built.fn(), built.expected(), dtype) if built.expected else ""
                    fill_stats(row, measure(built.fn, ctx.device, ctx.policy), ctx, built.nbytes)
                    row.note = "; ".join(n for n in (built.note, check) if n)
                except Exception as exc:
                    row.status, row.note = "failed", error_text(exc)
            out.append(row)
        return out


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` followed by a CUDA synchronize (for wall-clock timers such as pytest-benchmark's)."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
