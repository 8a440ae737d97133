"""fastlm's exception types."""


class UnsupportedModelError(ValueError):
    """Raised by :func:`fastlm.patch` for a model outside the four supported families."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""
