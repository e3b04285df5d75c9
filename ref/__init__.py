"""refsim: a bit-exact integer reference simulator for quantized transformers."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops
from .builder import GraphBuilder
from .engine import Model, load
from .errors import RefsimError

__all__ = ["GraphBuilder", "Model", "RefsimError", "load", "ops", "__version__"]
