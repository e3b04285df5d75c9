"""The fake-quant model computes the integer model's nonlinearities exactly (exporters/mirror):
the exporter records which integer op computes each float softmax, GELU, LayerNorm and table
(`fake_quant.nonlinear`), and `fakequant.fake_quant_graph` puts the op's mirror in its place;
`nonlinear="float"` (`refsim compare --float-nonlinear`) and records without it keep them float."""

from __future__ import annotations

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
def bert_ibert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fq_mirror")
    tok = folder / "tokenizer.json"
    tok.write_text(h.tokenizer_json())
    calib = h.text_data(folder / "calib.txt", 32, 1)
    evaluation = h.text_data(folder / "eval.txt", 16, 2)
    model = h.bert(folder / "bert.onnx", dynamo=False)
    intq = folder / "bert.intq"
    export(model, intq, calib, tokenizer=str(tok), max_length=h.SEQ, mode="ibert")
    return dict(model=model, intq=intq, eval=evaluation)


def _graphs(case):
    from refsim.exporters.frontend.graph import load
    from refsim.exporters.frontend.passes import canonicalize

    m = refsim.load(case["intq"])
    meta = m.metadata
    g = canonicalize(load(case["model"]), {k: list(v) for k, v in meta["source_model"]["input_shapes"].items()})
    tensors = m.graph.tensors
    consts = {n: t.data for n, t in tensors.items() if t.is_const}
    scales = {n: t.scale for n, t in tensors.items() if t.is_const}
    return m, g, consts, scales


def test_the_record_names_each_nonlinearity_and_its_integer_op(bert_ibert):
    m, g, _, _ = _graphs(bert_ibert)
    record = dict(m.metadata["fake_quant"]["nonlinear"])
    float_ops = {n.name: n.op for n in g.nodes}
    by_kind = {(float_ops[name], spec["op"]) for name, spec in record.items()}
    assert by_kind == {("Softmax", "IBertSoftmax"), ("LayerNormalization", "IBertLayerNorm"), ("Gelu", "LutInterp16"),
                       ("Tanh", "Lut")}
    assert sum(op == "Softmax" for op in float_ops.values()) == sum(spec["op"] == "IBertSoftmax" for spec in record.values())
    integer_ops = {n.outputs[0]: n.op for n in m.graph.nodes}
    assert all(integer_ops[spec["node"]] == spec["op"] for spec in record.values())
    softmax = [spec for spec in record.values() if spec["op"] == "IBertSoftmax"]
    assert all(spec["mask"] and spec["mask"][0] == "attention_mask" for spec in softmax)
    assert any(spec["input_mul"] > 1 for spec in record.values() if spec["op"] == "IBertLayerNorm")  # the upshift


def test_mirrors_replace_the_float_nodes_and_float_keeps_them(bert_ibert):
    from refsim.exporters.fakequant import fake_quant_graph

    m, g, consts, scales = _graphs(bert_ibert)
    record = m.metadata["fake_quant"]
    ops = lambda fg: {n.op for n in fg.nodes}  # noqa: E731
    mirrored = fake_quant_graph(g, record, consts, scales)
    assert not ops(mirrored) & {"Softmax", "LayerNormalization", "Gelu", "Tanh"}
    for old in (fake_quant_graph(g, record, consts, scales, nonlinear="float"),
                fake_quant_graph(g, {k: v for k, v in record.items() if k != "nonlinear"}, consts, scales)):
        assert {"Softmax", "LayerNormalization", "Gelu", "Tanh"} <= ops(old)


