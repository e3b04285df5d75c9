"""`refsim export --mode ita` on a float encoder: the feed-forward layers come out in ITA's
feed-forward-block form (docs/ITA.md), and `refsim golden --targets ita` writes the file set
of ITA's testbench for every encoder layer.

The model is examples/ita/vit_ita.onnx (a random-init Hugging Face ViT written by
examples/ita/make_model.py: S = 64, E = 64, one head, F = 128, two layers, the shapes of the
PyITA fixture tests/data/pyita_S64_E64_P64_F128.tar.xz).
"""

import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import refsim
from refsim.blocks.ita import feedforward_records, read_feedforward_block
from refsim.boundary import quantize_feeds
from refsim.cli import main as cli

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ita"
FIXTURE = ROOT / "tests" / "data" / "pyita_S64_E64_P64_F128.tar.xz"
LAYERS = ("vit.layers.0", "vit.layers.1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ita_ffn")
    intq = root / "vit_ita.intq"
    assert cli(["export", str(EXAMPLE / "vit_ita.onnx"), "-o", str(intq), "--calib", str(EXAMPLE / "calib.npy"),
                "--mode", "ita", "--quiet"]) == 0
    assert cli(["golden", str(intq), str(EXAMPLE / "images.npy"), "-o", str(root / "vectors"), "--targets", "ita",
                "--samples", "1"]) == 0
    return root, refsim.load(intq)


def blocks(model):
    return [read_feedforward_block(model.graph, r) for r in feedforward_records(model.graph)]


def test_every_encoder_layer_has_an_ita_feedforward_block_after_its_attention(exported):
    _, model = exported
    found = blocks(model)  # read_feedforward_block raises on any deviation from docs/ITA.md
    assert [b.name for b in found] == [f"{layer}.mlp" for layer in LAYERS]
    assert [b.attention for b in found] == [f"{layer}.attention" for layer in LAYERS]
    for b in found:
        assert (b.E, b.F, b.activation) == (64, 128, "gelu")
    ops = [n.op for n in model.graph.nodes]
    assert ops.count("ITAGelu") == 2 and ops.count("Gelu") == 0


def _gelu_rtl(x, q_1, q_b, q_c):
    """ita_gelu.sv's polynomial: PyITA's without the clip of the input to -127."""
    q = x.astype(np.int64)
    erf = np.sign(q) * ((np.minimum(np.abs(q), -q_b) + q_b) ** 2 + q_c)
    return q * (erf + q_1)


def test_gelu_constants_are_ones_the_rtl_computes_as_pyita_does(exported):
    """PyITA's constants from the GELU input scale; at the scales the exporter picks
    (q_b >= -127), PyITA's input clip changes nothing, so ITA's RTL gives the same values."""
    from refsim.exporters.nonlinear import pyita_gelu_params

    _, model = exported
    x = np.arange(-128, 128, dtype=np.int8)
    for b in blocks(model):
        g = b.gelu
        assert g.q_1 == g.q_c and -127 <= g.q_b < 0
        s_in = model.graph.tensors[b.steps["F1"]["out"]].scale
        s_out = model.graph.tensors[b.act_out].scale
        attrs = pyita_gelu_params(s_in, s_out).attrs
        assert (attrs["q_b"], attrs["q_c"], attrs["eps_mul"], attrs["eps_shift"]) == (g.q_b, g.q_c, b.act_requant.mul, b.act_requant.shift)
        ours = refsim.ops.ITAGelu(x, q_1=g.q_1, q_b=g.q_b, q_c=g.q_c)
        assert np.array_equal(np.asarray(ours, np.int64), _gelu_rtl(x, g.q_1, g.q_b, g.q_c))


def _fake_quant(v, scale):
    return np.clip(np.rint(v / scale), -128, 127) * scale


