"""Float at the edges: Model.quantize_inputs / dequantize_outputs for exported and imported
models, `refsim run --float`, and `refsim run` on an .onnx file."""

import json
from pathlib import Path

import numpy as np
import pytest
import refsim
from refsim import GraphBuilder
from refsim.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def qdq_model(tmp_path_factory):
    from refsim.exporters.importers import import_model

    out = tmp_path_factory.mktemp("qdq") / "qdq_tiny.intq"
    import_model(str(EXAMPLES / "qdq_tiny.onnx"), str(out), requant="ort")
    return out


def test_an_imported_model_takes_and_gives_floats_as_onnxruntime_does(qdq_model):
    import onnxruntime as ort

    model = refsim.load(qdq_model)
    x = np.random.default_rng(3).normal(0, 2, (1, 16)).astype(np.float32)
    feeds = model.quantize_inputs({"x": x})
    assert feeds["x"].dtype.kind in "iu"
    got = model.dequantize_outputs(model.run(feeds))
    session = ort.InferenceSession(str(EXAMPLES / "qdq_tiny.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {"x": x})[0]
    (name,) = got
    assert got[name].dtype == np.float32 and got[name].tolist() == want.tolist()
    assert np.unique(want).size > 1


def test_an_exported_model_quantizes_and_dequantizes_with_its_recorded_scales():
    b = GraphBuilder("edges")
    x = b.input("x", "int8", [1, 4], scale=0.5, zero_point=0)
    y = b.node("Relu", [x], outputs="y")
    b.output(y)
    b.metadata["input_quant"] = {"x": {"scale": 0.5, "zero_point": 3, "dtype": "int8"}}
    model = b.model()
    model.graph.tensors["y"].scale, model.graph.tensors["y"].zero_point = 0.25, -2
    q = model.quantize_inputs({"x": np.array([[1.0, -0.75, 100.0, -0.25]])})["x"]
    assert q.tolist() == [[5, 1, 127, 3]]  # rint(x / 0.5) + 3, ties to even, clipped to int8
    out = model.dequantize_outputs(model.run({"x": q}))
    assert out["y"].tolist() == [[(5 + 2) * 0.25, (1 + 2) * 0.25, (127 + 2) * 0.25, (3 + 2) * 0.25]]


def test_run_float_prints_and_reports_floats(tmp_path, capsys):
    out = tmp_path / "qonnx_tiny.intq"
    assert cli(["import", str(EXAMPLES / "qonnx_tiny.onnx"), "-o", str(out)]) == 0
    capsys.readouterr()
    assert cli(["run", str(out), str(EXAMPLES / "import_inputs.txt"), "--float", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for sample in doc["samples"]:
        y = sample["outputs"]["y"]
        scale, zero = np.asarray(y["scale"]), np.asarray(y["zero_point"])
        assert y["float_values"] == ((np.asarray(y["values"]) - zero) * scale).tolist()
    assert any(v != 0 for s in doc["samples"] for v in s["outputs"]["y"]["values"][0])  # the example says something
    assert cli(["run", str(out), str(EXAMPLES / "import_inputs.txt"), "--float"]) == 0
    assert "y float (scale 0.25) = " in capsys.readouterr().out


def test_run_on_an_onnx_file_points_at_export_and_import(capsys):
    assert cli(["run", str(EXAMPLES / "qonnx_tiny.onnx"), str(EXAMPLES / "import_inputs.txt")]) == 2
    err = capsys.readouterr().err
    assert "is an ONNX model, not a .intq" in err and "refsim export" in err and "refsim import" in err
