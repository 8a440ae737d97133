"""The python half of scripts/gpu_check.sh (the one-shot device check); read that script's header first.

  python scripts/gpu_check.py plan OUT_DIR     what the check will run: prerequisites, the stages with their
                                               time caps, the benchmark cases each stage selects (through
                                               `fastlm bench --list`). No CUDA call (the dry run).
  python scripts/gpu_check.py device OUT_DIR   the GPU's properties -> OUT_DIR/device.json (the first CUDA call)
  python scripts/gpu_check.py report OUT_DIR   OUT_DIR/gpu_check.json and gpu_check.md from what the stages left:
                                               stages.tsv, tests.xml, bench-*/results.csv, device.json

Timings come from fastlm.bench (`fastlm bench`), never from a harness of its own here. Achieved HBM
bandwidth is each row's bytes moved / time against the card's peak: 2 x memory clock x bus width from
the device's properties (DDR), or the datasheet figure for the card's name.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The dry run's subprocesses start outside the source tree, so `python -m` imports the installed fastlm
# (as CI's non-editable install has it), not the bare sources.
_OUTSIDE = tempfile.gettempdir()

# Each stage: (name, cap in seconds, what it does). The caps sum to BUDGET_S = 440 s; with the report's 20 s
# and timeout's 10 s grace for a killed stage that is 470 s < 8 minutes. gpu_check.sh gives a stage
# min(cap, what is left of the 440 s) and records what it spent. Estimates for one H100/H200 machine
# with 16 cores (the sizing; see gpu_check.sh): device 5 s, build 90 s, tests 100 s, decode 90 s,
# attention 40 s, kernels 100 s, report 5 s.
BUDGET_S = 440
STAGES = (
    ("device", 15, "GPU properties (the first CUDA call)"),
    ("build", 110, "pip install -e . with the CUDA extension (SASS for this GPU's arch, PTX for it too)"),
    ("tests", 120, "the GPU test mode: tests/ops' Triton targets, tests/test_triton_kernels.py, "
                   "tests/test_gpu_mode.py, test_engine -k cuda"),
    ("decode", 95, "engine decode tokens/s vs HF generate (+ static cache + compile): Helium-1 2B, StableLM-2 1.6B"),
    ("attention", 40, "decode attention vs SDPA (and flash-attn when installed), every family, context 128-2k"),
    ("kernels", 60, "each fused kernel vs eager and torch.compile (one family's shapes per op)"),
)
REPORT_CAP_S = 20
KILL_GRACE_S = 10  # timeout --kill-after for a stage that ignores SIGTERM
TEST_FILES = ("tests/ops", "tests/test_triton_kernels.py", "tests/test_gpu_mode.py", "tests/test_engine.py")
# test_engine.py: its CUDA tests only, tests/ops: its Triton targets only (their CPU tests run in CI)
TEST_SELECT = "(not test_engine or cuda) and (not ops or triton)"
BENCH = {  # stage -> (suite, --filter): every fused op once (the family whose layer uses it), bf16, --quick
    "decode": ("decode", r"^decode/(helium|stablelm)/"),
    "attention": ("attention", r"^attention/"),
    "kernels": ("kernels", r"^kernels/((add_rms_norm|qkv_rope|qkv_rope_cache|swiglu)\[helium|"
                           r"add_layer_norm\[stablelm\]|relu2_?\[arcee\])"),
}
STATIC_COMPILE_CAP_S = 40  # hf-static-compile per model (compile + timing) inside the decode stage

# Datasheet HBM bandwidth (bytes/s), for when the properties lack the memory clock / bus width.
DATASHEET_BW = (("H200", 4.8e12), ("GH200", 4.0e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
                ("L4", 0.3e12), ("A10", 0.6e12))


def bench_command(stage: str, out_dir: str, compile_: bool = True) -> list[str]:
    suite, pattern = BENCH[stage]
    cmd = [sys.executable, "-m", "fastlm", "bench", suite, "--quick", "--device", "cuda", "--dtype", "bfloat16",
           "--filter", pattern, "--out", os.path.join(out_dir, f"bench-{stage}"), "--no-plots", "--no-progress"]
    if stage == "decode":
        cmd += ["--compile-timeout", str(STATIC_COMPILE_CAP_S)]
    if not compile_:
        cmd.append("--no-compile")
    return cmd


def test_command(out_dir: str, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
           os.path.join(out_dir, "tests.xml"), *TEST_FILES, "-k", TEST_SELECT]
    return cmd + (["-n", str(workers)] if workers > 1 else [])


# ------------------------------------------------------------------------------------------- plan
def _importable(name: str) -> str:
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "yes")
    except Exception as exc:
        return f"MISSING ({type(exc).__name__}: {exc})"


def plan(out_dir: str) -> dict:
    """Everything the check will do, checked as far as it goes without a CUDA call."""
    import shutil

    prereq = {"python": sys.version.split()[0], "torch": _importable("torch"), "triton": _importable("triton"),
              "transformers": _importable("transformers"), "xdist (parallel tests)": _importable("xdist"),
              "nvcc": shutil.which("nvcc") or "not on PATH (the build then makes the CPU extension only)",
              "nvidia-smi": shutil.which("nvidia-smi") or "not on PATH (no NVIDIA driver here)"}
    stages = []
    for name, cap, what in STAGES:
        entry = dict(stage=name, cap_s=cap, what=what)
        if name in BENCH:
            cmd = bench_command(name, out_dir)
            listed = subprocess.run(cmd[:4] + [BENCH[name][0], "--list", "--quick", "--device", "cuda", "--dtype",
                                               "bfloat16", "--filter", BENCH[name][1]],
                                    capture_output=True, text=True, cwd=_OUTSIDE, timeout=300)
            cases = [line for line in listed.stdout.splitlines() if "/" in line]
            if listed.returncode != 0 or not cases:
                raise SystemExit(f"gpu_check: stage {name}: `fastlm bench --list` selected nothing "
                                 f"(rc {listed.returncode}): {listed.stderr.strip()[-500:]}")
            entry.update(command=cmd, cases=cases)
        elif name == "tests":
            entry["command"] = test_command(out_dir, 8)
        stages.append(entry)
    total = sum(cap for _, cap, _ in STAGES)
    if total > BUDGET_S or BUDGET_S + REPORT_CAP_S + KILL_GRACE_S >= 480:
        raise SystemExit(f"gpu_check: the stage caps ({total} s of {BUDGET_S} s) do not fit the 8-minute budget")
    return dict(budget_s=BUDGET_S, report_cap_s=REPORT_CAP_S, prerequisites=prereq, stages=stages)


def collect_tests() -> dict:
    """The GPU test mode's selection, collected without touching a GPU (CUDA hidden): tests and modules."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--rootdir", ROOT, *(os.path.join(ROOT, f) for f in TEST_FILES), "-k", TEST_SELECT],
                         capture_output=True, text=True, cwd=_OUTSIDE, env=env, timeout=300)
    ids = [line for line in res.stdout.splitlines() if "::" in line]
    if res.returncode not in (0, 5) or not ids:
        raise SystemExit(f"gpu_check: collecting the GPU test mode failed (rc {res.returncode}):\n{res.stdout[-2000:]}"
                         f"{res.stderr[-2000:]}")
    return dict(collected=len(ids), files=sorted({i.split("::")[0] for i in ids}))


