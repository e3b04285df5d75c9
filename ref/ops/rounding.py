"""Rounding right shifts and dyadic requantization: the arithmetic every op shares.

`round_shift(x, s, mode)` divides int64 `x` by 2^s (s >= 0) and rounds as `mode` says. It
is exact for every int64 `x` and every s >= 0, including s >= 64, without ever forming
2^s or `x + 2^(s-1)` (which overflow): with q = x >> s (floor), the rounding only needs
bit s-1 of x (is the remainder at least one half?) and whether the bits below it are zero
(is it exactly one half?). Bits above 63 are copies of the sign bit, so shift amounts are
clamped to 63 where the hardware shift would be undefined.

Each kernel exists twice, in Numba and in NumPy, with identical results.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..errors import OpError
from ..jit import njit, vectorize

ROUNDINGS = ("floor", "half_up", "half_away", "half_even", "trunc")
# TFLite/CMSIS-NN double rounding is a rounding mode of Requant, not of a plain shift.
REQUANT_ROUNDINGS = ROUNDINGS + ("double",)
_CODE = {name: i for i, name in enumerate(REQUANT_ROUNDINGS)}
FLOOR, HALF_UP, HALF_AWAY, HALF_EVEN, TRUNC, DOUBLE = range(6)

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MAX = (1 << 63) - 1


def mode_code(mode: str) -> int:
    try:
        return _CODE[mode]
    except KeyError:
        raise OpError(f"unknown rounding {mode!r}; choose from {', '.join(REQUANT_ROUNDINGS)}") from None


# --- scalar kernels (Numba) -----------------------------------------------------------


@njit(cache=True, inline="always")
def _low_bits_nonzero(x, n):
    """Whether bits 0..n-1 of x are not all zero (n >= 0; n >= 64 means all bits)."""
    if n <= 0:
        return False
    if n >= 64:
        return x != 0
    mask = np.int64(-1) ^ (np.int64(-1) << np.int64(n))
    return (x & mask) != 0


@njit(cache=True, inline="always")
def round_shift_scalar(x, s, mode):
    if s <= 0:
        return x
    q = x >> min(s, 63)
    if mode == FLOOR:
        return q
    half = (x >> min(s - 1, 63)) & 1
    if mode == HALF_UP:
        return q + half
    if mode == TRUNC:
        return q + (1 if (x < 0 and _low_bits_nonzero(x, s)) else 0)
    if half == 0:
        return q
    above_half = _low_bits_nonzero(x, s - 1)
    if mode == HALF_AWAY:
        return q + (1 if (above_half or x >= 0) else 0)
    # HALF_EVEN
    return q + (1 if (above_half or (q & 1) == 1) else 0)


@njit(cache=True, inline="always")
def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp SRDHM on int32 values: round_half_up(a*b / 2^31), saturating INT32_MIN^2."""
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    return (a * b + (1 << 30)) >> 31


@njit(cache=True, inline="always")
def requant_scalar(x, mul, bias, shift, offset, lo, hi, mode):
    if mode == DOUBLE:
        left = max(31 - shift, 0)
        right = max(shift - 31, 0)
        v = round_shift_scalar(saturating_rounding_doubling_high_mul(x << left, mul), right, HALF_AWAY)
    else:
        v = round_shift_scalar(x * mul + bias, shift, mode)
    v += offset
    return min(max(v, lo), hi)


@vectorize(["int64(int64, int64, int64)"], cache=True)
def _round_shift_ufunc(x, s, mode):
    return round_shift_scalar(x, s, mode)


@vectorize(["int64(int64, int64, int64, int64, int64, int64, int64, int64)"], cache=True)
def _requant_ufunc(x, mul, bias, shift, offset, lo, hi, mode):
    return requant_scalar(x, mul, bias, shift, offset, lo, hi, mode)


# --- NumPy twins ----------------------------------------------------------------------


def _np_low_bits_nonzero(x, n):
    n = np.asarray(n, dtype=np.int64)
    clamped = np.clip(n, 0, 63)
    mask = np.int64(-1) ^ np.left_shift(np.int64(-1), clamped)
    return np.where(n >= 64, x != 0, (x & mask) != 0)


def _np_round_shift(x, s, mode: int):
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    q = np.right_shift(x, np.minimum(s, 63))
    if mode == FLOOR:
        result = q
    else:
        half = np.right_shift(x, np.clip(s - 1, 0, 63)) & 1
        if mode == HALF_UP:
            result = q + half
        elif mode == TRUNC:
            result = q + ((x < 0) & _np_low_bits_nonzero(x, s))
        else:
            above = _np_low_bits_nonzero(x, s - 1)
            tie_breaker = (x >= 0) if mode == HALF_AWAY else ((q & 1) == 1)
            result = q + ((half == 1) & (above | tie_breaker))
    return np.where(s <= 0, x, result).astype(np.int64)


def _np_requant(x, mul, bias, shift, offset, lo, hi, mode: int):
    x, mul, bias, shift = (np.asarray(a, dtype=np.int64) for a in (x, mul, bias, shift))
    if mode == DOUBLE:
        left = np.maximum(31 - shift, 0)
        right = np.maximum(shift - 31, 0)
        a = np.left_shift(x, left)
        both_min = (a == INT32_MIN) & (mul == INT32_MIN)
        high = np.where(both_min, INT32_MAX, np.right_shift(a * mul + (1 << 30), 31))
        v = _np_round_shift(high, right, HALF_AWAY)
    else:
        v = _np_round_shift(x * mul + bias, shift, mode)
    return np.clip(v + np.asarray(offset, dtype=np.int64), lo, hi)


