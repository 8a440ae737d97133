"""``fastlm generate`` (fastlm.engine.cli): a tiny checkpoint with a real (trained) tokenizer on disk."""
from __future__ import annotations

import io
import json
import os
import re
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
    assert summary.startswith(f"prompt tokens: {ids.shape[1]}, new tokens: 10, load: ")
    assert " ms (" in summary and "tokens/s), decode: " in summary and ", peak memory: " in summary


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
    ids1, ids2 = ([json.loads(x)["token_ids"] for x in j.splitlines()] for j in (j1, j2))
    assert ids1 == ids2


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


# ---- stop strings ------------------------------------------------------------------------------------------
def demo_pieces(prompt: str, new: int):
    """(tokenizer, greedy new tokens, each token's text) for the demo checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cli.DEMO_DIR)
    model = AutoModelForCausalLM.from_pretrained(cli.DEMO_DIR).eval()
    toks = fastlm.generate(model, tokenizer(prompt)["input_ids"], max_new_tokens=new, ignore_eos=True, backend="torch")
    pieces = [tokenizer.decode(toks[: i + 1])[len(tokenizer.decode(toks[:i])):] for i in range(len(toks))]
    assert "".join(pieces) == tokenizer.decode(toks)
    return tokenizer, toks, pieces


def test_stop_string_spanning_two_tokens(capsys):
    prompt = "The list"
    tokenizer, toks, pieces = demo_pieces(prompt, 30)
    text = "".join(pieces)
    # the end of one token's text and the start of the next one's, found nowhere earlier in the text
    def boundary(i):
        return len("".join(pieces[: i + 1])) - 2

    i = next(i for i in range(2, len(pieces) - 1) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3
             and text.find(pieces[i][-2:] + pieces[i + 1][:2]) == boundary(i))
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    before = text[: boundary(i)]
    base = ["--prompt", prompt, "--max-new-tokens", 30, "--ignore-eos", "--backend", "torch",
            "--stop", "no such text", "--stop", stop]
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    assert out == prompt + before + "\n"  # streamed: the stop string is not printed, nor is anything after it
    assert f", new tokens: {i + 2}, " in err.strip().splitlines()[-1]
    code, out, err = run_cli(capsys, *base, "--json")
    row = json.loads(out)
    assert (row["text"], row["token_ids"], row["finish_reason"]) == (before, toks[: i + 2], "stop")
    # a batch (no host sync per token: checked every few steps) stops each sequence on its own
    _, other, other_pieces = demo_pieces("The dict", 30)
    code, out, err = run_cli(capsys, *base, "--prompt", "The dict", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert (rows[0]["text"], rows[0]["token_ids"], rows[0]["finish_reason"]) == (before, toks[: i + 2], "stop")
    other_text = "".join(other_pieces)
    if stop not in other_text:
        assert rows[1]["token_ids"] == other and rows[1]["finish_reason"] == "length"
    else:
        assert rows[1]["finish_reason"] == "stop" and rows[1]["text"] == other_text[: other_text.index(stop)]


# ---- --chat --------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint, tmp_path_factory):
    path, model, tokenizer = checkpoint
    chat_path = tmp_path_factory.mktemp("chat_ckpt")
    for f in path.iterdir():
        (chat_path / f.name).write_bytes(f.read_bytes())
    (chat_path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    from transformers import AutoTokenizer

    return chat_path, model, AutoTokenizer.from_pretrained(chat_path)


def test_chat_flag_renders_the_template_with_the_system_message(chat_checkpoint, capsys):
    path, model, tokenizer = chat_checkpoint
    messages = [{"role": "system", "content": "a fast engine"}, {"role": "user", "content": PROMPTS[0]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    fastlm.unpatch(model)
    with torch.no_grad():
        t = torch.tensor([ids])
        hf = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=12, do_sample=False)[0, len(ids):]
    hf = hf.tolist()
    hf = hf[: hf.index(2) + 1] if 2 in hf else hf
    argv = ["--model", path, "--chat", "--system", "a fast engine", "--prompt", PROMPTS[0], "--max-new-tokens", 12,
            "--backend", "torch"]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["token_ids"] == hf and row["prompt_tokens"] == len(ids) and row["prompt"] == PROMPTS[0]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out == tokenizer.decode(hf, skip_special_tokens=True) + "\n"  # the reply only


def test_chat_flag_needs_a_template(checkpoint, capsys):
    path, _, _ = checkpoint
    line = _bad(capsys, "--model", path, "--chat", "--prompt", "hi")
    assert line == f"fastlm generate: error: --chat: the tokenizer in {path} has no chat template"
    assert "needs --chat" in _bad(capsys, "--model", path, "--system", "be brief", "--prompt", "hi")


# ---- the summary: load time, prefill and decode rates, peak memory -----------------------------------------
def proc_peak_rss() -> int:
    """The kernel's high-water mark of this process's resident set (/proc/self/status VmHWM), bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


