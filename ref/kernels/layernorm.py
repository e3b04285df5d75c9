"""IBertLayerNorm with the Requant after it fused: one pass per row writes the int64
normalised row (which the residual branch reads too) and its requantization.

The formulas are `refsim.ops.layernorm.IBertLayerNorm` and `refsim.ops.rounding.requantize`
(docs/OPS.md). Each row's mean, sum of squares and factor are computed as in the op's
kernel; a row whose sum of squares reaches 2^32, or whose values the Requant's declared
input type does not keep within int64 after x*mul + bias, sends the whole call back to
the two ops, which refuse it naming the bound.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..jit import njit, prange
from ..ops.layernorm import _BIAS_LIMIT, IBertLayerNorm, ibert_row_mean_factor
from ..ops.rounding import HALF_EVEN
from .registry import kernel
from .requant import INT64_MAX, NARROW, requant_narrow, requant_one

_INT32_MAX = (1 << 31) - 1


@njit(cache=True, inline="always")
def _narrow_row(x, r, mean, factor, bias, plan, lo, hi, mode, y, out):
    """Row r when its differences and factor fit int32 and every |y| is at most
    min(limit, 2^31 - 1) (`narrow_row_bound`): one 32 x 32-bit product per value and the
    narrow requantization, no per-value bound check. Two loops, the second reading the
    row back from L1: a fifth faster than one."""
    f32 = np.int32(factor)
    for j in range(x.shape[1]):
        d = np.int32(np.int64(x[r, j]) - mean)
        y[r, j] = ((np.int64(d) * np.int64(f32)) >> 1) + bias[j]
    for j in range(x.shape[1]):
        out[r, j] = requant_narrow(y[r, j], plan, j, lo, hi, mode)


@njit(cache=True)  # not inlined: in the caller's loop it made the narrow rows a third slower
def _row(x, r, mean, factor, bias, plan, limit, lo, hi, mode, y, out):
    """Any other row, in int64; returns whether some |y| exceeds `limit`."""
    smallest, largest = np.int64(0), np.int64(0)  # scalars: the loop vectorizes
    for j in range(x.shape[1]):
        v = (((np.int64(x[r, j]) - mean) * factor) >> 1) + bias[j]
        y[r, j] = v
        smallest, largest = min(smallest, v), max(largest, v)
        out[r, j] = requant_one(v, plan, j, lo, hi, mode)
    return largest > limit or smallest < -limit


@njit(cache=True)
def narrow_row_bound(spread, factor, bias_bound):
    """A bound on the row's |y| = |((x - mean) * factor) >> 1 + bias|, or -1 when its
    differences (|x - mean| <= spread) or its factor do not fit int32. Both below 2^31:
    spread * factor < 2^62, and with |bias| < 2^62 the sum stays within int64."""
    if spread < 0 or spread > _INT32_MAX or factor > _INT32_MAX:
        return np.int64(-1)
    return ((spread * factor + 1) >> 1) + bias_bound


@njit(cache=True, parallel=True)
def ibert_layernorm_requant_rows(x, bias, bias_bound, shift, plan, limit, lo, hi, mode, y, out):
    """y = IBertLayerNorm(x) row by row, out = requant_one(y) with channel j's parameters.
    Returns whether a row failed: its sum of squares reached 2^32, or some |y| exceeded
    `limit` (the Requant's int64 bound); then the caller runs the ops. `bias_bound` is
    max |bias|."""
    rows, n = x.shape
    bad = np.zeros(rows, np.bool_)
    narrow_plan = plan[NARROW, 0] != 0
    for r in prange(rows):
        mean, factor, spread = ibert_row_mean_factor(x, r, shift)
        if factor < 0:
            bad[r] = True
            continue
        bound = narrow_row_bound(spread, factor, bias_bound)
        if narrow_plan and 0 <= bound <= min(limit, _INT32_MAX):
            # The exporter's rounding as a constant: LLVM then drops the other modes'
            # branches from the loop (left in, they cost a third of the row).
            if mode == HALF_EVEN:
                _narrow_row(x, r, mean, factor, bias, plan, lo, hi, HALF_EVEN, y, out)
            else:
                _narrow_row(x, r, mean, factor, bias, plan, lo, hi, mode, y, out)
            continue
        bad[r] = _row(x, r, mean, factor, bias, plan, limit, lo, hi, mode, y, out)
    return bad.any()


class IBertLayerNormKernel:
    """IBertLayerNorm with a constant (or no) bias: the op itself, and its fusion with a
    prepared Requant."""

    def __init__(self, shift: int, bias):
        self.shift = shift
        self.bias = None if bias is None else np.asarray(bias)

    def __call__(self, x, bias=None):
        return IBertLayerNorm(x, bias, shift=self.shift)

    def _bias_row(self, n: int):
        """The bias as n int64 values, or None where the op would refuse it."""
        if self.bias is None:
            return np.zeros(n, np.int64)
        b = self.bias
        if b.dtype.kind not in "iu" or b.size not in (1, n):
            return None
        b = np.ascontiguousarray(np.broadcast_to(b.reshape(-1).astype(np.int64), (n,)))
        return b if (not b.size or max(-int(b.min()), int(b.max())) < _BIAS_LIMIT) else None

    def fuse(self, consumer, run_consumer):
        """LayerNorm and the Requant after it in one pass. The LayerNorm's output is
        always written as well (keep): the residual branch reads it."""
        if not hasattr(consumer, "plan_for") or not backend.use_numba() or not 0 <= self.shift <= 30:
            return None
        storage, (lo, hi, mode), shift = consumer.storage, consumer.out_range, self.shift
        limit = INT64_MAX if consumer.limit is None else consumer.limit
        rows_for: dict[int, tuple[np.ndarray, int] | None] = {}

        def fused(x, *bias_given, keep=False):
            x = np.asarray(x)
            n = x.shape[-1] if x.ndim else 0
            if n not in rows_for:
                b = self._bias_row(n) if n else None
                rows_for[n] = None if b is None else (b, max(-int(b.min()), int(b.max())))
            bias = rows_for[n]
            plan = None if bias is None or x.dtype.kind not in "iu" or not x.size else consumer.plan_for(n)
            if plan is not None:
                x2 = np.ascontiguousarray(x).reshape(-1, n)
                y = np.empty(x2.shape, np.int64)
                out = np.empty(x2.shape, storage)
                if not ibert_layernorm_requant_rows(x2, *bias, shift, plan, limit, lo, hi, mode, y, out):
                    return y.reshape(x.shape), out.reshape(x.shape)
            inner = self(x, *bias_given)
            return inner, run_consumer(inner)

        fused.keeps_output = True  # its first result is always there: other readers may share it
        return fused


@kernel("IBertLayerNorm")
def ibert_layernorm(attrs, consts, declared):
    """A constant bias, or none."""
    if len(declared) > 1 and declared[1] is not None and 1 not in consts:
        return None
    return IBertLayerNormKernel(attrs["shift"], consts.get(1))
