"""quantlib/Deeploy integer graphs built with onnx.helper: every op and attribute the importer
maps, with expected values worked by hand from the published semantics (docs/OPS.md,
Deeploy's kernels). Tensors are float but hold integers, as quantlib exports them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.importers import ImportFailure, detect_format, import_model


def _f(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=13):
    graph = helper.make_graph(nodes, "deeploy", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("PACTOps", 1)])


def _tensor_attr(name, value):
    """onnx-graphsurgeon writes some attributes as tensors; quantlib graphs carry them so."""
    return helper.make_attribute(name, numpy_helper.from_array(np.asarray(value, np.int64)))


def test_linear_requant_division_and_mean():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["acc"]),
        helper.make_node("RequantShift", ["acc", "mul", "add"], ["y"], div=4, n_levels_out=256, signed=1),
        helper.make_node("IntegerDiv", ["y", "d"], ["q"], domain="PACTOps", Delta=4, eps=1, eta=2),
        helper.make_node("IntegerMean", ["q"], ["m"], axes=[1], keepdims=1),
    ]
    inits = [_f("w", [[1, 2], [0, -1], [2, 0], [-1, 1]]), _f("mul", [3, 5]), _f("add", [1, -2]), _f("d", [[2]])]
    model = _model(nodes, [("x", [1, 4])], ["acc", "y", "q", "m"], inits)
    assert detect_format(model) == "deeploy"
    out = import_model(model).run({"x": np.array([[1, -2, 3, 4]], np.int8)})
    # acc = x @ w = [1 + 0 + 6 - 4, 2 + 2 + 0 + 4] = [3, 8]
    assert out["acc"].tolist() == [[3, 8]]
    # RequantShift: floor((3*3 + 1)/4 + 1/2) = floor(3.0) = 3; floor((8*5 - 2)/4 + 1/2) = floor(10.0) = 10
    assert out["y"].tolist() == [[3, 10]]
    # IntegerDiv: n = 4*2*y, d = 2*2 + 1 = 5: (24 + 2)/5 -> 5; (80 + 2)/5 -> 16 (toward zero)
    assert out["q"].tolist() == [[5, 16]]
    # IntegerMean over 2 values with keepdims: (21 + 1) / 2 = 11
    assert out["m"].tolist() == [[11]]


def test_softmaxes():
    nodes = [
        helper.make_node("ITAMax", ["a"], ["ita"]),
        helper.make_node("ITAPartialMax", ["b"], ["partial"], group_width=2),
        helper.make_node("iSoftmax", ["c"], ["isoft"]),
    ]
    nodes[0].attribute.append(_tensor_attr("n_levels", 256))
    nodes[1].attribute.append(_tensor_attr("n_levels", 256))
    for name, value in (("coeffA", 1), ("coeffB", 6), ("coeffC", 10), ("log2", 4), ("n_levels", 256)):
        nodes[2].attribute.append(_tensor_attr(name, value))
    model = _model(nodes, [("a", [1, 4]), ("b", [1, 4]), ("c", [1, 4])], ["ita", "partial", "isoft"], [])
    out = import_model(model).run({"a": np.array([[0, 0, -32, -64]]), "b": np.array([[0, -32, -64, 32]]),
                                   "c": np.array([[8, 4, 0, -9]])})
    # ITAMax, k = 5, rs(d) = (d + 16) >> 5: shifts [0, 0, 1, 2]; S = 256 + 256 + 128 + 64 = 704;
    # inv = 65280 // 704 = 92; y = 92 >> shift.
    assert out["ita"].tolist() == [[92, 92, 46, 23]]
    # ITAPartialMax, groups of 2, numerator 127*256 = 32512, max_init -128:
    #   group [0, -32]: c = 0, s = rs(128) = 4, gmax = 0, acc = 0 + 256 + (256 >> 1) = 384
    #   group [-64, 32]: c = 32, s = rs(32) = 1, gmax = 32, acc = 192 + (256 >> rs(96) = 3) + 256 = 480
    #   inv = 32512 // 480 = 67; y = 67 >> rs(32 - x) = [67>>1, 67>>2, 67>>3, 67] = [33, 16, 8, 67]
    assert out["partial"].tolist() == [[33, 16, 8, 67]]
    # iSoftmax: d = [0, -4, -8, -17], z = [0, 1, 2, 4], p = [0, 0, 0, -1],
    # y = [36 + 10, 46 >> 1, 46 >> 2, (25 + 10) >> 4] = [46, 23, 11, 2], sum 82;
    # out = y*255 // 82 = [143, 71, 34, 6]
    assert out["isoft"].tolist() == [[143, 71, 34, 6]]


def test_gelus_and_norms():
    nodes = [
        helper.make_node("iGELU", ["x"], ["g"], b=-4, one=16),
        helper.make_node("RequantizediGELU", ["x", "m", "a", "s"], ["rg"], b=-4, one=16, div=4, n_levels=256, signed=1),
        helper.make_node("iLayerNorm", ["row", "w", "bias"], ["ln"], D=2, n_levels=256),
        helper.make_node("iNoNorm", ["v", "nw", "nb"], ["nn"], D=4, mul=3, n_levels=256),
    ]
    inits = [_f("m", [3]), _f("a", [1]), _f("s", [2]), _f("w", [2, 2, 2, 2]), _f("bias", [1, 0, 0, -1]),
             _f("nw", [2, 3, -1]), _f("nb", [1, 1, 1])]
    model = _model(nodes, [("x", [5]), ("row", [1, 4]), ("v", [3])], ["g", "rg", "ln", "nn"], inits)
    out = import_model(model).run({"x": np.array([-5, -2, 0, 1, 3]), "row": np.array([[1, 2, 3, 6]]),
                                   "v": np.array([1, -2, 3])})
    # iGELU, b = -4, one = 16: L = sgn(x)*(16 - (min(|x|, 4) - 4)^2) = [-16, -12, 0, 7, 15];
    # y = x * ((16 + L) >> 1) = [-5*0, -2*2, 0, 1*11, 3*15]
    assert out["g"].tolist() == [0, -4, 0, 11, 45]
    # RequantizediGELU: floor((g*3 + 1)/4 + 1/2) = [floor(0.75), floor(-2.25), floor(0.75), floor(9.0), floor(34.5)]
    assert out["rg"].tolist() == [0, -3, 0, 9, 34]
    # iLayerNorm: mean = 12 // 4 = 3, d = [-2, -1, 0, 3], var = 14 // 4 + 1 = 4, std = 2;
    # (d*2 / 2 + bias) >> 1 = ([-2, -1, 0, 3] + [1, 0, 0, -1]) >> 1 = [-1, -1, 0, 1]
    assert out["ln"].tolist() == [[-1, -1, 0, 1]]
    # iNoNorm: ((x*w + b)*3) >> 2 = ([3, -5, -2]*3) >> 2 = [9 >> 2, -15 >> 2, -6 >> 2]
    assert out["nn"].tolist() == [2, -4, -2]


def test_conv_pool_gemm_and_data_movement():
    nodes = [
        helper.make_node("Pad", ["x"], ["p"], mode="constant", pads=[0, 0, 1, 1, 0, 0, 0, 0], value=0.0),
        helper.make_node("Conv", ["p", "k", "kb"], ["c"], dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1],
                         kernel_shape=[2, 2]),
        helper.make_node("MaxPool", ["c"], ["mp"], ceil_mode=0, kernel_shape=[2, 2], pads=[0, 0, 0, 0], strides=[1, 1]),
        helper.make_node("Flatten", ["mp"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], alpha=1.0, beta=1.0, transA=0, transB=0),
        helper.make_node("Unsqueeze", ["g"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["sq"], axes=[0]),
        helper.make_node("Transpose", ["sq"], ["t"], perm=[1, 0]),
        helper.make_node("Gather", ["g", "one"], ["picked"], axis=1),
        helper.make_node("Reshape", ["picked", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["doubled"]),
        helper.make_node("Add", ["doubled", "r"], ["tripled"]),
        helper.make_node("Relu", ["c"], ["relu"]),
    ]
    inits = [_f("k", [[[[1, 0], [0, -1]]]]), _f("kb", [5]), _f("gw", [[1, 0], [0, 1], [1, 1], [2, -1]]),
             _f("gb", [10, 20]), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([1, 1], np.int64), "shape"), _f("two", [2])]
    model = _model(nodes, [("x", [1, 1, 3, 3])], ["c", "mp", "g", "t", "tripled", "relu"], inits, opset=10)  # Pad-2: pads attribute
    with pytest.raises(ImportFailure, match="no quantization"):
        import_model(model)  # only standard ops: nothing tells the format, so it must be named
    out = import_model(model, fmt="deeploy").run({"x": np.arange(1, 10).reshape(1, 1, 3, 3)})
    # Padded (top row, left column): [[0,0,0,0],[0,1,2,3],[0,4,5,6],[0,7,8,9]];
    # conv with [[1,0],[0,-1]] + 5: p[i,j] - p[i+1,j+1] + 5, e.g. row 1: 0-4+5, 1-5+5, 2-6+5
    assert out["c"].tolist() == [[[[4, 3, 2], [1, 1, 1], [-2, 1, 1]]]]
    assert out["relu"].tolist() == [[[[4, 3, 2], [1, 1, 1], [0, 1, 1]]]]
    assert out["mp"].tolist() == [[[[4, 3], [1, 1]]]]
    # [4, 3, 1, 1] @ gw + [10, 20] = [4 + 0 + 1 + 2 + 10, 0 + 3 + 1 - 1 + 20]
    assert out["g"].tolist() == [[17, 23]]
    assert out["t"].tolist() == [[17], [23]]
    assert out["tripled"].tolist() == [[69]]  # g[:, 1] reshaped, times 2, plus itself


def test_input_types_and_unsupported_ops():
    nodes = [helper.make_node("RequantShift", ["x", "m", "a"], ["y"], div=2, n_levels=16, signed=0)]
    model = _model(nodes, [("x", [3])], ["y"], [_f("m", [1]), _f("a", [0])])
    imported = import_model(model, input_types={"x": "uint8"})
    assert imported.graph.tensors["x"].dtype.name == "uint8"
    # floor(x/2 + 1/2) clipped to [0, 15]: 255 -> 15, 3 -> 2, 0 -> 0
    assert imported.run({"x": np.array([255, 3, 0])})["y"].tolist() == [15, 2, 0]
    bad = _model([helper.make_node("iHardswish", ["x"], ["y"], name="hs", one_over_six=1, six=6, three=3),
                  helper.make_node("RequantShift", ["y", "m", "a"], ["z"], div=2, n_levels=16, signed=0)],
                 [("x", [3])], ["z"], [_f("m", [1]), _f("a", [0])])
    with pytest.raises(ImportFailure, match=r"'hs' \(iHardswish\).*not supported"):
        import_model(bad)
    fractional = _model(nodes, [("x", [3])], ["y"], [_f("m", [1.5]), _f("a", [0])])
    with pytest.raises(ImportFailure, match="not integers"):
        import_model(fractional)


def test_gemm_alpha_beta_and_the_contrib_domain():
    """Deeploy's test networks write Gemm with integer alpha/beta and RequantShift in
    onnxruntime-extensions' `ai.onnx.contrib` domain. The Gemm is a standard op, so
    onnxruntime (float32, exact on these small integers) is the oracle for it; RequantShift
    follows Deeploy's formula floor((x * mul + add) / div + 1/2), clipped to int8."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(3)
    w, c = rng.integers(-8, 8, (6, 5)), rng.integers(-50, 50, (3, 5))
    mul, add = rng.integers(1, 9, (5,)), rng.integers(-20, 20, (5,))
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=3.0, beta=-2.0),
             helper.make_node("RequantShift", ["g", "mul", "add"], ["y"], domain="ai.onnx.contrib", div=16, n_levels=256, signed=1)]
    graph = helper.make_graph(nodes, "deeploy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g", "y")],
                              initializer=[_f("w", w), _f("c", c), _f("mul", mul), _f("add", add)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.contrib", 1)])
    x = rng.integers(-128, 128, (3, 6))
    out = import_model(model).run({"x": x.astype(np.int8)})
    gemm_only = helper.make_model(helper.make_graph(nodes[:1], "g", graph.input, graph.output[:1], initializer=graph.initializer[:2]),
                                  opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(gemm_only.SerializeToString(), providers=["CPUExecutionProvider"])
    want_g = session.run(None, {"x": x.astype(np.float32)})[0]
    assert np.array_equal(out["g"], want_g.astype(np.int64))
    assert np.array_equal(out["y"], np.clip(np.floor((want_g.astype(np.int64) * mul + add) / 16 + 0.5), -128, 127))
    model.graph.node[0].attribute[0].f = 0.5  # alpha
    with pytest.raises(ImportFailure, match=r"node .*\(Gemm\): alpha = 0.5 is not an integer"):
        import_model(model)
