"""The float edges of an integer model: float inputs turned into the integers it takes, and
integer outputs read back as floats.

An image model exported from float pixels stores, per float input,

    metadata["input_quant"][name] = {"scale": s, "zero_point": z, "dtype": "int8"}

and `refsim run` (or `quantize_feeds`) turns a float array x fed to that input into

    q = clip(round_half_even(x / s) + z, lo, hi)      (lo, hi: the range of dtype)

computed in float64 (a value whose level `round(x / s)` is not even an int64, such as 1e308,
is refused rather than saturated). This is the boundary where real-valued data enters; it
happens once, before the graph runs, and the graph itself never sees a float. Integer arrays are passed
through unchanged (they are taken to be quantized already).

An imported model records its boundary in `metadata["import"]["inputs"/"outputs"]` (ONNX
QuantizeLinear's float32 arithmetic, per-axis and blocked scales, QONNX rounding modes,
TFLite's QUANTIZE (float32 division rounded half away from zero), quantlib inputs that are
floats holding integers). `input_specs` and `output_spec` are the
one place that reads both schemas; `quantize_feeds` and `dequantize_outputs` (also
`Model.quantize_inputs` / `Model.dequantize_outputs`) work for both. An output without a
boundary entry is dequantized with the scale and zero point its graph tensor carries.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .dtypes import int_type
from .errors import InputError


def quantize_array(x: np.ndarray, scale: float, zero_point: int, dtype: str, what: str = "float input") -> np.ndarray:
    t = int_type(dtype)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise InputError(f"{what}: input quantization scale must be a positive number, got {scale!r}")
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        raise InputError(f"{what}: holds NaN or infinite values (first at index {list(_first(~finite))})")
    with np.errstate(over="ignore"):  # a huge x / tiny scale overflows to inf: refused below
        q = np.rint(x / float(scale)) + int(zero_point)
    # Values far beyond the type saturate, as ONNX QuantizeLinear does; but one whose level
    # is not even an int64 (1e308, say) is not an image that was slightly out of range.
    wild = ~(np.abs(q) < 2.0**63)
    if wild.any():
        index = _first(wild)
        raise InputError(
            f"{what}: value {float(x[index]):g} at index {list(index)} is far outside the {t.name} range "
            f"[{t.lo}, {t.hi}] it is quantized into at scale {scale} (more than 2^63 steps)"
        )
    return np.clip(q, t.lo, t.hi).astype(t.storage)


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)) if mask.ndim else ()


def input_specs(metadata: Mapping) -> dict[str, dict]:
    """Every input's float boundary, from either schema, as {"schema": "export"|"import", ...}."""
    specs = {name: {"schema": "export", **spec} for name, spec in (metadata.get("input_quant") or {}).items()}
    for name, spec in ((metadata.get("import") or {}).get("inputs") or {}).items():
        specs[name] = {"schema": "import", **spec}
    return specs


def output_spec(model, name: str) -> dict | None:
    """How output tensor `name` reads as floats: {"scale", "zero_point", "axis"?} or None."""
    for spec in ((model.metadata.get("import") or {}).get("outputs") or {}).values():
        if spec.get("tensor") == name:
            return spec if spec.get("dequantize") else None
    t = model.graph.tensors[name]
    if t.scale is None:
        return None
    zero = 0 if t.zero_point is None else t.zero_point
    return {"scale": t.scale, "zero_point": zero, **({"axis": t.quant_axis} if t.quant_axis is not None else {})}


