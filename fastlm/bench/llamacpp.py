"""llama.cpp as an optional provider of the end-to-end suites (``prefill`` / ``decode``).

The same random-weight checkpoint the suite times with fastlm (same config, seed and dtype) is saved with
``save_pretrained``, converted to GGUF with llama.cpp's own ``convert_hf_to_gguf.py`` (f32, bf16, f16)
and quantized with ``llama-quantize`` (Q8_0, Q4_0, from the f32 file); ``llama-bench`` then times
prefill (``-p P``) and decode (``-n N -d P``: N tokens after a P-token context, as fastlm's decode of
the same case) at batch 1, one round per fastlm round, interleaved with them.

Where llama.cpp is found: ``FASTLM_LLAMA_CPP`` names a directory holding ``llama-bench``,
``llama-quantize`` (also under ``bin/`` or ``build/bin/``) and ``convert_hf_to_gguf.py`` (next to its
``conversion/`` and ``gguf-py/`` folders, as in llama.cpp's source tree); the converter runs with
``FASTLM_LLAMA_CPP_PYTHON``, else ``<dir>/venv/bin/python`` or ``<dir>/.venv/bin/python``, else this
Python. Without the variable, ``llama-bench``, ``llama-quantize`` and ``convert_hf_to_gguf.py`` are
looked up on ``PATH``. Otherwise every llama.cpp row is skipped, saying why. GGUF files are cached
under ``FASTLM_LLAMA_CPP_CACHE`` (default: ``<tmp>/fastlm-llamacpp``).

Building it (outside this repository, never in CI; about 20 minutes on 2 cores)::

    mkdir -p /work/llama && cd /work/llama
    pip download --no-deps --no-binary :all: llama-cpp-python   # the sdist vendors llama.cpp
    tar xzf llama_cpp_python-*.tar.gz && ln -s llama_cpp_python-*/vendor/llama.cpp src
    cmake -S src -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-bench llama-quantize -j2
    python -m venv venv && venv/bin/pip install torch transformers numpy sentencepiece ./src/gguf-py
    mkdir dist && ln -s ../build/bin/llama-bench ../build/bin/llama-quantize ../venv dist/
    ln -s ../src/convert_hf_to_gguf.py dist/
    export FASTLM_LLAMA_CPP=/work/llama/dist

(An AVX2-only build, for CPUs without AVX-512: ``-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF``.)

Families: Arcee and StableLM convert as themselves; Helium is converted as a Llama (its interleaved
RoPE is llama.cpp's normal RoPE: :func:`helium_as_llama` reorders q/k rows so that a Llama with
half-split RoPE computes exactly what the Helium model does, and the converter's own q/k permutation
then restores the interleaved rows that llama.cpp expects; checked against llama.cpp itself once, by hand:
``llama-simple``'s 16 greedy tokens on the f32 GGUF of the CPU suite's Helium, and of its Arcee, equal
transformers' on the same checkpoint and prompt); Persimmon has no llama.cpp architecture, and
StableLM with ``qk_layernorm`` is skipped (the converter drops those weights). Random-weight checkpoints
have no tokenizer: the converter is given a placeholder vocabulary of the model's size (``llama-bench``
feeds random token ids; no text is ever tokenized).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ENV_DIR = "FASTLM_LLAMA_CPP"
ENV_PYTHON = "FASTLM_LLAMA_CPP_PYTHON"
ENV_CACHE = "FASTLM_LLAMA_CPP_CACHE"
PROVIDER = "llama.cpp"

# fastlm precision (a torch dtype's name, or a weight quantization) -> the GGUF type at equal precision
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "Q8_0", "int4": "Q4_0"}
CONVERTED = ("f32", "bf16", "f16")  # written by convert_hf_to_gguf.py --outtype; the rest by llama-quantize
QUANTIZE_FROM = "f32"                # quantized types are made from the f32 file (no double rounding)
NO_ARCHITECTURE = "no llama.cpp architecture"
TYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2}  # per weight of the converted types (norm vectors stay f32: negligible)


@dataclass(frozen=True)
class LlamaCpp:
    """Paths to one llama.cpp build and its converter."""
    bench: str
    quantize: str
    converter: str
    python: str
    source: str  # how it was found, for the summary


@dataclass
class BenchResult:
    """One test of a ``llama-bench -o json`` run."""
    n_prompt: int
    n_gen: int
    n_depth: int
    n_threads: int
    samples_ns: list[int]
    samples_ts: list[float]   # tokens per second of each repetition
    avg_ts: float
    model_type: str = ""
    model_size: int = 0       # bytes of the weights
    build_commit: str = ""
    cpu_info: str = ""
    flash_attn: object = None
    extra: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "prefill" if self.n_prompt and not self.n_gen else "decode"


def _first_file(candidates, executable: bool) -> str | None:
    for path in candidates:
        if os.path.isfile(path) and (not executable or os.access(path, os.X_OK)):
            return path
    return None


def find(env=None) -> LlamaCpp | str:
    """The llama.cpp build to time, or the reason there is none (see the module docstring)."""
    env = os.environ if env is None else env
    root = env.get(ENV_DIR)
    if root:
        if not os.path.isdir(root):
            return f"{ENV_DIR}={root} is not a directory"
        dirs = [root, os.path.join(root, "bin"), os.path.join(root, "build", "bin")]
        tools = {name: _first_file([os.path.join(d, name) for d in dirs], True)
                 for name in ("llama-bench", "llama-quantize")}
        converter = _first_file([os.path.join(root, "convert_hf_to_gguf.py")], False)
        python = env.get(ENV_PYTHON) or _first_file(
            [os.path.join(root, v, "bin", "python") for v in ("venv", ".venv")], True) or sys.executable
        source = f"{ENV_DIR}={root}"
    else:
        path = env.get("PATH", "")
        tools = {name: shutil.which(name, path=path) for name in ("llama-bench", "llama-quantize")}
        converter = shutil.which("convert_hf_to_gguf.py", path=path)
        python = env.get(ENV_PYTHON) or sys.executable
        source = "PATH"
    missing = [n for n, p in tools.items() if p is None] + (["convert_hf_to_gguf.py"] if converter is None else [])
    if missing:
        where = f"in {root} (or its bin/, build/bin/)" if root else f"on PATH (set {ENV_DIR} to a llama.cpp build)"
        return f"llama.cpp not found: no {', '.join(missing)} {where}"
    return LlamaCpp(tools["llama-bench"], tools["llama-quantize"], converter, python, source)


def unsupported(family: str, config: dict) -> str | None:
    """Why llama.cpp cannot run this family / config (None: it can)."""
    if family == "persimmon":
        return f"{NO_ARCHITECTURE} for Persimmon (its converter rejects PersimmonForCausalLM)"
    if family == "stablelm" and config.get("qk_layernorm"):
        return ("llama.cpp's StableLM converter drops the qk_layernorm weights (a `return` inside its generator), "
                "so the converted model would be wrong")
    if family not in ("arcee", "stablelm", "helium"):
        return f"{NO_ARCHITECTURE} for {family!r}"
    return None


# ---- command lines ----------------------------------------------------------------------------
# The converter runs through this wrapper: random-weight checkpoints have no tokenizer files, so the model
# class's set_vocab is replaced by a placeholder SentencePiece-style vocabulary of the config's size
# (control tokens, the 256 byte tokens llama.cpp looks up for "\n", then plain pieces). Timing reads no text.
_CONVERT_MAIN = r"""
import os, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.realpath(script)))
sys.argv = [script] + sys.argv[2:]
import convert_hf_to_gguf as convert
lookup = convert.get_model_class

