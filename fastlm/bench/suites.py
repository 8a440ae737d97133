"""The suites: each turns into a list of :class:`Task` (so the driver knows the total for its
progress bar); a task runs one case on every provider and returns its rows."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastlm.bench import cases as C
from fastlm.bench.backends import discover, has_impl
from fastlm.bench.results import Row
from fastlm.bench.timing import Stats, TimingPolicy, measure, time_once


@dataclass
class Context:
    device: torch.device
    scale: str                       # tiny | quick | full
    policy: TimingPolicy
    copy_bw_gbs: float = math.nan
    compile: bool = True
    compile_timeout_s: float = 300.0
    progress: object = None
    selected: Callable[[str, str], bool] = field(default=lambda suite, case: True)
    info: dict = field(default_factory=dict)  # extra facts for the summary (model sizes, notes)

    def note(self, text: str) -> None:
        if self.progress is not None:
            self.progress.note(text)


@dataclass
class Task:
    suite: str
    label: str
    run: Callable[[Context], list[Row]]
    keys: list = field(default_factory=list)  # (suite, case) pairs this task can produce, for --filter


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _err(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg[:300]


def _stats_row(row: Row, stats: Stats, ctx: Context, nbytes: float | None = None) -> Row:
    row.median_us, row.p20_us, row.p80_us, row.reps = stats.median_us, stats.p20_us, stats.p80_us, stats.reps
    if nbytes:
        row.bytes = nbytes
        row.gb_per_s = nbytes / (stats.median_us * 1e-6) / 1e9
        if ctx.copy_bw_gbs and not math.isnan(ctx.copy_bw_gbs):
            row.copy_bw_frac = row.gb_per_s / ctx.copy_bw_gbs
    return row


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _max_rel_diff(a, b) -> float:
    worst = 0.0
    for x, y in zip(_flat(a), _flat(b)):
        x, y = x.float(), y.float()
        scale = max(y.abs().max().item(), 1e-6)
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst


def _mismatch_note(out, ref, dtype) -> str:
    try:
        d = _max_rel_diff(out, ref)
    except Exception as exc:
        return f"could not compare with eager ({_err(exc)})"
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    return f"WARNING: output differs from eager (max rel diff {d:.2e})" if d > tol else ""


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        import torch._dynamo.config as dcfg

        for knob in ("recompile_limit", "cache_size_limit"):  # many shapes and static args per ref
            if hasattr(dcfg, knob):
                setattr(dcfg, knob, max(getattr(dcfg, knob), 256))
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def kernel_tasks(ctx_scale: str, dtypes: list[torch.dtype], device: torch.device) -> list[Task]:
    tasks = []
    for dtype in dtypes:
        for case in C.kernel_cases(ctx_scale):
            tasks.append(Task("kernels", f"kernels {case.name} {_dtype_name(dtype)}",
                              lambda ctx, case=case, dtype=dtype: run_kernel_case(ctx, case, dtype),
                              [("kernels", case.name)]))
    return tasks


QUICK_COMPILE_SKIP = ("skipped in --quick: torch.compile is measured on the prefill shape only (compiling every "
                      "decode shape takes minutes on CPU); run without --quick")


def kernel_providers(device_type: str, compile_: bool = True, compile_skip: str = "") -> list[tuple[str, str | None, str]]:
    """(provider, fastlm backend or None, skip reason or "") for the kernels suite."""
    out = [("eager", None, ""),
           ("compile", None, compile_skip or ("" if compile_ else "torch.compile disabled (--no-compile)"))]
    for b in discover(device_type, include_torch=False):
        reason = "" if b.timed else b.reason
        out.append((f"fastlm-{b.name}", b.name, reason))
    return out


def run_kernel_case(ctx: Context, case: C.KernelCase, dtype: torch.dtype) -> list[Row]:
    dev, dn = ctx.device, _dtype_name(dtype)
    mk = lambda prov, **kw: Row("kernels", case.name, prov, dn, str(dev), group=case.group,  # noqa: E731
                                shape=case.shape.name, **kw)
    try:
        bound = case.build(case, dev, dtype)
    except Exception as exc:
        return [mk("eager", status="failed", note=f"building inputs failed: {_err(exc)}")]
    rows = []
    eager = bound.eager()
    ref_out = eager()
    ref_out = [t.clone() for t in _flat(ref_out)]
    compile_skip = QUICK_COMPILE_SKIP if ctx.scale == "quick" and case.shape.decode else ""
    for prov, backend, skip in kernel_providers(dev.type, ctx.compile, compile_skip):
        if skip:
            rows.append(mk(prov, status="skipped", note=skip))
            continue
        ctx.note(prov)
        try:
            if prov == "eager":
                rows.append(_stats_row(mk(prov), measure(eager, dev, ctx.policy), ctx, bound.nbytes))
            elif prov == "compile":
                cfn = _compiled(bound.ref)
                t0 = time.perf_counter()
                cfn(*bound.ref_args)
                first = time.perf_counter() - t0
                fn = lambda: cfn(*bound.ref_args)  # noqa: E731
                row = _stats_row(mk(prov), measure(fn, dev, ctx.policy), ctx, bound.nbytes)
                row.note = f"first call (compile) {first:.1f}s"
                rows.append(row)
            else:
                if not has_impl(case.op, backend):
                    rows.append(mk(prov, status="skipped",
                                   note=f"backend {backend!r} registers no {case.op} kernel (would fall back to the reference)"))
                    continue
                fn = bound.public(backend)
                check = _mismatch_note(fn(), ref_out if len(ref_out) > 1 else ref_out[0], dtype)
                row = _stats_row(mk(prov), measure(fn, dev, ctx.policy), ctx, bound.nbytes)
                row.note = check
                rows.append(row)
        except Exception as exc:
            rows.append(mk(prov, status="failed", note=_err(exc)))
    return rows


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def attention_tasks(scale: str, dtypes: list[torch.dtype], device: torch.device) -> list[Task]:
    return [Task("attention", f"attention {case.name} {_dtype_name(dtype)}",
                 lambda ctx, case=case, dtype=dtype: run_attention_case(ctx, case, dtype),
                 [("attention", case.name)])
            for dtype in dtypes for case in C.attention_cases(scale)]


def _kv_cap_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.4)
    return 1 << 30


def run_attention_case(ctx: Context, case: C.AttentionCase, dtype: torch.dtype) -> list[Row]:
    dev, dn = ctx.device, _dtype_name(dtype)
    mk = lambda prov, **kw: Row("attention", case.name, prov, dn, str(dev), group=case.group,  # noqa: E731
                                shape=f"ctx{case.context}", **kw)
    es = torch.empty((), dtype=dtype).element_size()
    if case.kv_bytes(es) > _kv_cap_bytes(dev):
        return [mk("sdpa-eager", status="skipped",
                   note=f"KV cache {C.fmt_bytes(case.kv_bytes(es))} over this device's benchmark cap "
                        f"{C.fmt_bytes(_kv_cap_bytes(dev))}")]
    try:
        d = case.build(dev, dtype)
    except Exception as exc:
        return [mk("sdpa-eager", status="failed", note=f"building inputs failed: {_err(exc)}")]
    q, k, v, lengths, scale, nbytes = d["q"], d["k"], d["v"], d["lengths"], d["scale"], d["nbytes"]
    rows = []
    base = lambda: C.sdpa_eager_decode(q, k, v, scale)  # noqa: E731
    try:
        ref = base()
        rows.append(_stats_row(mk("sdpa-eager", note="transformers sdpa_attention_forward, DynamicCache, no mask"),
                               measure(base, dev, ctx.policy), ctx, nbytes))
    except Exception as exc:
        ref = None
        rows.append(mk("sdpa-eager", status="failed", note=_err(exc)))
    from fastlm import ops

    for b in discover(dev.type):
        prov = f"fastlm-{b.name}"
        if not b.timed:
            rows.append(mk(prov, status="skipped", note=b.reason))
            continue
        if not has_impl("decode_attention", b.name):
            rows.append(mk(prov, status="skipped",
                           note=f"backend {b.name!r} registers no decode_attention kernel"))
            continue
        ctx.note(prov)
        fn = lambda b=b.name: ops.decode_attention(q, k, v, lengths, scale, backend=b)  # noqa: E731
        try:
            check = _mismatch_note(fn(), ref, dtype) if ref is not None else ""
            row = _stats_row(mk(prov), measure(fn, dev, ctx.policy), ctx, nbytes)
            row.note = ("plain-PyTorch reference (einsum, fp32); " if b.name == "torch" else "") + check
            rows.append(row)
        except Exception as exc:
            rows.append(mk(prov, status="failed", note=_err(exc)))
    flash = C.flash_attn_kvcache()
    if flash is None or dev.type != "cuda" or dtype == torch.float32:
        why = ("flash-attn not installed" if flash is None else
               "flash-attn needs CUDA" if dev.type != "cuda" else "flash-attn needs fp16/bf16")
        rows.append(mk("flash-attn", status="skipped", note=why))
    else:
        try:
            kf, vf = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # its native [B,T,Hkv,D]
            q4 = q.unsqueeze(1)
            fn = lambda: flash(q4, kf, vf, cache_seqlens=lengths, softmax_scale=scale, causal=True)  # noqa: E731
            rows.append(_stats_row(mk("flash-attn", note="flash_attn_with_kvcache, [B,T,Hkv,D] cache"),
                                   measure(fn, dev, ctx.policy), ctx, nbytes))
        except Exception as exc:
            rows.append(mk("flash-attn", status="failed", note=_err(exc)))
    return rows


# ---------------------------------------------------------------------------------------------
# prefill / decode (end to end)
# ---------------------------------------------------------------------------------------------
def e2e_tasks(scale: str, dtypes: list[torch.dtype], device: torch.device, suites: set[str]) -> list[Task]:
    want = [s for s in ("prefill", "decode") if s in suites]
    if not want:
        return []
    return [Task(want[0], f"{'+'.join(want)} {fam} {_dtype_name(dtype)}",
                 lambda ctx, fam=fam, dtype=dtype: run_e2e_family(ctx, fam, dtype, want),
                 [(s, f"{fam}/{sh.prefill_name if s == 'prefill' else sh.decode_name}")
                  for s in want for sh in C.e2e_shapes(scale, device.type)])
            for dtype in dtypes for fam in C.e2e_sizes(scale, device.type)]


def _engine_generate():
    """``fastlm.generate`` (the decode engine) or (None, reason)."""
    try:
        import fastlm

        gen = getattr(fastlm, "generate", None)
        if gen is None:
            import fastlm.engine as engine

            gen = getattr(engine, "generate")
        return gen, ""
    except Exception as exc:
        return None, f"fastlm.engine is not importable yet ({_err(exc)})"


def _engine_kwargs(egen) -> dict:
    """Keyword arguments that make the engine generate exactly max_new_tokens greedy tokens."""
    import inspect

    try:
        params = inspect.signature(egen).parameters
    except (TypeError, ValueError):
        return {}
    kw = {}
    if "ignore_eos" in params:
        kw["ignore_eos"] = True
    if "temperature" in params:
        kw["temperature"] = 0.0
    return kw


def _e2e_reps(scale: str) -> tuple[int, int]:
    return {"tiny": (0, 1), "quick": (1, 3), "full": (1, 5)}[scale]


def _time_generate(gen_fn: Callable[[int], object], n_new: int, device, warmup: int, reps: int):
    """Samples of t(generate 1 token) and t(generate n_new tokens), interleaved."""
    for _ in range(warmup):  # generate(N) exercises the generate(1) path (prefill + first token) too
        gen_fn(n_new)
    t1, tn = [], []
    for _ in range(reps):
        t1.append(time_once(lambda: gen_fn(1), device))
        tn.append(time_once(lambda: gen_fn(n_new), device))
    return t1, tn


def _e2e_rows(ctx, fam, shape, dn, prov, t1, tn, want, note="") -> list[Row]:
    rows = []
    dev = str(ctx.device)
    if "prefill" in want:
        st = Stats.from_samples_us([t * 1e6 for t in t1])
        r = Row("prefill", f"{fam}/{shape.prefill_name}", prov, dn, dev, group=fam, shape=shape.prefill_name,
                note=note)
        r.median_us, r.p20_us, r.p80_us, r.reps = st.median_us, st.p20_us, st.p80_us, st.reps
        r.tokens_per_s = shape.batch * shape.prompt / (st.median_us * 1e-6)
        rows.append(r)
    if "decode" in want:
        steps = [(b - a) / max(shape.new_tokens - 1, 1) * 1e6 for a, b in zip(t1, tn)]
        st = Stats.from_samples_us(steps)
        r = Row("decode", f"{fam}/{shape.decode_name}", prov, dn, dev, group=fam, shape=shape.decode_name,
                note=note)
        r.median_us, r.p20_us, r.p80_us, r.reps = st.median_us, st.p20_us, st.p80_us, st.reps
        if st.median_us > 0:
            r.tokens_per_s = shape.batch / (st.median_us * 1e-6)
        else:  # timing noise larger than the decode time (tiny models, single repetition)
            r.status = "failed"
            r.note = (note + "; " if note else "") + "t(generate N) <= t(generate 1): noise exceeds decode time"
        rows.append(r)
    return rows


def _skip_rows(ctx, fam, shape, dn, prov, want, status, note) -> list[Row]:
    out = []
    for suite in want:
        name = shape.prefill_name if suite == "prefill" else shape.decode_name
        out.append(Row(suite, f"{fam}/{name}", prov, dn, str(ctx.device), status=status, group=fam, shape=name,
                       note=note))
    return out


def e2e_providers(device_type: str) -> list[tuple[str, str, str | None, str]]:
    """(provider, kind, backend, skip reason) for prefill/decode: hf, patched-<b> (HF generate on a
    fastlm.patch'ed model), fastlm-<b> (the decode engine), hf-static-compile."""
    out = [("hf", "hf", None, "")]
    backends = discover(device_type)
    for b in backends:
        out.append((f"patched-{b.name}", "patched", b.name, "" if b.timed else b.reason))
    gen, why = _engine_generate()
    if gen is None:
        out.append(("fastlm", "engine", None, why))
    else:
        for b in backends:
            out.append((f"fastlm-{b.name}", "engine", b.name, "" if b.timed else b.reason))
    out.append(("hf-static-compile", "static-compile", None, ""))
    return out


def run_e2e_family(ctx: Context, fam: str, dtype: torch.dtype, want: list[str]) -> list[Row]:
    import fastlm

    dev, dn = ctx.device, _dtype_name(dtype)
    sizes = C.e2e_sizes(ctx.scale, dev.type)[fam]
    shapes = C.e2e_shapes(ctx.scale, dev.type)
    rows: list[Row] = []
    selected = lambda shape: any(  # noqa: E731
        ctx.selected(s, f"{fam}/{shape.prefill_name if s == 'prefill' else shape.decode_name}") for s in want)
    shapes = [s for s in shapes if selected(s)]
    if not shapes:
        return rows
    try:
        model = C.build_model(fam, sizes, dev, dtype)
    except Exception as exc:
        for shape in shapes:
            rows += _skip_rows(ctx, fam, shape, dn, "hf", want, "failed", f"building the model failed: {_err(exc)}")
        return rows
    nparams = C.num_params(model)
    ctx.info.setdefault("e2e_models", {})[fam] = (
        f"{nparams / 1e6:.0f}M params, hidden {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, "
        f"heads {sizes['num_attention_heads']}, vocab {sizes['vocab_size']}")
    warmup, reps = _e2e_reps(ctx.scale)
    for shape in shapes:
        ids = C.random_ids(shape.batch, shape.prompt, sizes["vocab_size"], dev)
        mask = torch.ones_like(ids)
        for prov, kind, backend, skip in e2e_providers(dev.type):
            if skip:
                rows += _skip_rows(ctx, fam, shape, dn, prov, want, "skipped", skip)
                continue
            ctx.note(f"{prov} {shape.decode_name}")
            try:
                if kind == "static-compile":
                    rows += _run_static_compile(ctx, fam, shape, dtype, want, shapes)
                    continue
                if kind == "hf" or kind == "patched":
                    if kind == "patched":
                        fastlm.patch(model, backend)
                    else:
                        fastlm.unpatch(model)

                    def gen(n):
                        with torch.no_grad():
                            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                  do_sample=False, pad_token_id=0)
                else:
                    fastlm.unpatch(model)
                    egen, _ = _engine_generate()

                    extra = _engine_kwargs(egen)

                    def gen(n, backend=backend):
                        return egen(model, ids, max_new_tokens=n, backend=backend, **extra)
                t1, tn = _time_generate(gen, shape.new_tokens, dev, warmup, reps)
                rows += _e2e_rows(ctx, fam, shape, dn, prov, t1, tn, want)
            except Exception as exc:
                rows += _skip_rows(ctx, fam, shape, dn, prov, want, "failed", _err(exc))
            finally:
                try:
                    fastlm.unpatch(model)
                except Exception:
                    pass
    del model
    return rows


