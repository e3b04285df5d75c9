"""The epilogue of the integer GEMMs (AVX2 and VNNI): a block of int32 sums plus the
column correction, stored as they are or requantized, one B panel's columns at a time.

Both take the panel's columns of the requantization plan and the correction copied into
small contiguous buffers first (`panel_params`), and run each case as its own loop, so the
narrow requantization (sums and multipliers within int32) vectorizes.
"""

from __future__ import annotations

import numpy as np

from ..jit import njit
from ..ops.rounding import FLOOR, HALF_AWAY, HALF_EVEN, HALF_UP
from .requant import MUL, MULTIPLY_ONLY, NARROW, requant_narrow, requant_one


@njit(cache=True, inline="always")
def panel_params(plan, add, c0, cols, requant, panel_plan, panel_add):
    """Copy one panel's columns of the requantization plan and the column correction into
    small contiguous buffers. The plan's rows lie n * 8 bytes apart: for n = 1536 (12 KiB,
    a multiple of 4 KiB) all ten map to the same L1 set, and reading them in place made
    the epilogue of a 256-row product five times slower than its GEMM."""
    if requant:  # else the plan is a placeholder
        for r in range(plan.shape[0]):
            src = plan[r, c0:c0 + cols]  # a view, indexed from 0: plan[r, c0 + jj] compiled to gathers
            for jj in range(cols):
                panel_plan[r, jj] = src[jj]
    src_add = add[c0:c0 + cols]
    for jj in range(cols):
        panel_add[jj] = src_add[jj]


@njit(cache=True, inline="always")
def _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, mode, out):
    """out[row0 + i, c0 + jj] = requant_narrow(tile[i, jj] + add[jj]): inlined where mode is
    a constant, so that LLVM folds the rounding's branches out of the vector loop."""
    for i in range(rows):
        dst = out[row0 + i, c0:c0 + cols]
        for jj in range(cols):
            dst[jj] = requant_narrow(tile[i, jj] + add[jj], plan, jj, out_lo, out_hi, mode)


@njit(cache=True, inline="always")
def epilogue(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, mode, requant, out, acc_out, keep_acc):
    """out[row0 + i, c0 + jj] = epilogue(tile[i, jj] + add[jj]), with this panel's
    correction and plan (`panel_params`). Each case is its own loop, so the plain sums
    vectorize (a branch inside the loop kept it scalar). Each row is written through a
    view of its block (contiguous, so LLVM vectorizes it; its indices, from range(), are
    known non-negative, where c0 + jj was not, and a wraparound check per element halved
    the requantization's speed). The narrow requantization runs one loop per rounding
    (the rounding's branches inside the vector loop cost as much again)."""
    if keep_acc:
        for i in range(rows):
            acc_dst = acc_out[row0 + i, c0:c0 + cols]
            for jj in range(cols):
                acc_dst[jj] = tile[i, jj] + add[jj]
    if requant and plan[NARROW, 0]:  # the corrected sums fit int32 (matmul.int32_exact)
        if mode == HALF_EVEN:
            _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, HALF_EVEN, out)
        elif mode == HALF_UP:
            _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, HALF_UP, out)
        elif mode == FLOOR:
            _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, FLOOR, out)
        elif mode == HALF_AWAY:
            _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, HALF_AWAY, out)
        else:
            _narrow_rows(tile, rows, row0, c0, cols, add, plan, out_lo, out_hi, mode, out)
    elif requant and plan[MULTIPLY_ONLY, 0]:  # a Mul by a constant (matmul.MulAsRequant)
        for i in range(rows):
            dst = out[row0 + i, c0:c0 + cols]
            for jj in range(cols):
                # Both factors within int32 (the plan's flag, the caller's bounds): written so,
                # LLVM multiplies with VPMULDQ instead of the three-multiply int64 product.
                product = np.int64(np.int32(tile[i, jj] + add[jj])) * np.int64(np.int32(plan[MUL, jj]))
                dst[jj] = min(max(product, out_lo), out_hi)
    elif requant:
        for i in range(rows):
            dst = out[row0 + i, c0:c0 + cols]
            for jj in range(cols):
                dst[jj] = requant_one(np.int64(tile[i, jj] + add[jj]), plan, jj, out_lo, out_hi, mode)
    else:
        for i in range(rows):
            dst = out[row0 + i, c0:c0 + cols]
            for jj in range(cols):
                dst[jj] = tile[i, jj] + add[jj]
