#!/usr/bin/env python
"""Train the small demo checkpoint that ships inside the package (``fastlm/demo``).

``fastlm generate --prompt "..."`` without ``--model`` loads this checkpoint, so a new user sees
readable text with one command and no download.  Everything here runs offline on one CPU thread:

* data: the Python documentation text shipped with CPython (``pydoc_data.topics``) plus
  docstrings of the stdlib's own ``.py`` files (read with ``ast``, nothing is imported), lightly
  cleaned (underlines dropped, paragraphs re-flowed, doctest lines dropped);
* tokenizer: byte-level BPE trained with ``tokenizers``, saved as a ``PreTrainedTokenizerFast``;
* model: a small ``HeliumForCausalLM`` trained from scratch with AdamW + warmup/cosine LR.

Reproduce with::

    python scripts/train_demo.py --out fastlm/demo

The run is seeded and single-threaded, so the same Python (stdlib text differs a little between
CPython versions), torch and tokenizers versions give the same checkpoint.
``--bench`` only measures the training speed of the chosen size and exits.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time

import torch

# The corpus and its split live in the package, so that fastlm.bench.quality scores the same held-out text.
from fastlm.bench.demo_text import gather_documents, pydoc_documents, split_documents

SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}


# ---------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos, eos = SPECIALS["bos"], SPECIALS["eos"]
    # Every encoded text starts with <s>, exactly as every training document does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=SPECIALS["pad"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


# -------------------------------------------------------------------------------------- model
def build_model(args, tokenizer):
    from transformers import HeliumConfig, HeliumForCausalLM

    cfg = HeliumConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.ctx,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    model = HeliumForCausalLM(cfg)
    return model


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    ids = []
    eos = tokenizer.eos_token_id
    # The raw `tokenizers` object: same ids as `tokenizer(d)` (<s> added by the post-processor),
    # without the "longer than model_max_length" warning.
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: torch.Tensor, batch: int, ctx: int, gen: torch.Generator):
    n = stream.numel() - ctx - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([stream[s : s + ctx + 1] for s in starts.tolist()])
        yield x


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


@torch.no_grad()
def evaluate(model, stream, args, n_batches: int = 8) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    it = batches(stream, args.batch, args.ctx, gen)
    losses = []
    for _ in range(n_batches):
        x = next(it)
        losses.append(_loss(model, x).item())
    model.train()
    return sum(losses) / len(losses)


def _loss(model, x):
    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def samples(model, tokenizer, prompts, max_new_tokens=40):
    model.eval()
    out = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")
        g = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(g[0], skip_special_tokens=True))
    model.train()
    return out


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fastlm/demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--no-stdlib", dest="stdlib", action="store_false",
                    help="train on pydoc_data.topics only")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2300)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--bench", action="store_true", help="time a few steps and exit")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    docs = gather_documents(args.stdlib)
    n_chars = sum(len(d) for d in docs)
    print(f"data: {len(docs)} documents, {n_chars / 1e6:.2f}M characters", flush=True)

    tokenizer = train_tokenizer(docs, args.vocab)
    print(f"tokenizer: vocab {len(tokenizer)} ({time.time() - t_start:.0f}s)", flush=True)

    # Hold out every 25th document for validation (deterministic, no shuffling needed).
    train_docs, val_docs = split_documents(docs)
    train_stream = encode_stream(tokenizer, train_docs)
    val_stream = encode_stream(tokenizer, val_docs)
    print(f"tokens: train {train_stream.numel():,}  val {val_stream.numel():,} "
          f"({n_chars / (train_stream.numel() + val_stream.numel()):.2f} chars/token)", flush=True)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Helium {args.layers}x{args.hidden} (ffn {args.intermediate}, {args.heads} heads), "
          f"{n_params / 1e6:.2f}M params, {4 * n_params / 1e6:.1f} MB fp32", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    it = batches(train_stream, args.batch, args.ctx, gen)
    model.train()

    steps = 10 if args.bench else args.steps
    t0 = time.time()
    ema = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x = next(it)
        loss = _loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if args.bench:
            if step == 1:
                t0 = time.time()  # skip the first (warm-up) steps
            continue
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t0
            print(f"step {step + 1:5d}/{steps}  loss {loss.item():.3f}  ema {ema:.3f}  "
                  f"lr {lr_at(step, args):.2e}  {el:.0f}s  ({(step + 1) / el:.2f} steps/s)", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < steps:
            print(f"  val loss {evaluate(model, val_stream, args):.3f}  | "
                  f"{samples(model, tokenizer, ['The list'], 24)[0]!r}", flush=True)

    if args.bench:
        dt = (time.time() - t0) / (steps - 2)
        tok_s = args.batch * args.ctx / dt
        print(f"bench: {dt:.3f} s/step, {1 / dt:.2f} steps/s, {tok_s:.0f} tokens/s; "
              f"25 min = {int(1500 / dt)} steps", flush=True)
        return

    train_s = time.time() - t0
    val_loss = evaluate(model, val_stream, args, n_batches=16)
    train_loss = evaluate(model, train_stream, args, n_batches=16)
    print(f"final: train loss {train_loss:.3f}  val loss {val_loss:.3f}  "
          f"(val ppl {math.exp(val_loss):.1f}); training took {train_s / 60:.1f} min", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.8
    model.generation_config.top_k = 40
    model.generation_config.max_new_tokens = 64
    model.generation_config.repetition_penalty = 1.1
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    for f in os.listdir(args.out):  # safetensors writes 0600; package data should be world-readable
        os.chmod(os.path.join(args.out, f), 0o644)

    greedy = samples(model, tokenizer, ["The list", "A function", "The following"], 40)
    for s in greedy:
        print("sample:", repr(s), flush=True)

    cmd = "python scripts/train_demo.py " + " ".join(sys.argv[1:]) if argv is None else str(argv)
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    readme = f"""# fastlm demo checkpoint