_STATIC_RESULTS: dict = {}


def _run_static_compile(ctx: Context, fam: str, shape, dtype, want, shapes) -> list[Row]:
    dn, dev = _dtype_name(dtype), ctx.device
    prov = "hf-static-compile"
    if dev.type == "cpu" and ctx.scale != "full":
        return _skip_rows(ctx, fam, shape, dn, prov, want, "skipped",
                          "skipped on CPU in --quick/--tiny (torch.compile of the decode step takes minutes here)")
    if not ctx.compile:
        return _skip_rows(ctx, fam, shape, dn, prov, want, "skipped", "torch.compile disabled (--no-compile)")
    key = (fam, dn, str(dev), ctx.scale)
    if key not in _STATIC_RESULTS:  # one worker process per family, all shapes: the compile cache is shared
        _STATIC_RESULTS[key] = _static_compile_worker(ctx, fam, dn, shapes)
    results = _STATIC_RESULTS[key]
    if isinstance(results, tuple):  # (status, note)
        return _skip_rows(ctx, fam, shape, dn, prov, want, results[0], results[1])
    result = results.get(f"{shape.batch}x{shape.prompt}x{shape.new_tokens}")
    if result is None:
        return _skip_rows(ctx, fam, shape, dn, prov, want, "skipped",
                          "not reached: the worker's time cap ran out on an earlier shape")
    note = f"static cache, compiled decode step; first generate (compile) {result['compile_s']:.1f}s"
    return _e2e_rows(ctx, fam, shape, dn, prov, result["t1"], result["tn"], want, note)


