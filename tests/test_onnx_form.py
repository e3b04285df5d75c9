"""`refsim convert`: a .intq as a valid ONNX graph (refsim domain, typed integer
initializers, scale annotations) that `refsim import` reads back to the same bytes."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from golden_helpers import ita_model
from refsim import GraphBuilder
from refsim.cli import main as cli
from refsim.intq import load_graph, save

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def round_trip(tmp_path, intq: Path) -> onnx.ModelProto:
    onnx_path, back = tmp_path / f"{intq.stem}.onnx", tmp_path / f"{intq.stem}.back.intq"
    assert cli(["convert", str(intq), "-o", str(onnx_path)]) == 0
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert cli(["import", str(onnx_path), "-o", str(back)]) == 0
    assert back.read_bytes() == intq.read_bytes(), f"{intq.name}: the round trip changed the file"
    return model


def sub_byte_model(path):
    rng = np.random.default_rng(1)
    b = GraphBuilder("sub_byte")
    x = b.input("x", "int8", ["batch", 8], scale=0.1, zero_point=0)
    for i, dtype in enumerate(("int4", "uint4", "int2", "uint2", "ternary")):
        lo, hi = {"int4": (-8, 8), "uint4": (0, 16), "int2": (-2, 2), "uint2": (0, 4), "ternary": (-1, 2)}[dtype]
        w = b.const(rng.integers(lo, hi, (8, 8)), dtype, name=f"w_{dtype}")
        x = b.node("MatMul", [x, w], outputs=f"acc{i}")
        x = b.node("Requant", [x, b.const(rng.integers(1, 200, 8), "int32", name=f"mul{i}"),
                               b.const(9, "int8", name=f"shift{i}")], outputs=f"y{i}", dtype="int8")
    b.output(x)
    save(b.model().graph, path)


def test_sub_byte_weights_keep_their_onnx_types(tmp_path):
    path = tmp_path / "sub_byte.intq"
    sub_byte_model(path)
    model = round_trip(tmp_path, path)
    types = {t.name: onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer}
    assert [types[f"w_{d}"] for d in ("int4", "uint4", "int2", "uint2", "ternary")] == ["INT4", "UINT4", "INT2", "UINT2", "INT2"]
    w = next(t for t in model.graph.initializer if t.name == "w_int4")
    graph = load_graph(path)
    assert onnx.numpy_helper.to_array(w).astype(np.int64).tolist() == graph.tensors["w_int4"].data.tolist()
    assert {n.domain for n in model.graph.node} == {"refsim"} and model.graph.node[1].op_type == "Requant"
    (x_annotation,) = [a for a in model.graph.quantization_annotation if a.tensor_name == "x"]
    scale_name = {p.key: p.value for p in x_annotation.quant_parameter_tensor_names}["SCALE_TENSOR"]
    scale = next(t for t in model.graph.initializer if t.name == scale_name)
    assert onnx.numpy_helper.to_array(scale).tolist() == 0.1
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("example", ["tiny_mlp.intq"])
def test_shipped_model_round_trips(tmp_path, example):
    round_trip(tmp_path, EXAMPLES / example)


@pytest.mark.parametrize("onnx_file,extra", [("qonnx_tiny.onnx", []), ("deeploy_tiny.onnx", ["--input-type", "x=int8"]),
                                             ("qdq_tiny.onnx", ["--requant", "ort"])])
def test_imported_models_round_trip(tmp_path, onnx_file, extra):
    intq = tmp_path / onnx_file.replace(".onnx", ".intq")
    assert cli(["import", str(EXAMPLES / onnx_file), "-o", str(intq), *extra]) == 0
    round_trip(tmp_path, intq)


def test_ita_blocks_round_trip_with_their_records(tmp_path):
    from test_ita import ff_model

    path = tmp_path / "ita.intq"
    save(ita_model(64, 64, 64, 2, seed=2).graph, path)
    round_trip(tmp_path, path)
    path = tmp_path / "ffn.intq"
    save(ff_model("gelu")[0].graph, path)
    model = round_trip(tmp_path, path)
    gelu = next(n for n in model.graph.node if n.op_type == "ITAGelu")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gelu.attribute}["q_b"] == -80


def test_convert_refuses_a_non_onnx_name_and_import_a_foreign_refsim_domain(tmp_path, capsys):
    assert cli(["convert", str(EXAMPLES / "tiny_mlp.intq"), "-o", str(tmp_path / "x.intq")]) == 2
    node = onnx.helper.make_node("Requant", ["x"], ["y"], domain="refsim")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT8, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, [1])])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "foreign.onnx"))
    capsys.readouterr()
    assert cli(["import", str(tmp_path / "foreign.onnx"), "-o", str(tmp_path / "f.intq")]) == 2
    assert "only files written by `refsim convert` can be read back" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(__import__("os").environ.get("REFSIM_SLOW") != "1", reason="an export; runs with REFSIM_SLOW=1")
@pytest.mark.parametrize("options", [["--mode", "ita"], ["--wbits", "4", "--per-channel"]])
def test_exported_vit_round_trips(tmp_path, options):
    intq = tmp_path / "vit.intq"
    assert cli(["export", str(EXAMPLES / "vit_digits" / "vit_digits.onnx"), "-o", str(intq),
                "--calib", str(EXAMPLES / "vit_digits" / "calib.npy"), "--quiet", *options]) == 0
    round_trip(tmp_path, intq)
