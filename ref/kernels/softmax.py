"""IBertSoftmax (I-BERT's i-exp softmax) with its exponential tabulated once per node.

The formula is `refsim.ops.softmax.IBertSoftmax` (docs/OPS.md): per row, with d = x -
max(kept x), e = iexp(d), out = (e * (2^32 // sum(e))) >> (32 - output_bit). The
exponential depends on d alone, so it is tabulated at plan time from the op's own NumPy
`_np_ibert_exp`; the table is exact by construction. It is also short:

- iexp clamps d at n*x0_int first, so every d <= n*x0_int gives iexp(n*x0_int): a table of
  the differences 0 .. -n*x0_int, read at min(-d, last), holds every difference there is;
- its trailing run of equal entries (the zeros past where the exponential has rounded to
  0: from 5520 on for MiniLM's attributes, of the 65536 an int16 input can reach) needs
  only its first entry, read for every larger difference.

The exponential need not fall monotonically for every b_int and c_int the op takes, so
the cut relies on the clamp and on the run of equal entries found, nothing else. For an
input of at most 16 bits the table stops at the difference 65535; for a 32-bit input it
must reach the clamp (tables up to 2^20 entries are built: -n*x0_int <= 2^20, an input
scale of 2e-5 or coarser), else the op computes it. Entries lie in [0, 2^(exp_bit-1) - 1]
and are stored in the narrowest unsigned type that holds them (uint16 for exp_bit 16:
MiniLM's table is 11 KiB, in L1).

A mask that is the same along x's rows axis (key padding (batch, 1, 1, cols), per head
(batch, heads, 1, cols), one of the last axis) is read as one list of kept columns per
matrix of x, never broadcast to x's shape: only those columns are computed, the others
output 0. Any other mask (causal, per row) is broadcast as the op does, and each row's
kept columns are listed without branches (a random mask mispredicts every other one).
Each element's exponential is looked up once into a row buffer. Anything the kernel does
not take (other dtypes, an empty or 0-d input, a mask that does not broadcast, attributes
the op refuses) goes to the op, which computes it or raises its error.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..errors import OpError
from ..jit import njit, prange
from ..ops.softmax import IBertSoftmax, _check_ibert_softmax_bounds, _ibert_softmax_type, _np_ibert_exp, _zero_exp_message
from .registry import kernel

_SPAN16 = (1 << 16) - 1  # the largest difference a 16-bit input can have
_SPAN32 = 1 << 20  # the longest table built for a 32-bit input (its clamp -n*x0_int: S >= 2e-5)
_TASKS = 16  # row blocks, each with its own row buffer (a fixed count: Numba caches the kernel)
_WORK32, _WORK64 = np.empty(0, np.int32), np.empty(0, np.int64)  # row buffer types (see the kernel)


@njit(cache=True, inline="always")
def _scaled(e, factor, out_shift):
    """(e * factor) >> out_shift for a row whose exponentials sum to at least 2: then
    factor = 2^32 // sum <= 2^31 and e <= 2^31 - 1, a 32 x 32 -> 64-bit product (one
    vector multiply for AVX2)."""
    return (np.uint64(e) * np.uint64(np.uint32(factor))) >> np.uint64(out_shift)


@njit(cache=True, inline="always")
def _softmax_row(x, r, kept, table, last, out_shift, xs, es, out, zero_rows):
    """Row r of out: IBertSoftmax of x[r] over the columns `kept` (ascending; all of
    them when there are x.shape[1]), 0 elsewhere; or zero_rows[r] set when the kept
    exponentials sum to 0. xs and es are the row's buffers (values, exponentials)."""
    n = x.shape[1]
    k = kept.shape[0]
    every = k == n
    if not every:
        for j in range(n):
            out[r, j] = 0
        if k == 0:
            return
        for i in range(k):
            xs[i] = x[r, kept[i]]
    else:  # contiguous: the copy and the max vectorize
        for j in range(n):
            xs[j] = x[r, j]
    top = xs[0]
    for i in range(1, k):
        top = max(top, xs[i])
    total = np.int64(0)
    for i in range(k):  # an unsigned index: no wraparound for negative ones (1.4x faster)
        e = table[min(np.uint64(top - xs[i]), last)]
        es[i] = e
        total += e
    if total == 0:
        zero_rows[r] = True
    elif total == 1:  # factor 2^32: the one exponential of 1 gives 2^output_bit
        for i in range(k):
            out[r, i if every else kept[i]] = (np.int64(es[i]) << 32) >> out_shift
    elif every:
        factor = (np.int64(1) << 32) // total
        for j in range(n):
            out[r, j] = _scaled(es[j], factor, out_shift)
    else:
        factor = (np.int64(1) << 32) // total
        for i in range(k):
            out[r, kept[i]] = _scaled(es[i], factor, out_shift)