def _static_compile_worker(ctx: Context, fam: str, dn: str, shapes):
    """Run the hf-static-compile worker for every shape of ``fam``; returns {shape key: result} or
    (status, note). The cap is ``compile_timeout_s`` per shape; results printed before a timeout count."""
    job = dict(family=fam, scale=ctx.scale, device=str(ctx.device), dtype=dn, reps=_e2e_reps(ctx.scale)[1],
               shapes=[[s.batch, s.prompt, s.new_tokens] for s in shapes])
    cmd = [sys.executable, "-m", "fastlm.bench._static_compile_worker", json.dumps(job)]
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cap = ctx.compile_timeout_s * len(shapes)
    timed_out = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=env)
        stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, rc = "", None
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["key"]] = r
    if timed_out and not results:
        return ("skipped", f"compile + timing exceeded the {cap:.0f}s cap (--compile-timeout "
                           f"{ctx.compile_timeout_s:.0f}s per shape)")
    if not timed_out and rc != 0 and not results:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        return ("failed", f"worker failed: {tail[0][:250]}")
    return results


# ---------------------------------------------------------------------------------------------
# opcount
# ---------------------------------------------------------------------------------------------
def opcount_tasks(scale: str, dtypes: list[torch.dtype], device: torch.device) -> list[Task]:
    dtype = dtypes[0]  # op counts do not depend on the dtype
    return [Task("opcount", f"opcount {fam}", lambda ctx, fam=fam: run_opcount_family(ctx, fam, dtype),
                 [("opcount", f"{fam}/decode-step")])
            for fam in C.E2E_TINY]


