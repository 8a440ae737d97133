"""The ``prefill`` and ``decode`` suites, end to end on random-weight models of each family
(fastlm.bench.configs): ``transformers`` ``generate`` (``hf``), ``generate`` on a ``fastlm.patch``ed
model (``patched-<backend>``), fastlm's decode engine (``fastlm-<backend>``) and ``generate`` with a
static cache and a compiled decode step (``hf-static-compile``, timed in a worker process with a time
cap), and llama.cpp (``llama.cpp``, optional: fastlm.bench.llamacpp) at batch 1, its rounds interleaved
with those of the head-to-head fastlm provider (:func:`head_to_head`). Both suites come from the same
timings: prefill = t(generate 1 token); decode step = (t(generate N) - t(generate 1)) / (N - 1), paired
per repetition.

Weight quantizations (``quantize``: ``int8``, ``int4``) are precisions of their own: the head-to-head
fastlm provider on ``fastlm.patch(model, quantize=...)`` against llama.cpp's Q8_0 / Q4_0; their rows'
dtype is the quantization's name."""
from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fastlm.bench import configs, llamacpp
from fastlm.bench.backends import discover, timed_backend
from fastlm.bench.results import Row
from fastlm.bench.suite import Built, Context, Suite, Task, Unavailable, dtype_name, error_text
from fastlm.bench.timing import Stats, time_once

STATIC_COMPILE = "hf-static-compile"
STATIC_COMPILE_CPU_SKIP = "skipped on CPU in --quick/--tiny (torch.compile of the decode step takes minutes here)"
LLAMA = llamacpp.PROVIDER
QUANTIZATIONS = ("int8", "int4")


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
    # CPU: prefill at 32 and 512 tokens (llama.cpp's usual pp32 / pp512), decode after each
    return [(1, 512, 128), (8, 512, 128)] if device_type == "cuda" else [(1, 32, 64), (1, 512, 64), (8, 128, 32)]


def repetitions(scale: str, rounds: int | None = None) -> tuple[int, int]:
    """(warm-up, timed) generate pairs per case: by mode, or ``rounds`` timed ones (``--rounds``)."""
    warmup, timed = {"tiny": (0, 1), "quick": (1, 3), "full": (1, 5)}[scale]
    return warmup, rounds or timed


def time_generate(generate: Callable[[int], object], n_new: int, device, warmup: int, reps: int,
                  between: Callable[[], object] | None = None):
    """Samples of t(generate 1 token) and t(generate n_new tokens), interleaved; ``between()`` (another
    provider's round, untimed here) runs after each timed pair."""
    for _ in range(warmup):  # generate(N) exercises the generate(1) path (prefill + first token) too
        generate(n_new)
    t1, tn = [], []
    for _ in range(reps):
        t1.append(time_once(lambda: generate(1), device))
        tn.append(time_once(lambda: generate(n_new), device))
        if between is not None:
            between()
    return t1, tn


def _decode_steps(case, t1: list[float], tn: list[float]) -> list[float]:
    """Seconds per decode step of each round: t(generate new_tokens) - t(generate 1) over the steps between."""
    return [(b - a) / max(case.new_tokens - 1, 1) for a, b in zip(t1, tn)]


def head_to_head(device_type: str) -> str | None:
    """The fastlm engine provider llama.cpp's rounds interleave with: the first timed backend that is not
    the plain-PyTorch reference (else the reference)."""
    timed = [b.name for b in discover(device_type) if b.timed]
    native = [b for b in timed if b != "torch"]
    return f"fastlm-{(native or timed)[0]}" if timed else None


def decode_bytes_per_token(model, weight_bytes: float, kv_bytes: float, context: float) -> float:
    """Bytes one batch-1 decode step must read at a ``context``-token cache: every weight (lm_head
    included; of the input embedding one row), the cached keys and values, and the new token's k/v."""
    cfg = model.config
    embed = model.get_input_embeddings().weight  # [V, hidden]
    weights = sum(p.numel() for p in model.parameters()) - embed.numel() + embed.shape[1]
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_per_token = cfg.num_hidden_layers * 2 * kv_heads * head_dim * kv_bytes
    return weights * weight_bytes + kv_per_token * (context + 1)


def patch_takes_quantize() -> bool:
    import fastlm

    return "quantize" in inspect.signature(fastlm.patch).parameters


