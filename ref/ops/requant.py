"""Requantization: scale an accumulator down to a narrow type with a dyadic multiplier."""

from __future__ import annotations

import numpy as np

from ..dtypes import TYPES, IntType, int_type
from ..errors import GraphError, OpError
from .elementwise import broadcast_or_fail
from .registry import Bool, Int, OneOf, TypeName, op
from .rounding import (
    DOUBLE,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    REQUANT_ROUNDINGS,
    check_product_fits,
    mode_code,
    requantize,
    requantize_last_axis,
)


def output_bounds(dtype: str | IntType, lo: int | None, hi: int | None, what: str) -> tuple[int, int]:
    """The clip range: the output type's range, narrowed by explicit lo/hi if given."""
    t = int_type(dtype)
    lo = t.lo if lo is None else lo
    hi = t.hi if hi is None else hi
    if not (t.lo <= lo <= hi <= t.hi):
        raise OpError(f"{what}: clip range [{lo}, {hi}] must lie within {t.name} [{t.lo}, {t.hi}]")
    return lo, hi


def along_axis(param, shape, axis: int, name: str, what: str):
    """View a scalar or per-channel vector so that it broadcasts along `axis` of a tensor
    of `shape`; a vector must have one entry per channel. (Given only the tensor's rank
    instead of its shape, the channel count is left to broadcasting.)"""
    if param is None:
        return np.int64(0)
    p = np.asarray(param)
    if p.ndim == 0 or p.size == 1:
        return p.reshape(()).astype(np.int64)
    if p.ndim != 1:
        raise OpError(f"{what}: {name} must be a scalar or a 1-D per-channel vector, got shape {p.shape}")
    ndim = shape if isinstance(shape, (int, np.integer)) else len(shape)
    channels = p.size if isinstance(shape, (int, np.integer)) else (shape[axis] if ndim else 1)
    if p.size != channels or ndim == 0:
        raise OpError(f"{what}: {name} has {p.size} entries, the input has {channels} channels along axis {axis}")
    view = [1] * ndim
    view[axis] = p.size
    return p.astype(np.int64).reshape(view)


def _infer_requant(ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    axis = attrs["axis"]
    if not -rank <= axis < max(rank, 1):
        raise GraphError(f"axis {axis} is out of range for a rank-{rank} input")
    for name, t in zip(("mul", "shift", "bias", "offset"), ins[1:]):
        if t is None:
            continue
        if len(t.shape) > 1:
            raise GraphError(f"{name} must be a scalar or a 1-D per-channel vector")
        if len(t.shape) == 1 and t.shape[0] not in (1, None) and rank:
            channels = x.shape[axis]
            if isinstance(channels, int) and channels != t.shape[0]:
                raise GraphError(f"{name} has {t.shape[0]} channels, input axis {axis} has {channels}")
        if name == "shift" and t.is_const and t.data.size and int(t.data.min()) < 0:
            raise GraphError("shift must be >= 0")
    if attrs["rounding"] == "double" and len(ins) > 3 and ins[3] is not None:
        raise GraphError("rounding 'double' (TFLite) takes no bias; add it to the accumulator")
    try:
        output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], "clip range")
    except OpError as e:
        raise GraphError(str(e)) from None
    return [(int_type(attrs["dtype"]), x.shape)]


