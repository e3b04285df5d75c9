"""refsim.exporters: everything that knows floats, scales and ONNX.

All float work happens here, once, at export time: calibration, choosing scales, and
turning real-valued scales into the integer constants (dyadic multipliers, shifts,
polynomial coefficients) that the integer ops in `refsim.ops` take.
"""
