"""fastlm: fused kernels and a fast decode engine for Arcee, StableLM, Persimmon and Helium."""
from fastlm.errors import BackendUnavailableError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "generate", "stream", "UnsupportedModelError",
           "BackendUnavailableError", "SUPPORTED_MODEL_TYPES", "__version__"]

# Everything that needs torch is imported on first use: `import fastlm` stays light, and the `fastlm`
# command (fastlm.cli) can set allocator options before torch is first imported.
_LAZY = {
    "patch": "fastlm.patching", "unpatch": "fastlm.patching", "is_patched": "fastlm.patching",
    "SUPPORTED_MODEL_TYPES": "fastlm.patching",
    "generate": "fastlm.engine.api", "stream": "fastlm.engine.api",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
