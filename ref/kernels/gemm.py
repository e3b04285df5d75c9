"""Exact integer GEMM against a constant weight matrix, on the fastest kernel available.

`PreparedWeight(b)` takes the (K, N) weight, already minus its zero point, once at load
time. `matmul(a, a_lo, a_hi)` then returns the exact product for activations whose values
are known (from their declared type) to lie in [a_lo, a_hi]:

- AMX (TDPBUSD, u8 x s8 -> int32) when the CPU and OS allow it, the weights fit int8 and
  the activations span at most 256 values: the activations are offset to u8
  (a' = a - a_lo) and the offset is taken back with the weights' column sums,
  a @ b = a' @ b + a_lo * colsum(b), exact while every sum fits int32 (checked);
- otherwise float32 BLAS on chunks of K short enough that every partial sum is an
  integer below 2^24 (then float64 below 2^53, then NumPy int64), as `exact_matmul`.
"""

from __future__ import annotations

import numpy as np

from . import cpu

INT32_MAX = (1 << 31) - 1


def _amx():
    """The AMX module if it can run here, else None (imported lazily: it compiles code)."""
    if not cpu.amx_usable():
        return None
    from . import amx

    return amx


class PreparedWeight:
    def __init__(self, b: np.ndarray):
        if b.ndim != 2:
            raise ValueError("PreparedWeight takes a 2-D (K, N) matrix")
        self.k, self.n = b.shape
        self.b = b
        self.lo = int(b.min()) if b.size else 0
        self.hi = int(b.max()) if b.size else 0
        self.bound = max(abs(self.lo), abs(self.hi))
        self.colsum = b.sum(axis=0, dtype=np.int64)
        self.packed = None
        amx = _amx()
        if amx is not None and -128 <= self.lo and self.hi <= 127 and self.k > 0 and self.n > 0:
            self.packed = amx.pack_b(b.astype(np.int8))
        self._float: dict[type, np.ndarray] = {}

    def as_float(self, ftype) -> np.ndarray:
        if ftype not in self._float:
            self._float[ftype] = self.b.astype(ftype)
        return self._float[ftype]

    def kernel_for(self, a_lo: int, a_hi: int) -> str:
        """Which kernel `matmul` uses for activations in [a_lo, a_hi]."""
        if self.packed is not None and a_hi - a_lo <= 255:
            a_bound = max(abs(a_lo), abs(a_hi))
            raw = self.k * 255 * max(abs(self.lo), abs(self.hi))
            exact = self.k * a_bound * self.bound
            if raw <= INT32_MAX and exact <= INT32_MAX:
                return "amx"
        return "blas"

    def matmul(self, a: np.ndarray, a_lo: int, a_hi: int) -> np.ndarray:
        """Exact a @ b (a: (..., K) with values in [a_lo, a_hi]); int32 or int64."""
        lead = a.shape[:-1]
        flat = a.reshape(-1, self.k)
        if self.kernel_for(a_lo, a_hi) == "amx":
            from . import amx

            if a_lo == -128 and a.dtype == np.int8:
                shifted = flat.view(np.uint8) ^ np.uint8(0x80)
            else:
                shifted = (flat.astype(np.int16) - a_lo).astype(np.uint8)
            acc = amx.gemm_u8s8(shifted, self.packed, self.k, self.n)
            if a_lo:
                acc += (a_lo * self.colsum).astype(np.int32)
            return acc.reshape(lead + (self.n,))
        from ..ops.matmul import FLOAT32_EXACT, exact_matmul

        a_bound = max(abs(a_lo), abs(a_hi))
        ftype = np.float32 if a_bound * self.bound <= FLOAT32_EXACT else np.float64
        return exact_matmul(a, self.as_float(ftype), a_bound, self.bound)
