"""llama.cpp as an optional end-to-end provider (fastlm.bench.llamacpp), without llama.cpp: CI has none.

* No build found: every llama.cpp row is skipped, saying why.
* ``tests/data/llama_bench_sample.json`` is a RECORDED OUTPUT of the real ``llama-bench -o json`` (llama.cpp
  0c1e570, from the llama-cpp-python 0.3.36 sdist, on the random-weight Arcee model of the CPU suite),
  kept as the tool printed it: the parser is tested against it, and a stand-in ``llama-bench`` replays
  it so the suite's whole llama.cpp path (convert, quantize, interleaved rounds, rows, summary) runs.
* The command lines built for each precision.
* Helium converted as a Llama is the same model (logits equal in transformers).
"""
import json
import statistics
import stat
import sys
from pathlib import Path

import pytest
import torch

from fastlm.bench import configs, llamacpp
from fastlm.bench.e2e import LLAMA, EndToEnd, E2ECase, head_to_head
from fastlm.bench.suite import Context
from fastlm.bench.timing import TINY

SAMPLE = Path(__file__).parent / "data" / "llama_bench_sample.json"
TOOL = llamacpp.LlamaCpp(bench="/opt/llama/llama-bench", quantize="/opt/llama/llama-quantize",
                         converter="/opt/llama/convert_hf_to_gguf.py", python="/opt/llama/venv/bin/python",
                         source="test")


def test_absent_llama_cpp_gives_a_reason(tmp_path):
    why = llamacpp.find({"PATH": str(tmp_path)})
    assert isinstance(why, str) and "llama-bench" in why and llamacpp.ENV_DIR in why
    why = llamacpp.find({llamacpp.ENV_DIR: str(tmp_path / "missing")})
    assert isinstance(why, str) and "not a directory" in why
    (tmp_path / "llama-bench").write_text("")  # present but not executable, and no quantize / converter
    why = llamacpp.find({llamacpp.ENV_DIR: str(tmp_path)})
    assert isinstance(why, str) and "llama-bench" in why and "llama-quantize" in why and "convert_hf_to_gguf.py" in why


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_find_a_build_dir(tmp_path):
    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    _executable(tmp_path / "build" / "bin" / "llama-bench", "")
    _executable(tmp_path / "llama-quantize", "")
    _executable(tmp_path / "venv" / "bin" / "python", "")
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    tool = llamacpp.find({llamacpp.ENV_DIR: str(tmp_path)})
    assert tool == llamacpp.LlamaCpp(str(tmp_path / "build/bin/llama-bench"), str(tmp_path / "llama-quantize"),
                                     str(tmp_path / "convert_hf_to_gguf.py"), str(tmp_path / "venv/bin/python"),
                                     f"{llamacpp.ENV_DIR}={tmp_path}")
    tool = llamacpp.find({llamacpp.ENV_DIR: str(tmp_path), llamacpp.ENV_PYTHON: "/usr/bin/python3"})
    assert tool.python == "/usr/bin/python3"


def test_parse_the_recorded_llama_bench_json():
    results = llamacpp.parse_bench_json(SAMPLE.read_text())
    assert [(r.n_prompt, r.n_gen, r.n_depth) for r in results] == [(32, 0, 0), (512, 0, 0), (0, 64, 0)]
    assert [r.kind for r in results] == ["prefill", "prefill", "decode"]
    for r in results:
        assert r.n_threads == 2 and len(r.samples_ns) == len(r.samples_ts) == 3
        assert r.build_commit and r.cpu_info and r.model_size > 0
        tokens = r.n_prompt or r.n_gen
        # llama-bench's own tokens/s is tokens / seconds of each repetition
        assert r.samples_ts == pytest.approx([tokens / (ns * 1e-9) for ns in r.samples_ns], rel=1e-4)
        assert r.avg_ts == pytest.approx(sum(r.samples_ts) / 3, rel=1e-3)
    with pytest.raises(ValueError, match="no JSON array"):
        llamacpp.parse_bench_json("error: failed to load model\n")
    with pytest.raises(ValueError, match="lacks"):
        llamacpp.parse_bench_json('[{"n_prompt": 32}]')


