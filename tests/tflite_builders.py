"""The TFLite model builder and LiteRT runner the TFLite tests use (examples/tflite/tflite_builder.py),
skipping when LiteRT is not installed."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("ai_edge_litert")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "tflite"))

from tflite_builder import LITERT_VERSION, NUMPY, TfliteBuilder, extremes_and_random, options, run_litert  # noqa: E402

__all__ = ["LITERT_VERSION", "NUMPY", "TfliteBuilder", "extremes_and_random", "options", "run_litert"]
