"""Float inputs turned into the integers a model takes, by the quantization it was exported with.

An image model exported from float pixels stores, per float input,

    metadata["input_quant"][name] = {"scale": s, "zero_point": z, "dtype": "int8"}

and `refsim run` (or `quantize_feeds`) turns a float array x fed to that input into

    q = clip(round_half_even(x / s) + z, lo, hi)      (lo, hi: the range of dtype)

computed in float64 (a value whose level `round(x / s)` is not even an int64, such as 1e308,
is refused rather than saturated). This is the boundary where real-valued data enters; it happens once,
before the graph runs, and the graph itself never sees a float. Integer arrays are passed
through unchanged (they are taken to be quantized already).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .dtypes import int_type
from .errors import InputError


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype: str, what: str = "float input") -> np.ndarray:
    t = int_type(dtype)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise InputError(f"{what}: input quantization scale must be a positive number, got {scale!r}")
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        raise InputError(f"{what}: holds NaN or infinite values (first at index {list(_first(~finite))})")
    with np.errstate(over="ignore"):  # a huge x / tiny scale overflows to inf: refused below
        q = np.rint(x / float(scale)) + int(zero_point)
    # Values far beyond the type saturate, as ONNX QuantizeLinear does; but one whose level
    # is not even an int64 (1e308, say) is not an image that was slightly out of range.
    wild = ~(np.abs(q) < 2.0**63)
    if wild.any():
        index = _first(wild)
        raise InputError(
            f"{what}: value {float(x[index]):g} at index {list(index)} is far outside the {t.name} range "
            f"[{t.lo}, {t.hi}] it is quantized into at scale {scale} (more than 2^63 steps)"
        )
    return np.clip(q, t.lo, t.hi).astype(t.storage)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)) if mask.ndim else ()


def quantize_feeds(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with every float array quantized by the model's `input_quant` metadata."""
    specs = model.metadata.get("input_quant") or {}
    out = {}
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and name in specs:
            spec = specs[name]
            try:
                out[name] = quantize_array(array, spec["scale"], spec.get("zero_point", 0), spec["dtype"], f"input {name!r}")
            except KeyError as e:
                raise InputError(f"input_quant for {name!r} lacks {e}") from None
        else:
            out[name] = array
    return out
