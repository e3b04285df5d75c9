"""What the front end checks before it trusts an ONNX model (export and import alike).

- `check_names`: protobuf hands back a string field that is not UTF-8 as bytes;
- `NodeChecker`: every node's arity and attributes against its op's schema before anything
  reads the node: onnx's own (`onnx.checker.check_node` at the model's opset) for the ops
  onnx defines, an importer's `OpSpec` for its custom ops (QONNX, quantlib/Deeploy); ops
  neither knows are left to the importer, which says it does not support them;
- `SizeBudget` and `output_bytes`: sizes that attributes and shape-like constants drive
  (Pad's pads, Expand's shape, Range's limits, Resize's scales, ConstantOfShape) are known
  before anything is allocated. Folding asks onnx's shape inference for the size of each
  result and takes it from a budget of 256 MiB plus 16 times the model's size; a fold whose
  size inference cannot tell is refused unless the op never outgrows its inputs. The
  tensors an emitted integer graph declares share the same limit (`Emitter`), so a model
  under 1 MB can make neither the import nor a run of what it imported allocate more than
  about half a gigabyte each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..dyadic import ExportError


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def label(node: onnx.NodeProto) -> str:
    """How a message names an ONNX node (as `Node.describe` does)."""
    name = node.name or (node.output[0] if node.output else "?")
    domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    op = f"{domain}{node.op_type}"
    return f"node {name!r} ({op if op.isprintable() else repr(op)})"


def check_names(model: onnx.ModelProto) -> None:
    """Refuse string fields protobuf returned as bytes (they were not UTF-8)."""
    graph = model.graph
    texts = [("an opset domain", o.domain) for o in model.opset_import]
    texts += [("a tensor name", t.name) for t in [*graph.initializer, *graph.input, *graph.output, *graph.value_info]]
    for n in graph.node:
        texts += [("an op type", n.op_type), ("a domain", n.domain), ("a node name", n.name)]
        texts += [("a tensor name", name) for name in [*n.input, *n.output]]
        texts += [("an attribute name", a.name) for a in n.attribute]
    for what, text in texts:
        if not isinstance(text, str):
            raise ExportError(f"{what} in the model is not UTF-8 text: {bytes(text)[:40]!r}")


# --- schemas --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """What a custom-domain op takes, where onnx has no schema.

    inputs: the input counts allowed; attrs: name -> kind, where "int", "ints" and "string"
    are ONNX attribute types and "integer" also accepts an integral FLOAT or one-element
    TENSOR (as onnx-graphsurgeon writes them); required: groups of alternative names, one
    of each needed. Attributes the spec does not name are not checked.
    """

    inputs: tuple[int, ...]
    outputs: tuple[int, ...] = (1,)
    attrs: dict = field(default_factory=dict)
    required: tuple = ()


_ATTR_TYPES = {"int": onnx.AttributeProto.INT, "string": onnx.AttributeProto.STRING, "ints": onnx.AttributeProto.INTS}


class NodeChecker:
    def __init__(self, model: onnx.ModelProto, specs: dict | None = None):
        from onnx import checker

        self._checker = checker
        self.specs = dict(specs or {})
        self.ctx = checker.C.CheckerContext()
        self.ctx.ir_version = model.ir_version or onnx.IR_VERSION
        self.ctx.opset_imports = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        self.scope = checker.C.LexicalScopeContext()

    def check(self, node: onnx.NodeProto) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        spec = self.specs.get((domain, node.op_type))
        if spec is not None:
            return _check_spec(node, spec)
        if not onnx.defs.has(node.op_type, domain):
            return
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"{label(node)}: control flow (subgraphs) is not supported")
        try:
            self._checker.check_node(node, self.ctx, self.scope)
        except self._checker.ValidationError as e:
            raise ExportError(f"{label(node)}: does not match ONNX's definition of {node.op_type}: {first_line(e)}") from None


def _check_spec(node: onnx.NodeProto, spec: OpSpec) -> None:
    count = len(node.input)
    if count not in spec.inputs:
        raise ExportError(f"{label(node)}: takes {' or '.join(map(str, spec.inputs))} inputs, got {count}")
    if len(node.output) not in spec.outputs:
        raise ExportError(f"{label(node)}: produces {' or '.join(map(str, spec.outputs))} outputs, got {len(node.output)}")
    present = {a.name: a for a in node.attribute}
    for names in spec.required:
        if not any(n in present for n in names):
            raise ExportError(f"{label(node)}: attribute {names[0]!r} is missing")
    for name, kind in spec.attrs.items():
        a = present.get(name)
        if a is None:
            continue
        if kind in _ATTR_TYPES:
            if a.type != _ATTR_TYPES[kind]:
                raise ExportError(f"{label(node)}: attribute {name!r} must be {kind.upper()}, "
                                  f"got {onnx.AttributeProto.AttributeType.Name(a.type)}")
        elif _integral(a) is None:
            raise ExportError(f"{label(node)}: attribute {name!r} must hold one integer")


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


# --- sizes -----------------------------------------------------------------------------------------


class SizeBudget:
    """Bytes that folding may still take, beyond the model itself (module docstring)."""

    BASE = 256 << 20
    PER_MODEL_BYTE = 16

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    @classmethod
    def for_model(cls, model_bytes: int) -> SizeBudget:
        return cls(cls.BASE + cls.PER_MODEL_BYTE * model_bytes)

    def take(self, nbytes: int, where: str, what: str = "its result") -> None:
        if self.used + nbytes > self.limit:
            raise ExportError(f"{where}: {what} would take {_bytes(nbytes)}, beyond what this model may allocate "
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
        count *= max(int(d), 0)
    return count * itemsize


# Ops whose results never hold more than their inputs: folding them needs no size check when
# shape inference cannot tell their output's size.
NO_LARGER_THAN_INPUTS = {
    "Constant", "Shape", "Size", "Identity", "Cast", "CastLike", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Flatten",
    "Transpose", "Concat", "Split", "ArgMax", "ArgMin", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
    "ReduceProd", "Neg", "Abs", "Relu", "Sign", "Floor", "Ceil", "Round", "Not", "Sqrt", "Reciprocal", "Exp", "Log",
    "QuantizeLinear", "DequantizeLinear", "NonZero", "Unique",
}
_SHAPE_LIKE = 64  # constant inputs this small go to shape inference by value (pads, shapes, scales)


def output_bytes(single: onnx.NodeProto, values, opsets: dict[str, int]) -> list[int | None]:
    """Each output's size in bytes for `single` (a node whose inputs are in0, in1, ...) on
    `values`, where onnx's shape inference can tell it, else None; [] if it cannot run."""
    inputs, inits = [], []
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            elem = helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
        except Exception:  # an object array or another dtype ONNX has no type for
            return []
        inputs.append(helper.make_tensor_value_info(f"in{i}", elem, np.shape(v)))
        if np.size(v) <= _SHAPE_LIKE:
            inits.append(numpy_helper.from_array(np.asarray(v), f"in{i}"))
    outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in single.output]
    graph = helper.make_graph([single], "size", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # inference gives up on some nodes
        return []
    sizes: list[int | None] = []
    for out in inferred.graph.output:
        tt = out.type.tensor_type
        if not tt.HasField("shape") or not all(d.HasField("dim_value") for d in tt.shape.dim):
            sizes.append(None)
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize if tt.elem_type else 8
        except Exception:
            itemsize = 8
        sizes.append(array_bytes([d.dim_value for d in tt.shape.dim], max(itemsize, 1)))
    return sizes


def take_fold(budget: SizeBudget | None, where: str, op: str, single: onnx.NodeProto, values, opsets) -> None:
    """Take a fold's result sizes from `budget` before it is evaluated (module docstring)."""
    if budget is None:
        return
    sizes = output_bytes(single, values, opsets)
    if (not sizes or None in sizes) and op not in NO_LARGER_THAN_INPUTS:
        raise ExportError(f"{where}: onnx's shape inference cannot tell the size of its result from its inputs; "
                          f"refusing to evaluate it (are the inputs of the types and shapes ONNX requires?)")
    for nbytes in sizes:
        budget.take(nbytes or 0, where)
