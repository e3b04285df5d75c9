"""Reshape, Transpose, Slice, Concat, Gather, ReduceSum, ReduceMean and ArgMax against
torch_core, exactly."""

import numpy as np
import pytest
from core_harness import check_case
from core_strategies import CASES
from hypothesis import given
from refsim import RefsimError
from refsim.ops import ArgMax, Concat, Gather, ReduceMean, ReduceSum, Reshape, Slice, Transpose


@pytest.mark.parametrize("op", ["Reshape", "Transpose", "Slice", "Concat", "Gather"])
@given(data=__import__("hypothesis").strategies.data())
def test_data_movement_matches_torch(each_backend, op, data):
    check_case(data.draw(CASES[op]))


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ArgMax"])
@given(data=__import__("hypothesis").strategies.data())
def test_reductions_match_torch(each_backend, op, data):
    check_case(data.draw(CASES[op]))


def test_data_movement_hand_worked():
    x = np.arange(6, dtype=np.int8).reshape(2, 3)
    assert Reshape(x, shape=[0, -1]).shape == (2, 3)
    assert Reshape(x, shape=[3, -1]).tolist() == [[0, 1], [2, 3], [4, 5]]
    assert Transpose(x).tolist() == [[0, 3], [1, 4], [2, 5]]
    assert Transpose(np.array(5, np.int8)).shape == ()
    # ONNX Slice: negative indices count from the end, out-of-range bounds clamp
    assert Slice(x, starts=[-1], ends=[-(1 << 63)], axes=[1], steps=[-1]).tolist() == [[2, 1, 0], [5, 4, 3]]
    assert Slice(x, starts=[1, 0], ends=[1 << 62, 2]).tolist() == [[3, 4]]
    assert Concat(x, x[:, :1], axis=1).tolist() == [[0, 1, 2, 0], [3, 4, 5, 3]]
    table = np.array([[1, 1], [2, 2], [3, 3]], np.int16)
    assert Gather(table, np.array([[2, -3]], np.int32)).tolist() == [[[3, 3], [1, 1]]]
    with pytest.raises(RefsimError, match="index 3"):
        Gather(table, np.array([3]))
    with pytest.raises(RefsimError):
        Concat(x, np.zeros((3, 3), np.int8), axis=1)


def test_reductions_hand_worked():
    x = np.array([[1, 2], [4, 8], [-7, -6]], np.int8)
    assert ReduceSum(x).tolist() == [[2]] and ReduceSum(x).dtype == np.int16
    assert ReduceSum(x, axes=[0], keepdims=False).tolist() == [-2, 4]
    # means of [1, 2] = 1.5, [4, 8] = 6, [-7, -6] = -6.5
    assert ReduceMean(x, axes=[1], keepdims=False, rounding="trunc").tolist() == [1, 6, -6]
    assert ReduceMean(x, axes=[1], keepdims=False, rounding="floor").tolist() == [1, 6, -7]
    assert ReduceMean(x, axes=[1], keepdims=False, rounding="half_up").tolist() == [2, 6, -6]
    assert ReduceMean(x, axes=[1], keepdims=False, rounding="half_away").tolist() == [2, 6, -7]
    assert ReduceMean(x, axes=[1], keepdims=False, rounding="half_even").tolist() == [2, 6, -6]
    y = np.array([[3, 9, 9], [9, 1, 9]], np.int8)
    assert ArgMax(y, axis=1, keepdims=False).tolist() == [1, 0]
    assert ArgMax(y, axis=1, keepdims=False, select_last_index=True).tolist() == [2, 2]
    assert ArgMax(y, axis=0).tolist() == [[1, 0, 0]]
    with pytest.raises(RefsimError):
        ArgMax(np.zeros((2, 0), np.int8), axis=1)
    with pytest.raises(RefsimError):
        ReduceMean(np.zeros((2, 0), np.int8), axes=[1])  # a mean of no values
    with pytest.raises(RefsimError):
        ReduceSum(x, axes=[])  # an empty list is a mistake; omit axes to reduce them all
