"""Golden vectors: run a model with a trace, write every tensor as a vector set, check dumps.

    from refsim.golden import write_vector_set, check
    from refsim.hw_vectors import targets

    write_vector_set(model, samples, "vectors", targets("npy,memh"))
    report = check("vectors", "dump")          # report.ok, report.results

The command-line forms are `refsim golden` and `refsim check` (docs/GOLDEN.md).
"""

from .capture import CapturedSample, capture, tensor_filter
from .check import CheckReport, TensorResult, check, format_report
from .vectorset import VectorSetError, load_manifest, write_vector_set

__all__ = [
    "CapturedSample", "CheckReport", "TensorResult", "VectorSetError",
    "capture", "check", "format_report", "load_manifest", "tensor_filter", "write_vector_set",
]
