"""fastlm: fused kernels and a fast decode engine for Arcee, StableLM, Persimmon and Helium."""
from fastlm.errors import UnsupportedModelError
from fastlm.ops import BackendUnavailableError
from fastlm.patch import SUPPORTED_MODEL_TYPES, is_patched, patch, unpatch

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "generate", "stream", "UnsupportedModelError",
           "BackendUnavailableError", "SUPPORTED_MODEL_TYPES", "__version__"]

_LAZY = {"generate": "fastlm.engine.api", "stream": "fastlm.engine.api"}


def __getattr__(name):
    """``fastlm.generate`` / ``fastlm.stream`` import the engine on first use, so ``import fastlm`` stays light."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
