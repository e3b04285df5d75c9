"""Golden vectors: run a model with a trace, write every tensor as a vector set, check dumps.

    from refsim.golden import write_vector_set, check
    from refsim.hw_vectors import targets

    write_vector_set(model, samples, "vectors", targets("npy,memh"))
    report = check("vectors", "dump")          # report.ok, report.results

    vs = refsim.golden.open("vectors")         # a testbench's view: samples, tensors, nodes
    for node in vs.nodes("Requant"): ...       # op, attrs, constant inputs (refsim.golden.reader)

The command-line forms are `refsim golden` and `refsim check` (docs/GOLDEN.md).
"""

from .capture import CapturedSample, capture, tensor_filter
from .check import CheckReport, TensorResult, check, format_report
from .reader import NodeInfo, TensorInfo, VectorSet, open_set
from .reader import open_set as open  # noqa: A001 - refsim.golden.open(folder), as the docs say
from .vectorset import VectorSetError, load_manifest, write_vector_set

__all__ = [
    "CapturedSample", "CheckReport", "NodeInfo", "TensorInfo", "TensorResult", "VectorSet", "VectorSetError",
    "capture", "check", "format_report", "load_manifest", "open", "open_set", "tensor_filter", "write_vector_set",
]
