"""`refsim golden` / `refsim check`: the vector set, the checker, atomic writes, unsafe names."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import refsim
import refsim.golden
from golden_helpers import NASTY_NAMES, nasty_graph
from refsim.cli import main as cli
from refsim.golden.vectorset import write_vector_set
from refsim.hw_vectors import targets
from refsim.inputs import Sample

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_mlp.intq"
INPUTS = ROOT / "examples" / "tiny_mlp_inputs.txt"


@pytest.fixture(scope="module")
def golden_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "golden"
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(out), "--targets", "npy,memh,c"]) == 0
    return out


def manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def test_set_holds_every_tensor_of_every_sample_with_its_provenance(golden_set):
    m = manifest(golden_set)
    assert m["format"] == "refsim.golden" and m["refsim_version"] == refsim.__version__
    assert len(m["samples"]) == 4
    names = [t["name"] for t in m["tensors"]]
    assert names == ["x", "fc1.acc", "fc1.out", "relu.out", "fc2.acc", "logits", "label"]
    fc1 = m["tensors"][1]
    assert (fc1["node"], fc1["op"], fc1["dtype"], fc1["declared_shape"]) == ("MatMul_1", "MatMul", "int32", ["batch", 32])
    assert m["tensors"][0]["scale"] == 0.05 and m["tensors"][0]["zero_point"] == 0
    model = refsim.load(EXAMPLE)
    for sample in m["samples"]:
        line = INPUTS.read_text().splitlines()[int(sample["source"].rsplit(":", 1)[1]) - 1]
        x = np.array([int(v) for v in line.split()], np.int8).reshape(1, 16)
        expected = {}
        model.run({"x": x}, trace=lambda node, name, a: expected.__setitem__(name, a))
        for t in m["tensors"][1:]:
            (entry,) = [f for f in t["files"] if f["sample"] == sample["index"] and f["target"] == "npy"]
            assert np.load(golden_set / entry["path"]).tolist() == expected[t["name"]].tolist()
    for f in m["files"]:
        import hashlib

        assert hashlib.sha256((golden_set / f["path"]).read_bytes()).hexdigest() == f["sha256"]


def test_check_passes_on_the_untouched_set(golden_set, capsys):
    assert cli(["check", str(golden_set), str(golden_set)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("28 match, 0 mismatch, 0 missing: OK")


def test_one_flipped_value_is_reported_exactly(golden_set, tmp_path, capsys):
    dump = tmp_path / "dump"
    shutil.copytree(golden_set, dump)
    path = dump / "sample0002" / "fc1.out.npy"
    values = np.load(path)
    values[0, 17] ^= 1
    np.save(path, values)
    assert cli(["check", str(golden_set), str(dump), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    bad = [r for r in report["results"] if r["status"] != "match"]
    assert len(bad) == 1
    assert (bad[0]["tensor"], bad[0]["sample"], bad[0]["first_index"], bad[0]["mismatches"]) == ("fc1.out", 2, [0, 17], 1)
    assert bad[0]["actual"] == bad[0]["expected"] ^ 1 and bad[0]["max_abs_diff"] == 1
    assert cli(["check", str(golden_set), str(dump), "--atol", "1"]) == 0
    capsys.readouterr()
    assert cli(["check", str(golden_set), str(dump)]) == 1
    assert "MISMATCH  sample 2 fc1.out (int8[1, 32]): 1 of 32 values differ; first at [0, 17]" in capsys.readouterr().out


def test_memh_dump_is_compared_too(golden_set, tmp_path, capsys):
    dump = tmp_path / "dump"
    (dump / "sample0001").mkdir(parents=True)
    text = (golden_set / "sample0001" / "fc1.acc.memh").read_text().splitlines()
    text[2 + 5] = "%08x" % ((int(text[2 + 5], 16) + 3) & 0xFFFFFFFF)  # element 5 of an int32 tensor, +3
    (dump / "sample0001" / "fc1.acc.memh").write_text("\n".join(text) + "\n")
    assert cli(["check", str(golden_set), str(dump), "--tensors", "fc1.acc", "--json"]) == 1
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["status"] for r in results] == ["missing", "mismatch", "missing", "missing"]
    assert results[1]["first_index"] == [0, 5] and results[1]["actual"] - results[1]["expected"] == 3


def test_user_errors_exit_2(golden_set, tmp_path, capsys):
    assert cli(["check", str(tmp_path / "nope"), str(golden_set)]) == 2
    assert cli(["check", str(golden_set), str(tmp_path / "nope")]) == 2
    assert cli(["check", str(golden_set), str(golden_set), "--tensors", "no_such_*"]) == 2
    assert cli(["golden", str(EXAMPLE), str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 2
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(tmp_path / "y"), "--targets", "vhdl"]) == 2
    err = capsys.readouterr().err
    assert err.count("refsim: error:") == 5 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_existing_dir_needs_force_and_only_a_vector_set_is_replaced(golden_set, tmp_path, capsys):
    out = tmp_path / "set"
    shutil.copytree(golden_set, out)
    args = ["golden", str(EXAMPLE), str(INPUTS), "-o", str(out), "--samples", "1"]
    assert cli(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert len(manifest(out)["samples"]) == 4
    assert cli(args + ["--force"]) == 0
    assert len(manifest(out)["samples"]) == 1 and not (out / "sample0001").exists()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(other), "--force"]) == 2
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious", "set"]


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("exception", [RuntimeError, Interrupt])
def test_an_interrupted_run_leaves_no_partial_dir(tmp_path, exception):
    model = refsim.load(EXAMPLE)
    samples = [Sample({"x": np.full((1, 16), i, np.int8)}, f"s{i}") for i in range(3)]

    class Failing:
        calls = 0

        @staticmethod
        def write(ctx):
            Failing.calls += 1
            if ctx.sample.index == 2:
                raise exception("stopped mid-way")

    with pytest.raises(exception):
        write_vector_set(model, samples, tmp_path / "set", {**targets("npy"), "failing": Failing})
    assert Failing.calls == 3
    assert list(tmp_path.iterdir()) == []


def test_unsafe_names_stay_inside_the_set(tmp_path):
    model = nasty_graph()
    out = tmp_path / "out"
    m = write_vector_set(model, [Sample({"in/../../x": np.array([1, -1], np.int8)}, "s")], out, targets("npy,memh,c"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(out.resolve() in p.resolve().parents for p in files)
    stems = [t["file"] for t in m["tensors"]]
    assert len({s.casefold() for s in stems}) == len(stems) == len(NASTY_NAMES) + 1
    assert all(len(s) <= 96 and not s.startswith(".") and s.split(".")[0].upper() != "CON" for s in stems)
    assert len(files) == 1 + 2 * len(stems) + 1  # manifest, npy + memh per tensor, one header
    for t in m["tensors"]:
        (entry,) = [f for f in t["files"] if f["target"] == "npy"]
        assert np.load(out / entry["path"]).tolist() in ([1, -1], [1, 0])


def test_readme_example_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith(("refsim golden", "refsim check"))]
    assert len(commands) >= 3
    for command in commands:
        argv = [a.strip("'") for a in command.split("#")[0].split()[1:]]
        argv = [str(tmp_path / a) if a.startswith("vectors") else a for a in argv]
        if argv[0] == "golden" and not (ROOT / argv[1]).exists():
            continue  # a model an earlier README command writes (test_cli runs the README in order)
        status = cli(argv)
        assert status == 0, command


def test_vector_set_folder_gets_the_usual_permissions(tmp_path):
    import os
    import stat
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vectors"
    subprocess.run(
        [sys.executable, "-m", "refsim", "golden", str(root / "examples" / "tiny_mlp.intq"),
         str(root / "examples" / "tiny_mlp_inputs.txt"), "-o", str(out), "--samples", "1"],
        check=True, capture_output=True,
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# --- samples, size, progress, summaries ---------------------------------------------------


def test_an_array_file_is_one_sample_per_row_and_samples_limits_it(tmp_path, capsys):
    rows = np.random.default_rng(0).integers(-128, 128, (5, 16)).astype(np.int8)
    np.save(tmp_path / "x.npy", rows)
    assert cli(["golden", str(EXAMPLE), str(tmp_path / "x.npy"), "-o", str(tmp_path / "all")]) == 0
    m = manifest(tmp_path / "all")
    assert [s["source"] for s in m["samples"]] == [f"{tmp_path / 'x.npy'}[{i}]" for i in range(5)]
    want = refsim.load(EXAMPLE).run({"x": rows})["logits"]
    for i in range(5):
        assert np.load(tmp_path / "all" / f"sample000{i}" / "logits.npy").tolist() == want[i : i + 1].tolist()
    assert cli(["golden", str(EXAMPLE), str(tmp_path / "x.npy"), "-o", str(tmp_path / "two"), "--samples", "2"]) == 0
    assert len(manifest(tmp_path / "two")["samples"]) == 2
    assert cli(["golden", str(EXAMPLE), str(tmp_path / "x.npy"), "-o", str(tmp_path / "one"), "--batch-axis", "none"]) == 0
    assert np.load(tmp_path / "one" / "sample0000" / "logits.npy").tolist() == want.tolist()
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(tmp_path / "text"), "--samples", "3"]) == 0
    assert len(manifest(tmp_path / "text")["samples"]) == 3


def test_a_set_over_max_size_is_refused_before_writing(tmp_path, capsys):
    out = tmp_path / "big"
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(out), "--max-size", "2k"]) == 2
    err = capsys.readouterr().err
    assert "would take about" in err and "4 samples of" in err and "over the limit of 2.0 kB" in err
    assert list(tmp_path.iterdir()) == []
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(out), "--max-size", "none"]) == 0
    assert cli(["golden", str(EXAMPLE), str(INPUTS), "-o", str(tmp_path / "x"), "--max-size", "lots"]) == 2


def test_check_lists_only_differences_on_request_and_names_the_first(golden_set, tmp_path, capsys):
    dump = tmp_path / "dump"
    shutil.copytree(golden_set, dump)
    for sample in (1, 3):
        path = dump / f"sample000{sample}" / "relu.out.npy"
        a = np.load(path)
        a.reshape(-1)[0] += 1
        np.save(path, a)
    assert cli(["check", str(golden_set), str(dump), "--only-mismatches"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:2]] == ["MISMATCH", "MISMATCH"]
    assert "first difference: sample 1 relu.out (mismatch)" in out and "(26 matching tensors not listed; --all lists them)" in out
    assert cli(["check", str(golden_set), str(dump)]) == 1  # 28 results: listed in full by default
    assert sum(line.startswith("match") for line in capsys.readouterr().out.splitlines()) == 26


def test_large_reports_count_matches_instead_of_listing_them():
    from refsim.golden.check import CheckReport, TensorResult, format_report

    report = CheckReport("g", "d", 0, [TensorResult(f"t{i}", 0, "match", "int8", [2]) for i in range(60)])
    text = format_report(report)
    assert text.splitlines() == ["(60 matching tensors not listed; --all lists them)", "60 match, 0 mismatch, 0 missing: OK"]
    assert len(format_report(report, matches=True).splitlines()) == 61


def test_vector_set_api_gives_tensors_nodes_and_constants(golden_set, monkeypatch):
    import re

    vs = refsim.golden.open(golden_set)
    model = refsim.load(EXAMPLE)
    nodes = list(vs.nodes("Requant"))
    assert [n.name for n in nodes] == [n.name for n in model.graph.nodes if n.op == "Requant"]
    for node in nodes:
        graph_node = next(n for n in model.graph.nodes if n.name == node.name)
        assert node.attrs == graph_node.attrs and node.input_names == list(graph_node.inputs)
        assert node.const("mul").tolist() == model.graph.tensors[graph_node.inputs[1]].data.tolist()
        assert node.const(2).tolist() == model.graph.tensors[graph_node.inputs[2]].data.tolist()
    traced = {}
    model.run({"x": vs[2]["x"]}, trace=lambda n, name, a: traced.__setitem__(name, a))
    assert all(vs[2][name].tolist() == traced[name].tolist() for name in traced)
    assert vs.tensors["fc1.out"].node.op == "Requant" and vs.tensors["x"].node is None
    with pytest.raises(refsim.golden.VectorSetError, match="computed, not a constant"):
        nodes[0].const("x")
    # The README's snippet runs as written.
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(import refsim.golden\n.*?)```", readme, flags=re.DOTALL).group(1)
    monkeypatch.chdir(golden_set.parent)
    exec(compile(snippet.replace('"vectors"', repr(str(golden_set))), "README", "exec"), {})
