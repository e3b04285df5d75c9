"""Requantization with constant per-channel parameters, planned once, applied per element.

The formula is `refsim.ops.rounding.requantize` (docs/OPS.md, Requant):
clip(round_shift(x*mul + bias, shift, mode) + offset, lo, hi). A plan holds, per channel,
everything that makes the rounding branch-free (so LLVM vectorizes it): the clamped
shifts, masks of the bits below the half bit and below the shift, and flags for shifts past
63 and for no shift at all. One int64 array of shape (PLAN_ROWS, channels) carries it, so
every kernel that ends in a requantization (the Requant op, a matrix product with its
requantization fused, a residual sum) takes the same argument. Its NARROW row says whether
the plan is narrow: every multiplier fits int32 and every shift lies in [1, 62], so for
an input within int32 `requant_narrow` computes the same with a 32 x 32-bit product
(one VPMULDQ where the int64 product takes three multiplies) and without the branches
for shifts of 0 or past 63: measured a third faster. Its MULTIPLY_ONLY row says that the
plan only multiplies (shift, bias and offset all 0, multipliers within int32): a Mul by a
constant fused into the product before it, computed as a clipped product.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import int_type
from ..errors import OpError
from ..jit import njit, prange
from ..ops.requant import Requant, output_bounds
from ..ops.rounding import FLOOR, HALF_AWAY, HALF_EVEN, HALF_UP, INT64_MAX, mode_code
from .registry import kernel

MUL, BIAS, SQ, SH, BELOW_HALF, HALF_WIDE, BELOW_SHIFT, SHIFT_WIDE, NO_SHIFT, OFFSET, NARROW, MULTIPLY_ONLY = range(12)
PLAN_ROWS = 12
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1


def requant_plan(mul, bias, shift, offset, channels: int) -> np.ndarray:
    """The (PLAN_ROWS, channels) plan for parameters that are scalars or per-channel
    vectors of `channels` entries (shift >= 0, checked by the caller)."""
    mul, bias, shift, offset = (
        np.broadcast_to(np.asarray(p, np.int64).reshape(-1), channels) for p in (mul, bias, shift, offset)
    )
    plan = np.empty((PLAN_ROWS, channels), np.int64)
    plan[MUL], plan[BIAS], plan[OFFSET] = mul, bias, offset
    plan[SQ] = np.minimum(shift, 63)
    sh = np.clip(shift - 1, 0, 63)
    plan[SH] = sh
    plan[BELOW_HALF] = np.int64(-1) ^ np.left_shift(np.int64(-1), sh)
    plan[HALF_WIDE] = shift - 1 >= 64
    plan[BELOW_SHIFT] = np.int64(-1) ^ np.left_shift(np.int64(-1), plan[SQ])
    plan[SHIFT_WIDE] = shift >= 64
    plan[NO_SHIFT] = shift == 0
    # |x * mul| <= 2^62 for x and mul within int32; bias and offset below 2^62 keep every
    # sum within int64, as the int64 formula's.
    small = lambda p: bool(np.all(np.abs(p) < (1 << 62)))  # noqa: E731
    plan[NARROW] = bool(np.all((mul >= _INT32_MIN) & (mul <= _INT32_MAX) & (shift >= 1) & (shift <= 62))) \
        and small(bias) and small(offset)
    # A Mul by a constant posing as a requantization (no shift, bias or offset): for x and
    # mul within int32 the result is clip(x * mul), whatever the rounding.
    plan[MULTIPLY_ONLY] = bool(np.all((mul >= _INT32_MIN) & (mul <= _INT32_MAX) & (shift == 0) & (bias == 0)
                                      & (offset == 0)))
    return plan


@njit(cache=True)  # a call LLVM inlines: inlining in Numba's IR made every caller compile slower
def requant_one(x, plan, j, lo, hi, mode):
    """requantize(x) with channel j's parameters, for the five plain roundings: q = v >> s;
    the half bit and the bits below it decide the rounding, as in `round_shift_scalar`
    (bits past 63 are copies of the sign bit)."""
    v = x * plan[MUL, j] + plan[BIAS, j]
    q = v >> plan[SQ, j]
    half = (v >> plan[SH, j]) & 1
    negative = np.int64(v < 0)
    above_half = np.int64((v & plan[BELOW_HALF, j]) != 0) | (plan[HALF_WIDE, j] & negative)
    if mode == FLOOR:
        r = q
    elif mode == HALF_UP:
        r = q + half
    elif mode == HALF_AWAY:
        r = q + (half & (above_half | (1 - negative)))
    elif mode == HALF_EVEN:
        r = q + (half & (above_half | (q & 1)))
    else:  # TRUNC
        r = q + (negative & (np.int64((v & plan[BELOW_SHIFT, j]) != 0) | plan[SHIFT_WIDE, j]))
    if plan[NO_SHIFT, j]:
        r = v
    r += plan[OFFSET, j]
    return min(max(r, lo), hi)


@njit(cache=True)
def requant_narrow(x, plan, j, lo, hi, mode):
    """requant_one(x) for a narrow plan (plan[NARROW]) and x within int32."""
    v = np.int64(np.int32(x)) * np.int64(np.int32(plan[MUL, j])) + plan[BIAS, j]
    q = v >> plan[SQ, j]
    half = (v >> plan[SH, j]) & 1
    negative = np.int64(v < 0)
    above_half = np.int64((v & plan[BELOW_HALF, j]) != 0)
    if mode == FLOOR:
        r = q
    elif mode == HALF_UP:
        r = q + half
    elif mode == HALF_AWAY:
        r = q + (half & (above_half | (1 - negative)))
    elif mode == HALF_EVEN:
        r = q + (half & (above_half | (q & 1)))
    else:  # TRUNC
        r = q + (negative & np.int64((v & plan[BELOW_SHIFT, j]) != 0))
    r += plan[OFFSET, j]
    return min(max(r, lo), hi)


@njit(cache=True, parallel=True)
def requant_rows(x, plan, lo, hi, mode, out):
    """out[i, j] = requant_one(x[i, j]) with channel j's parameters."""
    rows, cols = x.shape
    narrow = plan[NARROW, 0] != 0 and x.itemsize <= 4
    for i in prange(rows):
        if narrow:
            for j in range(cols):
                out[i, j] = requant_narrow(x[i, j], plan, j, lo, hi, mode)
        else:
            for j in range(cols):
                out[i, j] = requant_one(np.int64(x[i, j]), plan, j, lo, hi, mode)


