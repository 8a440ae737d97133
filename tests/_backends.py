"""Backend parametrisation shared by model-level tests: every backend, skipped with the reason when
it is not built or cannot run here."""
import pytest

from fastlm.ops._registry import BACKENDS, backend_status


def backend_params(device_type: str = "cpu"):
    params = []
    for backend in BACKENDS:
        ok, why = backend_status(backend, device_type)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {backend} unavailable: {why}")]
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params
