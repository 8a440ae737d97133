"""summary.md and PNG plots from the result rows."""
from __future__ import annotations

import math
import os
from collections import OrderedDict, defaultdict

from fastlm.bench.results import BASELINES, Row

SUITE_TITLES = {
    "kernels": "Fused kernels (baseline: `eager`, the *_ref composition)",
    "attention": "Decode attention (baseline: `sdpa-eager`, transformers' SDPA call)",
    "prefill": "Prefill, end to end (baseline: `hf`, transformers generate)",
    "decode": "Decode, end to end (baseline: `hf`, transformers generate)",
    "opcount": "Ops per decoder layer per decode step (baseline: `hf`)",
}


def _f(v, fmt="{:.1f}", empty="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return empty
    return fmt.format(v)


def _speedup(r: Row) -> str:
    if r.provider == r.baseline and r.ok:
        return "1.00 (baseline)"
    if math.isnan(r.speedup):
        return "–"
    s = f"{r.speedup:.2f}x"
    return f"**LOSS {s}**" if r.speedup < 0.995 else s


def _esc(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row], suite: str) -> list[str]:
    """The suite's measured rows as a markdown table: (column, right-aligned) and each row's cells."""
    ms = lambda v: _f(v / 1e3, "{:.2f}")  # noqa: E731
    if suite in ("kernels", "attention"):
        columns = [("case", 0), ("dtype", 0), ("provider", 0), ("median µs", 1), ("p20–p80 µs", 1), ("GB/s", 1),
                   ("% of copy BW", 1), ("speedup", 1), ("note", 0)]

        def cells(r):
            return [r.case, r.dtype, r.provider, _f(r.median_us), f"{_f(r.p20_us)}–{_f(r.p80_us)}", _f(r.gb_per_s),
                    _f(r.copy_bw_frac * 100 if not math.isnan(r.copy_bw_frac) else math.nan, "{:.0f}%")]
    elif suite == "prefill":
        columns = [("case", 0), ("dtype", 0), ("provider", 0), ("tokens/s", 1), ("ms per generate(1) (p20–p80)", 1),
                   ("speedup", 1), ("note", 0)]

        def cells(r):
            return [r.case, r.dtype, r.provider, _f(r.tokens_per_s),
                    f"{ms(r.median_us)} ({ms(r.p20_us)}–{ms(r.p80_us)})"]
    elif suite == "decode":
        columns = [("case", 0), ("dtype", 0), ("provider", 0), ("tokens/s", 1), ("ms per step (p20–p80)", 1),
                   ("MB / token", 1), ("GB/s", 1), ("% of read BW", 1), ("speedup", 1), ("note", 0)]

        def cells(r):
            return [r.case, r.dtype, r.provider, _f(r.tokens_per_s),
                    f"{ms(r.median_us)} ({ms(r.p20_us)}–{ms(r.p80_us)})", _f(r.bytes / 1e6), _f(r.gb_per_s),
                    _f(r.read_bw_frac * 100, "{:.0f}%")]
    else:
        columns = [("case", 0), ("provider", 0), ("ops / layer", 1), ("fewer ops than hf", 1), ("note", 0)]

        def cells(r):
            return [r.case, r.provider, _f(r.ops_per_layer, "{:g}")]
    out = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "|".join("---:" if right else "---"
                                                                        for _, right in columns) + "|"]
    return out + ["| " + " | ".join(cells(r) + [_speedup(r), _esc(r.note)]) + " |" for r in rows if r.ok]


