"""Accuracy of the quantized weights: ``python -m fastlm.bench.quality``.

On the demo checkpoint (fastlm/demo, a Helium trained on the Python documentation, fastlm/demo/README.md)
and its **held-out** text: the validation documents the training never saw (every 25th document of the
corpus, fastlm.bench.demo_text; 147 documents, 18,885 tokens with CPython 3.11.7's stdlib). For the 16-bit
baseline and each weight format, through the patched model (the same fused path, only the weights differ):

* perplexity over the held-out tokens: windows of the model's context (256 tokens), each next one starting
  half a window later and scoring only its second half, so every token but the first window's is scored with
  at least 128 tokens of context; fp32 log-softmax of the logits;
* top-1 agreement: the share of those positions where the argmax matches the baseline's;
* greedy generation: ``--prompts`` prompts (the first 16 tokens of evenly spaced held-out documents), each
  continued greedily by fastlm's engine for ``--new-tokens`` tokens (8 x 32 = 256 by default): the share of
  generated tokens equal to the baseline's at the same position, and how many match before the first
  divergence (summed over the prompts).

A format is a dtype (``float32``: the unquantized model in fp32, the baseline's own noise floor), ``int8`` /
``int4`` (fastlm's presets: ``patch(model, quantize=...)``) or ``<projections>`` /
``<projections>+head:<lm_head>`` with each of those ``int8`` / ``int4`` (the op's default group size),
``int<b>-g<group size>``, ``int<b>-channel`` (one scale per output channel) or ``16`` (fastlm.ops.quantized's
formats). The demo ties lm_head to
the embedding, which fastlm keeps 16-bit; a ``+head:`` format unties it first (a copy of the embedding
becomes lm_head) so that lm_head's own quantization can be measured.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo"
DEFAULT_FORMATS = ("float32", "int8-channel", "int8-g32", "int4-g32", "int4-g64", "int4-g32+head:int8",
                   "int4-g32+head:int4", "int8-channel+head:int8", "int8", "int4")
DTYPES = ("float32", "bfloat16", "float16")  # as a format: the unquantized model in that dtype
PROMPT_TOKENS = 16


def held_out_stream(tokenizer):
    """The held-out documents as one token stream (each document: <s> ... </s>, as in training)."""
    import torch

    from fastlm.bench.demo_text import gather_documents, split_documents

    _, held_out = split_documents(gather_documents(True))
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(held_out):
        ids += enc.ids + [tokenizer.eos_token_id]
    return torch.tensor(ids), held_out


def windows(n_tokens: int, context: int):
    """-> [(start, end, first scored position)]: windows of ``context`` tokens every ``context // 2``; each scores
    the positions (targets) it is the first to reach."""
    stride, out, scored = context // 2, [], 1
    start = 0
    while scored < n_tokens:
        end = min(start + context, n_tokens)
        out.append((start, end, scored))
        scored = end
        start += stride
    return out


def score(model, stream, context: int):
    """-> (mean negative log-likelihood, argmax at every scored position) over ``stream``."""
    import torch

    nll, total, argmax = 0.0, 0, []
    with torch.inference_mode():
        for start, end, first in windows(stream.numel(), context):
            ids = stream[start:end].unsqueeze(0)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits[0].float()  # [T-1, V]
            keep = slice(first - start - 1, end - start - 1)  # logits at t predict token t + 1
            logp = torch.log_softmax(logits[keep], dim=-1)
            target = ids[0, first - start:end - start]
            nll -= float(logp.gather(1, target[:, None]).sum())
            total += target.numel()
            argmax.append(logits[keep].argmax(-1))
    return nll / total, torch.cat(argmax)


def prompts_of(tokenizer, documents, count: int) -> list[list[int]]:
    step = max(len(documents) // count, 1)
    chosen = [documents[i * step] for i in range(count)]
    return [enc.ids[:PROMPT_TOKENS] for enc in tokenizer.backend_tokenizer.encode_batch(chosen)]  # <s> first


def generations(model, prompts, new_tokens: int) -> list[list[int]]:
    import fastlm

    return fastlm.generate(model, prompts, max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)


def parse_spec(text: str):
    """A format (module docstring) -> (QuantSpec or a preset name, whether lm_head must be untied)."""
    from fastlm.modules import PRESETS, QuantSpec
    from fastlm.modules._quantized import parse_format

    if text in PRESETS or text in DTYPES:
        return text, False
    layers, _, head = text.partition("+head:")
    head_format = None if head in ("", "16") else parse_format(head)
    return QuantSpec(parse_format(layers), lm_head=head_format), bool(head)


def load(path, dtype, untie: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if untie and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    return model


def run(path, dtype_name: str, formats, n_prompts: int, new_tokens: int, backend: str, log=print) -> dict:
    import torch
    from transformers import AutoTokenizer

    import fastlm

    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    stream, held_out = held_out_stream(tokenizer)
    prompts = prompts_of(tokenizer, held_out, n_prompts)
    rows = []
    base = None
    for name in ("baseline", *formats):
        started = time.perf_counter()
        unquantized = name == "baseline" or name in DTYPES
        spec, untie = (None, False) if unquantized else parse_spec(name)
        model = load(path, getattr(torch, name) if name in DTYPES else dtype, untie)
        context = model.config.max_position_embeddings
        fastlm.patch(model, backend, quantize=spec)
        nll, argmax = score(model, stream, context)
        gen = generations(model, prompts, new_tokens)
        row = {"format": dtype_name if name == "baseline" else name, "ppl": math.exp(nll), "nll": nll}
        if base is None:
            base = {"nll": nll, "argmax": argmax, "gen": gen}
        row["ppl_vs_baseline_pct"] = 100 * (math.exp(nll - base["nll"]) - 1)
        row["top1_agreement_pct"] = 100 * float((argmax == base["argmax"]).float().mean())
        same = [sum(a == b for a, b in zip(g, r)) for g, r in zip(gen, base["gen"])]
        prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(g)) for g, r in zip(gen, base["gen"])]
        total = sum(len(g) for g in gen)
        row.update(greedy_agreement_pct=100 * sum(same) / total, greedy_prefix_tokens=sum(prefix),
                   greedy_tokens=total, seconds=time.perf_counter() - started)
        rows.append(row)
        log(format_row(row))
        del model
    return {"checkpoint": str(path), "dtype": dtype_name, "scored_tokens": int(base["argmax"].numel()),
            "held_out_tokens": int(stream.numel()), "prompts": n_prompts, "new_tokens": new_tokens, "rows": rows}


HEADER = ("| format | perplexity | vs baseline | top-1 agreement | greedy agreement | greedy prefix |\n"
          "|---|---:|---:|---:|---:|---:|")


def format_row(row: dict) -> str:
    return (f"| {row['format']} | {row['ppl']:.3f} | {row['ppl_vs_baseline_pct']:+.2f}% | "
            f"{row['top1_agreement_pct']:.2f}% | {row['greedy_agreement_pct']:.1f}% | "
            f"{row['greedy_prefix_tokens']}/{row['greedy_tokens']} |")


def main(argv=None) -> int:
    from fastlm.cli import ArgumentParser

    p = ArgumentParser(prog="python -m fastlm.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO), help="checkpoint (default: the demo, whose held-out text is known)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="the baseline's and the activations' dtype (default: %(default)s)")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton", "cpp"))
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if Path(args.model).resolve() != DEMO.resolve():
        print("python -m fastlm.bench.quality: note: the held-out text is the demo checkpoint's; another "
              "checkpoint is scored on it as plain text", file=sys.stderr)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        try:
            parse_spec(f)
        except ValueError as exc:
            p.error(f"--formats: {exc}")
    print(HEADER, flush=True)
    result = run(args.model, args.dtype, formats, args.prompts, args.new_tokens, args.backend,
                 log=lambda line: print(line, flush=True))
    print(f"\n{result['scored_tokens']} held-out tokens scored; greedy: {args.prompts} prompts x "
          f"{args.new_tokens} new tokens", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
