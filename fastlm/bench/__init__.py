"""fastlm's benchmark suites (``fastlm bench``).

Suites: ``kernels`` (each fused op vs eager and torch.compile), ``attention`` (decode attention vs
transformers' SDPA call), ``prefill`` / ``decode`` (end-to-end tokens/s vs ``transformers``
``generate``), ``opcount`` (aten ops dispatched per decoder layer per decode step).

Entry points: :func:`fastlm.bench.driver.run_benchmarks` (API), ``fastlm bench`` (CLI,
:mod:`fastlm.bench.cli`), and the pytest-benchmark files in ``benchmarks/`` which reuse the case
definitions in :mod:`fastlm.bench.cases`.
"""
from fastlm.bench.opcount import count_ops_per_layer

SUITES = ("kernels", "attention", "prefill", "decode", "opcount")

__all__ = ["SUITES", "count_ops_per_layer", "run_benchmarks"]


def run_benchmarks(*args, **kwargs):
    """See :func:`fastlm.bench.driver.run_benchmarks` (imported lazily: it pulls in transformers)."""
    from fastlm.bench.driver import run_benchmarks as _run

    return _run(*args, **kwargs)
