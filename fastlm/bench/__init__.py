"""fastlm's benchmark harness (``fastlm bench``).

Suites: ``kernels`` (each fused op vs eager and torch.compile), ``attention`` (decode attention vs
transformers' SDPA call), ``prefill`` / ``decode`` (end-to-end tokens/s vs ``transformers``
``generate``), ``opcount`` (aten ops dispatched per decoder layer per decode step). Every size comes
from one table of real checkpoint configs (:mod:`fastlm.bench.configs`).

Entry points: :func:`fastlm.bench.driver.run_benchmarks` (API), ``fastlm bench`` (CLI,
:mod:`fastlm.bench.cli`), and the pytest-benchmark file in ``benchmarks/``; the last two run the
suites' own ``cases()``, ``providers()`` and ``build()`` (:mod:`fastlm.bench.suite`). Importing this
package does not import torch: ``fastlm bench`` sets its allocator options first (:mod:`fastlm.bench.alloc`).
"""
SUITES = ("kernels", "attention", "prefill", "decode", "opcount")
