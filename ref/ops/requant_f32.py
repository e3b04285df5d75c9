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
from ..errors import GraphError, OpError
from ..jit import njit, vectorize
from .registry import Int, TypeName, op
from .requant import along_axis, output_bounds
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


def _infer(ins, attrs):
    x, mul, exp = ins[0], ins[1], ins[2]
    for name, t in (("mul", mul), ("exp", exp)):
        if t.is_const and t.data.size:
            low, high = int(t.data.min()), int(t.data.max())
            limits = (0, (1 << MANTISSA_BITS) - 1) if name == "mul" else (-MAX_EXP, MAX_EXP)
            if low < limits[0] or high > limits[1]:
                raise GraphError(f"{name} values must lie in [{limits[0]}, {limits[1]}], got [{low}, {high}]")
    rank = len(x.shape)
    axis = attrs["axis"]
    if not -rank <= axis < max(rank, 1):
        raise GraphError(f"axis {axis} is out of range for a rank-{rank} input")
    for name, t in (("mul", mul), ("exp", exp), ("offset", ins[3] if len(ins) > 3 else None)):
        if t is None:
            continue
        if len(t.shape) > 1:
            raise GraphError(f"{name} must be a scalar or a 1-D per-channel vector")
        if len(t.shape) == 1 and rank and isinstance(t.shape[0], int) and t.shape[0] != 1:
            channels = x.shape[axis]
            if isinstance(channels, int) and channels != t.shape[0]:
                raise GraphError(f"{name} has {t.shape[0]} channels, input axis {axis} has {channels}")
    output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], "RequantF32")
    return [(int_type(attrs["dtype"]), x.shape)]


@op(
    "RequantF32",
    inputs=["x", "mul", "exp", "offset?"],
    attrs=dict(axis=Int(), dtype=TypeName(), lo=Int(optional=True), hi=Int(optional=True)),
    infer=_infer,
)
def RequantF32(x, mul, exp, offset=None, *, axis=-1, dtype="int8", lo=None, hi=None):
    """y = clip(round_half_even(f32(f32(x) * mul * 2^exp)) + offset, lo, hi): onnxruntime's float32 requantization."""
    what = "RequantF32"
    x = np.asarray(x)
    ndim = max(x.ndim, 1)
    if not -ndim <= axis < ndim:
        raise OpError(f"{what}: axis {axis} is out of range for a rank-{x.ndim} input")
    axis %= ndim
    mul_b, exp_b, offset_b = (
        along_axis(p, x.ndim, axis, name, what) for p, name in ((mul, "mul"), (exp, "exp"), (offset, "offset"))
    )
    if mul_b.size and (int(mul_b.min()) < 0 or int(mul_b.max()) >= 1 << MANTISSA_BITS):
        raise OpError(f"{what}: mul must lie in [0, 2^{MANTISSA_BITS})")
    if exp_b.size and (int(exp_b.min()) < -MAX_EXP or int(exp_b.max()) > MAX_EXP):
        raise OpError(f"{what}: exp must lie in [-{MAX_EXP}, {MAX_EXP}]")
    lo, hi = output_bounds(dtype, lo, hi, what)
    if backend.use_numba():
        y = np.asarray(_requant_f32_ufunc(x, mul_b, exp_b, offset_b, lo, hi), dtype=np.int64)
    else:
        y = _np_requant_f32(x, mul_b, exp_b, offset_b, lo, hi)
    return y.astype(int_type(dtype).storage)