def _erf_gelu(v):
    return 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_integer_blocks_agree_with_their_fake_quant_model(exported):
    """Each block's int8 output against the same block in float with the exported weights and
    scales, quantized where ITA quantizes (FF1, GELU, FF2 outputs), on the block's own input."""
    _, model = exported
    t = model.graph.tensors
    found = blocks(model)
    seen = {}
    images = np.load(EXAMPLE / "calib.npy")
    for i in range(4):
        feeds = quantize_feeds(model, {"pixel_values": images[i:i + 1]})
        model.run(feeds, trace=lambda node, name, a: seen.__setitem__(name, np.asarray(a)))
        for b in found:
            f1, f2 = b.steps["F1"], b.steps["F2"]
            # FF2's weights and output carry one scale per column (the exporter's channel scales)
            s_x, s_f1, s_act, s_f2 = (np.asarray(t[n].scale) for n in (b.x, f1["out"], b.act_out, f2["out"]))
            w1, w2 = (t[s["weight"]].data * np.asarray(t[s["weight"]].scale) for s in (f1, f2))
            acc1, acc2 = s_x * np.asarray(t[f1["weight"]].scale), s_act * np.asarray(t[f2["weight"]].scale)
            h = _fake_quant(seen[b.x] * s_x @ w1 + t[f1["bias"]].data * acc1, s_f1)
            g = _fake_quant(_erf_gelu(h), s_act)
            y = _fake_quant(g @ w2 + t[f2["bias"]].data * acc2, s_f2)
            cos = _cosine(seen[f2["out"]] * s_f2, y)
            assert cos >= 0.999, (b.name, i, cos)


def test_block_form_computes_what_the_layer_by_layer_ita_path_computes(exported, tmp_path, monkeypatch):
    """Without the block form (the layers one by one, as before it), the integer model is the
    same, bit for bit: the block only gives ITA's layer its shape and record."""
    import refsim.exporters.quantize as quantize
    from refsim.exporters import export

    _, model = exported
    monkeypatch.setattr(quantize, "match_feedforward", lambda g: [])
    export(EXAMPLE / "vit_ita.onnx", tmp_path / "layers.intq", EXAMPLE / "calib.npy", mode="ita")
    layers = refsim.load(tmp_path / "layers.intq")
    assert not feedforward_records(layers.graph)
    for image in np.load(EXAMPLE / "images.npy"):
        feeds = quantize_feeds(model, {"pixel_values": image[None]})
        assert np.array_equal(model.run(feeds)["logits"], layers.run(feeds)["logits"])


def test_whole_model_against_float_and_fake_quant(exported):
    from refsim.exporters import compare

    root, _ = exported
    report = compare(EXAMPLE / "vit_ita.onnx", root / "vit_ita.intq", EXAMPLE / "images.npy")
    pairs = report.outputs["logits"]
    # ITA's softmax, GELU and iLayerNorm approximate; the feed-forward points are in the SQNR table.
    assert pairs["integer vs fake-quant"]["cosine"] >= 0.99 and pairs["integer vs float"]["cosine"] >= 0.99, pairs
    rows = {r["tensor"] for r in report.sqnr}
    assert {f"{layer}.mlp.F1" for layer in LAYERS} <= rows and {f"{layer}.mlp.act" for layer in LAYERS} <= rows


@pytest.fixture(scope="module")
def pyita_gelu(tmp_path_factory):
    root = tmp_path_factory.mktemp("pyita")
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(root, filter="data")
    return root / "data_S64_E64_P64_F128_H1_B1_gelu"


def _words(path: Path) -> list[str]:
    return path.read_text().split()


