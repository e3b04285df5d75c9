"""Add, Sub and Mul in one vectorized pass, deciding at prepare time what must be checked.

The formula is `refsim.ops.elementwise` (exact int64, fitted into the output type by the
overflow policy; refused where a result may leave int64, judged as the op judges it). The
declared input types bound the results; when that bound fits both int64 and the output
type, a run is one pass with no check at all. When it does not fit int64, the operands'
extremes decide (as the op does, from their values): the same pass finds them, and its
results stand only if they show that every result fitted (else the op runs). When the
bound does not fit the output type, the one-pass kernel with the policy runs
(`refsim.ops.elementwise._arith_rows`). A constant operand is bounded by its own values.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..jit import njit, prange
from ..ops import elementwise as spec
from ..ops.rounding import HALF_EVEN, HALF_UP
from .registry import kernel
from .requant import requant_one

_OP_CODE = {"Add": 0, "Sub": 1, "Mul": 2}
INT64_MIN, INT64_MAX = spec.INT64_MIN, spec.INT64_MAX


@njit(cache=True, parallel=True)
def arith_rows(a, b, op, out):
    """out[i, j] = a[i, j] op b[i or 0, j] in int64, and (min a, max a, min b, max b): the
    operands' extremes, from which the caller decides afterwards whether every result
    fitted (as the op decides), without passes of their own. Results computed past int64
    are discarded by that decision."""
    rows, cols = a.shape
    b_step = 1 if b.shape[0] > 1 else 0
    lows_a, highs_a = np.empty(rows, np.int64), np.empty(rows, np.int64)
    lows_b, highs_b = np.empty(rows, np.int64), np.empty(rows, np.int64)
    for i in prange(rows):
        bi = i * b_step
        a_lo, a_hi = np.int64(a[i, 0]), np.int64(a[i, 0])  # scalars: the loops vectorize
        b_lo, b_hi = np.int64(b[bi, 0]), np.int64(b[bi, 0])
        for j in range(cols):
            x, y = np.int64(a[i, j]), np.int64(b[bi, j])
            a_lo, a_hi, b_lo, b_hi = min(a_lo, x), max(a_hi, x), min(b_lo, y), max(b_hi, y)
            if op == 0:
                out[i, j] = x + y
            elif op == 1:
                out[i, j] = x - y
            else:
                out[i, j] = x * y
        lows_a[i], highs_a[i], lows_b[i], highs_b[i] = a_lo, a_hi, b_lo, b_hi
    return lows_a.min(), highs_a.max(), lows_b.min(), highs_b.max()


@njit(cache=True, inline="always")
def _arith_requant_row(a, b, i, bi, op, plan, lo, hi, mode, out):
    """Row i of `arith_requant_rows` (without the kept sums): inlined where op and mode are
    constants, so that LLVM folds the other ops' and roundings' branches out of the vector
    loop. Returns the row's extremes: of a, of b, and of the results."""
    cols = a.shape[1]
    smallest, largest = np.int64(0), np.int64(0)  # kept in scalars: the loop vectorizes
    a_lo, a_hi = np.int64(a[i, 0]), np.int64(a[i, 0])
    b_lo, b_hi = np.int64(b[bi, 0]), np.int64(b[bi, 0])
    row_a, row_b, dst = a[i], b[bi], out[i]
    for j in range(cols):
        x, y = np.int64(row_a[j]), np.int64(row_b[j])
        a_lo, a_hi, b_lo, b_hi = min(a_lo, x), max(a_hi, x), min(b_lo, y), max(b_hi, y)
        v = x + y if op == 0 else (x - y if op == 1 else x * y)
        smallest, largest = min(smallest, v), max(largest, v)
        dst[j] = requant_one(v, plan, j, lo, hi, mode)
    return a_lo, a_hi, b_lo, b_hi, smallest, largest


