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
from .values import FLOAT_OPS_CHOICES, REQUANT_CHOICES, Emitter

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


def _refsim_form(source):
    """The refsim graph of an ONNX file written by `refsim convert`, else None."""
    from refsim.onnx_form import from_onnx, is_refsim_onnx

    where = "model" if isinstance(source, onnx.ModelProto) else os.fspath(source)
    try:
        proto = source if isinstance(source, onnx.ModelProto) else onnx.load(os.fspath(source), load_external_data=False)
    except Exception:  # unreadable files are reported by the ONNX reader with its own message
        return None
    return from_onnx(proto, where) if is_refsim_onnx(proto) else None


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
    float_ops: str = "integer",
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
    IBertLayerNorm; "deeploy": ITAMax and iLayerNorm). float_ops: "integer" (those integer
    variants, what hardware runs) or "ort" (Softmax, LayerNormalization, QLinearAdd/QLinearMul
    replay onnxruntime's float32 CPU kernels: "does refsim reproduce my onnxruntime model").
    """
    if float_ops not in FLOAT_OPS_CHOICES:
        raise ImportFailure(f"unknown float ops {float_ops!r}; choose from {', '.join(FLOAT_OPS_CHOICES)}")
    if requant not in REQUANT_CHOICES:
        raise ImportFailure(f"unknown requantization {requant!r}; choose from {', '.join(REQUANT_CHOICES)}")
    refsim_graph = _refsim_form(source)
    if refsim_graph is not None:  # written by `refsim convert`: the graph itself, exactly
        model = Model(refsim_graph)
        if output is not None:
            model.save(output)
        return model
    graph = OnnxGraph.read(source, shapes, dict(constants or {}))
    fmt = fmt or detect_format(graph.model)
    if fmt not in FORMATS:
        raise ImportFailure(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if name is None:
        name = graph.model.graph.name or (os.path.splitext(os.path.basename(os.fspath(source)))[0]
                                          if not isinstance(source, onnx.ModelProto) else "imported")
    emitter = Emitter(name, requant=requant, float_ops=float_ops, max_tensor_bytes=graph.budget.limit)
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


def quantize_inputs(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float feeds quantized as the ONNX graph's QuantizeLinear would: saturate(rne(x / scale) + zp)."""
    return model.quantize_inputs(dict(feeds))


def dequantize_outputs(model: Model, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs the ONNX graph dequantized, as float32 (q - zero_point) * scale, keyed by the
    ONNX output name; the others as they are."""
    specs = model.metadata.get("import", {}).get("outputs", {})
    names = {spec["tensor"]: name for name, spec in specs.items()}
    floats = model.dequantize_outputs(dict(outputs))
    return {names.get(tensor, tensor): value for tensor, value in floats.items()}


__all__ = ["FORMATS", "ImportFailure", "detect_format", "import_model", "quantize_inputs", "dequantize_outputs"]
