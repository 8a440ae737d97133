"""``fastlm generate``: generate text from a checkpoint with the fastlm engine.

Text streams to stdout as it is generated (one prompt; with several prompts, each completion is printed
when the batch finishes), then one summary line goes to stderr: prompt tokens, new tokens, load time,
prefill ms and tokens/s, decode tokens/s, peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA), backend and decode mode; a figure that does not exist (``--max-new-tokens 0``: no prefill; one new
token: no decode step) is ``-``. ``--json`` prints instead one JSON object per prompt on stdout (those
figures ``null``). ``--chat`` renders each prompt as a user message with the tokenizer's chat template
(``--system``: the system message) and prints only the reply. ``--stop STRING`` (repeatable) ends a
completion at the first stop string in its decoded text; the stop string is not printed. A checkpoint of
200 MB or more shows a progress bar on stderr while it loads and is patched, when stderr is a terminal.
Bad input (a bad option value, an unreadable or non-UTF-8 prompt file, missing
path, no tokenizer, unsupported model_type, CUDA asked without a GPU, a backend unavailable here, prompt
longer than the context) prints one line on stderr and exits with status 2, before the weights load and
before anything is written to stdout; other errors print one line and exit with status 1
(``FASTLM_DEBUG=1`` re-raises). Ctrl-C exits with status 130 (see fastlm/cli.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

from fastlm.cli import EXIT_USAGE, ArgumentParser, debugging, import_torch

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
PROGRESS_MIN_BYTES = 200 * 10**6  # checkpoints at least this big show a loading progress bar (on a terminal)
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("int8", "int4")  # fastlm.modules._quantized.PRESETS (not imported here: it needs torch)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# The engine keys its sampler on the seed's low 32 bits (fastlm/engine/sampling.py, ``uniform``): larger
# seeds would repeat smaller ones' tokens.
SEED_MAX = 2**32 - 1


class CLIError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def first_line(what, fallback: str) -> str:
    """The first line of an exception's or a warning's text (``fallback`` when it has none)."""
    text = str(what).strip()
    return text.splitlines()[0] if text else fallback


# argparse ``type=`` checks: a bad value is a one-line argparse error naming the flag, exit status 2.
def _parse_int(text: str, low: int, high: int | None = None) -> int:
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {text!r}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
    return value


def _parse_float(text: str, what: str, ok) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text!r}")
    return value


def new_token_count(text: str) -> int:
    return _parse_int(text, 0)


def top_k_value(text: str) -> int:
    return _parse_int(text, 1)


def seed_value(text: str) -> int:
    return _parse_int(text, 0, SEED_MAX)


def temperature_value(text: str) -> float:
    return _parse_float(text, ">= 0 (0 = greedy)", lambda v: v >= 0)


def top_p_value(text: str) -> float:
    return _parse_float(text, "in (0, 1]", lambda v: 0 < v <= 1)


def stop_string(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a stop string must not be empty")
    return text


def add_generation_options(p: argparse.ArgumentParser, max_new_tokens=(new_token_count, 64, "")) -> None:
    """The options ``fastlm generate`` and ``fastlm chat`` share: model, sampling, stopping, device.
    ``max_new_tokens``: (argparse type, default, what it counts) of ``--max-new-tokens``."""
    new_type, new_default, new_what = max_new_tokens
    p.add_argument("--model", help="checkpoint dir (config, safetensors, tokenizer) or hub id; "
                                   "default: the demo checkpoint in fastlm/demo/")
    p.add_argument("--system", default=None, metavar="TEXT", help="the system message of the chat template")
    p.add_argument("--max-new-tokens", type=new_type, default=new_default, metavar="N",
                   help=f"{new_what} (default: {new_default})".strip())
    p.add_argument("--temperature", type=temperature_value, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=top_k_value, default=None, metavar="K", help=">= 1")
    p.add_argument("--top-p", type=top_p_value, default=None, metavar="P", help="in (0, 1]")
    p.add_argument("--seed", type=seed_value, default=None, metavar="S", help=f"in [0, {SEED_MAX}]")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--stop", action="append", default=[], type=stop_string, metavar="STRING",
                   help="stop at this string in the decoded text, not printed (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpp"), default="auto")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="weight-only quantization at load (fastlm.patch(model, quantize=...)); the 16-bit "
                        "weights are freed")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="run the decode step through torch.compile")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastlm generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt "
                                                                      "(repeatable)")
    p.add_argument("--chat", action="store_true", help="render each prompt as a user message with the "
                                                       "tokenizer's chat template; print only the reply")
    add_generation_options(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    return p


def resolve_model_dir(arg: str | None) -> str:
    if arg is None:
        if not (DEMO_DIR / "config.json").is_file():
            raise CLIError(f"no --model given and the demo checkpoint is missing ({DEMO_DIR} has no config.json)")
        return str(DEMO_DIR)
    if os.path.isdir(arg):
        if not os.path.isfile(os.path.join(arg, "config.json")):
            raise CLIError(f"--model {arg} is a directory without a config.json: not a Hugging Face checkpoint")
        return arg
    if os.path.exists(arg):
        raise CLIError(f"--model {arg} is a file; expected a checkpoint directory or a hub id")
    if _HUB_ID.match(arg) and not arg.startswith((".", "~")):
        return arg  # a hub id: from_pretrained decides whether the hub can provide it
    raise CLIError(f"--model {arg}: model path does not exist")


def _dtype(name: str, device: str):
    torch = import_torch()

    return "auto" if name == "auto" else getattr(torch, name)


def checkpoint_bytes(path: str) -> int | None:
    """Total size of a local checkpoint's weight files; None for a hub id (not on disk yet)."""
    if not os.path.isdir(path):
        return None
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def wants_progress(path: str) -> bool:
    """A progress bar while the weights load and are patched: on a terminal, for a checkpoint of at least
    PROGRESS_MIN_BYTES (a hub id may need a download: always)."""
    size = checkpoint_bytes(path)
    return sys.stderr.isatty() and (size is None or size >= PROGRESS_MIN_BYTES)


