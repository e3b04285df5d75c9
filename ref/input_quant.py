"""Float inputs turned into the integers a model takes, by the quantization it was exported with.

An image model exported from float pixels stores, per float input,

    metadata["input_quant"][name] = {"scale": s, "zero_point": z, "dtype": "int8"}

and `refsim run` (or `quantize_feeds`) turns a float array x fed to that input into

    q = clip(round_half_even(x / s) + z, lo, hi)      (lo, hi: the range of dtype)

computed in float64. This is the boundary where real-valued data enters; it happens once,
before the graph runs, and the graph itself never sees a float. Integer arrays are passed
through unchanged (they are taken to be quantized already).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .dtypes import int_type
from .errors import InputError


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    t = int_type(dtype)
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise InputError(f"input quantization scale must be a positive number, got {scale!r}")
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise InputError("float input holds NaN or infinite values")
    q = np.rint(x / float(scale)) + int(zero_point)
    return np.clip(q, t.lo, t.hi).astype(t.storage)


def quantize_feeds(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with every float array quantized by the model's `input_quant` metadata."""
    specs = model.metadata.get("input_quant") or {}
    out = {}
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and name in specs:
            spec = specs[name]
            try:
                out[name] = quantize_array(array, spec["scale"], spec.get("zero_point", 0), spec["dtype"])
            except KeyError as e:
                raise InputError(f"input_quant for {name!r} lacks {e}") from None
        else:
            out[name] = array
    return out
