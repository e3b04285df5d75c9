"""examples/hardware: a Verilog requantizer driven by cocotb from a refsim vector set.

Needs Icarus Verilog (Debian's iverilog; .ci/run installs it) and cocotb (the [test]
extra). Outside CI a missing iverilog skips the test; in CI it fails.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
from refsim.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def requant_example(tmp_path_factory):
    if shutil.which("iverilog") is None:
        if os.environ.get("CI"):
            pytest.fail("iverilog is not installed; .ci/run installs it with apt-get")
        pytest.skip("iverilog is not installed (apt-get install iverilog)")
    sys.path.insert(0, str(ROOT / "examples" / "hardware"))
    try:
        import run as example
    finally:
        sys.path.pop(0)
    vectors = tmp_path_factory.mktemp("hw") / "vectors"
    assert cli(["golden", str(ROOT / "examples" / "tiny_mlp.intq"), str(ROOT / "examples" / "tiny_mlp_inputs.txt"),
                "-o", str(vectors)]) == 0
    return example, vectors, tmp_path_factory


def test_the_requantizer_reproduces_every_refsim_value(requant_example):
    example, vectors, tmp = requant_example
    assert example.run(str(vectors), str(tmp.mktemp("build"))) == (1, 0)


def test_a_design_that_rounds_down_fails(requant_example):
    example, vectors, tmp = requant_example
    assert example.run(str(vectors), str(tmp.mktemp("build")), defines={"TRUNCATE": 1}) == (1, 1)