@contextlib.contextmanager
def load_progress(enabled: bool):
    """While loading: transformers' own progress bars ("Loading weights", downloads) on stderr, cleared
    when done, then ``status(text)`` shows what the next step is (moving to the device, patching)."""
    if not enabled:
        yield lambda text: None
        return
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    def bar(factory, args, kwargs):  # transformers' tqdm hook: a real bar whatever its enabled state
        return tqdm(*args, **{**kwargs, "file": sys.stderr, "leave": False, "dynamic_ncols": True})

    status_bar = []

    def status(text: str) -> None:
        if not status_bar:
            status_bar.append(tqdm(total=None, file=sys.stderr, leave=False, bar_format="{desc} ({elapsed})"))
        status_bar[0].set_description_str(text)
        status_bar[0].refresh()

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is not None:
        set_hook(bar)
    else:  # an older transformers 5: its own bars (not cleared), on stderr
        hf_logging.enable_progress_bar()
    try:
        yield status
    finally:
        if set_hook is not None:
            set_hook(None)
        else:
            hf_logging.disable_progress_bar()
        for b in status_bar:
            b.close()


def render_chat(tokenizer, messages: list[dict], path: str) -> list[int]:
    """The ids of ``messages`` rendered with the tokenizer's chat template, with the assistant's
    generation prompt (as ``tokenizer.apply_chat_template`` tokenises it: no extra special tokens)."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:
        raise CLIError(f"the chat template of {path} cannot render this conversation: "
                       f"{first_line(exc, type(exc).__name__)}") from None
    return list(ids)


def chat_messages(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": user}]


def load(path: str, dtype: str, device: str, prompts: list[str] | None = None, *, chat: bool = False,
         system: str | None = None, backend: str | None = None, need_template: str | None = None,
         timings: dict | None = None, quantize: str | None = None):
    """-> (model, tokenizer, prompt ids) for a checkpoint from :func:`resolve_model_dir`. Config and
    tokenizer are checked, and the prompts tokenised (``chat``: rendered with the chat template, ``system``
    as its system message) and checked against the context and the vocabulary, before the weights are
    read; ``need_template`` (the flag that needs it) fails when the tokenizer has no chat template. The
    model is patched for ``backend`` (when given; ``quantize``: quantized then, the 16-bit weights freed)
    before it is returned. A progress bar shows on stderr
    while a large checkpoint loads (:func:`wants_progress`). ``timings["load_s"]``: the seconds it took,
    the libraries' start-up (importing their modeling code) not counted. Raises CLIError with a one-line
    reason."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to the summary (or the one error line)

    import fastlm

    supported = fastlm.SUPPORTED_MODEL_TYPES  # imports the families, and transformers' modeling code with them
    started = time.perf_counter()  # load time: the checkpoint's, not the libraries' start-up (seconds)
    local = os.path.isdir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        where = "" if local else " (not a local directory, and the Hugging Face Hub could not provide it)"
        raise CLIError(f"cannot load a model config from {path}{where}: {str(exc).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in supported:
        raise CLIError(f"unsupported model_type {model_type!r} in {path}; fastlm supports {', '.join(supported)}")
    if local and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CLIError(f"no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CLIError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    # The context is checked here (and a chat checks its cache): not the tokenizer's "longer than the
    # maximum sequence length" warning, which a long conversation would otherwise print on every turn.
    tokenizer.model_max_length = sys.maxsize
    if need_template and not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"{need_template}: the tokenizer in {path} has no chat template")
    if chat:
        ids = [render_chat(tokenizer, chat_messages(system, p), path) for p in (prompts or [])]
    else:
        ids = [list(tokenizer(p)["input_ids"]) for p in (prompts or [])]
    if any(not p for p in ids):
        raise CLIError(f"prompt {[bool(p) for p in ids].index(False) + 1} tokenised to zero tokens")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and any(t >= vocab for p in ids for t in p):
        raise CLIError(f"the tokenizer in {path} gives token ids >= the model's vocab_size of {vocab}")
    context = getattr(config, "max_position_embeddings", None)
    longest = max((len(p) for p in ids), default=0)
    if context is not None and longest > context:
        raise CLIError(f"a prompt of {longest} tokens is longer than the model's context of {context} tokens")
    with load_progress(wants_progress(path)) as status:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype, device))
        except Exception as exc:
            raise CLIError(f"cannot load the model weights from {path}: {str(exc).splitlines()[0]}") from None
        if device != "cpu":
            status(f"moving the weights to {device}")
        model = model.to(device).eval()
        if backend is not None:
            status(f"patching ({backend} backend{', quantizing to ' + quantize if quantize else ''})")
            try:
                fastlm.patch(model, backend, quantize=quantize)
            except ValueError as exc:  # a projection this format cannot take (e.g. K not a multiple of 32)
                if quantize is None:
                    raise
                raise CLIError(f"--quantize {quantize}: {first_line(exc, 'ValueError')}") from None
    if timings is not None:
        timings["load_s"] = time.perf_counter() - started
    return model, tokenizer, ids


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for f in args.prompt_file:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot read --prompt-file {f}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise CLIError(f"--prompt-file {f} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                           f"{exc.start})") from None
        prompts.append(text[:-1] if text.endswith("\n") else text)
    if not prompts:
        raise CLIError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file PATH")
    return prompts