def run_opcount_family(ctx: Context, fam: str, dtype: torch.dtype) -> list[Row]:
    from fastlm.bench.opcount import count_decode_step_ops

    dev, dn = ctx.device, _dtype_name(dtype)
    case = f"{fam}/decode-step"
    mk = lambda prov, **kw: Row("opcount", case, prov, dn, str(dev), group=fam, shape="decode-step", **kw)  # noqa
    try:
        model = C.build_model(fam, C.E2E_TINY[fam], dev, dtype)
    except Exception as exc:
        return [mk("hf", status="failed", note=f"building the model failed: {_err(exc)}")]
    rows = []
    provs = [("hf", None, "")] + [(f"fastlm-{b.name}", b.name, "" if b.available else b.reason)
                                   for b in discover(dev.type)]
    for prov, backend, skip in provs:
        if skip:
            rows.append(mk(prov, status="skipped", note=skip))
            continue
        try:
            oc = count_decode_step_ops(model, backend, batch=1, context=8)
            note = f"top ops/layer: {oc.top(6)}; outside layers: {oc.outside_layers}"
            if backend == "triton" and dev.type == "cpu":
                note = "counted under the Triton interpreter; " + note
            rows.append(mk(prov, ops_per_layer=oc.per_layer, note=note))
        except Exception as exc:
            rows.append(mk(prov, status="failed", note=_err(exc)))
    return rows


