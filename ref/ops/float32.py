"""IEEE float32 arithmetic replayed exactly on integers, for ops that reproduce a float kernel.

refsim computes with integers only. Where a peer runtime (onnxruntime) computes a step in
float32, the op that reproduces it holds each float32 value as an exact integer pair
`(m, e)` with value `m * 2^e` and `0 <= m < 2^24`, and performs each float32 operation as
IEEE 754 does: the exact result, rounded once to 24 significant bits, ties to even. Signs
are kept apart by the callers (every value here is >= 0). Values stay in float32's normal
range in the uses refsim has; a value below 2^-126 keeps 24 bits here where float32 would
keep fewer, which the callers document where it could matter.

These are NumPy functions on int64 arrays (element by element, broadcasting), readable
before fast: each is a few lines of integer arithmetic.
"""

from __future__ import annotations

import numpy as np

from .requant_f32 import MANTISSA_BITS, _np_bit_length
from .rounding import HALF_EVEN, _np_round_shift

TOP = 1 << MANTISSA_BITS  # 2^24: a normalised mantissa lies in [2^23, 2^24)


def normalise(m, e):
    """(m, e) with m in [2^23, 2^24) (or 0, exponent 0), the same value; m must fit 24 bits
    after rounding (callers round first)."""
    m, e = np.broadcast_arrays(np.asarray(m, np.int64), np.asarray(e, np.int64))
    bits = _np_bit_length(m)
    left = np.where(m == 0, 0, MANTISSA_BITS - bits)
    m = np.where(left >= 0, np.left_shift(m, np.maximum(left, 0)), np.right_shift(m, np.maximum(-left, 0)))
    return m, np.where(m == 0, 0, e - left)


def round24(m, e):
    """m * 2^e rounded to 24 significant bits, ties to even (m >= 0, any int64 size)."""
    m, e = np.broadcast_arrays(np.asarray(m, np.int64), np.asarray(e, np.int64))
    extra = np.maximum(_np_bit_length(m) - MANTISSA_BITS, 0)
    return normalise(_np_round_shift(m, extra, HALF_EVEN), e + extra)


def from_float32(values) -> tuple[np.ndarray, np.ndarray]:
    """The exact (m, e) pair of each non-negative float32 value (subnormals included)."""
    v = np.asarray(values, np.float32).astype(np.float64)
    if np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError("from_float32 takes finite values >= 0")
    fraction, exponent = np.frexp(v)
    m = np.round(fraction * TOP).astype(np.int64)
    return normalise(m, np.where(m == 0, 0, exponent.astype(np.int64) - MANTISSA_BITS))


def to_float64(m, e) -> np.ndarray:
    """The value m * 2^e as float64 (exact for 24-bit mantissas); for tests and messages."""
    return np.ldexp(np.asarray(m, np.float64), np.asarray(e, np.int64).astype(np.int32))


def from_int(k) -> tuple[np.ndarray, np.ndarray]:
    """float32(k) for integers k >= 0 (rounded as a C cast rounds: to nearest, ties to even)."""
    return round24(k, 0)


def add(a, b):
    """float32(a + b) for a, b >= 0 given as (m, e) pairs."""
    (ma, ea), (mb, eb) = normalise(*a), normalise(*b)
    a_larger = (ma != 0) & ((mb == 0) | (ea >= eb))
    big_m, big_e = np.where(a_larger, ma, mb), np.where(a_larger, ea, eb)
    small_m, small_e = np.where(a_larger, mb, ma), np.where(a_larger, eb, ea)
    gap = np.where(small_m == 0, 0, big_e - small_e)
    # A smaller addend 27 or more binades down is below a quarter ulp of the larger one:
    # the rounded sum is the larger one (and no tie is possible).
    near = gap <= 26
    m = np.where(near, np.left_shift(big_m, np.clip(gap, 0, 26)) + np.where(near, small_m, 0), big_m)
    e = np.where(near, np.where(small_m == 0, big_e, small_e), big_e)
    return round24(m, e)


def mul(a, b):
    """float32(a * b) for a, b >= 0."""
    (ma, ea), (mb, eb) = normalise(*a), normalise(*b)
    return round24(ma * mb, ea + eb)


def div(a, b):
    """float32(a / b) for a >= 0, b > 0, correctly rounded: a quotient of 26 or 27 bits
    and a sticky bit for a non-zero remainder decide the rounding."""
    (ma, ea), (mb, eb) = normalise(*a), normalise(*b)
    if np.any(mb == 0):
        raise ZeroDivisionError("float32 division by zero")
    q, r = np.divmod(np.left_shift(ma, 26), mb)
    m = np.left_shift(q, 1) | (r != 0).astype(np.int64)
    m, e = round24(m, ea - eb - 27)
    return np.where(ma == 0, 0, m), np.where(ma == 0, 0, e)


def rint(a, limit: int = 1 << 40) -> np.ndarray:
    """round_half_even(a) as int64, saturated at +-limit (a >= 0); C's nearbyintf."""
    m, e = np.broadcast_arrays(*(np.asarray(v, np.int64) for v in a))
    big = (e > 0) & (e + _np_bit_length(m) > limit.bit_length())
    up = np.where(big, limit, np.left_shift(m, np.clip(e, 0, 62)))
    down = _np_round_shift(m, np.maximum(-e, 0), HALF_EVEN)
    return np.minimum(np.where(e >= 0, up, down), limit)


def add_signed(a, b):
    """float32(a + b) for signed values: pairs (m, e) whose mantissa m carries the sign
    (|m| < 2^24). The exact sum is formed on the smaller operand's exponent when the two lie
    within 26 binades (|sum| < 2^51, inside int64) and rounded once; farther apart, the
    smaller is below an eighth of the larger's ulp (a quarter of the ulp below it when the
    larger is a power of two), so the rounded sum is the larger one. A zero sum is 0."""
    (ma, ea), (mb, eb) = (np.broadcast_arrays(*(np.asarray(v, np.int64) for v in p)) for p in (a, b))
    (na, ea), (nb, eb) = normalise(np.abs(ma), ea), normalise(np.abs(mb), eb)
    sa, sb = np.where(ma < 0, -1, 1), np.where(mb < 0, -1, 1)
    a_larger = (na != 0) & ((nb == 0) | (ea > eb) | ((ea == eb) & (na >= nb)))
    big_m, big_e = np.where(a_larger, sa * na, sb * nb), np.where(a_larger, ea, eb)
    small_m, small_e = np.where(a_larger, sb * nb, sa * na), np.where(a_larger, eb, ea)
    gap = np.where(small_m == 0, 0, big_e - small_e)
    near = gap <= 26
    total = np.where(near, np.left_shift(big_m, np.clip(gap, 0, 26)) + np.where(near, small_m, 0), big_m)
    m, e = round24(np.abs(total), np.where(near & (small_m != 0), small_e, big_e))
    return np.where(total < 0, -m, m), e