def _device(name: str) -> str:
    torch = import_torch()

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _backend(name: str, device: str) -> str:
    """The concrete backend ``--backend`` gives on ``device``; CLIError where it cannot run there."""
    from fastlm.errors import BackendUnavailableError
    from fastlm.ops._registry import resolve

    chosen_by = f"--backend {name}"
    if name == "auto" and os.environ.get("FASTLM_BACKEND", "auto").strip() not in ("", "auto"):
        chosen_by = f"FASTLM_BACKEND={os.environ['FASTLM_BACKEND']} (for --backend auto)"
    try:
        return resolve(name, device)
    except (BackendUnavailableError, ValueError) as exc:
        raise CLIError(f"{chosen_by}: {exc}") from None


def peak_memory(device: str) -> tuple[int | None, str]:
    """(bytes, what was measured): this process's peak resident set on CPU (``getrusage``, psutil where
    there is no ``resource`` module), ``torch.cuda.max_memory_allocated`` on CUDA; None where neither exists."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil

            return int(psutil.Process().memory_info().peak_wset), "rss"
        except (ImportError, AttributeError):
            return None, "rss"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "rss"  # bytes on macOS, KiB on Linux


def resident_memory() -> int | None:
    """This process's resident set now, in bytes (``/proc/self/statm``, else psutil; None where neither exists)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except (ImportError, AttributeError):
        return None


