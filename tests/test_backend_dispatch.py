"""Backend registry: explicit choices, auto fallback with one warning, FASTLM_BACKEND, and `fastlm info`."""
import subprocess
import tempfile
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm.ops import _backend


@pytest.fixture(autouse=True)
def fresh_auto(monkeypatch):
    monkeypatch.setattr(_backend, "_AUTO_CACHE", {})
    monkeypatch.setattr(_backend, "_DISPATCH_CACHE", {})


def test_explicit_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(_backend._LOAD_ERRORS, "cpp", "ImportError: No module named 'fastlm._C'")
    monkeypatch.setattr(_backend, "_LOADED", _backend._LOADED | {"cpp"})
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
    monkeypatch.setattr(_backend, "_LOADED", _backend._LOADED | {"cpp"})
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
    monkeypatch.setattr(_backend, "_LOADED", _backend._LOADED | {"cpp"})
    monkeypatch.setitem(_backend._IMPLS, "add_rms_norm", {"torch": fastlm.ops.rms_norm.add_rms_norm_ref})
    assert not _backend.has_impl("add_rms_norm", "cpp")
    assert _backend.impl("add_rms_norm", "cpp") is fastlm.ops.rms_norm.add_rms_norm_ref


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "fastlm", "info"], capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir()).stdout  # the installed fastlm, not the source tree
    for word in ("fastlm", "torch", "transformers", "device", "triton", "cpp"):
        assert word in out
    assert "available" in out
