"""Data movement: Reshape, Transpose, Slice, Concat, Gather. Values pass through unchanged."""

from __future__ import annotations

import math

import numpy as np

from ..errors import GraphError, OpError
from .registry import Int, Ints, op


def _reshape_target(in_shape, target, known_size=None):
    """ONNX Reshape rules: 0 copies the input dimension, one -1 takes what is left."""
    out = []
    for i, d in enumerate(target):
        if d == 0:
            if i >= len(in_shape):
                raise GraphError(f"shape entry {i} is 0 but the input has rank {len(in_shape)}")
            out.append(in_shape[i])
        elif d < -1:
            raise GraphError(f"shape entry {d} is invalid")
        else:
            out.append(d)
    if out.count(-1) > 1:
        raise GraphError("shape may hold at most one -1")
    if -1 in out:
        rest = [d for d in out if d != -1]
        if all(isinstance(d, int) for d in in_shape) and all(isinstance(d, int) for d in rest):
            total, part = math.prod(in_shape), math.prod(rest)
            if part == 0 or total % part:
                raise GraphError(f"cannot reshape {list(in_shape)} into {list(target)}")
            out[out.index(-1)] = total // part
        else:
            out[out.index(-1)] = None
    elif all(isinstance(d, int) for d in in_shape + tuple(out)):
        if math.prod(in_shape) != math.prod(out):
            raise GraphError(f"cannot reshape {list(in_shape)} ({math.prod(in_shape)} values) into {out}")
    return tuple(out)


def _infer_reshape(ins, attrs):
    return [(ins[0].dtype, _reshape_target(tuple(ins[0].shape), attrs["shape"]))]


@op("Reshape", inputs=["x"], attrs=dict(shape=Ints(min=-1)), infer=_infer_reshape)
def Reshape(x, *, shape):
    """y = x with a new shape (ONNX rules: 0 copies a dimension, -1 is inferred)."""
    x = np.asarray(x)
    try:
        target = _reshape_target(x.shape, shape)
        return x.reshape(target)
    except (GraphError, ValueError) as e:
        raise OpError(f"Reshape: {e}") from None


def _perm(rank, perm):
    perm = list(range(rank))[::-1] if perm is None else list(perm)
    if sorted(perm) != list(range(rank)):
        raise GraphError(f"perm {perm} is not a permutation of {rank} axes")
    return perm


def _infer_transpose(ins, attrs):
    shape = ins[0].shape
    return [(ins[0].dtype, tuple(shape[p] for p in _perm(len(shape), attrs["perm"])))]


@op("Transpose", inputs=["x"], attrs=dict(perm=Ints(min=0, optional=True)), infer=_infer_transpose)
def Transpose(x, *, perm=None):
    """y = x with axes permuted (default: reversed)."""
    x = np.asarray(x)
    try:
        return np.asarray(np.transpose(x, _perm(x.ndim, perm)), order="C")
    except GraphError as e:
        raise OpError(f"Transpose: {e}") from None