def write_summary(path, rows: list[Row], machine: dict, copy_bw: float, meta: dict, backends: list,
                  plots: list[str], plot_note: str) -> None:
    L = ["# fastlm benchmark results", ""]
    L.append(f"Run {meta.get('date', '')}; mode **{meta.get('mode')}**; command `{meta.get('command', '')}`; "
             f"wall time {meta.get('wall_s', 0):.0f}s.")
    L += ["", "## Machine", ""]
    L.append(f"- CPU: {machine.get('cpu')} — {machine.get('cpu_cores')} cores visible, "
             f"torch uses {machine.get('torch_threads')} threads"
             + (f"; ISA: {' '.join(machine['cpu_isa'])}" if machine.get("cpu_isa") else ""))
    if "gpu" in machine:
        L.append(f"- GPU: {machine['gpu']}")
    L.append(f"- device benchmarked: `{machine.get('device')}`")
    L.append(f"- python {machine.get('python')}, torch {machine.get('torch')}, transformers "
             f"{machine.get('transformers')}, fastlm {machine.get('fastlm')}")
    if machine.get("device") == "cpu" and "thp_alloc" in machine:
        L.append("- large CPU tensors on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`, set by `fastlm bench` "
                 "(fastlm.bench.alloc); applies to every provider): " + ("yes" if machine["thp_alloc"] else
                                                           "no (each large output pays 4 KiB page faults)"))
    if machine.get("device") == "cpu" and "malloc_keep" in machine:
        L.append("- freed CPU memory reused by glibc malloc instead of unmapped (set by `fastlm bench`; applies to "
                 "every provider): " + ("yes" if machine["malloc_keep"] else
                                        "no (large outputs get fresh, zero-filled pages on every call)"))
    if "loadavg" in machine:
        L.append(f"- load average at start: {machine['loadavg']} (other work on the machine skews timings)")
    L.append(f"- measured memory copy bandwidth: **{copy_bw:.1f} GB/s** (`dst.copy_(src)` on "
             f"{meta.get('copy_mib', 256)} MiB fp32, read + write bytes counted, the same accounting as the kernels' "
             "bytes moved); a kernel above 100% of it has its working set in cache")
    if meta.get("read_bandwidth_gbs"):
        L.append(f"- measured read bandwidth: **{meta['read_bandwidth_gbs']:.1f} GB/s** (`sum` of "
                 f"{meta.get('copy_mib', 256)} MiB fp32, bytes read); batch-1 decode rows count every weight "
                 "(lm_head included), the KV cache read at the steps' mean context and the new k/v per token "
                 "against it")
    L += ["", "## Backends", "", "| backend | device | available | timed | why |", "|---|---|---|---|---|"]
    for b in backends:
        L.append(f"| {b['name']} | {b['device']} | {'yes' if b['available'] else 'no'} | "
                 f"{'yes' if b['timed'] else 'no'} | {_esc(b['reason'])} |")
    if any(b["name"] == "triton" and b["device"] == "cpu" for b in backends):
        L.append("")
        L.append("Triton on CPU runs only under the interpreter (`TRITON_INTERPRET=1`), which is not a performance "
                 "path: it is excluded from every timing on CPU (it is still counted in `opcount` when available).")
    if meta.get("notes"):
        L += [""] + [f"- {n}" for n in meta["notes"]]

    suites = OrderedDict()
    for r in rows:
        suites.setdefault(r.suite, []).append(r)

    losses = [r for r in rows if r.ok and not math.isnan(r.speedup) and r.speedup < 0.995
              and r.provider != r.baseline]
    L += ["", "## Losses", ""]
    if losses:
        L.append(f"{len(losses)} result(s) slower than (or, for opcount, more ops than) the baseline:")
        L.append("")
        for r in losses:
            L.append(f"- **{r.suite} / {r.case} / {r.provider} ({r.dtype})**: {r.speedup:.2f}x of "
                     f"`{r.baseline}`" + (f" — {r.note}" if r.note else ""))
    else:
        L.append("None: every measured provider is at least as fast as its baseline.")

    L += llama_cpp_section(rows, meta.get("llama_cpp") or {})

    for suite, srows in suites.items():
        L += ["", f"## {SUITE_TITLES.get(suite, suite)}", ""]
        if suite == "prefill" or suite == "decode":
            models = meta.get("e2e_models") or {}
            if models:
                L.append("Random-weight models: " + "; ".join(f"{k}: {v}" for k, v in models.items()) + ".")
                L.append("")
            if suite == "decode":
                L.append("Decode time per step = (t(generate N) − t(generate 1)) / (N − 1), paired per repetition.")
                L.append("")
        if suite == "opcount":
            L.append("Non-view ops reaching the dispatcher while a decoder layer runs (forward hooks on the layers, "
                     "so embedding, rotary tables, mask, final norm and lm_head are excluded), one decode step "
                     "after an 8-token prefill into a DynamicCache, divided by the number of layers.")
            L.append("")
        L += _table(srows, suite)
        bad = [r for r in srows if not r.ok]
        if bad:
            L += ["", "Skipped / failed:", ""]
            seen = set()
            for r in bad:
                key = (r.provider, r.status, r.note)
                if key in seen:
                    continue
                seen.add(key)
                n = sum(1 for x in bad if (x.provider, x.status, x.note) == key)
                L.append(f"- `{r.provider}` {r.status} ({n} case{'s' if n > 1 else ''}, e.g. {r.case}): {_esc(r.note)}")
    L += ["", "## Plots", ""]
    if plots:
        L += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    if plot_note:
        L.append(plot_note)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


