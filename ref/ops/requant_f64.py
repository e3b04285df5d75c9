"""RequantF64: a requantization through one float64 product, reproduced exactly with integers.

LiteRT's reference FULLY_CONNECTED kernel (int8 and int16) scales its accumulator with
doubles: `round(double(acc) * effective_scale)`, C's `round` (ties away from zero), where
`effective_scale = double(input_scale) * double(filter_scale) / double(output_scale)`.
refsim must not compute with floats at run time, so the importer hands over the double as
the exact pair (mul, exp), effective_scale = mul * 2^exp with 0 <= mul < 2^53, and this op
replays the one float64 rounding on integers:

    f64(v) = v rounded to 53 significant bits, ties to even
    y      = clip(round_half_away(f64(x * mul * 2^exp)) + offset, lo, hi)

`x` must be exactly a double (|x| <= 2^53; accumulators are). The exact product |x| * mul
has up to 106 bits: the NumPy form computes it with Python integers, the Numba kernel with
two int64 limbs (P = H * 2^52 + L). A result beyond int32 (C's cast of it would be undefined)
saturates; the clip then applies.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import int_type
from ..errors import OpError
from ..jit import njit, vectorize
from .registry import Int, TypeName, op
from .requant_float import scaled_requant_infer, scaled_requant_operands

MANTISSA_BITS = 53
MAX_X = 1 << 53
MAX_EXP = 1100  # doubles lie within 2^-1074 .. 2^1024
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# --- the readable form: Python integers --------------------------------------------------


def f64_round_scalar(x: int, mul: int, exp: int) -> int:
    """round_half_away(f64(x * mul * 2^exp)), saturated to int32."""
    p = abs(x) * mul
    if p == 0:
        return 0
    extra = p.bit_length() - MANTISSA_BITS
    if extra > 0:  # f64: keep 53 significant bits, ties to even
        q, r = divmod(p, 1 << extra)
        half = 1 << (extra - 1)
        if r > half or (r == half and q & 1):
            q += 1
        p, exp = q, exp + extra
    if exp >= 0:
        magnitude = p << exp if exp < 64 else 1 << 64
    else:  # round half away from zero at the binary point (on the magnitude: half up)
        magnitude = (p + (1 << (-exp - 1))) >> -exp
    value = magnitude if x >= 0 else -magnitude
    return min(max(value, INT32_MIN), INT32_MAX)


_f64_round_ufunc_py = np.frompyfunc(f64_round_scalar, 3, 1)


def _np_requant_f64(x, mul, exp, offset, lo, hi):
    x, mul, exp, offset = np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in (x, mul, exp, offset)))
    rounded = _f64_round_ufunc_py(x.astype(object), mul.astype(object), exp.astype(object))
    y = np.asarray(rounded, dtype=np.int64).reshape(x.shape) + offset
    return np.clip(y, lo, hi)


# --- the Numba kernel: two int64 limbs ---------------------------------------------------

_M26 = (1 << 26) - 1
_M52 = (1 << 52) - 1


@njit(cache=True, inline="always")
def _bit_length(v):
    n = 0
    while v >= np.int64(1) << np.int64(32):
        v >>= np.int64(32)
        n += 32
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit(cache=True)
def requant_f64_scalar(x, mul, exp, offset, lo, hi):
    a = -x if x < 0 else x
    if a == 0 or mul == 0:
        value = np.int64(0)
    else:
        # a, mul < 2^53 as 27 + 26 bits: P = a * mul = H * 2^52 + L, 0 <= L < 2^52.
        a1, a0 = a >> 26, a & _M26
        m1, m0 = mul >> 26, mul & _M26
        mid = a1 * m0 + a0 * m1  # < 2^54
        low = a0 * m0 + ((mid & _M26) << 26)  # < 2^53
        high = a1 * m1 + (mid >> 26) + (low >> 52)
        low &= _M52
        bits = _bit_length(high) + 52 if high > 0 else _bit_length(low)
        extra = bits - 53
        if extra <= 0:
            p = (high << 52) | low
            e = exp
        else:
            if extra <= 52:
                p = (high << (52 - extra)) | (low >> extra)
                rest = low & ((np.int64(1) << extra) - 1)
                half = np.int64(1) << (extra - 1)
                above = rest > half
                tie = rest == half
            else:  # extra = 53: the kept bits lie in high, the rest spans high's low bit and L
                p = high >> 1
                high_bit = high & 1
                above = high_bit == 1 and low > 0
                tie = high_bit == 1 and low == 0
            if above or (tie and (p & 1) == 1):
                p += 1
            e = exp + extra
        if e >= 0:
            magnitude = p << e if e + _bit_length(p) <= 62 else np.int64(1) << np.int64(62)
        elif -e > 62:
            magnitude = np.int64(0)  # p < 2^54: far below one half
        else:
            magnitude = (p + (np.int64(1) << (-e - 1))) >> (-e)
        value = -magnitude if x < 0 else magnitude
        value = min(max(value, INT32_MIN), INT32_MAX)
    return min(max(value + offset, lo), hi)


@vectorize(["int64(int64, int64, int64, int64, int64, int64)"], cache=True)
def _requant_f64_ufunc(x, mul, exp, offset, lo, hi):
    return requant_f64_scalar(x, mul, exp, offset, lo, hi)


# --- the op ------------------------------------------------------------------------------


_infer = scaled_requant_infer("RequantF64", MANTISSA_BITS, MAX_EXP)


@op(
    "RequantF64",
    inputs=["x", "mul", "exp", "offset?"],
    attrs=dict(axis=Int(), dtype=TypeName(), lo=Int(optional=True), hi=Int(optional=True)),
    infer=_infer,
)
def RequantF64(x, mul, exp, offset=None, *, axis=-1, dtype="int8", lo=None, hi=None):
    """y = clip(round_half_away(f64(x * mul * 2^exp)) + offset, lo, hi): LiteRT's float64 requantization."""
    what = "RequantF64"
    x, mul_b, exp_b, offset_b, lo, hi = scaled_requant_operands(
        what, x, mul, exp, offset, axis, dtype, lo, hi, mantissa_bits=MANTISSA_BITS, max_exp=MAX_EXP
    )
    if x.size and (int(x.min()) < -MAX_X or int(x.max()) > MAX_X):
        raise OpError(f"{what}: x must be exactly a double (|x| <= 2^53), and x spans [{int(x.min())}, {int(x.max())}]")
    if offset_b.size and max(abs(int(offset_b.min())), abs(int(offset_b.max()))) > 1 << 62:
        raise OpError(f"{what}: offset is too large")
    if backend.use_numba():
        y = np.asarray(_requant_f64_ufunc(x, mul_b, exp_b, offset_b, lo, hi), dtype=np.int64)
    else:
        y = _np_requant_f64(x, mul_b, exp_b, offset_b, lo, hi)
    return y.astype(int_type(dtype).storage)

