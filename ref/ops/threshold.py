"""Threshold: a per-channel step function of a wide integer, as counts of thresholds passed.

FINN/qonnx's MultiThreshold counts the thresholds an input has reached; this one also
counts down, so that a function which falls and then rises (GELU, quantized) is one op:

    y = y0[c] + #{i : x >= up[c, i]} - #{j : x >= down[c, j]}

c is x's index along `axis`. The importer finds the thresholds at import time for
`QuantizeLinear(f(DequantizeLinear(accumulator)))` where no lookup table covers the
accumulator's 32 bits (docs/IMPORT.md, "NNCF"); the op itself is exact integer arithmetic.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import TYPES
from ..errors import GraphError, OpError
from .registry import Int, op
from .registry import TypeName as TypeNameAttr

# x has at most 32 bits, so thresholds beyond +-2^32 compare with it as +-2^32 do; clamping
# them there keeps `channel * 2^34 + value` (the keys searched below) within int64.
_LIMIT = 1 << 32


def _channels(x_shape, axis: int) -> int | None:
    if not -len(x_shape) <= axis < len(x_shape):
        raise GraphError(f"axis {axis} is out of range for an input of rank {len(x_shape)}")
    return x_shape[axis]


def _infer(ins, attrs):
    x, y0, up, down = ins
    if x.dtype.bits > 32:
        raise GraphError(f"x must be at most 32 bits, got {x.dtype.name}")
    channels = _channels(x.shape, attrs["axis"])
    for name, t, rank in (("y0", y0, 1), ("up", up, 2), ("down", down, 2)):
        if len(t.shape) != rank:
            raise GraphError(f"{name} must be {rank}-D, got shape {list(t.shape)}")
        rows = t.shape[0]
        if isinstance(rows, int) and isinstance(channels, int) and rows not in (1, channels):
            raise GraphError(f"{name} has {rows} rows for {channels} channels")
    return [(TYPES[attrs["dtype"]], x.shape)]


def _passed(x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """#{i : x[..., c] >= thresholds[c, i]} for each element, x's channels on its last axis."""
    channels = x.shape[-1]
    t = np.broadcast_to(np.clip(thresholds.astype(np.int64), -_LIMIT, _LIMIT), (channels, thresholds.shape[1]))
    if t.shape[1] == 0:
        return np.zeros(x.shape, np.int64)
    offset = np.arange(channels, dtype=np.int64) * (4 * _LIMIT)  # channel c's keys in [c*2^34 - 2^32, c*2^34 + 2^32]
    keys = np.sort(t, axis=1) + offset[:, None]
    counts = np.searchsorted(keys.reshape(-1), x.astype(np.int64) + offset, side="right")
    return counts - offset // (4 * _LIMIT) * t.shape[1]  # minus the thresholds of the channels before c


@op("Threshold", inputs=["x", "y0", "up", "down"], infer=_infer, attrs=dict(axis=Int(), dtype=TypeNameAttr()))
def Threshold(x, y0, up, down, *, axis=-1, dtype="int8"):
    """y = y0[c] + #{i : x >= up[c, i]} - #{j : x >= down[c, j]}, saturated to dtype."""
    x, y0, up, down = (np.asarray(v) for v in (x, y0, up, down))
    if x.dtype.kind not in "iu" or x.dtype.itemsize > 4:
        raise OpError(f"Threshold: x must be integers of at most 32 bits, got {x.dtype}")
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise OpError(f"Threshold: axis {axis} is out of range for an input of rank {x.ndim}")
    for name, v, rank in (("y0", y0, 1), ("up", up, 2), ("down", down, 2)):
        if v.ndim != rank or v.dtype.kind not in "iu":
            raise OpError(f"Threshold: {name} must be a {rank}-D integer array, got {v.dtype} of shape {list(v.shape)}")
        if v.shape[0] not in (1, x.shape[axis]):
            raise OpError(f"Threshold: {name} has {v.shape[0]} rows for {x.shape[axis]} channels")
    t = TYPES[dtype]
    last = np.moveaxis(x, axis, -1)
    start = np.broadcast_to(y0.astype(np.int64), (last.shape[-1],))
    y = start + _passed(last, up) - _passed(last, down)
    return np.moveaxis(np.clip(y, t.lo, t.hi).astype(t.storage), -1, axis)
