"""The kernel backends as plugins of fastlm.ops (their op tests: tests/ops/): each backend's entry points
take the reference's arguments, a backend without a kernel for an op runs the reference, and the C++
backend's plumbing (dispatcher calls, threads, the ISA it was built for, loading beside Python-defined
fastlm ops). The Triton backend's own internals and guards: tests/test_triton_kernels.py."""
from __future__ import annotations

import inspect
import subprocess
import sys
import tempfile

import pytest
import torch

from _api import (OPS, add_layer_norm, add_rms_norm, add_rms_norm_ref, backend_status, counter_uniform_ref, dispatch,
                  impl, linear_ref, registered_op, registered_ops, relu2)
from _inputs import randn, targets

REFERENCES = {"linear": linear_ref, "counter_uniform": counter_uniform_ref}  # no Triton kernel: the reference runs


@pytest.mark.parametrize("target", targets(kernels=True))
def test_entry_points_take_the_references_arguments(target):
    """Each registered op's entry point has its reference's parameters, and its torch.library op exists; the
    backend has kernels for exactly the ops tests/ops/_api.py lists (each op's tests run them)."""
    assert backend_status(target.backend, target.device)[0]
    assert {op for op in OPS if impl(op, target.backend, target.device) is not OPS[op].ref} == \
        set(registered_ops(target.backend))
    for op in registered_ops(target.backend):
        fn, ref = impl(op, target.backend, target.device), impl(op, "torch", target.device)
        assert fn is not ref, op
        assert list(inspect.signature(fn).parameters) == list(inspect.signature(ref).parameters), op
        assert registered_op(target.backend, op) is not None, op


@pytest.mark.parametrize("target", targets(backends=("triton",)))
@pytest.mark.parametrize("op", sorted(REFERENCES))
def test_an_op_without_a_kernel_runs_the_reference(target, op):
    assert op not in registered_ops(target.backend)
    assert impl(op, target.backend, target.device) is REFERENCES[op]


# -------------------------------------------------------------------------------------- the C++ backend

CPP = targets(backends=("cpp",), device="cpu")


@pytest.mark.parametrize("target", CPP)
def test_public_ops_run_the_cpp_backend(target):
    x, r, w = randn(2, 3, 64), randn(2, 3, 64, seed=1), randn(64, seed=2)
    y, h = add_rms_norm(x, r, w, 1e-5, backend=target.backend)
    y_ref, h_ref = add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    ok, why = backend_status("cpp", "cuda")
    assert ok == bool(torch._C._dispatch_has_kernel_for_dispatch_key("fastlm::add_rms_norm", "CUDA")), why


@pytest.mark.parametrize("target", CPP)
def test_auto_runs_the_cpp_kernels_on_cpu(target, monkeypatch):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    for op in registered_ops("cpp"):
        assert dispatch(op, "auto", torch.device("cpu")) is impl(op, "cpp", "cpu"), op


@pytest.mark.parametrize("target", CPP)
def test_cpp_kernels_run_on_torchs_threads(target):
    # at::parallel_for without OpenMP at build time runs every kernel on one thread, silently.
    import fastlm._C as C

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert C.parallel_threads_used(64) == 2, "fastlm._C was built without OpenMP: kernels are single-threaded"
        torch.set_num_threads(1)
        assert C.parallel_threads_used(64) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("target", CPP)
def test_cpp_build_isa_matches_record(target):
    import fastlm._C as C
    from fastlm._build_config import CPU_ISA

    assert C.cpu_isa() == CPU_ISA


@pytest.mark.parametrize("target", CPP)
def test_cpp_eager_calls_are_dispatcher_calls(target):
    """Eager, the C++ backend calls fastlm._C.call_<op> (an unboxed dispatcher call), not the OpOverload:
    modes still see the fastlm op, fake tensors still get the fake implementation, and torch.compile
    (which traces the OpOverload) still captures the op in one graph."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, r, w, b = randn(2, 64), randn(2, 64, seed=1), randn(64, seed=2, shift=1.0), randn(64, seed=3)
    with Seen() as seen:
        add_layer_norm(x, r, w, b, 1e-5, backend="cpp")
        relu2(x, backend="cpp")
    assert seen.ops == ["fastlm.add_layer_norm.default", "fastlm.relu2.default"]
    with FakeTensorMode():
        y, h = add_rms_norm(torch.randn(3, 64), torch.randn(3, 64), torch.ones(64), 1e-5, backend="cpp")
    assert type(y).__name__ == "FakeTensor" and y.shape == (3, 64) and h.shape == (3, 64)
    compiled = torch.compile(lambda a, c: add_layer_norm(a, c, w, b, 1e-5, backend="cpp")[0] * 2,
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, r), add_layer_norm(x, r, w, b, 1e-5, backend="cpp")[0] * 2)


ORDER_SCRIPT = """
import torch
def register_python_op():
    @torch.library.custom_op("fastlm::_order_probe_{tag}", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x + 1
    probe.register_fake(lambda x: torch.empty_like(x))
    lib = torch.library.Library("fastlm", "FRAGMENT")
    lib.define("_order_frag_{tag}(Tensor x) -> Tensor")
    lib.impl("_order_frag_{tag}", lambda x: x * 2, "CompositeExplicitAutograd")
    return lib
{first}
{second}
x = torch.ones(3)
assert torch.equal(torch.ops.fastlm._order_probe_{tag}(x), x + 1)
assert torch.equal(torch.ops.fastlm._order_frag_{tag}(x), x * 2)
y, h = torch.ops.fastlm.add_rms_norm(x.view(1, 3), None, torch.ones(3), 1e-5, False)
assert y.shape == (1, 3)
print("ok")
"""


@pytest.mark.parametrize("target", CPP)
@pytest.mark.parametrize("cpp_first", [True, False])
def test_cpp_extension_loads_beside_python_fragments(target, cpp_first):
    """fastlm._C's TORCH_LIBRARY(fastlm) and Python-defined fastlm:: ops, in either import order."""
    import fastlm._C as C

    # Load the extension file directly (importing the fastlm package would pull in transformers: slow).
    load_cpp = ("import importlib.util as u; s = u.spec_from_file_location('fastlm._C', %r); "
                "m = u.module_from_spec(s); s.loader.exec_module(m)" % C.__file__)
    load_py = "_lib = register_python_op()"
    first, second = (load_cpp, load_py) if cpp_first else (load_py, load_cpp)
    script = ORDER_SCRIPT.format(tag="a" if cpp_first else "b", first=first, second=second)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())  # the installed fastlm, not the source tree
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]

