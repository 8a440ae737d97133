"""fastlm's kernel backends, as plugins of the op registry (fastlm/ops/_registry.py describes the interface).

* ``cpp`` (fastlm/backends/cpp.py): the ``fastlm._C`` extension built from csrc/ (C++ CPU kernels, plus
  CUDA C++ kernels when built with CUDA).
* ``triton`` (fastlm/backends/triton.py): the Triton kernels, whose source is the top-level kernels/
  folder, shipped as the ``fastlm.kernels`` package.

Nothing here imports fastlm.ops: the layers import downward only (patch / engine -> modules -> ops ->
backends). The registry imports a backend module lazily, the first time that backend is asked for.
"""
