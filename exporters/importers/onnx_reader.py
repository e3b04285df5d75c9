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
    op = f"{domain}{node.op_type}"
    return f"node {name!r} ({op if op.isprintable() else repr(op)})"


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


_NOT_NUMBERS = {TensorProto.UNDEFINED, TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128}


def to_numpy(tensor: onnx.TensorProto, what: str | None = None) -> np.ndarray:
    """An initializer or constant as NumPy; sub-byte integers unpacked into int8/uint8.

    A tensor whose data does not match its declared type and dims (a byte short, bad
    raw_data, an unknown or non-numeric type) is an ImportFailure naming `what`."""
    what = what or f"tensor {tensor.name!r}"
    if tensor.data_type in _NOT_NUMBERS or tensor.data_type not in TensorProto.DataType.values():
        name = TensorProto.DataType.Name(tensor.data_type) if tensor.data_type in TensorProto.DataType.values() else tensor.data_type
        raise ImportFailure(f"{what}: element type {name} is not a number type")
    if any(d < 0 for d in tensor.dims):
        raise ImportFailure(f"{what}: negative dimension in {list(tensor.dims)}")
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, OverflowError, MemoryError, IndexError) as e:  # what numpy_helper raises for such data
        raise ImportFailure(f"{what}: its data does not match type {type_name(tensor.data_type)} and dims "
                            f"{list(tensor.dims)} ({_first_line(e)})") from None
    if tensor.data_type in INTEGER_TYPES:
        storage = np.uint8 if INTEGER_TYPES[tensor.data_type].startswith("uint") else np.int8
        if tensor.data_type == TensorProto.BOOL:
            return array.astype(np.uint8)
        if array.dtype.itemsize == 1 and array.dtype not in (np.int8, np.uint8):  # ml_dtypes int4/int2
            return array.astype(storage)
    return np.asarray(array)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        try:
            value = helper.get_attribute_value(a)
        except ValueError as e:  # an attribute whose type field is unset or unknown
            raise fail(node, f"attribute {a.name!r}: {_first_line(e)}") from None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, onnx.TensorProto):
            value = to_numpy(value, f"{node_label(node)}: attribute {a.name!r}")
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


def _check_names(model: onnx.ModelProto) -> None:
    """protobuf hands back a string field that is not UTF-8 as bytes: refuse those."""
    graph = model.graph
    texts = [("an opset domain", o.domain) for o in model.opset_import]
    texts += [("a tensor name", t.name) for t in [*graph.initializer, *graph.input, *graph.output, *graph.value_info]]
    for n in graph.node:
        texts += [("an op type", n.op_type), ("a domain", n.domain), ("a node name", n.name)]
        texts += [("a tensor name", name) for name in [*n.input, *n.output]]
        texts += [("an attribute name", a.name) for a in n.attribute]
    for what, text in texts:
        if not isinstance(text, str):
            raise ImportFailure(f"{what} in the model is not UTF-8 text: {bytes(text)[:40]!r}")


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
    budget: "SizeBudget | None" = None  # what folding may allocate (set by read)
    _checker: Any = None

    @classmethod
    def read(cls, source, shapes: dict[str, Iterable[int]] | None = None,
             constants: dict[str, Any] | None = None) -> "OnnxGraph":
        """Read a model; `constants` binds graph inputs to fixed values (arrays or TensorProtos)."""
        model = load(source)
        _check_names(model)
        g = cls(model)
        g.opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        for t in model.graph.initializer:
            g.constants[t.name] = to_numpy(t, f"initializer {t.name!r}")
            g.elem_types[t.name] = t.data_type
        declared = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
        for name, value in (constants or {}).items():
            if name not in declared:
                raise ImportFailure(f"constant {name!r} is not an input of the model")
            g.constants[name] = to_numpy(value, f"constant {name!r}") if isinstance(value, onnx.TensorProto) else np.asarray(value)
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
        g.budget = SizeBudget.for_model(sum(a.nbytes for a in g.constants.values()) + model.ByteSize())
        return g

    def check_node(self, node: onnx.NodeProto, specs: dict | None = None) -> None:
        """Refuse a node that does not match its op's schema, before anything reads it."""
        if self._checker is None:
            self._checker = NodeChecker(self.model)
        self._checker.check(node, specs or {})

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


