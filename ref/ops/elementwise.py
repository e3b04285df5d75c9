"""Elementwise integer ops: Add, Sub, Mul, Relu, Clip, Cast, Lut, LutInterp16.

Add, Sub and Mul compute exactly in int64. Without a `dtype` attribute their output type
is the narrowest standard type that holds every result the input types allow (int8 + int8
-> int16), so they can never overflow; with one, the result is fitted into it by the
`overflow` policy. In a graph that type is worked out from the declared input types (an
int4 + int4 sum is int8); called directly on arrays, from the arrays' dtypes.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import IntType, int_type, type_for_range
from ..errors import GraphError, OpError, RefsimError
from ..jit import njit, prange
from .overflow import fit_range
from .registry import OVERFLOW_POLICIES, Int, OneOf, TypeName, broadcast_shapes, op, same_as_input


def _range_of(t) -> tuple[int, int]:
    if isinstance(t, IntType):
        return t.lo, t.hi
    info = np.iinfo(t)
    return int(info.min), int(info.max)


_RESULT_RANGE = {
    "Add": lambda a, b: (a[0] + b[0], a[1] + b[1]),
    "Sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "Mul": lambda a, b: (
        min(x * y for x in a for y in b),
        max(x * y for x in a for y in b),
    ),
}

_COMPUTE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _arith_type(op_name: str, a_type, b_type, dtype: str | None) -> IntType:
    if dtype is not None:
        return int_type(dtype)
    lo, hi = _RESULT_RANGE[op_name](_range_of(a_type), _range_of(b_type))
    try:
        return type_for_range(lo, hi)
    except RefsimError:
        raise OpError(
            f"{op_name}: results span [{lo}, {hi}], beyond int64; give a narrower output dtype"
        ) from None


def broadcast_or_fail(what: str, *arrays) -> None:
    try:
        np.broadcast_shapes(*(np.shape(a) for a in arrays))
    except ValueError:
        raise OpError(f"{what}: shapes {[list(np.shape(a)) for a in arrays]} do not broadcast") from None


def _arith(op_name: str, a, b, dtype, overflow) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    broadcast_or_fail(op_name, a, b)
    out = _arith_type(op_name, a.dtype, b.dtype, dtype)
    lo, hi = _RESULT_RANGE[op_name](_range_of(a.dtype), _range_of(b.dtype))
    if lo < INT64_MIN or hi > INT64_MAX:
        # The dtypes allow int64 overflow; the values may not. Decide from them.
        lo, hi = _RESULT_RANGE[op_name](
            (int(a.min()), int(a.max())) if a.size else (0, 0),
            (int(b.min()), int(b.max())) if b.size else (0, 0),
        )
        if lo < INT64_MIN or hi > INT64_MAX:
            raise OpError(f"{op_name}: results may leave int64 ({lo}..{hi})")
    if backend.use_numba():
        fast = _arith_numba(op_name, a, b, out, overflow)
        if fast is not None:
            return fast
    exact = _COMPUTE[op_name](a.astype(np.int64), b.astype(np.int64))
    return fit_range(exact, out.lo, out.hi, out.bits, overflow, op_name).astype(out.storage)


_OP_CODE = {"Add": 0, "Sub": 1, "Mul": 2}
_POLICY_CODE = {"error": 0, "wrap": 1, "saturate": 2}


@njit(cache=True, parallel=True)
def _arith_rows(a, b, op, lo, hi, bits, policy, out):
    """out[i, j] = fit(a[i, j] op b[i or 0, j]) in one pass (int64 math, checked by the
    caller not to overflow); returns 1 + the first flat index that does not fit under
    the 'error' policy, else 0."""
    rows, cols = a.shape
    b_rows = b.shape[0]
    bad = np.zeros(rows, np.int64)
    mask = (np.int64(1) << bits) - 1 if bits < 64 else np.int64(-1)
    b_step = np.int64(1) if b_rows > 1 else np.int64(0)
    for i in prange(rows):
        bi = np.int64(i) * b_step
        for j in range(cols):
            x = np.int64(a[i, j])
            y = np.int64(b[bi, j])
            v = x + y if op == 0 else (x - y if op == 1 else x * y)
            if v < lo or v > hi:
                if policy == 2:
                    v = lo if v < lo else hi
                elif policy == 1:
                    v = ((v - lo) & mask) + lo
                elif bad[i] == 0:
                    bad[i] = 1 + i * cols + j
            out[i, j] = v
    for i in range(rows):
        if bad[i]:
            return bad[i]
    return 0


def _arith_numba(op_name, a, b, out_type, overflow):
    """The one-pass kernel for same-shape operands and for a second operand that is a
    scalar or runs along the last axis (a bias, a per-channel scale); None otherwise."""
    if a.ndim == 0 or a.size == 0 or b.ndim > a.ndim:
        return None
    if overflow == "wrap" and out_type.hi - out_type.lo + 1 != 1 << out_type.bits:
        return None  # ternary: no full two's complement range to wrap into
    cols = a.shape[-1]
    if b.shape == a.shape:
        b2 = np.ascontiguousarray(b).reshape(-1, cols)
    elif b.size == 1 or (b.shape[-1] == cols and b.size == cols):
        b2 = np.ascontiguousarray(np.broadcast_to(b.reshape(-1), cols)).reshape(1, cols)
    else:
        return None
    # One int64 signature for every pair of operand types: each new combination of dtypes
    # would otherwise cost a Numba compilation of its own (seconds, on a cold cache).
    a2 = np.ascontiguousarray(a, dtype=np.int64).reshape(-1, cols)
    b2 = np.ascontiguousarray(b2, dtype=np.int64)
    result = np.empty(a2.shape, np.int64)
    if _arith_rows(a2, b2, _OP_CODE[op_name], out_type.lo, out_type.hi, out_type.bits,
                   _POLICY_CODE[overflow], result):
        return None  # an overflow under 'error': let the NumPy path name it
    return result.astype(out_type.storage).reshape(a.shape)


def _infer_arith(op_name):
    def infer(ins, attrs):
        a, b = ins
        try:
            out = _arith_type(op_name, a.dtype, b.dtype, attrs["dtype"])
        except OpError as e:
            raise GraphError(str(e)) from None
        return [(out, broadcast_shapes(a.shape, b.shape))]

    return infer


def _prepare_arith(op_name):
    """In a graph, the output type follows the declared input types, not their storage."""

    def prepare(attrs, consts, declared):
        dtype = attrs["dtype"] or _arith_type(op_name, declared[0].dtype, declared[1].dtype, None).name
        overflow = attrs["overflow"]
        fn = _ARITH_FNS[op_name]
        return lambda a, b: fn(a, b, dtype=dtype, overflow=overflow)

    return prepare


_ARITH_ATTRS = dict(dtype=TypeName(optional=True), overflow=OneOf(OVERFLOW_POLICIES))


@op("Add", inputs=["a", "b"], attrs=_ARITH_ATTRS, infer=_infer_arith("Add"), prepare=_prepare_arith("Add"))
def Add(a, b, *, dtype=None, overflow="error"):
    """y = a + b (broadcasting), exact, fitted into dtype by the overflow policy."""
    return _arith("Add", a, b, dtype, overflow)


@op("Sub", inputs=["a", "b"], attrs=_ARITH_ATTRS, infer=_infer_arith("Sub"), prepare=_prepare_arith("Sub"))
def Sub(a, b, *, dtype=None, overflow="error"):
    """y = a - b (broadcasting), exact, fitted into dtype by the overflow policy."""
    return _arith("Sub", a, b, dtype, overflow)


@op("Mul", inputs=["a", "b"], attrs=_ARITH_ATTRS, infer=_infer_arith("Mul"), prepare=_prepare_arith("Mul"))
def Mul(a, b, *, dtype=None, overflow="error"):
    """y = a * b (broadcasting), exact, fitted into dtype by the overflow policy."""
    return _arith("Mul", a, b, dtype, overflow)


_ARITH_FNS = {"Add": Add, "Sub": Sub, "Mul": Mul}


@op("Relu", inputs=["x"], infer=same_as_input)
def Relu(x):
    """y = max(x, 0)."""
    x = np.asarray(x)
    return np.maximum(x, x.dtype.type(0))


def clip_bounds(type_lo: int, type_hi: int, lo, hi, type_name: str) -> tuple[int, int]:
    """Clip's bounds within x's type; a result the type cannot hold is refused."""
    if lo is not None and hi is not None and lo > hi:
        raise OpError(f"Clip: lo {lo} > hi {hi}")
    if lo is not None and lo > type_hi:
        raise OpError(f"Clip: lo {lo} lies above the largest {type_name} value {type_hi}")
    if hi is not None and hi < type_lo:
        raise OpError(f"Clip: hi {hi} lies below the smallest {type_name} value {type_lo}")
    return (type_lo if lo is None else max(lo, type_lo)), (type_hi if hi is None else min(hi, type_hi))


def _infer_clip(ins, attrs):
    t = ins[0].dtype
    try:
        clip_bounds(t.lo, t.hi, attrs["lo"], attrs["hi"], t.name)
    except OpError as e:
        raise GraphError(str(e)) from None
    return same_as_input(ins, attrs)


@op("Clip", inputs=["x"], attrs=dict(lo=Int(optional=True), hi=Int(optional=True)), infer=_infer_clip)
def Clip(x, *, lo=None, hi=None):
    """y = min(max(x, lo), hi); an omitted bound does not clip."""
    x = np.asarray(x)
    info = np.iinfo(x.dtype)
    lo, hi = clip_bounds(int(info.min), int(info.max), lo, hi, x.dtype.name)
    return np.clip(x, x.dtype.type(lo), x.dtype.type(hi))


def _infer_cast(ins, attrs):
    return [(int_type(attrs["dtype"]), ins[0].shape)]


@op("Cast", inputs=["x"], attrs=dict(dtype=TypeName(), overflow=OneOf(OVERFLOW_POLICIES)), infer=_infer_cast)
def Cast(x, *, dtype, overflow="error"):
    """y = x in another integer type, fitted by the overflow policy."""
    t = int_type(dtype)
    return fit_range(np.asarray(x).astype(np.int64), t.lo, t.hi, t.bits, overflow, "Cast").astype(t.storage)


def _infer_lut(ins, attrs):
    x, table = ins
    if x.dtype.bits > 16:
        raise GraphError(f"Lut indexes with at most 16-bit inputs, got {x.dtype}")
    size = x.dtype.hi - x.dtype.lo + 1
    if len(table.shape) != 1 or (isinstance(table.shape[0], int) and table.shape[0] != size):
        raise GraphError(f"Lut on {x.dtype} needs a table of {size} entries, got shape {list(table.shape)}")
    return [(table.dtype, x.shape)]


@op("Lut", inputs=["x", "table"], infer=_infer_lut)
def Lut(x, table):
    """y = table[x + L//2] for signed x, table[x] for unsigned x (L = len(table)).

    The table lists the function's value for every input, smallest input first: 256
    entries for int8 (table[0] is f(-128)), 16 for int4, 3 for ternary.
    """
    x, table = np.asarray(x), np.asarray(table)
    if x.dtype.itemsize > 2:
        raise OpError(f"Lut: input must be at most 16 bits, got {x.dtype}")
    if table.ndim != 1 or table.size == 0:
        raise OpError(f"Lut: table must be a non-empty 1-D array, got shape {table.shape}")
    index = x.astype(np.int64) + (table.size // 2 if x.dtype.kind == "i" else 0)
    if index.size and (int(index.min()) < 0 or int(index.max()) >= table.size):
        raise OpError(f"Lut: input values fall outside the {table.size}-entry table")
    return table[index]


# LutInterp16: LiteRT's int16 lookup. 512 segments of 128 inputs cover the int16 range; the
# table holds the function at each segment's start and one more entry for the last slope.
LUT_INTERP_SEGMENT_BITS = 7
LUT_INTERP_SIZE = (1 << (16 - LUT_INTERP_SEGMENT_BITS)) + 1  # 513


def _infer_lut_interp16(ins, attrs):
    x, table = ins
    if x.dtype.name != "int16":
        raise GraphError(f"LutInterp16 takes an int16 input, got {x.dtype}")
    if table.dtype.name != "int16" or len(table.shape) != 1 or (
            isinstance(table.shape[0], int) and table.shape[0] != LUT_INTERP_SIZE):
        raise GraphError(f"LutInterp16 needs an int16 table of {LUT_INTERP_SIZE} entries, "
                         f"got {table.dtype} of shape {list(table.shape)}")
    return [(table.dtype, x.shape)]


@op("LutInterp16", inputs=["x", "table"], infer=_infer_lut_interp16)
def LutInterp16(x, table):
    """y = t[i] + (((t[i+1] - t[i]) * f + 64) >> 7), i = (x + 32768) >> 7, f = x & 127:
    LiteRT's interpolated int16 lookup (LUTLookup) in a 513-entry int16 table, int16 out.

    The result lies between t[i] and t[i+1], so it always fits int16. LiteRT holds the
    slope t[i+1] - t[i] in an int16; a table whose neighbours differ by more is refused.
    """
    x, table = np.asarray(x), np.asarray(table)
    if x.dtype.kind not in "iu" or table.dtype.kind not in "iu":
        raise OpError(f"LutInterp16: integer input and table needed, got {x.dtype} and {table.dtype}")
    if table.shape != (LUT_INTERP_SIZE,):
        raise OpError(f"LutInterp16: the table must have {LUT_INTERP_SIZE} entries, got shape {list(table.shape)}")
    t = table.astype(np.int64)
    if int(t.min()) < -(1 << 15) or int(t.max()) >= 1 << 15:
        raise OpError("LutInterp16: table values outside int16")
    slope = np.diff(t)
    if int(slope.min()) < -(1 << 15) or int(slope.max()) >= 1 << 15:
        raise OpError("LutInterp16: neighbouring table entries differ by more than an int16 slope holds")
    offset = x.astype(np.int64) + (1 << 15)  # the input as unsigned: segment index and position
    if offset.size and (int(offset.min()) < 0 or int(offset.max()) >= 1 << 16):
        raise OpError("LutInterp16: input values outside int16")
    i = offset >> LUT_INTERP_SEGMENT_BITS
    frac = offset & ((1 << LUT_INTERP_SEGMENT_BITS) - 1)
    half = 1 << (LUT_INTERP_SEGMENT_BITS - 1)
    return (t[i] + ((slope[i] * frac + half) >> LUT_INTERP_SEGMENT_BITS)).astype(np.int16)