def weight_bytes(model) -> int:
    """Bytes of the model's Parameters and buffers, each storage counted once (views of one fused storage, tied
    weights)."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def measures(result, max_new_tokens: int, backend: str, load_s: float, device: str, model=None,
             quantize: str | None = None) -> dict:
    """The summary's figures (the same in --json): load seconds, prefill ms and tokens/s, per-sequence
    decode tokens/s, peak memory, backend and mode. None where a figure does not exist: no prefill ran
    (--max-new-tokens 0), or no decode step (one new token: the prefill made it). With ``quantize`` also the
    resident set now (CPU; None on CUDA) and the bytes of the weights, quantized ones included."""
    memory, kind = peak_memory(device)
    figures = {"load_s": load_s, "prefill_ms": None, "prefill_tokens_per_s": None, "decode_tokens_per_s": None,
               "peak_memory_bytes": memory, "peak_memory": kind, "backend": backend, "mode": None}
    if quantize is not None:
        figures.update(quantize=quantize, resident_memory_bytes=resident_memory() if device == "cpu" else None,
                       weight_bytes=weight_bytes(model))
    if max_new_tokens == 0:  # the engine never ran: nothing was timed, and the backend is the one it would use
        return figures
    prefilled = result.extra.get("prefill_tokens", sum(result.prompt_lengths))
    rate = result.decode_tokens_per_s if result.decode_steps else math.nan
    figures.update(prefill_ms=result.prefill_s * 1e3, backend=result.backend, mode=result.mode,
                   prefill_tokens_per_s=prefilled / result.prefill_s if result.prefill_s > 0 else None,
                   decode_tokens_per_s=rate if math.isfinite(rate) else None)
    return figures


MEMORY_KINDS = {"rss": "RSS", "cuda_max_allocated": "CUDA max allocated"}


def format_memory(figures: dict) -> str:
    if figures["peak_memory_bytes"] is None:
        return "-"
    text = f"{figures['peak_memory_bytes'] / 2**20:.1f} MiB {MEMORY_KINDS[figures['peak_memory']]}"
    if "quantize" in figures:  # the peak includes the 16-bit load; what stays is the quantized model
        resident = figures["resident_memory_bytes"]
        text += ("" if resident is None else f", resident {resident / 2**20:.1f} MiB") + \
            f", weights {figures['weight_bytes'] / 2**20:.1f} MiB {figures['quantize']}"
    return text


def _summary(result, prompt_tokens: int, figures: dict) -> str:
    new = sum(len(t) for t in result.tokens)
    batch = max(len(result.tokens), 1)
    ms, prefill_rate, rate = figures["prefill_ms"], figures["prefill_tokens_per_s"], figures["decode_tokens_per_s"]
    prefill = "-" if ms is None else f"{ms:.1f} ms" + (f" ({prefill_rate:.1f} tokens/s)" if prefill_rate else "")
    decode = "-" if rate is None else f"{rate * batch:.1f} tokens/s"
    how = f"backend {figures['backend']}" + (f", {figures['mode']}" if figures["mode"] else ", nothing generated")
    return (f"prompt tokens: {prompt_tokens}, new tokens: {new}, load: {figures['load_s']:.2f} s, prefill: {prefill}, "
            f"decode: {decode}, peak memory: {format_memory(figures)} ({how})")


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to its first stop string (all of it when there is none)."""
    from fastlm.engine.detok import StopStringFilter

    f = StopStringFilter(stops)
    shown = f.push(text)
    return shown if f.stopped else shown + f.flush()


