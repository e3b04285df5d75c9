"""`refsim sensitivity` and `refsim export --bits-from`: which layers are measured and on
what, sensitivities checked against an independent onnxruntime run of the original ONNX
file, the allocations against brute force, and the budget against the written file."""

from __future__ import annotations

import itertools
import json
import math
import struct

import export_helpers as h
import numpy as np
import onnx
import pytest
import refsim
from refsim.cli import main as cli
from refsim.exporters import allocation as alloc
from refsim.exporters import sensitivity as sens
from refsim.exporters.calibrate import quantize_weight
from refsim.exporters.dyadic import ExportError
from refsim.exporters.pipeline import prepare

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("mixed")
    tok = d / "tokenizer.json"
    tok.write_text(h.tokenizer_json())
    return {"model": h.bert(d / "bert.onnx", dynamo=False), "tokenizer": str(tok), "dir": d,
            "calib": h.text_data(d / "calib.txt", 32, 1), "eval": h.text_data(d / "eval.txt", 24, 2)}


@pytest.fixture(scope="module")
def bert_sqnr(bert):
    doc = sens.measure(bert["model"], bert["calib"], method="sqnr", tokenizer=bert["tokenizer"], max_length=16,
                       per_channel=True)
    path = bert["dir"] / "sqnr.json"
    sens.save(doc, path)
    return doc, path


def test_layers_are_the_list_layers_names_with_weights_and_compared_after_a_nonlinearity(bert):
    _, g, *_ = prepare(bert["model"], bert["calib"], bert["tokenizer"], 16)
    layers = {q.name: q for q in sens.quantizable_layers(g)}
    listed = {n.scope for n in g.nodes if n.scope}
    assert set(layers) <= listed
    assert "bert.embeddings.word_embeddings" in layers and layers["bert.embeddings.word_embeddings"].kind == "embedding"
    assert "classifier" in layers and "bert.encoder.layer.1.output.dense" in layers
    producer = g.producers()
    kinds = {name: producer[q.compared].op if q.compared in producer else "output" for name, q in layers.items()}
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "Softmax"
    assert kinds["bert.encoder.layer.0.attention.self.value"] == "LayerNormalization"
    assert kinds["bert.encoder.layer.0.intermediate.dense"] == "Gelu"
    assert kinds["bert.encoder.layer.0.output.dense"] == "LayerNormalization"
    assert layers["classifier"].compared in g.outputs
    for q in layers.values():
        assert q.params == sum(int(g.const(w).size) for w in q.weights)


def test_sqnr_sensitivity_equals_an_independent_run_of_the_original_model(bert, bert_sqnr):
    """Replace one layer's weight in the original ONNX file by its fake-quant value and run
    it with onnxruntime: the output SQNR must be the one recorded."""
    import onnxruntime as ort

    doc, _ = bert_sqnr
    proto = onnx.load(bert["model"])
    _, g, dataset, *_ = prepare(bert["model"], bert["calib"], bert["tokenizer"], 16)
    feeds = {k: v.astype(np.int64) for k, v in dataset.arrays.items()}

    def run(model):
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    reference = run(proto)
    layers = {q.name: q for q in sens.quantizable_layers(g)}
    for name in ("bert.encoder.layer.0.intermediate.dense", "classifier"):
        weight = g.const(layers[name].weights[0])
        for bits in ("2", "8"):
            variant = onnx.ModelProto()
            variant.CopyFrom(proto)
            replaced = 0
            for init in variant.graph.initializer:
                a = onnx.numpy_helper.to_array(init)
                for candidate in (a, a.T):
                    if candidate.shape == weight.shape and np.array_equal(candidate, weight):
                        q = quantize_weight(weight.astype(np.float64), bits, True).dequantized()
                        init.CopyFrom(onnx.numpy_helper.from_array(q if candidate is a else q.T.copy(), init.name))
                        replaced += 1
                        break
            assert replaced == 1
            out = run(variant)
            db = 10 * math.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((out - reference).astype(np.float64) ** 2))
            entry = next(e for e in doc["layers"] if e["name"] == name)
            assert entry["output_sqnr_db"][bits] == pytest.approx(db, abs=0.05)
            assert entry["sensitivity"][bits] == pytest.approx(10 ** (-entry["output_sqnr_db"][bits] / 10))


def test_sensitivity_json_records_the_calibration_fingerprint(bert, bert_sqnr):
    doc, path = bert_sqnr
    _, _, dataset, *_ = prepare(bert["model"], bert["calib"], bert["tokenizer"], 16)
    assert doc["calibration"]["data"] == "calibration" and doc["calibration"]["digests"] == dataset.digests
    assert doc["bits"] == ["2", "4", "8", "16"] and sens.load(path)["format"] == "refsim.sensitivity"
    for e in doc["layers"]:
        db = [e["output_sqnr_db"][b] for b in doc["bits"]]
        assert db == sorted(db) and db[-1] > 60  # more bits, less noise; 16 bits nearly lossless


