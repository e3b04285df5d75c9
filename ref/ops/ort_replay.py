"""onnxruntime's CPU kernels that compute in float32, replayed exactly with integers.

The importer's `--float-ops ort` puts these where an imported model says "do what
onnxruntime does" rather than "do what integer hardware does" (the integer variants stay
the default). Each op takes the float32 constants onnxruntime derives at prepare time
(a softmax's exp table, a scale) as exact integer pairs `(m, e)`, value `m * 2^e`, and
performs every float32 operation of the kernel in its order with `refsim.ops.float32`.

- `Lut2(a, b, table)`: any function of two narrow integers, a table over all pairs (the
  importer fills it with onnxruntime's QLinearAdd/QLinearMul arithmetic: exact by
  construction).
- `OrtSoftmax(x, table_m, table_e; y_factor, zero_point)`: com.microsoft QLinearSoftmax
  (which onnxruntime also fuses DequantizeLinear -> Softmax -> QuantizeLinear into).
- `DynamicQuantizeLinear(x, scale_m, scale_e, zero_point)`: ONNX DynamicQuantizeLinear of
  the dequantized tensor `float32(scale * (x - zero_point))`, as onnxruntime computes it.
- `RescaleF32(x, a, b, c; shift)`: quantize_dynamic's Cast -> Mul(a * b) -> Add(c) after a
  MatMulInteger, a its run-time scale, in float32, put on the fixed grid 2^-shift.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import TYPES
from ..errors import GraphError, OpError
from . import float32 as f32
from .registry import Int, op, shapes_compatible
from .registry import TypeName as TypeNameAttr
from .requant_f32 import MANTISSA_BITS

# --- Lut2 -----------------------------------------------------------------------------


def _table_index(x: np.ndarray, size: int, what: str) -> np.ndarray:
    index = x.astype(np.int64) + (size // 2 if x.dtype.kind == "i" else 0)
    if index.size and (int(index.min()) < 0 or int(index.max()) >= size):
        raise OpError(f"Lut2: {what} values fall outside the table's {size} rows")
    return index


def _lut2_infer(ins, attrs):
    a, b, table = ins
    for name, t, axis in (("a", a, 0), ("b", b, 1)):
        if t.dtype.bits > 8:
            raise GraphError(f"{name} must be at most 8 bits, got {t.dtype.name}")
        if len(table.shape) == 2 and isinstance(table.shape[axis], int) and table.shape[axis] != t.dtype.hi - t.dtype.lo + 1:
            raise GraphError(f"table axis {axis} has {table.shape[axis]} entries, {name} ({t.dtype.name}) takes "
                             f"{t.dtype.hi - t.dtype.lo + 1} values")
    if len(table.shape) != 2:
        raise GraphError("table must be 2-D")
    from .registry import broadcast_shapes

    return [(table.dtype, broadcast_shapes(a.shape, b.shape))]


@op("Lut2", inputs=["a", "b", "table"], infer=_lut2_infer)
def Lut2(a, b, table):
    """y = table[a + La/2, b + Lb/2] (signed a, b; unsigned without the offset), broadcasting a and b."""
    a, b, table = np.asarray(a), np.asarray(b), np.asarray(table)
    if table.ndim != 2:
        raise OpError(f"Lut2: table must be 2-D, got shape {table.shape}")
    if a.dtype.itemsize > 1 or b.dtype.itemsize > 1:
        raise OpError("Lut2: inputs must be at most 8 bits")
    try:
        ia, ib = np.broadcast_arrays(_table_index(a, table.shape[0], "a"), _table_index(b, table.shape[1], "b"))
    except ValueError:
        raise OpError(f"Lut2: shapes {list(a.shape)} and {list(b.shape)} do not broadcast") from None
    return table[ia, ib]


# --- OrtSoftmax -------------------------------------------------------------------------


def _softmax_infer(ins, attrs):
    x, tm, te = ins
    if x.dtype.name not in ("uint8", "int8"):
        raise GraphError(f"x must be uint8 or int8, got {x.dtype.name}")
    for name, t in (("table_m", tm), ("table_e", te)):
        if not shapes_compatible(t.shape, (256,)):
            raise GraphError(f"{name} must hold 256 entries")
    if not x.dtype.lo <= attrs["zero_point"] <= x.dtype.hi:
        raise GraphError(f"zero_point {attrs['zero_point']} is outside {x.dtype.name}")
    return [(x.dtype, x.shape)]


@op("OrtSoftmax", inputs=["x", "table_m", "table_e"], infer=_softmax_infer,
    attrs=dict(y_factor=Int(min=1, max=(1 << 24) - 1), zero_point=Int()))
def OrtSoftmax(x, table_m, table_e, *, y_factor, zero_point):
    """onnxruntime's QLinearSoftmax over the last axis (float32 exp table, float32 sum and division)."""
    x = np.asarray(x)
    if x.dtype not in (np.uint8, np.int8):
        raise OpError(f"OrtSoftmax: x must be uint8 or int8, got {x.dtype}")
    table = (np.asarray(table_m, np.int64).reshape(-1), np.asarray(table_e, np.int64).reshape(-1))
    if table[0].size != 256 or table[1].size != 256:
        raise OpError("OrtSoftmax: the table must hold 256 entries")
    if x.size == 0:
        return x.copy()
    rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
    # Row maximum at table index 255: entry i holds exp((i - 255 + shift) * x_scale).
    index = rows - rows.max(axis=1, keepdims=True) + 255
    vm, ve = table[0][index], table[1][index]
    total = (np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64))
    for j in range(rows.shape[1]):  # float32 additions in index order, as the kernel loops
        total = f32.add(total, (vm[:, j], ve[:, j]))
    if np.any(total[0] == 0):
        raise OpError("OrtSoftmax: a row's exp sum is zero (onnxruntime leaves such rows unwritten)")
    scaled = f32.mul((vm, ve), f32.from_int(np.int64(y_factor)))
    quotient = f32.div(scaled, (total[0][:, None], total[1][:, None]))
    lo, hi = (0, 255) if x.dtype == np.uint8 else (-128, 127)
    y = np.clip(f32.rint(quotient) + zero_point, lo, hi)
    # t * y_factor past float32's range (rows of one value) is infinite there; x86's conversion
    # of an infinite quotient to an integer gives 0x80000000..., which leaves the zero point.
    y = np.where(scaled[1] + MANTISSA_BITS > 128, zero_point, y)
    return y.astype(x.dtype).reshape(x.shape)


