"""A short fuzz run of every reader refsim exposes to users, in CI: `.intq` models, the ONNX
importers and the input files. The targets and the longer by-hand campaign are in
fuzz_targets.py; this runs each target for a few thousand executions (atheris, or the plain
mutation loop where atheris is not installed) and wants 0 exceptions that are not a
one-line RefsimError."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TARGETS = Path(__file__).resolve().parent / "fuzz_targets.py"
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
RUNS = {"intq": 1500, "onnx": 400, "inputs": 1500}  # a few seconds each


@pytest.mark.parametrize("target", sorted(RUNS))
def test_a_short_fuzz_run_raises_nothing_but_refsim_errors(target, tmp_path):
    if HAVE_ATHERIS:
        args = [f"-atheris_runs={RUNS[target]}", "-seed=17"]
    else:
        args = ["--plain", "--runs", str(RUNS[target] // 2), "--seed", "17"]
    result = subprocess.run([sys.executable, "-W", "ignore", str(TARGETS), target, *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "FUZZ_TMP": str(tmp_path)})
    report = [line for line in result.stdout.splitlines() if line.startswith("fuzz ")]
    assert result.returncode == 0 and report, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 non-refsim exceptions" in report[0], report[0]
