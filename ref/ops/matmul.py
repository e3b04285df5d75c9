"""Integer matrix products, exact. (Faster kernels for the same integers, chosen when a
model is prepared, are in `refsim.kernels.matmul`.)

acc = (a - a_zero_point) @ (b - b_zero_point) + bias, then the accumulator policy.

Integer operands are multiplied in floating point only where that is provably exact: a
product of integers below 2^24 in magnitude is exact in float32, and so is every partial
sum as long as it stays at or below 2^24 (float64: 2^53). With P the largest possible
|product| (from the operands' bounds) the reduction dimension K is cut into chunks of at
most 2^24 // P, each chunk multiplied by float32 BLAS, and the exact chunk results summed
in int64. Wider operands go to float64 chunks, then to NumPy's int64 matmul, and a
product whose exact sum could leave int64 is refused. The NumPy backend always uses the
int64 matmul (the second, independent implementation the float route is checked against);
the Numba and spec backends take the float route.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import TYPES
from ..errors import GraphError, OpError
from .overflow import fit_signed_bits
from .registry import OVERFLOW_POLICIES, Bool, Int, OneOf, broadcast_shapes, op

FLOAT32_EXACT = 1 << 24
FLOAT64_EXACT = 1 << 53
INT64_LIMIT = (1 << 63) - 1


def _bound(array) -> int:
    """Largest |value|, taken from the values (cheap next to the matmul itself)."""
    array = np.asarray(array)
    if array.size == 0:
        return 0
    return max(abs(int(array.min())), abs(int(array.max())))


def check_sum_fits(k: int, a_bound: int, b_bound: int, bias_bound: int) -> None:
    """Every partial sum, and the sum plus bias, stays within int64."""
    if k * a_bound * b_bound + bias_bound > INT64_LIMIT:
        raise OpError(
            f"MatMul: a sum of {k} products up to {a_bound * b_bound} plus a bias up to "
            f"{bias_bound} may exceed int64"
        )


def exact_matmul(a: np.ndarray, b: np.ndarray, a_bound: int, b_bound: int) -> np.ndarray:
    """a @ b as exact int64, given |a| <= a_bound and |b| <= b_bound elementwise.

    Refused (OpError) when k * a_bound * b_bound could leave int64; a caller adding a bias
    checks that sum too (`check_sum_fits`). `b` may already be a float32/float64 array
    holding integers (prepared weights).
    """
    k = a.shape[-1]
    check_sum_fits(k, a_bound, b_bound, 0)
    product = a_bound * b_bound
    if product == 0 or k == 0:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        return np.zeros(shape, np.int64)
    if backend.current() == "numpy":
        return _int64_matmul(a, b)
    if product <= FLOAT32_EXACT:
        return _chunked(a, b, FLOAT32_EXACT // product, np.float32)
    if product <= FLOAT64_EXACT:
        return _chunked(a, b, FLOAT64_EXACT // product, np.float64)
    return _int64_matmul(a, b)


def _int64_matmul(a, b):
    return np.matmul(np.asarray(a, np.int64), np.asarray(b, np.int64))


def _chunked(a, b, chunk: int, ftype) -> np.ndarray:
    k = a.shape[-1]
    af = a.astype(ftype, copy=False)
    bf = b.astype(ftype, copy=False)
    if k <= chunk:
        return np.matmul(af, bf).astype(np.int64)
    total = None
    for start in range(0, k, chunk):
        part = np.matmul(af[..., start : start + chunk], bf[..., start : start + chunk, :]).astype(np.int64)
        total = part if total is None else total + part
    return total


def _minus_zero_point(x, zp, what: str):
    """x - zp exactly; refused where int64 extremes would wrap."""
    x = np.asarray(x)
    if zp is None:
        return x
    zp = np.asarray(zp)
    if zp.size == 0 or not np.any(zp):
        return x
    if x.dtype.itemsize >= 8 and x.size and not (
        -INT64_LIMIT - 1 <= int(x.min()) - int(zp.max()) and int(x.max()) - int(zp.min()) <= INT64_LIMIT
    ):
        raise OpError(f"MatMul: {what} minus its zero point leaves int64")
    return x.astype(np.int64) - zp.astype(np.int64)


def _b_zero_point_view(zp, columns: int):
    """b_zero_point: scalar, or one entry per output column (broadcast along the last axis)."""
    if zp is None:
        return None
    zp = np.asarray(zp)
    if zp.ndim > 1 or (zp.size != 1 and zp.size != columns):
        raise OpError(f"MatMul: b_zero_point must be a scalar or have one entry per column ({columns}), got shape {zp.shape}")
    return zp.reshape(-1) if zp.ndim else zp


def _bias_view(bias, columns: int):
    if bias is None:
        return None
    bias = np.asarray(bias)
    if bias.ndim > 1 or (bias.size != 1 and bias.size != columns):
        raise OpError(f"MatMul: bias must be a scalar or have one entry per column ({columns}), got shape {bias.shape}")
    return bias.astype(np.int64)


def _operands(a, b, a_zero_point, b_zero_point, transA, transB):
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim < 2 or b.ndim < 2:
        raise OpError(f"MatMul: operands must have rank >= 2, got {a.shape} and {b.shape}")
    if transA:
        a = np.swapaxes(a, -1, -2)
    if transB:
        b = np.swapaxes(b, -1, -2)
    if a.shape[-1] != b.shape[-2]:
        raise OpError(f"MatMul: inner dimensions differ: {a.shape} @ {b.shape}")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise OpError(f"MatMul: batch dimensions do not broadcast: {a.shape} @ {b.shape}") from None
    if a_zero_point is not None and np.asarray(a_zero_point).size != 1:
        raise OpError("MatMul: a_zero_point must be a scalar")
    a = _minus_zero_point(a, a_zero_point, "a")
    b = _minus_zero_point(b, _b_zero_point_view(b_zero_point, b.shape[-1]), "b")
    return a, b


def _finish(acc, bias, acc_bits, overflow):
    if bias is not None:
        acc = acc + bias
    acc = fit_signed_bits(acc, acc_bits, overflow, "MatMul: accumulator")
    return acc.astype(np.int32 if acc_bits <= 32 else np.int64, copy=False)


def _infer(ins, attrs):
    a, b = ins[0], ins[1]
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise GraphError(f"operands must have rank >= 2, got {list(a.shape)} and {list(b.shape)}")
    sa = list(a.shape)
    sb = list(b.shape)
    if attrs["transA"]:
        sa[-1], sa[-2] = sa[-2], sa[-1]
    if attrs["transB"]:
        sb[-1], sb[-2] = sb[-2], sb[-1]
    if isinstance(sa[-1], int) and isinstance(sb[-2], int) and sa[-1] != sb[-2]:
        raise GraphError(f"inner dimensions differ: {sa} @ {sb}")
    batch = broadcast_shapes(tuple(sa[:-2]), tuple(sb[:-2]))
    out = TYPES["int32"] if attrs["acc_bits"] <= 32 else TYPES["int64"]
    return [(out, batch + (sa[-2], sb[-1]))]


def _declared_bound(t, zp) -> int:
    """Largest |x - zp| a tensor of declared type t can reach."""
    zps = [0] if zp is None else [int(v) for v in np.asarray(zp).reshape(-1)] or [0]
    return max(max(abs(t.lo - z), abs(t.hi - z)) for z in zps)


@op(
    "MatMul",
    inputs=["a", "b", "a_zero_point?", "b_zero_point?", "bias?"],
    attrs=dict(
        transA=Bool(),
        transB=Bool(),
        acc_bits=Int(min=2, max=64),
        overflow=OneOf(OVERFLOW_POLICIES),
    ),
    infer=_infer,
)
def MatMul(a, b, a_zero_point=None, b_zero_point=None, bias=None, *, transA=False, transB=False, acc_bits=32, overflow="error"):
    """acc = (a - a_zero_point) @ (b - b_zero_point) + bias, exact, into an acc_bits accumulator."""
    a, b = _operands(a, b, a_zero_point, b_zero_point, transA, transB)
    bias = _bias_view(bias, b.shape[-1])
    a_bound, b_bound = _bound(a), _bound(b)
    check_sum_fits(a.shape[-1], a_bound, b_bound, _bound(bias) if bias is not None else 0)
    acc = exact_matmul(a, b, a_bound, b_bound)
    return _finish(acc, bias, acc_bits, overflow)
