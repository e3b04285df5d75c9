"""refsim.boundary: float inputs onto the integers a model takes, integer outputs back to floats,
for exported and imported models alike, and the schemas of older files."""

from __future__ import annotations

import numpy as np
import pytest
from refsim import GraphBuilder
from refsim.boundary import dequantize_outputs, input_specs, quantize_array, quantize_feeds
from refsim.errors import InputError


def model_with(metadata: dict):
    b = GraphBuilder("m")
    b.output(b.input("x", "int8", ["batch", 4]))
    b.metadata.update(metadata)
    return b.model()


def test_quantization_hand_worked():
    # x / 0.1 in float32 = 2.6, -2.5, 1000, -0.5: ties to even give 3, -2, (127), -0.
    spec = {"dtype": "int8", "scale": 0.1, "zero_point": 0}
    q = quantize_array(np.array([0.26, -0.25, 100.0, -0.05], np.float32), spec)
    assert q.tolist() == [3, -2, 127, 0] and q.dtype == np.int8
    # A zero point and a narrowed range: round(x / 0.5) + 10, clipped to [0, 20].
    spec = {"dtype": "uint8", "scale": 0.5, "zero_point": 10, "clip": [0, 20]}
    assert quantize_array(np.array([1.0, -100.0, 100.0, 0.25]), spec).tolist() == [12, 0, 20, 10]
    with pytest.raises(InputError, match="NaN"):
        quantize_array(np.array([np.nan]), {"dtype": "int8", "scale": 0.1})


def test_float32_division_as_onnx_quantizelinear():
    # 0.3 / 0.1 is 2.9999999999999996 in float64 but exactly 3 in float32: the two
    # arithmetics round differently at such points, and ONNX QuantizeLinear uses float32.
    x = np.array([0.35], np.float32)
    s = 0.1
    f32 = quantize_array(x, {"dtype": "int8", "scale": s})
    f64 = quantize_array(x, {"dtype": "int8", "scale": s, "arithmetic": "float64"})
    assert f32.tolist() == [int(np.rint(np.float32(0.35) / np.float32(0.1)))]
    assert f64.tolist() == [int(np.rint(np.float64(np.float32(0.35)) / 0.1))]


def test_per_axis_and_rounding_modes():
    x = np.array([[1.25, 1.25], [-1.25, -1.25]], np.float32)
    spec = {"dtype": "int8", "scale": [0.5, 1.0], "zero_point": [0, 0], "axis": 1}
    assert quantize_array(x, spec).tolist() == [[2, 1], [-2, -1]]  # 2.5 -> 2, 1.25 -> 1
    floor = {"dtype": "int8", "scale": 0.5, "zero_point": 0, "rounding": "floor"}
    assert quantize_array(np.array([1.25, -1.25], np.float32), floor).tolist() == [2, -3]


def test_integer_inputs_pass_and_integral_floats_cast():
    m = model_with({"boundary": {"inputs": {"x": {"dtype": "int8", "integers": True}}, "outputs": {}}})
    assert quantize_feeds(m, {"x": np.array([[1.0, -2.0, 3.0, 4.0]])})["x"].tolist() == [[1, -2, 3, 4]]
    with pytest.raises(InputError, match="must hold integers"):
        quantize_feeds(m, {"x": np.array([[0.5, 0, 0, 0]])})
    ints = np.array([[5, 6, 7, 8]], np.int8)
    assert quantize_feeds(m, {"x": ints})["x"] is ints


def test_older_files_read_through_the_same_api():
    exported = model_with({"input_quant": {"x": {"scale": 0.5, "zero_point": 0, "dtype": "int8"}}})
    assert input_specs(exported.metadata)["x"]["arithmetic"] == "float64"
    assert quantize_feeds(exported, {"x": np.array([[1.0, -0.75, 0, 0]])})["x"].tolist() == [[2, -2, 0, 0]]
    imported = model_with({"import": {"inputs": {"x": {"onnx_dtype": "float", "scale": [0.25], "zero_point": [1]}},
                                      "outputs": {"y": {"tensor": "x", "dtype": "int8", "scale": [0.5],
                                                        "zero_point": [2], "dequantize": True}}}})
    assert quantize_feeds(imported, {"x": np.array([[1.0, 0, 0, 0]], np.float32)})["x"].tolist() == [[5, 1, 1, 1]]
    out = dequantize_outputs(imported, {"x": np.array([[4, 2, 0, 2]], np.int8)})
    assert out["y"].tolist() == [[1.0, 0.0, -1.0, 0.0]] and out["y"].dtype == np.float32


def test_outputs_dequantized_only_where_the_source_graph_did():
    m = model_with({"boundary": {"inputs": {}, "outputs": {
        "logits": {"tensor": "x", "dtype": "int8", "scale": 0.5, "zero_point": 0, "dequantize": False}}}})
    raw = np.array([[2, 4, 6, 8]], np.int8)
    assert dequantize_outputs(m, {"x": raw})["logits"] is raw
    assert dequantize_outputs(m, {"x": raw}, every=True)["logits"].tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_refsim_run_and_golden_quantize_float_inputs_of_imported_models(tmp_path, capsys):
    """An imported QDQ model takes float inputs from the CLI, through the same boundary
    schema as an exported one."""
    import json
    from pathlib import Path

    from refsim import load
    from refsim.cli import main as cli
    from refsim.exporters.importers import import_model, quantize_inputs

    root = Path(__file__).resolve().parent.parent
    model = import_model(root / "examples" / "qdq_tiny.onnx", tmp_path / "q.intq")
    assert set(model.metadata["boundary"]["inputs"]) == {"x"}
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert cli(["run", str(tmp_path / "q.intq"), str(tmp_path / "x.npy"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["samples"][0]["outputs"]
    m = load(tmp_path / "q.intq")
    want = m.run(quantize_inputs(m, {"x": x}))
    assert {k: v["values"] for k, v in printed.items()} == {k: v.tolist() for k, v in want.items()}
    assert cli(["golden", str(tmp_path / "q.intq"), str(tmp_path / "x.npy"), "-o", str(tmp_path / "vectors")]) == 0
    stored = np.load(tmp_path / "vectors" / "sample0000" / "x.npy")
    assert np.array_equal(stored, quantize_inputs(m, {"x": x})["x"])
