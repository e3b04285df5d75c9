"""Add, Sub, Mul, Relu, Clip, Cast, Lut and LutInterp16 against torch_core, exactly."""

import numpy as np
import pytest
from core_harness import check_case, run_graph
from core_strategies import CASES, Case
from hypothesis import given
from refsim import RefsimError
from refsim.ops import Add, Cast, Clip, Lut, LutInterp16, Mul, Relu, Sub


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
@given(data=CASES["Add"])
def test_arithmetic_matches_torch(each_backend, op, data):
    data.op = op
    check_case(data)


@given(CASES["Relu"])
def test_relu_matches_torch(each_backend, case):
    check_case(case)


@given(CASES["Clip"])
def test_clip_matches_torch(each_backend, case):
    check_case(case)


@given(CASES["Cast"])
def test_cast_matches_torch(each_backend, case):
    check_case(case)


@given(CASES["Lut"])
def test_lut_matches_torch(each_backend, case):
    check_case(case)


@given(CASES["LutInterp16"])
def test_lut_interp16_matches_torch(each_backend, case):
    check_case(case)


def test_lut_interp16_hand_worked():
    # f(v) = v on the anchors -32768 + 128 k (the last, 32768, clipped to 32767)
    ramp = np.clip(np.arange(513) * 128 - 32768, -32768, 32767).astype(np.int16)
    x = np.array([-32768, -32705, -1, 0, 1, 32639, 32640, 32767], np.int16)
    # in the last segment the slope is 127, not 128: 32640 + (127 * 127 + 64) // 128 = 32766
    assert LutInterp16(x, ramp).tolist() == [-32768, -32705, -1, 0, 1, 32639, 32640, 32766]
    # one segment from 0 to 1: positions 0..63 round down, 64..127 up (ties half up)
    step = np.zeros(513, np.int16)
    step[257:] = 1
    x = np.array([0, 63, 64, 127, 128], np.int16)
    assert LutInterp16(x, step).tolist() == [0, 0, 1, 1, 1]
    # a falling segment: -1 over 128 positions rounds -0.5 up to 0
    assert LutInterp16(x, -step).tolist() == [0, 0, 0, -1, -1]
    wide = np.zeros(513, np.int16)
    wide[300] = 32767
    wide[301] = -32768
    with pytest.raises(RefsimError, match="slope"):
        LutInterp16(x, wide)
    with pytest.raises(RefsimError, match="513"):
        LutInterp16(x, ramp[:512])


def test_arithmetic_result_types_hand_worked():
    i8 = np.array([-128, 127], np.int8)
    u8 = np.array([0, 255], np.uint8)
    assert Add(i8, i8).dtype == np.int16 and Add(i8, i8).tolist() == [-256, 254]
    assert Sub(u8, u8).dtype == np.int16 and Sub(u8, u8[::-1]).tolist() == [-255, 255]
    assert Add(u8, u8).dtype == np.uint16
    assert Mul(i8, i8).tolist() == [16384, 16129] and Mul(i8, i8).dtype == np.int16
    # int4 + int4 declared in a graph: [-16, 14] fits int8
    case = Case("Add", [np.array([-8, 7], np.int8), np.array([-8, 7], np.int8)], ["int4", "int4"], {}, [False, False])
    got, declared = run_graph(case)
    assert declared.dtype.name == "int8" and got.tolist() == [-16, 14]
    # an explicit narrow type with each policy: 100 + 100 = 200 into int8
    a = np.array([100], np.int8)
    with pytest.raises(RefsimError, match="200"):
        Add(a, a, dtype="int8")
    assert Add(a, a, dtype="int8", overflow="wrap").tolist() == [200 - 256]
    assert Add(a, a, dtype="int8", overflow="saturate").tolist() == [127]


def test_int64_arithmetic_is_refused_only_where_values_overflow():
    big = np.array([1 << 62], np.int64)
    with pytest.raises(RefsimError):
        Add(big, big)  # no standard type holds every int64 + int64
    with pytest.raises(RefsimError):
        Add(big, big, dtype="int64")  # 2^63 does not fit int64
    assert Add(big, np.array([-1], np.int64), dtype="int64").tolist() == [(1 << 62) - 1]


def test_relu_clip_cast_lut_hand_worked():
    x = np.array([-5, 0, 7], np.int8)
    assert Relu(x).tolist() == [0, 0, 7] and Relu(x).dtype == np.int8
    assert Clip(x, lo=-2, hi=3).tolist() == [-2, 0, 3]
    assert Clip(x, hi=3).tolist() == [-5, 0, 3]
    with pytest.raises(RefsimError):
        Clip(x, lo=3, hi=-2)
    with pytest.raises(RefsimError):
        Clip(x, lo=200)  # every result would be 200, which int8 cannot hold
    assert Cast(np.array([300, -1]), dtype="uint8", overflow="wrap").tolist() == [44, 255]
    assert Cast(np.array([300, -1]), dtype="uint8", overflow="saturate").tolist() == [255, 0]
    with pytest.raises(RefsimError):
        Cast(np.array([2]), dtype="ternary")
    with pytest.raises(RefsimError):
        Cast(np.array([2]), dtype="ternary", overflow="wrap")  # 3 values are no two's complement range
    table = np.arange(256, dtype=np.int16) * 2 - 256  # f(v) = 2v for v in -128..127
    assert Lut(np.array([-128, 0, 127], np.int8), table).tolist() == [-256, 0, 254]
    assert Lut(np.array([-1, 0, 1], np.int8), np.array([10, 20, 30], np.uint8)).tolist() == [10, 20, 30]  # ternary


def test_shapes_that_do_not_broadcast_are_refused():
    from refsim.ops import RequantShift

    for fn in (Add, Sub, Mul):
        with pytest.raises(RefsimError, match="do not broadcast"):
            fn(np.zeros(3, np.int8), np.zeros(2, np.int8))
    with pytest.raises(RefsimError, match="do not broadcast"):
        RequantShift(np.zeros(3, np.int8), np.ones(2, np.int32), np.zeros(1, np.int32), div=2)
