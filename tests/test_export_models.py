"""Architecture tests: tiny random Hugging Face models through torch.onnx.export (the dynamo
and the TorchScript exporter), `refsim export`, and the integer engine, checked against the
float model with `refsim compare`."""

from __future__ import annotations

import collections
import json

import export_helpers as h
import numpy as np
import pytest
import refsim
from refsim.cli import main as cli
from refsim.exporters import compare, export

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def text(workdir):
    tok = workdir / "tokenizer.json"
    tok.write_text(h.tokenizer_json())
    return {"tokenizer": str(tok), "calib": h.text_data(workdir / "calib.txt", 48, 1),
            "eval": h.text_data(workdir / "eval.txt", 40, 2)}


@pytest.fixture(scope="module")
def images(workdir):
    return {"calib": h.image_data(workdir / "calib.npy", 48, 1), "eval": h.image_data(workdir / "eval.npy", 32, 2)}


_MODELS = {}


def onnx_model(workdir, kind: str, dynamo: bool) -> str:
    key = (kind, dynamo)
    if key not in _MODELS:
        _MODELS[key] = getattr(h, kind)(workdir / f"{kind}_{'dynamo' if dynamo else 'torchscript'}.onnx", dynamo)
    return _MODELS[key]


def ops(path) -> collections.Counter:
    return collections.Counter(n.op for n in refsim.load(path).graph.nodes)


def check_agreement(report, output="logits", cosine=0.99, top1=0.9):
    pairs = report.outputs[output]
    assert pairs["integer vs float"]["cosine"] >= cosine, pairs
    assert pairs["fake-quant vs float"]["cosine"] >= cosine, pairs
    assert pairs["integer vs fake-quant"]["cosine"] >= cosine, pairs
    if pairs["integer vs float"]["top1_agreement"] is not None:
        assert pairs["integer vs float"]["top1_agreement"] >= top1, pairs


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_bert(workdir, text, dynamo):
    model = onnx_model(workdir, "bert", dynamo)
    out = workdir / f"bert_{dynamo}.intq"
    export(model, out, text["calib"], tokenizer=text["tokenizer"], max_length=h.SEQ, per_channel=True)
    counts = ops(out)
    assert counts["IBertSoftmax"] == 2 and counts["IBertLayerNorm"] == 5 and counts["LutInterp16"] == 2  # GELU tables
    assert counts["Lut"] == 1  # the pooler's tanh
    check_agreement(compare(model, out, text["eval"]))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_fixed_shapes(workdir, text, dynamo, tmp_path):
    """A plain torch.onnx.export (no dynamic axes: batch 1, sequence 16) stays fixed: the
    integer model takes batches of one, `refsim run` feeds it sample by sample."""
    model = h.bert(tmp_path / "bert_fixed.onnx", dynamo, fixed=True)
    out = tmp_path / "bert_fixed.intq"
    export(model, out, text["calib"], tokenizer=text["tokenizer"])
    m = refsim.load(out)
    assert [list(t.shape) for t in m.inputs] == [[1, h.SEQ], [1, h.SEQ]]
    check_agreement(compare(model, out, text["eval"]))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_mobilebert(workdir, text, dynamo):
    model = onnx_model(workdir, "mobilebert", dynamo)
    out = workdir / f"mobilebert_{dynamo}.intq"
    export(model, out, text["calib"], tokenizer=text["tokenizer"], max_length=h.SEQ)
    counts = ops(out)
    assert counts["NoNorm"] > 0 and counts["Relu"] == 4 and counts["IBertSoftmax"] == 2
    check_agreement(compare(model, out, text["eval"]))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_vit(workdir, images, dynamo):
    model = onnx_model(workdir, "vit", dynamo)
    out = workdir / f"vit_{dynamo}.intq"
    export(model, out, images["calib"])
    m = refsim.load(out)
    assert m.inputs[0].dtype.name == "int8" and m.metadata["boundary"]["inputs"]["pixel_values"]["dtype"] == "int8"
    assert "Conv" not in ops(out)
    check_agreement(compare(model, out, images["eval"]), cosine=0.995, top1=0.8)


@pytest.mark.parametrize("mode", ["ita", "ita-partial"])
def test_ita_modes_text(workdir, text, mode):
    """A masked BERT attention in ITA arithmetic: ITAMax/ITAPartialMax with the mask, PyITA
    GELU, 26-bit accumulators and 8-bit requantization multipliers everywhere."""
    model = onnx_model(workdir, "bert", False)
    out = workdir / f"bert_{mode}.intq"
    export(model, out, text["calib"], tokenizer=text["tokenizer"], max_length=h.SEQ, mode=mode)
    m = refsim.load(out)
    softmax = "ITAPartialMax" if mode == "ita-partial" else "ITAMax"
    counts = ops(out)
    assert counts[softmax] == 2 and counts["ITAGelu"] == 2 and counts["iLayerNorm"] == 5
    for node in m.graph.nodes:
        if node.op == "MatMul":
            assert node.attrs["acc_bits"] == 26 and node.attrs["overflow"] == "saturate"
    # Every requantization after a matrix product is ITA's: uint8 multiplier, uint8 shift, int8 add.
    producers = m.graph.producers()
    for node in m.graph.nodes:
        if node.op == "Requant" and producers.get(node.inputs[0]) is not None and producers[node.inputs[0]].op == "MatMul":
            assert m.graph.tensors[node.inputs[1]].dtype.name == "uint8"
            assert node.attrs["rounding"] == "half_up" and node.attrs["dtype"] == "int8"
    check_agreement(compare(model, out, text["eval"]), cosine=0.98, top1=0.8)


