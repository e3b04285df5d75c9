"""MatMul against torch_core, exactly: every weight type, zero points, bias, transposes,
accumulator widths and overflow policies, the float-chunked fast path and prepared weights."""

import numpy as np
import pytest
from core_harness import check_case, run_graph
from core_strategies import CASES, Case
from hypothesis import given
from refsim import GraphBuilder, RefsimError
from refsim.errors import AccumulatorOverflow
from refsim.ops import MatMul


@given(CASES["MatMul"])
def test_matmul_matches_torch(every_backend, case):
    check_case(case)


def _extreme_case(a_value, b_value, a_type, b_type, k, **attrs):
    a = np.full((2, k), a_value, dtype={"int8": np.int8, "int16": np.int16, "int32": np.int32}[a_type])
    b = np.full((k, 3), b_value, dtype={"int8": np.int8, "int16": np.int16, "int32": np.int32}[b_type])
    b[::3] = np.iinfo(b.dtype).max  # mixed signs: partial sums swing both ways
    return Case("MatMul", [a, b], [a_type, b_type], dict(transA=False, transB=False, acc_bits=64, overflow="error", **attrs), [False, True])


@pytest.mark.parametrize(
    "a_value, b_value, types, k",
    [
        (-128, -128, ("int8", "int8"), 3000),  # float32 chunks of 1024 terms
        (-32768, -32768, ("int16", "int16"), 700),  # products of 2^30: float64 chunks
        (-(1 << 31), 7, ("int32", "int8"), 50),  # 2^34 per product: float64
        (-(1 << 31), -(1 << 31), ("int32", "int32"), 1),  # 2^62: int64 only
    ],
)
def test_matmul_extreme_values_take_every_exact_path(every_backend, a_value, b_value, types, k):
    case = _extreme_case(a_value, b_value, *types, k)
    check_case(case)


def test_matmul_refuses_a_sum_that_may_leave_int64(each_backend):
    a = np.full((1, 2), -(1 << 31), np.int32)
    b = np.full((2, 1), -(1 << 31), np.int32)
    with pytest.raises(RefsimError, match="int64"):
        MatMul(a, b, acc_bits=64)


def test_matmul_overflow_policies_hand_worked(each_backend):
    a = np.array([[127, 127, 127]], np.int8)
    b = np.array([[127], [127], [127]], np.int8)
    # exact sum 3 * 16129 = 48387, beyond int16's 32767
    with pytest.raises(AccumulatorOverflow, match="48387"):
        MatMul(a, b, acc_bits=16)
    assert MatMul(a, b, acc_bits=16, overflow="wrap").tolist() == [[48387 - 65536]]
    assert MatMul(a, b, acc_bits=16, overflow="saturate").tolist() == [[32767]]
    assert MatMul(a, b, acc_bits=17).tolist() == [[48387]]


def test_matmul_zero_points_and_bias_hand_worked(each_backend):
    a = np.array([[130, 120]], np.uint8)  # minus 128: [2, -8]
    b = np.array([[1, 2], [3, 4]], np.int8)  # minus per-column [1, 2]: [[0, 0], [2, 2]]
    y = MatMul(a, b, np.uint8(128), np.array([1, 2], np.int8), np.array([100, -100], np.int32))
    assert y.tolist() == [[2 * 0 + -8 * 2 + 100, 2 * 0 + -8 * 2 - 100]] and y.dtype == np.int32


def test_matmul_with_a_runtime_b_zero_point_and_constant_weights(each_backend):
    # constant weights, but the weight zero point arrives as a graph input: it must be used
    w = np.array([[1, 2], [3, 4]], np.int8)
    case = Case("MatMul", [np.array([[1, 1]], np.int8), w, None, np.array([1, 1], np.int8)],
                ["int8", "int8", None, "int8"], dict(transA=False, transB=False, acc_bits=32, overflow="error"),
                [False, True, False, False])
    got, _ = run_graph(case)
    assert got.tolist() == [[(1 - 1) + (3 - 1), (2 - 1) + (4 - 1)]]


def test_matmul_with_prepared_int64_weights_beyond_float_precision(each_backend):
    w = np.array([[(1 << 60) + 1]], np.int64)
    b = GraphBuilder("big")
    x = b.input("x", "int8", [1, 1])
    y = b.node("MatMul", [x, b.const(w, "int64")], acc_bits=64)
    b.output(y)
    got = b.model().run({"x": np.array([[3]], np.int8)})[y]
    assert got.tolist() == [[3 * ((1 << 60) + 1)]]


def test_matmul_in_a_graph_names_the_node_on_overflow():
    b = GraphBuilder("ovf")
    x = b.input("x", "int8", [1, 3])
    y = b.node("MatMul", [x, b.const(np.full((3, 1), 127), "int8")], name="fc7", acc_bits=16)
    b.output(y)
    with pytest.raises(AccumulatorOverflow, match="node 'fc7' \\(MatMul\\).*overflow"):
        b.model().run({"x": np.full((1, 3), 127, np.int8)})
