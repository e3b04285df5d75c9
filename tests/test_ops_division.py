"""IntegerDiv against an independent torch int64 implementation of docs/OPS.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from refsim import ops
from refsim.errors import OpError


def torch_integer_div(a, b, delta, eps, eta):
    n = torch.tensor(a, dtype=torch.int64) * (delta * eta)
    d = torch.tensor(b, dtype=torch.int64) * eta + eps
    n, d = torch.broadcast_tensors(n, d)
    biased = n + torch.where(n >= 0, 1, -1) * torch.div(d, 2, rounding_mode="floor")
    return torch.div(biased, d, rounding_mode="trunc").numpy()


@given(
    st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=12),
    st.lists(st.integers(0, 2**15), min_size=1, max_size=1) | st.lists(st.integers(0, 2**31 - 1), min_size=12, max_size=12),
    st.integers(-(2**8), 2**8), st.integers(1, 2**10), st.integers(1, 16),
)
def test_integer_div_matches_torch(a, b, delta, eps, eta):
    a = np.array(a, np.int32)
    b = np.array(b[: a.size] if len(b) > 1 else b, np.int32)
    if b.size not in (1, a.size):
        b = b[:1]
    expected = torch_integer_div(a, b, delta, eps, eta)
    if np.abs(expected).max() >= 2**31:
        with pytest.raises(OpError):
            ops.IntegerDiv(a, b, Delta=delta, eps=eps, eta=eta)
        return
    np.testing.assert_array_equal(ops.IntegerDiv(a, b, Delta=delta, eps=eps, eta=eta), expected)


def test_integer_div_hand_worked():
    # Delta 4, eta 2, eps 1: n = 8a, d = 2b + 1. a = 3, b = 2: (24 + 2) // 5 = 5 (26/5 = 5.2);
    # a = -3: (-24 - 2) toward zero over 5 = -5; a = 1, b = 3: d = 7, (8 + 3)/7 = 1; a = 0 -> (0 + 3)/7 = 0.
    got = ops.IntegerDiv(np.array([3, -3, 1, 0]), np.array([2, 2, 3, 3]), Delta=4, eps=1, eta=2)
    assert got.tolist() == [5, -5, 1, 0]
    with pytest.raises(OpError, match="positive"):
        ops.IntegerDiv(np.array([1]), np.array([-1]), Delta=1, eps=0)
