"""Result rows and the CSV writer."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields

BASELINES = {"kernels": "eager", "attention": "sdpa-eager", "prefill": "hf", "decode": "hf", "opcount": "hf"}


@dataclass
class Row:
    suite: str
    case: str
    provider: str
    dtype: str
    device: str
    status: str = "ok"            # ok | skipped | failed
    median_us: float = math.nan   # per call (kernels, attention), per generate(1) (prefill), per step (decode)
    p20_us: float = math.nan
    p80_us: float = math.nan
    reps: int = 0
    bytes: float = math.nan       # bytes the fused op must move (kernels, attention)
    gb_per_s: float = math.nan
    copy_bw_frac: float = math.nan  # gb_per_s / measured copy bandwidth
    read_bw_frac: float = math.nan  # decode at batch 1: gb_per_s (weight + KV bytes per token) / read bandwidth
    tokens_per_s: float = math.nan
    ops_per_layer: float = math.nan
    speedup: float = math.nan     # baseline time / this time (opcount: baseline ops / these ops)
    # llama.cpp rows: fastlm's tokens/s over llama.cpp's within each round (fastlm's timed pair, then llama.cpp's
    # round right after it), the median and the extremes over the interleaved rounds; a drift of the machine's
    # speed between rounds cancels in each round's ratio, not in the ratio of the two medians
    paired_ratio: float = math.nan
    paired_min: float = math.nan
    paired_max: float = math.nan
    baseline: str = ""
    group: str = ""               # op[variant] / family / layout, for tables and plots
    shape: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self) -> float:
        """The quantity speedups compare: time (lower is better) or ops per layer."""
        return self.ops_per_layer if self.suite == "opcount" else self.median_us


COLUMNS = [f.name for f in fields(Row)]


def fill_speedups(rows: list[Row]) -> None:
    base = {}
    for r in rows:
        if r.ok and r.provider == BASELINES.get(r.suite):
            base[(r.suite, r.case, r.dtype, r.device)] = r.value()
    for r in rows:
        r.baseline = BASELINES.get(r.suite, "")
        b = base.get((r.suite, r.case, r.dtype, r.device))
        if r.ok and b is not None and r.value() and not math.isnan(r.value()):
            r.speedup = b / r.value()


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def write_csv(rows: list[Row], path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in asdict(r).items()})
