"""The one error type of training."""

from __future__ import annotations

from ..dyadic import ExportError


class QatError(ExportError):
    """Training cannot go on (an op or setting the trainer does not support, an overflow)."""
