"""Fitting an exact int64 result into a narrower declared type, by overflow policy.

`error` (the default everywhere) stops and says where and by how much; `wrap` keeps the
low bits as two's complement hardware does; `saturate` clips to the type's range. The
policy acts on the exact final value: saturating the final sum is what PyITA does, and
differs from saturating after every addition as some RTL does.
"""

from __future__ import annotations

import numpy as np

from ..errors import AccumulatorOverflow


def fit_range(values: np.ndarray, lo: int, hi: int, bits: int, overflow: str, what: str) -> np.ndarray:
    """values (int64) fitted into [lo, hi], a range of 2^bits values, by `overflow`."""
    if values.size == 0:
        return values
    if values.dtype.kind in "iu":
        info = np.iinfo(values.dtype)
        if lo <= int(info.min) and int(info.max) <= hi:
            return values  # the array's own type already guarantees the range
    low, high = int(values.min()), int(values.max())
    if lo <= low and high <= hi:
        return values
    if overflow == "saturate":
        return np.clip(values, lo, hi)
    if overflow == "wrap":
        if hi - lo + 1 != 1 << bits:
            raise AccumulatorOverflow(f"{what}: cannot wrap into [{lo}, {hi}], which is not a full {bits}-bit range")
        return ((values - lo) & ((1 << bits) - 1)) + lo
    bad = int(np.argmax((values < lo) | (values > hi)))
    index = tuple(int(i) for i in np.unravel_index(bad, values.shape))
    value = int(values.reshape(-1)[bad])
    raise AccumulatorOverflow(
        f"{what}: overflow: value {value} at index {index} does not fit [{lo}, {hi}] "
        f"({bits} bits); use overflow='wrap' or 'saturate', or a wider type"
    )


def fit_signed_bits(values: np.ndarray, bits: int, overflow: str, what: str) -> np.ndarray:
    """Fit into a signed accumulator of `bits` bits (no-op at 64)."""
    if bits >= 64:
        return values
    return fit_range(values, -(1 << (bits - 1)), (1 << (bits - 1)) - 1, bits, overflow, what)