def _onnx_bounds(dim: int, start: int, end: int, step: int) -> slice:
    """ONNX's Slice bounds as a Python slice: negative indices count from the end, then
    starts clamp to [0, dim] ([0, dim-1] when stepping backwards) and ends to [0, dim]
    ([-1, dim-1] backwards). Python's own slice clamping differs for backward steps."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if dim == 0:
        return slice(0, 0)
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, end if end >= 0 else None, step)  # end -1: before index 0


def _slices(shape, starts, ends, axes, steps):
    rank = len(shape)
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else list(steps)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise GraphError("starts, ends, axes and steps must have the same length")
    index = [slice(None)] * rank
    seen = set()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not -rank <= axis < rank:
            raise GraphError(f"axis {axis} is out of range for rank {rank}")
        if axis % rank in seen:
            raise GraphError(f"axis {axis} is sliced twice")
        seen.add(axis % rank)
        if step == 0:
            raise GraphError("a step may not be 0")
        dim = shape[axis % rank]
        index[axis % rank] = _onnx_bounds(dim, start, end, step) if isinstance(dim, int) else (start, end, step)
    return tuple(index)


def _infer_slice(ins, attrs):
    shape = ins[0].shape
    index = _slices(shape, attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"])
    out = []
    for d, s in zip(shape, index):
        if isinstance(s, slice):
            out.append(len(range(*s.indices(d))) if isinstance(d, int) else d)
        else:
            out.append(None)  # a symbolic dimension sliced: its size is known at run time
    return [(ins[0].dtype, tuple(out))]


@op(
    "Slice",
    inputs=["x"],
    attrs=dict(starts=Ints(), ends=Ints(), axes=Ints(optional=True), steps=Ints(optional=True)),
    infer=_infer_slice,
)
def Slice(x, *, starts, ends, axes=None, steps=None):
    """y = x[starts:ends:steps] along axes (ONNX semantics, out-of-range bounds clamped)."""
    x = np.asarray(x)
    try:
        return np.asarray(x[_slices(x.shape, starts, ends, axes, steps)], order="C")
    except GraphError as e:
        raise OpError(f"Slice: {e}") from None


def _infer_concat(ins, attrs):
    if not ins or any(t is None for t in ins):
        raise GraphError("needs at least one input, and no input may be omitted")
    first = ins[0]
    rank = len(first.shape)
    axis = attrs["axis"]
    if not -rank <= axis < rank:
        raise GraphError(f"axis {axis} is out of range for rank {rank}")
    axis %= rank
    total = 0
    shape = list(first.shape)
    for t in ins:
        if t.dtype is not first.dtype:
            raise GraphError(f"all inputs must share one type; got {first.dtype} and {t.dtype}")
        if len(t.shape) != rank:
            raise GraphError("all inputs must have the same rank")
        for i, d in enumerate(t.shape):
            if i == axis:
                continue
            if isinstance(d, int) and isinstance(shape[i], int) and d != shape[i]:
                raise GraphError(f"input shapes {list(first.shape)} and {list(t.shape)} differ off the axis {axis}")
            if not isinstance(shape[i], int):
                shape[i] = d if isinstance(d, int) else shape[i] if d == shape[i] else None
        d = t.shape[axis]
        total = total + d if isinstance(d, int) and total is not None else None
    shape[axis] = total
    return [(first.dtype, tuple(shape))]


@op("Concat", inputs=["*xs"], attrs=dict(axis=Int()), infer=_infer_concat)
def Concat(*xs, axis):
    """y = the inputs joined along axis (all of one type)."""
    if not xs:
        raise OpError("Concat: needs at least one input")
    arrays = [np.asarray(x) for x in xs]
    if len({a.dtype for a in arrays}) != 1:
        raise OpError("Concat: all inputs must share one type")
    rank = arrays[0].ndim
    if any(a.ndim != rank for a in arrays) or not -rank <= axis < rank:
        raise OpError(f"Concat: inputs of equal rank and an axis within it needed; got ranks {[a.ndim for a in arrays]}, axis {axis}")
    off_axis = {a.shape[: axis % rank] + a.shape[axis % rank + 1 :] for a in arrays}
    if len(off_axis) != 1:
        raise OpError(f"Concat: input shapes {[list(a.shape) for a in arrays]} differ off the axis {axis}")
    return np.concatenate(arrays, axis=axis)


def _infer_gather(ins, attrs):
    data, indices = ins
    rank = len(data.shape)
    axis = attrs["axis"]
    if not -rank <= axis < rank:
        raise GraphError(f"axis {axis} is out of range for rank {rank}")
    axis %= rank
    if indices.dtype.name == "ternary":
        raise GraphError(f"indices of type {indices.dtype} are not supported")
    shape = tuple(data.shape[:axis]) + tuple(indices.shape) + tuple(data.shape[axis + 1 :])
    return [(data.dtype, shape)]


@op("Gather", inputs=["data", "indices"], attrs=dict(axis=Int()), infer=_infer_gather)
def Gather(data, indices, *, axis=0):
    """y = data[..., indices, ...] along axis (an embedding lookup); -n..n-1 as in ONNX."""
    data, indices = np.asarray(data), np.asarray(indices)
    if not -data.ndim <= axis < data.ndim:
        raise OpError(f"Gather: axis {axis} is out of range for a rank-{data.ndim} input")
    n = data.shape[axis]
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < -n or high >= n:
            bad = low if low < -n else high
            raise OpError(f"Gather: index {bad} is out of range for {n} entries along axis {axis}")
    return np.take(data, indices.astype(np.int64), axis=axis)
