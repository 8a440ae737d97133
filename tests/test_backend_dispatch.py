"""Backend registry: explicit choices, auto fallback with one warning, FASTLM_BACKEND, and `fastlm info`."""
import subprocess
import tempfile
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm.ops import _registry as _backend


@pytest.fixture(autouse=True)
def fresh_auto(monkeypatch):
    monkeypatch.setattr(_backend, "_AUTO_CACHE", {})
    monkeypatch.setattr(_backend, "_DISPATCH_CACHE", {})


def test_explicit_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(_backend._LOAD_ERRORS, "cpp", "ImportError: No module named 'fastlm._C'")
    monkeypatch.setitem(_backend._MODULES, "cpp", None)
    with pytest.raises(fastlm.BackendUnavailableError, match="cpp.*fastlm._C"):
        _backend.resolve("cpp", "cpu")
    x = torch.randn(2, 8)
    with pytest.raises(fastlm.BackendUnavailableError, match="fastlm._C"):
        fastlm.ops.add_rms_norm(x, None, torch.ones(8), 1e-5, backend="cpp")


def test_triton_on_cpu_requires_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backend.backend_status("triton", "cpu")
    assert not ok and ("TRITON_INTERPRET" in why or "failed to import" in why)


def test_auto_falls_back_with_one_warning(monkeypatch, fresh_auto):
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    monkeypatch.setitem(_backend._LOAD_ERRORS, "cpp", "ImportError: not built")
    monkeypatch.setitem(_backend._MODULES, "cpp", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.resolve("auto", "cpu") == "torch"
        assert _backend.resolve("auto", "cpu") == "torch"
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(messages) == 1 and "not built" in messages[0]


def test_env_override_applies_to_auto_only(monkeypatch, fresh_auto):
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    assert _backend.resolve("auto", "cpu") == "torch"
    monkeypatch.setenv("FASTLM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        _backend.resolve("auto", "cpu")
    assert _backend.resolve("torch", "cpu") == "torch"


def test_dispatch_follows_fastlm_backend_set_at_run_time(monkeypatch):
    # dispatch() reads FASTLM_BACKEND from os.environ's own dict (the mapping's get() costs ~0.6 us)
    from fastlm.ops.rms_norm import add_rms_norm_ref

    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    cpu = torch.device("cpu")
    auto = _backend.dispatch("add_rms_norm", "auto", cpu)
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    assert _backend.dispatch("add_rms_norm", "auto", cpu) is add_rms_norm_ref
    monkeypatch.delenv("FASTLM_BACKEND")
    assert _backend.dispatch("add_rms_norm", "auto", cpu) is auto
    assert _backend.dispatch("add_rms_norm", "torch", "cpu") is add_rms_norm_ref  # a device string works too


def test_reference_used_for_ops_a_backend_does_not_implement(monkeypatch):
    """Where a backend has a kernel is data (its KERNELS table): elsewhere the registry itself serves the
    reference, whatever functions the plugin module defines."""
    import types

    plugin = types.SimpleNamespace(KERNELS={"relu2": ("cpu",)}, LIBRARY_OPS={}, status=lambda d: (True, "fake"),
                                   add_rms_norm=lambda *a: "kernel", relu2=lambda x: "relu2 kernel")
    monkeypatch.setitem(_backend._MODULES, "cpp", plugin)
    ref = fastlm.ops.rms_norm.add_rms_norm_ref
    assert not _backend.has_impl("add_rms_norm", "cpp", "cpu")
    assert _backend.impl("add_rms_norm", "cpp", "cpu") is ref
    assert _backend.impl("relu2", "cpp", "cpu") is plugin.relu2
    assert _backend.impl("relu2", "cpp", "cuda") is fastlm.ops.relu2_ref
    assert _backend.dispatch("add_rms_norm", "cpp", torch.device("cpu")) is ref


def test_cpp_kernels_table_matches_the_build():
    """The real plugin: decode attention and linear have CPU kernels only; every declared op resolves."""
    from fastlm.backends import cpp

    assert _backend.impl("decode_attention", "cpp", "cuda") is fastlm.ops.decode_attention_ref
    assert _backend.impl("decode_attention", "cpp", "cpu") is cpp.decode_attention
    assert _backend.impl("linear", "cpp", "cuda") is fastlm.ops.linear_ref
    for op in _backend.OPS:
        for backend in _backend.BACKENDS:
            assert callable(_backend.impl(op, backend, "cpu"))


def test_auto_is_cached_per_device_and_fastlm_backend(monkeypatch):
    calls = []
    real = _backend.backend_status

    def counting(backend, device_type="cpu"):
        calls.append((backend, device_type))
        return real(backend, device_type)

    monkeypatch.setattr(_backend, "backend_status", counting)
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    first = _backend.resolve("auto", "cpu")
    assert _backend.resolve("auto", "cpu") == first and len(calls) == 1  # resolved once per device type
    monkeypatch.setenv("FASTLM_BACKEND", "torch")
    assert _backend.resolve("auto", "cpu") == "torch" and len(calls) == 2  # a new FASTLM_BACKEND: resolved again
    assert _backend.resolve("auto", "cpu") == "torch" and len(calls) == 2
    monkeypatch.delenv("FASTLM_BACKEND")
    assert _backend.resolve("auto", "cpu") == first and len(calls) == 2


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout  # the installed fastlm, not the source tree
    for word in ("fastlm", "torch", "transformers", "device", "triton", "cpp"):
        assert word in out
    assert "available" in out


def test_dispatch_eager_gives_the_same_results_without_the_compile_check():
    """dispatch_eager: the cpp backend's unboxed call where its entry point only picks between that call and the
    OpOverload; dispatch's entry point for the ops whose entry point adapts the result (the norms' h, the in-place
    activations' view); the reference for the torch backend. Each returns what dispatch's returns."""
    ok, why = _backend.backend_status("cpp", "cpu")
    if not ok:
        pytest.skip(f"needs the cpp backend: {why}")
    import fastlm._C as C

    cpu = torch.device("cpu")
    assert _backend.dispatch_eager("linear", "cpp", cpu) is C.call_linear
    assert _backend.dispatch_eager("decode_attention", "cpp", cpu) is C.call_decode_attention
    for op in ("add_rms_norm", "add_layer_norm", "swiglu_", "relu2_"):
        assert _backend.dispatch_eager(op, "cpp", cpu) is _backend.dispatch(op, "cpp", cpu)
    assert _backend.dispatch_eager("linear", "torch", cpu) is _backend.OPS["linear"].ref
    x, w, b = torch.randn(3, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(_backend.dispatch_eager("linear", "cpp", cpu)(x, w, b, None),
                               _backend.dispatch("linear", "cpp", cpu)(x, w, b, None), rtol=0, atol=0)
