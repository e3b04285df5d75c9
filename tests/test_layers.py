"""The layer contracts (pyproject.toml's import-linter section) and ruff hold, and the
contract on the integer core names every top-level module of ref/."""

import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI_LAYER = {"cli", "__main__", "__init__"}


def test_core_contract_lists_every_core_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    listed = {m.removeprefix("refsim.") for m in config["source_modules"]}
    present = {p.stem for p in (ROOT / "ref").iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert present - CLI_LAYER == listed


def test_layers_and_lint():
    bin_dir = pathlib.Path(sys.executable).parent
    if not (bin_dir / "lint-imports").exists():
        pytest.skip("import-linter is not installed (the [test] extra installs it)")
    result = subprocess.run(["bash", str(ROOT / ".ci" / "lint")], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
