"""The ``prefill`` and ``decode`` suites, end to end on random-weight models of each family
(fastlm.bench.configs): ``transformers`` ``generate`` (``hf``), ``generate`` on a ``fastlm.patch``ed
model (``patched-<backend>``), fastlm's decode engine (``fastlm-<backend>``) and ``generate`` with a
static cache and a compiled decode step (``hf-static-compile``, timed in a worker process with a time
cap). Both suites come from the same timings: prefill = t(generate 1 token); decode step =
(t(generate N) - t(generate 1)) / (N - 1), paired per repetition."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fastlm.bench import configs
from fastlm.bench.backends import discover, timed_backend
from fastlm.bench.results import Row
from fastlm.bench.suite import Built, Context, Suite, Unavailable, dtype_name, error_text
from fastlm.bench.timing import Stats, time_once

STATIC_COMPILE = "hf-static-compile"
STATIC_COMPILE_CPU_SKIP = "skipped on CPU in --quick/--tiny (torch.compile of the decode step takes minutes here)"


@dataclass(frozen=True)
class E2ECase:
    family: str
    batch: int
    prompt: int
    new_tokens: int
    scale: str

    @property
    def prefill_name(self) -> str:
        return f"B{self.batch}-P{self.prompt}"

    @property
    def decode_name(self) -> str:
        return f"B{self.batch}-P{self.prompt}-N{self.new_tokens}"

    @property
    def name(self) -> str:
        return f"{self.family}/{self.decode_name}"

    group = property(lambda self: self.family)
    shape = property(lambda self: self.decode_name)

    @property
    def key(self) -> list[int]:
        return [self.batch, self.prompt, self.new_tokens]


def shapes(scale: str, device_type: str) -> list[tuple[int, int, int]]:
    """(batch, prompt tokens, new tokens)."""
    if scale != "full":
        return [(1, 8, 4)] if scale == "tiny" else [(1, 128, 16)]
    return [(1, 512, 128), (8, 512, 128)] if device_type == "cuda" else [(1, 512, 64), (8, 128, 32)]


def repetitions(scale: str) -> tuple[int, int]:
    """(warm-up, timed) generate pairs per case."""
    return {"tiny": (0, 1), "quick": (1, 3), "full": (1, 5)}[scale]


def time_generate(generate: Callable[[int], object], n_new: int, device, warmup: int, reps: int):
    """Samples of t(generate 1 token) and t(generate n_new tokens), interleaved."""
    for _ in range(warmup):  # generate(N) exercises the generate(1) path (prefill + first token) too
        generate(n_new)
    t1, tn = [], []
    for _ in range(reps):
        t1.append(time_once(lambda: generate(1), device))
        tn.append(time_once(lambda: generate(n_new), device))
    return t1, tn


def _compile_config(device: torch.device):
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    return cc


class EndToEnd(Suite):
    compiling = (STATIC_COMPILE,)

    def __init__(self, want=("prefill", "decode")):
        self.want = list(want)
        self.name = self.want[0]
        self.label = "+".join(self.want)
        self._model = None      # (family, device, dtype, sizes, model): shared by one family's cases
        self._static: dict = {}  # (family, dtype, device, scale) -> the worker's results

    def cases(self, scale, device):
        device_type = torch.device(device).type
        return [E2ECase(f, *s, scale) for f in configs.FAMILIES for s in shapes(scale, device_type)]

    def keys(self, case):
        return [(s, f"{case.family}/{case.prefill_name if s == 'prefill' else case.decode_name}") for s in self.want]

    def providers(self, device_type):
        backends = [b.name for b in discover(device_type)]
        return (["hf"] + [f"patched-{b}" for b in backends] + [f"fastlm-{b}" for b in backends] + [STATIC_COMPILE])

    def model(self, case: E2ECase, device, dtype):
        """(sizes, model) of the case's family, built once for consecutive cases of that family."""
        key = (case.family, case.scale, torch.device(device), dtype)
        if self._model is None or self._model[0] != key:
            self._model = None
            sizes = configs.model_sizes(case.family, case.scale, torch.device(device).type)
            self._model = (key, sizes, configs.build_model(case.family, sizes, device, dtype))
        return self._model[1], self._model[2]

    def build(self, case, provider, device, dtype):
        import fastlm

        device = torch.device(device)
        if provider == STATIC_COMPILE and device.type == "cpu" and case.scale != "full":
            raise Unavailable(STATIC_COMPILE_CPU_SKIP)
        backend = timed_backend(provider, device.type) if provider.startswith(("patched-", "fastlm-")) else None
        sizes, model = self.model(case, device, dtype)
        ids = configs.random_ids(case.batch, case.prompt, sizes["vocab_size"], device)
        fastlm.unpatch(model)
        if provider.startswith("fastlm-"):
            def generate(n):
                return fastlm.generate(model, ids, max_new_tokens=n, backend=backend, ignore_eos=True)
        elif provider in ("hf", STATIC_COMPILE) or backend is not None:
            if backend is not None:
                fastlm.patch(model, backend)
            extra = dict(cache_implementation="static", compile_config=_compile_config(device)) \
                if provider == STATIC_COMPILE else {}
            mask = torch.ones_like(ids)

            def generate(n):
                with torch.no_grad():
                    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, pad_token_id=0, **extra)
        else:
            raise Unavailable(f"unknown end-to-end provider {provider!r}")
        return Built(lambda: generate(case.new_tokens), generate=generate, rounds=3)

    # ---- driver ----------------------------------------------------------------------------
    def _rows(self, ctx: Context, case: E2ECase, provider: str, dtype, **kw) -> list[Row]:
        return [Row(s, name, provider, dtype_name(dtype), str(ctx.device), group=case.family, shape=name.split("/")[1],
                    **kw) for s, name in self.keys(case)]

    def _timed_rows(self, ctx, case, provider, dtype, t1, tn, note="") -> list[Row]:
        samples = {"prefill": t1, "decode": [(b - a) / max(case.new_tokens - 1, 1) for a, b in zip(t1, tn)]}
        tokens = {"prefill": case.batch * case.prompt, "decode": case.batch}
        rows = self._rows(ctx, case, provider, dtype, note=note)
        for row in rows:
            st = Stats.from_samples_us([t * 1e6 for t in samples[row.suite]])
            row.median_us, row.p20_us, row.p80_us, row.reps = st.median_us, st.p20_us, st.p80_us, st.reps
            if st.median_us > 0:
                row.tokens_per_s = tokens[row.suite] / (st.median_us * 1e-6)
            else:  # timing noise larger than the decode time (tiny models, single repetition)
                row.status = "failed"
                row.note = (note + "; " if note else "") + "t(generate N) <= t(generate 1): noise exceeds decode time"
        return rows

    def rows(self, ctx, case, dtype):
        import fastlm

        try:
            sizes, model = self.model(case, ctx.device, dtype)
        except Exception as exc:
            return self._rows(ctx, case, "hf", dtype, status="failed",
                              note=f"building the model failed: {error_text(exc)}")
        ctx.info.setdefault("e2e_models", {})[case.family] = configs.describe(case.family, sizes,
                                                                             configs.num_params(model))
        out: list[Row] = []
        for provider in self.providers(ctx.device.type):
            built, skipped = self.prepare(ctx, case, provider, dtype)
            if built is None:
                out += self._rows(ctx, case, provider, dtype, status=skipped.status, note=skipped.note)
                continue
            ctx.note(f"{provider} {case.decode_name}")
            try:
                if provider == STATIC_COMPILE:
                    out += self._static_compile_rows(ctx, case, dtype)
                else:
                    t1, tn = time_generate(built.generate, case.new_tokens, ctx.device, *repetitions(ctx.scale))
                    out += self._timed_rows(ctx, case, provider, dtype, t1, tn)
            except Exception as exc:
                out += self._rows(ctx, case, provider, dtype, status="failed", note=error_text(exc))
            finally:
                fastlm.unpatch(model)
        return out

    def _static_compile_rows(self, ctx, case, dtype) -> list[Row]:
        key = (case.family, dtype, str(ctx.device), ctx.scale)
        if key not in self._static:  # one worker per family, all its shapes: the compile cache is shared
            family_cases = [c for c in self.cases(ctx.scale, ctx.device) if c.family == case.family
                            and any(ctx.selected(*k) for k in self.keys(c))]
            self._static[key] = self._run_worker(ctx, case.family, dtype, family_cases)
        results = self._static[key]
        if isinstance(results, tuple):  # (status, note)
            return self._rows(ctx, case, STATIC_COMPILE, dtype, status=results[0], note=results[1])
        result = results.get("x".join(map(str, case.key)))
        if result is None:
            return self._rows(ctx, case, STATIC_COMPILE, dtype, status="skipped",
                              note="not reached: the worker's time cap ran out on an earlier shape")
        note = f"static cache, compiled decode step; first generate (compile) {result['compile_s']:.1f}s"
        return self._timed_rows(ctx, case, STATIC_COMPILE, dtype, result["t1"], result["tn"], note)

    def _run_worker(self, ctx, family: str, dtype, cases: list[E2ECase]):
        """{shape key: result} from fastlm.bench._static_compile_worker, or (status, note). The cap is
        ``compile_timeout_s`` per shape; results printed before a timeout count."""
        job = dict(family=family, scale=ctx.scale, device=str(ctx.device), dtype=dtype_name(dtype),
                   reps=repetitions(ctx.scale)[1], shapes=[c.key for c in cases])
        cmd = [sys.executable, "-m", "fastlm.bench._static_compile_worker", json.dumps(job)]
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cap = ctx.compile_timeout_s * len(cases)
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
