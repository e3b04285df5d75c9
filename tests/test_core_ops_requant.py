"""Requant, RequantShift and the rounding primitives against torch_core, exactly."""

import numpy as np
import pytest
import torch
import torch_core
from core_harness import check_case
from core_strategies import CASES, ROUNDINGS, SHIFT_EDGES, requant_case, tflite_requant_case, tie_case
from hypothesis import given
from hypothesis import strategies as st
from refsim.ops import Requant, RequantShift
from refsim.ops.rounding import round_div, round_shift

INT64 = st.one_of(st.sampled_from([-(1 << 63), -(1 << 63) + 1, -(1 << 62), -1, 0, 1, (1 << 62), (1 << 63) - 1]),
                  st.integers(-(1 << 63), (1 << 63) - 1), st.integers(-100, 100))
SHIFTS = st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(0, 70))


@given(st.lists(st.tuples(INT64, SHIFTS), min_size=1, max_size=20), st.sampled_from(ROUNDINGS))
def test_round_shift_matches_the_formula(each_backend, pairs, mode):
    v = np.array([p[0] for p in pairs], np.int64)
    s = np.array([p[1] for p in pairs], np.int64)
    expected = torch_core.round_shift(torch.tensor(v), torch.tensor(s), mode).numpy()
    assert round_shift(v, s, mode).tolist() == expected.tolist()


@given(st.integers(1, 62), st.integers(0, (1 << 30)), st.sampled_from(ROUNDINGS))
def test_round_shift_ties_of_both_signs(each_backend, s, k, mode):
    m = (2 * k + 1) % (1 << max(64 - s, 1))  # odd, and m * 2^(s-1) fits int64
    v = [m << (s - 1), -(m << (s - 1))]
    v = np.array([x for x in v if -(1 << 63) <= x < (1 << 63)], np.int64)
    expected = torch_core.round_shift(torch.tensor(v), torch.tensor(s), mode).numpy()
    assert round_shift(v, s, mode).tolist() == expected.tolist()


def test_round_shift_hand_worked():
    # v / 2^s worked out on paper: 5/2 = 2.5, -5/2 = -2.5, 3/4 = 0.75, -3/4 = -0.75, 6/4 = 1.5
    v = np.array([5, -5, 3, -3, 6], np.int64)
    s = np.array([1, 1, 2, 2, 2], np.int64)
    assert round_shift(v, s, "floor").tolist() == [2, -3, 0, -1, 1]
    assert round_shift(v, s, "half_up").tolist() == [3, -2, 1, -1, 2]
    assert round_shift(v, s, "half_away").tolist() == [3, -3, 1, -1, 2]
    assert round_shift(v, s, "half_even").tolist() == [2, -2, 1, -1, 2]
    assert round_shift(v, s, "trunc").tolist() == [2, -2, 0, 0, 1]
    # shifts past the word: -2^63 / 2^64 = -1/2 exactly; anything / 2^65 lies within (-1/4, 1/4)
    lo = np.array([-(1 << 63)], np.int64)
    assert [round_shift(lo, 64, m)[0] for m in ROUNDINGS] == [-1, 0, -1, 0, 0]
    assert [round_shift(lo, 65, m)[0] for m in ROUNDINGS] == [-1, 0, 0, 0, 0]
    assert [round_shift(lo, 1000, m)[0] for m in ROUNDINGS] == [-1, 0, 0, 0, 0]
    assert [round_shift(np.int64((1 << 63) - 1), 63, m) for m in ROUNDINGS] == [0, 1, 1, 1, 0]


@given(st.lists(st.tuples(st.integers(-(1 << 62) + 1, (1 << 62) - 1), st.integers(1, 1 << 20)), min_size=1, max_size=20),
       st.sampled_from(ROUNDINGS))
def test_round_div_matches_the_formula(pairs, mode):
    v = np.array([p[0] for p in pairs], np.int64)
    d = np.array([p[1] for p in pairs], np.int64)
    expected = torch_core.round_div(torch.tensor(v), torch.tensor(d), mode).numpy()
    assert round_div(v, d, mode).tolist() == expected.tolist()


@given(requant_case())
def test_requant_matches_torch(each_backend, case):
    check_case(case)


@given(tflite_requant_case())
def test_requant_double_rounding_matches_tflite(each_backend, case):
    check_case(case)


@given(tie_case())
def test_requant_ties(each_backend, case):
    check_case(case)


@given(CASES["RequantShift"])
def test_requant_shift_matches_torch(each_backend, case):
    check_case(case)