def _first_softmax(case, nonlinear):
    """The first softmax's integer outputs (kept keys only) in the integer model and in the
    fake-quant model (its float output / 2^-15)."""
    from refsim.boundary import quantize_feeds
    from refsim.exporters.data import load_dataset
    from refsim.exporters.fakequant import fake_quant_model
    from refsim.exporters.pipeline import onnx_feed_dtypes
    from refsim.exporters.runtime import FloatRunner
    from refsim.text import encoder_for

    m, g, consts, scales = _graphs(case)
    meta = m.metadata
    point = next(n.outputs[0] for n in m.order if n.op == "IBertSoftmax")
    float_tensor = meta["float_tensors"][point]
    scale = float(m.graph.tensors[point].scale)
    fq = FloatRunner(fake_quant_model(g, meta["fake_quant"], consts, scales, nonlinear), expose=[float_tensor])
    encoder, mapping = encoder_for(m)
    data = load_dataset(str(case["eval"]), list(m.graph.inputs), encoder, mapping)
    ints, fqs = [], []
    dtypes = onnx_feed_dtypes(g)
    for i in range(len(data)):
        feeds = {k: np.asarray(v[i:i + 1]).astype(dtypes[k]) for k, v in data.arrays.items()}
        int_feeds = {k: v.astype(m.graph.tensors[k].dtype.storage) for k, v in feeds.items()}
        seen = {}
        m.run(quantize_feeds(m, int_feeds), trace=lambda node, n, a: seen.__setitem__(n, np.asarray(a)))
        keep = np.broadcast_to(feeds["attention_mask"].reshape(1, 1, 1, -1) != 0, seen[point].shape)
        ints.append(seen[point][keep])
        fqs.append((np.asarray(fq.run(feeds)[float_tensor], np.float64) / scale)[keep])
    return np.concatenate(ints).astype(np.int64), np.concatenate(fqs)


def test_the_first_softmax_is_the_integer_ones(bert_ibert):
    """Its scores come from the embedding LayerNorm and the Q, K projections: with the mirrors
    the fake-quant model's probabilities are the integer model's (float32 ties apart); with
    float nonlinearities most of them are a step or more off."""
    ints, fqs = _first_softmax(bert_ibert, "integer")
    assert np.all(fqs == np.rint(fqs))
    assert np.mean(fqs != ints) < 2e-3
    ints, fqs = _first_softmax(bert_ibert, "float")
    assert np.mean(np.rint(fqs) != ints) > 0.2


def test_compare_reports_both_fake_quant_models(bert_ibert, capsys):
    case = bert_ibert
    report = compare(case["model"], case["intq"], case["eval"])
    mirrored = report.outputs["logits"]["integer vs fake-quant"]
    recorded = report.fake_quant["recorded"]
    assert report.fake_quant == {"nonlinear": "integer", "mirrored": recorded, "recorded": recorded} and recorded > 0
    assert f"{recorded} of {recorded} nonlinearities computed as the integer model does" in report.text()
    capsys.readouterr()
    assert cli(["compare", case["model"], str(case["intq"]), case["eval"], "--json", "--quiet", "--float-nonlinear"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fake_quant"]["nonlinear"] == "float"
    old = doc["outputs"]["logits"]["integer vs fake-quant"]
    assert mirrored["cosine"] >= 0.9999 and mirrored["cosine"] > old["cosine"], (mirrored, old)


def test_ita_blocks_record_their_softmax_and_gelu(tmp_path):
    """ITA's attention and feed-forward blocks record the softmax and GELU inside them (for
    the ITA mirrors, exporters/mirror/ita.py); a float node whose op has no mirror stays float."""
    from pathlib import Path

    from refsim.exporters.fakequant import fake_quant_graph
    from refsim.exporters.frontend.graph import load
    from refsim.exporters.frontend.passes import canonicalize
    from refsim.exporters.mirror import builder

    example = Path(__file__).resolve().parents[1] / "examples" / "ita"
    intq = tmp_path / "vit_ita.intq"
    export(example / "vit_ita.onnx", intq, example / "calib.npy", mode="ita")
    m = refsim.load(intq)
    meta = m.metadata
    assert meta.get("attention_blocks") and meta.get("feedforward_blocks")
    record = dict(meta["fake_quant"]["nonlinear"])
    assert {spec["op"] for spec in record.values()} == {"ITAMax", "ITAGelu", "iLayerNorm"}
    g = canonicalize(load(example / "vit_ita.onnx"), {k: list(v) for k, v in meta["source_model"]["input_shapes"].items()})
    float_ops = {n.name: n.op for n in g.nodes}
    assert sum(op == "Softmax" for op in float_ops.values()) == sum(spec["op"] == "ITAMax" for spec in record.values())
    tensors = m.graph.tensors
    fg = fake_quant_graph(g, meta["fake_quant"], {n: t.data for n, t in tensors.items() if t.is_const},
                          {n: t.scale for n, t in tensors.items() if t.is_const})
    left = {n.name for n in fg.nodes}
    for name, spec in record.items():
        assert (name in left) == (builder(spec["op"]) is None), (name, spec["op"])
