"""The resource table (fastlm.kernels.resources) in CI: every Triton kernel x sm_80/86/89/90 x the real
family shapes (prefill and decode, B=1 and 8, contexts 128 to 32k, bf16/fp16/fp32), compiled exactly as
the JIT compiles it at launch (a stand-in Triton driver, nothing launched): no spill stack, shared memory
within each arch's per-block limit. And the check can fail: a decode kernel changed to spill, or to
need more shared memory than sm_86/89 give a block, is reported and exits 1.

No GPU needed: Triton's own ptxas compiles, cuobjdump reads the cubins. ~2 minutes on 2 cores without
a Triton cache (~/.triton/cache makes reruns fast).
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be checked")
pytest.importorskip("triton.backends.nvidia.compiler", reason="this triton has no CUDA backend")


def run_resources(args, prelude="", timeout=1800):
    """``python -m fastlm.kernels.resources ARGS`` (after ``prelude``) with compiled kernels. The whole table
    on a cold Triton cache took 628 s on a slow 2-core Zen 3 (~30 s warm): the timeout leaves room for that."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = prelude + f"\nimport sys\nfrom fastlm.kernels.resources import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir())


@pytest.fixture(scope="module")
def table():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "resources.json")
        res = run_resources(["--json", path])
        assert os.path.exists(path), res.stdout[-3000:] + res.stderr[-3000:]
        with open(path) as f:
            data = json.load(f)
    return res, data


def test_every_kernel_fits_every_arch(table):
    res, data = table
    bad = [b for b in data["binaries"] if b["problems"]]
    assert res.returncode == 0 and not bad, res.stdout[-4000:] + res.stderr[-2000:]
    for b in data["binaries"]:  # the same facts, straight from the records
        assert b["stack"] == 0 and b["local"] == 0, b
        assert b["shared"] <= b["shared_limit"], b
    assert "0 do not fit" in res.stdout


def test_table_covers_every_kernel_arch_and_family(table):
    _, data = table
    from fastlm.kernels.resources import ARCHS, CONTEXTS, FAMILIES

    # norm, qkv_rope, swiglu, relu2, decode split + reduce, quant_linear
    assert len(data["kernels"]) == 7, data["kernels"]
    seen = {(b["kernel"], b["arch"]) for b in data["binaries"]}
    assert seen == {(k, a) for k in data["kernels"] for a in ARCHS}
    labels = [lab for b in data["binaries"] for lab in b["labels"]]
    for fam in FAMILIES:
        for phase in ("prefill", "decode"):
            for batch in (1, 8):
                assert any(lab.startswith(f"{fam.name} B{batch} {phase} ") for lab in labels), (fam.name, phase)
        split = [b for b in data["binaries"] if b["kernel"] == "_decode_split_kernel"
                 and any(lab.startswith(fam.name + " ") for lab in b["labels"])]
        assert {b["arch"] for b in split} == set(ARCHS), fam.name
    for ctx in (CONTEXTS[0], CONTEXTS[-1]):
        assert any(f" ctx{ctx} " in lab for lab in labels)
    assert CONTEXTS[0] == 128 and CONTEXTS[-1] == 32768
    # the real launch configuration, not a hand-written one
    split = [b for b in data["binaries"] if b["kernel"] == "_decode_split_kernel"]
    assert {b["num_warps"] for b in split} == {4} and {b["num_stages"] for b in split} == {2}
    assert {b["constants"]["MMA"] for b in split} == {True, False}  # 16-bit caches on tensor cores, fp32 on FMA
    quant = [b for b in data["binaries"] if b["kernel"] == "_quant_linear_kernel"]
    assert {b["constants"]["BITS"] for b in quant} == {8, 4} and {b["arch"] for b in quant} == set(ARCHS)
    assert {(b["constants"]["BLOCK_M"], b["constants"]["BLOCK_N"]) for b in quant} == {(16, 16), (32, 32)}


def test_detects_a_kernel_changed_to_spill():
    """The fp32 decode path with a 32x larger product tile (G=8 rows x 64 slots x 128 dims) spills."""
    res = run_resources(["--arch", "90", "--family", "AFM", "--phase", "decode", "--dtype", "float32", "--jobs", "1"],
                        prelude="import fastlm.kernels.decode_attention as d\nd.FMA_TILE = 1 << 17")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert "_decode_split_kernel sm_90: spills:" in res.stdout, res.stdout[-3000:]


def test_detects_shared_memory_over_the_arch_limit():
    """256-slot tiles need ~140 KB of shared memory: over sm_86/89's 99 KB a block, within sm_80/90's."""
    res = run_resources(["--family", "Helium", "--phase", "decode", "--dtype", "bfloat16", "--jobs", "1"],
                        prelude="import fastlm.kernels.decode_attention as d\n"
                                "d.blocks_for = lambda dtype, G, D: (True, 16, 256, 128)")
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    failing = {line.split()[1] for line in res.stdout.splitlines() if line.startswith("  _decode_split_kernel ")}
    assert failing == {"sm_86:", "sm_89:"}, res.stdout[-3000:]
    assert "> 101376 B a block" in res.stdout


def test_decode_intensity_matches_the_kernel_header():
    """The MMA / FMA counts per KV byte stated in kernels/decode_attention.py's header, recounted."""
    res = run_resources(["--intensity"])
    assert res.returncode == 0, res.stderr[-3000:]
    bf16, fp32 = [json.loads(chunk) for chunk in res.stdout.replace("}\n{", "}\n\x00{").split("\x00")]
    assert (bf16["mma_per_tile"], bf16["BLOCK_T"], bf16["tensor_flop_per_kv_byte"]) == (128, 64, 16.0), bf16
    assert bf16["tensor_flop_per_kv_byte"] < 0.1 * bf16["h100_ridge_bf16_flop_per_byte"]
    assert fp32["mma_per_tile"] == 0 and fp32["fma_per_kv_byte"] < 0.1 * fp32["h100_ridge_fp32_fma_per_byte"], fp32
