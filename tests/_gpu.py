"""The GPU test mode: decided once, before triton is imported (tests/conftest.py).

With a CUDA device and TRITON_INTERPRET not set to 1 by the user, the suite runs its kernel tests on CUDA
tensors with compiled kernels (the Triton interpreter is never used for CUDA tensors); everywhere else
the Triton kernels run on CPU tensors under the interpreter, as on a machine without a GPU.
"""
import os

import pytest


def _gpu_test_mode() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the user asked for the interpreter
        return False
    try:
        import torch  # does not import triton
    except ImportError:
        return False
    return torch.cuda.is_available()


GPU_TEST_MODE = _gpu_test_mode()
DEVICE = "cuda" if GPU_TEST_MODE else "cpu"
SKIP_REASON = ("GPU test mode only: needs a CUDA device with TRITON_INTERPRET unset (compiled kernels on CUDA "
               "tensors); " + ("TRITON_INTERPRET=1 is set" if os.environ.get("TRITON_INTERPRET") == "1"
                               else "no CUDA device here"))
requires_gpu_mode = pytest.mark.skipif(not GPU_TEST_MODE, reason=SKIP_REASON)
