"""QDQ and QOperator graphs built with onnx.helper, imported and compared with onnxruntime.

With `requant="ort"` the integer results of QLinearMatMul, QLinearConv and the QDQ
MatMul/Conv/Gemm onnxruntime fuses into them must equal onnxruntime's bit for bit (the
RequantF32 op replays its float32 arithmetic); with `dyadic` they may differ by one step
where a product lies within the dyadic multiplier's error of a rounding tie.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.importers import ImportFailure, dequantize_outputs, import_model, quantize_inputs

OPSET = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _model(nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 10
    return model


def _ort(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _init(name, array, elem=None):
    t = numpy_helper.from_array(np.asarray(array), name)
    return t


def qdq_matmul_conv_model(rng, per_channel: bool):
    """x (float) -Q-> DQ -> MatMul(DQ w1) -Q-> DQ -> Conv1d(DQ w2, bias) -Q-> DQ -> y (float)."""
    k, n = 24, 8
    x_scale, h_scale, y_scale = np.float32(0.0213), np.float32(0.0871), np.float32(0.173)
    w1 = rng.integers(-127, 128, size=(k, n)).astype(np.int8)
    w1_scale = (rng.random(n) * 0.01 + 0.002).astype(np.float32) if per_channel else np.float32(0.0057)
    w2 = rng.integers(-127, 128, size=(4, 2, 3)).astype(np.int8)
    w2_scale = (rng.random(4) * 0.02 + 0.003).astype(np.float32) if per_channel else np.float32(0.0101)
    bias_scale = (h_scale * np.asarray(w2_scale, np.float32)).astype(np.float32)
    bias = rng.integers(-2000, 2000, size=4).astype(np.int32)
    zeros = lambda shape: np.zeros(shape, np.int8)  # noqa: E731
    inits = [
        _init("x_scale", x_scale), _init("x_zp", np.int8(3)),
        _init("w1", w1), _init("w1_scale", w1_scale), _init("w1_zp", zeros(np.shape(w1_scale))),
        _init("h_scale", h_scale), _init("h_zp", np.int8(-5)),
        _init("w2", w2), _init("w2_scale", w2_scale), _init("w2_zp", zeros(np.shape(w2_scale))),
        _init("b", bias), _init("b_scale", bias_scale), _init("b_zp", np.zeros(np.shape(bias_scale), np.int32)),
        _init("y_scale", y_scale), _init("y_zp", np.int8(7)),
    ]
    axis = {"axis": 1} if per_channel else {}
    axis0 = {"axis": 0} if per_channel else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1", "w1_scale", "w1_zp"], ["w1d"], **axis),
        helper.make_node("MatMul", ["xd", "w1d"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "h_scale", "h_zp"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "h_scale", "h_zp"], ["hd"]),
        helper.make_node("DequantizeLinear", ["w2", "w2_scale", "w2_zp"], ["w2d"], **axis0),
        helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["bd"], **axis0),
        helper.make_node("Conv", ["hd", "w2d", "bd"], ["c"], pads=[1, 1], strides=[2], group=2),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"]),
    ]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, k])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    hq_info = helper.make_tensor_value_info("hq", TensorProto.INT8, None)
    yq_info = helper.make_tensor_value_info("yq", TensorProto.INT8, None)
    return _model(nodes, [x_info], [y_info, hq_info, yq_info], inits)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_matmul_and_conv_equal_onnxruntime_with_ort_requant(per_channel):
    rng = np.random.default_rng(7 + per_channel)
    model = qdq_matmul_conv_model(rng, per_channel)
    x = (rng.standard_normal((2, 4, 24)) * 2).astype(np.float32)
    expected = _ort(model, {"x": x})
    for requant in ("ort", "dyadic"):
        imported = import_model(model, requant=requant)
        raw = imported.run(quantize_inputs(imported, {"x": x}))
        got = dequantize_outputs(imported, raw)
        for name, want in zip(["y", "hq", "yq"], expected):
            value = got[name] if name in got else raw[imported.metadata["import"]["outputs"][name]["tensor"]]
            if requant == "ort":
                np.testing.assert_array_equal(np.asarray(value).astype(np.float64), want.astype(np.float64), err_msg=name)
            elif name != "y":
                assert np.max(np.abs(value.astype(np.int64) - want.astype(np.int64))) <= 1, name


def qoperator_model(rng):
    """QLinearMatMul (uint8 x int8 -> uint8) then QLinearConv, every parameter an initializer."""
    a_scale, b_scale, y_scale = np.float32(0.0137), np.float32(0.00432), np.float32(0.0293)
    # Weights within [-64, 63]: onnxruntime's u8s8 kernel on x86 without VNNI (AVX2's
    # vpmaddubsw) saturates each pair of products to int16, which 255 * 64 * 2 stays inside;
    # with VNNI or AVX-512 it sums exactly. The oracle must not depend on the CPU.
    b = rng.integers(-64, 64, size=(32, 12)).astype(np.int8)
    w = rng.integers(0, 256, size=(6, 3, 2, 2)).astype(np.uint8)
    w_scale = np.float32(0.0077)
    c_scale = np.float32(0.041)
    bias = rng.integers(-3000, 3000, size=6).astype(np.int32)
    inits = [
        _init("a_scale", a_scale), _init("a_zp", np.uint8(131)), _init("b", b), _init("b_scale", b_scale),
        _init("b_zp", np.int8(0)), _init("y_scale", y_scale), _init("y_zp", np.uint8(120)),
        _init("shape", np.array([1, 3, 8, 8], np.int64)),
        _init("w", w), _init("w_scale", w_scale), _init("w_zp", np.uint8(128)),
        _init("c_scale", c_scale), _init("c_zp", np.uint8(100)), _init("bias", bias),
    ]
    nodes = [
        helper.make_node("QLinearMatMul", ["a", "a_scale", "a_zp", "b", "b_scale", "b_zp", "y_scale", "y_zp"], ["y"]),
        helper.make_node("Reshape", ["y", "shape"], ["img"]),
        helper.make_node("QLinearConv", ["img", "y_scale", "y_zp", "w", "w_scale", "w_zp", "c_scale", "c_zp", "bias"],
                         ["c"], pads=[1, 0, 0, 1], dilations=[1, 2], strides=[1, 1]),
    ]
    a_info = helper.make_tensor_value_info("a", TensorProto.UINT8, [16, 32])
    out = [helper.make_tensor_value_info("y", TensorProto.UINT8, None), helper.make_tensor_value_info("c", TensorProto.UINT8, None)]
    return _model(nodes, [a_info], out, inits)


def test_qoperator_graph_equals_onnxruntime_with_ort_requant():
    rng = np.random.default_rng(3)
    model = qoperator_model(rng)
    a = rng.integers(0, 256, size=(16, 32)).astype(np.uint8)
    expected = _ort(model, {"a": a})
    got = import_model(model, requant="ort").run({"a": a})
    np.testing.assert_array_equal(got["y"], expected[0])
    np.testing.assert_array_equal(got["c"], expected[1])


def test_qlinearadd_and_lookup_tables_stay_within_one_step_of_onnxruntime():
    """QLinearAdd (com.microsoft) imports as an integer sum with one dyadic shift; QLinearSigmoid
    as a table from onnx's reference Sigmoid. Neither is onnxruntime's float code, so one step
    of difference is allowed (and reported by the assertion message when exceeded)."""
    rng = np.random.default_rng(11)
    inits = [_init("sa", np.float32(0.05)), _init("za", np.uint8(128)), _init("sb", np.float32(0.031)),
             _init("zb", np.uint8(120)), _init("sc", np.float32(0.07)), _init("zc", np.uint8(125)),
             _init("ss", np.float32(1 / 256)), _init("zs", np.uint8(0))]
    nodes = [
        helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain="com.microsoft"),
        helper.make_node("QLinearSigmoid", ["c", "sc", "zc", "ss", "zs"], ["s"], domain="com.microsoft"),
    ]
    infos = [helper.make_tensor_value_info(n, TensorProto.UINT8, [4, 64]) for n in ("a", "b")]
    out = [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("c", "s")]
    model = _model(nodes, infos, out, inits)
    feeds = {n: rng.integers(0, 256, size=(4, 64)).astype(np.uint8) for n in ("a", "b")}
    expected = _ort(model, feeds)
    got = import_model(model).run(feeds)
    for name, want in zip(("c", "s"), expected):
        assert np.max(np.abs(got[name].astype(np.int64) - want.astype(np.int64))) <= 1, name


def test_float_ops_between_dq_and_q_become_lookup_tables():
    """DQ -> Div(by 1.414) -> Erf -> Add(1) -> Q is one table: computed by onnx's reference ops."""
    s_in, s_out = np.float32(0.04), np.float32(2 / 255)
    inits = [_init("s", s_in), _init("z", np.int8(0)), _init("c", np.float32(1.414)), _init("one", np.float32(1.0)),
             _init("so", s_out), _init("zo", np.uint8(0))]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]),
        helper.make_node("Div", ["xd", "c"], ["t"]),
        helper.make_node("Erf", ["t"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["u"]),
        helper.make_node("QuantizeLinear", ["u", "so", "zo"], ["y"]),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.INT8, [256])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    imported = import_model(model)
    assert [n.op for n in imported.graph.nodes] == ["Lut"]
    x = np.arange(-128, 128, dtype=np.int8)
    from onnx.reference import ReferenceEvaluator

    np.testing.assert_array_equal(imported.run({"x": x})["y"], ReferenceEvaluator(model).run(None, {"x": x})[0])


