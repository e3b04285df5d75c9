"""Exact integer GEMM against a constant weight matrix on AMX tiles, when the bounds allow.

`AmxWeight.prepare(b)` packs a (K, N) weight whose values (already minus their zero point)
fit int8, once at load time; it returns None when AMX is not usable here or the weight
does not fit. For activations `a` whose declared type spans [lo, hi] with hi - lo <= 255,
and a zero point zp, the product is computed as

    (a - zp) @ b = (a - lo) @ b + (lo - zp) * colsum(b)

with `a - lo` in [0, 255] fed to TDPBUSD (u8 x s8 -> int32). That is exact while every
int32 sum stays in range, which `fits_int32` checks from the bounds before each call.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from . import cpu

INT32_MAX = (1 << 31) - 1
# A product of at least this many multiply-adds is worth a fork/join of every thread
# (one 128 x 768 x 768 layer: 75 M MACs, 240 us on one core here).
PARALLEL_MIN_MACS = 1 << 25


class AmxWeight:
    def __init__(self, b: np.ndarray, packed: np.ndarray):
        self.k, self.n = b.shape
        self.bound = int(np.abs(b).max()) if b.size else 0
        self.colsum = b.sum(axis=0, dtype=np.int64)
        self.packed = packed

    @classmethod
    def prepare(cls, b: np.ndarray) -> "AmxWeight | None":
        if b.ndim != 2 or b.size == 0 or not cpu.amx_usable():
            return None
        if int(b.min()) < -128 or int(b.max()) > 127:
            return None
        from . import amx

        return cls(b, amx.pack_b(b.astype(np.int8)))

    def fits_int32(self, lo: int, hi: int, zero_point: int, bias_bound: int) -> bool:
        """Whether every partial and final sum for activations in [lo, hi] fits int32."""
        if hi - lo > 255:
            return False
        raw = self.k * (hi - lo) * self.bound
        exact = self.k * max(abs(lo - zero_point), abs(hi - zero_point)) * self.bound + bias_bound
        correction = abs(lo - zero_point) * self.k * self.bound + bias_bound
        return max(raw, exact, correction) <= INT32_MAX

    def matmul(self, a: np.ndarray, lo: int, zero_point: int, bias: np.ndarray | None) -> np.ndarray:
        """(a - zero_point) @ b + bias as int32, for a of shape (..., K) with values >= lo."""
        from . import amx

        lead = a.shape[:-1]
        flat = a.reshape(-1, self.k)
        if lo == -128 and flat.dtype == np.int8:
            shifted = flat.view(np.uint8) ^ np.uint8(0x80)
        elif lo == 0 and flat.dtype == np.uint8:
            shifted = flat
        else:
            shifted = (flat.astype(np.int16) - lo).astype(np.uint8)
        with backend.all_threads_if(flat.shape[0] * self.k * self.n >= PARALLEL_MIN_MACS):
            acc = amx.gemm_u8s8(shifted, self.packed, self.k, self.n)
        correction = (lo - zero_point) * self.colsum
        if bias is not None:
            correction = correction + bias
        if np.any(correction):
            acc += correction.astype(np.int32)
        return acc.reshape(lead + (self.n,))