def plan(suites: list[str], scale: str, dtypes: list[torch.dtype], device: torch.device) -> list[Task]:
    tasks: list[Task] = []
    if "kernels" in suites:
        tasks += kernel_tasks(scale, dtypes, device)
    if "attention" in suites:
        tasks += attention_tasks(scale, dtypes, device)
    tasks += e2e_tasks(scale, dtypes, device, set(suites))
    if "opcount" in suites:
        tasks += opcount_tasks(scale, dtypes, device)
    return tasks


__all__ = ["Context", "Task", "Unavailable", "plan", "kernel_providers", "kernel_callable", "attention_providers",
           "attention_callable", "e2e_providers"]


# ---------------------------------------------------------------------------------------------
# Single-callable access for the pytest-benchmark files in benchmarks/
# ---------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """A provider cannot run this case here; the message says why."""


def _synced(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def kernel_callable(case: C.KernelCase, provider: str, device, dtype: torch.dtype):
    """(zero-arg callable, bytes moved) for one kernels-suite provider, or raises :class:`Unavailable`.
    Compiles (and runs once) for ``compile``. CUDA callables synchronise, for wall-clock timers."""
    device = torch.device(device)
    bound = case.build(case, device, dtype)
    if provider == "eager":
        fn = bound.eager()
    elif provider == "compile":
        cfn = _compiled(bound.ref)
        cfn(*bound.ref_args)
        fn = lambda: cfn(*bound.ref_args)  # noqa: E731
    elif provider.startswith("fastlm-"):
        backend = provider[len("fastlm-"):]
        info = {b.name: b for b in discover(device.type)}.get(backend)
        if info is None or not info.timed:
            raise Unavailable(info.reason if info else f"unknown backend {backend!r}")
        if not has_impl(case.op, backend):
            raise Unavailable(f"backend {backend!r} registers no {case.op} kernel")
        fn = bound.public(backend)
    else:
        raise Unavailable(f"unknown kernels provider {provider!r}")
    return _synced(fn, device), bound.nbytes


def attention_providers(device_type: str) -> list[str]:
    return ["sdpa-eager"] + [f"fastlm-{b.name}" for b in discover(device_type)] + ["flash-attn"]


def attention_callable(case: C.AttentionCase, provider: str, device, dtype: torch.dtype):
    """(zero-arg callable, bytes moved) for one attention-suite provider, or raises :class:`Unavailable`."""
    device = torch.device(device)
    es = torch.empty((), dtype=dtype).element_size()
    if case.kv_bytes(es) > _kv_cap_bytes(device):
        raise Unavailable(f"KV cache {C.fmt_bytes(case.kv_bytes(es))} over the benchmark cap")
    d = case.build(device, dtype)
    q, k, v, lengths, scale = d["q"], d["k"], d["v"], d["lengths"], d["scale"]
    if provider == "sdpa-eager":
        fn = lambda: C.sdpa_eager_decode(q, k, v, scale)  # noqa: E731
    elif provider.startswith("fastlm-"):
        from fastlm import ops

        backend = provider[len("fastlm-"):]
        info = {b.name: b for b in discover(device.type)}.get(backend)
        if info is None or not info.timed:
            raise Unavailable(info.reason if info else f"unknown backend {backend!r}")
        if not has_impl("decode_attention", backend):
            raise Unavailable(f"backend {backend!r} registers no decode_attention kernel")
        fn = lambda: ops.decode_attention(q, k, v, lengths, scale, backend=backend)  # noqa: E731
    elif provider == "flash-attn":
        flash = C.flash_attn_kvcache()
        if flash is None or device.type != "cuda" or dtype == torch.float32:
            raise Unavailable("flash-attn needs to be installed, CUDA, and fp16/bf16")
        kf, vf, q4 = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.unsqueeze(1)
        fn = lambda: flash(q4, kf, vf, cache_seqlens=lengths, softmax_scale=scale, causal=True)  # noqa: E731
    else:
        raise Unavailable(f"unknown attention provider {provider!r}")
    return _synced(fn, device), d["nbytes"]
