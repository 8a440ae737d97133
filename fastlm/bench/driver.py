"""The benchmark driver: plan the tasks, run them with a progress bar, write results.csv,
summary.md and plots into ``out_dir``."""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
import traceback
import warnings

import torch

from fastlm.bench import SUITES, configs
from fastlm.bench.backends import discover
from fastlm.bench.machine import copy_bandwidth_gbs, describe, read_bandwidth_gbs
from fastlm.bench.progress import Progress
from fastlm.bench.report import make_plots, write_summary
from fastlm.bench.results import Row, fill_speedups, write_csv
from fastlm.bench.suite import Context
from fastlm.bench.suites import plan
from fastlm.bench.timing import FULL, QUICK, TINY

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtypes(spec: str | None, device: torch.device) -> list[torch.dtype]:
    if not spec:
        return [torch.bfloat16 if device.type == "cuda" else torch.float32]
    out = []
    for name in spec.split(","):
        name = name.strip().lower()
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}")
        if DTYPES[name] not in out:
            out.append(DTYPES[name])
    return out


def parse_quantize(spec: str | None) -> list[str]:
    from fastlm.bench.e2e import QUANTIZATIONS

    names = [n.strip().lower() for n in (spec or "").split(",") if n.strip()]
    bad = [n for n in names if n not in QUANTIZATIONS]
    if bad:
        raise ValueError(f"unknown quantization(s) {bad}; expected some of {list(QUANTIZATIONS)}")
    return list(dict.fromkeys(names))


def _llama_cpp_info(ctx: Context, suites) -> dict:
    """What the summary says about llama.cpp: the build timed, or why there was none."""
    if not {"prefill", "decode"} & set(suites):
        return {}
    from fastlm.bench import llamacpp

    info = dict(ctx.info.get("llama_cpp", {}))
    if not info:
        tool = llamacpp.find()
        info = dict(reason=tool) if isinstance(tool, str) else dict(source=tool.source, bench=tool.bench)
    return info


def make_provider_filter(pattern: str | None):
    """``--providers``: a regex searched in the provider's name (a substring when it is not a valid regex)."""
    if not pattern:
        return lambda provider: True
    try:
        rx = re.compile(pattern)
        return lambda provider: rx.search(provider) is not None
    except re.error:
        return lambda provider: pattern in provider


def make_filter(pattern: str | None):
    """``--filter``: a regex searched in ``suite/case`` (a plain substring works as is; an invalid
    regex falls back to a substring match)."""
    if not pattern:
        return lambda suite, case: True
    try:
        rx = re.compile(pattern)
        return lambda suite, case: rx.search(f"{suite}/{case}") is not None
    except re.error:
        return lambda suite, case: pattern in f"{suite}/{case}"


