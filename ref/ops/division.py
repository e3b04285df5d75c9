"""IntegerDiv: quantlib/Deeploy's integer division of two tensors (formula: docs/OPS.md)."""

from __future__ import annotations

import numpy as np

from ..dtypes import TYPES
from ..errors import GraphError, OpError
from .overflow import fit_range
from .registry import OVERFLOW_POLICIES, Int, OneOf, broadcast_shapes, op

INT64_MAX = (1 << 63) - 1


def _infer(ins, attrs):
    if attrs["eta"] < 1:
        raise GraphError("eta must be >= 1")
    return [(TYPES["int32"], broadcast_shapes(ins[0].shape, ins[1].shape))]


@op(
    "IntegerDiv",
    inputs=["a", "b"],
    attrs=dict(Delta=Int(), eps=Int(), eta=Int(min=1), overflow=OneOf(OVERFLOW_POLICIES)),
    infer=_infer,
)
def IntegerDiv(a, b, *, Delta, eps, eta=1, overflow="error"):
    """y = trunc_div(n + sgn(n)*(d >> 1), d), n = Delta*eta*a, d = eta*b + eps (Deeploy Div_s32)."""
    a = np.asarray(a).astype(np.int64)
    b = np.asarray(b).astype(np.int64)
    if abs(Delta) * eta > INT64_MAX or abs(eps) > INT64_MAX:
        raise OpError(f"IntegerDiv: Delta*eta = {Delta * eta} or eps = {eps} leaves int64")
    for array, factor, what in ((a, abs(Delta) * eta, "Delta*eta*a"), (b, eta, "eta*b + eps")):
        if array.size and max(abs(int(array.min())), abs(int(array.max()))) * factor + abs(eps) > INT64_MAX:
            raise OpError(f"IntegerDiv: {what} leaves int64")
    num = Delta * eta * a
    den = eta * b + eps
    if den.size and int(den.min()) <= 0:
        raise OpError("IntegerDiv: the divisor eta*b + eps must be positive (quantlib forbids dividing by negative numbers)")
    num, den = np.broadcast_arrays(num, den)
    biased = num + np.where(num >= 0, 1, -1) * (den >> 1)
    quotient = np.abs(biased) // den * np.sign(biased)  # C division: toward zero
    return fit_range(quotient, -(1 << 31), (1 << 31) - 1, 32, overflow, "IntegerDiv").astype(np.int32)