def test_pwcca_and_svcca_sensitivities_shrink_with_more_bits(bert):
    for method, topk in (("pwcca", None), ("svcca", 8)):
        doc = sens.measure(bert["model"], bert["calib"], method=method, topk=topk, bits=("2", "8"), tokenizer=bert["tokenizer"],
                           max_length=16, layers=["bert.encoder.layer.0.intermediate.dense", "classifier"])
        for e in doc["layers"]:
            assert 0 <= e["sensitivity"]["8"] < e["sensitivity"]["2"] <= 1
            assert e["similarity"]["8"] == pytest.approx(1 - e["sensitivity"]["8"])


# --- allocation ---------------------------------------------------------------------------------


def synthetic(n=7, seed=0):
    rng = np.random.default_rng(seed)
    base = 10.0 ** rng.uniform(-6, -1, n)
    layers = [{"name": f"l{i}", "params": int(rng.integers(100, 2000)),
               "sensitivity": {b: float(base[i] * 4.0 ** (4 - math.log2(int(b)) * 2)) for b in ("2", "4", "8", "16")}}
              for i in range(n)]
    return {"format": "refsim.sensitivity", "bits": ["2", "4", "8", "16"], "layers": layers}


def cost(doc, chosen, fixed=0):
    return fixed + sum(e["params"] * int(chosen[e["name"]]) / 8 for e in doc["layers"])


def damage(doc, chosen):
    return sum(e["sensitivity"][chosen[e["name"]]] for e in doc["layers"])


@pytest.mark.parametrize("seed", range(4))
def test_percentile_allocation_is_the_best_monotone_one_under_the_budget(seed):
    doc = synthetic(seed=seed)
    choices = ["2", "4", "8", "16"]
    budget = cost(doc, {e["name"]: "4" for e in doc["layers"]}, fixed=500) * 1.1
    chosen = alloc.allocate(doc, "percentile", choices, budget, fixed=500)
    assert cost(doc, chosen, 500) <= budget
    score = {e["name"]: math.log10(e["sensitivity"]["4"]) - math.log10(e["params"]) for e in doc["layers"]}
    ranked = sorted(score, key=lambda n: -score[n])
    assert all(int(chosen[a]) >= int(chosen[b]) for a, b in zip(ranked, ranked[1:]))
    best = math.inf
    for combo in itertools.product(choices, repeat=len(ranked)):
        option = dict(zip(ranked, combo))
        if all(int(x) >= int(y) for x, y in zip(combo, combo[1:])) and cost(doc, option, 500) <= budget:
            best = min(best, damage(doc, option))
    assert damage(doc, chosen) == pytest.approx(best)


def test_kmeans_allocation_keeps_clusters_together_and_ranks_them():
    doc = synthetic(n=9, seed=5)
    for e, level in zip(doc["layers"], [1e-1, 1.2e-1, 1e-3, 1.1e-3, 1e-5, 1.2e-5, 1e-7, 1.1e-7, 0.9e-7]):
        e["params"] = 1000
        e["sensitivity"] = {b: level * 4.0 ** (-math.log2(int(b)) * 2) for b in ("2", "4", "8", "16")}
    chosen = alloc.allocate(doc, "kmeans", ["2", "4", "8", "16"])
    assert [chosen[f"l{i}"] for i in range(9)] == ["16", "16", "8", "8", "4", "4", "2", "2", "2"]
    quartiles = alloc.allocate(doc, "percentile", ["2", "4", "8", "16"])
    assert sorted(quartiles.values(), key=int).count("2") == 2  # 9 layers in four equal shares: 3, 2, 2, 2
    budget = cost(doc, chosen) * 0.8
    squeezed = alloc.allocate(doc, "kmeans", ["2", "4", "8", "16"], budget)
    assert cost(doc, squeezed) <= budget
    pairs = [("l0", "l1"), ("l2", "l3"), ("l4", "l5"), ("l6", "l7")]
    assert all(squeezed[a] == squeezed[b] for a, b in pairs)


def test_allocation_errors():
    doc = synthetic()
    with pytest.raises(ExportError, match="below the smallest allocation"):
        alloc.allocate(doc, "kmeans", ["2", "4"], budget=10)
    with pytest.raises(ExportError, match="no values at 3 bits|weight bits"):
        alloc.allocate(doc, "kmeans", ["3"], budget=None)
    with pytest.raises(ExportError, match="unknown allocation"):
        alloc.allocate(doc, "greedy", ["2"])


def intq_header(path):
    data = open(path, "rb").read()
    _, _, _, header_len, _, _, _ = struct.unpack_from("<8sIIQQQI20x", data, 0)
    return json.loads(data[64:64 + header_len])


