"""fastlm's decode engine: static KV cache, prefill, CUDA-graph / compiled decode step, sampling.

Files: ``sampling.py`` (on-device sampling, counter-based RNG), ``cache.py`` (static KV cache),
``rope.py`` (RoPE tables), ``runner.py`` (the layer loop: prefill and the decode step),
``cuda_graphs.py`` (capture / replay), ``engine.py`` (host loop, capacity, finish reasons),
``api.py`` (``generate`` / ``stream``), ``detok.py`` (incremental detokenisation), ``cli.py``.
"""
from fastlm.engine.api import generate, stream
from fastlm.engine.engine import Engine, GenerationResult
from fastlm.engine.sampling import SamplingConfig

__all__ = ["generate", "stream", "Engine", "GenerationResult", "SamplingConfig"]
