"""`refsim compare` on an imported model: refsim's integer tensors beside onnxruntime's by ONNX name.

A small MLP (MatMul, Add, Relu, MatMul) is quantized by onnxruntime's `quantize_static` as
QDQ and as QOperator (uint8 activations, int8 weights) and imported with `--requant ort`.
onnxruntime running the quantized model is the oracle: every lined-up integer tensor must
be exact, each imported tensor carries the scale and zero point the ONNX graph gives it, and
a deliberately perturbed `.intq` is caught at the tensor the perturbation first reaches.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.importers import import_model
from refsim.exporters.lineup import lineup
from refsim.intq import save
from test_cli import run_cli

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    folder = tmp_path_factory.mktemp("lineup")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 12)), ("b1", (12,)), ("w2", (12, 6)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "float.onnx")
    x = rng.normal(0, 1, (6, 4, 16)).astype(np.float32)  # 6 samples of the [4, 16] input
    np.save(folder / "x.npy", x)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": sample} for sample in x])

        def get_next(self):
            return next(self.feeds, None)

    paths = {}
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        paths[fmt.name] = folder / f"{fmt.name}.onnx"
        quantize_static(str(folder / "float.onnx"), str(paths[fmt.name]), Reader(), quant_format=fmt,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # 7-bit weights: onnxruntime's AVX2 u8s8 kernel (no VNNI) saturates int16
                        # pair sums otherwise, and the oracle would depend on the CPU
                        reduce_range=True)
        import_model(paths[fmt.name], folder / f"{fmt.name}.intq", requant="ort")
    return folder, paths


def _onnx_scales(path) -> dict[str, tuple[float, int]]:
    """{quantized ONNX tensor: (scale, zero point)} read from the ONNX graph's own parameters."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            out[node.output[0]] = (inits[node.input[1]], inits[node.input[2]])
        elif node.op_type.startswith("QLinear"):  # the output's scale and zero point are its last two inputs
            out[node.output[0]] = (inits[node.input[-2]], inits[node.input[-1]])
    return {k: (float(s), int(z)) for k, (s, z) in out.items()}


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_imported_tensors_line_up_exactly_with_onnxruntime(quantized, fmt):
    folder, paths = quantized
    report = lineup(paths[fmt], folder / f"{fmt}.intq", folder / "x.npy")
    want = set(_onnx_scales(paths[fmt]))  # every quantized activation of the ONNX graph
    assert {r["onnx"] for r in report.tensors} == want and len(want) >= 3
    assert report.samples == 6 and not report.unmatched
    for r in report.tensors:
        assert r["total"] > 0 and r["exact"] == r["total"] and r["max_diff"] == 0, r
    assert report.first_divergent is None
    # the input is quantized at refsim's boundary: its refsim name is the ONNX input's, recorded as the QuantizeLinear output
    renamed = [r for r in report.tensors if r["tensor"] != r["onnx"]]
    assert [r["tensor"] for r in renamed] == ["x"]


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_imported_tensors_keep_their_onnx_scale_and_zero_point(quantized, fmt):
    import refsim

    folder, paths = quantized
    m = refsim.load(folder / f"{fmt}.intq")
    onnx_names = m.metadata["onnx_names"]
    scales = _onnx_scales(paths[fmt])
    assert set(onnx_names.values()) == set(scales)
    for tensor, onnx_name in onnx_names.items():
        t = m.graph.tensors[tensor]
        assert (np.float32(t.scale), t.zero_point) == (np.float32(scales[onnx_name][0]), scales[onnx_name][1]), tensor


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_a_perturbed_intq_is_caught_where_it_first_diverges(quantized, fmt, tmp_path):
    folder, paths = quantized
    model = import_model(paths[fmt], requant="ort")
    second = [n for n in model.graph.nodes if n.op == "MatMul"][1]
    weights = model.graph.tensors[second.inputs[1]]
    weights.data = np.clip(-weights.data.astype(np.int16), -127, 127).astype(weights.data.dtype)  # the last layer's weights negated
    save(model.graph, tmp_path / "perturbed.intq")
    report = lineup(paths[fmt], tmp_path / "perturbed.intq", folder / "x.npy")
    first = report.first_divergent
    assert first is not None and first["onnx"] == {"QDQ": "y_QuantizeLinear_Output", "QOperator": "y_quantized"}[fmt]
    assert first["max_diff"] > 0 and report.tensors[-1] is first
    assert all(r["exact"] == r["total"] for r in report.tensors[:-1])
    assert f"first divergent tensor: {first['onnx']}" in report.text()


def test_an_intq_without_the_record_lines_up_identical_names(quantized, tmp_path):
    """An .intq imported before the ONNX names were recorded: only same-named tensors."""
    folder, paths = quantized
    model = import_model(paths["QOperator"], requant="ort")
    del model.graph.metadata["onnx_names"]
    save(model.graph, tmp_path / "old.intq")
    report = lineup(paths["QOperator"], tmp_path / "old.intq", folder / "x.npy")
    assert not report.recorded and "records no ONNX names" in report.text()
    assert {r["onnx"] for r in report.tensors} == set(_onnx_scales(paths["QOperator"])) - {"x_quantized"}
    assert report.first_divergent is None


def test_compare_cli_on_an_imported_model(quantized, capsys):
    folder, paths = quantized
    code, out, err = run_cli(capsys, "compare", paths["QDQ"], folder / "QDQ.intq", folder / "x.npy", "--json")
    assert code == 0 and not err
    report = json.loads(out)
    assert report["first_divergent"] is None and report["exact_tensors"] == len(report["tensors"]) >= 3
    code, out, err = run_cli(capsys, "compare", paths["QDQ"], folder / "QDQ.intq", folder / "missing.npy")
    assert code == 2 and err.count("\n") == 1 and "missing.npy" in err
    code, out, err = run_cli(capsys, "compare", paths["QDQ"], folder / "QDQ.intq", folder / "x.npy", "--labels", "labels.txt")
    assert code == 2 and err.count("\n") == 1 and "--labels needs an .intq from `refsim export`" in err


def test_a_model_the_intq_was_not_imported_from_lines_up_nothing(quantized):
    folder, paths = quantized
    report = lineup(paths["QOperator"], folder / "QDQ.intq", folder / "x.npy")  # QOperator names none of QDQ's tensors
    assert [r["onnx"] for r in report.tensors] == [] and "no tensor lined up" in report.text()
