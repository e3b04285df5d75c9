"""A refsim graph as an ONNX file, for viewers such as Netron, and back again exactly.

`to_onnx(graph)` writes a valid ONNX model (onnx.checker passes):

- every refsim node is a node of domain `refsim` (op type, inputs, outputs and name kept;
  an omitted input is ONNX's empty name); its attributes are ONNX attributes where ONNX
  has the type (bools as ints), and all of them exactly as JSON in `_refsim_attrs`;
- every constant is an initializer of its declared type: INT8 ... INT64, UINT8 ... UINT32,
  and ONNX's own packed INT4 / UINT4 / INT2 / UINT2 (ternary is stored as INT2, which holds
  {-1, 0, 1}); graph inputs, outputs and intermediate tensors get typed value_info, with
  symbolic dimensions as dim_param;
- scales and zero points are tensor annotations (`graph.quantization_annotation`, with
  SCALE_TENSOR / ZERO_POINT_TENSOR initializers named `<tensor>::scale`, `::zero_point`);
- the graph's name, metadata and blobs, and every tensor's declared type, shape and
  quantization, travel as JSON in the model's metadata_props (`refsim.graph`,
  `refsim.blob.<name>` base64), so `from_onnx` rebuilds the graph bit for bit.

`from_onnx(model)` is that inverse (`refsim import` calls it for a `refsim`-domain model).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from .dtypes import int_type, pack, unpack
from .errors import RefsimError
from .ir import Graph, Node, Tensor

DOMAIN = "refsim"
FORMAT = "refsim.onnx"
VERSION = 1
ATTRS = "_refsim_attrs"
DEFAULT_OPSET = 21

# ONNX element type of each refsim type (onnx.TensorProto values, looked up by name).
_ONNX_TYPE = {
    "int2": "INT2", "uint2": "UINT2", "ternary": "INT2", "int4": "INT4", "uint4": "UINT4",
    "int8": "INT8", "uint8": "UINT8", "int16": "INT16", "uint16": "UINT16",
    "int32": "INT32", "uint32": "UINT32", "int64": "INT64",
}


class OnnxFormError(RefsimError):
    """An ONNX file that is not a refsim graph written by `to_onnx`."""


def _elem_type(dtype_name: str) -> int:
    import onnx

    return getattr(onnx.TensorProto, _ONNX_TYPE[dtype_name])


def _value_info(t: Tensor):
    import onnx

    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return onnx.helper.make_tensor_value_info(t.name, _elem_type(t.dtype.name), dims)


def _onnx_attribute(name: str, value):
    """ONNX attribute for `value` where ONNX has the type; None otherwise (JSON keeps it)."""
    import onnx

    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, (int, float, str)):
        return onnx.helper.make_attribute(name, value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, bool) for v in value):
        return onnx.helper.make_attribute(name, [int(v) for v in value])
    if isinstance(value, (list, tuple)) and value and len({type(v) for v in value}) == 1 \
            and isinstance(value[0], (int, float, str)):
        return onnx.helper.make_attribute(name, list(value))
    return None


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in an ONNX metadata record")


def _json(value) -> str:
    return json.dumps(value, allow_nan=False, default=_json_default)  # key order is part of the graph


def _tensor_record(t: Tensor) -> dict[str, Any]:
    rec: dict[str, Any] = {"dtype": t.dtype.name, "shape": list(t.shape)}
    for key in ("scale", "zero_point", "quant_axis"):
        value = getattr(t, key)
        if value is not None:
            rec[key] = np.asarray(value).tolist() if isinstance(value, np.ndarray) else value
    return rec


def to_onnx(graph: Graph, opset: int = DEFAULT_OPSET):
    """The ONNX ModelProto of `graph` (see the module docstring)."""
    import onnx
    from onnx import helper

    initializers, annotations = [], []
    for t in graph.tensors.values():
        if t.is_const:
            data = np.asarray(t.data)
            proto = onnx.TensorProto()
            proto.name, proto.data_type = t.name, _elem_type(t.dtype.name)
            proto.dims.extend(int(d) for d in data.shape)
            proto.raw_data = pack(data, t.dtype)
            initializers.append(proto)
        if t.scale is not None:
            params = [("SCALE_TENSOR", f"{t.name}::scale")]
            initializers.append(onnx.numpy_helper.from_array(np.asarray(t.scale, np.float64), f"{t.name}::scale"))
            if t.zero_point is not None:
                params.append(("ZERO_POINT_TENSOR", f"{t.name}::zero_point"))
                initializers.append(onnx.numpy_helper.from_array(np.asarray(t.zero_point, np.int64), f"{t.name}::zero_point"))
            annotation = onnx.TensorAnnotation(tensor_name=t.name)
            for key, value in params:
                annotation.quant_parameter_tensor_names.add(key=key, value=value)
            annotations.append(annotation)
    nodes = []
    for node in graph.nodes:
        proto = helper.make_node(node.op, list(node.inputs), list(node.outputs), name=node.name, domain=DOMAIN)
        for key, value in node.attrs.items():
            attribute = _onnx_attribute(key, value)
            if attribute is not None:
                proto.attribute.append(attribute)
        proto.attribute.append(helper.make_attribute(ATTRS, _json(node.attrs)))
        nodes.append(proto)
    io_names = set(graph.inputs) | set(graph.outputs)
    value_info = [_value_info(t) for t in graph.tensors.values() if not t.is_const and t.name not in io_names]
    g = helper.make_graph(
        nodes, graph.name or "refsim",
        [_value_info(graph.tensors[n]) for n in graph.inputs],
        [_value_info(graph.tensors[n]) for n in graph.outputs],
        initializer=initializers, value_info=value_info,
    )
    g.quantization_annotation.extend(annotations)
    model = helper.make_model(
        g, producer_name="refsim",
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, VERSION)],
    )
    record = {
        "format": FORMAT, "version": VERSION, "name": graph.name, "inputs": list(graph.inputs),
        "outputs": list(graph.outputs), "metadata": graph.metadata,
        "tensors": {name: _tensor_record(t) for name, t in graph.tensors.items()},
    }
    props = {"refsim.graph": _json(record)}
    for name, blob in graph.blobs.items():
        props[f"refsim.blob.{name}"] = base64.b64encode(bytes(blob)).decode("ascii")
    helper.set_model_props(model, props)
    return model


def is_refsim_onnx(model) -> bool:
    return any(p.key == "refsim.graph" for p in model.metadata_props) or \
        any(n.domain == DOMAIN for n in model.graph.node)


def from_onnx(model, where: str = "model") -> Graph:
    """The refsim graph an ONNX model written by `to_onnx` holds, exactly."""
    props = {p.key: p.value for p in model.metadata_props}
    if "refsim.graph" not in props:
        raise OnnxFormError(f"{where}: has refsim-domain nodes but no refsim.graph record; only files written by "
                            "`refsim convert` can be read back")
    try:
        record = json.loads(props["refsim.graph"])
    except ValueError as e:
        raise OnnxFormError(f"{where}: refsim.graph is not JSON: {e}") from None
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise OnnxFormError(f"{where}: refsim.graph is format {record.get('format')!r} version {record.get('version')!r}, "
                            f"this refsim reads {FORMAT} version {VERSION}")
    initializers = {t.name: t for t in model.graph.initializer}
    tensors: dict[str, Tensor] = {}
    for name, rec in record["tensors"].items():
        t = Tensor(name, int_type(rec["dtype"]), tuple(rec["shape"]))
        for key in ("scale", "zero_point", "quant_axis"):
            if key in rec:
                setattr(t, key, rec[key])
        proto = initializers.get(name)
        if proto is not None:
            count = int(np.prod(proto.dims)) if len(proto.dims) else 1
            if proto.data_type != _elem_type(t.dtype.name):
                raise OnnxFormError(f"{where}: initializer {name!r} has ONNX type {proto.data_type}, "
                                    f"not the {t.dtype.name} its record declares")
            t.data = np.array(unpack(proto.raw_data, t.dtype, count)).reshape(tuple(proto.dims))
        tensors[name] = t
    nodes = []
    for proto in model.graph.node:
        if proto.domain != DOMAIN:
            raise OnnxFormError(f"{where}: node {proto.name!r} ({proto.op_type}) is not of domain {DOMAIN!r}")
        attrs_json = next((a.s.decode() for a in proto.attribute if a.name == ATTRS), None)
        if attrs_json is None:
            raise OnnxFormError(f"{where}: node {proto.name!r} lacks its {ATTRS} attribute")
        nodes.append(Node(proto.op_type, list(proto.input), list(proto.output), json.loads(attrs_json), proto.name))
    blobs = {key[len("refsim.blob."):]: base64.b64decode(value) for key, value in props.items()
             if key.startswith("refsim.blob.")}
    return Graph(record["name"], list(record["inputs"]), list(record["outputs"]), tensors, nodes,
                 dict(record["metadata"]), blobs)
