"""The Triton backend's internals and guards (its op tests: tests/ops/, parametrised by backend): the norm
kernel's looped path at forced block sizes, strided rows read in place, decode attention's static grid and
block sizes, no interpreter for CUDA tensors, a clear error on CPU tensors without it, one graph under
torch.compile, and the source tree's top-level ``kernels`` folder defining nothing.

Where: on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py on a machine without a GPU), or,
in the GPU test mode (tests/_gpu.py: CUDA available, TRITON_INTERPRET unset), on CUDA tensors with the
compiled kernels; the same tests either way.
"""
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

from _api import add_layer_norm_ref, add_rms_norm_ref, backend_status  # noqa: E402
from _gpu import DEVICE, GPU_TEST_MODE  # noqa: E402
from _inputs import DTYPES, norm_inputs, randn  # noqa: E402
from _tolerance import assert_op_matches, reference_pair  # noqa: E402

import fastlm.kernels as fk  # noqa: E402
import fastlm.kernels.decode_attention as decode_k  # noqa: E402
import fastlm.kernels.norm as norm_k  # noqa: E402

HERE = Path(__file__).resolve().parent
_LOADER = "import fastlm.ops, fastlm.kernels\n"


# ------------------------------------------------------------------- the norm kernel's looped path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_in_fp32", [False, True])
@pytest.mark.parametrize("shape,block,residual", [((2, 3000), 1024, True), ((1, 1000), 256, False)])
def test_add_rms_norm_in_blocks(dtype, weight_in_fp32, shape, block, residual):
    """A row wider than the block: the kernel loops over it (two passes for the statistics)."""
    x, r, w, _ = norm_inputs(shape, dtype, DEVICE, residual=residual, seed=1)
    y, h = norm_k._add_norm(x, r, w, None, 1e-5, True, weight_in_fp32, dtype, block_n=block)
    hi, lo = reference_pair(add_rms_norm_ref, x, r, w, 1e-5, weight_in_fp32)
    assert_op_matches("add_rms_norm", "triton", y, hi[0], lo[0], name="y")
    if residual:
        assert torch.equal(h, lo[1]), "h = x + residual must match torch's rounding exactly"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block,residual,bias", [((2, 3000), 1024, True, False), ((1, 1000), 256, False, True)])
def test_add_layer_norm_in_blocks(dtype, shape, block, residual, bias):
    """The looped path merges the blocks' mean and variance (Chan's merge); an offset mean exercises it."""
    x, r, w, b = norm_inputs(shape, dtype, DEVICE, residual=residual, bias=bias, seed=4, shift=3.0)
    y, h = norm_k._add_norm(x, r, w, b, 1e-5, False, False, dtype, block_n=block)
    hi, lo = reference_pair(add_layer_norm_ref, x, r, w, b, 1e-5)
    assert_op_matches("add_layer_norm", "triton", y, hi[0], lo[0], name="y")
    if residual:
        assert torch.equal(h, lo[1])


def test_strided_rows_are_read_in_place():
    """A slice of a wider buffer (row stride 6200, an offset start) is a view for the kernels, not a copy."""
    x = randn(6, 3100, device=DEVICE, seed=8)[::2, 50:3050]
    assert not x.is_contiguous()
    assert norm_k.rows_view(x).data_ptr() == x.data_ptr()


# ------------------------------------------------------------------------------ decode attention's grid
def test_decode_grid_is_static():
    """The grid comes from Tmax (and the shapes) only: the lengths' values never reach the host."""
    assert list(inspect.signature(decode_k.num_chunks_for).parameters) == ["t_max"]
    assert decode_k.num_chunks_for(1) == 1
    assert decode_k.num_chunks_for(decode_k.CHUNK) == 1
    assert decode_k.num_chunks_for(32768) == 32768 // decode_k.CHUNK
    assert 128 <= decode_k.CHUNK <= 512 and decode_k.CHUNK % 64 == 0  # a few hundred slots, whole tiles
    for dtype in DTYPES:
        for G, D in ((1, 64), (5, 128), (4, 160)):
            mma, block_g, block_t, block_d = decode_k.blocks_for(dtype, G, D)
            assert decode_k.CHUNK % block_t == 0 and block_d >= D and block_g >= G
            assert mma == (dtype != torch.float32)
            assert mma or block_g == 1 << (G - 1).bit_length(), "the fp32 path does not pad the group to 16 rows"


# ---------------------------------------------------------------------------------- the interpreter
def test_interpreter_never_for_cuda_tensors():
    """The interpreter copies whole storages to the host per launch: the backend refuses CUDA tensors
    under it (and in the GPU test mode the kernels are compiled)."""
    ok, why = backend_status("triton", "cuda")
    if GPU_TEST_MODE:
        assert ok and not fk.INTERPRET, why
    else:
        assert fk.INTERPRET and not ok and "interpreter" in why and "TRITON_INTERPRET" in why, why