A tiny **Helium** causal LM (`HeliumForCausalLM`, {n_params / 1e6:.2f}M parameters, fp32) and its
byte-level BPE tokenizer, shipped inside the package so that `fastlm generate --prompt "..."`
works with no `--model` and no download. It writes Python-docs-flavoured English; it is a demo,
not a useful language model.

## How it was made

Reproduce with (one CPU thread, seeded):

    {cmd}

- **Data**: the Python documentation shipped with CPython {platform.python_version()}
  (`pydoc_data.topics.topics`, {len(pydoc_documents())} topics){" plus the docstrings (module, class, function; >= 80 characters) of the stdlib `.py` files, read with `ast`" if args.stdlib else ""};
  lightly cleaned (heading underlines and doctest lines dropped, paragraphs re-flowed onto one line),
  deduplicated: {len(docs)} documents, {n_chars / 1e6:.2f}M characters. Every 25th document is held out
  for validation. Training tokens: {train_stream.numel():,}; validation tokens: {val_stream.numel():,}.
- **Tokenizer**: byte-level BPE trained with `tokenizers` (vocab {len(tokenizer)}, min frequency 2),
  special tokens `<pad>`=0, `<s>`=1 (bos, prepended to every encoded text), `</s>`=2 (eos, ends every
  training document); saved as `PreTrainedTokenizerFast`.
- **Model**: Helium, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads
  (head dim {args.hidden // args.heads}), context {args.ctx}, RoPE theta 10000, tied embeddings.
- **Training**: {args.steps} steps of batch {args.batch} x {args.ctx} tokens
  ({args.steps * args.batch * args.ctx / 1e6:.1f}M tokens seen), AdamW (betas 0.9/0.95, weight decay {args.wd}),
  LR {args.lr:g} with {args.warmup} warmup steps and cosine decay to {args.min_lr:g}, grad clip 1.0,
  fp32, seed {args.seed}. Took {train_s / 60:.1f} minutes on one CPU thread
  (torch {torch.__version__}).
- **Final loss**: train {train_loss:.3f}, validation {val_loss:.3f} (perplexity {math.exp(val_loss):.1f}).

`generation_config.json` defaults to sampling (temperature 0.8, top-k 40, repetition penalty 1.1,
64 new tokens).

## Greedy samples

""" + "\n".join(f"- `{s}`" for s in greedy) + "\n\n## Files\n\n" + "\n".join(
        f"- `{f}`: {sz / 1e6:.2f} MB" for f, sz in sizes.items()) + "\n"
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(readme)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out}: {total / 1e6:.2f} MB total; whole run {(time.time() - t_start) / 60:.1f} min",
          flush=True)


if __name__ == "__main__":
    main()
