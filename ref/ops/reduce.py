"""Reductions: ReduceSum (exact, widened), ReduceMean (stated rounding), ArgMax."""

from __future__ import annotations

import math

import numpy as np

from ..dtypes import TYPES, IntType, type_for_range
from ..errors import GraphError, OpError, RefsimError
from .registry import Bool, Int, Ints, OneOf, op
from .rounding import ROUNDINGS, round_div


def _axes(rank: int, axes) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(rank))
    if len(axes) == 0:
        raise GraphError("axes is empty; omit it to reduce over every axis")
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise GraphError(f"axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise GraphError(f"axes {list(axes)} repeat an axis")
    return tuple(sorted(out))


def _reduced_shape(shape, axes, keepdims):
    return tuple((1 if keepdims else None) if i in axes else d for i, d in enumerate(shape) if keepdims or i not in axes)


def _sum_type(t: IntType, shape, axes) -> IntType:
    """Narrowest standard type for a sum of the reduced elements; int64 if their count is symbolic."""
    dims = [shape[a] for a in axes]
    if not all(isinstance(d, int) for d in dims):
        return TYPES["int64"]
    n = max(math.prod(dims), 1)
    try:
        return type_for_range(min(0, n * t.lo), max(0, n * t.hi))
    except RefsimError:
        raise GraphError(f"a sum of {n} {t} values may exceed int64") from None


def _numpy_type(array) -> IntType:
    info = np.iinfo(array.dtype)
    return type_for_range(int(info.min), int(info.max))


def _infer_sum(ins, attrs):
    x = ins[0]
    axes = _axes(len(x.shape), attrs["axes"])
    return [(_sum_type(x.dtype, x.shape, axes), _reduced_shape(x.shape, axes, attrs["keepdims"]))]


def _prepare_sum(attrs, consts, declared):
    """In a graph, the sum's type follows the declared input type and shape."""
    x = declared[0]
    out = _sum_type(x.dtype, x.shape, _axes(len(x.shape), attrs["axes"]))
    return lambda x: _sum(x, attrs["axes"], attrs["keepdims"])[0].astype(out.storage)


def _sum(x, axes, keepdims, from_values: bool = False):
    """Exact int64 sum over axes; refused when it could leave int64 (judged from the
    dtype's range, or from the actual values with `from_values`)."""
    x = np.asarray(x)
    try:
        axes = _axes(x.ndim, axes)
    except GraphError as e:
        raise OpError(str(e)) from None
    n = math.prod(x.shape[a] for a in axes)
    if from_values:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
    else:
        info = np.iinfo(x.dtype)
        lo, hi = int(info.min), int(info.max)
    if n * lo < -(1 << 63) or n * hi > (1 << 63) - 1:
        raise OpError(f"a sum of {n} values in [{lo}, {hi}] may exceed int64")
    return np.sum(x, axis=axes, dtype=np.int64, keepdims=keepdims), axes, n


_REDUCE_ATTRS = dict(axes=Ints(optional=True), keepdims=Bool())


@op("ReduceSum", inputs=["x"], attrs=_REDUCE_ATTRS, infer=_infer_sum, prepare=_prepare_sum)
def ReduceSum(x, *, axes=None, keepdims=True):
    """y = exact sum over axes (all axes if none), in a type wide enough for any sum."""
    total, axes, _ = _sum(x, axes, keepdims)
    x = np.asarray(x)
    t = _sum_type(_numpy_type(x), x.shape, axes)
    return total.astype(t.storage)


def _infer_mean(ins, attrs):
    x = ins[0]
    axes = _axes(len(x.shape), attrs["axes"])
    return [(x.dtype, _reduced_shape(x.shape, axes, attrs["keepdims"]))]


@op(
    "ReduceMean",
    inputs=["x"],
    attrs=dict(**_REDUCE_ATTRS, rounding=OneOf(ROUNDINGS)),
    infer=_infer_mean,
)
def ReduceMean(x, *, axes=None, keepdims=True, rounding="trunc"):
    """y = round(sum(x over axes) / n) with the stated rounding (default trunc, C division)."""
    total, _, n = _sum(x, axes, keepdims, from_values=True)
    if n == 0:
        raise OpError("ReduceMean: the mean of no values is undefined")
    return round_div(total, n, rounding).astype(np.asarray(x).dtype)


def _infer_argmax(ins, attrs):
    x = ins[0]
    axes = _axes(len(x.shape), [attrs["axis"]])
    return [(TYPES["int64"], _reduced_shape(x.shape, axes, attrs["keepdims"]))]


@op(
    "ArgMax",
    inputs=["x"],
    attrs=dict(axis=Int(), keepdims=Bool(), select_last_index=Bool()),
    infer=_infer_argmax,
)
def ArgMax(x, *, axis=-1, keepdims=True, select_last_index=False):
    """y = index of the largest value along axis; ties go to the first (or last) index."""
    x = np.asarray(x)
    if not -x.ndim <= axis < x.ndim:
        raise OpError(f"ArgMax: axis {axis} is out of range for a rank-{x.ndim} input")
    if x.shape[axis] == 0:
        raise OpError("ArgMax: empty axis")
    if select_last_index:
        flipped = np.flip(x, axis=axis)
        result = x.shape[axis] - 1 - np.argmax(flipped, axis=axis)
    else:
        result = np.argmax(x, axis=axis)
    if keepdims:
        result = np.expand_dims(result, axis)
    return result.astype(np.int64)
