"""Resident memory of a quantized model: ``python -m fastlm.bench.quant_memory --model DIR``.

Each configuration (16-bit, int8, int4) runs in a fresh process (a freed heap does not shrink back for the
next one): torch, transformers and the model's code are imported first and the resident set (RSS) read as the
process's baseline; the checkpoint is then loaded and patched the way ``fastlm generate --quantize`` does it
(fastlm.engine.cli.load: the weights load in ``--dtype`` first, then ``patch(model, quantize=...)``), the
resident set read again, then one generate call allocates its KV cache and RSS is read a third time. It
reports RSS minus the baseline against the bytes of the weights (fastlm.engine.cli.weight_bytes: quantized
buffers, and the embedding, norms and biases kept 16-bit) and of the KV cache.

``--build-stablelm-1.6b DIR``: first write a random-weight StableLM-2-1.6B-shaped checkpoint (hidden 2048, 24
layers, MLP 5632, 32 heads, vocab 100352, untied lm_head; 1.64B parameters, 3.3 GB in bf16) with the demo's
tokenizer, to measure at a real size.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

STABLELM_2_1_6B = dict(vocab_size=100352, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                       num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.25, use_qkv_bias=True,
                       max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def build_stablelm(out: str) -> None:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, StableLmConfig

    from fastlm.engine.cli import DEMO_DIR

    model = AutoModelForCausalLM.from_config(StableLmConfig(**STABLELM_2_1_6B), dtype=torch.bfloat16)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, Path(out) / name)


def measure(path: str, dtype: str, quantize: str | None, new_tokens: int, cache_len: int) -> dict:
    """One configuration, in this process (see the module docstring)."""
    import torch

    import fastlm
    from fastlm.engine.cli import load, resident_memory, weight_bytes
    from fastlm.engine.engine import engine_for

    fastlm.SUPPORTED_MODEL_TYPES  # noqa: B018  (imports transformers' modeling code: part of the baseline)
    baseline = resident_memory()
    model, _, ids = load(path, dtype, "cpu", ["The list of"], backend="auto", quantize=quantize)
    patched = resident_memory()
    weights = weight_bytes(model)
    with torch.inference_mode():
        fastlm.generate(model, ids[0], max_new_tokens=new_tokens, ignore_eos=True, max_cache_len=cache_len)
    generated = resident_memory()
    engine = engine_for(model, cuda_graph=True, compile=False)  # generate()'s defaults: its engine
    cache = sum(slot.runner.cache.nbytes() for slot in engine._idle)
    return {"quantize": quantize or dtype, "baseline_rss": baseline, "rss_after_patch": patched,
            "rss_after_generate": generated, "weight_bytes": weights, "cache_bytes": cache,
            "patch_ratio": (patched - baseline) / weights,
            "generate_ratio": (generated - baseline) / (weights + cache)}


def main(argv=None) -> int:
    from fastlm.cli import ArgumentParser

    p = ArgumentParser(prog="python -m fastlm.bench.quant_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32", "auto"))
    p.add_argument("--quantize", default="none,int8,int4", help="comma-separated: none, int8, int4")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--max-cache-len", type=int, default=1024)
    p.add_argument("--build-stablelm-1.6b", dest="build", metavar="DIR", default=None)
    p.add_argument("--one", action="store_true", help="measure the one --quantize here (what each child runs)")
    args = p.parse_args(argv)
    if args.build:
        build_stablelm(args.build)
        args.model = args.model or args.build
    from fastlm.engine.cli import DEMO_DIR

    path = args.model or str(DEMO_DIR)
    if args.one:
        q = None if args.quantize == "none" else args.quantize
        print(json.dumps(measure(path, args.dtype, q, args.new_tokens, args.max_cache_len)))
        return 0
    mib = 2**20
    print(f"{path}, --dtype {args.dtype}, {args.new_tokens} new tokens, KV cache {args.max_cache_len} tokens")
    print("| weights | baseline RSS | RSS after patch | weight bytes | ratio | RSS after generate | + KV cache "
          "| ratio |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for q in args.quantize.split(","):
        child = subprocess.run([sys.executable, "-m", "fastlm.bench.quant_memory", "--one", "--model", path,
                                "--dtype", args.dtype, "--quantize", q, "--new-tokens", str(args.new_tokens),
                                "--max-cache-len", str(args.max_cache_len)], capture_output=True, text=True)
        if child.returncode:
            print(f"| {q} | failed: {child.stderr.strip().splitlines()[-1] if child.stderr.strip() else '?'} |")
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        base = r["baseline_rss"]
        print(f"| {r['quantize']} | {base / mib:.0f} MiB | +{(r['rss_after_patch'] - base) / mib:.0f} MiB | "
              f"{r['weight_bytes'] / mib:.0f} MiB | {r['patch_ratio']:.3f} | "
              f"+{(r['rss_after_generate'] - base) / mib:.0f} MiB | "
              f"{(r['weight_bytes'] + r['cache_bytes']) / mib:.0f} MiB | {r['generate_ratio']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
