"""RequantF32: onnxruntime's float32 requantization, reproduced exactly with integers.

onnxruntime requantizes an integer accumulator as `round_half_even(float32(acc) * scale)`
with `scale` a float32 and every step rounded to float32 (MLAS's requantize output
processor behind QLinearMatMul, QLinearConv and fused QDQ MatMul/Conv). refsim must not
compute with floats at run time, so the importer hands over the float32 scale as the exact
integer pair (mul, exp) with scale = mul * 2^exp, mul < 2^24, and this op replays each
float32 rounding on integers:

    f32(v)  = v rounded to 24 significant bits, ties to even
    y       = clip(round_half_even(f32(f32(x) * mul * 2^exp)) + offset, lo, hi)

Every intermediate is an integer mantissa times a power of two: f32(x) has a mantissa below
2^24 and the exact product of two such mantissas stays below 2^48, so int64 holds it all.
Values past float32's range (2^128) become infinite in float32 and are clipped here too;
results below float32's normal range round to zero either way.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import int_type
from ..jit import njit, vectorize
from .registry import Int, TypeName, op
from .requant_float import scaled_requant_infer, scaled_requant_operands
from .rounding import HALF_EVEN, _np_round_shift, round_shift_scalar

MANTISSA_BITS = 24
MAX_EXP = 300  # float32 scales lie within 2^-149 .. 2^128; anything beyond is refused
# Once |result| >= 2^62 every clip range has been passed; larger shifts would overflow.
_HUGE_BITS = 62


@njit(cache=True, inline="always")
def _bit_length(v):
    n = 0
    if v >= np.int64(1) << np.int64(32):
        v >>= np.int64(32)
        n += 32
    if v >= 1 << 16:
        v >>= 16
        n += 16
    if v >= 1 << 8:
        v >>= 8
        n += 8
    while v > 0:
        v >>= 1
        n += 1
    return n


@njit(cache=True, inline="always")
def _to_f32(m, e):
    """(m, e) with m * 2^e rounded to MANTISSA_BITS significant bits (m >= 0)."""
    extra = _bit_length(m) - MANTISSA_BITS
    if extra > 0:
        return round_shift_scalar(m, extra, HALF_EVEN), e + extra
    return m, e


@njit(cache=True, inline="always")
def requant_f32_scalar(x, mul, exp, offset, lo, hi):
    if x == 0 or mul == 0:
        magnitude = np.int64(0)
    else:
        if x == np.iinfo(np.int64).min:  # |x| = 2^63: a float32 power of two
            a, ea = np.int64(1) << np.int64(23), np.int64(40)
        else:
            a, ea = _to_f32(abs(x), np.int64(0))
        p, ep = _to_f32(a * mul, ea + exp)
        if ep >= 0:
            if ep + _bit_length(p) > _HUGE_BITS:
                magnitude = np.int64(1) << np.int64(_HUGE_BITS)
            else:
                magnitude = p << ep
        else:
            magnitude = round_shift_scalar(p, -ep, HALF_EVEN)
        if x < 0:
            magnitude = -magnitude
    # Clip before adding the offset, as onnxruntime does, so nothing can overflow.
    return min(max(magnitude, lo - offset), hi - offset) + offset


@vectorize(["int64(int64, int64, int64, int64, int64, int64)"], cache=True)
def _requant_f32_ufunc(x, mul, exp, offset, lo, hi):
    return requant_f32_scalar(x, mul, exp, offset, lo, hi)


# --- NumPy twin ------------------------------------------------------------------------


def _np_bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative int64 values (float64's exponent, corrected where the
    conversion rounded up to the next power of two)."""
    e = np.frexp(v.astype(np.float64))[1].astype(np.int64)
    rounded_up = (e > 0) & (np.right_shift(v, np.clip(e - 1, 0, 63)) == 0)
    return e - rounded_up


def _np_to_f32(m, e):
    extra = np.maximum(_np_bit_length(m) - MANTISSA_BITS, 0)
    return _np_round_shift(m, extra, HALF_EVEN), e + extra


def _np_requant_f32(x, mul, exp, offset, lo, hi):
    x, mul, exp, offset = np.broadcast_arrays(*(np.asarray(a, dtype=np.int64) for a in (x, mul, exp, offset)))
    int64_min = x == np.iinfo(np.int64).min
    a, ea = _np_to_f32(np.abs(np.where(int64_min, 0, x)), np.zeros_like(x))
    a = np.where(int64_min, 1 << 23, a)
    ea = np.where(int64_min, 40, ea)
    p, ep = _np_to_f32(a * mul, ea + exp)
    huge = (ep >= 0) & (ep + _np_bit_length(p) > _HUGE_BITS)
    up = np.where(huge, np.int64(1) << _HUGE_BITS, np.left_shift(p, np.clip(ep, 0, 62)))
    down = _np_round_shift(p, np.maximum(-ep, 0), HALF_EVEN)
    magnitude = np.where(ep >= 0, up, down)
    magnitude = np.where((x == 0) | (mul == 0), 0, magnitude)
    magnitude = np.where(x < 0, -magnitude, magnitude)
    return np.clip(magnitude, lo - offset, hi - offset) + offset


# --- the op ----------------------------------------------------------------------------


_infer = scaled_requant_infer("RequantF32", MANTISSA_BITS, MAX_EXP)


@op(
    "RequantF32",
    inputs=["x", "mul", "exp", "offset?"],
    attrs=dict(axis=Int(), dtype=TypeName(), lo=Int(optional=True), hi=Int(optional=True)),
    infer=_infer,
)
def RequantF32(x, mul, exp, offset=None, *, axis=-1, dtype="int8", lo=None, hi=None):
    """y = clip(round_half_even(f32(f32(x) * mul * 2^exp)) + offset, lo, hi): onnxruntime's float32 requantization."""
    what = "RequantF32"
    x, mul_b, exp_b, offset_b, lo, hi = scaled_requant_operands(
        what, x, mul, exp, offset, axis, dtype, lo, hi, mantissa_bits=MANTISSA_BITS, max_exp=MAX_EXP
    )
    if backend.use_numba():
        y = np.asarray(_requant_f32_ufunc(x, mul_b, exp_b, offset_b, lo, hi), dtype=np.int64)
    else:
        y = _np_requant_f32(x, mul_b, exp_b, offset_b, lo, hi)
    return y.astype(int_type(dtype).storage)