def fold(node: onnx.NodeProto, values: list[np.ndarray | None], opsets: dict[str, int],
         budget: "SizeBudget | None" = None) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with onnx's reference implementation.

    With a `budget`, the outputs' sizes are inferred first (onnx shape inference, which
    reads shape-like inputs such as Pad's pads or Expand's shape) and taken from it, so a
    tiny model cannot make this allocate gigabytes."""
    from onnx.reference import ReferenceEvaluator

    if budget is not None:
        sizes = _inferred_output_bytes(node, values, opsets)
        if (not sizes or None in sizes) and node.op_type not in _NO_LARGER_THAN_INPUTS:
            raise fail(node, "onnx's shape inference cannot tell the size of its result from its inputs; "
                             "refusing to evaluate it (are the inputs of the types and shapes ONNX requires?)")
        for nbytes in sizes:
            budget.take(nbytes or 0, node)
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


# --- bounds: what a model may make refsim allocate ---------------------------------------------


class SizeBudget:
    """Bytes that folding and import-time constants may still take, beyond the model itself.

    A model may fold into constants a few times its own size (dequantized weights are four
    times their int8 bytes), plus a fixed allowance. The same limit bounds the tensors the
    imported graph declares (Emitter.max_tensor_bytes), so a model under 1 MB can make
    neither the import nor a run allocate more than about half a gigabyte each."""

    BASE = 256 << 20
    PER_MODEL_BYTE = 16

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @classmethod
    def for_model(cls, model_bytes: int) -> "SizeBudget":
        return cls(cls.BASE + cls.PER_MODEL_BYTE * model_bytes)

    def take(self, nbytes: int, node: onnx.NodeProto | None = None, what: str = "its result") -> None:
        if self.used + nbytes > self.limit:
            raise fail(node, f"{what} would take {_bytes(nbytes)}, beyond what this model may allocate "
                             f"({_bytes(self.limit - self.used)} left of {_bytes(self.limit)})")
        self.used += nbytes


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def array_bytes(shape, itemsize: int = 8) -> int:
    """Bytes of an array of `shape` (exact Python integers: no overflow)."""
    count = 1
    for d in shape:
        count *= int(d)
    return count * itemsize


_SHAPE_LIKE = 64  # constant inputs this small go to shape inference by value (pads, shapes, scales)


# Ops whose results never hold more than their inputs: folding them needs no size check
# when shape inference cannot tell their output's size.
_NO_LARGER_THAN_INPUTS = {
    "Constant", "Shape", "Size", "Identity", "Cast", "CastLike", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Flatten",
    "Transpose", "Concat", "Split", "ArgMax", "ArgMin", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "Neg", "Abs", "Relu", "Sign", "Floor", "Ceil", "Round", "Not", "Sqrt", "Reciprocal", "Exp", "Log",
    "QuantizeLinear", "DequantizeLinear", "NonZero", "Unique",
}


def _inferred_output_bytes(node: onnx.NodeProto, values, opsets) -> list[int | None]:
    """Each output's size in bytes where onnx's shape inference can tell it, else None
    (an empty list if inference could not run at all)."""
    names, inputs, inits = [], [], []
    for i, v in enumerate(values):
        if v is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        try:
            elem = helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
        except Exception:  # an object array or another dtype ONNX has no type for
            return []
        inputs.append(helper.make_tensor_value_info(name, elem, np.shape(v)))
        if np.size(v) <= _SHAPE_LIKE:
            inits.append(numpy_helper.from_array(np.asarray(v), name))
    single = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))], domain=node.domain)
    single.attribute.extend(node.attribute)
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.UNDEFINED, None) for i in range(len(node.output))]
    graph = helper.make_graph([single], "size", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("" if d == "ai.onnx" else d, v)
                                                    for d, v in opsets.items()])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference gives up on some nodes; the evaluator reports those
        return []
    sizes = []
    for out in inferred.graph.output:
        tt = out.type.tensor_type
        dims = tt.shape.dim if tt.HasField("shape") else None
        if dims is None or not all(d.HasField("dim_value") for d in dims):
            sizes.append(None)
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize if tt.elem_type else 8
        sizes.append(array_bytes([d.dim_value for d in dims], max(itemsize, 1)))
    return sizes


# --- schemas: every node checked before a handler reads it --------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """What a custom-domain op (QONNX, quantlib/Deeploy) takes, where onnx has no schema.

    inputs: the input counts allowed; attrs: name -> kind, where "int" and "string" are ONNX
    attribute types and "integer" also accepts an integral FLOAT or one-element TENSOR (as
    onnx-graphsurgeon writes them); required: groups of alternative names, one of each needed.
    """

    inputs: tuple[int, ...]
    outputs: tuple[int, ...] = (1,)
    attrs: dict = field(default_factory=dict)
    required: tuple = ()


_ATTR_TYPES = {"int": onnx.AttributeProto.INT, "string": onnx.AttributeProto.STRING, "ints": onnx.AttributeProto.INTS}


class NodeChecker:
    """Arity and attributes of each node against its schema: onnx's own (`onnx.checker`) for
    the ops onnx defines, an importer's `OpSpec` for its custom ops. Ops neither knows are
    left to the importer, which says it does not support them."""

    def __init__(self, model: onnx.ModelProto):
        from onnx import checker

        self._checker = checker
        self.ctx = checker.C.CheckerContext()
        self.ctx.ir_version = model.ir_version or onnx.IR_VERSION
        self.ctx.opset_imports = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        self.scope = checker.C.LexicalScopeContext()

    def check(self, node: onnx.NodeProto, specs: dict) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        spec = specs.get((domain, node.op_type))
        if spec is not None:
            return _check_spec(node, spec)
        if not onnx.defs.has(node.op_type, domain):
            return
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise fail(node, "control flow (subgraphs) is not supported")
        try:
            self._checker.check_node(node, self.ctx, self.scope)
        except self._checker.ValidationError as e:
            raise fail(node, f"does not match ONNX's definition of {node.op_type}: {_first_line(e)}") from None


def _check_spec(node: onnx.NodeProto, spec: OpSpec) -> None:
    count = len(node.input)
    if count not in spec.inputs:
        raise fail(node, f"takes {' or '.join(map(str, spec.inputs))} inputs, got {count}")
    if len(node.output) not in spec.outputs:
        raise fail(node, f"produces {' or '.join(map(str, spec.outputs))} outputs, got {len(node.output)}")
    present = {a.name: a for a in node.attribute}
    for names in spec.required:
        if not any(n in present for n in names):
            raise fail(node, f"attribute {names[0]!r} is missing")
    for name, kind in spec.attrs.items():
        a = present.get(name)
        if a is None:
            continue
        if kind in _ATTR_TYPES:
            if a.type != _ATTR_TYPES[kind]:
                raise fail(node, f"attribute {name!r} must be {kind.upper()}, got {onnx.AttributeProto.AttributeType.Name(a.type)}")
        elif _integral(a) is None:
            raise fail(node, f"attribute {name!r} must hold one integer")


def _integral(a: onnx.AttributeProto) -> int | None:
    """The integer an INT, FLOAT or one-element TENSOR attribute holds, or None."""
    if a.type == onnx.AttributeProto.INT:
        return a.i
    if a.type == onnx.AttributeProto.FLOAT:
        value = a.f
    elif a.type == onnx.AttributeProto.TENSOR:
        try:
            array = numpy_helper.to_array(a.t)
        except (ValueError, TypeError, OverflowError, MemoryError, IndexError):
            return None
        if array.size != 1 or array.dtype.kind not in "iuf":
            return None
        value = array.reshape(-1)[0].item()
    else:
        return None
    if isinstance(value, float) and not (np.isfinite(value) and value == int(value)):
        return None
    return int(value)


def check_float_model(model: onnx.ModelProto) -> None:
    """What `refsim export` checks before running a float model: every node of onnx's own
    ops against its schema, and every tensor whose size shape inference can tell (with
    static input shapes) against the model's budget, so that the float run it needs for
    folding cannot be asked for gigabytes by a few bytes of attributes."""
    _check_names(model)
    checker = NodeChecker(model)
    for node in model.graph.node:
        checker.check(node, {})
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference gives up on some models; onnxruntime then checks them itself
        return
    budget = SizeBudget.for_model(model.ByteSize())
    producers = {o: n for n in model.graph.node for o in n.output}
    for info in inferred.graph.value_info:
        tt = info.type.tensor_type
        if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim) or not tt.elem_type:
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
        except Exception:
            continue
        budget.take(array_bytes([d.dim_value for d in tt.shape.dim], itemsize), producers.get(info.name),
                    f"tensor {info.name!r}")
