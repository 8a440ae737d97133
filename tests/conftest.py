import os

# No GPU here: every Triton kernel runs on CPU tensors through the interpreter. This must be set
# before triton is first imported, so it lives at the top of conftest (imported before any test).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402  (after TRITON_INTERPRET, which must come first)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests: tiny models only pay for threads on a shared machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
