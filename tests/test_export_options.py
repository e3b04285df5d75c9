"""Export options: bit widths, per-channel scales, layers.json, calibration methods, modes'
constraints, and the one-line errors for what cannot be exported."""

from __future__ import annotations

import collections
import json
import warnings

import export_helpers as h
import numpy as np
import onnx
import pytest
import refsim
from onnx import helper, numpy_helper
from refsim.cli import main as cli
from refsim.exporters import compare, export
from refsim.exporters.dyadic import ExportError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    d = tmp_path_factory.mktemp("opts")
    return {"model": h.vit(d / "vit.onnx", dynamo=False), "calib": h.image_data(d / "calib.npy", 32, 1),
            "eval": h.image_data(d / "eval.npy", 16, 2), "dir": d}


def weight_types(path) -> collections.Counter:
    m = refsim.load(path)
    return collections.Counter(t.dtype.name for n, t in m.graph.tensors.items() if t.is_const and n.endswith(".weight"))


@pytest.mark.parametrize("wbits, dtype", [("8", "int8"), ("4", "int4"), ("2", "int2"), ("ternary", "ternary")])
def test_weight_bits_are_stored_packed(vit, tmp_path, wbits, dtype):
    out = tmp_path / "m.intq"
    export(vit["model"], out, vit["calib"], wbits=wbits, per_channel=True)
    types = weight_types(out)
    assert set(types) == {dtype}
    m = refsim.load(out)
    w = next(t for n, t in m.graph.tensors.items() if n.endswith("query.weight") or n.endswith("q_proj.weight"))
    assert len(w.scale) == w.shape[-1] and w.quant_axis == -1  # one scale per output channel
    # Fake-quant and integer agree closely whatever the weight width: they share the quantized weights.
    report = compare(vit["model"], out, vit["eval"])
    assert report.outputs["logits"]["integer vs fake-quant"]["cosine"] > 0.99


@pytest.mark.parametrize("abits, dtype, clip", [(2, "int2", None), (3, "int4", (-4, 3)), (4, "int4", None),
                                               (6, "int8", (-32, 31)), (16, "int16", None)])
def test_activations_live_in_the_narrowest_type(vit, tmp_path, abits, dtype, clip):
    out = tmp_path / f"a{abits}.intq"
    export(vit["model"], out, vit["calib"], abits=abits)
    m = refsim.load(out)
    producers = m.graph.producers()
    matmuls = [n for n in m.graph.nodes if n.op == "MatMul"]
    assert matmuls
    for node in matmuls:
        for operand in node.inputs[:2]:
            t = m.graph.tensors[operand]
            if t.is_const or t.dtype.name.startswith("uint"):  # weights; softmax probabilities
                continue
            # the matrix product takes the narrow tensor itself, no widening in between
            assert t.dtype.name == dtype
            rq = producers[operand]
            while rq.op in ("Reshape", "Transpose") and rq.inputs[0] in producers:
                rq = producers[rq.inputs[0]]
            assert rq.op == "Requant" or abits == 16  # 16 bits: the patches may be the graph input itself
            if rq.op == "Requant":
                assert (rq.attrs.get("lo"), rq.attrs.get("hi")) == (clip or (None, None))
    report = compare(vit["model"], out, vit["eval"])
    assert report.outputs["logits"]["integer vs fake-quant"]["cosine"] > 0.9


def test_layers_json_sets_odd_widths_per_layer(vit, tmp_path):
    config = {"*.attention.q_proj": {"abits": 3}, "*.mlp.fc1": {"abits": 6, "wbits": 5}, "*.mlp.fc2": {"wbits": 16}}
    out = tmp_path / "odd.intq"
    export(vit["model"], out, vit["calib"], config=config)
    m = refsim.load(out)
    by_name = {n.name: n for n in m.graph.nodes}
    producers = m.graph.producers()
    query, fc1, fc2 = (by_name[f"vit.layers.0.{layer}.acc"] for layer in ("attention.q_proj", "mlp.fc1", "mlp.fc2"))
    assert m.graph.tensors[query.inputs[0]].dtype.name == "int4" and producers[query.inputs[0]].attrs["hi"] == 3
    assert m.graph.tensors[fc1.inputs[0]].dtype.name == "int8" and producers[fc1.inputs[0]].attrs["hi"] == 31
    w1 = m.graph.tensors[fc1.inputs[1]]
    assert w1.dtype.name == "int8" and -16 <= w1.data.min() and w1.data.max() <= 15
    # 16-bit weights: an int16 constant, and an accumulator wide enough for 128 * 128 * 32767
    assert m.graph.tensors[fc2.inputs[1]].dtype.name == "int16" and fc2.attrs["acc_bits"] == 32
    assert compare(vit["model"], out, vit["eval"]).outputs["logits"]["integer vs fake-quant"]["cosine"] > 0.99


