"""LutInterp16 (LiteRT's interpolated int16 lookup, the exporter's GELU) in one pass, and
with the Requant after it fused.

The formula is `refsim.ops.elementwise.LutInterp16`: u = x + 32768, i = u >> 7, f = u & 127,
y = t[i] + (((t[i+1] - t[i]) * f + 64) >> 7). With a constant table, its checks (entries
and slopes within int16) are made once; then every value is int32 arithmetic: |slope * f +
64| < 2^15 * 2^7 + 64. The table's 512 starts and slopes stay in L1.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..jit import njit, prange
from ..ops.elementwise import LUT_INTERP_SEGMENT_BITS, LUT_INTERP_SIZE, LutInterp16
from .registry import kernel
from .requant import NARROW, requant_narrow, requant_one

_HALF = 1 << (LUT_INTERP_SEGMENT_BITS - 1)
_FRACTION = (1 << LUT_INTERP_SEGMENT_BITS) - 1


@njit(cache=True, inline="always")
def _lookup(v, start, slope):
    u = np.int32(v) + np.int32(32768)
    i = u >> LUT_INTERP_SEGMENT_BITS
    return start[i] + ((slope[i] * (u & _FRACTION) + _HALF) >> LUT_INTERP_SEGMENT_BITS)


@njit(cache=True, parallel=True)
def lut_interp16_rows(x, start, slope, out):
    """out[i, j] = LutInterp16(x[i, j]) (int16 x and out)."""
    rows, cols = x.shape
    for r in prange(rows):
        for j in range(cols):
            out[r, j] = np.int16(_lookup(x[r, j], start, slope))


@njit(cache=True, parallel=True)
def lut_interp16_requant_rows(x, start, slope, plan, lo, hi, mode, out, looked_up):
    """out[i, j] = requant_one(LutInterp16(x[i, j])) with channel j's parameters; the
    looked-up values are also written to looked_up when it has rows (a traced run)."""
    rows, cols = x.shape
    keep = looked_up.shape[0] > 0
    narrow = plan[NARROW, 0] != 0
    for r in prange(rows):
        if narrow and not keep:
            for j in range(cols):
                out[r, j] = requant_narrow(_lookup(x[r, j], start, slope), plan, j, lo, hi, mode)
        elif keep:
            for j in range(cols):
                y = _lookup(x[r, j], start, slope)
                looked_up[r, j] = np.int16(y)
                out[r, j] = requant_one(np.int64(y), plan, j, lo, hi, mode)
        else:
            for j in range(cols):
                out[r, j] = requant_one(np.int64(_lookup(x[r, j], start, slope)), plan, j, lo, hi, mode)


class LutInterp16Kernel:
    """LutInterp16 with a constant table the op accepts (checked here once)."""

    def __init__(self, table: np.ndarray):
        t = table.astype(np.int32)
        self.start = np.ascontiguousarray(t[:-1])
        self.slope = np.ascontiguousarray(np.diff(t))

    @classmethod
    def prepare(cls, table) -> "LutInterp16Kernel | None":
        t = np.asarray(table)
        if t.dtype.kind not in "iu" or t.shape != (LUT_INTERP_SIZE,):
            return None
        t = t.astype(np.int64)
        slope = np.diff(t)
        if int(t.min()) < -(1 << 15) or int(t.max()) >= 1 << 15 or int(slope.min()) < -(1 << 15) or int(slope.max()) >= 1 << 15:
            return None  # the op refuses it, naming the node
        return cls(t)

    @staticmethod
    def _rows(x):
        """x as int16 rows, or None when the one-pass kernel does not take it."""
        if not (backend.use_numba() and x.dtype == np.int16 and x.ndim and x.size):
            return None
        return np.ascontiguousarray(x).reshape(-1, x.shape[-1])

    def __call__(self, x, table):
        x = np.asarray(x)
        rows = self._rows(x)
        if rows is None:
            return LutInterp16(x, table)
        out = np.empty(rows.shape, np.int16)
        lut_interp16_rows(rows, self.start, self.slope, out)
        return out.reshape(x.shape)

    def fuse(self, consumer, run_consumer):
        """This lookup and the Requant after it (prepared with constant parameters) in one
        pass; the looked-up values are written too when asked (`keep`). An int16 input
        keeps the Requant's x*mul + bias within int64 (the Requant's limit is then None)."""
        if not hasattr(consumer, "plan_for") or getattr(consumer, "limit", 0) is not None or not backend.use_numba():
            return None
        storage, (lo, hi, mode) = consumer.storage, consumer.out_range
        none = np.empty((0, 0), np.int16)

        def fused(x, table, keep=False):
            x = np.asarray(x)
            rows = self._rows(x)
            plan = None if rows is None else consumer.plan_for(x.shape[-1])
            if plan is None:
                inner = self(x, table)
                return inner, run_consumer(inner)
            out = np.empty(rows.shape, storage)
            looked_up = np.empty(rows.shape, np.int16) if keep else none
            lut_interp16_requant_rows(rows, self.start, self.slope, plan, lo, hi, mode, out, looked_up)
            return (looked_up.reshape(x.shape) if keep else None), out.reshape(x.shape)

        return fused


@kernel("LutInterp16")
def lut_interp16(attrs, consts, declared):
    """A constant table."""
    if 1 not in consts:
        return None
    return LutInterp16Kernel.prepare(consts[1])
