"""What RequantF32 and RequantF64 share: a float scale given as the exact pair (mul, exp).

Both replay a peer's floating-point requantization with integers, so both take the same
inputs (x, mul, exp, offset?) and attributes, and check them the same way; only the
mantissa width of `mul` and the exponent range differ.
"""

from __future__ import annotations

import numpy as np

from ..dtypes import int_type
from ..errors import GraphError, OpError
from .requant import along_axis, output_bounds


def scaled_requant_infer(what: str, mantissa_bits: int, max_exp: int):
    """The graph-time check of a float-replay requantizer: constant mul/exp in range, channels matching."""

    def infer(ins, attrs):
        x, mul, exp = ins[0], ins[1], ins[2]
        for name, t in (("mul", mul), ("exp", exp)):
            if t.is_const and t.data.size:
                low, high = int(t.data.min()), int(t.data.max())
                limits = (0, (1 << mantissa_bits) - 1) if name == "mul" else (-max_exp, max_exp)
                if low < limits[0] or high > limits[1]:
                    raise GraphError(f"{name} values must lie in [{limits[0]}, {limits[1]}], got [{low}, {high}]")
        rank = len(x.shape)
        axis = attrs["axis"]
        if not -rank <= axis < max(rank, 1):
            raise GraphError(f"axis {axis} is out of range for a rank-{rank} input")
        for name, t in (("mul", mul), ("exp", exp), ("offset", ins[3] if len(ins) > 3 else None)):
            if t is None:
                continue
            if len(t.shape) > 1:
                raise GraphError(f"{name} must be a scalar or a 1-D per-channel vector")
            if len(t.shape) == 1 and rank and isinstance(t.shape[0], int) and t.shape[0] != 1:
                channels = x.shape[axis]
                if isinstance(channels, int) and channels != t.shape[0]:
                    raise GraphError(f"{name} has {t.shape[0]} channels, input axis {axis} has {channels}")
        output_bounds(attrs["dtype"], attrs["lo"], attrs["hi"], what)
        return [(int_type(attrs["dtype"]), x.shape)]

    return infer


def scaled_requant_operands(what, x, mul, exp, offset, axis, dtype, lo, hi, *, mantissa_bits, max_exp):
    """x, and mul/exp/offset broadcast along `axis`, checked at run time; with the output bounds."""
    x = np.asarray(x)
    ndim = max(x.ndim, 1)
    if not -ndim <= axis < ndim:
        raise OpError(f"{what}: axis {axis} is out of range for a rank-{x.ndim} input")
    axis %= ndim
    mul_b, exp_b, offset_b = (
        along_axis(p, x.ndim, axis, name, what) for p, name in ((mul, "mul"), (exp, "exp"), (offset, "offset"))
    )
    if mul_b.size and (int(mul_b.min()) < 0 or int(mul_b.max()) >= 1 << mantissa_bits):
        raise OpError(f"{what}: mul must lie in [0, 2^{mantissa_bits})")
    if exp_b.size and (int(exp_b.min()) < -max_exp or int(exp_b.max()) > max_exp):
        raise OpError(f"{what}: exp must lie in [-{max_exp}, {max_exp}]")
    lo, hi = output_bounds(dtype, lo, hi, what)
    return x, mul_b, exp_b, offset_b, lo, hi
