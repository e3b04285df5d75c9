"""gemmlowp fixed-point arithmetic on int32 raw values, as TFLite's int8 softmax uses it.

`FixedPoint<int32, m>` holds a real value r as the raw integer r * 2^(31 - m) (Qm.(31-m)).
The functions here follow gemmlowp's `fixedpoint.h` step by step on those raw values:

- multiplying two fixed-point values is `SRDHM(a, b) = (a*b + 2^30) >> 31` (the rounding
  is half up; -1 * -1 saturates), and the integer bits of the result add up;
- `Rescale` to fewer integer bits is a saturating left shift, to more integer bits the
  half-away-from-zero `RoundingDivideByPOT`;
- additions are plain int32 additions (`wrap32` keeps what an int32 register keeps).

Each function exists as a Numba scalar kernel and as a NumPy twin on int64 arrays.
"""

from __future__ import annotations

import numpy as np

from ..jit import njit
from .intmath import INT32_MAX, INT32_MIN, np_wrap32, wrap32
from .rounding import HALF_AWAY, _np_round_shift, round_shift_scalar, saturating_rounding_doubling_high_mul

# exp(-1/8) and 1/3 in Q0.31; the barrel shifter's exp(-2^k) for k = -2..4 in Q0.31.
EXP_MINUS_ONE_EIGHTH = 1895147668
ONE_THIRD = 715827883
EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401), (4, 242))
# 48/17 and -32/17 in Q2.29 (the Newton-Raphson start of 1/(1+x)).
FORTY_EIGHT_OVER_17 = 1515870810
NEG_THIRTY_TWO_OVER_17 = -1010580540


# --- Numba scalar kernels ----------------------------------------------------------------


@njit(cache=True, inline="always")
def srdhm(a, b):
    return saturating_rounding_doubling_high_mul(a, b)


@njit(cache=True, inline="always")
def rdbpot(x, exponent):
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    return round_shift_scalar(x, exponent, HALF_AWAY)


@njit(cache=True, inline="always")
def saturating_shl(x, exponent):
    """gemmlowp SaturatingRoundingMultiplyByPOT<exponent> for exponent > 0 on int32."""
    threshold = (1 << (31 - exponent)) - 1
    if x > threshold:
        return INT32_MAX
    if x < -threshold:
        return INT32_MIN
    return x << exponent


@njit(cache=True, inline="always")
def exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    """exp(a) for a in [-1/4, 0), Q0.31 in and out: Taylor series around -1/8."""
    x = a + (1 << 28)
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = rdbpot(x4, 2)
    poly = rdbpot(wrap32(srdhm(wrap32(x4_over_4 + x3), ONE_THIRD) + x2), 1)
    return wrap32(EXP_MINUS_ONE_EIGHTH + srdhm(EXP_MINUS_ONE_EIGHTH, wrap32(x + poly)))


@njit(cache=True, inline="always")
def exp_on_negative_values_q5_26(a):
    """exp(a) for a <= 0 given in Q5.26 (raw int32), result in Q0.31."""
    one_quarter = 1 << 24
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = exp_on_interval_between_negative_one_quarter_and_0_excl(
        saturating_shl(a_mod_quarter_minus_one_quarter, 5)
    )
    remainder = wrap32(a_mod_quarter_minus_one_quarter - a)
    for k in range(len(EXP_BARREL)):
        exponent, multiplier = EXP_BARREL[k]
        if remainder & (1 << (26 + exponent)):
            result = srdhm(result, multiplier)
    if a == 0:
        result = INT32_MAX
    return result


@njit(cache=True, inline="always")
def one_over_one_plus_x_for_x_in_0_1(a):
    """1 / (1 + a) for a in [0, 1), Q0.31 in and out: three Newton-Raphson steps in Q2.29."""
    half_denominator = (a + INT32_MAX + 1) >> 1  # RoundingHalfSum(a, One) for a >= 0
    x = wrap32(FORTY_EIGHT_OVER_17 + srdhm(half_denominator, NEG_THIRTY_TWO_OVER_17))
    for _ in range(3):
        one_minus_half_denominator_times_x = wrap32((1 << 29) - srdhm(half_denominator, x))
        x = wrap32(x + saturating_shl(srdhm(x, one_minus_half_denominator_times_x), 2))
    return saturating_shl(x, 1)


# --- NumPy twins ---------------------------------------------------------------------------


def np_srdhm(a, b):
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    both_min = (a == INT32_MIN) & (b == INT32_MIN)
    return np.where(both_min, INT32_MAX, (a * b + (1 << 30)) >> 31)


def np_rdbpot(x, exponent):
    return _np_round_shift(x, exponent, HALF_AWAY)


def np_saturating_shl(x, exponent: int):
    x = np.asarray(x, np.int64)
    threshold = (1 << (31 - exponent)) - 1
    return np.where(x > threshold, INT32_MAX, np.where(x < -threshold, INT32_MIN, x << exponent))


def np_exp_on_interval_between_negative_one_quarter_and_0_excl(a):
    x = np.asarray(a, np.int64) + (1 << 28)
    x2 = np_srdhm(x, x)
    x3 = np_srdhm(x2, x)
    x4 = np_srdhm(x2, x2)
    x4_over_4 = np_rdbpot(x4, 2)
    poly = np_rdbpot(np_wrap32(np_srdhm(np_wrap32(x4_over_4 + x3), ONE_THIRD) + x2), 1)
    return np_wrap32(EXP_MINUS_ONE_EIGHTH + np_srdhm(EXP_MINUS_ONE_EIGHTH, np_wrap32(x + poly)))


def np_exp_on_negative_values_q5_26(a):
    a = np.asarray(a, np.int64)
    one_quarter = 1 << 24
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = np_exp_on_interval_between_negative_one_quarter_and_0_excl(
        np_saturating_shl(a_mod_quarter_minus_one_quarter, 5)
    )
    remainder = np_wrap32(a_mod_quarter_minus_one_quarter - a)
    for exponent, multiplier in EXP_BARREL:
        bit_set = (remainder & (1 << (26 + exponent))) != 0
        result = np.where(bit_set, np_srdhm(result, multiplier), result)
    return np.where(a == 0, INT32_MAX, result)


def np_one_over_one_plus_x_for_x_in_0_1(a):
    half_denominator = (np.asarray(a, np.int64) + INT32_MAX + 1) >> 1
    x = np_wrap32(FORTY_EIGHT_OVER_17 + np_srdhm(half_denominator, NEG_THIRTY_TWO_OVER_17))
    for _ in range(3):
        one_minus = np_wrap32((1 << 29) - np_srdhm(half_denominator, x))
        x = np_wrap32(x + np_saturating_shl(np_srdhm(x, one_minus), 2))
    return np_saturating_shl(x, 1)