@njit(cache=True, parallel=True)
def arith_requant_rows(a, b, op, plan, limit, lo, hi, mode, out, sums):
    """out[i, j] = requant_one(a[i, j] op b[i or 0, j]) with channel j's parameters: an Add,
    Sub or Mul and the Requant after it in one pass; the int64 results go to sums as well
    when it has rows (a traced run). Returns whether some |a op b| exceeded `limit`, the
    largest input for which the Requant's x*mul + bias stays within int64 (the caller then
    runs the two ops unfused, and the Requant refuses as it does), and the operands'
    extremes (as `arith_rows`), from which the caller decides whether the results fitted.
    The residual sums' Add with I-BERT's (half even) and ITA's (half up) roundings run as
    loops of their own with op and mode constant (one loop for all cost 1.2-1.3x)."""
    rows, cols = a.shape
    b_step = 1 if b.shape[0] > 1 else 0
    keep = sums.shape[0] > 0
    over = np.zeros(rows, np.bool_)
    lows_a, highs_a = np.empty(rows, np.int64), np.empty(rows, np.int64)
    lows_b, highs_b = np.empty(rows, np.int64), np.empty(rows, np.int64)
    for i in prange(rows):
        bi = i * b_step
        if op == 0 and mode == HALF_EVEN:
            a_lo, a_hi, b_lo, b_hi, smallest, largest = _arith_requant_row(a, b, i, bi, 0, plan, lo, hi, HALF_EVEN, out)
        elif op == 0 and mode == HALF_UP:
            a_lo, a_hi, b_lo, b_hi, smallest, largest = _arith_requant_row(a, b, i, bi, 0, plan, lo, hi, HALF_UP, out)
        else:
            a_lo, a_hi, b_lo, b_hi, smallest, largest = _arith_requant_row(a, b, i, bi, op, plan, lo, hi, mode, out)
        if keep:
            for j in range(cols):
                x, y = np.int64(a[i, j]), np.int64(b[bi, j])
                sums[i, j] = x + y if op == 0 else (x - y if op == 1 else x * y)
        over[i] = largest > limit or smallest < -limit
        lows_a[i], highs_a[i], lows_b[i], highs_b[i] = a_lo, a_hi, b_lo, b_hi
    return over.any(), lows_a.min(), highs_a.max(), lows_b.min(), highs_b.max()