def run_benchmarks(out_dir: str = "bench-results", *, suites=None, quick: bool = False, tiny: bool = False,
                   device: str | None = None, dtype: str | None = None, filter: str | None = None,
                   compile: bool = True, compile_timeout_s: float | None = None, plots: bool = True,
                   progress: bool = True, command: str = "", quantize: str | None = None,
                   providers: str | None = None, rounds: int | None = None) -> list[Row]:
    """Run the suites and write ``results.csv``, ``summary.md`` and plots into ``out_dir``.

    ``quick``: fewer shapes and repetitions (under 10 minutes on a 2-core CPU); ``tiny``: test-sized
    shapes, single repetitions (for smoke tests; timings meaningless). ``quantize``: comma-separated weight
    quantizations (``int8,int4``) the end-to-end suites also time, against llama.cpp's Q8_0 / Q4_0.
    ``providers``: a regex that the timed providers' names must match. ``rounds``: timed rounds per
    end-to-end case (default: 1 in tiny, 3 in quick, 5 in full mode). Returns the rows."""
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    t_start = time.perf_counter()
    suites = list(suites or SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; expected some of {list(SUITES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    dtypes = parse_dtypes(dtype, dev)
    scale = "tiny" if tiny else "quick" if quick else "full"
    policy = {"tiny": TINY, "quick": QUICK, "full": FULL}[scale]
    if compile_timeout_s is None:
        compile_timeout_s = 900.0 if dev.type == "cuda" else 420.0
    os.makedirs(out_dir, exist_ok=True)
    selected = make_filter(filter)

    quantizations = parse_quantize(quantize)
    tasks = [t for t in plan(suites, scale, dtypes, dev, quantizations) if any(selected(s, c) for s, c in t.keys)]
    bar = Progress(len(tasks) + 1, enabled=progress)
    bar.start("machine: copy bandwidth")
    machine = describe(dev)
    copy_mib = 16 if tiny else 256
    copy_bw = copy_bandwidth_gbs(dev, copy_mib * 2**20, policy if tiny else None)
    read_bw = read_bandwidth_gbs(dev, copy_mib * 2**20, policy if tiny else None)
    bar.advance()
    ctx = Context(device=dev, scale=scale, policy=policy, copy_bw_gbs=copy_bw, read_bw_gbs=read_bw, compile=compile,
                    compile_timeout_s=compile_timeout_s, progress=bar, selected=selected,
                    provider_selected=make_provider_filter(providers), rounds=rounds)

    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto-fallback and deprecation warnings would break the bar
        for task in tasks:
            bar.start(task.label)
            try:
                got = task.run(ctx)
            except Exception as exc:  # one broken case must not lose the rest
                tb = traceback.format_exc(limit=3)
                bar.log(f"task {task.label} crashed: {tb}")
                got = [Row(task.suite, task.label, "?", "", str(dev), status="failed",
                           note=f"task crashed: {type(exc).__name__}: {exc}"[:300])]
            rows += [r for r in got if selected(r.suite, r.case)]
            bar.advance()
            fill_speedups(rows)
            write_csv(rows, os.path.join(out_dir, "results.csv"))  # partial results survive an interrupted run
    bar.close()

    fill_speedups(rows)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    plot_paths, plot_note = make_plots(out_dir, rows) if plots else ([], "Plots disabled (--no-plots).")
    backends = [dict(name=b.name, device=dev.type, available=b.available, timed=b.timed, reason=b.reason)
                for b in discover(dev.type)]
    notes = ["Sizes from the checkpoints' configs (fastlm.bench.configs): "
             + ", ".join(f"{f}: {configs.checkpoint(f)}" for f in configs.FAMILIES)
             + "; kernel shapes are the fused modules fastlm.patch builds for them."]
    if scale == "quick":
        notes.append("--quick: fewer shapes (prefill T=512 only, attention context up to 2k) and repetitions; "
                     "`compile` is measured on the prefill shape only; hf-static-compile is skipped on CPU.")
    if scale == "tiny":
        notes.append("--tiny: test-sized shapes and single repetitions; the timings mean nothing.")
    if compile and "kernels" in suites:
        notes.append("`compile` = torch.compile (default settings, inductor) of the *_ref composition, one "
                     "compiled wrapper per op, so later shapes may reuse an automatic-dynamic graph; its "
                     "first-call time is in the note.")
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), mode=scale, command=command,
                wall_s=time.perf_counter() - t_start, copy_mib=copy_mib, notes=notes, read_bandwidth_gbs=read_bw,
                e2e_models=ctx.info.get("e2e_models", {}), llama_cpp=_llama_cpp_info(ctx, suites))
    write_summary(os.path.join(out_dir, "summary.md"), rows, machine, copy_bw, meta, backends, plot_paths,
                  plot_note)
    with open(os.path.join(out_dir, "machine.json"), "w") as f:
        json.dump(dict(machine=machine, copy_bandwidth_gbs=copy_bw, meta=meta, backends=backends), f, indent=2,
                  default=str)
    return rows


def _read_rows(path) -> list[Row]:
    import csv
    import dataclasses

    types = {f.name: f.type for f in dataclasses.fields(Row)}
    rows = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            kw = {}
            for name, text in rec.items():
                if name not in types:
                    continue
                kind = types[name]
                if kind in ("float", float):
                    kw[name] = float(text) if text else math.nan
                elif kind in ("int", int):
                    kw[name] = int(float(text)) if text else 0
                else:
                    kw[name] = text
            rows.append(Row(**kw))
    return rows


def merge_results(out_dir: str, run_dirs: list[str], plots: bool = True) -> list[Row]:
    """Combine earlier runs' outputs suite by suite (a later run's suite replaces an earlier run's)
    into one results.csv, summary.md and plots: e.g. end-to-end suites from one run and the kernel
    suites re-run on a quieter machine. The summary names the run each suite came from."""
    by_suite: dict[str, tuple[str, list[Row]]] = {}
    infos = []
    for d in run_dirs:
        rows = _read_rows(os.path.join(d, "results.csv"))
        try:
            with open(os.path.join(d, "machine.json")) as f:
                info = json.load(f)
            infos.append(info)
        except FileNotFoundError:  # an interrupted run: its CSV holds every finished case
            info = {"meta": {"command": f"{d} (interrupted run: the cases it finished)"}}
        for suite in dict.fromkeys(r.suite for r in rows):
            by_suite[suite] = (info["meta"].get("command", d), [r for r in rows if r.suite == suite])
    order = [s for s in SUITES if s in by_suite] + [s for s in by_suite if s not in SUITES]
    rows = [r for s in order for r in by_suite[s][1]]
    fill_speedups(rows)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    plot_paths, plot_note = make_plots(out_dir, rows) if plots else ([], "Plots disabled.")
    if not infos:
        raise ValueError("--merge needs at least one complete run (with machine.json) for the machine description")
    last = infos[-1]
    meta = dict(last["meta"])
    meta["command"] = " + ".join(dict.fromkeys(cmd for cmd, _ in by_suite.values()))
    meta["wall_s"] = sum(i["meta"].get("wall_s", 0) for i in infos)
    notes = list(meta.get("notes", []))
    notes += [f"suite `{s}` from `{by_suite[s][0]}`" for s in order]
    meta["notes"] = notes
    meta["e2e_models"] = {k: v for i in infos for k, v in i["meta"].get("e2e_models", {}).items()}
    write_summary(os.path.join(out_dir, "summary.md"), rows, last["machine"], last["copy_bandwidth_gbs"], meta,
                  last["backends"], plot_paths, plot_note)
    with open(os.path.join(out_dir, "machine.json"), "w") as f:
        json.dump(dict(machine=last["machine"], copy_bandwidth_gbs=last["copy_bandwidth_gbs"], meta=meta,
                       backends=last["backends"], merged_from=run_dirs), f, indent=2, default=str)
    return rows


__all__ = ["run_benchmarks", "merge_results", "parse_dtypes", "make_filter"]
