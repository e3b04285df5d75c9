"""`refsim run` and `refsim inspect`: every input form, every output form, and the README's
worked examples."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import refsim
from refsim.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.intq"
INPUTS = ROOT / "examples" / "tiny_mlp_inputs.txt"


def example_rows():
    return [[int(v) for v in line.split()] for line in INPUTS.read_text().splitlines() if line and not line.startswith("#")]


def expected(rows):
    model = refsim.load(EXAMPLE)
    return [model.run({"x": np.array([r], np.int8)}) for r in rows]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_run_text_input_prints_every_sample(capsys):
    code, out, err = run_cli(capsys, "run", EXAMPLE, INPUTS)
    assert code == 0 and err == ""
    rows = example_rows()
    assert out.count("logits int8[1, 4] = ") == len(rows)
    for want in expected(rows):
        labels = ["north", "east", "south", "west"]
        assert f"-> {labels[int(want['label'][0])]}" in out
        assert "[[" + " ".join(str(v) for v in want["logits"][0]) + "]]" in re.sub(r"\s+", " ", out).replace("[[ ", "[[")


def test_run_json_matches_the_python_api(capsys):
    code, out, _ = run_cli(capsys, "run", EXAMPLE, INPUTS, "--json")
    doc = json.loads(out)
    rows = example_rows()
    assert [s["source"] for s in doc["samples"]] == [f"{INPUTS}:{i}" for i in range(2, 2 + len(rows))]
    for sample, want in zip(doc["samples"], expected(rows)):
        assert sample["outputs"]["logits"] == {"dtype": "int8", "shape": [1, 4], "values": want["logits"].tolist()}
        assert sample["outputs"]["label"]["values"] == want["label"].tolist()


def test_run_npy_npz_and_stdin_agree(tmp_path, capsys):
    rows = np.array(example_rows(), np.int8)
    np.save(tmp_path / "x.npy", rows)
    np.savez(tmp_path / "x.npz", x=rows)
    want = refsim.load(EXAMPLE).run({"x": rows})
    for source in (tmp_path / "x.npy", tmp_path / "x.npz"):
        # Samples along axis 0: one per row, each a batch of one.
        code, out, _ = run_cli(capsys, "run", EXAMPLE, source, "--json")
        samples = json.loads(out)["samples"]
        assert code == 0 and [s["source"] for s in samples] == [f"{source}[{i}]" for i in range(len(rows))]
        assert [s["outputs"]["logits"]["values"][0] for s in samples] == want["logits"].tolist()
        code, out, _ = run_cli(capsys, "run", EXAMPLE, source, "--json", "--samples", "2")
        assert len(json.loads(out)["samples"]) == 2
        # --batch-axis none: the whole array is one sample (a batch of four).
        code, out, _ = run_cli(capsys, "run", EXAMPLE, source, "--json", "--batch-axis", "none")
        assert json.loads(out)["samples"][0]["outputs"]["logits"]["values"] == want["logits"].tolist()
    stdin = subprocess.run([sys.executable, "-m", "refsim", "run", str(EXAMPLE), "-", "--json"],
                           input="16 " + " ".join(["007"] * 15) + "\n", capture_output=True, text=True, check=True)
    got = json.loads(stdin.stdout)["samples"][0]["outputs"]["logits"]["values"]
    assert got == refsim.load(EXAMPLE).run({"x": np.array([[16] + [7] * 15], np.int8)})["logits"].tolist()


def test_run_out_writes_an_npz_atomically(tmp_path, capsys):
    out_path = tmp_path / "out.npz"
    code, _, _ = run_cli(capsys, "run", EXAMPLE, INPUTS, "--out", out_path, "--outputs", "logits,fc1.acc")
    assert code == 0
    rows = example_rows()
    with np.load(out_path) as saved:
        assert sorted(saved.files) == ["fc1.acc", "logits"]
        assert saved["logits"].shape == (len(rows), 4) and saved["logits"].dtype == np.int8
        assert saved["logits"].tolist() == [w["logits"][0].tolist() for w in expected(rows)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    # a failed run writes nothing
    code, _, err = run_cli(capsys, "run", EXAMPLE, tmp_path / "absent.txt", "--out", tmp_path / "none.npz")
    assert code == 2 and err.startswith("refsim: error: ") and not (tmp_path / "none.npz").exists()


def test_run_rejects_an_input_file_without_samples(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    code, _, err = run_cli(capsys, "run", EXAMPLE, empty, "--out", tmp_path / "o.npz")
    assert code == 2 and "no samples" in err and err.count("\n") == 1


def test_run_text_input_mistakes(tmp_path, capsys):
    cases = {"1 2 3\n": "expected 16 numbers", "1 2 x 4\n": "'x' is not an integer", " ".join(["300"] * 16) + "\n": "outside int8"}
    for text, message in cases.items():
        f = tmp_path / "in.txt"
        f.write_text(text)
        code, _, err = run_cli(capsys, "run", EXAMPLE, f)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_inspect_text_and_json(capsys):
    code, out, _ = run_cli(capsys, "inspect", EXAMPLE, "--nodes")
    assert code == 0
    assert "graph 'tiny_mlp', 6 nodes" in out and "x: int8['batch', 16]" in out
    assert re.search(r"MatMul\s+2", out) and re.search(r"MatMul_\d+: MatMul\(x, fc1.weight, , , fc1.bias\) -> fc1.acc", out)
    code, out, _ = run_cli(capsys, "inspect", EXAMPLE, "--json")
    d = json.loads(out)
    assert d["graph"] == "tiny_mlp" and d["nodes"] == 6 and "node_list" not in d
    assert d["ops"] == {"ArgMax": 1, "MatMul": 2, "Relu": 1, "Requant": 2}
    assert d["inputs"] == [{"name": "x", "dtype": "int8", "shape": ["batch", 16], "scale": 0.05, "zero_point": 0}]
    # 16*32 int4 weights pack into 256 bytes, 32*4 ternary into 32
    assert d["constants_by_dtype"]["int4"] == {"tensors": 1, "elements": 512, "bytes": 256}
    assert d["constants_by_dtype"]["ternary"] == {"tensors": 1, "elements": 128, "bytes": 32}
    assert d["float32_bytes"] == 4 * sum(r["elements"] for r in d["constants_by_dtype"].values())
    assert d["file_bytes"] == EXAMPLE.stat().st_size and d["metadata_keys"] == ["labels"]


def test_usage_mistakes_are_one_line(capsys):
    for argv in (["run"], ["frobnicate"], ["inspect", str(EXAMPLE), "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("refsim: error: "), err


def readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.startswith("refsim ")]


def test_readme_examples_run(tmp_path, capsys, monkeypatch):
    """Every `refsim ...` line of the README's bash blocks, run in a scratch copy of the
    repository's examples so that what they write lands there."""
    commands = readme_commands()
    assert any(c.startswith("refsim run") for c in commands) and any(c.startswith("refsim inspect") for c in commands)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for command in commands:
        code, out, err = run_cli(capsys, *shlex.split(command)[1:])
        assert code == 0 and not err, (command, err)
