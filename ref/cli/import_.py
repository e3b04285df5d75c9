"""`refsim import MODEL.onnx|MODEL.tflite -o OUT.intq`: bring an already-quantized model into refsim."""

from __future__ import annotations

import sys


def _shape(text: str):
    name, _, dims = text.partition("=")
    if not name or not dims:
        raise ValueError(text)
    return name, [int(d) for d in dims.replace("x", ",").split(",") if d]


def add_arguments(p) -> None:
    p.add_argument("model", help="quantized ONNX model (QDQ/QOperator, QONNX, or quantlib/Deeploy integer graph) "
                                 "or int8/int16x8 TFLite flatbuffer (.tflite)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.intq", help="where to write the integer model")
    p.add_argument("--from", dest="fmt", choices=("qdq", "qonnx", "deeploy", "tflite"),
                   help="the model's format (detected from its ops when omitted)")
    p.add_argument("--requant", choices=("dyadic", "ort"), default="dyadic",
                   help="QDQ requantization: dyadic (integer multiplier and shift, what integer hardware runs; "
                        "default) or ort (onnxruntime's float32 arithmetic, replayed exactly in integers)")
    p.add_argument("--mode", choices=("ibert", "deeploy"), default="ibert",
                   help="integer variants for float Softmax/LayerNormalization between QDQ pairs: ibert "
                        "(IBertSoftmax, IBertLayerNorm; default) or deeploy (ITAMax, iLayerNorm)")
    p.add_argument("--reference", choices=("tflm", "litert"), default="tflm",
                   help="TFLite: whose reference kernels to reproduce: tflm (TensorFlow Lite Micro, what MCUs run; "
                        "default) or litert (LiteRT's BUILTIN_REF kernels)")
    p.add_argument("--float-ops", choices=("integer", "ort"), default="integer",
                   help="what stands for ops onnxruntime computes in float32 (Softmax, LayerNormalization, "
                        "QLinearAdd/QLinearMul): integer variants (default, what hardware runs) or ort "
                        "(onnxruntime's float32 kernels replayed in integers)")
    p.add_argument("--shape", action="append", default=[], metavar="INPUT=D1,D2,...",
                   help="static shape for an input with symbolic dimensions (repeatable)")
    p.add_argument("--input-type", action="append", default=[], metavar="INPUT=TYPE",
                   help="integer type a float input of a quantlib/Deeploy graph holds (default int8; repeatable)")


def main(args) -> int:
    from refsim.errors import RefsimError
    from refsim.exporters.importers import import_model
    from refsim.exporters.importers.tflite_reader import is_tflite

    if args.fmt == "tflite" or (args.fmt is None and is_tflite(args.model)):
        from refsim.exporters.importers.tflite import import_tflite

        model = import_tflite(args.model, args.output, reference=args.reference)
        ops = sorted({n.op for n in model.graph.nodes})
        print(f"imported {args.model} (tflite, {args.reference} reference kernels) -> {args.output}: "
              f"{len(model.graph.nodes)} nodes ({', '.join(ops)})")
        return 0

    shapes = {}
    for text in args.shape:
        try:
            name, dims = _shape(text)
        except ValueError:
            raise RefsimError(f"--shape {text!r}: write it as INPUT=D1,D2,...") from None
        shapes[name] = dims
    input_types = {}
    for text in args.input_type:
        name, _, dtype = text.partition("=")
        if not name or not dtype:
            raise RefsimError(f"--input-type {text!r}: write it as INPUT=TYPE, for example x=uint8")
        input_types[name] = dtype
    model = import_model(args.model, args.output, fmt=args.fmt, requant=args.requant, shapes=shapes,
                         input_types=input_types, mode=args.mode, float_ops=args.float_ops)
    info = model.metadata.get("import")
    ops = sorted({n.op for n in model.graph.nodes})
    how = f"{info['format']}, requant {info['requant']}" if info else "a refsim graph written by `refsim convert`"
    print(f"imported {args.model} ({how}) -> {args.output}: {len(model.graph.nodes)} nodes ({', '.join(ops)})")
    for note in (info or {}).get("notes", []):
        print(f"refsim: note: {note}", file=sys.stderr)
    return 0
