"""RequantF64 (LiteRT's double-precision requantization) against torch float64 arithmetic
(docs/OPS.md): torch multiplies in IEEE double, which is what the op replays with integers."""

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from refsim import ops


def float64_parts(scale: float) -> tuple[int, int]:
    """(mul, exp) with scale == mul * 2^exp exactly, mul < 2^53 (a double's significand)."""
    fraction, exponent = np.frexp(np.float64(scale))
    mul, exp = int(fraction * 2.0**53), int(exponent) - 53
    assert mul * 2.0**exp == scale
    return mul, exp


def torch_requant_f64(x, scale, offset, lo, hi):
    """clip(round_half_away(double(x) * scale) + offset, lo, hi), C's round, int32 saturated."""
    product = torch.tensor(x, dtype=torch.int64).to(torch.float64) * torch.tensor(scale, dtype=torch.float64)
    whole = torch.trunc(product)
    rounded = whole + torch.where((product - whole).abs() >= 0.5, torch.sign(product), torch.zeros_like(product))
    saturated = torch.clamp(rounded, -(2.0**31), 2.0**31 - 1).to(torch.int64)
    return torch.clamp(saturated + offset, lo, hi).numpy()


accumulators = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**47), 2**47),
    st.sampled_from([0, 1, -1, 7, -7, 2**31 - 1, -(2**31), 2**53, -(2**53), 2**53 - 1, 3 * 2**40 + 1]),
)
scales = st.one_of(
    st.floats(min_value=2.0**-40, max_value=16.0, allow_subnormal=False),
    st.sampled_from([0.5, 0.25, 1.5, 1.0, 2.0**-20, 0.1, 1 / 3]),  # ties and repeating fractions
)


@given(
    st.lists(accumulators, min_size=1, max_size=40),
    scales,
    st.sampled_from([("int8", -128, 127), ("int16", -32768, 32767), ("int32", -(2**31), 2**31 - 1)]),
    st.integers(-20, 20),
)
def test_requant_f64_matches_torch_float64(each_backend, xs, scale, out, offset):
    dtype, lo, hi = out
    mul, exp = float64_parts(scale)
    x = np.array(xs, np.int64)
    got = ops.RequantF64(x, np.int64(mul), np.int16(exp), np.int32(offset), dtype=dtype)
    np.testing.assert_array_equal(got.astype(np.int64), torch_requant_f64(x, scale, offset, lo, hi))


@given(st.integers(0, 2**32 - 1))
def test_requant_f64_per_channel_matches_torch(each_backend, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**31), 2**31, size=(3, 4, 5))
    chosen = rng.random(5) * 1e-3
    parts = [float64_parts(float(s)) for s in chosen]
    mul = np.array([p[0] for p in parts], np.int64)
    exp = np.array([p[1] for p in parts], np.int16)
    offsets = rng.integers(-10, 10, size=5)
    got = ops.RequantF64(x, mul, exp, offsets, axis=-1, dtype="int8")
    want = np.stack([torch_requant_f64(x[..., c], float(chosen[c]), int(offsets[c]), -128, 127) for c in range(5)], axis=-1)
    np.testing.assert_array_equal(got.astype(np.int64), want)


def test_requant_f64_hand_worked():
    # -7 * 0.5 = -3.5 rounds away from zero to -4; 5 * 0.5 = 2.5 to 3; 1/3 * 3 rounds to 1.
    half = float64_parts(0.5)
    assert ops.RequantF64(np.array([-7, 5, -5, 7]), *half, dtype="int8").tolist() == [-4, 3, -3, 4]
    third = float64_parts(1 / 3)
    assert ops.RequantF64(np.array([3, -3, 2**31 - 1]), *third, dtype="int32").tolist() == [1, -1, 715827882]


def test_requant_f64_refuses_inexact_inputs():
    import pytest
    from refsim.errors import OpError

    with pytest.raises(OpError, match="exactly a double"):
        ops.RequantF64(np.array([2**53 + 1]), 1, 0, dtype="int32")
