"""The README's example model runs from Python and from the command line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import refsim

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.intq"


def test_example_model_matches_a_plain_numpy_computation():
    model = refsim.load(EXAMPLE)
    g = model.graph.tensors
    x = np.arange(-8, 8, dtype=np.int8).reshape(1, 16) * 9
    out = model.run({"x": x})
    # The same network written out with Python integers, from the formulas in docs/OPS.md.
    acc = x.astype(np.int64) @ g["fc1.weight"].data.astype(np.int64) + g["fc1.bias"].data
    h = (acc * g["fc1.mul"].data.astype(np.int64) + (1 << 11)) >> 12
    h = np.maximum(np.clip(h, -128, 127), 0)
    acc2 = h @ g["fc2.weight"].data.astype(np.int64)
    logits = np.clip((acc2 * 181 + (1 << 7)) >> 8, -128, 127)
    assert out["logits"].tolist() == logits.tolist()
    assert out["label"].tolist() == np.argmax(logits, axis=-1).tolist()


def test_cli_run_prints_labels():
    result = subprocess.run(
        [sys.executable, "-m", "refsim", "run", str(EXAMPLE), str(ROOT / "examples" / "tiny_mlp_inputs.txt")],
        capture_output=True, text=True, check=True,
    )
    assert "logits int8[1, 4]" in result.stdout
    assert "->" in result.stdout
