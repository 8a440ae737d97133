"""fastlm: fused kernels and a fast decode engine for Arcee, StableLM, Persimmon and Helium."""
from fastlm.errors import BackendUnavailableError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "generate", "stream", "Session", "UnsupportedModelError",
           "BackendUnavailableError", "SUPPORTED_MODEL_TYPES", "__version__"]

# Everything that needs torch is imported on first use: `import fastlm` stays light, the `fastlm`
# command checks its arguments before torch loads, and `fastlm bench` (fastlm.bench.alloc) can set
# allocator options before torch is first imported.
_LAZY = {
    "patch": "fastlm.patching", "unpatch": "fastlm.patching", "is_patched": "fastlm.patching",
    "SUPPORTED_MODEL_TYPES": "fastlm.patching",
    "generate": "fastlm.engine.api", "stream": "fastlm.engine.api", "Session": "fastlm.engine.session",
}


def _lazy_attributes(namespace: dict, table: dict[str, str]):
    """-> (__getattr__, __dir__) for a package whose names in ``table`` (name -> the module defining it)
    are imported on first use, then kept in the package's ``namespace``."""
    def getattr_(name):
        if name in table:
            import importlib

            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    def dir_():
        return sorted(set(namespace) | set(table))

    return getattr_, dir_


__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
