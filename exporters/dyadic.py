"""Real-valued scales as dyadic numbers: r ~= mul / 2^shift with a b-bit integer multiplier.

This is the one place where a float scale becomes the integer (mul, shift) pair that
`Requant` takes. With r = f * 2^e and f in [0.5, 1) (frexp): mul = round(f * 2^b),
shift = b - e; when rounding carries mul up to 2^b it is halved and shift decremented, so
mul always has exactly b significant bits (2^(b-1) <= mul < 2^b). A shift outside what
the target supports is an export error naming the layer, never a silent clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from refsim.errors import RefsimError


class ExportError(RefsimError):
    """A model cannot be exported as asked (unsupported op, parameter out of range, ...)."""


@dataclass(frozen=True)
class Dyadic:
    mul: np.ndarray  # int64, same shape as the scale (scalar or per channel)
    shift: np.ndarray  # int64
    rel_error: float  # largest |mul / 2^shift - r| / r over all channels


def dyadic(scale, mul_bits: int = 31, max_shift: int = 62, min_shift: int = 0, what: str = "scale") -> Dyadic:
    """Approximate each positive real in `scale` by mul / 2^shift, mul of `mul_bits` bits.

    Zero scales give (0, 0). Raises ExportError when a scale is negative or not finite,
    or when its shift falls outside [min_shift, max_shift].
    """
    r = np.asarray(scale, dtype=np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ExportError(f"{what}: scales must be finite and >= 0, got {r.min()}..{r.max()}")
    muls = np.zeros(r.shape, np.int64)
    shifts = np.zeros(r.shape, np.int64)
    worst = 0.0
    for index, value in np.ndenumerate(r):
        if value == 0.0:
            continue
        f, e = math.frexp(float(value))
        mul = round(f * (1 << mul_bits))
        shift = mul_bits - e
        if mul == 1 << mul_bits:
            mul //= 2
            shift -= 1
        if not min_shift <= shift <= max_shift:
            raise ExportError(
                f"{what}: scale {value:.6g} needs shift {shift} with a {mul_bits}-bit multiplier, "
                f"outside the supported range [{min_shift}, {max_shift}]"
            )
        muls[index], shifts[index] = mul, shift
        worst = max(worst, abs(mul / 2.0**shift - value) / value)
    return Dyadic(muls, shifts, worst)