def _expand_scale(entry: dict, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point broadcasting against a tensor of `shape` (per tensor, per axis, blocked)."""
    scale = np.asarray(entry["scale"], np.float32)
    zero = np.asarray(entry.get("zero_point", 0), np.int64)
    if scale.size == 1:
        return scale.reshape(()), zero.reshape(())
    axis = entry["axis"] % len(shape)
    if "block_size" in entry:
        scale_shape = entry["scale_shape"]
        scale = np.repeat(scale.reshape(scale_shape), entry["block_size"], axis=axis)
        zero = np.repeat(np.broadcast_to(zero, scale_shape) if zero.size == 1 else zero.reshape(scale_shape),
                         entry["block_size"], axis=axis)
        index = [slice(None)] * len(shape)
        index[axis] = slice(0, shape[axis])
        return scale[tuple(index)], zero[tuple(index)]
    view = [1] * len(shape)
    view[axis] = scale.size
    return scale.reshape(view), (zero.reshape(view) if zero.size > 1 else zero.reshape(()))


def _refuse_unquantizable(array: np.ndarray, spec: dict, t, name: str) -> None:
    """The imported boundary computes in float32 (as ONNX and TFLite do): a value that is not
    a finite float32, or whose level is not even an int64, is refused rather than saturated."""
    x = np.asarray(array, np.float64)
    bad = ~(np.abs(x) <= np.finfo(np.float32).max)
    if not bad.any():
        scale, _ = _expand_scale(spec, x.shape)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            bad = ~(np.abs(x / np.asarray(scale, np.float64)) < 2.0**63)
    if bad.any():
        index = _first(bad)
        raise InputError(f"input {name!r}: value {float(x[index]):g} at index {list(index)} cannot be quantized into "
                         f"{t.name} [{t.lo}, {t.hi}] (not a finite float32, or more than 2^63 steps of its scale)")


def _quantize_imported(array: np.ndarray, spec: dict, t, name: str) -> np.ndarray:
    if "holds" in spec:  # quantlib/Deeploy: a float tensor that holds integers
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError(f"input {name!r} takes floats holding integers ({spec['holds']}); got fractional values")
        return array.astype(np.int64)
    lo, hi = spec.get("clip", (t.lo, t.hi))
    _refuse_unquantizable(array, spec, t, name)
    x = np.asarray(array, np.float32)
    scale, zero = _expand_scale(spec, x.shape)
    rounding = spec.get("rounding", "half_even")
    if rounding == "half_even":  # ONNX QuantizeLinear: float32 division, ties to even, then the zero point
        q = np.rint(x / scale).astype(np.float64) + zero
    elif rounding == "half_away":  # TFLite QUANTIZE: float32 division, ties away from zero (std::round)
        r = (x / scale).astype(np.float64)
        q = np.trunc(r) + np.where(np.abs(r - np.trunc(r)) >= 0.5, np.sign(r), 0) + zero
    else:  # QONNX Quant: round_mode(clip(x / scale + zeropt))
        rounder = {"floor": np.floor, "trunc": np.trunc, "half_up": lambda v: np.floor(v + 0.5)}[rounding]
        q = rounder(np.clip((x / scale + zero.astype(np.float32)), lo, hi)).astype(np.float64)
    return np.clip(q, lo, hi).astype(t.storage)


def quantize_feeds(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with every float array quantized by the model's recorded input boundary."""
    specs = input_specs(model.metadata)
    out = {}
    for name, value in feeds.items():
        array = np.asarray(value)
        spec = specs.get(name)
        if array.dtype.kind != "f" or spec is None:
            out[name] = array
        elif spec["schema"] == "import":
            out[name] = _quantize_imported(array, spec, model.graph.tensors[name].dtype, name)
        else:
            try:
                out[name] = quantize_array(array, spec["scale"], spec.get("zero_point", 0), spec["dtype"], f"input {name!r}")
            except KeyError as e:
                raise InputError(f"input_quant for {name!r} lacks {e}") from None
    return out


def dequantize_outputs(model, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs with a known scale as float32 `(q - zero_point) * scale`; the others unchanged."""
    result = {}
    for name, value in outputs.items():
        spec = output_spec(model, name) if name in model.graph.tensors else None
        if spec is None:
            result[name] = value
            continue
        scale, zero = _expand_scale(spec, np.shape(value))
        result[name] = ((np.asarray(value).astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)
    return result
