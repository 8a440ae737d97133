"""Smoke test of the benchmark driver on test-sized cases: it runs end to end and writes the files
and columns it promises. No timing is asserted (the numbers at these sizes mean nothing)."""
import csv

import pytest

from fastlm.bench import SUITES
from fastlm.bench.cli import main as bench_main
from fastlm.bench.driver import run_benchmarks
from fastlm.bench.results import COLUMNS

REQUIRED = ["suite", "case", "provider", "dtype", "device", "median_us", "p20_us", "p80_us", "gb_per_s",
            "speedup", "note"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = run_benchmarks(str(out), tiny=True, device="cpu", dtype="float32", compile=False, progress=False,
                          command="test")
    return out, rows


def test_writes_results_summary(tiny_run):
    out, rows = tiny_run
    assert (out / "results.csv").is_file() and (out / "summary.md").is_file()
    with open(out / "results.csv") as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED) <= set(reader.fieldnames)
        assert reader.fieldnames == COLUMNS
        records = list(reader)
    assert len(records) == len(rows) > 0
    assert {r["suite"] for r in records} == set(SUITES)
    summary = (out / "summary.md").read_text()
    for needle in ("## Machine", "copy bandwidth", "## Losses", "torch"):
        assert needle in summary


def test_every_suite_has_a_measured_baseline(tiny_run):
    _, rows = tiny_run
    baselines = {"kernels": "eager", "attention": "sdpa-eager", "prefill": "hf", "decode": "hf", "opcount": "hf"}
    for suite, provider in baselines.items():
        got = [r for r in rows if r.suite == suite and r.provider == provider]
        assert got, suite
        if suite != "decode":  # tiny decode timings can be swamped by noise and are then marked failed
            assert all(r.status == "ok" for r in got), [(r.case, r.note) for r in got if r.status != "ok"]


def test_rows_are_complete(tiny_run):
    _, rows = tiny_run
    for r in rows:
        assert r.status in ("ok", "skipped", "failed")
        if r.status != "ok":
            assert r.note, f"{r.suite}/{r.case}/{r.provider} is {r.status} without a reason"
        elif r.suite in ("kernels", "attention"):
            assert r.median_us > 0 and r.p20_us <= r.p80_us and r.gb_per_s > 0
        elif r.suite == "opcount":
            assert r.ops_per_layer > 0
    # every provider row of a kernels case has the eager speedup filled in when it ran
    assert all(r.speedup == r.speedup for r in rows if r.suite == "kernels" and r.status == "ok")


def test_unavailable_backends_are_skipped_with_a_reason(tiny_run):
    from fastlm.bench.backends import discover

    _, rows = tiny_run
    for b in discover("cpu"):
        if not b.timed:
            skipped = [r for r in rows if r.suite == "kernels" and r.provider == f"fastlm-{b.name}"]
            assert skipped and all(r.status == "skipped" and r.note for r in skipped)


