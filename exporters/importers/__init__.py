"""Importing models that are already quantized: QDQ/QOperator ONNX, QONNX, quantlib/Deeploy.

    from refsim.exporters.importers import import_model
    model = import_model("model_qdq.onnx", "model.intq", requant="ort")

`import_model` detects the format (or takes `fmt`), maps every node onto refsim's integer
ops and returns the runnable `refsim.Model` (saving it when given a path). The model's
metadata["import"] records how float inputs are quantized and float outputs dequantized;
`quantize_inputs` and `dequantize_outputs` apply those boundary conversions on the host,
with ONNX's QuantizeLinear/DequantizeLinear formulas (float work that stays out of the
integer engine).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np
import onnx
from refsim.engine import Model

from .onnx_reader import ImportFailure, OnnxGraph
from .values import REQUANT_CHOICES, Emitter

FORMATS = ("qdq", "qonnx", "deeploy")

QONNX_OPS = {"Quant", "IntQuant", "BipolarQuant", "Trunc", "FloatQuant", "MultiThreshold"}
QONNX_DOMAINS = {"qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas"}
DEEPLOY_OPS = {"RequantShift", "ITAMax", "ITAPartialMax", "iSoftmax", "iGELU", "RequantizediGELU",
               "iLayerNorm", "iNoNorm", "IntegerMean", "IntegerDiv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
           "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid",
           "QLinearLeakyRelu", "QLinearConcat"}


def detect_format(model: onnx.ModelProto) -> str:
    """qonnx, deeploy or qdq, from the ops the graph uses."""
    ops = {n.op_type for n in model.graph.node}
    domains = {n.domain for n in model.graph.node}
    if ops & QONNX_OPS or domains & QONNX_DOMAINS:
        return "qonnx"
    if ops & DEEPLOY_OPS:
        return "deeploy"
    if ops & QDQ_OPS:
        return "qdq"
    raise ImportFailure(
        "found no quantization in the model (no QuantizeLinear/DequantizeLinear, QLinear*, "
        "QONNX Quant or quantlib/Deeploy ops); for a float model use `refsim export`"
    )


def import_model(
    source: str | os.PathLike | onnx.ModelProto,
    output: str | os.PathLike | None = None,
    *,
    fmt: str | None = None,
    requant: str = "dyadic",
    shapes: Mapping[str, Iterable[int]] | None = None,
    constants: Mapping[str, object] | None = None,
    input_types: Mapping[str, str] | None = None,
    mode: str = "ibert",
    name: str | None = None,
) -> Model:
    """Import a quantized ONNX model as a refsim Model (saved to `output` when given).

    fmt: "qdq", "qonnx" or "deeploy" (detected when None). requant: "dyadic" (integer
    multiplier and shift, as integer hardware computes) or "ort" (onnxruntime's float32
    requantization, replayed exactly with integers). shapes: static shapes for inputs
    with symbolic dimensions (shape subgraphs fold to constants at import). constants:
    values for graph inputs that are really fixed (scales, zero points, weights fed as
    inputs), which then import as constants. input_types: the integer type each float input
    of a quantlib/Deeploy graph holds (default int8). mode: which integer variants stand
    for float Softmax/LayerNormalization left between QDQ pairs ("ibert": IBertSoftmax and
    IBertLayerNorm; "deeploy": ITAMax and iLayerNorm).
    """
    if requant not in REQUANT_CHOICES:
        raise ImportFailure(f"unknown requantization {requant!r}; choose from {', '.join(REQUANT_CHOICES)}")
    graph = OnnxGraph.read(source, shapes, dict(constants or {}))
    fmt = fmt or detect_format(graph.model)
    if fmt not in FORMATS:
        raise ImportFailure(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if name is None:
        name = graph.model.graph.name or (os.path.splitext(os.path.basename(os.fspath(source)))[0]
                                          if not isinstance(source, onnx.ModelProto) else "imported")
    emitter = Emitter(name, requant=requant, max_tensor_bytes=graph.budget.limit)
    if fmt == "qdq":
        from .qdq import QdqImporter

        importer = QdqImporter(graph, emitter, mode)
    elif fmt == "qonnx":
        from .qonnx import QonnxImporter

        importer = QonnxImporter(graph, emitter, mode)
    else:
        from .deeploy import DeeployImporter

        importer = DeeployImporter(graph, emitter, dict(input_types or {}))
    ir = importer.run()
    model = Model(ir)
    if output is not None:
        model.save(output)
    return model


def _boundary(model: Model, kind: str) -> dict:
    return model.metadata.get("import", {}).get(kind, {})


def _expand_scale(entry: dict, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(entry["scale"], np.float32)
    zero = np.asarray(entry["zero_point"], np.int64)
    if scale.size == 1:
        return scale.reshape(()), zero.reshape(())
    axis = entry["axis"]
    rank = len(shape)
    if "block_size" in entry:
        scale_shape = entry["scale_shape"]
        scale = np.repeat(scale.reshape(scale_shape), entry["block_size"], axis=axis)
        zero = np.repeat(zero.reshape(scale_shape), entry["block_size"], axis=axis)
        index = [slice(None)] * rank
        index[axis] = slice(0, shape[axis])
        return scale[tuple(index)], zero[tuple(index)]
    view = [1] * rank
    view[axis] = scale.size
    return scale.reshape(view), zero.reshape(view)


def quantize_inputs(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float feeds quantized as the ONNX graph's QuantizeLinear would: saturate(rne(x / scale) + zp)."""
    specs = _boundary(model, "inputs")
    out = {}
    for name, value in feeds.items():
        if name not in specs:
            out[name] = value
            continue
        spec = specs[name]
        t = model.graph.tensors[name].dtype
        lo, hi = spec.get("clip", (t.lo, t.hi))
        x = np.asarray(value, np.float32)
        scale, zero = _expand_scale(spec, x.shape)
        rounding = spec.get("rounding", "half_even")
        if rounding == "half_even":  # ONNX QuantizeLinear: float32 division, ties to even, then the zero point
            q = np.rint(x / scale).astype(np.float64) + zero
        else:  # QONNX Quant: round_mode(clip(x / scale + zeropt))
            rounder = {"floor": np.floor, "trunc": np.trunc, "half_up": lambda v: np.floor(v + 0.5)}[rounding]
            q = rounder(np.clip((x / scale + np.float32(0) + zero.astype(np.float32)), lo, hi)).astype(np.float64)
        out[name] = np.clip(q, lo, hi).astype(t.storage)
    return out


def dequantize_outputs(model: Model, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs the ONNX graph dequantized, as float32 (q - zero_point) * scale; others as they are."""
    specs = _boundary(model, "outputs")
    by_tensor = {spec["tensor"]: (name, spec) for name, spec in specs.items()}
    result = {}
    for tensor, value in outputs.items():
        name, spec = by_tensor.get(tensor, (tensor, None))
        if spec is None or not spec.get("dequantize"):
            result[name] = value
            continue
        scale, zero = _expand_scale(spec, np.shape(value))
        result[name] = ((np.asarray(value).astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)
    return result


__all__ = ["FORMATS", "ImportFailure", "detect_format", "import_model", "quantize_inputs", "dequantize_outputs"]