def test_unsupported_op_names_op_node_and_reason():
    inits = [_init("s", np.float32(0.1)), _init("z", np.int8(0))]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]),
        helper.make_node("TopK", ["xd", "k"], ["v", "i"], name="topk_1"),
    ]
    inits.append(_init("k", np.array([2], np.int64)))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.INT8, [8])],
                   [helper.make_tensor_value_info("v", TensorProto.FLOAT, None)], inits)
    with pytest.raises(ImportFailure) as info:
        import_model(model)
    message = str(info.value)
    assert "topk_1" in message and "TopK" in message and "\n" not in message


def test_cli_import_and_run(tmp_path):
    rng = np.random.default_rng(3)
    source = tmp_path / "q.onnx"
    onnx.save(qoperator_model(rng), source)
    out = tmp_path / "q.intq"
    result = subprocess.run([sys.executable, "-m", "refsim", "import", str(source), "-o", str(out), "--requant", "ort"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "qdq" in result.stdout and out.exists()
    bad = subprocess.run([sys.executable, "-m", "refsim", "import", str(tmp_path / "missing.onnx"), "-o", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.onnx" in bad.stderr


def test_ort_requant_reproduces_onnxruntime_near_ties_where_dyadic_does_not():
    """Every accumulator 0..32895 (a0 + 127*a1 over all uint8 pairs), 20 random scale triples:
    onnxruntime's float32 rounding decides near-ties differently from the exact product, and
    RequantF32 must follow it every time. The dyadic form (exact up to 2^-31) must differ
    somewhere, or this test could not tell the two apart."""
    rng = np.random.default_rng(0)
    a0, a1 = np.meshgrid(np.arange(256), np.arange(256))
    a = np.stack([a0.ravel(), a1.ravel()], 1).astype(np.uint8)
    dyadic_differences = 0
    for _ in range(20):
        sa, sb = (rng.random(2) * 0.01 + 0.001).astype(np.float32)
        sy = np.float32(sa * sb * 32895 / 255 * (0.9 + 0.2 * rng.random()))
        inits = [_init("sa", sa), _init("za", np.uint8(0)), _init("b", np.array([[1], [127]], np.int8)),
                 _init("sb", sb), _init("zb", np.int8(0)), _init("sy", sy), _init("zy", np.uint8(0))]
        node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
        model = _model([node], [helper.make_tensor_value_info("a", TensorProto.UINT8, [65536, 2])],
                       [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
        want = _ort(model, {"a": a})[0]
        np.testing.assert_array_equal(import_model(model, requant="ort").run({"a": a})["y"], want)
        dyadic_differences += int((import_model(model, requant="dyadic").run({"a": a})["y"] != want).sum())
    assert dyadic_differences > 0


def test_torch_fake_quant_export_imports(tmp_path):
    """torch.onnx.export of a fake-quantized conv net (QDQ with Constant zero points, per-channel
    weights, Relu on the accumulator) imports and agrees with torch's fake-quant forward
    within one output step (torch computes the products in float)."""
    import warnings

    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cw", torch.randn(4, 3, 3, 3))
            self.register_buffer("fw", torch.randn(5, 64))

        def forward(self, x):
            x = torch.fake_quantize_per_tensor_affine(x, 0.05, 3, -128, 127)
            w = torch.fake_quantize_per_channel_affine(self.cw, torch.full((4,), 0.02), torch.zeros(4, dtype=torch.int32), 0, -128, 127)
            y = torch.fake_quantize_per_tensor_affine(torch.relu(torch.nn.functional.conv2d(x, w, None, padding=1)), 0.04, 0, 0, 255)
            y = torch.nn.functional.max_pool2d(y, 2).flatten(1)
            w2 = torch.fake_quantize_per_tensor_affine(self.fw, 0.01, 0, -128, 127)
            return torch.fake_quantize_per_tensor_affine(y @ w2.t(), 0.1, -3, -128, 127)

    net = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "fq.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
    imported = import_model(path)
    assert {n.op for n in imported.graph.nodes} >= {"Conv", "Relu", "MaxPool", "MatMul", "Requant"}
    got = dequantize_outputs(imported, imported.run(quantize_inputs(imported, {"x": x.numpy()})))["y"]
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(got - want).max() <= 0.1 + 1e-6


def test_qlinear_softmax_imports_as_the_integer_softmax():
    """com.microsoft QLinearSoftmax becomes IBertSoftmax (mode ibert) plus a requantization; it is
    refsim's integer variant, so it is compared with the float softmax, within a few steps."""
    inits = [_init("sx", np.float32(0.05)), _init("zx", np.uint8(128)), _init("sy", np.float32(1 / 256)),
             _init("zy", np.uint8(0))]
    node = helper.make_node("QLinearSoftmax", ["x", "sx", "zx", "sy", "zy"], ["y"], domain="com.microsoft", axis=-1, opset=13)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, [2, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    imported = import_model(model)
    assert "IBertSoftmax" in {n.op for n in imported.graph.nodes}
    x = np.random.default_rng(1).integers(0, 256, size=(2, 16)).astype(np.uint8)
    real = (x.astype(np.float64) - 128) * 0.05
    expected = np.exp(real - real.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    got = imported.run({"x": x})["y"].astype(np.float64) / 256
    assert np.abs(got - expected).max() < 0.02