# --- DynamicQuantizeLinear --------------------------------------------------------------


def _dql_infer(ins, attrs):
    x = ins[0]
    return [(TYPES["uint8"], x.shape), (TYPES["int32"], ()), (TYPES["int16"], ()), (TYPES["uint8"], ())]


def _signed_pairs(k: np.ndarray, scale) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """sign and |float32(k * scale)| for integers k (onnxruntime: float(q - zp) * scale)."""
    k = np.asarray(k, np.int64)
    return np.sign(k), f32.mul(f32.from_int(np.abs(k)), scale)


@op("DynamicQuantizeLinear", inputs=["x", "scale_m", "scale_e", "zero_point"], infer=_dql_infer,
    outputs=("y", "y_scale_m", "y_scale_e", "y_zero_point"))
def DynamicQuantizeLinear(x, scale_m, scale_e, zero_point):
    """ONNX DynamicQuantizeLinear of float32(scale * (x - zero_point)) as onnxruntime computes it, in integers."""
    x = np.asarray(x).astype(np.int64)
    scale = (np.asarray(scale_m, np.int64).reshape(()), np.asarray(scale_e, np.int64).reshape(()))
    if int(scale[0]) <= 0:
        raise OpError("DynamicQuantizeLinear: the input scale must be positive")
    zp = int(np.asarray(zero_point).reshape(-1)[0])
    if x.size == 0:
        raise OpError("DynamicQuantizeLinear: an empty input has no range")
    # The range always includes 0; the float values are monotone in x (scale > 0).
    low = f32.mul(f32.from_int(np.int64(max(zp - int(x.min()), 0))), scale)  # |min(0, min x)|
    high = f32.mul(f32.from_int(np.int64(max(int(x.max()) - zp, 0))), scale)  # max(0, max x)
    span = f32.add(low, high)  # max - min, both sides >= 0
    if int(span[0]) == 0:
        y_scale = f32.from_int(np.int64(1))
    else:
        y_scale = f32.div(span, f32.from_int(np.int64(255)))
    # zero point: round_half_even(clip(0 - min / scale, 0, 255))
    y_zp = min(int(f32.rint(f32.div(low, y_scale))), 255) if int(low[0]) else 0
    sign, magnitude = _signed_pairs(x - zp, scale)
    q = sign * f32.rint(f32.div(magnitude, y_scale))
    y = np.clip(q + y_zp, 0, 255).astype(np.uint8)
    m, e = (np.asarray(v, np.int64).reshape(()) for v in y_scale)
    return y, m.astype(np.int32), e.astype(np.int16), np.asarray(y_zp, np.uint8)


# --- LayerNormRound ---------------------------------------------------------------------


def _layernorm_infer(ins, attrs):
    x, gamma, beta = ins[0], ins[1], ins[2]
    n = x.shape[-1] if x.shape else None
    for name, t in (("gamma", gamma), ("beta", beta)):
        if len(t.shape) > 1 or (len(t.shape) == 1 and isinstance(n, int) and t.shape[0] not in (1, n)):
            raise GraphError(f"{name} must be a scalar or one value per channel of the last axis")
    from .requant import output_bounds

    output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], "LayerNormRound")
    return [(TYPES[attrs["dtype"]], x.shape)]