def test_model_bytes_are_the_packed_constants_and_scales_of_the_file():
    path = h.__file__.replace("tests/export_helpers.py", "examples/tiny_mlp.intq")
    header = intq_header(path)
    want = 0
    for t in header["graph"]["tensors"]:
        if "data" in t:
            want += t["data"]["nbytes"]
            scale = t.get("scale")
            want += scale["nbytes"] if isinstance(scale, dict) else 8 * len(scale) if isinstance(scale, list) else 8 * (scale is not None)
    assert alloc.model_bytes(refsim.load(path).graph) == want


def test_export_bits_from_writes_layers_json_embeds_it_and_measures_the_file(bert, bert_sqnr, tmp_path, capsys):
    _, sqnr_path = bert_sqnr
    out = tmp_path / "mixed.intq"
    float_bytes = alloc.float32_bytes(onnx.load(bert["model"]))
    budget_mb = float_bytes / 2.5 / 1e6  # the tiny model is mostly biases, tables and scales
    code = cli(["export", bert["model"], "-o", str(out), "--calib", bert["calib"], "--tokenizer", bert["tokenizer"],
                "--max-length", "16", "--per-channel", "--bits-from", str(sqnr_path), "--size", f"{budget_mb:.6f}",
                "--allocation", "percentile", "--quiet"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    layers_doc = json.loads((tmp_path / "mixed.layers.json").read_text())
    m = refsim.load(out)
    meta = m.metadata["bit_allocation"]
    assert meta["layers_json"] == layers_doc and meta["method"] == "percentile"
    assert meta["sensitivity"]["calibration"]["digests"] == bert_sqnr[0]["calibration"]["digests"]
    size = alloc.model_bytes(m.graph)
    assert size <= budget_mb * 1e6
    assert f"compression {float_bytes / size:.2f}x" in printed and f"{size / 1e6:.3f} MB" in printed
    # every layer's weights have the chosen type; 16-bit ones get accumulators that hold them
    chosen = meta["chosen"]
    assert set(chosen.values()) - {"2", "4", "8", "16"} == set()
    producers = {n.outputs[0]: n for n in m.graph.nodes}
    consumers = {i: n for n in m.graph.nodes for i in n.inputs}
    for name, bits in chosen.items():
        weight = m.graph.tensors.get(f"{name}.weight") or m.graph.tensors.get(f"{name}.table")
        assert weight is not None and weight.dtype.name == f"int{bits}", name
        node = consumers[weight.name]
        if node.op == "MatMul":
            x = m.graph.tensors[node.inputs[0]].dtype
            k = weight.shape[0]
            assert k * max(-x.lo, x.hi) * max(-weight.dtype.lo, weight.dtype.hi) < 2 ** (node.attrs["acc_bits"] - 1)
    assert producers  # the graph runs: compare it
    report = refsim.exporters.compare(bert["model"], out, bert["eval"])
    assert not report.warnings and report.outputs["logits"]["integer vs fake-quant"]["cosine"] > 0.99


def test_compare_warns_when_evaluating_on_the_sensitivity_data(bert, bert_sqnr, tmp_path):
    out = tmp_path / "m.intq"
    alloc.export_mixed(bert["model"], out, bert["eval"], bert_sqnr[1], tokenizer=bert["tokenizer"], max_length=16,
                       per_channel=True)
    report = refsim.exporters.compare(bert["model"], out, bert["calib"])
    assert any("also used for calibration" in w for w in report.warnings)


def test_bits_from_mistakes_are_one_line(bert, bert_sqnr, tmp_path, capsys):
    other = tmp_path / "other.json"
    doc = json.loads(bert_sqnr[1].read_text())
    doc["layers"][0]["name"] = "no.such.layer"
    other.write_text(json.dumps(doc))
    base = ["export", bert["model"], "-o", str(tmp_path / "x.intq"), "--calib", bert["calib"], "--tokenizer", bert["tokenizer"],
            "--max-length", "16", "--quiet"]
    cases = [(["--compression", "4"], "budgets for --bits-from"),
             (["--bits-from", str(other)], "'no.such.layer' is not a quantizable layer"),
             (["--bits-from", str(tmp_path / "absent.json")], "no such file"),
             (["--bits-from", str(bert_sqnr[1]), "--size", "0.00001"], "below the smallest allocation"),
             (["--bits-from", str(bert_sqnr[1]), "--bit-choices", "4,ternary"], "no values at ternary bits")]
    for extra, message in cases:
        code = cli(base + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (extra, err)
        assert not (tmp_path / "x.intq").exists() and not (tmp_path / "x.layers.json").exists()
    code = cli(["sensitivity", bert["model"], "--calib", bert["calib"], "-o", str(tmp_path / "s.json"), "--method", "pwcca",
                "--topk", "3"])
    assert code == 2 and "--topk K" in capsys.readouterr().err