def placeholder_vocab(self):
    n = self.hparams["vocab_size"]
    pieces = [b"<unk>", b"<s>", b"</s>"] + [b"<0x%02X>" % i for i in range(256)]
    if n < len(pieces) + 1:
        raise SystemExit(f"vocab_size {n} is too small for llama.cpp's SentencePiece vocabulary")
    pieces += [("\u2581t%d" % i).encode() for i in range(n - len(pieces))]
    w = self.gguf_writer
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (n - 259))  # unknown, control, byte, normal
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

def get_model_class(*args, **kwargs):
    cls = lookup(*args, **kwargs)
    cls.set_vocab = placeholder_vocab
    return cls

convert.get_model_class = get_model_class
convert.main()
"""


def convert_command(tool: LlamaCpp, hf_dir: str, out: str, gguf_type: str) -> list[str]:
    """convert_hf_to_gguf.py of a saved HF checkpoint to one of :data:`CONVERTED`."""
    if gguf_type not in CONVERTED:
        raise ValueError(f"gguf_type must be one of {CONVERTED} for the converter, got {gguf_type!r}")
    return [tool.python, "-c", _CONVERT_MAIN, tool.converter, hf_dir, "--outtype", gguf_type, "--outfile", out]


def quantize_command(tool: LlamaCpp, source: str, out: str, gguf_type: str, threads: int) -> list[str]:
    """llama-quantize of an f32 GGUF to Q8_0 / Q4_0 (llama.cpp's defaults for the other tensors)."""
    if gguf_type in CONVERTED or gguf_type not in GGUF_TYPES.values():
        raise ValueError(f"gguf_type must be a quantized type of {sorted(GGUF_TYPES.values())}, got {gguf_type!r}")
    return [tool.quantize, source, out, gguf_type, str(threads)]


def bench_commands(tool: LlamaCpp, gguf: str, *, prompt: int, new_tokens: int, threads: int,
                   reps: int = 1) -> list[list[str]]:
    """The ``llama-bench`` runs of one round: prefill of ``prompt`` tokens, and ``new_tokens`` decode
    steps after a ``prompt``-token context (``-d``; the depth's own prefill is not timed)."""
    common = [tool.bench, "-m", gguf, "-t", str(threads), "-r", str(reps), "-o", "json"]
    return [common + ["-p", str(prompt), "-n", "0"],
            common + ["-p", "0", "-n", str(new_tokens), "-d", str(prompt)]]


def parse_bench_json(text: str) -> list[BenchResult]:
    """The tests of ``llama-bench -o json`` output (its stdout: one JSON array)."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"llama-bench printed no JSON array: {text.strip()[:200]!r}")
    records = json.loads(text[start:])
    if not isinstance(records, list):
        raise ValueError("llama-bench JSON is not a list of tests")
    out = []
    for r in records:
        try:
            out.append(BenchResult(
                n_prompt=int(r["n_prompt"]), n_gen=int(r["n_gen"]), n_depth=int(r.get("n_depth", 0)),
                n_threads=int(r["n_threads"]), samples_ns=[int(x) for x in r["samples_ns"]],
                samples_ts=[float(x) for x in r["samples_ts"]], avg_ts=float(r["avg_ts"]),
                model_type=str(r.get("model_type", "")), model_size=int(r.get("model_size", 0)),
                build_commit=str(r.get("build_commit", "")), cpu_info=str(r.get("cpu_info", "")),
                flash_attn=r.get("flash_attn"),
                extra={k: r[k] for k in ("backends", "n_batch", "n_ubatch", "type_k", "type_v") if k in r}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"llama-bench JSON test lacks {exc}: {json.dumps(r)[:200]}") from None
    return out


def _run(cmd: list[str], what: str, timeout: float) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish in {timeout:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:] or ["no output"]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)[:300]}")
    return proc.stdout


def run_round(tool: LlamaCpp, gguf: str, *, prompt: int, new_tokens: int, threads: int,
              timeout: float = 600.0) -> tuple[BenchResult, BenchResult]:
    """One round: (prefill result, decode result)."""
    got = []
    for cmd in bench_commands(tool, gguf, prompt=prompt, new_tokens=new_tokens, threads=threads):
        results = parse_bench_json(_run(cmd, "llama-bench", timeout))
        if len(results) != 1:
            raise RuntimeError(f"llama-bench reported {len(results)} tests for one; command: {' '.join(cmd)}")
        got.append(results[0])
    return got[0], got[1]


# ---- checkpoints --------------------------------------------------------------------------------
def helium_as_llama(state: dict, config: dict) -> tuple[dict, dict]:
    """A Helium checkpoint (state dict, config dict) as an equivalent Llama one.

    Helium rotates interleaved pairs (2i, 2i+1) of each head with frequency i; Llama rotates (i, i + D/2).
    Reordering each head's q/k projection rows to [even rows, odd rows] makes Llama's rotation act on
    the same pairs with the same frequencies, so q.k, and every logit, are unchanged."""
    import torch

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    out = {}
    for name, w in state.items():
        if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = w.shape[0] // head_dim
            w = w.view(heads, head_dim, -1)[:, order].reshape(w.shape)
        out[name] = w.contiguous()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "dtype")
    llama = {k: config[k] for k in keep if k in config}
    llama.update(model_type="llama", architectures=["LlamaForCausalLM"])
    return out, llama


def save_checkpoint(model, family: str, out_dir: str) -> None:
    """``model`` as a checkpoint llama.cpp's converter reads (Helium: as a Llama)."""
    if family != "helium":
        model.save_pretrained(out_dir)
        return
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    state, config = helium_as_llama({k: v.detach().cpu() for k, v in model.state_dict().items()},
                                    model.config.to_dict())
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(**config).save_pretrained(out_dir)


def cache_root(env=None) -> str:
    env = os.environ if env is None else env
    return env.get(ENV_CACHE) or os.path.join(tempfile.gettempdir(), "fastlm-llamacpp")


def checkpoint_key(family: str, sizes: dict, dtype_name: str, seed: int = 0) -> str:
    """Cache folder name of a random-weight checkpoint: what decides its weights."""
    import torch
    import transformers

    what = json.dumps([family, sizes, dtype_name, seed, torch.__version__, transformers.__version__],
                      sort_keys=True)
    return f"{family}-{dtype_name}-{hashlib.sha256(what.encode()).hexdigest()[:12]}"


def gguf_path(tool: LlamaCpp, folder: str, gguf_type: str, make_model, family: str, threads: int,
              source: str | None = None, timeout: float = 1800.0) -> str:
    """The cached GGUF of ``gguf_type`` in ``folder``, made first if missing: converted from a checkpoint
    saved from ``make_model()`` (types in :data:`CONVERTED`), or quantized from ``source`` (an f32 GGUF)."""
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, f"model-{gguf_type}.gguf")
    if os.path.isfile(out):
        return out
    partial = out + ".partial"
    if gguf_type in CONVERTED:
        hf_dir = os.path.join(folder, "hf")
        if not os.path.isfile(os.path.join(hf_dir, "config.json")):
            save_checkpoint(make_model(), family, hf_dir + ".partial")
            shutil.rmtree(hf_dir, ignore_errors=True)
            os.replace(hf_dir + ".partial", hf_dir)
        _run(convert_command(tool, hf_dir, partial, gguf_type), "convert_hf_to_gguf.py", timeout)
    else:
        if source is None:
            raise ValueError(f"{gguf_type} is quantized from an f32 GGUF: pass source")
        _run(quantize_command(tool, source, partial, gguf_type, threads), "llama-quantize", timeout)
    os.replace(partial, out)
    return out


