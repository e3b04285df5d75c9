"""Integer math the nonlinear ops share: exact floor square root, exact shifts, int32 wrap.

Every function exists as a Numba scalar kernel (for use inside other kernels) and, where
ops need it on whole arrays, as a NumPy twin with identical results.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..errors import OpError
from ..jit import njit

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MAX = (1 << 63) - 1


# --- floor square root -----------------------------------------------------------------


@njit(cache=True, inline="always")
def isqrt_scalar(n):
    """floor(sqrt(n)) for 0 <= n <= 2^63 - 1, exactly, with integers only.

    The digit-by-digit method: `bit` walks the even powers of two from 2^62 down, `res`
    holds the root found so far scaled by `bit`; no intermediate exceeds 2^63 - 1.
    """
    res = np.int64(0)
    bit = np.int64(1) << np.int64(62)
    while bit > n:
        bit >>= 2
    while bit != 0:
        trial = res + bit
        if n >= trial:
            n -= trial
            res = (res >> 1) + bit
        else:
            res >>= 1
        bit >>= 2
    return res


def _np_isqrt(n: np.ndarray) -> np.ndarray:
    """The same digit-by-digit method on whole arrays (32 steps cover 2^62)."""
    n = np.array(n, dtype=np.int64, copy=True)
    res = np.zeros_like(n)
    bit = np.int64(1) << np.int64(62)
    for _ in range(32):
        trial = res + bit
        take = n >= trial
        n = np.where(take, n - trial, n)
        res = np.where(take, (res >> 1) + bit, res >> 1)
        bit >>= np.int64(2)
    return res


@njit(cache=True, parallel=False)
def _nb_isqrt(flat, out):
    for i in range(flat.size):
        out[i] = isqrt_scalar(flat[i])


def isqrt(n) -> np.ndarray:
    """Elementwise floor(sqrt(n)) of non-negative int64 values, exact for every int64."""
    n = np.asarray(n, dtype=np.int64)
    if n.size and int(n.min()) < 0:
        raise OpError("isqrt: negative input")
    if backend.use_numba():
        flat = np.ascontiguousarray(n).reshape(-1)
        out = np.empty_like(flat)
        _nb_isqrt(flat, out)
        return out.reshape(n.shape)
    return _np_isqrt(n)


# --- shifts and wrapping ---------------------------------------------------------------


@njit(cache=True, inline="always")
def shr(v, s):
    """floor(v / 2^s) for any s >= 0 (shifts past 63 are clamped: LLVM leaves them undefined)."""
    return v >> min(s, 63)


@njit(cache=True, inline="always")
def wrap32(v):
    """v modulo 2^32 as a signed int32 value: what an int32 register holds after overflow."""
    return ((v + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def np_wrap32(v):
    return ((np.asarray(v, np.int64) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


@njit(cache=True, inline="always")
def clz32(u):
    """Leading zero bits of a 32-bit unsigned value 0 < u < 2^32."""
    count = 0
    while u < (1 << 31):
        u <<= 1
        count += 1
    return count


def np_clz32(u):
    u = np.asarray(u, np.int64)
    count = np.zeros(u.shape, np.int64)
    for step in (16, 8, 4, 2, 1):
        small = u < (np.int64(1) << np.int64(32 - step))
        u = np.where(small, u << np.int64(step), u)
        count += np.where(small, step, 0)
    return count


def np_shr(v, s):
    return np.right_shift(np.asarray(v, np.int64), np.minimum(np.asarray(s, np.int64), 63))


# --- divisions ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def trunc_div(a, b):
    """C division a / b for b > 0: the quotient rounded toward zero."""
    q = a // b
    if a < 0 and q * b != a:
        q += 1
    return q


@njit(cache=True, inline="always")
def div_half_even(a, b):
    """a / b for b > 0 rounded to the nearest integer, ties to even (torch.round of a mean)."""
    q = a // b
    twice_r = 2 * (a - q * b)
    if twice_r > b or (twice_r == b and (q & 1) == 1):
        q += 1
    return q
