"""The float boundary of an integer model: how float inputs become the integers it takes,
and what its integer outputs mean as floats.

refsim runs integers only. A model exported from a float graph (`refsim export`) or
imported from a quantized one (`refsim import`) records its boundary once, in
`metadata["boundary"]`:

    "inputs":  {name: {"dtype": "int8", "scale": s, "zero_point": z,
                       "axis": a, "scale_shape": [...], "block_size": b,      (per axis / blocked)
                       "rounding": "half_even", "clip": [lo, hi], "arithmetic": "float32",
                       "integers": false}}
    "outputs": {name: {"tensor": t, "dtype": "int16", "scale": s, "zero_point": z, "axis": a,
                       "dequantize": true}}

A float array fed to an input with an entry is quantized on the host, before the graph
runs (the graph itself never sees a float):

    q = clip(round(x / scale) + zero_point, lo, hi)

with `x / scale` computed in float32 as ONNX QuantizeLinear does (`arithmetic: "float64"`
for files written before this schema), `round` per `rounding` (ties to even by default;
QONNX's Quant rounds `round_mode(clip(x / scale + zero_point))`), and [lo, hi] the range
of `dtype` unless `clip` narrows it. TFLite's QUANTIZE divides in float32 and rounds ties
away from zero (`rounding: "half_away"`, std::round) before adding the zero point. An input marked `"integers": true` takes floats that
hold integers (quantlib/Deeploy graphs) and only casts them. Integer arrays pass through
unchanged: they are taken to be quantized already. An output's float value is
`(q - zero_point) * scale` in float32. Values beyond the type saturate; a value that is no
float32 or lies more than 2^63 steps out (1e308, say) is refused instead.

`refsim run`, `refsim golden` and `refsim compare` read this, for exported and imported
models alike. Files written before it (`metadata["input_quant"]` of exported models,
`metadata["import"]["inputs"/"outputs"]` of imported ones) are read through the same API.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .dtypes import int_type
from .errors import InputError

ROUNDINGS = ("half_even", "half_away", "half_up", "floor", "trunc")


def input_specs(metadata: Mapping[str, Any]) -> dict[str, dict]:
    """Every input's boundary entry (module docstring), from this schema or an older one."""
    if "boundary" in metadata:
        return dict(metadata["boundary"].get("inputs", {}))
    specs = {}
    for name, spec in (metadata.get("input_quant") or {}).items():
        specs[name] = {"dtype": spec.get("dtype"), "scale": spec.get("scale"), "zero_point": spec.get("zero_point", 0),
                       "arithmetic": "float64"}
    for name, spec in (metadata.get("import") or {}).get("inputs", {}).items():
        if "holds" in spec:
            specs[name] = {"dtype": spec["holds"], "integers": True}
        else:
            specs[name] = {k: v for k, v in spec.items() if k != "onnx_dtype"}
    return specs


def output_specs(metadata: Mapping[str, Any]) -> dict[str, dict]:
    if "boundary" in metadata:
        return dict(metadata["boundary"].get("outputs", {}))
    return dict((metadata.get("import") or {}).get("outputs", {}))