def test_refuses_cpu_tensors_without_interpreter():
    """Without TRITON_INTERPRET=1 the backend reports itself unavailable and the kernels raise clearly."""
    code = _LOADER + r'''
import torch
from fastlm.ops import backend_status
import fastlm.kernels as fk
import fastlm.ops as ops
ok, why = backend_status("triton", "cpu")
assert not ok and "TRITON_INTERPRET" in why, why
x = torch.randn(2, 8)
for call in (lambda: fk.norm.add_rms_norm(x, None, torch.ones(8), 1e-5, False),
             lambda: fk.activations.relu2(x), lambda: torch.ops.fastlm.triton_swiglu(x)):
    try:
        call()
    except RuntimeError as exc:
        assert "TRITON_INTERPRET" in str(exc), exc
    else:
        raise AssertionError("no error")
try:
    ops.add_rms_norm(x, None, torch.ones(8), 1e-5, backend="triton")
except ops.BackendUnavailableError as exc:
    assert "TRITON_INTERPRET" in str(exc)
else:
    raise AssertionError("no error")
print("OK")
'''
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_compile_fullgraph():
    """The registered ops trace into one graph (fake impls; no graph breaks): the CPU proxy for capture."""
    def step(x, r, w, q, kc, vc, lengths, gu):
        y, h = fk.norm.add_rms_norm(x, r, w, 1e-5, False)
        o = fk.decode_attention.decode_attention(q, kc, vc, lengths, 0.125)
        return y, h, o, fk.activations.swiglu(gu)

    args = (randn(2, 64, device=DEVICE, seed=1), randn(2, 64, device=DEVICE, seed=2),
            randn(64, device=DEVICE, seed=3), randn(2, 4, 64, device=DEVICE, seed=4),
            randn(2, 2, 16, 64, device=DEVICE, seed=5), randn(2, 2, 16, 64, device=DEVICE, seed=6),
            torch.tensor([3, 16], device=DEVICE), randn(2, 128, device=DEVICE, seed=7))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), step(*args)):
        assert torch.equal(a, b)


def _run_from_source_root(code: str, *extra_path: str) -> None:
    """Runs `code` with the source tree's root first on sys.path (then `extra_path`), as `python` run in a clone."""
    res = subprocess.run([sys.executable, "-c", _LOADER + "import sys\nsys.path[0:0] = sys.argv[1:]\n" + code,
                          str(HERE.parent), *extra_path], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_top_level_kernels_import_defines_nothing():
    """From the source tree's root, `import kernels` finds this backend's folder. It must not load a second copy
    that registers the ops again; it loads Hugging Face's `kernels` where one is installed (transformers >= 5.25
    requires it and imports it while it loads), and otherwise defines nothing, so transformers sees none."""
    _run_from_source_root(r'''
import importlib.machinery, os
others = [p for p in sys.path[1:] if os.path.abspath(p or os.getcwd()) != os.path.abspath(sys.argv[1])]
installed = importlib.machinery.PathFinder.find_spec("kernels", others)
import kernels
from transformers.utils.import_utils import is_kernels_available
if installed is None:
    assert os.path.dirname(kernels.__file__) == os.path.join(os.path.abspath(sys.argv[1]), "kernels")
    assert not hasattr(kernels, "activations") and not hasattr(kernels, "_spec"), dir(kernels)
    assert not [m for m in sys.modules if m.startswith("kernels.")]
    assert not is_kernels_available()
else:
    assert kernels.__file__ == installed.origin, (kernels.__file__, installed.origin)
    ours = os.path.join(os.path.abspath(sys.argv[1]), "kernels") + os.sep
    assert not [n for n, m in list(sys.modules.items())
                if n.startswith("kernels.") and (getattr(m, "__file__", None) or "").startswith(ours)]
from transformers import ArceeForCausalLM, AutoModelForCausalLM, HeliumForCausalLM  # loads hub_kernels
print("OK")
''')


def test_top_level_kernels_import_loads_the_next_kernels_package(tmp_path):
    """The same, with a stand-in for Hugging Face's package after the root on sys.path: `import kernels` and its
    submodules come from the stand-in (a `from kernels import ...` as transformers does succeeds), and this
    package's kernels are not loaded a second time."""
    (tmp_path / "kernels" / "layer").mkdir(parents=True)
    (tmp_path / "kernels" / "__init__.py").write_text("LayerRepository = 'stand-in'\n")
    (tmp_path / "kernels" / "layer" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "layer" / "mode.py").write_text("Mode = 'mode'\n")
    _run_from_source_root(r'''
import os
from kernels import LayerRepository
from kernels.layer.mode import Mode
import kernels
assert (LayerRepository, Mode) == ("stand-in", "mode")
assert kernels.__file__ == os.path.join(sys.argv[2], "kernels", "__init__.py"), kernels.__file__
assert sorted(m for m in sys.modules if m.startswith("kernels")) == ["kernels", "kernels.layer", "kernels.layer.mode"]
print("OK")
''', str(tmp_path))