def test_ita_attention_block(workdir, images):
    """Unmasked attention is emitted in ITA's attention-block graph form with its record."""
    from refsim.blocks.ita import attention_records, read_block

    model = onnx_model(workdir, "vit", False)
    out = workdir / "vit_ita.intq"
    export(model, out, images["calib"], mode="ita-partial")
    m = refsim.load(out)
    records = attention_records(m.graph)
    assert len(records) == 1 and records[0]["H"] == 4 and records[0]["P"] == 8
    block = read_block(m.graph, records[0])  # raises on any deviation from docs/ITA.md
    assert block.softmax["op"] == "ITAPartialMax"
    check_agreement(compare(model, out, images["eval"], max_samples=8), cosine=0.98, top1=0.7)


def test_refsim_run_on_text_prints_labels(workdir, text, tmp_path, capsys):
    model = onnx_model(workdir, "bert", False)
    labels = tmp_path / "labels.txt"
    labels.write_text("north\nsouth\neast\n")
    out = tmp_path / "bert.intq"
    assert cli(["export", model, "-o", str(out), "--calib", text["calib"], "--tokenizer", text["tokenizer"],
                "--max-length", str(h.SEQ), "--labels", str(labels), "--quiet"]) == 0
    lines = tmp_path / "lines.txt"
    lines.write_text("the cat sleeps in the garden\na red car runs on the old road\n")
    capsys.readouterr()
    assert cli(["run", str(out), str(lines)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-> ") == 2 and "the cat sleeps in the garden" in printed
    assert any(label in printed for label in ("north", "south", "east"))


def test_refsim_run_quantizes_float_images(workdir, images, tmp_path, capsys):
    from refsim.boundary import quantize_feeds

    model = onnx_model(workdir, "vit", False)
    out = tmp_path / "vit.intq"
    export(model, out, images["calib"])
    m = refsim.load(out)
    x = np.load(images["eval"])[:3]
    np.save(tmp_path / "three.npy", x)
    capsys.readouterr()
    assert cli(["run", str(out), str(tmp_path / "three.npy"), "--json"]) == 0
    spec = m.metadata["boundary"]["inputs"]["pixel_values"]
    q = quantize_feeds(m, {"pixel_values": x})["pixel_values"]
    expected = np.clip(np.rint(x.astype(np.float32) / np.float32(spec["scale"])), -128, 127)
    assert np.array_equal(q, expected) and q.dtype == np.int8
    samples = json.loads(capsys.readouterr().out)["samples"]  # one per image (axis 0)
    printed = [row for s in samples for row in s["outputs"]["logits"]["values"]]
    assert len(samples) == 3 and np.array_equal(m.run({"pixel_values": q})["logits"], np.array(printed))


def test_compare_cli_json_and_leak_warning(workdir, text, tmp_path, capsys):
    model = onnx_model(workdir, "bert", False)
    out = tmp_path / "bert.intq"
    export(model, out, text["calib"], tokenizer=text["tokenizer"], max_length=h.SEQ)
    capsys.readouterr()
    assert cli(["compare", model, str(out), text["calib"], "--json", "--quiet", "--max-samples", "12"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["samples"] == 12
    assert any("also used for calibration" in w for w in doc["warnings"])
    assert {"fake-quant vs float", "integer vs float", "integer vs fake-quant"} == set(doc["outputs"]["logits"])
    assert doc["sqnr"] and all({"layer", "tensor", "bits", "sqnr_db"} <= set(r) for r in doc["sqnr"])
    report = compare(model, out, text["eval"], max_samples=12)
    assert not report.warnings
    assert "<- lowest" in report.text()


def test_compare_task_metrics(workdir, text, tmp_path):
    model = onnx_model(workdir, "bert", False)
    out = tmp_path / "bert.intq"
    labels = tmp_path / "names.txt"
    labels.write_text("a\nb\nc\n")
    export(model, out, text["calib"], tokenizer=text["tokenizer"], max_length=h.SEQ, labels=str(labels))
    report = compare(model, out, text["eval"], labels=["a", "b", "c", "0", "1"] * 8)
    for kind in ("float", "fake-quant", "integer"):
        assert set(report.task[kind]) == {"accuracy", "precision", "recall", "f1", "mcc"}
        assert 0 <= report.task[kind]["accuracy"] <= 1