def test_cli_filter_and_list(tmp_path, capsys):
    assert bench_main(["--tiny", "--list", "--filter", "opcount"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed and all(line.startswith("opcount/") for line in listed)
    out = tmp_path / "cli"
    assert bench_main(["opcount", "kernels", "--tiny", "--no-compile", "--no-progress", "--no-plots",
                       "--filter", r"opcount/helium|relu2\[arcee\]/prefill", "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert records and all(r["case"].startswith(("helium/", "relu2[arcee]/prefill")) for r in records)
    assert bench_main(["nonsense-suite", "--tiny"]) == 2


def test_count_ops_per_layer_restores_patch_state():
    import torch

    import fastlm
    from fastlm.bench import configs
    from fastlm.bench.opcount import count_ops_per_layer

    model = configs.build_model("helium", configs.model_sizes("helium", "tiny", "cpu"), "cpu", torch.float32)
    hf = count_ops_per_layer(model, None)
    fused = count_ops_per_layer(model, "torch")
    assert hf > 0 and fused > 0
    assert not fastlm.is_patched(model)
    fastlm.patch(model, "torch")
    assert count_ops_per_layer(model, None) == hf
    assert fastlm.is_patched(model)


def test_merge_combines_runs_suite_by_suite(tiny_run, tmp_path, capsys):
    out, rows = tiny_run
    merged = tmp_path / "merged"
    assert bench_main(["--merge", str(out), "--out", str(merged), "--no-plots"]) == 0
    with open(merged / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert sorted((r["suite"], r["case"], r["provider"]) for r in records) == \
        sorted((r.suite, r.case, r.provider) for r in rows)
    summary = (merged / "summary.md").read_text()
    assert "suite `kernels` from `test`" in summary


def _traits(layer):
    """What a benchmark layer keeps of its checkpoint's: the head grouping, the RoPE and qk-norm kind,
    the norm and its cast order, the MLP, its width ratio, which projections carry a bias."""
    a = layer.attention
    return (a.num_heads // a.num_kv_heads, a.rotary_dim / a.head_dim, a.interleaved, a.qkv_head_major, a.qk_norm,
            layer.norm, layer.rms_weight_in_fp32, layer.mlp, round(layer.intermediate / layer.hidden, 1),
            [p.bias for p in layer.projections])


@pytest.mark.parametrize("family", ["arcee", "stablelm", "persimmon", "helium"])
def test_every_size_comes_from_the_checkpoint_config(family):
    from fastlm.bench import configs

    real = configs.layer(family, "full")
    assert configs.model_sizes(family, "full", "cuda") == configs.CHECKPOINTS[family][1]
    for scale in ("tiny", "quick"):
        small = configs.patched_layer(family, configs.model_sizes(family, scale, "cpu"))
        assert _traits(small) == _traits(real), scale
    assert configs.patched_layer(family, configs.model_sizes(family, "quick", "cpu")).attention.head_dim == \
        real.attention.head_dim
    params = configs.num_params(configs.meta_model(family, configs.model_sizes(family, "quick", "cpu")))
    assert 80e6 < params < 120e6, params


def test_kernel_cases_are_the_patched_layers_calls():
    """The qkv and linear cases take their shapes from the specs fastlm.patch builds for the checkpoint."""
    from fastlm.bench import configs
    from fastlm.bench.kernels import kernel_cases

    cases = {c.name: c for c in kernel_cases("quick")}
    arcee = configs.layer("arcee", "quick")
    assert (arcee.attention.num_heads, arcee.attention.num_kv_heads, arcee.attention.head_dim) == (20, 4, 128)
    assert cases["qkv_rope[arcee]/decode-B1"].layer is arcee
    assert [(p.name, p.out_features, p.in_features) for p in arcee.projections] == \
        [("qkv", (20 + 2 * 4) * 128, 2560), ("o", 2560, 2560), ("up", 18432, 2560), ("down", 2560, 18432)]
    assert {"linear[helium:gate_up]/decode-B8", "qkv_rope_cache[stablelm:qk-norm]/decode-B1"} <= set(cases)
    assert configs.layer("stablelm", "quick", "qk-norm").attention.qk_norm == "per_head"
    assert not any(n.startswith(("linear[stablelm:qk-norm", "swiglu[stablelm:qk-norm")) for n in cases)


def test_quant_comparison_runs(capsys):
    """``python -m fastlm.bench.quant`` (fastlm's weight-only kernels against ATen's) end to end, tiny."""
    from fastlm.bench import quant

    quant.main(["--rows", "1,17", "--rounds", "1", "--shapes", "64x32",
                "--providers", "fastlm-int8,fastlm-int4-g32,aten-int8,aten-int4-g32,fastlm-bf16"])
    out = capsys.readouterr().out
    assert "fastlm._C" in out and out.count("K=64 N=32") == 2
    for provider in ("fastlm-int8", "fastlm-int4-g32", "aten-int8", "aten-int4-g32"):
        assert provider in out
