"""``fastlm generate``: generate text from a checkpoint with the fastlm engine.

Text streams to stdout as it is generated (one prompt; with several prompts, each completion is printed
when the batch finishes), then one summary line goes to stderr: prompt tokens, new tokens, prefill ms,
decode tokens/s, backend and decode mode. ``--json`` prints instead one JSON object per prompt on stdout.
Bad input (missing path, no tokenizer, unsupported model_type, CUDA asked without a GPU, prompt longer
than the context) prints one line on stderr and exits with status 2 (``FASTLM_DEBUG=1`` re-raises).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CLIError(Exception):
    """A user-facing error: printed as one line, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlm generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir (config, safetensors, tokenizer) or hub id; "
                                   "default: the demo checkpoint in fastlm/demo/")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose whole text is one prompt "
                                                                      "(repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "cpp"), default="auto")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--compile", action="store_true", help="run the decode step through torch.compile")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of streamed text")
    return p


def _resolve_model_dir(arg: str | None) -> str:
    if arg is None:
        if not (DEMO_DIR / "config.json").is_file():
            raise CLIError(f"no --model given and the demo checkpoint is missing ({DEMO_DIR} has no config.json)")
        return str(DEMO_DIR)
    if os.path.isdir(arg):
        if not os.path.isfile(os.path.join(arg, "config.json")):
            raise CLIError(f"{arg} is a directory without a config.json: not a Hugging Face checkpoint")
        return arg
    if os.path.exists(arg):
        raise CLIError(f"--model {arg} is a file; expected a checkpoint directory or a hub id")
    if _HUB_ID.match(arg) and not arg.startswith((".", "~")):
        return arg  # a hub id: from_pretrained decides whether the hub can provide it
    raise CLIError(f"model path {arg} does not exist")


def _dtype(name: str, device: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def load(model_arg: str | None, dtype: str, device: str, prompts: list[str] | None = None):
    """-> (model, tokenizer, prompt ids). Config and tokenizer are checked, and the prompts tokenised and
    checked against the context, before the weights are read. Raises CLIError with a one-line reason."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to the summary (or the one error line)

    import fastlm

    path = _resolve_model_dir(model_arg)
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
        raise CLIError("a prompt tokenised to zero tokens")
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


def _summary(result, prompt_tokens: int) -> str:
    new = sum(len(t) for t in result.tokens)
    batch = len(result.tokens)
    rate = result.decode_tokens_per_s * batch
    return (f"prompt tokens: {prompt_tokens}, new tokens: {new}, prefill: {result.prefill_s * 1e3:.1f} ms, "
            f"decode: {rate:.1f} tokens/s (backend {result.backend}, {result.mode})")


def run(args) -> int:
    import torch

    import fastlm
    from fastlm.engine.detok import IncrementalDetokenizer
    from fastlm.engine.engine import GenerationResult

    prompts = _prompts(args)
    device = _device(args.device)
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    model, tokenizer, ids = load(args.model, args.dtype, device, prompts)
    kwargs = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
                  backend=args.backend, cuda_graph=not args.no_cuda_graph, compile=args.compile)
    with torch.inference_mode():
        if args.json:
            result = fastlm.generate(model, ids, return_result=True, **kwargs)
            for b, toks in enumerate(result.tokens):
                print(json.dumps({
                    "prompt": prompts[b], "text": tokenizer.decode(toks, skip_special_tokens=True),
                    "token_ids": toks, "prompt_tokens": len(ids[b]), "new_tokens": len(toks),
                    "finish_reason": result.finish_reasons[b], "prefill_ms": result.prefill_s * 1e3,
                    "decode_tokens_per_s": result.decode_tokens_per_s, "backend": result.backend,
                    "mode": result.mode}), flush=True)
            return 0
        result = GenerationResult(tokens=[], finish_reasons=[], prompt_lengths=[])
        detoks = [IncrementalDetokenizer(tokenizer, p) for p in ids]
        texts = [""] * len(ids)
        if len(ids) == 1:  # echo the prompt, then stream its continuation after it
            sys.stdout.write(prompts[0])
            sys.stdout.flush()
        for step in fastlm.stream(model, ids, result=result, **kwargs):
            for b, tok in enumerate(step):
                if tok is None:
                    continue
                piece = detoks[b].push(tok)
                texts[b] += piece
                if len(ids) == 1 and piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        for b, d in enumerate(detoks):
            tail = d.flush()
            texts[b] += tail
            if len(ids) == 1 and tail:
                sys.stdout.write(tail)
        if len(ids) == 1:
            sys.stdout.write("\n")
        else:
            for b, text in enumerate(texts):
                sys.stdout.write(f"[{b}] {prompts[b]}{text}\n")
        sys.stdout.flush()
    print(_summary(result, sum(len(p) for p in ids)), file=sys.stderr, flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CLIError as exc:
        print(f"fastlm generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # anything else: still one line, unless debugging
        if os.environ.get("FASTLM_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastlm generate: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
