"""LutInterp16 (LiteRT's interpolated int16 lookup, the exporter's GELU) in one pass, and
with the Requant after it fused.

The formula is `refsim.ops.elementwise.LutInterp16`: u = x + 32768, i = u >> 7, f = u & 127,
y = t[i] + (((t[i+1] - t[i]) * f + 64) >> 7). With a constant table the op itself is
evaluated once, at prepare time, on all 65536 int16 inputs; a run then reads one int16
from that 128 KiB table per value. The interpolation per value (two table reads, a
multiply) ran scalar, as LLVM does not gather on this target: the full table made the
lookup three times faster, and it is the op by construction.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..errors import OpError
from ..jit import njit, prange
from ..ops.elementwise import LUT_INTERP_SIZE, LutInterp16
from ..ops.rounding import HALF_EVEN
from .registry import kernel
from .requant import NARROW, requant_narrow, requant_one

_INT16_OFFSET = 1 << 15  # full[x + 2^15] = LutInterp16(x)


@njit(cache=True, parallel=True)
def lut_interp16_rows(x, full, out):
    """out[i, j] = full[x[i, j] + 2^15] (int16 x and out)."""
    rows, cols = x.shape
    for r in prange(rows):
        for j in range(cols):
            out[r, j] = full[np.int32(x[r, j]) + _INT16_OFFSET]


@njit(cache=True, inline="always")
def _narrow_row(x, r, full, plan, lo, hi, mode, out):
    """Row r looked up into a buffer, then requantized from it: in one loop the table
    read kept the requantization from vectorizing in the sequential twin (2.3x slower)."""
    y = np.empty(x.shape[1], np.int16)
    for j in range(x.shape[1]):
        y[j] = full[np.int32(x[r, j]) + _INT16_OFFSET]
    for j in range(x.shape[1]):
        out[r, j] = requant_narrow(y[j], plan, j, lo, hi, mode)


@njit(cache=True, parallel=True)
def lut_interp16_requant_rows(x, full, plan, lo, hi, mode, out, looked_up):
    """out[i, j] = requant_one(LutInterp16(x[i, j])) with channel j's parameters; the
    looked-up values are also written to looked_up when it has rows (a traced run)."""
    rows, cols = x.shape
    keep = looked_up.shape[0] > 0
    narrow = plan[NARROW, 0] != 0
    for r in prange(rows):
        if narrow and not keep:
            # The exporter's rounding as a constant: LLVM then drops the other modes'
            # branches from the loop (left in, they made the requantization 1.5x slower).
            if mode == HALF_EVEN:
                _narrow_row(x, r, full, plan, lo, hi, HALF_EVEN, out)
            else:
                _narrow_row(x, r, full, plan, lo, hi, mode, out)
        elif keep:
            for j in range(cols):
                y = full[np.int32(x[r, j]) + _INT16_OFFSET]
                looked_up[r, j] = y
                out[r, j] = requant_one(np.int64(y), plan, j, lo, hi, mode)
        else:
            for j in range(cols):
                out[r, j] = requant_one(np.int64(full[np.int32(x[r, j]) + _INT16_OFFSET]), plan, j, lo, hi, mode)


class LutInterp16Kernel:
    """LutInterp16 with a constant table the op accepts, as the op's output for every
    int16 input."""

    def __init__(self, full: np.ndarray):
        self.full = full

    @classmethod
    def prepare(cls, table) -> "LutInterp16Kernel | None":
        t = np.asarray(table)
        if t.dtype.kind not in "iu" or t.shape != (LUT_INTERP_SIZE,):
            return None
        try:
            return cls(np.ascontiguousarray(LutInterp16(np.arange(-_INT16_OFFSET, _INT16_OFFSET, dtype=np.int16), t)))
        except OpError:
            return None  # the op refuses the table at run time, naming the node

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
        lut_interp16_rows(rows, self.full, out)
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
            lut_interp16_requant_rows(rows, self.full, plan, lo, hi, mode, out, looked_up)
            return (looked_up.reshape(x.shape) if keep else None), out.reshape(x.shape)

        return fused


@kernel("LutInterp16")
def lut_interp16(attrs, consts, declared):
    """A constant table."""
    if 1 not in consts:
        return None
    return LutInterp16Kernel.prepare(consts[1])
