"""fastlm's exception types."""


class UnsupportedModelError(ValueError):
    """Raised by :func:`fastlm.patch` for a model outside the four supported families."""