SUMMARY = re.compile(r"prompt tokens: (\d+), new tokens: (\d+), load: ([\d.]+) s, prefill: ([\d.]+) ms "
                     r"\(([\d.]+) tokens/s\), decode: ([\d.]+) tokens/s, peak memory: ([\d.]+) MiB RSS "
                     r"\(backend torch, eager\)")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc to compare against")
def test_summary_and_json_report_load_rates_and_peak_memory(checkpoint, capsys):
    path, _, tokenizer = checkpoint
    argv = ["--model", path, "--prompt", PROMPTS[1], "--max-new-tokens", 8, "--ignore-eos", "--backend", "torch",
            "--device", "cpu"]
    code, _, err = run_cli(capsys, *argv)
    hwm = proc_peak_rss()
    assert code == 0, err
    m = SUMMARY.fullmatch(err.strip().splitlines()[-1])
    assert m, err
    prompt_tokens, new, load_s, prefill_ms, prefill_rate, decode_rate, peak_mib = m.groups()
    assert int(prompt_tokens) == len(tokenizer(PROMPTS[1])["input_ids"]) and int(new) == 8
    assert float(load_s) > 0 and float(prefill_ms) > 0 and float(decode_rate) > 0
    assert float(prefill_rate) == pytest.approx(int(prompt_tokens) / (float(prefill_ms) / 1e3), rel=0.05, abs=0.1)
    assert abs(float(peak_mib) * 2**20 - hwm) <= 0.10 * hwm
    code, out, err = run_cli(capsys, *argv, "--json")
    hwm = proc_peak_rss()
    row = json.loads(out)
    assert row["load_s"] > 0 and row["prefill_ms"] > 0 and row["prefill_tokens_per_s"] > 0
    assert row["decode_tokens_per_s"] > 0 and row["new_tokens"] == 8 and row["peak_memory"] == "rss"
    assert abs(row["peak_memory_bytes"] - hwm) <= 0.10 * hwm


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty, big", [(True, True), (True, False), (False, True)])
def test_progress_bar_only_on_a_terminal_for_a_large_checkpoint(checkpoint, monkeypatch, capsys, tty, big):
    path, _, _ = checkpoint
    if big:  # "large": the threshold lowered below this checkpoint's size
        monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", cli.checkpoint_bytes(str(path)))
    stderr = FakeTerminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    code = cli.main(["--model", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", "2", "--backend", "torch"])
    err = stderr.getvalue()
    assert code == 0, err
    assert ("Loading weights" in err and "patching (torch backend)" in err) == (tty and big), err
    # the bars clear their line ("\r" and blanks): the summary is what is left on the last line
    assert re.split(r"[\r\n]", err.rstrip("\n"))[-1].startswith("prompt tokens: ")


def test_api_stop_strings(checkpoint):
    """fastlm.generate / fastlm.stream ``stop_strings``: the tokens up to the one that completes it."""
    _, model, tokenizer = checkpoint
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = fastlm.generate(model, ids, max_new_tokens=12, ignore_eos=True, backend="torch")
    text = tokenizer.decode(full)
    stop = text[len(tokenizer.decode(full[:4])) - 1: len(tokenizer.decode(full[:5])) + 1]  # tokens 4 and 5, at least
    expected = next(full[:n] for n in range(1, len(full) + 1) if stop in tokenizer.decode(full[:n]))
    got = fastlm.generate(model, ids, tokenizer=tokenizer, max_new_tokens=12, ignore_eos=True, backend="torch",
                          stop_strings=stop, return_result=True, check_every=3)
    assert got.tokens[0] == expected and got.finish_reasons == ["stop"]
    streamed = list(fastlm.stream(model, ids, tokenizer=tokenizer, max_new_tokens=12, ignore_eos=True,
                                  backend="torch", stop_strings=[stop]))
    assert streamed == expected
    for bad, error, match in [([""], ValueError, "empty string"), ([3], TypeError, "list of strings"),
                              (b"x", TypeError, "list of strings")]:
        with pytest.raises(error, match=match):
            fastlm.generate(model, ids, tokenizer=tokenizer, stop_strings=bad)
    with pytest.raises(ValueError, match="pass tokenizer"):
        fastlm.generate(model, ids, stop_strings="x")