def test_ita_runs_wide_layers_beside_it(vit, tmp_path):
    # 16-bit weights or inputs do not fit ITA's 8-bit datapath: such a layer keeps an
    # accumulator sized for its operands (no 26-bit saturation) and an ordinary requantizer.
    out = tmp_path / "ita16.intq"
    export(vit["model"], out, vit["calib"], mode="ita", config={"*.mlp.fc2": {"wbits": 16}, "classifier": {"abits": 16}})
    m = refsim.load(out)
    by_name = {n.name: n for n in m.graph.nodes}
    fc2, head, fc1 = by_name["vit.layers.0.mlp.fc2.acc"], by_name["classifier.acc"], by_name["vit.layers.0.mlp.fc1.acc"]
    assert m.graph.tensors[fc2.inputs[1]].dtype.name == "int16" and fc2.attrs["acc_bits"] == 32
    assert fc2.attrs["overflow"] == "error"
    assert m.graph.tensors[head.inputs[0]].dtype.name == "int16" and head.attrs["acc_bits"] == 32
    assert fc1.attrs["acc_bits"] == 26 and fc1.attrs["overflow"] == "saturate"
    # fc2's accumulator itself enters the residual sum (ITA would hand out int8)
    assert [n.op for n in m.graph.consumers()[fc2.outputs[0]]] == ["Mul"]
    assert [n.op for n in m.graph.consumers()[fc1.outputs[0]]] == ["Requant"]
    assert compare(vit["model"], out, vit["eval"]).outputs["logits"]["integer vs fake-quant"]["cosine"] > 0.99


def test_layers_json_bits_and_keep_float(vit, tmp_path):
    config = tmp_path / "layers.json"
    config.write_text(json.dumps({"*.mlp.fc2": {"abits": 16}, "classifier": "keep_float", "nothing.*": {"wbits": 4}}))
    out = tmp_path / "cfg.intq"
    report = export(vit["model"], out, vit["calib"], config=str(config))
    assert any("'nothing.*' matches no layer" in w for w in report.warnings)
    m = refsim.load(out)
    producers = m.graph.producers()
    by_name = {n.name: n for n in m.graph.nodes}
    fc2 = by_name["vit.layers.0.mlp.fc2.acc"]
    # 16-bit inputs, 8-bit weights: 64 * 32767 * 127 still fits the 32-bit accumulator
    assert m.graph.tensors[fc2.inputs[0]].dtype.name == "int16" and fc2.attrs["acc_bits"] == 32
    assert m.graph.tensors[fc2.inputs[1]].dtype.name == "int8"
    head = by_name["classifier.acc"]
    assert m.graph.tensors[head.inputs[1]].dtype.name == "int16" and head.attrs["acc_bits"] == 64
    assert m.graph.tensors[head.inputs[0]].dtype.name == "int16"
    assert producers[head.inputs[0]].op == "Requant"
    assert m.metadata["export"]["layers"][0] == ["*.mlp.fc2", {"abits": 16}]


def test_calibration_methods_choose_different_scales(vit, tmp_path):
    scales = {}
    for method, extra in (("minmax", {}), ("mse", {}), ("percentile", {"percentile": (1.0, 99.0)})):
        out = tmp_path / f"{method}.intq"
        export(vit["model"], out, vit["calib"], calib_method=method, **extra)
        m = refsim.load(out)
        scales[method] = m.graph.tensors["pixel_values"].scale
        assert m.metadata["calibration"]["method"] == method
    assert scales["minmax"] > scales["mse"] and scales["minmax"] > scales["percentile"]
    with pytest.raises(ExportError, match="--percentile LOW HIGH"):
        export(vit["model"], tmp_path / "x.intq", vit["calib"], calib_method="percentile", percentile=(50, 10))


def test_calibration_fingerprint_is_stored(vit, tmp_path):
    out = tmp_path / "m.intq"
    export(vit["model"], out, vit["calib"])
    cal = refsim.load(out).metadata["calibration"]
    assert cal["samples"] == 32 and len(cal["digests"]) == 32 and len(set(cal["digests"])) == 32


