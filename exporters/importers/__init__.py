"""Importing models that are already quantized: QDQ/QOperator ONNX, QONNX, quantlib/Deeploy.

    from refsim.exporters.importers import import_model
    model = import_model("model_qdq.onnx", "model.intq", requant="ort")

`import_model` reads the graph with the front end it shares with `refsim export`
(`exporters.frontend`: loader, constant folding, shapes, emitter, requantization planner),
detects the format (or takes `fmt`), maps every node onto refsim's integer ops and returns
the runnable `refsim.Model` (saving it when given a path). The model's
metadata["boundary"] records how float inputs are quantized and float outputs dequantized
(`refsim.boundary`, the schema exported models use too); `quantize_inputs` and
`dequantize_outputs` apply those conversions on the host, with ONNX's
QuantizeLinear/DequantizeLinear formulas (float work that stays out of the integer engine).
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import onnx
from refsim.boundary import dequantize_outputs as _dequantize_outputs
from refsim.boundary import quantize_feeds
from refsim.engine import Model
from refsim.onnx_form import from_onnx, is_refsim_onnx

from ..dyadic import ExportError
from ..frontend.emitter import Emitter
from ..frontend.graph import Graph, load
from ..frontend.passes import import_graph
from .base import ImportFailure
from .values import FLOAT_OPS_CHOICES, REQUANT_CHOICES

FORMATS = ("qdq", "qonnx", "deeploy")

QONNX_OPS = {"Quant", "IntQuant", "BipolarQuant", "Trunc", "FloatQuant", "MultiThreshold"}
QONNX_DOMAINS = {"qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas"}
DEEPLOY_OPS = {"RequantShift", "ITAMax", "ITAPartialMax", "iSoftmax", "iGELU", "RequantizediGELU",
               "iLayerNorm", "iNoNorm", "IntegerMean", "IntegerDiv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger",
           "ConvInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid",
           "QLinearLeakyRelu", "QLinearConcat", "DynamicQuantizeLinear"}


def detect_format(model: onnx.ModelProto | Graph) -> str:
    """qonnx, deeploy or qdq, from the ops the graph uses."""
    if isinstance(model, Graph):
        ops, domains = {n.op for n in model.nodes}, {n.domain for n in model.nodes}
    else:
        ops, domains = {n.op_type for n in model.graph.node}, {n.domain for n in model.graph.node}
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
    try:
        return _import(source, output, fmt, requant, shapes, constants, input_types, mode, name, float_ops)
    except ImportFailure:
        raise
    except ExportError as e:  # the front end's errors, reported as the importer's
        raise ImportFailure(str(e)) from None


def _import(source, output, fmt, requant, shapes, constants, input_types, mode, name, float_ops) -> Model:
    proto = load(source)
    if is_refsim_onnx(proto):  # written by `refsim convert`: the graph itself, exactly
        where = "model" if isinstance(source, onnx.ModelProto) else os.fspath(source)
        model = Model(from_onnx(proto, where))
        if output is not None:
            model.save(output)
        return model
    fmt = fmt or detect_format(proto)
    if fmt not in FORMATS:
        raise ImportFailure(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "qdq":
        from .qdq import QdqImporter as importer_class
    elif fmt == "qonnx":
        from .qonnx import QonnxImporter as importer_class
    else:
        from .deeploy import DeeployImporter as importer_class
    graph = import_graph(proto, shapes, dict(constants or {}), keep=importer_class.keeps, specs=importer_class.specs)
    if name is None:
        name = graph.name or (os.path.splitext(os.path.basename(os.fspath(source)))[0]
                              if not isinstance(source, onnx.ModelProto) else "imported")
    emitter = Emitter(name, max_declared_bytes=graph.budget.limit)
    if fmt == "deeploy":
        importer = importer_class(graph, emitter, dict(input_types or {}), requant=requant)
    else:
        importer = importer_class(graph, emitter, mode, requant=requant, float_ops=float_ops)
    ir = importer.run()
    model = Model(ir)
    if output is not None:
        model.save(output)
    return model


def quantize_inputs(model: Model, feeds: Mapping[str, object]) -> dict:
    """Float feeds quantized as the ONNX graph's QuantizeLinear would: saturate(rne(x / scale) + zp)
    (`refsim.boundary.quantize_feeds`)."""
    return quantize_feeds(model, feeds)


def dequantize_outputs(model: Model, outputs: Mapping[str, object]) -> dict:
    """Outputs the ONNX graph dequantized, as float32 (q - zero_point) * scale; others as they are."""
    return _dequantize_outputs(model, outputs)


__all__ = ["FORMATS", "ImportFailure", "detect_format", "import_model", "quantize_inputs", "dequantize_outputs"]
