"""FloatSoftmax: onnxruntime's float32 Softmax of an integer score accumulator, then QuantizeLinear.

NNCF's default preset quantizes the attention probabilities but not the scores: onnxruntime
computes the scores' MatMul as an int32 accumulator times one float32 scale
(MatMulIntegerToFloat), a float32 Softmax (exp of the difference to the row maximum, the
float32 sum, one reciprocal, a product) and QuantizeLinear. This op performs those float32
steps on exact (m, e) pairs (`refsim.ops.float32`); exp comes from two tables the importer
fills with float32 exponentials, since the difference of two 32-bit accumulators has too
many values for one table: exp(-d*s) = hi[d >> k] * lo[d mod 2^k], rounded to float32 once.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import TYPES
from ..errors import GraphError, OpError
from . import float32 as f32
from .registry import Int, op
from .registry import TypeName as TypeNameAttr


def _infer(ins, attrs):
    x, hi_m, hi_e, lo_m, lo_e = ins
    if x.dtype.bits > 32:
        raise GraphError(f"x must be at most 32 bits, got {x.dtype.name}")
    for name, t in (("hi_m", hi_m), ("hi_e", hi_e), ("lo_m", lo_m), ("lo_e", lo_e)):
        if len(t.shape) != 1:
            raise GraphError(f"{name} must be 1-D")
    if isinstance(lo_m.shape[0], int) and lo_m.shape[0] != 1 << attrs["k"]:
        raise GraphError(f"lo_m must hold 2^k = {1 << attrs['k']} entries, got {lo_m.shape[0]}")
    t = TYPES[attrs["dtype"]]
    if not t.lo <= attrs["zero_point"] <= t.hi:
        raise GraphError(f"zero_point {attrs['zero_point']} is outside {t.name}")
    return [(t, x.shape)]


@op("FloatSoftmax", inputs=["x", "hi_m", "hi_e", "lo_m", "lo_e"], infer=_infer,
    attrs=dict(k=Int(min=0, max=24), y_scale_m=Int(min=1, max=(1 << 24) - 1), y_scale_e=Int(min=-200, max=100),
               zero_point=Int(), dtype=TypeNameAttr()))
def FloatSoftmax(x, hi_m, hi_e, lo_m, lo_e, *, k, y_scale_m, y_scale_e, zero_point, dtype="uint8"):
    """Over the last axis: d = max - x; e = f32(hi[d >> k] * lo[d mod 2^k]) (0 past hi's end);
    S = float32 sum in index order; p = f32(e * f32(1 / S)); y = sat(rint(f32(p / y_scale)) + zero_point)."""
    x = np.asarray(x)
    if x.dtype.kind not in "iu" or x.dtype.itemsize > 4:
        raise OpError(f"FloatSoftmax: x must be integers of at most 32 bits, got {x.dtype}")
    hi = (np.asarray(hi_m, np.int64).reshape(-1), np.asarray(hi_e, np.int64).reshape(-1))
    lo = (np.asarray(lo_m, np.int64).reshape(-1), np.asarray(lo_e, np.int64).reshape(-1))
    if lo[0].size != 1 << k or lo[1].size != lo[0].size or hi[1].size != hi[0].size or hi[0].size == 0:
        raise OpError(f"FloatSoftmax: lo must hold 2^k = {1 << k} entries and hi at least one, mantissas and exponents alike")
    t = TYPES[dtype]
    if x.size == 0:
        return x.astype(t.storage)
    rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
    d = rows.max(axis=1, keepdims=True) - rows
    inside = (d >> k) < hi[0].size
    top, low = np.where(inside, d >> k, 0), d & ((1 << k) - 1)
    e = f32.mul((hi[0][top], hi[1][top]), (lo[0][low], lo[1][low]))
    e = (np.where(inside, e[0], 0), np.where(inside, e[1], 0))
    total = (np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64))
    for j in range(rows.shape[1]):  # float32 additions in index order
        total = f32.add(total, (e[0][:, j], e[1][:, j]))
    if np.any(total[0] == 0):
        raise OpError("FloatSoftmax: a row's exp sum is zero (the row maximum's entry hi[0] * lo[0] must not be)")
    reciprocal = f32.div(f32.from_int(np.int64(1)), total)
    p = f32.mul(e, (reciprocal[0][:, None], reciprocal[1][:, None]))
    y = f32.rint(f32.div(p, (np.int64(y_scale_m), np.int64(y_scale_e)))) + zero_point
    return np.clip(y, t.lo, t.hi).astype(t.storage).reshape(x.shape)