@njit(cache=True, parallel=True)
def requant_rows_checked(x, plan, limit, lo, hi, mode, out):
    """`requant_rows` for inputs whose declared type does not bound x*mul + bias within
    int64: every |x| must be at most `limit`; returns whether one was not (the caller then
    lets the op refuse the input). Each row's extremes are kept in scalars, so the loop
    still vectorizes (a flag updated per element made it six times slower)."""
    rows, cols = x.shape
    over = np.zeros(rows, np.bool_)
    for i in prange(rows):
        smallest, largest = np.int64(0), np.int64(0)
        for j in range(cols):
            v = np.int64(x[i, j])
            smallest, largest = min(smallest, v), max(largest, v)
            out[i, j] = requant_one(v, plan, j, lo, hi, mode)
        over[i] = largest > limit or smallest < -limit
    return over.any()


class PlannedRequant:
    """Requant with constant parameters that are scalars or run along the last axis: every
    check and broadcast done once, a run is one pass. Offers its plan to a producer that
    fuses it (`plan_for`)."""

    def __init__(self, attrs, params: dict[str, np.ndarray], width: int, lo: int, hi: int, storage, limit: int | None):
        self.attrs = attrs
        # None: the declared input type keeps x*mul + bias within int64. Else the
        # largest |x| that does (the op's own check, from the same maxima).
        self.limit = limit
        self.params = params
        self.width = width  # 1 for per-tensor parameters
        self.lo, self.hi = lo, hi
        self.mode = mode_code(attrs["rounding"])
        self.out_range = (lo, hi, self.mode)
        self.storage = storage
        self.plans: dict[int, np.ndarray] = {}
        self.identity = False  # set by `planned_requant` when every input value maps to itself

    def plan_for(self, channels: int) -> np.ndarray | None:
        """The plan for an input whose last axis has `channels` entries, or None when
        the parameters do not fit it."""
        if self.width > 1 and channels != self.width:
            return None
        if channels not in self.plans:
            p = self.params
            self.plans[channels] = requant_plan(p["mul"], p["bias"], p["shift"], p["offset"], channels)
        return self.plans[channels]

    def __call__(self, x, *_params):
        if self.identity and x.dtype == self.storage and backend.use_numba():
            return x  # the same integers (checked for every value of the type): no pass at all
        plan = None
        if backend.use_numba() and x.ndim and x.size:
            plan = self.plan_for(x.shape[-1])
        if plan is None:
            return Requant(x, *_params, **self.attrs)
        flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        out = np.empty(flat.shape, self.storage)
        if self.limit is None:
            requant_rows(flat, plan, self.lo, self.hi, self.mode, out)
        elif requant_rows_checked(flat, plan, self.limit, self.lo, self.hi, self.mode, out):
            return Requant(x, *_params, **self.attrs)  # refuses, naming the bound
        return out.reshape(x.shape)


