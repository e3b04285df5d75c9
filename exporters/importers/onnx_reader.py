"""Reading quantized ONNX graphs: tensors, attributes, shapes, and constant folding.

Everything the importers share about ONNX itself lives here, so that each importer only
says how its format's ops map onto refsim ops. Quantized graphs carry a little float and
shape arithmetic around their integer core (Shape -> Gather -> Concat -> Reshape chains,
Constant nodes, position-id ranges); with static input shapes all of it folds to constants,
which `fold` computes with onnx's own reference evaluator, so each ONNX op means exactly
what the ONNX specification says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..dyadic import ExportError


class ImportFailure(ExportError):
    """An ONNX model cannot be imported: the message names the node, the op and why."""


def node_label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    domain = f"{node.domain}." if node.domain and node.domain != "ai.onnx" else ""
    return f"node {name!r} ({domain}{node.op_type})"


def fail(node: onnx.NodeProto | None, why: str) -> ImportFailure:
    return ImportFailure(f"{node_label(node)}: {why}" if node is not None else why)


# ONNX element types that are integers, and the refsim type each becomes.
INTEGER_TYPES = {
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT16: "int16",
    TensorProto.UINT16: "uint16",
    TensorProto.INT32: "int32",
    TensorProto.UINT32: "uint32",
    TensorProto.INT64: "int64",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.BOOL: "uint8",
}
for _name, _refsim in (("INT2", "int2"), ("UINT2", "uint2")):
    if hasattr(TensorProto, _name):
        INTEGER_TYPES[getattr(TensorProto, _name)] = _refsim
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def to_numpy(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer or constant as NumPy; sub-byte integers unpacked into int8/uint8."""
    array = numpy_helper.to_array(tensor)
    if tensor.data_type in INTEGER_TYPES:
        storage = np.uint8 if INTEGER_TYPES[tensor.data_type].startswith("uint") else np.int8
        if tensor.data_type == TensorProto.BOOL:
            return array.astype(np.uint8)
        if array.dtype.itemsize == 1 and array.dtype not in (np.int8, np.uint8):  # ml_dtypes int4/int2
            return array.astype(storage)
    return np.asarray(array)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, onnx.TensorProto):
            value = to_numpy(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8", "replace") for v in value]
        out[a.name] = value
    return out


def load(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    path = os.fspath(source)
    with open(path, "rb") as f:  # OSError (missing file, ...) reaches the CLI as is
        data = f.read()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ImportFailure(f"{path}: not an ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ImportFailure(f"{path}: the ONNX graph is empty")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as e:
            raise ImportFailure(f"{path}: cannot read external tensor data: {e}") from None
    return model


@dataclass
class GraphInput:
    name: str
    elem_type: int
    shape: tuple  # ints, and strings for symbolic dimensions

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


@dataclass
class OnnxGraph:
    """One ONNX graph, read once: constants, inputs with shapes, nodes in order."""

    model: onnx.ModelProto
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[GraphInput] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)  # ONNX type of every constant

    @classmethod
    def read(cls, source, shapes: dict[str, Iterable[int]] | None = None,
             constants: dict[str, Any] | None = None) -> "OnnxGraph":
        """Read a model; `constants` binds graph inputs to fixed values (arrays or TensorProtos)."""
        model = load(source)
        g = cls(model)
        g.opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        for t in model.graph.initializer:
            g.constants[t.name] = to_numpy(t)
            g.elem_types[t.name] = t.data_type
        declared = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
        for name, value in (constants or {}).items():
            if name not in declared:
                raise ImportFailure(f"constant {name!r} is not an input of the model")
            g.constants[name] = to_numpy(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
            g.elem_types[name] = declared[name]
        for t in model.graph.sparse_initializer:
            raise ImportFailure(f"sparse initializer {t.values.name!r} is not supported")
        shapes = dict(shapes or {})
        for vi in model.graph.input:
            if vi.name in g.constants:
                continue  # an initializer listed as an input (old exporters): a constant
            tt = vi.type.tensor_type
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
            )
            if vi.name in shapes:
                given = tuple(int(d) for d in shapes.pop(vi.name))
                if len(given) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, given)):
                    raise ImportFailure(f"input {vi.name!r}: shape {list(given)} does not fit its declared shape {list(dims)}")
                dims = given
            g.inputs.append(GraphInput(vi.name, tt.elem_type, dims))
        if shapes:
            raise ImportFailure(f"--shape names {sorted(shapes)}, which are not inputs of the model")
        g.outputs = [o.name for o in model.graph.output]
        return g

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)


def _gather_elements(node, values):
    # onnx's reference builds this on np.choose, which takes at most 64 choices.
    data, indices = values[0], values[1].astype(np.int64)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    return [np.take_along_axis(data, indices, axis=axis)]


# Ops whose reference implementation cannot take every valid input: the same ONNX semantics
# in NumPy.
_NUMPY_FOLDS = {"GatherElements": _gather_elements}


def fold(node: onnx.NodeProto, values: list[np.ndarray | None], opsets: dict[str, int]) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with onnx's reference implementation."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type in _NUMPY_FOLDS and node.domain in ("", "ai.onnx"):
        return _NUMPY_FOLDS[node.op_type](node, values)

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, values) if n]
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.UNDEFINED, None) for i in range(len(node.output))]
    single = helper.make_node(node.op_type, names, [o.name for o in outputs], domain=node.domain)
    single.attribute.extend(node.attribute)
    graph = helper.make_graph([single], "fold", inputs, outputs)
    opset_imports = [helper.make_opsetid("" if d == "ai.onnx" else d, v) for d, v in opsets.items()]
    model = helper.make_model(graph, opset_imports=opset_imports)
    try:
        results = ReferenceEvaluator(model).run(None, {n: v for n, v in zip(names, values) if n})
    except Exception as e:
        raise fail(node, f"cannot evaluate on constant inputs: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [np.asarray(r) for r in results]