@pytest.mark.parametrize("layer", LAYERS)
def test_golden_folder_is_the_testbench_file_set_pyita_writes(exported, pyita_gelu, layer):
    """Per encoder layer, one testbench folder with exactly PyITA's files (ITA main's
    ita_tb.sv reads them), each as long as PyITA's for the same S, E, P, F; the feed-forward
    files hold the block's parameters and results."""
    root, model = exported
    ours = root / "vectors" / "sample0000" / "ita" / f"{layer}.attention"
    names = sorted(str(f.relative_to(pyita_gelu)) for f in pyita_gelu.rglob("*.txt"))
    assert sorted(str(f.relative_to(ours)) for f in ours.rglob("*.txt")) == names and len(names) == 54
    for name in names:
        a, b = (ours / name).read_text(), (pyita_gelu / name).read_text()
        assert (len(a.split()), a.count("\n")) == (len(b.split()), b.count("\n")), name
    block = next(b for b in blocks(model) if b.name == f"{layer}.mlp")
    rq = [block.steps[s]["requant"] for s in ("F1", "F2")]
    assert _words(ours / "RQS_FFN_MUL.txt") == [str(r.mul) for r in rq]
    assert _words(ours / "RQS_FFN_SHIFT.txt") == [str(r.shift) for r in rq]
    assert _words(ours / "GELU_B.txt") == [str(block.gelu.q_b)] and _words(ours / "GELU_C.txt") == [str(block.gelu.q_c)]
    assert _words(ours / "activation_requant_mult.txt") == [str(block.act_requant.mul)]
    # The FF2 output file holds the integer model's block output (in ITA's tile order).
    out = np.load(root / "vectors" / "sample0000" / f"{block.steps['F2']['out']}.npy")
    written = np.array(_words(ours / "standalone" / "FF2p_0.txt"), int)
    assert written.size == out.size and np.array_equal(np.sort(written), np.sort(out.ravel()))