@pytest.mark.parametrize("gguf_type", llamacpp.CONVERTED)
def test_convert_command(gguf_type):
    cmd = llamacpp.convert_command(TOOL, "/ckpt/hf", f"/ckpt/model-{gguf_type}.gguf", gguf_type)
    assert cmd[:2] == [TOOL.python, "-c"] and "convert.main()" in cmd[2]
    assert cmd[3:] == [TOOL.converter, "/ckpt/hf", "--outtype", gguf_type, "--outfile", f"/ckpt/model-{gguf_type}.gguf"]


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_0"])
def test_quantize_command(gguf_type):
    assert llamacpp.quantize_command(TOOL, "/c/model-f32.gguf", "/c/q.gguf", gguf_type, 2) == [
        TOOL.quantize, "/c/model-f32.gguf", "/c/q.gguf", gguf_type, "2"]


def test_bad_gguf_types_are_refused():
    with pytest.raises(ValueError, match="gguf_type"):
        llamacpp.convert_command(TOOL, "a", "b", "Q8_0")
    with pytest.raises(ValueError, match="gguf_type"):
        llamacpp.quantize_command(TOOL, "a", "b", "bf16", 2)


def test_precisions_map_to_gguf_types():
    assert llamacpp.GGUF_TYPES == {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "Q8_0",
                                   "int4": "Q4_0"}


def test_bench_commands():
    pre, dec = llamacpp.bench_commands(TOOL, "/c/m.gguf", prompt=512, new_tokens=64, threads=2)
    common = [TOOL.bench, "-m", "/c/m.gguf", "-t", "2", "-r", "1", "-o", "json"]
    assert pre == common + ["-p", "512", "-n", "0"]
    assert dec == common + ["-p", "0", "-n", "64", "-d", "512"]


def test_unsupported_families():
    assert llamacpp.NO_ARCHITECTURE in llamacpp.unsupported("persimmon", {})
    assert "qk_layernorm" in llamacpp.unsupported("stablelm", {"qk_layernorm": True})
    for family in ("arcee", "stablelm", "helium"):
        assert llamacpp.unsupported(family, configs.model_sizes(family, "full", "cpu")) is None