@op(
    "Requant",
    inputs=["x", "mul", "shift", "bias?", "offset?"],
    attrs=dict(
        axis=Int(),
        rounding=OneOf(REQUANT_ROUNDINGS),
        dtype=TypeName(),
        lo=Int(optional=True),
        hi=Int(optional=True),
    ),
    infer=_infer_requant,
)
def Requant(x, mul, shift, bias=None, offset=None, *, axis=-1, rounding="half_up", dtype="int8", lo=None, hi=None):
    """y = clip(round_shift(x*mul + bias, shift, rounding) + offset, lo, hi), per tensor or per channel."""
    what = "Requant"
    x = np.asarray(x)
    ndim = max(x.ndim, 1)
    if not -ndim <= axis < ndim:
        raise OpError(f"{what}: axis {axis} is out of range for a rank-{x.ndim} input")
    axis %= ndim
    mul_b, shift_b, bias_b, offset_b = (
        along_axis(p, x.shape, axis, name, what)
        for p, name in ((mul, "mul"), (shift, "shift"), (bias, "bias"), (offset, "offset"))
    )
    if np.any(shift_b < 0):
        raise OpError(f"{what}: shift must be >= 0")
    lo, hi = output_bounds(dtype, lo, hi, what)
    if mode_code(rounding) == DOUBLE:
        _check_double_operands(x, mul_b, shift_b, bias, offset_b)
    else:
        check_product_fits(x, mul_b, bias_b, what, offset=offset_b)
    storage = int_type(dtype).storage
    if axis == x.ndim - 1 or all(p.ndim == 0 for p in (mul_b, shift_b, bias_b, offset_b)):
        return requantize_last_axis(x, mul_b, bias_b, shift_b, offset_b, lo, hi, rounding, storage)
    return requantize(x, mul_b, bias_b, shift_b, offset_b, lo, hi, rounding).astype(storage)


def _check_double_operands(x, mul, shift, bias, offset) -> None:
    """TFLite computes `x << left` and the multiplier in int32: refuse what would overflow."""
    if bias is not None:
        raise OpError("Requant: rounding 'double' (TFLite) takes no bias; add it to the accumulator")
    if mul.size and (int(mul.min()) < INT32_MIN or int(mul.max()) > INT32_MAX):
        raise OpError("Requant: rounding 'double' needs int32 multipliers")
    if not x.size:
        return
    lo, hi = int(x.min()), int(x.max())
    if lo < INT32_MIN or hi > INT32_MAX:
        raise OpError(f"Requant: rounding 'double' needs int32 inputs, and x spans [{lo}, {hi}]")
    # Each element with its own channel's shift: |x| <= 2^31 and left <= 31 fit int64.
    shifted = x.astype(np.int64) << np.maximum(31 - shift, 0)
    low, high = int(shifted.min()), int(shifted.max())
    if low < INT32_MIN or high > INT32_MAX:
        raise OpError(f"Requant: rounding 'double' shifts x left in int32, and x << left spans [{low}, {high}]")
    if offset.size and max(abs(int(offset.min())), abs(int(offset.max()))) > INT64_MAX - (1 << 31):
        raise OpError("Requant: offset is too large for int64")


def levels_type(n_levels: int, signed: bool) -> IntType:
    """The narrowest IR type holding quantlib's n_levels range."""
    lo, hi = (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)
    for name in ("int2", "int4", "int8", "int16", "int32") if signed else ("uint2", "uint4", "uint8", "uint16", "uint32"):
        if TYPES[name].contains(lo, hi):
            return TYPES[name]
    raise OpError(f"n_levels {n_levels} does not fit 32 bits")


def _log2_exact(div: int, what: str) -> int:
    if div < 1 or div & (div - 1):
        raise OpError(f"{what}: div must be a positive power of two, got {div}")
    return div.bit_length() - 1


def _infer_requant_shift(ins, attrs):
    try:
        _log2_exact(attrs["div"], "RequantShift")
        t = levels_type(attrs["n_levels"], attrs["signed"])
    except OpError as e:
        raise GraphError(str(e)) from None
    from .registry import broadcast_shapes

    shapes = [t_.shape for t_ in ins if t_ is not None]
    return [(t, broadcast_shapes(*shapes))]


@op(
    "RequantShift",
    inputs=["x", "mul", "add"],
    attrs=dict(div=Int(min=1), n_levels=Int(min=2, max=1 << 32), signed=Bool()),
    infer=_infer_requant_shift,
)
def RequantShift(x, mul, add, *, div, n_levels=256, signed=True):
    """quantlib/Deeploy: y = clip(floor((x*mul + add)/div + 0.5)) to n_levels (numpy broadcasting)."""
    what = "RequantShift"
    shift = _log2_exact(div, what)
    t = levels_type(n_levels, signed)
    lo, hi = (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)
    broadcast_or_fail(what, x, mul, add)
    check_product_fits(x, mul, add, what)
    y = requantize(x, mul, add, shift, 0, lo, hi, "half_up")
    return y.astype(t.storage)
