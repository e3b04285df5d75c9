"""Reading a TFLite flatbuffer (`.tflite`) into plain Python values.

The flatbuffer is parsed with the `tflite` package (the schema's generated Python readers,
`pip install 'refsim[tflite]'`). Only what the importer needs is kept: the main subgraph's
tensors (shape, type, quantization, constant data) and operators (builtin name, inputs,
outputs, options as a dict). Everything wrong with the file is an `ImportFailure` naming
the file, the tensor or the operator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import ImportFailure

# TFLite TensorType -> (name, NumPy dtype of the stored data).
TENSOR_TYPES = {
    0: ("float32", np.float32), 1: ("float16", np.float16), 2: ("int32", np.int32), 3: ("uint8", np.uint8),
    4: ("int64", np.int64), 6: ("bool", np.bool_), 7: ("int16", np.int16), 9: ("int8", np.int8),
    10: ("float64", np.float64), 12: ("uint64", np.uint64), 15: ("uint32", np.uint32), 16: ("uint16", np.uint16),
    17: ("int4", np.int8),
}
OTHER_TYPE_NAMES = {5: "string", 8: "complex64", 11: "complex128", 13: "resource", 14: "variant", 18: "bfloat16"}

FILE_IDENTIFIER = b"TFL3"


def is_tflite(path: str | os.PathLike) -> bool:
    """Whether a file is a TFLite flatbuffer (its identifier, or failing that its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return os.fspath(path).endswith(".tflite")
    return head[4:8] == FILE_IDENTIFIER or os.fspath(path).endswith(".tflite")


@dataclass
class TfliteTensor:
    index: int
    name: str
    type: str  # "int8", "int16", "int32", "float32", ...
    shape: tuple[int, ...]
    data: np.ndarray | None = None  # constant values, already shaped
    scale: np.ndarray | None = None  # float32, one entry or one per channel
    zero_point: np.ndarray | None = None  # int64, as scale
    axis: int = 0  # quantized_dimension

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.scale.size > 0

    @property
    def per_channel(self) -> bool:
        return self.quantized and self.scale.size > 1

    def describe(self) -> str:
        return f"tensor {self.index} {self.name!r}"


@dataclass
class TfliteOperator:
    index: int
    name: str  # builtin operator name, for example "FULLY_CONNECTED"
    inputs: list[int]  # tensor indices, -1 for an omitted optional input
    outputs: list[int]
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"operator {self.index} ({self.name})"


@dataclass
class TfliteModel:
    path: str
    tensors: list[TfliteTensor]
    operators: list[TfliteOperator]
    inputs: list[int]
    outputs: list[int]
    description: str = ""
    subgraph_name: str = ""


def _options(op, opcode_name: str) -> dict[str, Any]:
    """An operator's builtin options as {field: value} (CamelCase accessors -> snake names)."""
    import tflite

    table = op.BuiltinOptions()
    if table is None:
        return {}
    type_index = op.BuiltinOptionsType()
    names = {v: k for k, v in vars(tflite.BuiltinOptions).items() if isinstance(v, int)}
    class_name = names.get(type_index)
    cls = getattr(tflite, class_name, None) if class_name else None
    if cls is None:
        return {}
    options = cls()
    options.Init(table.Bytes, table.Pos)
    values = {}
    for attr in dir(options):
        if attr.startswith("_") or attr in ("Init",) or attr.startswith("GetRootAs") or attr.endswith("BufferHasIdentifier"):
            continue
        if attr.endswith(("AsNumpy", "Length", "IsNone")):
            continue
        method = getattr(options, attr)
        if not callable(method):
            continue
        snake = "".join("_" + c.lower() if c.isupper() else c for c in attr).lstrip("_")
        try:
            if hasattr(options, attr + "AsNumpy"):
                array = getattr(options, attr + "AsNumpy")()
                values[snake] = [] if isinstance(array, int) else [int(v) for v in np.asarray(array).reshape(-1)]
            else:
                values[snake] = method()
        except TypeError:  # accessors taking an index (vectors without AsNumpy)
            continue
    return values


def read_tflite(path: str | os.PathLike) -> TfliteModel:
    """Parse a .tflite file (main subgraph only)."""
    try:
        import tflite
        from tflite.utils import BUILTIN_OPCODE2NAME
    except ImportError:
        raise ImportFailure("reading .tflite files needs the 'tflite' package: pip install 'refsim[tflite]'") from None
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise ImportFailure(f"{where}: cannot read: {e.strerror or e}") from None
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise ImportFailure(f"{where}: not a TFLite flatbuffer (no 'TFL3' file identifier)")
    try:
        return _parse(buf, where, tflite, BUILTIN_OPCODE2NAME)
    except ImportFailure:
        raise
    except Exception as e:  # the generated readers raise plain errors on a truncated or corrupt buffer
        raise ImportFailure(f"{where}: corrupt TFLite flatbuffer ({type(e).__name__}: {e})") from None


def _parse(buf: bytes, where: str, tflite, opcode_names) -> TfliteModel:
    model = tflite.Model.GetRootAsModel(buf, 0)
    if model.SubgraphsLength() < 1:
        raise ImportFailure(f"{where}: the model has no subgraph")
    graph = model.Subgraphs(0)
    buffers = [model.Buffers(i) for i in range(model.BuffersLength())]
    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        name = (t.Name() or b"").decode("utf-8", "replace") or f"tensor_{i}"
        code = t.Type()
        if code not in TENSOR_TYPES:
            kind = OTHER_TYPE_NAMES.get(code, f"type {code}")
            tensors.append(TfliteTensor(i, name, kind, tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()))
            continue
        type_name, np_dtype = TENSOR_TYPES[code]
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        tensor = TfliteTensor(i, name, type_name, shape)
        q = t.Quantization()
        if q is not None and q.ScaleLength():
            tensor.scale = np.asarray(q.ScaleAsNumpy(), np.float32).reshape(-1)
            zp = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(tensor.scale.size, np.int64)
            tensor.zero_point = np.asarray(zp, np.int64).reshape(-1)
            tensor.axis = int(q.QuantizedDimension())
        b = t.Buffer()
        if 0 < b < len(buffers) and buffers[b] is not None:
            raw = _buffer_bytes(buffers[b], buf)
            if raw is not None and len(raw):
                tensor.data = _constant(raw, type_name, np_dtype, shape, f"{where}: {tensor.describe()}")
        tensors.append(tensor)
    operators = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        if code == 32:  # CUSTOM
            name = "CUSTOM:" + (oc.CustomCode() or b"?").decode("utf-8", "replace")
        else:
            name = opcode_names.get(code, f"builtin code {code}")
        inputs = [int(v) for v in op.InputsAsNumpy()] if op.InputsLength() else []
        outputs = [int(v) for v in op.OutputsAsNumpy()] if op.OutputsLength() else []
        for v in inputs + outputs:
            if not -1 <= v < len(tensors):
                raise ImportFailure(f"{where}: operator {i} ({name}) refers to tensor {v}, which does not exist")
        operators.append(TfliteOperator(i, name, inputs, outputs, _options(op, name)))
    ins = [int(v) for v in graph.InputsAsNumpy()] if graph.InputsLength() else []
    outs = [int(v) for v in graph.OutputsAsNumpy()] if graph.OutputsLength() else []
    description = (model.Description() or b"").decode("utf-8", "replace")
    return TfliteModel(where, tensors, operators, ins, outs, description,
                       (graph.Name() or b"").decode("utf-8", "replace"))


def _buffer_bytes(buffer, whole: bytes) -> bytes | None:
    """A buffer's bytes: inline data, or (models over 2 GB) an offset into the file."""
    if buffer.DataLength():
        return buffer.DataAsNumpy().tobytes()
    offset, size = int(buffer.Offset()), int(buffer.Size())
    if offset > 1 and size:
        if offset + size > len(whole):
            raise ImportFailure("a buffer points past the end of the file")
        return whole[offset:offset + size]
    return None


def _constant(raw: bytes, type_name: str, np_dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    if type_name == "int4":  # two values per byte, element 0 in the low nibble
        packed = np.frombuffer(raw, np.uint8)
        nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
        values = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
    else:
        itemsize = np.dtype(np_dtype).itemsize
        if len(raw) != count * itemsize:
            raise ImportFailure(f"{what} holds {len(raw)} bytes, its shape {list(shape)} of {type_name} needs {count * itemsize}")
        values = np.frombuffer(raw, np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    if values.size != count:
        raise ImportFailure(f"{what} holds {values.size} values, its shape {list(shape)} needs {count}")
    return values.reshape(shape)