PRECISIONS = (("float32", "fp32 / f32"), ("bfloat16", "bf16 / bf16"), ("float16", "fp16 / f16"),
              ("int8", "int8 / Q8_0"), ("int4", "int4 / Q4_0"))


def llama_cpp_section(rows: list[Row], info: dict) -> list[str]:
    """fastlm's engine beside llama.cpp at equal precision: tokens/s of each batch-1 prefill and decode
    case, and their ratio. The fastlm provider is the one llama.cpp's rounds were interleaved with."""
    from fastlm.bench.e2e import LLAMA, head_to_head

    e2e = [r for r in rows if r.suite in ("prefill", "decode")]
    if not e2e:
        return []
    L = ["", "## fastlm vs llama.cpp at equal precision", ""]
    if info.get("reason"):
        return L + [f"llama.cpp not timed: {_esc(info['reason'])}."]
    llama = {(r.suite, r.case, r.dtype): r for r in e2e if r.provider == LLAMA}
    if not any(r.ok for r in llama.values()):
        return L + ["llama.cpp measured no case (see the skipped rows below)."]
    L.append(f"llama.cpp build {info.get('build_commit', '?')} ({info.get('source', '?')}), "
             f"{info.get('threads', '?')} threads, CPU {info.get('cpu_info', '?')}; its rounds ran between the "
             "fastlm provider's, in the same run. Prefill: llama-bench's prompt time against fastlm's "
             "t(generate 1); decode: tokens after a context of the case's prompt length on both. fastlm / llama.cpp: "
             "the ratio of the two medians; paired: the median (and range) of the ratios within each round, "
             "where a drift of the machine's speed between rounds cancels.")
    L += ["", "| case | precision (fastlm / llama.cpp) | fastlm provider | fastlm tok/s | llama.cpp tok/s | "
              "fastlm / llama.cpp | paired (min–max) | % of read BW (fastlm / llama.cpp) | llama.cpp note |",
          "|---|---|---|---:|---:|---:|---:|---:|---|"]
    order = {name: i for i, (name, _) in enumerate(PRECISIONS)}
    labels = dict(PRECISIONS)
    paired = head_to_head(e2e[0].device.split(":")[0])
    for (suite, case, dtype), lr in sorted(llama.items(), key=lambda kv: (kv[0][1].split("/")[0],
                                                                         order.get(kv[0][2], 99), kv[0][0],
                                                                         kv[0][1])):
        fr = next((r for r in e2e if (r.suite, r.case, r.dtype) == (suite, case, dtype) and r.provider == paired),
                  None)
        f_tps = fr.tokens_per_s if fr is not None and fr.ok else math.nan
        l_tps = lr.tokens_per_s if lr.ok else math.nan
        ratio = f_tps / l_tps if f_tps == f_tps and l_tps == l_tps and l_tps > 0 else math.nan
        why = "" if fr is None or fr.ok else f" ({fr.status}: {fr.note})"
        ratio_text, paired_text = _ratio_text(ratio), _ratio_text(lr.paired_ratio)
        if lr.paired_ratio == lr.paired_ratio:
            paired_text += f" ({lr.paired_min:.2f}–{lr.paired_max:.2f})"
        pct = lambda r: _f(r.read_bw_frac * 100 if r is not None else math.nan, "{:.0f}%")  # noqa: E731
        bw = f"{pct(fr)} / {pct(lr)}" if suite == "decode" else ""
        L.append(f"| {suite} {case} | {labels.get(dtype, dtype)} | {paired}{_esc(why)} | {_f(f_tps)} | "
                 f"{_f(l_tps) if lr.ok else lr.status} | {ratio_text} | {paired_text} | {bw} | "
                 f"{_esc(lr.note)} |")
    return L


