"""One ONNX graph type for export and import: nodes with Python attributes, constants, shapes.

`load(path)` reads a model file (external data next to it included) with one-line errors;
`Graph.from_model(model)` turns a ModelProto into a `Graph`: initializers and `Constant`
nodes become `consts`, local functions are inlined, every node keeps its attributes as
Python values (tensors as NumPy arrays) and the module path it came from (`scope`).
`Graph.to_model()` writes the graph back as a runnable ONNX model, so onnxruntime and
onnx's shape inference work on every stage of a rewrite.

Shapes (`Graph.shapes`, filled by `frontend.shapes.infer_shapes`) are tuples whose entries
are ints, symbolic dimensions as strings (`"batch"`, `"batch*4"`, or a symbol the model
declares and nobody bound), or None when nothing is known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..dyadic import ExportError
from .checks import NodeChecker, SizeBudget, check_names, first_line, label

STANDARD_DOMAINS = ("", "ai.onnx")

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
SUB_BYTE_TYPES = {t for t, name in INTEGER_TYPES.items() if name in ("int4", "uint4", "int2", "uint2")}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type)


def elem_to_numpy(elem: int) -> np.dtype:
    """The NumPy dtype an ONNX element type is held in (sub-byte integers: int8/uint8)."""
    if elem in SUB_BYTE_TYPES:
        return np.dtype(np.uint8 if INTEGER_TYPES[elem].startswith("uint") else np.int8)
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):  # UNDEFINED (0), or a number no ONNX type has
        raise ExportError(f"element type {elem} is not a type refsim can take") from None


_NOT_NUMBERS = {TensorProto.UNDEFINED, TensorProto.STRING, TensorProto.COMPLEX64, TensorProto.COMPLEX128}


def to_numpy(tensor: onnx.TensorProto, what: str | None = None) -> np.ndarray:
    """An initializer or attribute tensor as NumPy; sub-byte integers unpacked into int8/uint8.

    A tensor whose data does not match its declared type and dims (a byte short, bad
    raw_data, a non-numeric or unknown type) is a one-line error naming `what`."""
    what = what or f"tensor {tensor.name!r}"
    if tensor.data_type in _NOT_NUMBERS or tensor.data_type not in TensorProto.DataType.values():
        known = tensor.data_type in TensorProto.DataType.values()
        raise ExportError(f"{what}: element type {type_name(tensor.data_type) if known else tensor.data_type} is not a number type")
    if any(d < 0 for d in tensor.dims):
        raise ExportError(f"{what}: negative dimension in {list(tensor.dims)}")
    try:
        array = numpy_helper.to_array(tensor)
    except (ValueError, TypeError, OverflowError, MemoryError, IndexError) as e:  # what numpy_helper raises for such data
        raise ExportError(f"{what}: its data does not match type {type_name(tensor.data_type)} and dims "
                          f"{list(tensor.dims)} ({first_line(e)})") from None
    if tensor.data_type in SUB_BYTE_TYPES:
        return np.asarray(array).astype(elem_to_numpy(tensor.data_type))
    return np.asarray(array)


def attr_value(attr: onnx.AttributeProto, where: str = "a node"):
    try:
        value = helper.get_attribute_value(attr)
    except ValueError as e:  # an attribute whose type field is unset or unknown
        raise ExportError(f"{where}: attribute {attr.name!r}: {first_line(e)}") from None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return to_numpy(value, f"{where}: attribute {attr.name!r}")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


@dataclass
class Node:
    """One ONNX node with its attributes as Python values (arrays for tensors)."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    scope: str = ""  # the module path the node came from, e.g. "bert.encoder.layer.0.output.dense"
    domain: str = ""

    def describe(self) -> str:
        domain = f"{self.domain}." if self.domain not in STANDARD_DOMAINS else ""
        op = f"{domain}{self.op}"
        return f"node {self.name or (self.outputs[0] if self.outputs else '?')!r} ({op if op.isprintable() else repr(op)})"

    @property
    def standard(self) -> bool:
        return self.domain in STANDARD_DOMAINS


def node_scope(node: onnx.NodeProto) -> str:
    """The module path a node came from: from the dynamo exporter's metadata, or from
    the TorchScript exporter's node name (`/bert/encoder/layer.0/output/dense/MatMul`)."""
    for prop in node.metadata_props:
        if prop.key == "namespace" and prop.value:
            # ": Cls/bert: Cls/bert.encoder: Cls/.../linear: aten.linear.default"
            entries = [part.split(": ", 1)[0] for part in prop.value.split("/")]
            modules = [e for e in entries[:-1] if e]
            return modules[-1] if modules else ""
    if node.name.startswith("/"):
        parts = [p for p in node.name.split("/")[1:-1] if p]
        return ".".join(parts)
    return ""