def _largest(values: np.ndarray) -> int:
    """max |v| as a Python int (np.abs of INT64_MIN is INT64_MIN)."""
    return max(-int(values.min()), int(values.max()))


@kernel("Requant")
def planned_requant(attrs, consts, declared):
    """Constant parameters along the last axis (or per tensor), five plain roundings."""
    x = declared[0]
    rank = len(x.shape)
    names = ("mul", "shift", "bias", "offset")
    given = [i for i in range(1, len(declared)) if declared[i] is not None]
    if rank == 0 or any(i not in consts for i in given) or attrs["rounding"] == "double":
        return None
    channels = x.shape[-1]
    params = {name: np.asarray(consts[i], np.int64).reshape(-1) if i in consts else np.zeros(1, np.int64)
              for i, name in enumerate(names, 1)}
    if any(p.size == 0 for p in params.values()):
        return None
    sizes = {p.size for p in params.values()} - {1}
    if attrs["axis"] % rank != rank - 1 and sizes:
        return None  # per-channel along another axis: the general path
    if len(sizes) > 1 or (sizes and isinstance(channels, int) and sizes != {channels}):
        return None  # let the op report the mismatch, naming the node
    if int(params["shift"].min()) < 0:
        return None
    bound = max(-x.dtype.lo, x.dtype.hi)
    largest_mul, bias, offset = (_largest(params[n]) for n in ("mul", "bias", "offset"))
    rest = bias + offset
    if rest > INT64_MAX:
        return None
    limit = None
    if bound * largest_mul + rest > INT64_MAX:  # x's values must decide, as in the op
        limit = (INT64_MAX - rest) // largest_mul
    try:
        lo, hi = output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], "Requant")
    except OpError:
        return None
    kernel = PlannedRequant(attrs, params, max(sizes) if sizes else 1, lo, hi, int_type(attrs["dtype"]).storage, limit)
    kernel.identity = _maps_every_value_to_itself(kernel, x.dtype)
    return kernel


IDENTITY_CHECK_LIMIT = 1 << 17  # values x channels tried at prepare time, at most


def _maps_every_value_to_itself(kernel: PlannedRequant, x_type) -> bool:
    """Whether the Requant returns every value of its declared input type unchanged, in the
    same storage: the op's own formula on all of them, at prepare time. An exporter
    requantizing a tensor to a scale within a rounding of its own (per-channel values made
    per-tensor, at an equal scale; mul = 2^31 - 33 with shift 31) writes such a node: at
    run time it is then no pass at all."""
    if kernel.storage != x_type.storage or kernel.limit is not None:
        return False
    count = x_type.hi - x_type.lo + 1
    if count * kernel.width > IDENTITY_CHECK_LIMIT:
        return False
    values = np.arange(x_type.lo, x_type.hi + 1, dtype=np.int64).astype(x_type.storage)
    grid = np.ascontiguousarray(np.broadcast_to(values[:, None], (count, kernel.width)))
    p = kernel.params
    with backend.use("numpy"):  # the formula itself, and nothing to compile
        y = Requant(grid, p["mul"], p["shift"], p["bias"], p["offset"], **{**kernel.attrs, "axis": -1})
    return bool(np.array_equal(y, grid))
