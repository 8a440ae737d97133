"""``fastlm generate``: generate text from a checkpoint with the fastlm engine.

Text streams to stdout as it is generated (one prompt; with several prompts, each completion is printed
when the batch finishes), then one summary line goes to stderr: prompt tokens, new tokens, prefill ms,
decode tokens/s, backend and decode mode; a figure that does not exist (``--max-new-tokens 0``: no prefill;
one new token: no decode step) is ``-``. ``--json`` prints instead one JSON object per prompt on stdout
(those figures ``null``). Bad input (a bad option value, an unreadable or non-UTF-8 prompt file, missing
path, no tokenizer, unsupported model_type, CUDA asked without a GPU, a backend unavailable here, prompt
longer than the context) prints one line on stderr and exits with status 2, before the weights load and
before anything is written to stdout; other errors print one line and exit with status 1
(``FASTLM_DEBUG=1`` re-raises). Ctrl-C exits with status 130 (see fastlm/cli.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from fastlm.cli import EXIT_USAGE, ArgumentParser, debugging

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# The engine keys its sampler on the seed's low 32 bits (fastlm/engine/sampling.py, ``uniform``): larger
# seeds would repeat smaller ones' tokens.
SEED_MAX = 2**32 - 1


class CLIError(Exception):
    """A user-facing error: printed as one line, no traceback."""


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


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="fastlm generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir (config, safetensors, tokenizer) or hub id; "
                                   "default: the demo checkpoint in fastlm/demo/")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt "
                                                                      "(repeatable)")
    p.add_argument("--max-new-tokens", type=new_token_count, default=64, metavar="N", help="(default: 64)")
    p.add_argument("--temperature", type=temperature_value, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=top_k_value, default=None, metavar="K", help=">= 1")
    p.add_argument("--top-p", type=top_p_value, default=None, metavar="P", help="in (0, 1]")
    p.add_argument("--seed", type=seed_value, default=None, metavar="S", help=f"in [0, {SEED_MAX}]")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpp"), default="auto")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="run the decode step through torch.compile")
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
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load(path: str, dtype: str, device: str, prompts: list[str] | None = None):
    """-> (model, tokenizer, prompt ids) for a checkpoint from :func:`resolve_model_dir`. Config and
    tokenizer are checked, and the prompts tokenised and checked against the context and the vocabulary,
    before the weights are read. Raises CLIError with a one-line reason."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to the summary (or the one error line)

    import fastlm

    local = os.path.isdir(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        where = "" if local else " (not a local directory, and the Hugging Face Hub could not provide it)"
        raise CLIError(f"cannot load a model config from {path}{where}: {str(exc).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in fastlm.SUPPORTED_MODEL_TYPES:
        raise CLIError(f"unsupported model_type {model_type!r} in {path}; fastlm supports "
                       f"{', '.join(fastlm.SUPPORTED_MODEL_TYPES)}")
    if local and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise CLIError(f"no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CLIError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0]}") from None
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
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype, device))
    except Exception as exc:
        raise CLIError(f"cannot load the model weights from {path}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer, ids


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
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _backend(name: str, device: str) -> str:
    """The concrete backend ``--backend`` gives on ``device``; CLIError where it cannot run there."""
    from fastlm.errors import BackendUnavailableError
    from fastlm.ops._backend import resolve

    chosen_by = f"--backend {name}"
    if name == "auto" and os.environ.get("FASTLM_BACKEND", "auto").strip() not in ("", "auto"):
        chosen_by = f"FASTLM_BACKEND={os.environ['FASTLM_BACKEND']} (for --backend auto)"
    try:
        return resolve(name, device)
    except (BackendUnavailableError, ValueError) as exc:
        raise CLIError(f"{chosen_by}: {exc}") from None


def _timings(result, max_new_tokens: int, backend: str) -> dict:
    """Prefill ms, per-sequence decode tokens/s, backend and mode, None where a figure does not exist:
    no prefill ran (--max-new-tokens 0), or no decode step (one new token: the prefill made it)."""
    if max_new_tokens == 0:  # the engine never ran: nothing was timed, and the backend is the one it would use
        return {"prefill_ms": None, "decode_tokens_per_s": None, "backend": backend, "mode": None}
    rate = result.decode_tokens_per_s if result.decode_steps else math.nan
    return {"prefill_ms": result.prefill_s * 1e3, "decode_tokens_per_s": rate if math.isfinite(rate) else None,
            "backend": result.backend, "mode": result.mode}


def _summary(result, prompt_tokens: int, timings: dict) -> str:
    new = sum(len(t) for t in result.tokens)
    batch = len(result.tokens)
    prefill, rate = timings["prefill_ms"], timings["decode_tokens_per_s"]
    prefill = "-" if prefill is None else f"{prefill:.1f} ms"
    decode = "-" if rate is None else f"{rate * batch:.1f} tokens/s"
    how = f"backend {timings['backend']}" + (f", {timings['mode']}" if timings["mode"] else ", nothing generated")
    return f"prompt tokens: {prompt_tokens}, new tokens: {new}, prefill: {prefill}, decode: {decode} ({how})"


def run(args) -> int:
    # Everything the arguments alone decide is checked before torch is imported; the device and backend
    # before transformers is; the config, tokenizer and prompts before the weights are read.
    prompts = _prompts(args)
    path = resolve_model_dir(args.model)
    device = _device(args.device)
    backend = _backend(args.backend, device)
    model, tokenizer, ids = load(path, args.dtype, device, prompts)

    import torch

    import fastlm
    from fastlm.engine.detok import IncrementalDetokenizer
    from fastlm.engine.engine import GenerationResult

    kwargs = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                  backend=backend, cuda_graph=not args.no_cuda_graph, compile=args.compile)
    with torch.inference_mode():
        if args.json:
            result = fastlm.generate(model, ids, return_result=True, **kwargs)
            timings = _timings(result, args.max_new_tokens, backend)
            for b, toks in enumerate(result.tokens):
                print(json.dumps({
                    "prompt": prompts[b], "text": tokenizer.decode(toks, skip_special_tokens=True),
                    "token_ids": toks, "prompt_tokens": len(ids[b]), "new_tokens": len(toks),
                    "finish_reason": result.finish_reasons[b], **timings}, allow_nan=False), flush=True)
            return 0
        result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[])
        detoks = [IncrementalDetokenizer(tokenizer, p) for p in ids]
        texts = [""] * len(ids)
        single = len(ids) == 1
        echo_pending = single  # the prompt is echoed with the first token: nothing on stdout before that
        for step in fastlm.stream(model, ids, result=result, **kwargs):
            if echo_pending:
                sys.stdout.write(prompts[0])
                echo_pending = False
            for b, tok in enumerate(step):
                if tok is None:
                    continue
                piece = detoks[b].push(tok)
                texts[b] += piece
                if single and piece:
                    sys.stdout.write(piece)
            if single:
                sys.stdout.flush()
        tails = [d.flush() for d in detoks]
        texts = [text + tail for text, tail in zip(texts, tails)]
        if single:
            sys.stdout.write((prompts[0] if echo_pending else "") + tails[0] + "\n")
        else:
            for b, text in enumerate(texts):
                sys.stdout.write(f"[{b}] {prompts[b]}{text}\n")
        sys.stdout.flush()
    timings = _timings(result, args.max_new_tokens, backend)
    print(_summary(result, sum(len(p) for p in ids), timings), file=sys.stderr, flush=True)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (the KV cache filled up, a backend fell back) as one line on stderr, no source line."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    text = text[len("fastlm: "):] if text.startswith("fastlm: ") else text
    print(f"fastlm generate: warning: {text}", file=sys.stderr if file is None else file, flush=True)


def main(argv=None) -> int:
    """``fastlm generate`` with ``argv`` (default ``sys.argv[1:]``) -> exit status. A KeyboardInterrupt
    propagates: fastlm.cli.main, the command's entry point, turns it into status 130."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(args)
    except CLIError as exc:
        print(f"fastlm generate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # stdout's reader went away: fastlm.cli.main ends the command quietly
        raise
    except Exception as exc:  # anything else: still one line, unless debugging
        if debugging():
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastlm generate: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from fastlm.cli import main as fastlm_main

    sys.exit(fastlm_main(["generate", *sys.argv[1:]]))