class Rounds:
    """llama.cpp's timing of one end-to-end case: ``run()`` is one round (called between fastlm's
    rounds), ``finish()`` runs the rest. Samples: prefill seconds per prompt, decode seconds per token."""

    def __init__(self, tool: LlamaCpp, gguf: str, gguf_type: str, *, prompt: int, new_tokens: int, threads: int,
                 rounds: int):
        self.tool, self.gguf, self.gguf_type = tool, gguf, gguf_type
        self.prompt, self.new_tokens, self.threads, self.rounds = prompt, new_tokens, threads, rounds
        self.prefill_s: list[float] = []
        self.decode_step_s: list[float] = []
        self.error = ""
        self.last: tuple[BenchResult, BenchResult] | None = None

    def run(self) -> None:
        if self.error or len(self.prefill_s) >= self.rounds:
            return
        try:
            pre, dec = run_round(self.tool, self.gguf, prompt=self.prompt, new_tokens=self.new_tokens,
                                 threads=self.threads)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            return
        self.prefill_s += [ns * 1e-9 for ns in pre.samples_ns]
        self.decode_step_s += [ns * 1e-9 / dec.n_gen for ns in dec.samples_ns]
        self.last = (pre, dec)

    def finish(self) -> None:
        while not self.error and len(self.prefill_s) < self.rounds:
            self.run()

    def kv_bytes(self) -> float:
        """Bytes per cached key / value element (llama-bench's type_k; f16 by default)."""
        kind = self.last[1].extra.get("type_k", "f16") if self.last else "f16"
        return {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}.get(kind, 2)

    def note(self) -> str:
        fa = self.last[1].flash_attn if self.last else None
        return (f"{self.gguf_type} GGUF; llama-bench -t {self.threads}: pp{self.prompt} (prompt only), "
                f"tg{self.new_tokens} @ depth {self.prompt}; flash_attn={fa}")

    def describe(self) -> dict:
        if not self.last:
            return {}
        r = self.last[1]
        return dict(build_commit=r.build_commit, cpu_info=r.cpu_info, backends=r.extra.get("backends", ""))