def test_helium_as_llama_is_the_same_model(tmp_path):
    from transformers import LlamaForCausalLM

    sizes = configs.model_sizes("helium", "tiny", "cpu")
    helium = configs.build_model("helium", sizes, "cpu", torch.float32)
    llamacpp.save_checkpoint(helium, "helium", str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    llama = LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = configs.random_ids(1, 24, sizes["vocab_size"], "cpu")
    with torch.no_grad():
        want, got = helium(ids).logits, llama(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the reordering is not the identity (q/k rows really moved)
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(llama.state_dict()[k], helium.state_dict()[k])


# ---- the suite's llama.cpp path, against stand-in tools --------------------------------------------
FAKE_BENCH = r'''#!{python}
import json, sys
args = sys.argv[1:]
value = lambda flag, default: args[args.index(flag) + 1] if flag in args else default
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\n")
test = json.load(open({sample!r}))[0]
prompt, gen, depth = int(value("-p", "0")), int(value("-n", "0")), int(value("-d", "0"))
tokens = prompt or gen
ns = [2_000_000 * tokens] * int(value("-r", "1"))
test.update(model_filename=value("-m", ""), n_prompt=prompt, n_gen=gen, n_depth=depth, samples_ns=ns,
            samples_ts=[tokens / (x * 1e-9) for x in ns], avg_ts=tokens / (ns[0] * 1e-9))
print(json.dumps([test], indent=2))
'''
FAKE_QUANTIZE = "#!{python}\nimport shutil, sys\nshutil.copy(sys.argv[1], sys.argv[2])\n"
# the converter's module as the wrapper uses it: get_model_class(arch) and main() (reads --outfile)
FAKE_CONVERTER = r'''
import json, sys
class Model:
    def set_vocab(self):
        raise AssertionError("the wrapper replaces set_vocab")
def get_model_class(name, mmproj=False):
    return Model
def main():
    args = sys.argv[1:]
    config = json.load(open(args[0] + "/config.json"))
    cls = get_model_class(config["architectures"][0])  # a module global, as in the real converter
    with open(args[args.index("--outfile") + 1], "w") as f:
        json.dump(dict(architectures=config["architectures"], outtype=args[args.index("--outtype") + 1],
                       set_vocab_replaced=cls.set_vocab.__name__), f)
'''


@pytest.fixture
def fake_llama_cpp(tmp_path, monkeypatch):
    root = tmp_path / "llama"
    root.mkdir()
    log = tmp_path / "bench.log"
    _executable(root / "llama-bench", FAKE_BENCH.format(python=sys.executable, log=str(log), sample=str(SAMPLE)))
    _executable(root / "llama-quantize", FAKE_QUANTIZE.format(python=sys.executable))
    (root / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    monkeypatch.setenv(llamacpp.ENV_DIR, str(root))
    monkeypatch.setenv(llamacpp.ENV_PYTHON, sys.executable)
    monkeypatch.setenv(llamacpp.ENV_CACHE, str(tmp_path / "cache"))
    return log, tmp_path / "cache"


def _ctx(scale="tiny"):
    return Context(device=torch.device("cpu"), scale=scale, policy=TINY)


def _rounds_by_order(log: Path) -> list[str]:
    return [line.split(" -p ")[1] for line in log.read_text().splitlines()]


@pytest.mark.parametrize("family", ["arcee", "helium"])
def test_suite_times_llama_cpp_interleaved(fake_llama_cpp, family, monkeypatch):
    import fastlm.bench.e2e as e2e

    log, cache = fake_llama_cpp
    suite = EndToEnd()
    case = E2ECase(family, 1, 8, 4, "quick")  # quick: 3 rounds, of test-sized models
    tiny = configs.model_sizes(family, "tiny", "cpu")
    monkeypatch.setattr(e2e.configs, "model_sizes", lambda *a: tiny)
    order = []
    real_generate = e2e.time_generate

    timed = {}

    def spy(generate, n, device, warmup, reps, between=None):
        wrapped = None if between is None else (lambda: (order.append("llama"), between()))
        t1, tn = real_generate(lambda k: (order.append("fastlm"), generate(k)), n, device, warmup, reps, wrapped)
        if between is not None:
            timed["t1"], timed["tn"] = t1, tn
        return t1, tn

    monkeypatch.setattr(e2e, "time_generate", spy)
    rows = suite.rows(_ctx("quick"), case, torch.float32)
    llama = [r for r in rows if r.provider == LLAMA]
    assert [(r.suite, r.status) for r in llama] == [("prefill", "ok"), ("decode", "ok")], [r.note for r in llama]
    pre, dec = llama
    assert pre.reps == dec.reps == 3
    assert pre.tokens_per_s == pytest.approx(1 / 2e-3) and dec.tokens_per_s == pytest.approx(1 / 2e-3)
    assert "f32 GGUF" in pre.note and "tg4 @ depth 8" in pre.note
    assert _rounds_by_order(log) == ["8 -n 0", "0 -n 4 -d 8"] * 3
    # the rounds ran between the head-to-head provider's own timed pairs
    paired = {r.suite: r for r in rows if r.provider == head_to_head("cpu")}
    assert paired["prefill"].status == "ok"
    # test-sized decode timings can be swamped by noise (then marked failed, saying so)
    assert paired["decode"].status == "ok" or "noise" in paired["decode"].note
    assert "fastlm,fastlm,llama," * 3 in ",".join(order) + ","
    # each round's ratio: the fake llama-bench takes 2 ms a token (8 for the prompt, 1 a step), so fastlm's tokens/s
    # over its in one round is its time over fastlm's; the summary's paired column is their median and range
    ratios = {"prefill": sorted(8 * 2e-3 / t for t in timed["t1"]),
              "decode": sorted(2e-3 / ((b - a) / 3) for a, b in zip(timed["t1"], timed["tn"]) if b > a)}
    for row in llama:
        if ratios[row.suite]:
            got = ratios[row.suite]
            assert (row.paired_ratio, row.paired_min, row.paired_max) == pytest.approx(
                (statistics.median(got), got[0], got[-1]))
    converted = json.loads(next(cache.glob("*/model-f32.gguf")).read_text())
    assert converted["outtype"] == "f32" and converted["set_vocab_replaced"] == "placeholder_vocab"
    assert converted["architectures"] == ["LlamaForCausalLM" if family == "helium" else "ArceeForCausalLM"]


def test_quantized_precision(fake_llama_cpp, monkeypatch):
    import fastlm.bench.e2e as e2e

    log, cache = fake_llama_cpp
    suite = EndToEnd(quantize=["int8"])
    rows = suite.rows(_ctx(), E2ECase("arcee", 1, 8, 4, "tiny"), torch.float32, quantize="int8")
    assert {r.provider for r in rows} == {head_to_head("cpu"), LLAMA} and {r.dtype for r in rows} == {"int8"}
    llama = [r for r in rows if r.provider == LLAMA]
    assert all(r.status == "ok" and "Q8_0 GGUF" in r.note for r in llama)
    assert sorted(p.name for p in next(cache.glob("arcee-float32-*")).glob("*.gguf")) == ["model-Q8_0.gguf",
                                                                                          "model-f32.gguf"]
    fastlm_rows = [r for r in rows if r.provider != LLAMA]
    if not e2e.patch_takes_quantize():
        assert all(r.status == "skipped" and "quantize" in r.note for r in fastlm_rows)


def test_llama_cpp_skipped_with_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.ENV_DIR, str(tmp_path / "nowhere"))
    suite = EndToEnd()
    ctx = _ctx()
    rows = suite.rows(ctx, E2ECase("arcee", 1, 8, 4, "tiny"), torch.float32)
    llama = [r for r in rows if r.provider == LLAMA]
    assert llama and all(r.status == "skipped" and "not a directory" in r.note for r in llama)
    other = {r.provider: r.note for r in suite.rows(ctx, E2ECase("persimmon", 1, 8, 4, "tiny"), torch.float32)}
    assert llamacpp.NO_ARCHITECTURE in other[LLAMA]
    batched = {r.provider: r.note for r in suite.rows(ctx, E2ECase("arcee", 2, 8, 4, "tiny"), torch.float32)}
    assert "batch 1" in batched[LLAMA]


def test_summary_puts_equal_precisions_side_by_side(tmp_path):
    from fastlm.bench.report import llama_cpp_section
    from fastlm.bench.results import Row

    paired = head_to_head("cpu")
    rows = [Row("decode", "arcee/B1-P32-N64", p, "bfloat16", "cpu", tokens_per_s=tps)
            for p, tps in ((paired, 90.0), (LLAMA, 100.0))]
    rows[1].paired_ratio, rows[1].paired_min, rows[1].paired_max = 1.01, 0.87, 1.12
    rows += [Row("prefill", "arcee/B1-P32", p, "int8", "cpu", tokens_per_s=tps, status=st, note=n)
             for p, tps, st, n in ((paired, float("nan"), "skipped", "no quantize"), (LLAMA, 500.0, "ok", "Q8_0"))]
    text = "\n".join(llama_cpp_section(rows, dict(build_commit="0c1e570", source="test", threads=2, cpu_info="x")))
    assert "| decode arcee/B1-P32-N64 | bf16 / bf16 | " in text and "**LOSS 0.90x** | 1.01x (0.87–1.12) |" in text
    assert "int8 / Q8_0" in text and "skipped: no quantize" in text
    assert "not timed: nope" in "\n".join(llama_cpp_section(rows, dict(reason="nope")))


def test_decode_bytes_per_token_counts_weights_lm_head_and_cache():
    from fastlm.bench.e2e import decode_bytes_per_token

    sizes = configs.model_sizes("arcee", "tiny", "cpu")
    model = configs.build_model("arcee", sizes, "cpu", torch.float32)
    hidden, vocab = sizes["hidden_size"], sizes["vocab_size"]
    params = sum(p.numel() for p in model.parameters())
    kv = sizes["num_hidden_layers"] * 2 * sizes["num_key_value_heads"] * sizes["head_dim"]
    # every weight but the embedding table (one row of it), lm_head included; the cache at 10 tokens + the new k/v
    want = (params - vocab * hidden + hidden) * 2 + kv * 2 * 11
    assert decode_bytes_per_token(model, 2, 2, 10) == want
    assert model.lm_head.weight.numel() == vocab * hidden  # untied: lm_head counts in full


def test_provider_filter_and_rounds(tmp_path):
    from fastlm.bench.driver import make_provider_filter, run_benchmarks
    from fastlm.bench.e2e import repetitions

    keep = make_provider_filter("fastlm-cpp|llama.cpp")
    assert [p for p in ("hf", "fastlm-cpp", "fastlm-torch", "llama.cpp") if keep(p)] == ["fastlm-cpp", "llama.cpp"]
    assert make_provider_filter("(")("a(b") and not make_provider_filter("(")("ab")  # bad regex: a substring
    assert repetitions("full") == (1, 5) and repetitions("full", 3) == (1, 3)
    with pytest.raises(ValueError, match="rounds"):
        run_benchmarks(str(tmp_path), suites=["decode"], tiny=True, rounds=0, progress=False)
    rows = run_benchmarks(str(tmp_path), suites=["decode"], tiny=True, device="cpu", progress=False, plots=False,
                          filter="arcee/B1", providers="^hf$", rounds=2, command="test")
    assert {r.provider for r in rows} == {"hf"} and all(r.reps == 2 for r in rows if r.ok)
