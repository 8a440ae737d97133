"""scripts/gpu_check.sh (the one-shot device check) as far as it goes without a GPU: the dry run (every
step before the first CUDA call, with no CUDA call made), and the report it writes from the stages'
outputs (here synthetic ones: the arithmetic of bandwidth as a share of the card's peak)."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402

FUSED_OPS = ("add_rms_norm", "add_layer_norm", "qkv_rope", "qkv_rope_cache", "swiglu", "relu2", "relu2_")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, with every process's CUDA initialisation recorded (sitecustomize wraps torch's)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    hook, calls = tmp / "hook", tmp / "cuda_calls.txt"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import builtins
        import sys
        _import = builtins.__import__
        def _record(name, *args, **kwargs):
            mod = _import(name, *args, **kwargs)
            cuda = sys.modules.get("torch.cuda")
            if cuda is not None and hasattr(cuda, "_lazy_init") and not getattr(cuda, "_gpu_check_hooked", False):
                cuda._gpu_check_hooked = True
                real = cuda._lazy_init
                def lazy_init():
                    with open({str(calls)!r}, "a") as f:
                        f.write("torch.cuda._lazy_init\\n")
                    return real()
                cuda._lazy_init = lazy_init
            return mod
        builtins.__import__ = _record
    """))
    env = dict(os.environ, PYTHON=sys.executable,  # the interpreter running the tests, venv or not
               PYTHONPATH=str(hook) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp / "out"
    res = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, calls, res


def test_dry_run_plans_every_stage_within_eight_minutes(dry_run):
    out, _, res = dry_run
    assert "dry run OK" in res.stdout
    with open(out / "gpu_check.json") as f:
        plan = json.load(f)["dry_run"]
    names = [st["stage"] for st in plan["stages"]]
    assert names == ["device", "build", "tests", "decode", "attention", "kernels"]
    caps = sum(st["cap_s"] for st in plan["stages"])
    assert caps <= plan["budget_s"] and plan["budget_s"] + plan["report_cap_s"] + gpu_check.KILL_GRACE_S < 480
    cases = {st["stage"]: st.get("cases", []) for st in plan["stages"]}
    assert {c.split("/")[1] for c in cases["decode"]} == {"helium", "stablelm"}
    assert cases["attention"] and all(c.startswith("attention/") for c in cases["attention"])
    ops = {c.split("/")[1].split("[")[0] for c in cases["kernels"]}
    assert ops == set(FUSED_OPS), ops
    assert plan["collected"] > 50 and "tests/test_gpu_mode.py" in plan["files"]
    md = (out / "gpu_check.md").read_text()
    assert "**Dry run**" in md and "| kernels |" in md


def test_dry_run_makes_no_cuda_call(dry_run):
    _, calls, _ = dry_run
    assert not calls.exists(), calls.read_text()


def test_report_from_stage_outputs(tmp_path):
    from fastlm.bench.results import COLUMNS

    peak = 3.35e12
    (tmp_path / "device.json").write_text(json.dumps(dict(name="NVIDIA H100 80GB HBM3", sm=90, multiprocessors=132,
                                                          total_memory_gib=80, peak_hbm_bytes_per_s=peak,
                                                          peak_source="test")))
    (tmp_path / "stages.tsv").write_text("device\t0\t4\t15\nbuild\t0\t80\t110\ntests\t1\t100\t120\n"
                                         "decode\t124\t95\t95\n")
    (tmp_path / "tests.xml").write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                                        '<testcase classname="t" name="a"/><testcase classname="t" name="b">'
                                        '<failure/></testcase></testsuite></testsuites>')

    def write(stage, rows):
        (tmp_path / f"bench-{stage}").mkdir()
        with open(tmp_path / f"bench-{stage}" / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows([{**dict.fromkeys(COLUMNS, ""), **r} for r in rows])

    write("kernels", [dict(suite="kernels", case="swiglu[helium]/decode-B1", provider="fastlm-triton", status="ok",
                           median_us="10", gb_per_s=str(peak / 2 / 1e9), speedup="3")])
    write("decode", [dict(suite="decode", case="helium/B1-P128-N16", provider="fastlm-triton", status="ok",
                          tokens_per_s="100", speedup="2.5"),
                     dict(suite="prefill", case="helium/B1-P128", provider="hf", status="ok", tokens_per_s="9")])
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp_path / "gpu_check.json") as f:
        s = json.load(f)
    assert s["kernels"][0]["hbm_peak_pct"] == pytest.approx(50.0)
    assert [st["status"] for st in s["stages"]] == ["ok", "ok", "failed (rc 1)", "timed out"]
    assert (s["tests"]["passed"], s["tests"]["failures"], s["tests"]["failed"]) == (2, 1, ["t::b"])
    dec = s["decode"]
    assert len(dec) == 1 and dec[0]["speedup_vs_hf"] == 2.5  # the prefill row is not a decode rate
    weights = gpu_check._model_bytes("helium")  # bf16 weights of the ~2B Helium model, streamed each step
    assert 3e9 < weights < 6e9
    assert dec[0]["weights_gb_per_s"] == pytest.approx(weights * 100 / 1e9)
    assert dec[0]["hbm_peak_pct"] == pytest.approx(100 * weights * 100 / peak)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100" in md and "| tests | failed (rc 1) |" in md and "FAILED t::b" in md


def test_peak_bandwidth():
    bw, how = gpu_check.peak_bandwidth(dict(name="x", memory_clock_rate=2_619_000, memory_bus_width=5120))
    assert bw == pytest.approx(3.352e12, rel=1e-3) and "clock" in how  # H100 SXM: 2.619 GHz HBM3, 5120 bits
    assert gpu_check.peak_bandwidth(dict(name="NVIDIA H200"))[0] == 4.8e12
    assert gpu_check.peak_bandwidth(dict(name="NVIDIA H100 PCIe"))[0] == 2.0e12
    bw, how = gpu_check.peak_bandwidth(dict(name="Some GPU"))
    assert bw != bw and "unknown" in how