def test_requant_hand_worked(each_backend):
    x = np.array([10, -10, 11, -11, 300, -300], np.int32)
    # 10*3/4 = 7.5, -7.5, 8.25, -8.25, 225, -225 ; half_up then + 1, clipped to int8
    y = Requant(x, np.int32(3), np.int8(2), None, np.int8(1), dtype="int8")
    assert y.tolist() == [9, -6, 9, -7, 127, -128]
    assert y.dtype == np.int8
    # per channel along axis 0: rows scaled by 1/2 (floor) and by 5/1
    x2 = np.array([[3, -3], [3, -3]], np.int32)
    y2 = Requant(x2, np.array([1, 5]), np.array([1, 0]), rounding="floor", axis=0, dtype="int16")
    assert y2.tolist() == [[1, -2], [15, -15]]
    # narrow int8 via lo
    assert Requant(np.array([-1000]), np.int32(1), np.int32(0), dtype="int8", lo=-127).tolist() == [-127]


def test_requant_double_rounding_hand_worked(each_backend):
    q = 1 << 30  # 0.5 in Q31
    # shift 31 = TFLite exponent 0: SRDHM(3, 0.5) = (3*2^30 + 2^30) >> 31 = 2; SRDHM(-3, 0.5) = -1
    assert Requant(np.array([3, -3], np.int32), np.int32(q), np.int32(31), rounding="double", dtype="int32").tolist() == [2, -1]
    # shift 32 = exponent -1: SRDHM(5, 0.5) = 3, RDBPOT(3, 1) = 1.5 -> 2 (away from zero),
    # although 5 * 0.25 = 1.25 rounds to 1 with a single rounding. SRDHM(-7, .5) = -3 -> -1.5 -> -2.
    assert Requant(np.array([5, -5, -7], np.int32), np.int32(q), np.int32(32), rounding="double", dtype="int32").tolist() == [2, -1, -2]
    assert Requant(np.array([5], np.int32), np.int32(q), np.int32(32), rounding="half_up", dtype="int32").tolist() == [1]
    # shift 29 = exponent 2: x << 2 = 12, SRDHM(12, 0.5) = 13*2^30 >> 31 = 6
    assert Requant(np.array([3], np.int32), np.int32(q), np.int32(29), rounding="double", dtype="int32").tolist() == [6]
    # the one saturating case of SRDHM: INT32_MIN * INT32_MIN
    lo = -(1 << 31)
    assert Requant(np.array([lo], np.int32), np.int32(lo), np.int32(31), rounding="double", dtype="int32").tolist() == [(1 << 31) - 1]


def test_requant_double_checks_each_channel_on_its_own(each_backend):
    # channel 0 shifts left by 4 (small values), channel 1 not at all (large values): valid
    x = np.array([[100, 1 << 30], [-100, -(1 << 30)]], np.int32)
    y = Requant(x, np.array([1 << 30, 1 << 30], np.int32), np.array([27, 31], np.int32), rounding="double", dtype="int32")
    # channel 0: SRDHM(1600, 2^30) = 800; channel 1: SRDHM(2^30, 2^30) = 2^29
    assert y.tolist() == [[800, 1 << 29], [-800, -(1 << 29)]]


def test_requant_shift_hand_worked(each_backend):
    # (5*3 + 1)/4 = 4 -> 4; (-5*3 + 1)/4 = -3.5 -> floor(-3.0) = -3 ; (7*1+0)/2 = 3.5 -> 4; -3.5 -> -3
    x = np.array([5, -5], np.int32)
    assert RequantShift(x, np.int32(3), np.int32(1), div=4).tolist() == [4, -3]
    assert RequantShift(np.array([7, -7]), np.int32(1), np.int32(0), div=2).tolist() == [4, -3]
    # clipping: signed n_levels 16 -> [-8, 7] in int4 storage; unsigned n_levels 4 -> [0, 3]
    y = RequantShift(np.array([100, -100]), np.int32(1), np.int32(0), div=1, n_levels=16, signed=True)
    assert y.tolist() == [7, -8] and y.dtype == np.int8
    y = RequantShift(np.array([100, -100]), np.int32(1), np.int32(0), div=1, n_levels=4, signed=False)
    assert y.tolist() == [3, 0] and y.dtype == np.uint8
    # per-channel mul/add broadcast NumPy-style against x
    y = RequantShift(np.array([[8, 8], [8, 8]]), np.array([1, 2]), np.array([0, 4]), div=8)
    assert y.tolist() == [[1, 3], [1, 3]]  # 8/8 = 1 ; (16+4)/8 = 2.5 -> 3


@pytest.mark.parametrize("div", [3, 0, 6])
def test_requant_shift_refuses_a_div_that_is_not_a_power_of_two(div):
    from refsim import RefsimError

    with pytest.raises(RefsimError):
        RequantShift(np.array([1]), np.int32(1), np.int32(0), div=div)