def run(args) -> int:
    # Everything the arguments alone decide is checked before torch is imported; the device and backend
    # before transformers is; the config, tokenizer and prompts before the weights are read.
    prompts = _prompts(args)
    if args.system is not None and not args.chat:
        raise CLIError("--system sets the system message of the chat template: it needs --chat")
    path = resolve_model_dir(args.model)
    device = _device(args.device)
    backend = _backend(args.backend, device)
    timings = {}
    model, tokenizer, ids = load(path, args.dtype, device, prompts, chat=args.chat, system=args.system,
                                 backend=backend, need_template="--chat" if args.chat else None, timings=timings,
                                 quantize=args.quantize)
    load_s = timings["load_s"]

    import torch

    import fastlm
    from fastlm.engine.detok import IncrementalDetokenizer, StopStringFilter
    from fastlm.engine.engine import GenerationResult

    kwargs = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                  backend=backend, cuda_graph=not args.no_cuda_graph, compile=args.compile,
                  stop_strings=args.stop or None)
    single = len(ids) == 1 and not args.json
    with torch.inference_mode():
        if not single:  # no text until the batch is done: no host sync per token (stop strings: every few)
            result = fastlm.generate(model, ids, return_result=True, **kwargs)
            figures = measures(result, args.max_new_tokens, backend, load_s, device, model, args.quantize)
            texts = [cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), args.stop) for toks in result.tokens]
            for b, toks in enumerate(result.tokens):
                if args.json:
                    print(json.dumps({
                        "prompt": prompts[b], "text": texts[b], "token_ids": toks, "prompt_tokens": len(ids[b]),
                        "new_tokens": len(toks), "finish_reason": result.finish_reasons[b], **figures},
                        allow_nan=False), flush=True)
                else:
                    sys.stdout.write(f"[{b}] {'' if args.chat else prompts[b]}{texts[b]}\n")
            sys.stdout.flush()
            if args.json:
                return 0
        else:
            result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[])
            detok, stops = IncrementalDetokenizer(tokenizer, ids[0]), StopStringFilter(args.stop)
            echo = "" if args.chat else prompts[0]
            echo_pending = True  # the prompt is echoed with the first token: nothing on stdout before that
            for step in fastlm.stream(model, ids, result=result, **kwargs):
                if echo_pending:
                    sys.stdout.write(echo)
                    echo_pending = False
                if step[0] is not None:
                    sys.stdout.write(stops.push(detok.push(step[0])))
                    sys.stdout.flush()
            tail = stops.push(detok.flush())
            tail += "" if stops.stopped else stops.flush()
            sys.stdout.write((echo if echo_pending else "") + tail + "\n")
            sys.stdout.flush()
            figures = measures(result, args.max_new_tokens, backend, load_s, device, model, args.quantize)
    print(_summary(result, sum(len(p) for p in ids), figures), file=sys.stderr, flush=True)
    return 0


def run_command(prog: str, run, args) -> int:
    """``run(args)`` -> exit status, as ``prog``: warnings (the KV cache filled up, a backend fell back) and
    errors are one line on stderr; a CLIError is bad input (status 2), anything else status 1 (re-raised
    with ``FASTLM_DEBUG=1``). A KeyboardInterrupt or a BrokenPipeError propagates: fastlm.cli.main, the
    command's entry point, turns them into status 130 and 141."""
    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = first_line(message, category.__name__)
        text = text[len("fastlm: "):] if text.startswith("fastlm: ") else text
        print(f"{prog}: warning: {text}", file=sys.stderr if file is None else file, flush=True)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return run(args)
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout's reader went away: fastlm.cli.main ends the command quietly
        raise
    except Exception as exc:  # anything else: still one line, unless debugging
        if debugging():
            raise
        print(f"{prog}: error: {first_line(exc, type(exc).__name__)}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    """``fastlm generate`` with ``argv`` (default ``sys.argv[1:]``) -> exit status (see :func:`run_command`)."""
    return run_command("fastlm generate", run, build_parser().parse_args(argv))


if __name__ == "__main__":
    from fastlm.cli import main as fastlm_main

    sys.exit(fastlm_main(["generate", *sys.argv[1:]]))
