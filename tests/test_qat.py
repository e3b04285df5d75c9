"""QAT is exact: the `.intq` exported from a trained QatModel gives, under `refsim run`, the
very integers the QatModel's forward pass computes (the torch executor of the same integer
graph), on inputs it was not trained on. Small random-initialised BERT and ViT (hidden 64,
2 layers), in each mode."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import refsim  # noqa: E402
from export_helpers import SEQ, VOCAB_WORDS, _perturb, image_data, text_data, tokenizer_json  # noqa: E402
from refsim.exporters.qat import QatModel  # noqa: E402

SLOW = pytest.mark.skipif(os.environ.get("REFSIM_SLOW") != "1", reason="the rest of the model x mode matrix runs with REFSIM_SLOW=1")
# CI runs one case per mode; REFSIM_SLOW=1 runs all six, and ibert with I-BERT's i-GELU
# ("ibert/igelu": --gelu ibert) instead of the default GELU table
CASES = [("bert64", "ibert"), ("vit64", "ita"), ("bert64", "ita-partial"),
         pytest.param("bert64", "ita", marks=[pytest.mark.slow, SLOW]),
         pytest.param("vit64", "ibert", marks=[pytest.mark.slow, SLOW]),
         pytest.param("vit64", "ita-partial", marks=[pytest.mark.slow, SLOW]),
         pytest.param("bert64", "ibert/igelu", marks=[pytest.mark.slow, SLOW])]


def _export(model, args, path, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=False, opset_version=17, input_names=list(names),
                          output_names=["logits"], dynamic_axes={n: {0: "batch"} for n in names})
    return str(path)


@pytest.fixture(scope="module")
def bert64(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("qat_bert")
    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=len(VOCAB_WORDS) + 4, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    _perturb(model, torch)
    ids = torch.ones(2, SEQ, dtype=torch.long)
    onnx = _export(model, (ids, torch.ones_like(ids)), d / "bert.onnx", ("input_ids", "attention_mask"))
    (d / "tokenizer.json").write_text(tokenizer_json())
    return {"model": onnx, "calib": text_data(d / "calib.txt", 24, 0), "train": text_data(d / "train.txt", 16, 1),
            "held_out": text_data(d / "held_out.txt", 12, 2),
            "options": {"tokenizer": str(d / "tokenizer.json"), "max_length": SEQ}}


@pytest.fixture(scope="module")
def vit64(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification

    d = tmp_path_factory.mktemp("qat_vit")
    torch.manual_seed(2)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=1, intermediate_size=128, num_labels=10)
    model = ViTForImageClassification(cfg).eval()
    _perturb(model, torch)
    onnx = _export(model, (torch.randn(2, 1, 8, 8),), d / "vit.onnx", ("pixel_values",))
    return {"model": onnx, "calib": image_data(d / "calib.npy", 24, 0), "train": image_data(d / "train.npy", 16, 1),
            "held_out": image_data(d / "held_out.npy", 12, 2), "options": {}}


def _held_out_feeds(qat: QatModel, path: str) -> dict[str, np.ndarray]:
    return qat._arrays(path)


def _refsim_run(path, qat: QatModel, feeds) -> dict[str, np.ndarray]:
    m = refsim.load(path)
    integer = m.quantize_inputs(qat.integer_feeds(feeds))
    if m.metadata.get("attention_blocks") or m.metadata.get("feedforward_blocks"):  # ITA blocks: one sample at a time
        count = len(next(iter(integer.values())))
        runs = [m.run({k: v[i:i + 1] for k, v in integer.items()}) for i in range(count)]
        return {n: np.concatenate([r[n] for r in runs]) for n in m.graph.outputs}
    return m.run(integer)


@pytest.mark.parametrize(("which", "mode"), CASES)
def test_trained_export_equals_the_trained_forward_bit_for_bit(which, mode, request, tmp_path):
    case = request.getfixturevalue(which)
    mode, _, igelu = mode.partition("/")
    qat = QatModel.from_onnx(case["model"], case["calib"], mode=mode, **case["options"], **({"gelu": "ibert"} if igelu else {}))
    expected_gelu = {"ibert": "IBertGelu" if igelu else "LutInterp16"}.get(mode, "ITAGelu")
    assert expected_gelu in {n.op for n in qat.graph.nodes}
    before = qat.integer.integer_constants()
    feeds = _held_out_feeds(qat, case["held_out"])
    untrained = qat.run(feeds)
    plain = tmp_path / "plain.intq"
    qat.built.save(plain)
    ran = _refsim_run(plain, qat, feeds)
    for name in qat.graph.outputs:  # the untrained forward pass is the plain export's
        np.testing.assert_array_equal(ran[name], untrained[name])

    qat.fit(case["train"], epochs=1, lr=5e-3, batch_size=8)
    after = qat.integer.integer_constants()
    changed = sum(int(np.count_nonzero(before[k] != after[k])) for k in before)
    assert changed > 0, "training moved no integer constant: the equality below would be trivial"

    out = tmp_path / "qat.intq"
    qat.export(out)
    trained = qat.run(feeds)
    ran = _refsim_run(out, qat, feeds)
    assert any(not np.array_equal(trained[n], untrained[n]) for n in qat.graph.outputs)
    for name in qat.graph.outputs:
        assert ran[name].dtype == trained[name].dtype
        np.testing.assert_array_equal(ran[name], trained[name])