@op("LayerNormRound", inputs=["x", "gamma", "beta", "offset?"], infer=_layernorm_infer,
    attrs=dict(eps=Int(min=0), k=Int(min=0, max=30), shift=Int(min=0, max=62), dtype=TypeNameAttr(),
               lo=Int(optional=True), hi=Int(optional=True)))
def LayerNormRound(x, gamma, beta, offset=None, *, eps, k, shift, dtype="int8", lo=None, hi=None):
    """LayerNorm over the last axis, rounded once: y = clip(rs(rdiv((N*x - S)*gamma*2^k, isqrt((V + eps)*4^k)) + beta, shift) + offset)."""
    from .intmath import isqrt
    from .requant import output_bounds
    from .rounding import round_div, round_shift

    x = np.asarray(x).astype(np.int64)
    lo, hi = output_bounds(dtype, lo, hi, "LayerNormRound")
    n = x.shape[-1]
    gamma = np.asarray(gamma, np.int64).reshape(-1)
    beta = np.asarray(beta, np.int64).reshape(-1)
    total = x.sum(axis=-1, keepdims=True)
    centred = n * x - total  # N * (x - mean), exact
    variance = n * (x * x).sum(axis=-1, keepdims=True) - total * total  # N^2 * var, exact
    if int(variance.max(initial=0)) + eps >= 1 << (62 - 2 * k):
        raise OpError("LayerNormRound: the variance leaves int64 at this k; lower k")
    root = np.maximum(isqrt((variance + eps) << (2 * k)), 1)
    if x.size and int(np.abs(centred).max()) * int(np.abs(gamma).max(initial=0)) >= 1 << (62 - k):
        raise OpError("LayerNormRound: (N*x - S) * gamma * 2^k leaves int64; lower k or gamma's precision")
    scaled = round_div((centred * gamma) << k, root, "half_even") + beta
    y = round_shift(scaled, np.int64(shift), "half_even") + (0 if offset is None else np.asarray(offset, np.int64).reshape(()))
    return np.clip(y, lo, hi).astype(TYPES[dtype].storage)


# --- RescaleF32 ---------------------------------------------------------------------------


def _rescale_infer(ins, attrs):
    x, a_m, a_e, b_m, b_e, c_m, c_e = ins
    channels = x.shape[-1] if x.shape else None
    for name, t in (("a_m", a_m), ("a_e", a_e)):
        if not shapes_compatible(t.shape, ()):
            raise GraphError(f"{name} must be a scalar (the run-time scale)")
    for name, t in (("b_m", b_m), ("b_e", b_e), ("c_m", c_m), ("c_e", c_e)):
        if t is not None and (len(t.shape) > 1 or (len(t.shape) == 1 and isinstance(channels, int)
                                                    and t.shape[0] not in (1, channels))):
            raise GraphError(f"{name} must be a scalar or one value per channel of the last axis")
    if (c_m is None) != (c_e is None):
        raise GraphError("c_m and c_e come together")
    from .requant import output_bounds

    output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], "RescaleF32")
    return [(TYPES[attrs["dtype"]], x.shape)]


@op("RescaleF32", inputs=["x", "a_m", "a_e", "b_m", "b_e", "c_m?", "c_e?"], infer=_rescale_infer,
    attrs=dict(shift=Int(min=-150, max=200), dtype=TypeNameAttr(), lo=Int(optional=True), hi=Int(optional=True)))
def RescaleF32(x, a_m, a_e, b_m, b_e, c_m=None, c_e=None, *, shift, dtype="int32", lo=None, hi=None):
    """v = f32(f32(f32(x) * f32(a * b)) + c) (float32 steps, c signed), y = clip(rint(v * 2^shift), lo, hi)."""
    from .requant import output_bounds

    x = np.asarray(x).astype(np.int64)
    lo, hi = output_bounds(dtype, lo, hi, "RescaleF32")
    a = (np.asarray(a_m, np.int64).reshape(()), np.asarray(a_e, np.int64).reshape(()))
    b = (np.asarray(b_m, np.int64).reshape(-1), np.asarray(b_e, np.int64).reshape(-1))
    if int(a[0]) < 0 or np.any(b[0] < 0):
        raise OpError("RescaleF32: the scales must not be negative")
    scale = f32.mul(a, b)  # onnxruntime's Mul of the two scales
    magnitude = f32.mul(f32.from_int(np.abs(x)), scale)  # Cast, then Mul by the scale
    v = (np.where(x < 0, -magnitude[0], magnitude[0]), magnitude[1])
    if c_m is not None:  # the bias Add
        v = f32.add_signed(v, (np.asarray(c_m, np.int64).reshape(-1), np.asarray(c_e, np.int64).reshape(-1)))
    limit = 1 << 62
    y = f32.rint((np.abs(v[0]), v[1] + shift), limit)  # v * 2^shift is exact: only the exponent moves
    y = np.where(v[0] < 0, -y, y)
    return np.clip(y, lo, hi).astype(TYPES[dtype].storage)