# ----------------------------------------------------------------------------------------- device
def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False)")
    props = torch.cuda.get_device_properties(0)
    info = dict(name=props.name, capability=f"{props.major}.{props.minor}", sm=props.major * 10 + props.minor,
                multiprocessors=props.multi_processor_count, total_memory_gib=props.total_memory / 2**30,
                torch=torch.__version__, cuda=torch.version.cuda)
    for field in ("memory_clock_rate", "memory_bus_width", "L2_cache_size"):
        if hasattr(props, field):
            info[field] = getattr(props, field)
    info["peak_hbm_bytes_per_s"], info["peak_source"] = peak_bandwidth(info)
    return info


def peak_bandwidth(info: dict) -> tuple[float, str]:
    clock_khz, bus_bits = info.get("memory_clock_rate"), info.get("memory_bus_width")
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "2 x memory clock x bus width (device properties)"
    for key, bw in DATASHEET_BW:
        if key.lower() in info.get("name", "").lower():
            return bw, f"datasheet figure for {key}"
    return math.nan, "unknown card: no peak"


# ----------------------------------------------------------------------------------------- report
def _rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _tests(path: str) -> dict:
    if not os.path.exists(path):
        return dict(status="no junit report (the stage did not finish)")
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return dict(counts, failed=failed[:50])