# --- public entry points ---------------------------------------------------------------


def round_shift(x, s, mode: str = "half_up") -> np.ndarray:
    """x / 2^s rounded as `mode` says; x int64-compatible, s >= 0 (broadcasts)."""
    code = mode_code(mode)
    if code == DOUBLE:
        raise OpError("'double' rounding applies to Requant, not to a plain shift")
    if np.any(np.asarray(s) < 0):
        raise OpError("shift amounts must be >= 0")
    if backend.use_numba():
        return np.asarray(_round_shift_ufunc(x, s, code), dtype=np.int64)
    return _np_round_shift(x, s, code)


def requantize(x, mul, bias, shift, offset, lo: int, hi: int, mode: str) -> np.ndarray:
    """clip(round_shift(x*mul + bias, shift, mode) + offset, lo, hi) as int64.

    For mode 'double' (TFLite/CMSIS-NN): clip(RDBPOT(SRDHM(x << max(31-shift, 0), mul),
    max(shift-31, 0)) + offset, lo, hi), which needs int32 `x << left` and `mul`.
    Arguments broadcast against each other; the caller has checked that nothing
    overflows int64 (see `check_product_fits`).
    """
    code = mode_code(mode)
    if backend.use_numba():
        return np.asarray(_requant_ufunc(x, mul, bias, shift, offset, lo, hi, code), dtype=np.int64)
    return _np_requant(x, mul, bias, shift, offset, lo, hi, code)


@njit(cache=True)
def _requant_last_axis(x, mul, bias, shift, offset, lo, hi, mode, out):
    """out[i, j] = requant_scalar(x[i, j]) with channel j's parameters (int64, length C)."""
    rows, cols = x.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = requant_scalar(np.int64(x[i, j]), mul[j], bias[j], shift[j], offset[j], lo, hi, mode)


def requantize_last_axis(x, mul, bias, shift, offset, lo: int, hi: int, mode: str, storage) -> np.ndarray:
    """`requantize` for parameters that are scalars or vectors along x's last axis,
    written straight into the output's storage dtype in one pass (the Numba backend's
    path; the caller has checked that nothing overflows int64). The planned, vectorized
    kernel for constant parameters is `refsim.kernels.requant`."""
    code = mode_code(mode)
    x = np.asarray(x)
    if not backend.use_numba() or x.ndim == 0:
        return _np_requant(x, mul, bias, shift, offset, lo, hi, code).astype(storage)
    if x.size == 0:
        return np.empty(x.shape, storage)
    x = np.ascontiguousarray(x, dtype=np.int64)  # one compiled signature for every input type
    channels = x.shape[-1]
    mul, bias, shift, offset = (
        np.ascontiguousarray(np.broadcast_to(np.asarray(p, np.int64).reshape(-1), channels))
        for p in (mul, bias, shift, offset)
    )
    flat = x.reshape(-1, channels)
    out = np.empty(flat.shape, np.int64)
    _requant_last_axis(flat, mul, bias, shift, offset, int(lo), int(hi), code, out)
    return out.astype(storage).reshape(x.shape)


def _dtype_bound(a: np.ndarray) -> int:
    info = np.iinfo(a.dtype)
    return max(-int(info.min), int(info.max))


def _value_bound(a: np.ndarray) -> int:
    return max(abs(int(a.min())), abs(int(a.max()))) if a.size else 0


def check_product_fits(x, mul, bias, what: str, offset=None) -> None:
    """Raise unless max|x|*max|mul| + max|bias| + max|offset| stays below 2^63.

    That bound keeps x*mul + bias, and the rounded result plus offset, within int64 for
    every element. It is decided from the dtypes when they are narrow enough (no pass over
    the data), and from the actual values otherwise.
    """
    arrays = [np.asarray(a) for a in (x, mul, bias, offset) if a is not None]
    # Parameters are small (scalars or one per channel): their values cost nothing to read.
    # x is large: its dtype decides unless that bound is too loose.
    params = [_value_bound(a) if a.size <= 4096 else _dtype_bound(a) for a in arrays[1:]]
    if _dtype_bound(arrays[0]) * params[0] + sum(params[1:]) <= INT64_MAX:
        return
    bounds = [_value_bound(a) for a in arrays]
    exact = bounds[0] * bounds[1] + sum(bounds[2:])
    if exact > INT64_MAX:
        raise OpError(f"{what}: |x*mul + bias| + |offset| can reach {exact}, beyond int64")


def round_div(num, den, mode: str) -> np.ndarray:
    """num / den (den > 0) rounded as `mode` says, exact for |num| < 2^62.

    With q = floor(num/den) and r = num - q*den in [0, den): the remainder decides, as
    2r compared with den, exactly as `round_shift` uses the bits below the shift.
    """
    num = np.asarray(num, dtype=np.int64)
    den = np.asarray(den, dtype=np.int64)
    if np.any(den <= 0):
        raise OpError("division by a non-positive integer")
    q = np.floor_divide(num, den)
    r = num - q * den
    if mode == "floor":
        return q
    if mode == "trunc":
        return q + ((num < 0) & (r != 0))
    twice = 2 * r
    if mode == "half_up":
        return q + (twice >= den)
    if mode == "half_away":
        return q + ((twice > den) | ((twice == den) & (num >= 0)))
    if mode == "half_even":
        return q + ((twice > den) | ((twice == den) & ((q & 1) == 1)))
    raise OpError(f"unknown rounding {mode!r}; choose from {', '.join(ROUNDINGS)}")