@njit(cache=True, parallel=True)
def ibert_softmax_column_lists(x, starts, cols, group_rows, work, table, last, out_shift, out, zero_rows):
    """IBertSoftmax of each row r of x over the kept columns of its group g = r //
    group_rows, cols[starts[g]:starts[g + 1]] (ascending); the others output 0. `work`
    gives the row buffer's type (int32 holds the differences of a 16-bit input, int64
    those of 32 bits). Rows whose exponentials sum to 0 are flagged in zero_rows, their
    outputs unwritten."""
    rows, n = x.shape
    tasks = min(rows, _TASKS)
    for t in prange(tasks):
        xs = np.empty(n, work.dtype)
        es = np.empty(n, np.uint32)  # the row's exponentials, each looked up once
        for r in range(t * rows // tasks, (t + 1) * rows // tasks):
            g = r // group_rows
            _softmax_row(x, r, cols[starts[g]:starts[g + 1]], table, last, out_shift, xs, es, out, zero_rows)


@njit(cache=True, parallel=True)
def ibert_softmax_row_masks(x, keep, work, table, last, out_shift, out, zero_rows):
    """The same with each row's own kept columns, where keep[r] is nonzero."""
    rows, n = x.shape
    tasks = min(rows, _TASKS)
    for t in prange(tasks):
        xs = np.empty(n, work.dtype)
        es = np.empty(n, np.uint32)
        cols = np.empty(n, np.int64)
        for r in range(t * rows // tasks, (t + 1) * rows // tasks):
            k = 0
            for j in range(n):  # the row's kept columns, without a branch
                cols[k] = j
                k += keep[r, j] != 0
            _softmax_row(x, r, cols[:k], table, last, out_shift, xs, es, out, zero_rows)


def exp_table(x0_int, b_int, c_int, n, exp_mul, exp_shift, exp_bit, span=_SPAN16):
    """(table, complete): iexp(-i) = table[min(i, len(table) - 1)] for every difference i
    >= 0 when complete, for i <= span otherwise (see the module docstring)."""
    clamp = -n * x0_int  # iexp(-i) = iexp(-clamp) for every i >= clamp
    params = (x0_int, b_int, c_int, n, exp_mul, exp_shift, (1 << (exp_bit - 1)) - 1)
    size = min(clamp, span) + 1
    step = 1 << 16  # in pieces: the formula's int64 temporaries stay small
    e = np.concatenate([_np_ibert_exp(-np.arange(i, min(i + step, size), dtype=np.int64), *params) for i in range(0, size, step)])
    differs = np.flatnonzero(e != e[-1])
    e = e[: (int(differs[-1]) + 2 if differs.size else 1)]  # the trailing run's first entry ends it
    storage = np.uint8 if e.max() <= 0xFF else np.uint16 if e.max() <= 0xFFFF else np.uint32
    table = e.astype(storage)
    table.setflags(write=False)
    return table, clamp <= span


class IBertSoftmaxKernel:
    """IBertSoftmax on a table prepared for the node's attributes."""

    def __init__(self, attrs, span=_SPAN16):
        self.attrs = dict(attrs)
        self.table, complete = exp_table(*(attrs[k] for k in ("x0_int", "b_int", "c_int", "n", "exp_mul", "exp_shift", "exp_bit")), span)
        self.last = np.uint64(self.table.size - 1)
        # Input dtypes whose differences the table covers (beyond 32 bits: the op's int64 differences may wrap).
        self.dtypes = {np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16) + ((np.int32, np.uint32) if complete else ())}
        self.storage = _ibert_softmax_type(attrs["output_bit"]).storage
        self.out_shift = 32 - attrs["output_bit"]
        self._lists: dict[tuple, tuple] = {}

    @classmethod
    def prepare(cls, attrs, declared) -> "IBertSoftmaxKernel | None":
        try:
            _check_ibert_softmax_bounds(*(attrs[k] for k in ("x0_int", "b_int", "c_int", "n", "exp_mul", "exp_shift")), "")
        except OpError:
            return None  # the op refuses these attributes, naming the node
        x = declared[0] if declared else None
        wide = x is not None and np.dtype(x.dtype.storage).itemsize > 2
        # A 32-bit input needs the whole table, up to the clamp (at most _SPAN32 entries).
        chosen = cls(attrs, _SPAN32 if wide else _SPAN16)
        if x is not None and np.dtype(x.dtype.storage) not in chosen.dtypes:
            return None
        return chosen

    def _column_lists(self, mask, shape):
        """(starts, cols, group_rows) for `ibert_softmax_column_lists` when the mask is
        the same along x's rows axis (None: every column), else None."""
        n = shape[-1]
        rows_axis = shape[-2] if len(shape) > 1 else 1
        if mask is None:
            return np.array([0, n]), np.arange(n), math.prod(shape[:-1])
        mask = np.asarray(mask)
        if mask.ndim > 1 and mask.shape[-2] != 1 and rows_axis != 1:
            return None  # it differs from row to row
        try:
            if np.broadcast_shapes(mask.shape, shape) != shape:
                return None
        except ValueError:
            return None
        key = (mask.shape, mask.dtype.str, shape[:-1], mask.tobytes()) if mask.size <= 1 << 12 else None
        lists = self._lists.get(key)
        if lists is None:
            groups = shape[:-2] + (1, n)  # one kept-column list per matrix of x
            keep = (np.broadcast_to(mask, groups) != 0).reshape(-1, n)
            group, cols = np.nonzero(keep)
            starts = np.zeros(keep.shape[0] + 1, np.int64)
            np.cumsum(np.bincount(group, minlength=keep.shape[0]), out=starts[1:])
            lists = starts, cols, rows_axis
            if key is not None and len(self._lists) < 64:  # a model sees few masks: its padding lengths
                self._lists[key] = lists
        return lists

    def __call__(self, x, mask=None):
        x = np.asarray(x)
        if not (backend.use_numba() and x.dtype in self.dtypes and x.ndim and x.size):
            return IBertSoftmax(x, mask, **self.attrs)
        n = x.shape[-1]
        x2 = np.ascontiguousarray(x).reshape(-1, n)
        zero_rows = np.zeros(x2.shape[0], np.bool_)
        out = np.empty(x2.shape, self.storage)
        lists = self._column_lists(mask, x.shape)
        work = _WORK32 if x.dtype.itemsize <= 2 else _WORK64
        if lists is not None:
            starts, cols, group_rows = lists
            ibert_softmax_column_lists(x2, starts, cols, group_rows, work, self.table, self.last, self.out_shift, out, zero_rows)
        else:
            try:
                keep = np.broadcast_to(np.asarray(mask) != 0, x.shape)
            except ValueError:
                return IBertSoftmax(x, mask, **self.attrs)  # which names the shapes
            keep = np.ascontiguousarray(keep).reshape(x2.shape)
            ibert_softmax_row_masks(x2, keep, work, self.table, self.last, self.out_shift, out, zero_rows)
        if zero_rows.any():
            raise OpError(_zero_exp_message("IBertSoftmax", int(np.argmax(zero_rows))))
        return out.reshape(x.shape)


@kernel("IBertSoftmax")
def ibert_softmax(attrs, consts, declared):
    """Attributes the op accepts, an input of at most 16 bits (32 when the table is complete)."""
    return IBertSoftmaxKernel.prepare(attrs, declared)
