"""``fastlm generate`` (fastlm.engine.cli): a tiny checkpoint with a real (trained) tokenizer on disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastlm
from fastlm.engine import cli
from fastlm.engine.detok import IncrementalDetokenizer
from _models import build_model, make_config

CORPUS = ["the quick brown fox jumps over the lazy dog", "a fast engine decodes tokens one at a time",
          "static caches and graphs make decoding quick", "héllo wörld, ünïcode tökens strëam fine ✓"]
PROMPTS = ["the quick brown", "a fast engine decodes"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(dir, model, tokenizer): a Helium model sized to the tokenizer, context 64, saved with it."""
    tokenizer = train_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    config = make_config("helium_gqa", vocab_size=len(tokenizer), max_position_embeddings=64)
    model = build_model(config)
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def hf_greedy(model, tokenizer, prompt, new):
    fastlm.unpatch(model)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    toks = out[0, ids.shape[1]:].tolist()
    return toks[: toks.index(2) + 1] if 2 in toks else toks


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_greedy_matches_transformers(checkpoint, capsys):
    path, model, tokenizer = checkpoint
    argv = ["--model", path, "--max-new-tokens", 12, "--json", "--backend", "torch"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, rows):
        expected = hf_greedy(model, tokenizer, prompt, 12)
        assert row["token_ids"] == expected
        assert row["new_tokens"] == len(expected) and row["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
        assert row["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0


def test_streams_text_and_prints_summary(checkpoint, capsys, tmp_path):
    path, model, tokenizer = checkpoint
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPTS[0] + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "--model", path, "--prompt-file", prompt_file, "--max-new-tokens", 10,
                             "--ignore-eos", "--backend", "torch")
    assert code == 0, err
    fastlm.unpatch(model)
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        toks = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert out == PROMPTS[0] + tokenizer.decode(toks, skip_special_tokens=True) + "\n"  # prompt echoed first
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"prompt tokens: {ids.shape[1]}, new tokens: 10, prefill: ")
    assert "ms, decode: " in summary and "tokens/s" in summary


def test_batch_and_sampling_options(checkpoint, capsys):
    path, _, _ = checkpoint
    argv = ["--model", path, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", 6,
            "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 5, "--dtype", "float32",
            "--device", "cpu", "--backend", "torch", "--no-cuda-graph"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert [line[:3] for line in out.splitlines()] == ["[0]", "[1]"]
    j1 = run_cli(capsys, *argv, "--json")[1]
    j2 = run_cli(capsys, *argv, "--json")[1]
    assert [json.loads(x)["token_ids"] for x in j1.splitlines()] == [json.loads(x)["token_ids"] for x in j2.splitlines()]


def test_incremental_detokenizer_handles_split_characters(checkpoint):
    _, _, tokenizer = checkpoint
    text = "héllo wörld ✓ tökens"
    ids = tokenizer(text)["input_ids"]
    byte_level = tokenizer(" ✓")["input_ids"]
    assert len(byte_level) > 1  # ✓ is several byte tokens: partial characters really happen
    detok = IncrementalDetokenizer(tokenizer, tokenizer("the")["input_ids"])
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)


def _bad(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastlm generate: error: "), err
    return lines[0]


def test_bad_inputs_fail_cleanly(checkpoint, capsys, tmp_path):
    path, _, _ = checkpoint
    assert "does not exist" in _bad(capsys, "--model", tmp_path / "nope", "--prompt", "hi")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((path / f).read_bytes())
    assert "no tokenizer" in _bad(capsys, "--model", no_tok, "--prompt", "hi")
    other = tmp_path / "llama"
    other.mkdir()
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config))
    assert "unsupported model_type 'llama'" in _bad(capsys, "--model", other, "--prompt", "hi")
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _bad(capsys, "--model", path, "--prompt", "hi", "--device", "cuda")
    long_prompt = " ".join(["the quick brown fox"] * 40)
    assert "longer than the model's context of 64" in _bad(capsys, "--model", path, "--prompt", long_prompt)
    assert "no prompt" in _bad(capsys, "--model", path)
    assert "cannot read --prompt-file" in _bad(capsys, "--model", path, "--prompt-file", tmp_path / "missing.txt")


def test_no_model_runs_the_embedded_demo_checkpoint(capsys):
    assert (cli.DEMO_DIR / "model.safetensors").is_file(), "the demo checkpoint must ship with the package"
    code, out, err = run_cli(capsys, "--prompt", "The list", "--max-new-tokens", 8, "--json")
    assert code == 0, err
    record = json.loads(out.splitlines()[0])
    assert record["text"].strip() and 1 <= record["new_tokens"] <= 8


def test_missing_demo_checkpoint_fails_cleanly(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEMO_DIR", tmp_path / "demo")
    assert "demo checkpoint is missing" in _bad(capsys, "--prompt", "hello")


def test_python_m_fastlm_generate(checkpoint, tmp_path):
    path, model, tokenizer = checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastlm", "generate", "--model", str(path), "--prompt", PROMPTS[1],
                           "--max-new-tokens", "8", "--json", "--backend", "torch"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"] == hf_greedy(model, tokenizer, PROMPTS[1], 8)
    bad = subprocess.run([sys.executable, "-m", "fastlm", "generate", "--model", "/definitely/not/here",
                          "--prompt", "x"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