def load(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read an ONNX file (external data next to it is loaded too), with one-line errors."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ExportError(f"{path}: is a directory, not an ONNX file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise ExportError(f"{path}: the ONNX graph is empty")
    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except Exception as e:
            raise ExportError(f"{path}: cannot read external tensor data: {str(e).splitlines()[0]}") from None
    return model


def _dims(vi: onnx.ValueInfoProto) -> tuple | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)


class Graph:
    """An ONNX graph: nodes, constants, inputs and outputs with types, shapes, and edits.

    `consts` holds every constant tensor (initializers, Constant nodes, folded results);
    `const_types` the ONNX element type of a constant whose NumPy dtype does not say it
    (sub-byte integers). Names in `batch_rows` are constants holding one row (axis 0 of
    size 1) that stands for every sample of a free batch.
    """

    def __init__(self, name: str = "graph", opsets: dict[str, int] | None = None):
        self.name = name
        self.opsets: dict[str, int] = dict(opsets or {"": 20})
        self.producer = ""
        self.nodes: list[Node] = []
        self.consts: dict[str, np.ndarray] = {}
        self.const_types: dict[str, int] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.input_types: dict[str, tuple[int, tuple]] = {}  # ONNX elem type, declared shape
        self.output_types: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.batch_rows: set[str] = set()
        self.bindings: dict[str, int] = {}  # symbolic input dimensions and the sizes they were given
        # Batch-dependent values (object arrays of ints and shapes.Sym) of tensors the graph
        # still computes (frontend.fold).
        self.symbolic: dict[str, np.ndarray] = {}
        # Set by the export passes: integer mask inputs and the canonical mask expressions
        # (tensor name -> the mask input it stands for).
        self.mask_inputs: set[str] = set()
        self.key_padding_masks: dict[str, str] = {}
        self.token_masks: dict[str, str] = {}
        self.token_counts: dict[str, str] = {}
        # What folding may allocate (frontend.checks; set by from_model from the model's size).
        self.budget: SizeBudget | None = None
        self._counter = 0

    @property
    def opset(self) -> int:
        return self.opsets.get("", 20)

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: onnx.ModelProto, specs: dict | None = None) -> Graph:
        """The graph of `model`, every node checked first against its op's schema (onnx's,
        or `specs`: an importer's custom ops, see `frontend.checks`)."""
        check_names(model)
        if model.functions:
            from onnx import inliner

            model = inliner.inline_local_functions(model)
        checker = NodeChecker(model, specs)
        for proto in model.graph.node:
            checker.check(proto)
        opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        g = cls(model.graph.name, opsets)
        g.producer = f"{model.producer_name} {model.producer_version}".strip()
        for t in model.graph.initializer:
            g.consts[t.name] = to_numpy(t, f"initializer {t.name!r}")
            if t.data_type in SUB_BYTE_TYPES:
                g.const_types[t.name] = t.data_type
        for t in model.graph.sparse_initializer:
            raise ExportError(f"sparse initializer {t.values.name!r} is not supported")
        for proto in model.graph.node:
            for attr in proto.attribute:
                if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise ExportError(f"node {proto.name!r} ({proto.op_type}): control flow (subgraphs) is not supported")
            attrs = {a.name: attr_value(a, label(proto)) for a in proto.attribute}
            domain = "" if proto.domain == "ai.onnx" else proto.domain
            if proto.op_type == "Constant" and domain == "" and len(attrs) == 1 and "value" in attrs:
                g.consts[proto.output[0]] = attrs["value"]
                tensor = next(a.t for a in proto.attribute if a.name == "value")
                if tensor.data_type in SUB_BYTE_TYPES:
                    g.const_types[proto.output[0]] = tensor.data_type
                continue
            g.nodes.append(Node(proto.op_type, list(proto.input), list(proto.output), attrs, proto.name,
                                node_scope(proto), domain))
        for n, node in enumerate(g.nodes):
            if not node.name:
                node.name = f"{node.op}_{n}"
        for vi in model.graph.input:
            if vi.name in g.consts:
                continue  # an initializer listed as an input (old exporters): a constant
            elem = vi.type.tensor_type.elem_type
            if elem in _NOT_NUMBERS or elem not in TensorProto.DataType.values():
                raise ExportError(f"input {vi.name!r} has element type {elem}, which refsim cannot take")
            g.inputs.append(vi.name)
            g.input_types[vi.name] = (vi.type.tensor_type.elem_type, _dims(vi) or ())
        for o in model.graph.output:
            g.outputs.append(o.name)
            g.output_types[o.name] = o.type.tensor_type.elem_type or TensorProto.FLOAT
        g.budget = SizeBudget.for_model(sum(a.nbytes for a in g.consts.values()) + model.ByteSize())
        return g

    def bind_constants(self, values: dict[str, Any]) -> None:
        """Graph inputs that are really fixed (scales fed as inputs): constants from now on."""
        for name, value in values.items():
            if name not in self.input_types:
                raise ExportError(f"constant {name!r} is not an input of the model")
            array = to_numpy(value, f"constant {name!r}") if isinstance(value, onnx.TensorProto) else np.asarray(value)
            elem = self.input_types[name][0]
            self.consts[name] = array
            if elem in SUB_BYTE_TYPES:
                self.const_types[name] = elem
            self.inputs.remove(name)
            del self.input_types[name]

    # --- queries -------------------------------------------------------------------------

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str) -> np.ndarray:
        return self.consts[name]

    def scalar(self, name: str) -> float | None:
        """The value of a one-element constant, else None."""
        if name in self.consts and self.consts[name].size == 1:
            return float(self.consts[name].reshape(()))
        return None

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def producer(self, name: str) -> Node | None:
        for n in self.nodes:
            if name in n.outputs:
                return n
        return None

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def consumer_map(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def single_user(self, name: str, users=None) -> Node | None:
        """The one node reading `name` (which is no graph output), else None."""
        users = self.consumer_map() if users is None else users
        found = users.get(name, [])
        if len(found) == 1 and name not in self.outputs:
            return found[0]
        return None

    def shape(self, name: str) -> tuple:
        if name in self.shapes:
            return self.shapes[name]
        if name in self.consts:
            return tuple(self.consts[name].shape)
        raise ExportError(f"internal: the shape of tensor {name!r} is unknown")

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def concrete_shape(self, name: str, batch: int = 1) -> tuple[int, ...]:
        """The shape with the batch dimension set to `batch` (see frontend.shapes)."""
        from .shapes import concrete, free_batch

        try:
            return concrete(self.shape(name), batch, name)
        except ExportError:
            sized = self.data_sized(name)
            if sized is None:
                raise
            # at a free batch a mask the same for every sample (X-MOD's default language) folds once the batch is
            # fixed; one computed from the input data (Longformer's global attention) never does
            todo = ("export the model with a fixed batch size (no dynamic axes)" if free_batch(self) else
                    "the mask behind it is computed from the input data, and refsim's integer graphs have fixed sizes; "
                    "please report this model")
            raise ExportError(f"{sized.describe()}: the size of {name!r} depends on the data ({sized.op}: boolean-mask "
                              f"indexing), which refsim takes only where it folds to a constant; {todo}") from None

    def data_sized(self, name: str) -> Node | None:
        """The NonZero (or Unique) that `name`'s size comes from, when one is among its producers."""
        producers, seen, todo = self.producers(), set(), [name]
        while todo:
            node = producers.get(todo.pop())
            if node is None or node.name in seen:
                continue
            if node.op in ("NonZero", "Unique"):
                return node
            seen.add(node.name)
            todo.extend(node.inputs)
        return None

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of a tensor, when known."""
        if name in self.const_types:
            return self.const_types[name]
        if name in self.consts:
            return helper.np_dtype_to_tensor_dtype(self.consts[name].dtype)
        if name in self.input_types:
            return self.input_types[name][0]
        if name in self.dtypes:
            return helper.np_dtype_to_tensor_dtype(self.dtypes[name])
        return None

    # --- edits ---------------------------------------------------------------------------

    def fresh(self, stem: str) -> str:
        while True:
            self._counter += 1
            name = f"{stem}__{self._counter}"
            if name not in self.consts and name not in self.shapes and all(name not in n.outputs for n in self.nodes):
                return name

    def add_const(self, value, stem: str = "const") -> str:
        name = self.fresh(stem)
        self.consts[name] = np.asarray(value)
        return name

    def make_node(self, op: str, inputs: list[str], stem: str, scope: str = "", **attrs) -> Node:
        out = self.fresh(stem)
        return Node(op, list(inputs), [out], attrs, self.fresh(f"{stem}.{op}"), scope)

    def replace_uses(self, old: str, new: str) -> None:
        for n in self.nodes:
            n.inputs = [new if i == old else i for i in n.inputs]
        self.outputs = [new if o == old else o for o in self.outputs]

    def bypass(self, node: Node, replacement: str) -> None:
        """Remove `node`, routing its (single) output's users to `replacement`."""
        out = node.outputs[0]
        self.nodes.remove(node)
        self.replace_uses(out, replacement)
        if out in self.shapes and replacement not in self.shapes:
            self.shapes[replacement] = self.shapes[out]

    def prune(self) -> None:
        """Drop nodes and constants that no graph output depends on."""
        needed = set(self.outputs)
        producers = self.producers()
        stack = list(self.outputs)
        while stack:
            name = stack.pop()
            node = producers.get(name)
            if node is None:
                continue
            for i in node.inputs:
                if i and i not in needed:
                    needed.add(i)
                    stack.append(i)
        self.nodes = [n for n in self.nodes if any(o in needed for o in n.outputs)]
        used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
        self.consts = {k: v for k, v in self.consts.items() if k in used}
        self.const_types = {k: v for k, v in self.const_types.items() if k in self.consts}
        self.batch_rows &= set(self.consts)

    def toposort(self) -> None:
        available = set(self.inputs) | set(self.consts) | {""}
        pending, ordered = list(self.nodes), []
        while pending:
            remaining = []
            for n in pending:
                if all(i in available for i in n.inputs):
                    ordered.append(n)
                    available.update(n.outputs)
                else:
                    remaining.append(n)
            if len(remaining) == len(pending):
                missing = next(i for i in remaining[0].inputs if i not in available)
                raise ExportError(f"{remaining[0].describe()}: input {missing!r} is never computed")
            pending = remaining
        self.nodes = ordered

    # --- back to ONNX ----------------------------------------------------------------------

    def to_model(self, extra_outputs: Iterable[str] = (), large_consts_as_inputs: int | None = None) -> onnx.ModelProto:
        """The graph as an ONNX model. A one-row constant standing for the whole batch is
        repeated per sample explicitly where an op does not broadcast. With
        `large_consts_as_inputs=N` (for shape inference), constants of more than N elements
        become typed inputs without data, and one-row constants inputs shaped (batch, ...)."""
        nodes = []
        inits = []
        extra_inputs = []
        users = self.consumer_map()
        expanded: dict[tuple[str, str], str] = {}
        for n in self.nodes:
            inputs = list(n.inputs)
            if n.op not in BROADCASTING_OPS and large_consts_as_inputs is None:
                for k, name in enumerate(inputs):
                    if name in self.batch_rows:
                        ref = next((i for i in n.inputs if i and i not in self.consts), None)
                        if ref is None:
                            continue
                        key = (name, ref)
                        if key not in expanded:
                            expanded[key] = f"{name}__per_sample_{len(expanded)}"
                            rest = self.consts[name].shape[1:]
                            nodes.append(helper.make_node("Shape", [ref], [expanded[key] + ".b"], start=0, end=1))
                            inits.append(numpy_helper.from_array(np.array(rest, np.int64), expanded[key] + ".rest"))
                            nodes.append(helper.make_node("Concat", [expanded[key] + ".b", expanded[key] + ".rest"],
                                                          [expanded[key] + ".shape"], axis=0))
                            nodes.append(helper.make_node("Expand", [name, expanded[key] + ".shape"], [expanded[key]]))
                        inputs[k] = expanded[key]
            attrs = {key: numpy_helper.from_array(np.asarray(value)) if isinstance(value, np.ndarray) else value
                     for key, value in n.attrs.items()}
            nodes.append(helper.make_node(n.op, inputs, n.outputs, name=n.name, domain=n.domain or None, **attrs))
        for name, value in self.consts.items():
            if name not in users and name not in self.outputs:
                continue
            value = np.asarray(value)
            elem = self.const_types.get(name)
            if large_consts_as_inputs is not None and name in self.batch_rows:
                extra_inputs.append(helper.make_tensor_value_info(
                    name, elem or helper.np_dtype_to_tensor_dtype(value.dtype), ["batch", *value.shape[1:]]))
            elif large_consts_as_inputs is not None and value.size > large_consts_as_inputs:
                extra_inputs.append(helper.make_tensor_value_info(
                    name, elem or helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
            elif elem is not None:
                inits.append(helper.make_tensor(name, elem, list(value.shape), value.reshape(-1).tolist()))
            else:
                inits.append(numpy_helper.from_array(value, name))
        inputs = []
        for name in self.inputs:
            elem, declared = self.input_types[name]
            shape = self.shapes.get(name, declared)
            inputs.append(helper.make_tensor_value_info(name, elem, [d if isinstance(d, (int, str)) else None for d in shape]))
        outputs = [helper.make_tensor_value_info(o, self.output_types.get(o) or self._elem_or_float(o), None)
                   for o in self.outputs]
        for name in extra_outputs:
            if name not in self.outputs:
                info = onnx.ValueInfoProto()
                info.name = name
                outputs.append(info)
        graph = helper.make_graph(nodes, self.name or "graph", inputs + extra_inputs, outputs, inits)
        opset_imports = [helper.make_opsetid(d, v) for d, v in self.opsets.items()]
        model = helper.make_model(graph, opset_imports=opset_imports)
        model.ir_version = min(model.ir_version, 10)
        return model

    def _elem_or_float(self, name: str) -> int:
        elem = self.elem_type(name)
        return elem if elem else TensorProto.FLOAT


BROADCASTING_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Equal", "And", "Or", "Xor", "Less",
                    "Greater", "LessOrEqual", "GreaterOrEqual", "Pow", "Expand")