def _ratio_text(ratio: float) -> str:
    """fastlm / llama.cpp as '1.02x', a loss (below 0.995) in bold as '**LOSS 0.90x**', '–' for NaN."""
    text = _f(ratio, "{:.2f}x")
    return f"**LOSS {text}**" if ratio == ratio and ratio < 0.995 else text


def plotting_unavailable() -> str | None:
    """Why no plots can be drawn here (matplotlib, a dependency of fastlm, does not import), or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except Exception as exc:
        return (f"matplotlib does not import ({type(exc).__name__}: {exc}); it is a dependency of fastlm: "
                "`pip install matplotlib`")
    return None


def make_plots(out_dir, rows: list[Row]) -> tuple[list[str], str]:
    problem = plotting_unavailable()
    if problem:
        return [], f"Plots skipped: {problem}."
    import matplotlib.pyplot as plt

    paths = []
    try:
        paths += _plot_speedups(plt, out_dir, rows, "kernels")
        paths += _plot_speedups(plt, out_dir, rows, "attention")
        for suite in ("prefill", "decode"):
            paths += _plot_tokens(plt, out_dir, rows, suite)
        paths += _plot_opcount(plt, out_dir, rows)
    except Exception as exc:  # a plotting bug must not lose the CSV / summary
        return paths, f"Some plots failed: {type(exc).__name__}: {exc}"
    return paths, ""


def _plot_speedups(plt, out_dir, rows, suite):
    paths = []
    rows = [r for r in rows if r.suite == suite and r.ok and not math.isnan(r.speedup)
            and r.provider != BASELINES[suite]]
    for dtype in sorted({r.dtype for r in rows}):
        sel = [r for r in rows if r.dtype == dtype]
        cases = list(OrderedDict.fromkeys(r.case for r in sel))
        provs = list(OrderedDict.fromkeys(r.provider for r in sel))
        if not cases:
            continue
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(cases) * max(1, len(provs)) ** 0.5 + 1)))
        h = 0.8 / max(len(provs), 1)
        idx = {c: i for i, c in enumerate(cases)}
        for j, p in enumerate(provs):
            pr = [r for r in sel if r.provider == p]
            ax.barh([idx[r.case] + j * h for r in pr], [r.speedup for r in pr], height=h, label=p)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks([i + h * (len(provs) - 1) / 2 for i in range(len(cases))])
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"speedup over {BASELINES[suite]} (log; >1 is faster)")
        ax.set_title(f"{suite} speedup, {dtype}")
        paths.append(_save(plt, fig, ax, out_dir, f"{suite}_speedup_{dtype}.png"))
    return paths


def _save(plt, fig, ax, out_dir, name: str) -> str:
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(plt, out_dir, name: str, rows, key, value, labels, ylabel: str, title: str = "", width=None):
    """Grouped bars: one group per ``key(row)`` (labelled by ``labels``), one bar per provider."""
    keys = list(OrderedDict.fromkeys(key(r) for r in rows))
    provs = list(OrderedDict.fromkeys(r.provider for r in rows))
    fig, ax = plt.subplots(figsize=(width or max(6, 1.4 * len(keys)), 4))
    w = 0.8 / max(len(provs), 1)
    val = defaultdict(dict)
    for r in rows:
        val[r.provider][key(r)] = value(r)
    for j, p in enumerate(provs):
        ax.bar([i + j * w for i, k in enumerate(keys) if k in val[p]], [val[p][k] for k in keys if k in val[p]],
               width=w, label=p)
    ax.set_xticks([i + w * (len(provs) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels(labels(keys), fontsize=7)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return [_save(plt, fig, ax, out_dir, name)]


def _plot_tokens(plt, out_dir, rows, suite):
    rows = [r for r in rows if r.suite == suite and r.ok and not math.isnan(r.tokens_per_s)]
    if not rows:
        return []
    return _bars(plt, out_dir, f"{suite}_tokens_per_s.png", rows, lambda r: (r.case, r.dtype), lambda r: r.tokens_per_s,
                 lambda keys: [f"{c}\n{d}" for c, d in keys], "tokens/s", f"{suite} tokens/s per family")


def _plot_opcount(plt, out_dir, rows):
    rows = [r for r in rows if r.suite == "opcount" and r.ok]
    if not rows:
        return []
    return _bars(plt, out_dir, "opcount.png", rows, lambda r: r.group, lambda r: r.ops_per_layer, list,
                 "non-view ops per layer per decode step", width=7)