def test_gelu_is_a_table_by_default_and_i_gelu_on_request(vit, tmp_path):
    out = tmp_path / "m.intq"
    for gelu, op in ((None, "LutInterp16"), ("ibert", "IBertGelu")):
        export(vit["model"], out, vit["calib"], **({} if gelu is None else {"gelu": gelu}))
        m = refsim.load(out)
        ops = {n.op for n in m.graph.nodes}
        assert op in ops and not ({"LutInterp16", "IBertGelu"} - {op}) & ops, ops
        assert m.metadata["export"]["gelu"] == (gelu or "table")
    with pytest.raises(ExportError, match="ibert-mode choice; mode ita runs ITAGelu"):
        export(vit["model"], out, vit["calib"], mode="ita", gelu="table")
    with pytest.raises(ExportError, match="unknown GELU 'erf'"):
        export(vit["model"], out, vit["calib"], gelu="erf")


def test_ita_refuses_per_channel_scales(vit, tmp_path):
    with pytest.raises(ExportError, match="one .*multiplier per layer"):
        export(vit["model"], tmp_path / "m.intq", vit["calib"], mode="ita", per_channel=True)


def _linear_onnx(path, weight: np.ndarray, bias: np.ndarray) -> str:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", weight.shape[0]])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", weight.shape[1]])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="/fc/MatMul"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="/fc/Add")]
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(bias.astype(np.float32), "b")]
    model = helper.make_model(helper.make_graph(nodes, "fc", [x], [y], inits), opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


def test_ita_bias_beyond_24_bits_names_the_layer(tmp_path):
    # Tiny weights and inputs make the accumulator scale tiny; a bias of 100 then needs ~2^30.
    model = _linear_onnx(tmp_path / "fc.onnx", np.full((4, 2), 1e-4), np.array([100.0, -100.0]))
    np.save(tmp_path / "calib.npy", np.full((4, 4), 1e-3, np.float32) * np.arange(1, 5, dtype=np.float32)[:, None])
    with pytest.raises(ExportError, match="fc: the quantized bias needs more than 24 bits"):
        export(model, tmp_path / "m.intq", tmp_path / "calib.npy", mode="ita")
    export(model, tmp_path / "m.intq", tmp_path / "calib.npy", mode="ibert")  # int32 biases hold it


def test_unsupported_op_stops_the_export_with_one_line(tmp_path, capsys):
    class Wavy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.sin(self.fc(x))

    path = tmp_path / "wavy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wavy().eval(), (torch.randn(2, 4),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}})
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    status = cli(["export", str(path), "-o", str(tmp_path / "w.intq"), "--calib", str(tmp_path / "calib.npy"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert "node '/Sin' (Sin): op Sin is not supported here" in err and "supported: MatMul/Gemm" in err
    assert not (tmp_path / "w.intq").exists()


def test_text_data_needs_a_tokenizer(tmp_path):
    model = h.bert(tmp_path / "bert.onnx", dynamo=False)
    lines = h.text_data(tmp_path / "calib.txt", 4, 0)
    with pytest.raises(ExportError, match="text data needs a tokenizer"):
        export(model, tmp_path / "m.intq", lines, max_length=h.SEQ)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli(["export", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.intq"), "--calib", "x.npy"]) == 2
    assert "none.onnx: no such file" in capsys.readouterr().err
    assert cli(["compare", str(tmp_path / "none.onnx"), str(tmp_path / "o.intq"), "x.npy"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_without_onnxruntime_the_reference_evaluator_runs_the_float_model(tmp_path, monkeypatch):
    from refsim.exporters import runtime

    rng = np.random.default_rng(0)
    model = _linear_onnx(tmp_path / "fc.onnx", rng.standard_normal((4, 3)), rng.standard_normal(3))
    np.save(tmp_path / "calib.npy", rng.standard_normal((16, 4)).astype(np.float32))
    with_ort = tmp_path / "ort.intq"
    export(model, with_ort, tmp_path / "calib.npy")
    monkeypatch.setattr(runtime, "_ort", None)
    without = tmp_path / "ref.intq"
    export(model, without, tmp_path / "calib.npy")
    a, b = refsim.load(with_ort), refsim.load(without)
    assert a.graph.tensors["x"].scale == pytest.approx(b.graph.tensors["x"].scale, rel=1e-6)
    report = compare(model, without, tmp_path / "calib.npy")
    assert report.outputs["y"]["integer vs float"]["cosine"] > 0.999
