"""Integer-only ONNX ops lowered onto refsim's integer ops (exporters.frontend.integer_ops),
checked bit for bit against onnxruntime running the same ONNX node, extremes included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.frontend.emitter import Emitter
from refsim.exporters.frontend.graph import Node
from refsim.exporters.frontend.integer_ops import lower
from refsim.exporters.runtime import FloatRunner

pytest.importorskip("onnxruntime")
I64, I32, B = TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
NP = {I64: np.int64, I32: np.int32, B: np.bool_}
REFSIM = {I64: "int64", I32: "int32", B: "uint8"}


def onnx_result(op, inputs, elems, consts, out_elem, **attrs):
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op, names, ["y"], **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, e, list(np.shape(v))) for n, v, e, c in zip(names, inputs, elems, consts) if not c]
    inits = [numpy_helper.from_array(np.asarray(v, NP[e]), n) for n, v, e, c in zip(names, inputs, elems, consts) if c]
    model = helper.make_model(helper.make_graph([node], "t", graph_inputs, [helper.make_tensor_value_info("y", out_elem, None)], inits),
                              opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    feeds = {n: np.asarray(v, NP[e]) for n, v, e, c in zip(names, inputs, elems, consts) if not c}
    return FloatRunner(model).run(feeds)["y"]


def refsim_result(op, inputs, elems, consts, out_elem, **attrs):
    em = Emitter("t")
    names = []
    for i, (v, e, c) in enumerate(zip(inputs, elems, consts)):
        names.append(None if c else em.input(f"in{i}", REFSIM[e], list(np.shape(v))))
    node = Node(op, [f"in{i}" for i in range(len(inputs))], ["y"], attrs, "n")

    def operand(k):
        return names[k] if names[k] is not None else em.const(np.asarray(inputs[k]).astype(np.int64), None, f"c{k}")

    def const(k):
        return np.asarray(inputs[k]) if k < len(inputs) and consts[k] else None

    y = lower(em, node, operand, const, np.dtype(NP[out_elem]), "y")
    em.builder.output(y)
    feeds = {f"in{i}": np.asarray(v).astype(em.builder.tensors[f"in{i}"].dtype.storage)
             for i, (v, c) in enumerate(zip(inputs, consts)) if not c}
    return em.builder.model().run(feeds)[y]


def same(op, inputs, elems, out_elem, consts=None, **attrs):
    consts = consts or [False] * len(inputs)
    want = onnx_result(op, inputs, elems, consts, out_elem, **attrs)
    got = refsim_result(op, inputs, elems, consts, out_elem, **attrs)
    assert got.shape == want.shape and np.array_equal(got.astype(np.int64), want.astype(np.int64)), (op, got, want)


# Comparisons form a - b: exact for operands within +-(2^62 - 1) (refsim refuses a difference that
# leaves int64, with an error naming the node, rather than wrap it).
EXTREMES = [-(2**62) + 1, -1, 0, 1, 2, 2**62 - 1]
ints = st.lists(st.sampled_from(EXTREMES) | st.integers(-1000, 1000), min_size=6, max_size=6)
bits = st.lists(st.booleans(), min_size=6, max_size=6)


@settings(max_examples=25, deadline=None)
@given(ints, ints)
def test_comparisons_and_arithmetic(a, b):
    a, b = np.array(a, np.int64), np.array(b, np.int64)
    for op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
        same(op, [a, b], [I64, I64], B)
    a, b = np.clip(a, -2**31, 2**31), np.clip(b, -2**31, 2**31)  # exact results within int64 (refsim refuses others)
    for op in ("Add", "Sub", "Mul"):
        same(op, [a, b], [I64, I64], I64)
    for op in ("Max", "Min"):
        same(op, [a, b], [I64, I64], I64)


@settings(max_examples=25, deadline=None)
@given(bits, bits, ints, ints)
def test_booleans_and_where(p, q, a, b):
    p, q, a, b = np.array(p), np.array(q), np.array(a, np.int64), np.array(b, np.int64)
    for op in ("And", "Or", "Xor"):
        same(op, [p, q], [B, B], B)
    same("Not", [p], [B], B)
    same("Where", [p, a, b], [B, I64, I64], I64)


def test_casts_wrap_as_onnx_does():
    a = np.array([np.iinfo(np.int64).min, -1, 0, 2**31, 2**40 + 7, np.iinfo(np.int64).max], np.int64)
    same("Cast", [a], [I64], I32, to=I32)
    same("Cast", [a], [I64], B, to=B)
    same("Cast", [np.array([-5, 0, 7], np.int32)], [I32], I64, to=I64)


def test_roberta_position_ids():
    """(cumsum(ids != pad) * (ids != pad)) + pad, RoBERTa's create_position_ids_from_input_ids."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (3, 9)).astype(np.int64)
    same("CumSum", [(ids != 1).astype(np.int32), np.array(1, np.int64)], [I32, I64], I32, consts=[False, True])
    same("CumSum", [(ids != 1).astype(np.int32), np.array(-1, np.int64)], [I32, I64], I32, consts=[False, True],
         exclusive=1, reverse=1)


def test_gather_elements_of_a_one_row_table_and_expand():
    table = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int64)
    idx = np.array([[0, 7, 3]], np.int64)
    same("GatherElements", [table, idx], [I64, I64], I64, consts=[True, False], axis=1)
    same("Expand", [np.array([[1], [0]], np.int64), np.array([2, 3], np.int64)], [I64, I64], I64, consts=[False, True])
