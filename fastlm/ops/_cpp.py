"""The C++ backend (``fastlm._C``): registers Python entry points that call ``torch.ops.fastlm.*``.

Arrives with the C++ extension issue; until ``fastlm._C`` is built, importing this module raises
ImportError and the backend reports itself unavailable.
"""
from __future__ import annotations

import fastlm._C  # noqa: F401  (raises ImportError when the extension is not built)


def status(device_type: str) -> tuple[bool, str]:
    return False, "not implemented"
