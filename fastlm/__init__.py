"""fastlm: fused kernels and a fast decode engine for Arcee, StableLM, Persimmon and Helium."""
from fastlm.errors import UnsupportedModelError
from fastlm.ops import BackendUnavailableError
from fastlm.patch import SUPPORTED_MODEL_TYPES, is_patched, patch, unpatch

__version__ = "0.1.0"

__all__ = ["patch", "unpatch", "is_patched", "UnsupportedModelError", "BackendUnavailableError",
           "SUPPORTED_MODEL_TYPES", "__version__"]