def _compile_config(device: torch.device):
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    cc._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    return cc


class EndToEnd(Suite):
    compiling = (STATIC_COMPILE,)

    def __init__(self, want=("prefill", "decode"), quantize=()):
        self.want = list(want)
        self.name = self.want[0]
        self.label = "+".join(self.want)
        bad = [q for q in quantize if q not in QUANTIZATIONS]
        if bad:
            raise ValueError(f"unknown quantization(s) {bad}; expected some of {list(QUANTIZATIONS)}")
        self.quantize = list(quantize)
        self._model = None      # (family, device, dtype, sizes, model): shared by one family's cases
        self._static: dict = {}  # (family, dtype, device, scale) -> the worker's results
        self._quantizing: str | None = None  # the weight quantization rows() is running (build reads it)
        # the head-to-head provider's samples of the case rows() is running (t1, tn) and how many llama.cpp
        # rounds ran between its timed pairs: what _llama_rows pairs llama.cpp's samples with
        self._interleaved: tuple[list[float], list[float], int] | None = None

    def cases(self, scale, device):
        device_type = torch.device(device).type
        return [E2ECase(f, *s, scale) for f in configs.FAMILIES for s in shapes(scale, device_type)]

    def keys(self, case):
        return [(s, f"{case.family}/{case.prefill_name if s == 'prefill' else case.decode_name}") for s in self.want]

    def providers(self, device_type):
        backends = [b.name for b in discover(device_type)]
        return (["hf"] + [f"patched-{b}" for b in backends] + [f"fastlm-{b}" for b in backends] + [STATIC_COMPILE]
                + [LLAMA])

    def tasks(self, scale, dtypes, device):
        """Each case in each dtype, then in each weight quantization (activations in the first dtype)."""
        out = super().tasks(scale, dtypes, device)
        for q in self.quantize:
            out += [Task(self.name, f"{self.label} {case.name} {q}",
                         lambda ctx, case=case, q=q: self.rows(ctx, case, dtypes[0], quantize=q), self.keys(case))
                    for case in self.cases(scale, device)]
        return out

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
        if provider == LLAMA:
            raise Unavailable("llama.cpp is timed by `fastlm bench` only, from llama-bench's own timings (a "
                              "subprocess's wall time would include loading the model)")
        if provider == STATIC_COMPILE and device.type == "cpu" and case.scale != "full":
            raise Unavailable(STATIC_COMPILE_CPU_SKIP)
        backend = timed_backend(provider, device.type) if provider.startswith(("patched-", "fastlm-")) else None
        if self._quantizing is not None:
            return self._build_quantized(case, provider, device, dtype, backend)
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

    def _build_quantized(self, case, provider, device, dtype, backend):
        """fastlm's engine on a model of its own, patched with ``quantize=`` (in place: 16-bit weights freed)."""
        import fastlm

        q = self._quantizing
        if not provider.startswith("fastlm-") or backend is None:
            raise Unavailable(f"{q} weights are timed on fastlm's engine only")
        if not patch_takes_quantize():
            raise Unavailable(f"fastlm.patch has no quantize= argument here: {q} weights are not implemented yet")
        sizes = configs.model_sizes(case.family, case.scale, device.type)
        model = fastlm.patch(configs.build_model(case.family, sizes, device, dtype), backend, quantize=q)
        ids = configs.random_ids(case.batch, case.prompt, sizes["vocab_size"], device)

        def generate(n):
            return fastlm.generate(model, ids, max_new_tokens=n, backend=backend, ignore_eos=True)

        return Built(lambda: generate(case.new_tokens), generate=generate, rounds=3,
                     note=f"{q} weights, {dtype_name(dtype)} activations")

    # ---- driver ----------------------------------------------------------------------------
    def _rows(self, ctx: Context, case: E2ECase, provider: str, dtype, **kw) -> list[Row]:
        name_of = self._quantizing or dtype_name(dtype)
        return [Row(s, name, provider, name_of, str(ctx.device), group=case.family, shape=name.split("/")[1], **kw)
                for s, name in self.keys(case)]

    def _fill(self, row: Row, samples_s: list[float], tokens: int, note: str = "") -> None:
        st = Stats.from_samples_us([t * 1e6 for t in samples_s])
        row.median_us, row.p20_us, row.p80_us, row.reps = st.median_us, st.p20_us, st.p80_us, st.reps
        if st.median_us > 0:
            row.tokens_per_s = tokens / (st.median_us * 1e-6)
        else:  # timing noise larger than the decode time (tiny models, single repetition)
            row.status = "failed"
            row.note = (note + "; " if note else "") + "t(generate N) <= t(generate 1): noise exceeds decode time"

    def _timed_rows(self, ctx, case, provider, dtype, t1, tn, note="") -> list[Row]:
        samples = {"prefill": t1, "decode": _decode_steps(case, t1, tn)}
        tokens = {"prefill": case.batch * case.prompt, "decode": case.batch}
        rows = self._rows(ctx, case, provider, dtype, note=note)
        for row in rows:
            self._fill(row, samples[row.suite], tokens[row.suite], note)
            if row.suite == "decode" and not self._quantizing:
                size = dtype.itemsize  # fastlm and HF keep weights and the KV cache in the model's dtype
                self._bandwidth(ctx, case, row, size, size)
        return rows

    def _bandwidth(self, ctx, case, row: Row, weight_bytes: float, kv_bytes: float) -> None:
        """A batch-1 decode row's bytes per token (decode_bytes_per_token at the steps' mean context),
        their rate, and its fraction of the machine's read bandwidth."""
        if case.batch != 1 or not row.ok or self._model is None:
            return
        context = case.prompt + case.new_tokens / 2
        row.bytes = decode_bytes_per_token(self._model[2], weight_bytes, kv_bytes, context)
        row.gb_per_s = row.bytes * row.tokens_per_s / 1e9
        if ctx.read_bw_gbs == ctx.read_bw_gbs:  # not NaN
            row.read_bw_frac = row.gb_per_s / ctx.read_bw_gbs

    def rows(self, ctx, case, dtype, quantize: str | None = None):
        import fastlm

        self._quantizing = quantize
        self._interleaved = None
        try:
            sizes, model = self.model(case, ctx.device, torch.float32 if quantize else dtype)
        except Exception as exc:
            failed = self._rows(ctx, case, "hf", dtype, status="failed",
                                note=f"building the model failed: {error_text(exc)}")
            self._quantizing = None
            return failed
        try:
            if not quantize:
                ctx.info.setdefault("e2e_models", {})[case.family] = configs.describe(
                    case.family, sizes, configs.num_params(model))
            llama = self._llama_rounds(ctx, case, dtype, sizes, model)
            paired = head_to_head(ctx.device.type)
            providers = [p for p in self.providers(ctx.device.type) if ctx.provider_selected(p)]
            if quantize:
                providers = [p for p in providers if p in (paired, LLAMA)]
            out: list[Row] = []
            for provider in providers:
                if provider == LLAMA:
                    out += self._llama_rows(ctx, case, dtype, llama)
                    continue
                built, skipped = self.prepare(ctx, case, provider, dtype)
                if built is None:
                    out += self._rows(ctx, case, provider, dtype, status=skipped.status, note=skipped.note)
                    continue
                ctx.note(f"{provider} {case.decode_name}" + (" + llama.cpp" if provider == paired and
                                                             isinstance(llama, llamacpp.Rounds) else ""))
                try:
                    if provider == STATIC_COMPILE:
                        out += self._static_compile_rows(ctx, case, dtype)
                    else:
                        between = llama.run if provider == paired and isinstance(llama, llamacpp.Rounds) else None
                        t1, tn = time_generate(built.generate, case.new_tokens, ctx.device,
                                               *repetitions(ctx.scale, ctx.rounds), between=between)
                        out += self._timed_rows(ctx, case, provider, dtype, t1, tn, built.note)
                        if between is not None:
                            self._interleaved = (t1, tn, len(llama.prefill_s))
                except Exception as exc:
                    out += self._rows(ctx, case, provider, dtype, status="failed", note=error_text(exc))
                finally:
                    if not quantize:
                        fastlm.unpatch(model)
            return out
        finally:
            self._quantizing = None

    # ---- llama.cpp -------------------------------------------------------------------------
    def _llama_rounds(self, ctx, case, dtype, sizes, model) -> "llamacpp.Rounds | str":
        """llama.cpp's rounds for this case, its GGUF made (converted / quantized, cached), or why not."""
        if case.batch != 1:
            return "llama-bench times one sequence (batch 1) only"
        if ctx.device.type != "cpu":
            return "llama.cpp is timed on CPU runs only"
        precision = self._quantizing or dtype_name(dtype)
        if precision not in llamacpp.GGUF_TYPES:
            return f"no GGUF type for {precision}"
        why = llamacpp.unsupported(case.family, sizes)
        if why:
            return why
        tool = llamacpp.find()
        if isinstance(tool, str):
            return tool
        threads = torch.get_num_threads()
        gguf_type = llamacpp.GGUF_TYPES[precision]
        ctx.note(f"llama.cpp {gguf_type} GGUF (converted once, then cached)")
        try:
            gguf = self._gguf(tool, case, sizes, gguf_type, dtype, model, threads)
        except Exception as exc:
            return f"making the {gguf_type} GGUF failed: {error_text(exc)}"
        info = ctx.info.setdefault("llama_cpp", {})
        info.update(source=tool.source, bench=tool.bench, threads=threads)
        return llamacpp.Rounds(tool, gguf, gguf_type, prompt=case.prompt, new_tokens=case.new_tokens,
                               threads=threads, rounds=repetitions(ctx.scale, ctx.rounds)[1])

    def _gguf(self, tool, case, sizes, gguf_type, dtype, model, threads) -> str:
        root = llamacpp.cache_root()
        if gguf_type in llamacpp.CONVERTED:  # the very checkpoint fastlm times in this dtype
            folder = os.path.join(root, llamacpp.checkpoint_key(case.family, sizes, dtype_name(dtype)))
            return llamacpp.gguf_path(tool, folder, gguf_type, lambda: model, case.family, threads)
        folder = os.path.join(root, llamacpp.checkpoint_key(case.family, sizes, "float32"))
        make = (lambda: model) if model.dtype == torch.float32 else (
            lambda: configs.build_model(case.family, sizes, "cpu", torch.float32))
        source = llamacpp.gguf_path(tool, folder, llamacpp.QUANTIZE_FROM, make, case.family, threads)
        return llamacpp.gguf_path(tool, folder, gguf_type, make, case.family, threads, source=source)

    def _llama_rows(self, ctx, case, dtype, llama) -> list[Row]:
        if isinstance(llama, str):
            return self._rows(ctx, case, LLAMA, dtype, status="skipped", note=llama)
        ctx.note(f"llama.cpp {llama.gguf_type} {case.decode_name}")
        llama.finish()  # the rounds the interleaved fastlm provider did not run (it was skipped or failed)
        if llama.error:
            return self._rows(ctx, case, LLAMA, dtype, status="failed", note=llama.error)
        info = ctx.info.setdefault("llama_cpp", {})
        info.update(llama.describe())
        rows = self._rows(ctx, case, LLAMA, dtype, note=llama.note())
        for row in rows:
            if row.suite == "prefill":
                self._fill(row, llama.prefill_s, case.prompt)
            else:
                self._fill(row, llama.decode_step_s, 1)
                if llama.gguf_type in llamacpp.CONVERTED:
                    self._bandwidth(ctx, case, row, llamacpp.TYPE_BYTES[llama.gguf_type], llama.kv_bytes())
            if row.ok and self._interleaved is not None:
                self._pair(row, case, llama)
        return rows

    def _pair(self, row: Row, case, llama) -> None:
        """row.paired_*: per interleaved round, fastlm's tokens/s over llama.cpp's (both batch 1, the same
        tokens a round: the ratio of llama.cpp's time to fastlm's), over the rounds where both timings are
        positive."""
        t1, tn, rounds = self._interleaved
        rounds = min(rounds, len(t1))
        if row.suite == "prefill":
            pairs = zip(llama.prefill_s[:rounds], t1[:rounds])
        else:
            pairs = zip(llama.decode_step_s[:rounds], _decode_steps(case, t1[:rounds], tn[:rounds]))
        ratios = sorted(theirs / ours for theirs, ours in pairs if theirs > 0 and ours > 0)
        if ratios:
            row.paired_ratio, row.paired_min, row.paired_max = statistics.median(ratios), ratios[0], ratios[-1]

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
                   reps=repetitions(ctx.scale, ctx.rounds)[1], shapes=[c.key for c in cases])
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
