"""Ops over spatial windows, N-D as ONNX defines them: Pad, Conv, MaxPool.

Tensors are laid out [N, C, D1, ..., Dk]. Window geometry follows ONNX: `pads` lists the
begin pads of every spatial axis, then the end pads; an output dimension is
`floor((D + pad_begin + pad_end - ((k - 1) * dilation + 1)) / stride) + 1`.

Conv is a matrix product after im2col: every window of (x - x_zero_point), zero-padded, is
gathered into a column, and the columns are multiplied with the reshaped weights by
`matmul.exact_matmul`, the one exact GEMM of refsim, so Conv is exact for the same
reasons MatMul is and shares its accumulator policy.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .. import backend
from ..dtypes import TYPES
from ..errors import GraphError, OpError
from .matmul import FLOAT32_EXACT, exact_matmul
from .overflow import fit_signed_bits
from .registry import OVERFLOW_POLICIES, Bool, Int, Ints, OneOf, op

PAD_MODES = ("constant", "reflect", "edge", "wrap")


# --- window geometry -------------------------------------------------------------------


def _geometry(spatial: int, kernel, strides, pads, dilations, what: str):
    """Normalised (kernel, strides, pads, dilations) for `spatial` axes, or GraphError."""
    strides = [1] * spatial if strides is None else list(strides)
    dilations = [1] * spatial if dilations is None else list(dilations)
    pads = [0] * (2 * spatial) if pads is None else list(pads)
    kernel = list(kernel)
    if len(kernel) != spatial:
        raise GraphError(f"{what}: kernel has {len(kernel)} spatial axes, the input has {spatial}")
    if len(strides) != spatial or len(dilations) != spatial or len(pads) != 2 * spatial:
        raise GraphError(
            f"{what}: strides and dilations need {spatial} entries and pads {2 * spatial}, "
            f"got {len(strides)}, {len(dilations)} and {len(pads)}"
        )
    return kernel, strides, pads, dilations


def _out_dim(size, k, stride, begin, end, dilation, ceil_mode=False):
    if not isinstance(size, int):
        return None
    extent = (k - 1) * dilation + 1
    span = size + begin + end - extent
    if span < 0:
        raise GraphError(f"a window of extent {extent} does not fit an input of {size} padded by {begin}+{end}")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # ONNX: with ceil_mode the last window must start inside the input or the begin pad.
    if ceil_mode and (out - 1) * stride >= size + begin:
        out -= 1
    return out


def _spatial_out(shape, kernel, strides, pads, dilations, ceil_mode=False):
    spatial = len(kernel)
    return tuple(
        _out_dim(shape[2 + i], kernel[i], strides[i], pads[i], pads[spatial + i], dilations[i], ceil_mode)
        for i in range(spatial)
    )


def _windows(padded: np.ndarray, kernel, strides, dilations, out_dims):
    """For each kernel offset (row-major), the strided view of `padded` it reads."""
    spatial = len(kernel)
    for offset in itertools.product(*(range(k) for k in kernel)):
        index = [slice(None), slice(None)]
        for i in range(spatial):
            start = offset[i] * dilations[i]
            index.append(slice(start, start + (out_dims[i] - 1) * strides[i] + 1, strides[i]))
        yield padded[tuple(index)]


# --- Pad -------------------------------------------------------------------------------


def _check_pads(rank: int, pads) -> None:
    if len(pads) != 2 * rank:
        raise GraphError(f"pads needs {2 * rank} entries (begin of each axis, then end), got {len(pads)}")


def _infer_pad(ins, attrs):
    x = ins[0]
    rank = len(x.shape)
    pads = attrs["pads"]
    _check_pads(rank, pads)
    if not x.dtype.lo <= attrs["value"] <= x.dtype.hi:
        raise GraphError(f"pad value {attrs['value']} does not fit {x.dtype}")
    shape = []
    for i, d in enumerate(x.shape):
        if isinstance(d, int):
            size = d + pads[i] + pads[rank + i]
            if size < 0:
                raise GraphError(f"pads {pads} remove more than axis {i} holds")
            shape.append(size)
        else:
            shape.append(d if pads[i] == pads[rank + i] == 0 else None)
    return [(x.dtype, tuple(shape))]


@op(
    "Pad",
    inputs=["x"],
    attrs=dict(pads=Ints(), mode=OneOf(PAD_MODES), value=Int()),
    infer=_infer_pad,
)
def Pad(x, *, pads, mode="constant", value=0):
    """y = x padded (or cropped, for negative pads) along every axis, ONNX Pad semantics."""
    x = np.asarray(x)
    rank = x.ndim
    try:
        _check_pads(rank, pads)
    except GraphError as e:
        raise OpError(f"Pad: {e}") from None
    crop = tuple(
        slice(max(-pads[i], 0), x.shape[i] - max(-pads[rank + i], 0)) for i in range(rank)
    )
    x = x[crop]
    widths = [(max(pads[i], 0), max(pads[rank + i], 0)) for i in range(rank)]
    if mode == "constant":
        info = np.iinfo(x.dtype)
        if not info.min <= value <= info.max:
            raise OpError(f"Pad: value {value} does not fit {x.dtype}")
        return np.pad(x, widths, mode="constant", constant_values=x.dtype.type(value))
    if any(w for pair in widths for w in pair) and x.size == 0:
        raise OpError(f"Pad: mode {mode!r} cannot pad an empty tensor")
    if mode == "reflect":
        for axis, (begin, end) in enumerate(widths):
            if max(begin, end) >= x.shape[axis] and (begin or end):
                raise OpError(f"Pad: reflect pads of {begin}/{end} need more than {x.shape[axis]} values on axis {axis}")
    return np.pad(x, widths, mode=mode)


# --- Conv ------------------------------------------------------------------------------


def _conv_check(x_shape, w_shape, group, what="Conv"):
    if len(x_shape) < 3 or len(w_shape) != len(x_shape):
        raise GraphError(f"{what}: x must be [N, C, D...] and w [M, C/group, k...] of the same rank, got {list(x_shape)} and {list(w_shape)}")
    channels, out_channels, per_group = x_shape[1], w_shape[0], w_shape[1]
    if isinstance(out_channels, int) and out_channels % group:
        raise GraphError(f"{what}: {out_channels} output channels do not split into {group} groups")
    if isinstance(channels, int) and isinstance(per_group, int) and channels != per_group * group:
        raise GraphError(f"{what}: x has {channels} channels, w expects {per_group} x {group} groups")


def _infer_conv(ins, attrs):
    x, w = ins[0], ins[1]
    _conv_check(x.shape, w.shape, attrs["group"])
    kernel = w.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise GraphError("the kernel shape must be known")
    geometry = _geometry(len(kernel), kernel, attrs["strides"], attrs["pads"], attrs["dilations"], "Conv")
    for name, t in (("w_zero_point", ins[3] if len(ins) > 3 else None), ("bias", ins[4] if len(ins) > 4 else None)):
        if t is not None and len(t.shape) > 1:
            raise GraphError(f"{name} must be a scalar or a per-output-channel vector")
    out = TYPES["int32"] if attrs["acc_bits"] <= 32 else TYPES["int64"]
    return [(out, (x.shape[0], w.shape[0]) + _spatial_out(x.shape, *geometry))]


def _per_channel(param, channels: int, name: str):
    if param is None:
        return None
    p = np.asarray(param).astype(np.int64).reshape(-1)
    if p.size not in (1, channels):
        raise OpError(f"Conv: {name} has {p.size} entries for {channels} output channels")
    return p


def _columns(x_centered, kernel, strides, pads, dilations, group):
    """im2col: [N, G, (C/G) * prod(kernel), prod(out)] from the zero-padded input."""
    spatial = len(kernel)
    n, c = x_centered.shape[:2]
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[spatial + i]) for i in range(spatial)]
    padded = np.pad(x_centered, widths)
    out_dims = _spatial_out(x_centered.shape, kernel, strides, pads, dilations)
    views = list(_windows(padded, kernel, strides, dilations, out_dims))
    # [N, C, prod(kernel), out...] -> [N, G, C/G * prod(kernel), prod(out)], channel-major
    # like the weights [M, C/G, k...] flattened.
    cols = np.stack(views, axis=2)
    cols = cols.reshape(n, group, (c // group) * len(views), math.prod(out_dims))
    return cols, out_dims


def _conv(x, w_centered, x_zero_point, bias, w_bound, x_bound, strides, pads, dilations, group, acc_bits, overflow, weights_cache=None):
    x = np.asarray(x)
    m = w_centered.shape[0]
    kernel = list(w_centered.shape[2:])
    try:
        _conv_check(x.shape, w_centered.shape, group)
        kernel, strides, pads, dilations = _geometry(len(kernel), kernel, strides, pads, dilations, "Conv")
    except GraphError as e:
        raise OpError(str(e)) from None
    if x_zero_point is not None and np.asarray(x_zero_point).size != 1:
        raise OpError("Conv: x_zero_point must be a scalar")
    x_centered = x.astype(np.int64) - int(np.asarray(x_zero_point).reshape(())) if x_zero_point is not None else x
    cols, out_dims = _columns(x_centered, kernel, strides, pads, dilations, group)
    if x_bound is None:
        x_bound = max(abs(int(cols.min())), abs(int(cols.max()))) if cols.size else 0
    weights = w_centered.reshape(group, m // group, -1)
    if weights_cache is not None:
        ftype = np.float32 if x_bound * w_bound <= FLOAT32_EXACT else np.float64
        if ftype not in weights_cache:
            weights_cache[ftype] = weights.astype(ftype)
        weights = weights_cache[ftype]
    acc = exact_matmul(weights[np.newaxis], cols, w_bound, x_bound)  # [N, G, M/G, prod(out)]
    acc = acc.reshape((x.shape[0], m) + tuple(out_dims))
    bias = _per_channel(bias, m, "bias")
    if bias is not None:
        acc = acc + bias.reshape((1, -1) + (1,) * len(out_dims))
    acc = fit_signed_bits(acc, acc_bits, overflow, "Conv: accumulator")
    return acc.astype(np.int32 if acc_bits <= 32 else np.int64)


def _center_weights(w, w_zero_point):
    w = np.asarray(w)
    if w.ndim < 3:
        raise OpError(f"Conv: w must be [M, C/group, k...], got shape {w.shape}")
    zp = _per_channel(w_zero_point, w.shape[0], "w_zero_point")
    if zp is None or not zp.any():
        return w.astype(np.int64)
    return w.astype(np.int64) - zp.reshape((-1,) + (1,) * (w.ndim - 1))


def _bound(a):
    return max(abs(int(a.min())), abs(int(a.max()))) if a.size else 0


def _prepare_conv(attrs, consts, declared):
    """With constant weights, centre and convert them once instead of every call."""
    if 1 not in consts or (len(declared) > 3 and declared[3] is not None and 3 not in consts):
        return None
    w_centered = _center_weights(consts[1], consts.get(3))
    w_bound = _bound(w_centered)
    x_type = declared[0].dtype
    cache: dict = {}
    geometry = {k: attrs[k] for k in ("strides", "pads", "dilations", "group", "acc_bits", "overflow")}

    def kernel(x, _w, x_zero_point=None, _w_zero_point=None, bias=None):
        zp = 0 if x_zero_point is None else int(np.asarray(x_zero_point).reshape(-1)[0])
        x_bound = max(abs(x_type.lo - zp), abs(x_type.hi - zp))
        cache_ = cache if backend.use_numba() else None
        return _conv(x, w_centered, x_zero_point, bias, w_bound, x_bound, weights_cache=cache_, **geometry)

    return kernel


@op(
    "Conv",
    inputs=["x", "w", "x_zero_point?", "w_zero_point?", "bias?"],
    attrs=dict(
        strides=Ints(min=1, optional=True),
        pads=Ints(min=0, optional=True),
        dilations=Ints(min=1, optional=True),
        group=Int(min=1),
        acc_bits=Int(min=2, max=64),
        overflow=OneOf(OVERFLOW_POLICIES),
    ),
    infer=_infer_conv,
    prepare=_prepare_conv,
)
def Conv(x, w, x_zero_point=None, w_zero_point=None, bias=None, *, strides=None, pads=None, dilations=None, group=1, acc_bits=32, overflow="error"):
    """acc = conv(x - x_zero_point, w - w_zero_point[m]) + bias[m], exact, N-D, grouped."""
    w_centered = _center_weights(w, w_zero_point)
    return _conv(x, w_centered, x_zero_point, bias, _bound(w_centered), None, strides, pads, dilations, group, acc_bits, overflow)


# --- MaxPool ---------------------------------------------------------------------------


def _infer_maxpool(ins, attrs):
    x = ins[0]
    if len(x.shape) < 3:
        raise GraphError(f"x must be [N, C, D...], got {list(x.shape)}")
    kernel = attrs["kernel_shape"]
    geometry = _geometry(len(x.shape) - 2, kernel, attrs["strides"], attrs["pads"], attrs["dilations"], "MaxPool")
    for i, k in enumerate(kernel):
        extent = (k - 1) * geometry[3][i] + 1
        if max(geometry[2][i], geometry[2][len(kernel) + i]) >= extent:
            raise GraphError(f"pads {geometry[2]} must be smaller than the window extent {extent}")
    return [(x.dtype, tuple(x.shape[:2]) + _spatial_out(x.shape, *geometry, ceil_mode=attrs["ceil_mode"]))]


@op(
    "MaxPool",
    inputs=["x"],
    attrs=dict(
        kernel_shape=Ints(min=1),
        strides=Ints(min=1, optional=True),
        pads=Ints(min=0, optional=True),
        dilations=Ints(min=1, optional=True),
        ceil_mode=Bool(),
    ),
    infer=_infer_maxpool,
)
def MaxPool(x, *, kernel_shape, strides=None, pads=None, dilations=None, ceil_mode=False):
    """y = the largest value of x in each window; padding never wins (ONNX pads with -inf)."""
    x = np.asarray(x)
    if x.ndim < 3:
        raise OpError(f"MaxPool: x must be [N, C, D...], got shape {x.shape}")
    try:
        kernel, strides, pads, dilations = _geometry(x.ndim - 2, kernel_shape, strides, pads, dilations, "MaxPool")
        out_dims = _spatial_out(x.shape, kernel, strides, pads, dilations, ceil_mode)
    except GraphError as e:
        raise OpError(str(e)) from None
    spatial = len(kernel)
    # Pad far enough for ceil_mode's last window; the type's minimum never beats a real value
    # and every window holds at least one real value (pads are smaller than the window).
    widths = [(0, 0), (0, 0)]
    for i in range(spatial):
        needed = (out_dims[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        widths.append((pads[i], max(needed - x.shape[2 + i] - pads[i], 0)))
    padded = np.pad(x, widths, constant_values=np.iinfo(x.dtype).min)
    result = None
    for view in _windows(padded, kernel, strides, dilations, out_dims):
        result = view.copy() if result is None else np.maximum(result, view)
    return np.ascontiguousarray(result)

