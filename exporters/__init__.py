"""refsim.exporters: everything that knows floats, scales and ONNX.

All float work happens here, once, at export time: calibration, choosing scales, and
turning real-valued scales into the integer constants (dyadic multipliers, shifts,
polynomial coefficients) that the integer ops in `refsim.ops` take.

The front door is two functions (also `refsim export` and `refsim compare`):

    from refsim.exporters import export, compare
    report = export("model.onnx", "model.intq", "calib.txt", tokenizer="tokenizer.json")
    print(compare("model.onnx", "model.intq", "eval.txt").text())
"""

from __future__ import annotations


def __getattr__(name: str):
    # Imported on first use: `refsim.exporters.nonlinear` users need not load onnx.
    if name in ("export", "ExportReport"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("compare", "CompareReport"):
        from . import comparison

        return getattr(comparison, name)
    raise AttributeError(f"module 'refsim.exporters' has no attribute {name!r}")


__all__ = ["export", "compare", "ExportReport", "CompareReport"]
