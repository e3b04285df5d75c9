"""A Brevitas-style QONNX graph built with onnx.helper: 8-bit activations, 4-bit narrow
per-channel conv weights, ternary (narrow 2-bit) dense weights, Relu, MaxPool, Trunc and a
BipolarQuant output. Imported, run, and compared with QONNX's published float semantics
(qonnx `int_quant`, `trunc`, `binary_quant`) evaluated in float64.

Every scale is a power of two, so the float reference is exact and the integer pipeline
(dyadic requantization by powers of two) must agree with it bit for bit, ties included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.importers import ImportFailure, detect_format, import_model, quantize_inputs
from refsim.intq import load_graph

DOMAIN = "qonnx.custom_op.general"


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def qonnx_quant(x, scale, zeropt, bits, signed, narrow, mode):
    """qonnx int_quant, returning the integer levels q (y = (q - zeropt) * scale)."""
    lo = -(2 ** (bits - 1)) + (1 if narrow else 0) if signed else 0
    hi = 2 ** (bits - 1) - 1 if signed else 2**bits - (2 if narrow else 1)
    y = np.clip(np.asarray(x, np.float64) / scale + zeropt, lo, hi)
    return {"ROUND": np.round, "FLOOR": np.floor}[mode](y)


def build(rng):
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w1_scale = np.array([2.0**-3, 2.0**-2, 2.0**-3, 2.0**-4], np.float32).reshape(4, 1, 1, 1)
    b1 = (rng.integers(-40, 40, size=4) * (2.0**-4) * w1_scale.reshape(-1)).astype(np.float32)
    w2 = rng.standard_normal((36, 5)).astype(np.float32)
    b2 = (rng.integers(-20, 20, size=5) * 2.0**-2 * 2.0**-1).astype(np.float32)
    inits = [
        _init("s_in", np.float32(2.0**-4)), _init("zero", np.float32(0.0)), _init("b8", np.float32(8)),
        _init("w1", w1), _init("w1_scale", w1_scale), _init("b4", np.float32(4)), _init("b1", b1),
        _init("s_h", np.float32(2.0**-3)), _init("s_t", np.float32(2.0**-2)), _init("b3", np.float32(3)),
        _init("w2", w2), _init("w2_scale", np.float32(2.0**-1)), _init("b2bits", np.float32(2)), _init("b2", b2),
        _init("s_out", np.float32(2.0**-2)), _init("one", np.float32(1.0)),
    ]
    q = lambda name, ins, **attrs: helper.make_node("Quant", ins, [name], domain=DOMAIN, name=name, **attrs)  # noqa: E731
    nodes = [
        q("xq", ["x", "s_in", "zero", "b8"], signed=1, narrow=0, rounding_mode="ROUND"),
        q("w1q", ["w1", "w1_scale", "zero", "b4"], signed=1, narrow=1, rounding_mode="ROUND"),
        helper.make_node("Conv", ["xq", "w1q", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        q("hq", ["r", "s_h", "zero", "b4"], signed=0, narrow=0, rounding_mode="FLOOR"),
        helper.make_node("MaxPool", ["hq"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Trunc", ["p", "s_h", "zero", "b4", "s_t", "zero", "b3"], ["t"], domain=DOMAIN,
                         name="trunc", rounding_mode="FLOOR", signed=0, narrow=0),
        helper.make_node("Flatten", ["t"], ["f"], axis=1, name="flatten"),
        q("w2q", ["w2", "w2_scale", "zero", "b2bits"], signed=1, narrow=1, rounding_mode="ROUND"),
        helper.make_node("Gemm", ["f", "w2q", "b2"], ["g"], name="gemm"),
        q("y", ["g", "s_out", "zero", "b8"], signed=1, narrow=0, rounding_mode="ROUND"),
        helper.make_node("BipolarQuant", ["g", "one"], ["sign"], domain=DOMAIN, name="sign"),
    ]
    graph = helper.make_graph(nodes, "brevitas_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("sign", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    return model, dict(w1=w1, w1_scale=w1_scale, b1=b1, w2=w2, b2=b2)


def reference(x, p):
    """The QONNX graph in float64, op by op, from the published formulas."""
    xq = qonnx_quant(x, 2.0**-4, 0, 8, True, False, "ROUND") * 2.0**-4
    w1q = qonnx_quant(p["w1"], p["w1_scale"].astype(np.float64), 0, 4, True, True, "ROUND") * p["w1_scale"]
    c = torch.nn.functional.conv2d(torch.tensor(xq), torch.tensor(w1q.astype(np.float64)),
                                   torch.tensor(p["b1"].astype(np.float64)), padding=1).numpy()
    r = np.maximum(c, 0)
    hq = qonnx_quant(r, 2.0**-3, 0, 4, False, False, "FLOOR") * 2.0**-3
    pooled = torch.nn.functional.max_pool2d(torch.tensor(hq), 2, 2).numpy()
    # qonnx trunc: round(x/scale + zp), / 2^t, clamp to the output range, FLOOR, then * out_scale
    t = np.floor(np.clip(np.round(pooled / 2.0**-3) / 2.0, 0, 7)) * 2.0**-2
    f = t.reshape(t.shape[0], -1)
    w2q = qonnx_quant(p["w2"], 2.0**-1, 0, 2, True, True, "ROUND") * 2.0**-1
    g = f @ w2q + p["b2"].astype(np.float64)
    y_levels = qonnx_quant(g, 2.0**-2, 0, 8, True, False, "ROUND")
    sign = np.where(g >= 0, 1, -1)
    return y_levels, sign, w1q / p["w1_scale"], w2q / 2.0**-1


@pytest.mark.parametrize("requant", ["dyadic", "ort"])
def test_brevitas_like_graph_imports_and_matches_qonnx_semantics(tmp_path, requant):
    rng = np.random.default_rng(5)
    model, params = build(rng)
    assert detect_format(model) == "qonnx"
    path = tmp_path / "m.intq"
    imported = import_model(model, path, requant=requant)
    x = (rng.standard_normal((2, 3, 6, 6)) * 3).astype(np.float32)
    out = imported.run(quantize_inputs(imported, {"x": x}))
    y_levels, sign, w1_levels, w2_levels = reference(x, params)
    np.testing.assert_array_equal(out["y"], y_levels.astype(np.int64))
    np.testing.assert_array_equal(out["sign"], sign)
    # Weights became narrow integers: 4-bit in [-7, 7] and ternary, packed in the file.
    tensors = load_graph(path).tensors
    conv = next(n for n in imported.graph.nodes if n.op == "Conv")
    gemm = next(n for n in imported.graph.nodes if n.op == "MatMul")
    assert tensors[conv.inputs[1]].dtype.name == "int4"
    np.testing.assert_array_equal(tensors[conv.inputs[1]].data, w1_levels)
    assert tensors[gemm.inputs[1]].dtype.name == "ternary"
    np.testing.assert_array_equal(tensors[gemm.inputs[1]].data, w2_levels)
    assert set(np.unique(w2_levels)) <= {-1, 0, 1} and np.abs(w1_levels).max() <= 7


def test_quant_ranges_and_types():
    from refsim.exporters.importers.qonnx import int_range, type_for

    assert int_range(8, True, True) == (-127, 127)
    assert int_range(8, False, True) == (0, 254)
    assert int_range(3, True, False) == (-4, 3)
    assert type_for(-1, 1).name == "ternary"
    assert type_for(-4, 3).name == "int4" and type_for(0, 7).name == "uint4" and type_for(-2, 1).name == "int2"


def test_ceil_rounding_of_a_computed_tensor_is_refused_with_the_node():
    nodes = [
        helper.make_node("Quant", ["x", "s", "z", "b"], ["xq"], domain=DOMAIN, name="in_q"),
        helper.make_node("Relu", ["xq"], ["r"]),
        helper.make_node("Quant", ["r", "s", "z", "b"], ["y"], domain=DOMAIN, name="ceil_q", rounding_mode="CEIL", signed=1),
    ]
    inits = [_init("s", np.float32(0.5)), _init("z", np.float32(0)), _init("b", np.float32(8))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(ImportFailure, match="ceil_q.*CEIL"):
        import_model(model)
