"""Shared helpers of the nonlinear op tests: run an op on both backends, compare with torch."""

from __future__ import annotations

import numpy as np
import torch
from refsim import backend

BACKENDS = ("numba", "numpy")


def run(op, *args, backend_name: str, **attrs):
    with backend.use(backend_name):
        return op(*args, **attrs)


def both(op, *args, **attrs):
    """The op's result on both backends, asserted identical (values and dtype)."""
    a = run(op, *args, backend_name="numba", **attrs)
    b = run(op, *args, backend_name="numpy", **attrs)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b)
    return a


def rows(x) -> torch.Tensor:
    """x as an int64 torch tensor of shape (rows, last axis)."""
    x = np.asarray(x)
    return torch.as_tensor(x.reshape(-1, x.shape[-1]).astype(np.int64))


def keep_rows(mask, shape) -> torch.Tensor:
    if mask is None:
        return torch.ones(int(np.prod(shape[:-1])), shape[-1], dtype=torch.bool)
    return torch.as_tensor(np.broadcast_to(np.asarray(mask) != 0, shape).reshape(-1, shape[-1]).copy())


def assert_matches(result, expected: torch.Tensor):
    np.testing.assert_array_equal(np.asarray(result).astype(np.int64).reshape(-1), expected.numpy().reshape(-1))