class Arith:
    """A prepared Add, Sub or Mul for operands of the same shape, or a second operand that
    is a scalar or runs along the last axis."""

    def __init__(self, op_name: str, a_range, b_range, out_type, overflow: str, dtype_attr):
        """a_range, b_range: bounds of each operand's values (its declared type's, or a
        constant's own extremes)."""
        self.op_name, self.code = op_name, _OP_CODE[op_name]
        self.out_type, self.overflow, self.dtype_attr = out_type, overflow, dtype_attr
        self.spec = spec._ARITH_FNS[op_name]
        lo, hi = spec._RESULT_RANGE[op_name](a_range, b_range)
        self.within_int64 = INT64_MIN <= lo and hi <= INT64_MAX
        self.fits_output = out_type.lo <= lo and hi <= out_type.hi

    def _pass_fitted(self, a_lo, a_hi, b_lo, b_hi) -> bool:
        """Whether a one-pass kernel's results stand: the declared bounds proved they fit
        (`_may_run`), or the operands' extremes the pass returned show that every result
        fitted int64 and the output type with no policy, as the op decides from them."""
        if self.within_int64:
            return True
        lo, hi = spec._RESULT_RANGE[self.op_name]((int(a_lo), int(a_hi)), (int(b_lo), int(b_hi)))
        out = self.out_type
        return INT64_MIN <= lo and hi <= INT64_MAX and out.lo <= lo and hi <= out.hi

    def _may_run(self, a, b) -> bool:
        """Whether the one-pass kernels may run: always when the declared bounds prove the
        results fit; else when the operands are not empty and the extremes the pass returns
        will decide (`_pass_fitted`)."""
        if self.within_int64:
            return self.fits_output
        return bool(a.size and b.size)

    @staticmethod
    def _rows(a, b):
        """a and b as 2-D rows for the one-pass kernels (b with one row when it is a
        scalar or runs along the last axis), or None for other shapes."""
        if not (backend.use_numba() and a.ndim and a.size):
            return None
        cols = a.shape[-1]
        if b.shape == a.shape:
            b2 = np.ascontiguousarray(b).reshape(-1, cols)
        elif b.ndim <= a.ndim and (b.size == 1 or (b.shape[-1] == cols and b.size == cols)):
            b2 = np.ascontiguousarray(np.broadcast_to(b.reshape(-1), cols)).reshape(1, cols)
        else:
            return None
        return np.ascontiguousarray(a).reshape(-1, cols), b2

    def __call__(self, a, b):
        a, b = np.asarray(a), np.asarray(b)
        rows = self._rows(a, b)
        if rows is not None and self._may_run(a, b):
            a2, b2 = rows
            out = np.empty(a2.shape, self.out_type.storage)
            if self._pass_fitted(*arith_rows(a2, b2, self.code, out)):
                return out.reshape(a.shape)  # else the op's policy decides, below
        return self.spec(a, b, dtype=self.dtype_attr, overflow=self.overflow)

    def fuse(self, consumer, run_consumer):
        """This op and the Requant after it (`consumer`, prepared with constant parameters)
        in one pass. Each decision stays the ops' own: the result must fit int64 and the
        output type without an overflow policy (from the declared types, else from the
        operands' extremes, which the pass returns), and the Requant's x*mul + bias must
        stay within int64 (from the declared type, else checked value by value in the
        pass). A traced run gets the sum from the same pass; what the one-pass kernel does
        not take runs unfused."""
        if not hasattr(consumer, "plan_for") or not backend.use_numba():
            return None
        code, storage, (lo, hi, mode) = self.code, consumer.storage, consumer.out_range
        limit = INT64_MAX if consumer.limit is None else consumer.limit
        inner_storage = self.out_type.storage
        none = np.empty((0, 0), inner_storage)

        def fused(a, b, keep=False):
            a, b = np.asarray(a), np.asarray(b)
            rows = self._rows(a, b)
            plan = None if rows is None else consumer.plan_for(a.shape[-1])
            if plan is not None and self._may_run(a, b):
                a2, b2 = rows
                out = np.empty(a2.shape, storage)
                sums = np.empty(a2.shape, inner_storage) if keep else none
                over, *extremes = arith_requant_rows(a2, b2, code, plan, limit, lo, hi, mode, out, sums)
                if not over and self._pass_fitted(*extremes):
                    return (sums.reshape(a.shape) if keep else None), out.reshape(a.shape)
            inner = self(a, b)
            return inner, run_consumer(inner)

        return fused


def _operand_range(position: int, consts, declared) -> tuple[int, int]:
    """What an operand's values can be: a constant's own extremes (a scale such as 2^p
    declared int32 would otherwise bound an int16 x 2^p product by int16 x int32 and
    send every run through the overflow checks), else its declared type's range."""
    value = consts.get(position)
    if value is not None and value.size:
        return int(value.min()), int(value.max())
    t = declared[position].dtype
    return t.lo, t.hi


def _prepare(op_name):
    def prepare(attrs, consts, declared):
        a, b = declared[0].dtype, declared[1].dtype
        try:
            out = spec._arith_type(op_name, a, b, attrs["dtype"])
        except Exception:
            return None  # the op reports it at run time, naming the node
        return Arith(op_name, _operand_range(0, consts, declared), _operand_range(1, consts, declared), out,
                     attrs["overflow"], out.name)

    return prepare


for _name in _OP_CODE:
    kernel(_name)(_prepare(_name))
