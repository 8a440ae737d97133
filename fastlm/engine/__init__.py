"""fastlm's decode engine: static KV cache, prefill, CUDA-graph / compiled decode step, sampling.

Files: ``sampling.py`` (on-device sampling, counter-based RNG), ``cache.py`` (static KV cache),
``rope.py`` (RoPE tables), ``runner.py`` (the layer loop: prefill and the decode step),
``cuda_graphs.py`` (capture / replay), ``engine.py`` (host loop, capacity, finish reasons),
``api.py`` (``generate`` / ``stream``), ``detok.py`` (incremental detokenisation), ``cli.py``.
"""
from fastlm import _lazy_attributes

__all__ = ["generate", "stream", "Engine", "GenerationResult", "SamplingConfig"]

# Imported on first use, as in fastlm/__init__.py: `fastlm generate` (fastlm.engine.cli) checks its
# arguments before torch and transformers are imported, and importing the package would import both.
_LAZY = {"generate": "fastlm.engine.api", "stream": "fastlm.engine.api", "Engine": "fastlm.engine.engine",
         "GenerationResult": "fastlm.engine.engine", "SamplingConfig": "fastlm.engine.sampling"}
__getattr__, __dir__ = _lazy_attributes(globals(), _LAZY)