def _mlp_onnx(path, activation):
    """x [1, 64, 64] -> Linear(64, 128) -> activation -> Linear(128, 64), as torch exports it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    consts = {"w1": rng.standard_normal((64, 128)) / 8, "b1": rng.standard_normal(128) / 10,
              "w2": rng.standard_normal((128, 64)) / 11, "b2": rng.standard_normal(64) / 10}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1.MatMul"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1.Add"),
             helper.make_node(activation, ["h1"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y0"], name="fc2.MatMul"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2.Add")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 64])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


@pytest.mark.parametrize("activation", ["Relu", "Gelu"])
def test_a_bare_feedforward_layer_gets_a_folder_of_its_own(tmp_path, activation):
    """Linear -> ReLU/GELU -> Linear without attention: an unpaired block, its own testbench
    folder with the feed-forward files, and the integer output close to the float one."""
    from refsim.exporters import compare

    _mlp_onnx(tmp_path / "mlp.onnx", activation)
    np.save(tmp_path / "calib.npy", np.random.default_rng(4).standard_normal((8, 64, 64)).astype(np.float32))
    assert cli(["export", str(tmp_path / "mlp.onnx"), "-o", str(tmp_path / "mlp.intq"), "--calib",
                str(tmp_path / "calib.npy"), "--mode", "ita", "--quiet"]) == 0
    model = refsim.load(tmp_path / "mlp.intq")
    (block,) = blocks(model)
    assert block.activation == activation.lower() and block.attention is None and (block.E, block.F) == (64, 128)
    assert cli(["golden", str(tmp_path / "mlp.intq"), str(tmp_path / "calib.npy"), "-o", str(tmp_path / "v"),
                "--targets", "ita", "--samples", "1"]) == 0
    folder = tmp_path / "v" / "sample0000" / "ita" / block.name
    assert {"RQS_FFN_MUL.txt", "activation_requant_mult.txt", "GELU_B.txt"} <= {f.name for f in folder.iterdir()}
    assert (folder / "standalone" / "FF2p_0.txt").exists() and not (folder / "standalone" / "Qp_0.txt").exists()
    pairs = compare(tmp_path / "mlp.onnx", tmp_path / "mlp.intq", tmp_path / "calib.npy").outputs["y"]
    assert pairs["integer vs fake-quant"]["cosine"] >= 0.999 and pairs["integer vs float"]["cosine"] >= 0.995, pairs


def test_bert_encoder_without_a_mask_gives_the_testbench_folders(tmp_path, pyita_gelu):
    """A random-init BertConfig encoder (2 layers, E = 64, one head, F = 128, S = 64 tokens,
    no attention mask input, so its attention is ITA's): both block kinds in every layer, the
    full testbench file set per layer, the integer model close to its fake-quant model."""
    pytest.importorskip("transformers")
    import torch
    from export_helpers import export_onnx
    from refsim.exporters import compare
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128,
                     max_position_embeddings=64, num_labels=3)
    export_onnx(BertForSequenceClassification(cfg).eval(), (torch.ones(1, 64, dtype=torch.long),), tmp_path / "bert.onnx",
                ("input_ids",), False, None)
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 100, (8, 64)))
    assert cli(["export", str(tmp_path / "bert.onnx"), "-o", str(tmp_path / "bert.intq"), "--calib",
                str(tmp_path / "ids.npy"), "--mode", "ita", "--quiet"]) == 0
    model = refsim.load(tmp_path / "bert.intq")
    layers = [f"bert.encoder.layer.{i}" for i in range(2)]
    assert [(b.name, b.attention, b.activation) for b in blocks(model)] == [
        (f"{layer}.ffn", f"{layer}.attention", "gelu") for layer in layers]
    assert cli(["golden", str(tmp_path / "bert.intq"), str(tmp_path / "ids.npy"), "-o", str(tmp_path / "v"),
                "--targets", "ita", "--samples", "1"]) == 0
    names = sorted(str(f.relative_to(pyita_gelu)) for f in pyita_gelu.rglob("*.txt"))
    for layer in layers:
        ours = tmp_path / "v" / "sample0000" / "ita" / f"{layer}.attention"
        assert sorted(str(f.relative_to(ours)) for f in ours.rglob("*.txt")) == names
    pairs = compare(tmp_path / "bert.onnx", tmp_path / "bert.intq", tmp_path / "ids.npy", max_samples=4).outputs["logits"]
    assert pairs["integer vs fake-quant"]["cosine"] >= 0.99, pairs


def test_ff2_output_columns_carry_their_own_scale(exported):
    """ITA's one FF2 multiplier gives one int8 scale; the exporter divides each Wff2 column by
    c_j (its output range relative to the widest), so the int8 tensor's real scale is s * c
    per column, which the 16-bit residual Add undoes (docs/EXPORT.md)."""
    _, model = exported
    t = model.graph.tensors
    for b in blocks(model):
        f2 = b.steps["F2"]
        out, weight = np.asarray(t[f2["out"]].scale), np.asarray(t[f2["weight"]].scale)
        assert out.shape == weight.shape == (b.E,)
        c = out / out.max()
        assert np.allclose(weight / weight.max(), c) and c.min() < 0.9  # columns differ, as the ranges do


def test_channel_scales_keep_the_narrow_columns_of_an_outlier_output():
    """The chooser on a layer whose output has two columns 100x wider than the rest (a
    transformer's residual outlier dimensions): per-tensor int8 rounds the others to about
    nothing; with the factors every column keeps its resolution."""
    from types import SimpleNamespace

    from refsim.exporters.calibrate import Calibration, InputStats
    from refsim.exporters.config import ExportOptions
    from refsim.exporters.modes import Modes

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 32))
    w = rng.normal(size=(32, 16)) * 0.1
    w[:, :2] *= 100
    stats = InputStats()
    stats.observe(x, rng)
    add = SimpleNamespace(op="Add")
    walker = SimpleNamespace(users={"y": [add]}, g=SimpleNamespace(outputs=[]), calibration=Calibration(inputs={"x": stats}))
    c, s = Modes(ExportOptions(mode="ita")).ita_output_channels(walker, "x", "y", w, None)
    y = x @ w
    per_channel = np.clip(np.rint(y / c / s), -128, 127) * s * c
    per_tensor_scale = np.abs(y).max() / 127
    per_tensor = np.clip(np.rint(y / per_tensor_scale), -128, 127) * per_tensor_scale

    def sqnr(q, cols):
        return 10 * np.log10(np.sum(y[:, cols] ** 2) / np.sum((y[:, cols] - q[:, cols]) ** 2))

    assert c[:2].min() > 0.5 and c[2:].max() < 0.05
    assert sqnr(per_channel, slice(2, None)) > sqnr(per_tensor, slice(2, None)) + 20
    assert Modes(ExportOptions(mode="ita", ita_channel_scales=False)).ita_output_channels(walker, "x", "y", w, None) == (None, None)
    walker.users["y"] = [SimpleNamespace(op="Gelu")]  # only a residual Add can undo the factors
    assert Modes(ExportOptions(mode="ita")).ita_output_channels(walker, "x", "y", w, None) == (None, None)