def _expand(spec: dict, shape: tuple, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point broadcasting against a tensor of `shape`."""
    scale = np.asarray(spec["scale"], dtype)
    zero = np.asarray(spec.get("zero_point", 0), np.int64)
    if scale.size == 1:
        return scale.reshape(()), zero.reshape(())
    axis = spec["axis"]
    rank = len(shape)
    if "block_size" in spec:
        scale_shape = spec["scale_shape"]
        scale = np.repeat(scale.reshape(scale_shape), spec["block_size"], axis=axis)
        zero = np.repeat(np.broadcast_to(zero, scale_shape) if zero.size == 1 else zero.reshape(scale_shape),
                         spec["block_size"], axis=axis)
        index = [slice(None)] * rank
        index[axis] = slice(0, shape[axis])
        return scale[tuple(index)], zero[tuple(index)]
    view = [1] * rank
    view[axis % rank] = scale.size
    return scale.reshape(view), (zero.reshape(view) if zero.size > 1 else zero.reshape(()))


def quantize_array(x: np.ndarray, spec: dict, name: str = "input") -> np.ndarray:
    """One float array onto the integer grid `spec` describes (module docstring)."""
    try:
        t = int_type(spec["dtype"])
    except KeyError:
        raise InputError(f"the boundary entry of input {name!r} has no dtype") from None
    x = np.asarray(x)
    finite = np.isfinite(x)
    if not finite.all():
        raise InputError(f"float input {name!r} holds NaN or infinite values (first at index {_first(~finite)})")
    lo, hi = spec.get("clip") or (t.lo, t.hi)
    if spec.get("integers"):
        if np.any(x != np.round(x)):
            raise InputError(f"float input {name!r} must hold integers (the model's {t.name} values)")
        _refuse_wild(name, x, ~(np.abs(x) < 2.0**63), t)
        return np.clip(x, lo, hi).astype(t.storage)
    wide = spec.get("arithmetic") == "float64"
    try:
        scale, zero = _expand(spec, x.shape, np.float64 if wide else np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"input {name!r}: the model's boundary entry is malformed ({e})") from None
    if np.any(~(scale > 0)):
        raise InputError(f"input {name!r}: quantization scales must be positive")
    # Values beyond the type saturate, as QuantizeLinear does; but one that is no float32
    # (the arithmetic ONNX and TFLite quantize in) or whose level is not even an int64
    # (1e308, say) is refused, not saturated, and leaks no NumPy overflow warning.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        levels = np.abs(x.astype(np.float64) / np.asarray(scale, np.float64))
    wild = ~(levels < 2.0**63) if wide else ~((np.abs(x) <= np.finfo(np.float32).max) & (levels < 2.0**63))
    _refuse_wild(name, x, wild, t)
    rounding = spec.get("rounding", "half_even")
    if wide:
        q = np.rint(x.astype(np.float64) / scale) + zero
    elif rounding == "half_even":  # ONNX QuantizeLinear: float32 division, ties to even, then the zero point
        q = np.rint(x.astype(np.float32) / scale).astype(np.float64) + zero
    elif rounding == "half_away":  # TFLite QUANTIZE: float32 division, ties away from zero (std::round)
        r = (x.astype(np.float32) / scale).astype(np.float64)
        q = np.trunc(r) + np.where(np.abs(r - np.trunc(r)) >= 0.5, np.sign(r), 0) + zero
    elif rounding in ROUNDINGS:  # QONNX Quant: round_mode(clip(x / scale + zeropt))
        rounder = {"floor": np.floor, "trunc": np.trunc, "half_up": lambda v: np.floor(v + 0.5)}[rounding]
        q = rounder(np.clip(x.astype(np.float32) / scale + zero.astype(np.float32), lo, hi)).astype(np.float64)
    else:
        raise InputError(f"input {name!r}: unknown rounding {rounding!r} in the model's boundary")
    return np.clip(q, lo, hi).astype(t.storage)


def _first(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)] if mask.ndim else []


def _refuse_wild(name: str, x: np.ndarray, wild: np.ndarray, t) -> None:
    if wild.any():
        index = _first(wild)
        raise InputError(f"float input {name!r}: value {float(x[tuple(index)]):g} at index {index} is far outside the "
                         f"{t.name} range [{t.lo}, {t.hi}] it is quantized into (no float32, or more than 2^63 steps)")


def quantize_feeds(model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with every float array quantized by the model's boundary; others unchanged."""
    specs = input_specs(model.metadata)
    out = {}
    for name, value in feeds.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and name in specs:
            spec = specs[name]
            if "dtype" not in spec and name in model.graph.tensors:  # older imported files: the input's own type
                spec = {**spec, "dtype": model.graph.tensors[name].dtype.name}
            out[name] = quantize_array(array, spec, name)
        else:
            out[name] = array
    return out


def output_spec(model, tensor: str) -> dict | None:
    """How output tensor `tensor` reads as floats: its boundary entry when it has a scale,
    else the scale and zero point its graph tensor carries; None when neither is known."""
    for spec in output_specs(model.metadata).values():
        if spec.get("tensor") == tensor and spec.get("scale") is not None:
            return spec
    t = model.graph.tensors.get(tensor)
    if t is None or t.scale is None:
        return None
    zero = 0 if t.zero_point is None else t.zero_point
    return {"tensor": tensor, "scale": t.scale, "zero_point": zero,
            **({"axis": t.quant_axis} if t.quant_axis is not None else {})}


def dequantize_outputs(model, outputs: Mapping[str, np.ndarray], every: bool = False) -> dict[str, np.ndarray]:
    """Outputs as float32 (q - zero_point) * scale, keyed by the source model's output names.
    Without `every`, only outputs the source graph itself dequantized (an imported QDQ
    graph's DequantizeLinear); others are returned as they are."""
    by_tensor = {spec["tensor"]: (name, spec) for name, spec in output_specs(model.metadata).items() if "tensor" in spec}
    result = {}
    for tensor, value in outputs.items():
        name, spec = by_tensor.get(tensor, (tensor, None))
        if spec is None or spec.get("scale") is None or not (every or spec.get("dequantize")):
            result[name] = value
            continue
        result[name] = _dequantize(value, spec)
    return result


def dequantize_tensors(model, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """refsim's own view (`Model.dequantize_outputs`, `refsim run --float`): every tensor
    whose scale is known (`output_spec`) as float32, keyed as `Model.run` returns them."""
    result = {}
    for tensor, value in outputs.items():
        spec = output_spec(model, tensor) if tensor in model.graph.tensors else None
        result[tensor] = value if spec is None else _dequantize(value, spec)
    return result


def _dequantize(value, spec: dict) -> np.ndarray:
    scale, zero = _expand(spec, np.shape(value))
    return ((np.asarray(value).astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)
