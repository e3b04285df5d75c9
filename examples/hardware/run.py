"""Build requant.v with Icarus Verilog and run the cocotb test on a refsim vector set.

    refsim golden examples/tiny_mlp.intq examples/tiny_mlp_inputs.txt -o vectors
    python examples/hardware/run.py vectors
"""

import sys
import tempfile
from pathlib import Path

from cocotb_tools.check_results import get_results
from cocotb_tools.runner import get_runner

HERE = Path(__file__).resolve().parent


def run(vectors: str, build_dir: str | None = None, defines: dict | None = None) -> tuple[int, int]:
    """(tests run, tests failed). The build goes to `build_dir` (default: a temporary folder)."""
    build = Path(build_dir or tempfile.mkdtemp(prefix="refsim_requant_"))
    runner = get_runner("icarus")
    runner.build(sources=[HERE / "requant.v"], hdl_toplevel="requant", build_dir=build, always=True,
                 timescale=("1ns", "1ps"), defines=defines or {})
    results = build / "results.xml"
    try:
        runner.test(hdl_toplevel="requant", test_module="test_requant", test_dir=HERE, build_dir=build,
                    results_xml=str(results), extra_env={"REFSIM_VECTORS": str(Path(vectors).resolve())})
    except SystemExit:  # cocotb's runner exits on a failed test; the results file says which
        pass
    return get_results(results)


if __name__ == "__main__":
    total, failed = run(sys.argv[1])
    print(f"{total - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