def _stages(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            name, rc, seconds, cap = line.rstrip("\n").split("\t")[:4]
            out.append(dict(stage=name, rc=int(rc), seconds=float(seconds), cap_s=float(cap),
                            status="ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed (rc {rc})"))
    return out


def _model_bytes(family: str) -> float:
    """bf16 weight bytes of the decode stage's model (what one decode step must stream), or NaN."""
    try:
        from fastlm.bench import configs

        sizes = configs.model_sizes(family, "quick", "cuda")
        return 2.0 * configs.num_params(configs.meta_model(family, sizes))
    except Exception:
        return math.nan


def summarise(out_dir: str) -> dict:
    device = {}
    if os.path.exists(os.path.join(out_dir, "device.json")):
        with open(os.path.join(out_dir, "device.json")) as f:
            device = json.load(f)
    peak = device.get("peak_hbm_bytes_per_s", math.nan)
    result = dict(device=device, stages=_stages(os.path.join(out_dir, "stages.tsv")),
                  tests=_tests(os.path.join(out_dir, "tests.xml")), kernels=[], attention=[], decode=[])
    for stage in ("kernels", "attention"):
        for r in _rows(os.path.join(out_dir, f"bench-{stage}", "results.csv")):
            gbs = _num(r.get("gb_per_s"))
            result[stage].append(dict(case=r["case"], provider=r["provider"], status=r["status"],
                                      median_us=_num(r.get("median_us")), gb_per_s=gbs,
                                      hbm_peak_pct=100 * gbs * 1e9 / peak if peak == peak else math.nan,
                                      speedup_vs_baseline=_num(r.get("speedup")), note=r.get("note", "")))
    weights = {}
    for r in _rows(os.path.join(out_dir, "bench-decode", "results.csv")):
        if r["suite"] != "decode":
            continue
        family = r["case"].split("/")[0]
        if family not in weights:
            weights[family] = _model_bytes(family)
        tps = _num(r.get("tokens_per_s"))
        batch = int(r["case"].split("/B")[1].split("-")[0]) if "/B" in r["case"] else 1
        gbs = weights[family] * tps / batch / 1e9  # steps/s x the weights each step streams
        result["decode"].append(dict(case=r["case"], provider=r["provider"], status=r["status"], tokens_per_s=tps,
                                     speedup_vs_hf=_num(r.get("speedup")), weights_gb_per_s=gbs,
                                     hbm_peak_pct=100 * gbs * 1e9 / peak if peak == peak else math.nan,
                                     note=r.get("note", "")))
    return result


def _fmt(x, spec=".1f") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(s: dict, dry_run: dict | None = None) -> str:
    d = s["device"]
    L = ["# fastlm GPU check", ""]
    if dry_run is not None:
        L += ["**Dry run**: nothing was built, tested or timed on a GPU. The plan below is what a run does.", ""]
    if d:
        L += [f"GPU: {d.get('name')} (sm_{d.get('sm')}, {d.get('multiprocessors')} SMs, "
              f"{_fmt(d.get('total_memory_gib'), '.0f')} GiB); torch {d.get('torch')}, CUDA {d.get('cuda')}; "
              f"peak HBM {_fmt(d.get('peak_hbm_bytes_per_s', math.nan) / 1e9, '.0f')} GB/s "
              f"({d.get('peak_source')}).", ""]
    if s["stages"]:
        L += ["| stage | status | seconds | cap s |", "|---|---|---|---|"]
        L += [f"| {st['stage']} | {st['status']} | {st['seconds']:.0f} | {st['cap_s']:.0f} |" for st in s["stages"]]
        L += ["", f"Total: {sum(st['seconds'] for st in s['stages']):.0f} s.", ""]
    t = s["tests"]
    if "tests" in t:
        L += [f"GPU test mode: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped."]
        L += [f"- FAILED {name}" for name in t["failed"]] + [""]
    elif dry_run is None:
        L += [f"GPU test mode: {t['status']}.", ""]
    for key, title, cols in (("decode", "Decode tokens/s (bf16; HBM % = weights streamed per step / peak)",
                              ("tokens_per_s", "speedup_vs_hf", "weights_gb_per_s", "hbm_peak_pct")),
                             ("attention", "Decode attention (bf16)", ("median_us", "gb_per_s", "hbm_peak_pct",
                                                                       "speedup_vs_baseline")),
                             ("kernels", "Fused kernels (bf16)", ("median_us", "gb_per_s", "hbm_peak_pct",
                                                                  "speedup_vs_baseline"))):
        rows = s[key]
        if not rows:
            continue
        L += [f"## {title}", "", "| case | provider | " + " | ".join(cols) + " | note |",
              "|---|---|" + "---|" * len(cols) + "---|"]
        for r in rows:
            vals = [r["status"]] if r["status"] != "ok" else []
            L.append(f"| {r['case']} | {r['provider']} | " + " | ".join(_fmt(r[c], ".2f") for c in cols)
                     + f" | {'; '.join(vals + [r['note']] if r['note'] else vals)} |")
        L.append("")
    if dry_run is not None:
        L += ["## Plan", "", f"Budget {dry_run['budget_s']} s + report {dry_run['report_cap_s']} s.", "",
              "| stage | cap s | what | cases |", "|---|---|---|---|"]
        L += [f"| {st['stage']} | {st['cap_s']} | {st['what']} | {len(st.get('cases', []))} |"
              for st in dry_run["stages"]]
        L += ["", "Prerequisites: " + "; ".join(f"{k}: {v}" for k, v in dry_run["prerequisites"].items())]
        if "collected" in dry_run:
            L += ["", f"GPU test mode selection: {dry_run['collected']} tests in {', '.join(dry_run['files'])}."]
    return "\n".join(L) + "\n"


def _write(out_dir: str, summary: dict, md: str) -> None:
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(md)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("plan", "device", "report"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, out_dir = argv
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    if cmd == "plan":  # the dry run: no CUDA call from here
        p = dict(plan(out_dir), **collect_tests())
        p["seconds"] = time.perf_counter() - t0
        summary = dict(summarise(out_dir), dry_run=p)
        _write(out_dir, summary, markdown(summary, dry_run=p))
        print(f"gpu_check: dry run OK: {len(p['stages'])} stages, {p['collected']} GPU-mode tests, "
              f"{sum(len(st.get('cases', [])) for st in p['stages'])} benchmark cases -> {out_dir}/gpu_check.md")
    elif cmd == "device":
        info = device_info()
        with open(os.path.join(out_dir, "device.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(info["sm"])
    else:
        summary = summarise(out_dir)
        _write(out_dir, summary, markdown(summary))
        print(f"gpu_check: report -> {out_dir}/gpu_check.md, {out_dir}/gpu_check.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
