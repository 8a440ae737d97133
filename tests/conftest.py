import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the op tests' helpers (tests/ops/_api.py, tests/ops/_inputs.py), for the backend tests here too
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops"))
from _gpu import GPU_TEST_MODE  # noqa: E402  (decides the mode without importing triton)

if GPU_TEST_MODE:
    # CUDA and TRITON_INTERPRET unset: compiled kernels on CUDA tensors. Decorate the kernels now, before
    # any test module's os.environ.setdefault("TRITON_INTERPRET", "1") could make them interpreted.
    try:
        import fastlm.kernels  # noqa: F401
    except ImportError:
        pass
else:
    # No GPU: every Triton kernel runs on CPU tensors through the interpreter. This must be set before
    # triton is first imported, so it lives at the top of conftest (imported before any test).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET, which must come first)


def pytest_report_header(config):
    return "fastlm: GPU test mode (compiled kernels on CUDA tensors)" if GPU_TEST_MODE else \
        "fastlm: CPU mode (Triton kernels under the interpreter on CPU tensors)"


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny models only pay for threads on a shared machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
