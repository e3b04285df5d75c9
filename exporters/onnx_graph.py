"""ONNX graphs as refsim's exporters and importers see them: loaded, folded, canonical.

`canonicalize(model, input_shapes)` turns an ONNX model as `torch.onnx.export` writes it
(the dynamo exporter, or the TorchScript one with LayerNorm and GELU decomposed) into an
`OnnxGraph`: a small graph of data-carrying nodes from a fixed vocabulary, with every shape
computation folded away, every tensor's shape known, and a batch dimension that may vary.
The canonical graph is still plain ONNX (`OnnxGraph.to_model()`), so onnxruntime runs it;
the quantizer and fake-quant model are built from it, and an importer of quantized graphs
can reuse the same folding and pattern helpers.

How folding works: the model is run twice on dummy inputs of batch 1 and batch 2 (other
dimensions fixed by `input_shapes`), exposing every intermediate tensor. A tensor computed
only from initializers and from `Shape` of something is a constant, and its value is what
the run produced. Constants that differ between the two runs depend on the batch size:
Reshape and Expand targets are generalised (the batch entry becomes 0 "copy" or -1 "infer",
or 1 for Expand), and constants that are the same row repeated per sample are kept as one
row that broadcasts. The two runs also give each tensor's shape with its batch dimension
marked `"batch"` (or None where batch is merged with another dimension).

Canonical passes, in order:

- attention masks: a tensor computed only from an integer `*mask*` input is replaced by a
  canonical expression after checking what it computes on a random mask: an additive
  key-padding mask before a Softmax (0 for kept keys, very negative for masked ones), a
  0/1 token mask multiplying hidden states, and a clipped token count (mean pooling);
- `Where(IsNaN(x), 0, x)` after a Softmax, Identity, Dropout: removed;
- decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add) ->
  `LayerNormalization`; decomposed GELU (Div/Mul, Erf, Add, Mul, Mul; or the tanh form)
  -> `Gelu`;
- `Gemm` -> `MatMul` + `Add`; a `Conv` whose stride equals its kernel (a ViT patch
  embedding) -> patch reshapes + `MatMul` + `Add`; `Sub`/`Div` by a constant -> `Add`/`Mul`;
- per-channel `Mul`/`Add` by constants right after a linear layer (MobileBERT's NoNorm
  after a dense layer) folded into the layer's weights and bias; adding zero or
  multiplying by one removed;
- chains of Reshape/Transpose/Squeeze/Unsqueeze/Flatten -> the single Reshape or Transpose
  they amount to (or nothing), and every Squeeze/Unsqueeze/Flatten -> Reshape.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .dyadic import ExportError
from .importers.onnx_reader import check_float_model
from .runtime import FloatRunner

# The op vocabulary of a canonical graph (besides the canonical mask expressions).
CANONICAL_OPS = (
    "Add", "Cast", "Clip", "Concat", "Div", "Expand", "Gather", "Gelu", "LayerNormalization",
    "MatMul", "Mul", "Pad", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Slice", "Softmax",
    "Tanh", "Transpose", "Unsqueeze", "Where",
)

MOVEMENT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")
BATCH = "batch"
MIN_OPSET = 20  # LayerNormalization (17) and Gelu (20) are ONNX ops from here on
MASK_VERY_NEGATIVE = -1000.0  # an additive mask entry at or below this masks the key
FLOAT32_LOWEST = float(np.finfo(np.float32).min)


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
        return f"node {self.name!r} ({self.op})"


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data next to it is loaded too), with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ExportError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    return model


def _attr_value(attr: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


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


# --- the graph -----------------------------------------------------------------------


class OnnxGraph:
    """A folded ONNX graph: nodes, constants, symbolic shapes, and helpers to rewrite it.

    `shapes[name]` is a tuple whose entries are ints, `"batch"`, or None (a dimension that
    merges the batch with something else). `consts` hold every constant tensor; names in
    `batch_rows` are constants holding one row that stands for every sample of the batch.
    """

    def __init__(self, name: str, opset: int):
        self.name = name
        self.opset = opset
        self.nodes: list[Node] = []
        self.consts: dict[str, np.ndarray] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.input_types: dict[str, tuple[int, tuple]] = {}  # ONNX elem type, symbolic shape
        self.output_types: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}
        self.shapes1: dict[str, tuple] = {}  # concrete shapes at batch 1
        self.dtypes: dict[str, np.dtype] = {}
        self.batch_rows: set[str] = set()
        self.mask_inputs: set[str] = set()
        # Canonical mask expressions: tensor name -> the mask input it stands for.
        self.key_padding_masks: dict[str, str] = {}
        self.token_masks: dict[str, str] = {}
        self.token_counts: dict[str, str] = {}
        self._counter = 0

    # --- queries -------------------------------------------------------------------------

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const(self, name: str) -> np.ndarray:
        return self.consts[name]

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

    def rank(self, name: str) -> int:
        return len(self.shapes[name])

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
                raise ExportError(f"{remaining[0].describe()}: its inputs are never computed (cycle?)")
            pending = remaining
        self.nodes = ordered

    # --- back to ONNX ----------------------------------------------------------------------

    def to_model(self, extra_outputs: Iterable[str] = ()) -> onnx.ModelProto:
        """The canonical graph as a runnable ONNX model (batch dimension free)."""
        nodes = []
        inits = []
        users = self.consumer_map()
        expanded: dict[tuple[str, str], str] = {}
        for n in self.nodes:
            inputs = list(n.inputs)
            if n.op not in _BROADCASTING_OPS:
                # A one-row constant for the whole batch: repeat it per sample explicitly.
                for k, name in enumerate(inputs):
                    if name in self.batch_rows:
                        ref = next(i for i in n.inputs if i and i not in self.consts)
                        key = (name, ref)
                        if key not in expanded:
                            expanded[key] = f"{name}__per_sample_{len(expanded)}"
                            rest = self.consts[name].shape[1:]
                            nodes.append(onnx.helper.make_node("Shape", [ref], [expanded[key] + ".b"], start=0, end=1))
                            inits.append(numpy_helper.from_array(np.array(rest, np.int64), expanded[key] + ".rest"))
                            nodes.append(onnx.helper.make_node("Concat", [expanded[key] + ".b", expanded[key] + ".rest"], [expanded[key] + ".shape"], axis=0))
                            nodes.append(onnx.helper.make_node("Expand", [name, expanded[key] + ".shape"], [expanded[key]]))
                        inputs[k] = expanded[key]
            attrs = {}
            for key, value in n.attrs.items():
                attrs[key] = numpy_helper.from_array(np.asarray(value)) if isinstance(value, np.ndarray) else value
            nodes.append(onnx.helper.make_node(n.op, inputs, n.outputs, name=n.name, domain=n.domain or None, **attrs))
        for name, value in self.consts.items():
            if name in users or name in self.outputs:
                inits.append(numpy_helper.from_array(np.asarray(value), name))
        inputs = []
        for name in self.inputs:
            elem, shape = self.input_types[name]
            inputs.append(onnx.helper.make_tensor_value_info(name, elem, [d if isinstance(d, int) else "batch" if d == BATCH else None for d in shape]))
        outputs = [onnx.helper.make_tensor_value_info(o, self.output_types.get(o, onnx.TensorProto.FLOAT), None) for o in self.outputs]
        for name in extra_outputs:
            if name not in self.outputs:
                info = onnx.ValueInfoProto()
                info.name = name
                outputs.append(info)
        graph = onnx.helper.make_graph(nodes, self.name or "canonical", inputs, outputs, inits)
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        model.ir_version = min(model.ir_version, 10)
        return model


_BROADCASTING_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Equal", "And", "Or")


# --- folding --------------------------------------------------------------------------


def _elem_to_numpy(elem: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))


def _dummy_feeds(model: onnx.ModelProto, shapes: dict[str, tuple], mask_inputs: set[str], rng, random: bool):
    """Inputs that every model accepts: index inputs 0/1, masks of ones (or random with the
    first position kept), floats zero (or normal)."""
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = _elem_to_numpy(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if dtype.kind == "f":
            value = rng.standard_normal(shape) if random else np.zeros(shape)
        elif vi.name in mask_inputs:
            value = rng.integers(0, 2, shape) if random else np.ones(shape)
            if random and value.ndim >= 2:
                value[..., 0] = 1
                value[0, ...] = 1
        elif dtype.kind == "b":
            value = np.ones(shape)
        else:
            value = rng.integers(0, 2, shape) if random else np.zeros(shape)
        feeds[vi.name] = value.astype(dtype)
    return feeds


def _is_mask_input(name: str, elem: int) -> bool:
    return "mask" in name.lower() and _elem_to_numpy(elem).kind in "iub"


def _prepare_model(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ExportError("the model imports no standard ONNX opset")
    if opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ExportError(f"cannot convert the model from opset {opset} to {MIN_OPSET}: {e}") from None
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ExportError(f"node {node.name!r} ({node.op_type}): control flow (subgraphs) is not supported")
    check_float_model(model)  # schemas and sizes, before anything runs it
    return model


def _initializer(t: onnx.TensorProto) -> np.ndarray:
    try:
        return numpy_helper.to_array(t)
    except (ValueError, TypeError, OverflowError, MemoryError, IndexError) as e:
        raise ExportError(f"initializer {t.name!r}: its data does not match its type and dims ({e})") from None


def canonicalize(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, check: bool = True) -> OnnxGraph:
    """Fold and canonicalize `model` (see the module docstring).

    `input_shapes` gives each input's shape at batch 1 where the model leaves dimensions
    open (for example {"input_ids": [1, 128]}); dimension 0 of an input whose first
    dimension is symbolic is the batch. With `check`, the canonical graph is run against
    the original on random inputs and must give the same outputs.
    """
    model = _prepare_model(model)
    graph_proto = model.graph
    inits = {t.name: _initializer(t) for t in graph_proto.initializer}
    input_infos = [vi for vi in graph_proto.input if vi.name not in inits]
    shapes1, shapes2, batched = {}, {}, False
    for vi in input_infos:
        dims = vi.type.tensor_type.shape.dim
        given = list((input_shapes or {}).get(vi.name, []))
        shape = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif axis == 0:
                shape.append(1)
            elif axis < len(given) and given[axis]:
                shape.append(int(given[axis]))
            else:
                label = d.dim_param or "?"
                raise ExportError(
                    f"input {vi.name!r} has an open dimension {axis} ({label!r}); give its size "
                    f"(for text models: --max-length)"
                )
        if given and len(given) == len(shape):
            shape = [shape[0]] + [int(g) for g in given[1:]]
        shapes1[vi.name] = tuple(shape)
        first = dims[0] if dims else None
        free_batch = first is not None and not (first.HasField("dim_value") and first.dim_value > 0)
        batched = batched or free_batch
        shapes2[vi.name] = ((2,) + tuple(shape[1:])) if free_batch else tuple(shape)
    mask_inputs = {vi.name for vi in input_infos if _is_mask_input(vi.name, vi.type.tensor_type.elem_type)}

    rng = np.random.default_rng(0)
    feeds1 = _dummy_feeds(model, shapes1, mask_inputs, rng, random=False)
    feeds2 = _dummy_feeds(model, shapes2, mask_inputs, rng, random=True)
    runner = FloatRunner(model, expose_all=True)
    run1 = {**inits, **feeds1, **runner.run(feeds1)}
    run2 = {**inits, **feeds2, **runner.run(feeds2)} if batched else run1

    g = OnnxGraph(graph_proto.name, max(MIN_OPSET, next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))))
    g.mask_inputs = mask_inputs
    const_names = set(inits)
    for proto in graph_proto.node:
        attrs = {a.name: _attr_value(a) for a in proto.attribute}
        node = Node(proto.op_type, list(proto.input), list(proto.output), attrs, proto.name, node_scope(proto), proto.domain)
        if proto.domain not in ("", "ai.onnx"):
            raise ExportError(f"{node.describe()}: custom domain {proto.domain!r} is not supported")
        constant = proto.op_type in ("Constant", "Shape", "Size") or all(i in const_names or not i for i in proto.input)
        if proto.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"):
            constant = False
        if constant:
            const_names.update(o for o in proto.output if o)
        else:
            g.nodes.append(node)
    for n, node in enumerate(g.nodes):
        if not node.name:
            node.name = f"{node.op}_{n}"
    g.inputs = [vi.name for vi in input_infos]
    g.outputs = [o.name for o in graph_proto.output]
    for vi in input_infos:
        g.input_types[vi.name] = (vi.type.tensor_type.elem_type, ())
    for o in graph_proto.output:
        g.output_types[o.name] = o.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    used = {i for n in g.nodes for i in n.inputs if i} | set(g.outputs)
    for name in const_names & used:
        g.consts[name] = np.asarray(run1[name])
    _record_shapes(g, run1, run2, batched)
    for vi in input_infos:
        g.input_types[vi.name] = (vi.type.tensor_type.elem_type, g.shapes[vi.name])

    _canonical_masks(g, run2, feeds2)
    g.prune()
    _generalize_batch_constants(g, run1, run2)
    _remove_identities(g)
    _fuse_layernorm(g)
    _fuse_gelu(g)
    _gemm_to_matmul(g)
    _conv_patches(g)
    _constant_arithmetic(g)
    _fold_affine_into_linear(g)
    g.toposort()
    refresh_shapes(g, feeds1, feeds2 if batched else None)
    _drop_neutral(g)
    _compress_movement(g)
    g.prune()
    g.toposort()
    refresh_shapes(g, feeds1, feeds2 if batched else None)
    if check:
        _check_same_outputs(g, run2, feeds2)
    return g


def _record_shapes(g: OnnxGraph, run1: dict, run2: dict, batched: bool) -> None:
    g.shapes.clear()
    g.shapes1.clear()
    for name, v1 in run1.items():
        v1 = np.asarray(v1)
        v2 = np.asarray(run2.get(name, v1))
        g.shapes1[name] = tuple(v1.shape)
        g.dtypes[name] = v1.dtype
        g.shapes[name] = symbolic_shape(v1.shape, v2.shape) if batched else tuple(v1.shape)


def symbolic_shape(s1: Iterable[int], s2: Iterable[int]) -> tuple:
    """A shape seen at batch 1 and batch 2: entries that change are the batch (1 -> 2) or a
    product with it (None)."""
    s1, s2 = tuple(s1), tuple(s2)
    if len(s1) != len(s2):
        return tuple(None for _ in s2)
    return tuple(a if a == b else (BATCH if (a, b) == (1, 2) else None) for a, b in zip(s1, s2))


def refresh_shapes(g: OnnxGraph, feeds1: dict, feeds2: dict | None) -> None:
    """Recompute every tensor's shape and dtype by running the canonical graph."""
    model = g.to_model()
    runner = FloatRunner(model, expose_all=True)
    run1 = {**g.consts, **feeds1, **runner.run(feeds1)}
    run2 = {**g.consts, **feeds2, **runner.run(feeds2)} if feeds2 is not None else run1
    _record_shapes(g, run1, run2, feeds2 is not None)
    for name in g.inputs:
        if name in feeds1 and feeds2 is not None:
            g.shapes[name] = symbolic_shape(np.shape(feeds1[name]), np.shape(feeds2[name]))


def _check_same_outputs(g: OnnxGraph, run2: dict, feeds2: dict) -> None:
    runner = FloatRunner(g.to_model())
    got = runner.run(feeds2)
    for name in g.outputs:
        want = np.asarray(run2[name], np.float64)
        have = np.asarray(got[name], np.float64)
        if want.shape != have.shape:
            raise ExportError(f"internal: canonical graph changed the shape of output {name!r} ({want.shape} -> {have.shape})")
        scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-6)
        worst = float(np.abs(want - have).max()) if want.size else 0.0
        if worst > 1e-3 * scale:
            raise ExportError(
                f"internal: the canonical graph's output {name!r} differs from the original by {worst:.3g} "
                f"(largest |value| {scale:.3g}); please report this model"
            )


# --- batch-dependent constants ----------------------------------------------------------


def generalize_target(out1, out2, in1, in2) -> list[int]:
    """A Reshape target valid for every batch size, from the shapes seen at batch 1 and 2."""
    target = []
    for axis, (a, b) in enumerate(zip(out1, out2)):
        if a == b:
            target.append(int(a))
        elif axis < len(in1) and in1[axis] == a and in2[axis] == b:
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        raise ExportError(f"a reshape from {list(in1)} to {list(out1)} merges the batch dimension twice")
    return target


def _generalize_batch_constants(g: OnnxGraph, run1: dict, run2: dict) -> None:
    users = g.consumer_map()
    for name in list(g.consts):
        if name not in run1:  # made by a canonical pass: does not depend on the batch
            continue
        v1, v2 = np.asarray(run1[name]), np.asarray(run2[name])
        if v1.shape == v2.shape and np.array_equal(v1, v2):
            continue
        for node in users.get(name, []):
            index = node.inputs.index(name)
            if node.op == "Reshape" and index == 1:
                data = node.inputs[0]
                target = generalize_target(g.shapes1[node.outputs[0]], np.shape(run2[node.outputs[0]]),
                                           g.shapes1[data], np.shape(run2[data]))
                node.inputs[1] = g.add_const(np.array(target, np.int64), "shape")
                node.attrs["allowzero"] = 0
            elif node.op == "Expand" and index == 1:
                target = [1 if a != b else int(a) for a, b in zip(v1, v2)] if v1.shape == v2.shape else None
                if target is None:
                    raise ExportError(f"{node.describe()}: its target shape depends on the batch size in an unsupported way")
                node.inputs[1] = g.add_const(np.array(target, np.int64), "shape")
            elif v1.ndim and v2.ndim == v1.ndim and v1.shape[0] == 1 and v2.shape[0] == 2 and \
                    v1.shape[1:] == v2.shape[1:] and np.array_equal(v2, np.broadcast_to(v1, v2.shape)):
                g.batch_rows.add(name)
            else:
                raise ExportError(
                    f"{node.describe()}: input {name!r} is a constant that depends on the batch size "
                    f"in a way refsim cannot generalise"
                )


# --- attention masks --------------------------------------------------------------------


def mask_derived(g: OnnxGraph) -> set[str]:
    """Tensors computed only from mask inputs and constants (masks themselves included)."""
    derived = set(g.mask_inputs)
    for node in g.nodes:  # nodes are in the model's (topological) order
        data = [i for i in node.inputs if i and i not in g.consts]
        if data and all(i in derived for i in data):
            derived.update(node.outputs)
    return derived


def _canonical_masks(g: OnnxGraph, run2: dict, feeds2: dict) -> None:
    if not g.mask_inputs:
        return
    derived = mask_derived(g)
    made: dict[tuple, str] = {}

    def token_mask(mask: str, node: Node) -> str:
        key = ("token", mask)
        if key not in made:
            rank = len(g.shapes[mask])
            axes = g.add_const(np.array([rank], np.int64), "axes")
            u = g.make_node("Unsqueeze", [mask, axes], "token_mask", node.scope)
            c = g.make_node("Cast", [u.outputs[0]], "token_mask", node.scope, to=onnx.TensorProto.FLOAT)
            g.nodes.extend([u, c])
            made[key] = c.outputs[0]
            g.token_masks[c.outputs[0]] = mask
        return made[key]

    for node in list(g.nodes):
        if any(o in derived for o in node.outputs):
            continue
        for k, name in enumerate(node.inputs):
            if name not in derived:
                continue
            mask = _single_mask_source(g, name, derived)
            m2 = np.asarray(feeds2[mask])
            value = np.asarray(run2[name])
            if node.op == "Add" and _is_key_padding(value, m2):
                key = ("keys", mask)
                if key not in made:
                    rank = len(g.shapes[mask])
                    axes = g.add_const(np.array([1, 2] if rank == 2 else [1], np.int64), "axes")
                    u = g.make_node("Unsqueeze", [mask, axes], "key_mask", node.scope)
                    c = g.make_node("Cast", [u.outputs[0]], "key_mask", node.scope, to=onnx.TensorProto.BOOL)
                    zero = g.add_const(np.array(0.0, np.float32), "zero")
                    low = g.add_const(np.array(FLOAT32_LOWEST, np.float32), "lowest")
                    w = g.make_node("Where", [c.outputs[0], zero, low], "key_mask", node.scope)
                    g.nodes.extend([u, c, w])
                    made[key] = w.outputs[0]
                    g.key_padding_masks[w.outputs[0]] = mask
                node.inputs[k] = made[key]
            elif node.op == "Mul" and _is_token_mask(value, m2):
                node.inputs[k] = token_mask(mask, node)
            elif node.op == "Div" and k == 1 and _is_token_count(value, m2):
                tm = token_mask(mask, node)
                axes = g.add_const(np.array([1], np.int64), "axes")
                s = g.make_node("ReduceSum", [tm, axes], "token_count", node.scope, keepdims=0)
                lo = g.add_const(np.array(1e-9, np.float32), "tiny")
                c = g.make_node("Clip", [s.outputs[0], lo], "token_count", node.scope)
                g.nodes.extend([s, c])
                g.token_counts[c.outputs[0]] = mask
                node.inputs[k] = c.outputs[0]
            else:
                raise ExportError(
                    f"{node.describe()}: uses the mask input {mask!r} in a way refsim does not recognise "
                    f"(supported: an additive key-padding mask before Softmax, a 0/1 token mask, mean pooling)"
                )
    g.toposort()


def _single_mask_source(g: OnnxGraph, name: str, derived: set[str]) -> str:
    sources = set()
    producers = g.producers()
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.mask_inputs:
            sources.add(t)
        elif t in producers:
            stack.extend(i for i in producers[t].inputs if i and i not in g.consts)
    if len(sources) != 1:
        raise ExportError(f"tensor {name!r} combines several mask inputs {sorted(sources)}")
    return sources.pop()


def _mask_broadcast(value: np.ndarray, mask: np.ndarray, key_axis: int) -> np.ndarray | None:
    """`mask` (batch, seq) placed on axis 0 and `key_axis` of value's rank, or None."""
    if value.ndim < 2 or mask.ndim != 2 or value.shape[0] not in (1, mask.shape[0]):
        return None
    if value.shape[key_axis] != mask.shape[1]:
        return None
    shape = [1] * value.ndim
    shape[0], shape[key_axis] = mask.shape
    try:
        return np.broadcast_to(mask.reshape(shape), np.broadcast_shapes(value.shape, tuple(shape)))
    except ValueError:
        return None


def _is_key_padding(value, mask) -> bool:
    expected = _mask_broadcast(value, mask, value.ndim - 1)
    if expected is None or expected.shape != value.shape:
        return False
    kept = expected != 0
    return bool(np.all(value[kept] == 0) and np.all(value[~kept] <= MASK_VERY_NEGATIVE))


def _is_token_mask(value, mask) -> bool:
    expected = _mask_broadcast(value, mask, 1)
    if expected is None or expected.shape != value.shape:
        return False
    return bool(np.array_equal(value, expected.astype(value.dtype)))


def _is_token_count(value, mask) -> bool:
    counts = np.maximum(mask.sum(axis=1).astype(np.float64), 1e-9)
    value = np.asarray(value, np.float64)
    if value.ndim < 1 or value.shape[0] != mask.shape[0]:
        return False
    expected = np.broadcast_to(counts.reshape((-1,) + (1,) * (value.ndim - 1)), value.shape)
    return bool(np.allclose(value, expected, rtol=1e-6, atol=0))


# --- small rewrites -----------------------------------------------------------------------


def _bypass(g: OnnxGraph, node: Node, replacement: str) -> None:
    """Remove `node`, routing its (single) output's users to `replacement`."""
    out = node.outputs[0]
    g.nodes.remove(node)
    g.replace_uses(out, replacement)
    if out in g.shapes and replacement not in g.shapes:
        g.shapes[replacement] = g.shapes[out]


def _scalar(g: OnnxGraph, name: str) -> float | None:
    if name in g.consts and g.consts[name].size == 1:
        return float(g.consts[name].reshape(()))
    return None


def _remove_identities(g: OnnxGraph) -> None:
    for node in list(g.nodes):
        if node.op in ("Identity", "Dropout") and node in g.nodes:
            _bypass(g, node, node.inputs[0])
    producers = g.producers()
    for node in list(g.nodes):
        # Where(IsNaN(p), 0, p): guards fully masked rows of a softmax, a no-op otherwise.
        if node.op == "Where" and len(node.inputs) == 3:
            cond = producers.get(node.inputs[0])
            if cond is not None and cond.op == "IsNaN" and cond.inputs[0] == node.inputs[2] and _scalar(g, node.inputs[1]) == 0.0:
                _bypass(g, node, node.inputs[2])
    g.prune()


def _single_user(g: OnnxGraph, name: str, users=None) -> Node | None:
    users = g.consumer_map() if users is None else users
    found = users.get(name, [])
    if len(found) == 1 and name not in g.outputs:
        return found[0]
    return None


def _reduce_axes(g: OnnxGraph, node: Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1] in g.consts:
        return [int(a) for a in g.consts[node.inputs[1]].reshape(-1)]
    return None


def _last_axis(g: OnnxGraph, axes, name: str) -> bool:
    rank = len(g.shapes1[name])
    return axes is not None and len(axes) == 1 and axes[0] % rank == rank - 1


def _common_scope(nodes: list[Node]) -> str:
    scopes = [n.scope for n in nodes if n.scope]
    if not scopes:
        return ""
    parts = [s.split(".") for s in scopes]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _fuse_layernorm(g: OnnxGraph) -> None:
    """ReduceMean-Sub-Pow-ReduceMean-Add(eps)-Sqrt-Div[-Mul(gamma)][-Add(beta)] -> LayerNormalization."""
    for mean in [n for n in g.nodes if n.op == "ReduceMean"]:
        if mean not in g.nodes:
            continue
        users = g.consumer_map()
        x = mean.inputs[0]
        if not _last_axis(g, _reduce_axes(g, mean), x):
            continue
        sub = _single_user(g, mean.outputs[0], users)
        if sub is None or sub.op != "Sub" or sub.inputs != [x, mean.outputs[0]]:
            continue
        d = sub.outputs[0]
        d_users = users.get(d, [])
        square = next((u for u in d_users if (u.op == "Pow" and _scalar(g, u.inputs[1]) == 2.0)
                       or (u.op == "Mul" and u.inputs == [d, d])), None)
        div = next((u for u in d_users if u.op == "Div" and u.inputs[0] == d), None)
        if square is None or div is None or len(d_users) != 2:
            continue
        var = _single_user(g, square.outputs[0], users)
        if var is None or var.op != "ReduceMean" or not _last_axis(g, _reduce_axes(g, var), square.outputs[0]):
            continue
        add_eps = _single_user(g, var.outputs[0], users)
        if add_eps is None or add_eps.op != "Add":
            continue
        eps = _scalar(g, add_eps.inputs[1]) if add_eps.inputs[0] == var.outputs[0] else _scalar(g, add_eps.inputs[0])
        sqrt = _single_user(g, add_eps.outputs[0], users)
        if eps is None or sqrt is None or sqrt.op != "Sqrt" or div.inputs[1] != sqrt.outputs[0]:
            continue
        matched = [mean, sub, square, var, add_eps, sqrt, div]
        width = g.shapes1[x][-1]
        out = div.outputs[0]
        gamma = np.ones(width, np.float32)
        beta = np.zeros(width, np.float32)
        nxt = _single_user(g, out, users)
        if nxt is not None and nxt.op == "Mul":
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            if other in g.consts and g.consts[other].size in (1, width):
                gamma = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,)).copy()
                matched.append(nxt)
                out = nxt.outputs[0]
                nxt = _single_user(g, out, users)
        if nxt is not None and nxt.op == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            if other in g.consts and g.consts[other].size in (1, width):
                beta = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,)).copy()
                matched.append(nxt)
                out = nxt.outputs[0]
        scope = _common_scope(matched)
        ln = Node("LayerNormalization", [x, g.add_const(gamma, "ln.weight"), g.add_const(beta, "ln.bias")],
                  [out], {"axis": -1, "epsilon": float(eps)}, g.fresh(f"{scope or 'layernorm'}.LayerNormalization"), scope)
        position = g.nodes.index(mean)
        for n in matched:
            g.nodes.remove(n)
        g.nodes.insert(position, ln)
    g.toposort()


def _fuse_gelu(g: OnnxGraph) -> None:
    """0.5 * x * (1 + erf(x / sqrt 2)) in any association -> Gelu (and the tanh form)."""
    for erf in [n for n in g.nodes if n.op in ("Erf", "Tanh")]:
        if erf not in g.nodes:
            continue
        users = g.consumer_map()
        producers = g.producers()
        scaled = producers.get(erf.inputs[0])
        if scaled is None:
            continue
        if erf.op == "Erf":
            x = _scaled_input(g, scaled, 1 / math.sqrt(2))
            inner_nodes = [scaled]
            approximate = "none"
        else:
            x, inner_nodes = _tanh_gelu_input(g, scaled, producers)
            approximate = "tanh"
        if x is None:
            continue
        plus = _single_user(g, erf.outputs[0], users)
        if plus is None or plus.op != "Add":
            continue
        one = plus.inputs[1] if plus.inputs[0] == erf.outputs[0] else plus.inputs[0]
        if _scalar(g, one) != 1.0:
            continue
        # The remaining factors x and 0.5 multiply (1 + erf) in some order.
        product = _product_of(g, plus.outputs[0], x, users, producers)
        if product is None:
            continue
        out, muls = product
        matched = inner_nodes + [erf, plus] + muls
        scope = _common_scope(matched)
        gelu = Node("Gelu", [x], [out], {"approximate": approximate}, g.fresh(f"{scope or 'gelu'}.Gelu"), scope)
        position = min(g.nodes.index(n) for n in matched if n in g.nodes)
        for n in matched:
            if n in g.nodes:
                g.nodes.remove(n)
        g.nodes.insert(position, gelu)
    g.toposort()


def _scaled_input(g: OnnxGraph, node: Node, factor: float) -> str | None:
    """x when node computes x * factor (as Mul or Div)."""
    if node.op == "Mul":
        for a, b in (node.inputs, node.inputs[::-1]):
            c = _scalar(g, b)
            if c is not None and abs(c - factor) < 1e-4 * abs(factor):
                return a
    if node.op == "Div":
        c = _scalar(g, node.inputs[1])
        if c is not None and abs(1 / c - factor) < 1e-4 * abs(factor):
            return node.inputs[0]
    return None


def _tanh_gelu_input(g: OnnxGraph, node: Node, producers) -> tuple[str | None, list[Node]]:
    """x for tanh(sqrt(2/pi) * (x + 0.044715 * x^3))."""
    inner = _scaled_input(g, node, math.sqrt(2 / math.pi))
    add = producers.get(inner) if inner else None
    if add is None or add.op != "Add":
        return None, []
    for x, cube_term in (add.inputs, add.inputs[::-1]):
        term = producers.get(cube_term)
        if term is None:
            continue
        cube = _scaled_input(g, term, 0.044715)
        cube_nodes = _cube_of(g, cube, x, producers) if cube else None
        if cube_nodes is not None:
            return x, [node, add, term, *cube_nodes]
    return None, []


def _cube_of(g: OnnxGraph, name: str, x: str, producers) -> list[Node] | None:
    """The nodes computing x^3 as `name` (Pow(x, 3), or x * (x * x) in either order)."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op == "Pow" and node.inputs[0] == x and _scalar(g, node.inputs[1]) == 3.0:
        return [node]
    if node.op == "Mul" and x in node.inputs:
        other = node.inputs[1] if node.inputs[0] == x else node.inputs[0]
        square = producers.get(other)
        if square is not None and square.op == "Mul" and square.inputs == [x, x]:
            return [node, square]
    return None


def _is_half_of(g: OnnxGraph, node: Node | None, x: str) -> bool:
    """Whether node computes x * 0.5."""
    if node is None or node.op != "Mul" or x not in node.inputs or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] == x else node.inputs[0]
    return _scalar(g, other) == 0.5


def _product_of(g: OnnxGraph, start: str, x: str, users, producers):
    """Follow Mul nodes from `start` until x and 0.5 have both been multiplied in."""
    need_x, need_half = True, True
    current, muls = start, []
    while need_x or need_half:
        nxt = _single_user(g, current, users)
        if nxt is None or nxt.op != "Mul" or len(nxt.inputs) != 2:
            return None
        other = nxt.inputs[1] if nxt.inputs[0] == current else nxt.inputs[0]
        if need_x and other == x:
            need_x = False
        elif need_half and _scalar(g, other) == 0.5:
            need_half = False
        elif need_x and need_half and _is_half_of(g, producers.get(other), x) and len(users.get(other, [])) == 1:
            need_x = need_half = False
            muls.append(producers[other])
        else:
            return None
        muls.append(nxt)
        current = nxt.outputs[0]
    return current, muls


def _gemm_to_matmul(g: OnnxGraph) -> None:
    for node in [n for n in g.nodes if n.op == "Gemm"]:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
        if node.attrs.get("transA", 0) or b not in g.consts:
            raise ExportError(f"{node.describe()}: Gemm with a transposed or non-constant first operand is not supported")
        w = g.consts[b].astype(np.float32)
        if node.attrs.get("transB", 0):
            w = w.T
        w = w * float(node.attrs.get("alpha", 1.0))
        mm = Node("MatMul", [a, g.add_const(np.ascontiguousarray(w), "weight")], [node.outputs[0]], {}, node.name, node.scope)
        position = g.nodes.index(node)
        g.nodes[position] = mm
        if c is not None:
            bias = g.consts[c].astype(np.float32) * float(node.attrs.get("beta", 1.0))
            mm.outputs = [g.fresh(f"{node.outputs[0]}.matmul")]
            g.shapes[mm.outputs[0]] = g.shapes.get(node.outputs[0], ())
            add = Node("Add", [mm.outputs[0], g.add_const(bias, "bias")], [node.outputs[0]], {}, g.fresh(f"{node.name}.bias"), node.scope)
            g.nodes.insert(position + 1, add)


def _conv_patches(g: OnnxGraph) -> None:
    """Conv with stride == kernel, no padding or dilation, one group: a linear layer on
    non-overlapping patches (the ViT patch embedding)."""
    for node in [n for n in g.nodes if n.op == "Conv"]:
        x, w_name = node.inputs[0], node.inputs[1]
        if w_name not in g.consts:
            raise ExportError(f"{node.describe()}: Conv with non-constant weights is not supported")
        w = g.consts[w_name].astype(np.float32)
        kernel = list(node.attrs.get("kernel_shape", w.shape[2:]))
        strides = list(node.attrs.get("strides", [1] * len(kernel)))
        pads = list(node.attrs.get("pads", [0] * 2 * len(kernel)))
        dil = list(node.attrs.get("dilations", [1] * len(kernel)))
        if len(kernel) != 2 or strides != kernel or any(pads) or any(d != 1 for d in dil) or node.attrs.get("group", 1) != 1 \
                or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ExportError(
                f"{node.describe()}: only a 2-D Conv with stride equal to its kernel, no padding, no dilation "
                f"and one group (a patch embedding) is supported"
            )
        _, c, h, wd = g.shapes1[x]
        e, _, p, q = w.shape
        if h % p or wd % q:
            raise ExportError(f"{node.describe()}: image size {h}x{wd} is not a multiple of the patch size {p}x{q}")
        gh, gw = h // p, wd // q
        scope = node.scope
        steps = []

        def add(op, inputs, **attrs):
            n = g.make_node(op, inputs, f"{scope or 'conv'}.patches", scope, **attrs)
            steps.append(n)
            return n.outputs[0]

        t = add("Reshape", [x, g.add_const(np.array([0, c, gh, p, gw, q], np.int64), "shape")])
        t = add("Transpose", [t], perm=[0, 2, 4, 1, 3, 5])
        t = add("Reshape", [t, g.add_const(np.array([0, gh * gw, c * p * q], np.int64), "shape")])
        weight = np.ascontiguousarray(w.reshape(e, c * p * q).T)
        mm = Node("MatMul", [t, g.add_const(weight, "weight")], [g.fresh(f"{scope}.matmul")], {}, node.name, scope)
        steps.append(mm)
        t = mm.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2]:
            t = add("Add", [t, g.add_const(g.consts[node.inputs[2]].astype(np.float32), "bias")])
        t = add("Reshape", [t, g.add_const(np.array([0, gh, gw, e], np.int64), "shape")])
        last = g.make_node("Transpose", [t], f"{scope or 'conv'}.patches", scope, perm=[0, 3, 1, 2])
        last.outputs = [node.outputs[0]]
        steps.append(last)
        position = g.nodes.index(node)
        g.nodes[position:position + 1] = steps


def _constant_arithmetic(g: OnnxGraph) -> None:
    """x - c -> x + (-c); x / c -> x * (1/c), for constant c."""
    for node in g.nodes:
        if node.op == "Sub" and node.inputs[1] in g.consts and node.inputs[0] not in g.consts:
            node.op = "Add"
            node.inputs[1] = g.add_const(-g.consts[node.inputs[1]], "negated")
        elif node.op == "Div" and node.inputs[1] in g.consts and node.inputs[0] not in g.consts:
            node.op = "Mul"
            c = g.consts[node.inputs[1]]
            node.inputs[1] = g.add_const((1.0 / c.astype(np.float64)).astype(c.dtype), "reciprocal")


def _linear_parts(g: OnnxGraph, node: Node, users) -> tuple[Node, Node | None] | None:
    """(MatMul, bias Add or None) if node ends a linear layer with constant weights."""
    producers = g.producers()
    if node.op == "MatMul" and node.inputs[1] in g.consts and g.consts[node.inputs[1]].ndim == 2:
        user = _single_user(g, node.outputs[0], users)
        if user is not None and _linear_parts(g, user, users) is not None:
            return None  # the layer ends at its bias Add
        return node, None
    if node.op == "Add":
        for a, b in (node.inputs, node.inputs[::-1]):
            mm = producers.get(a)
            if mm is not None and mm.op == "MatMul" and mm.inputs[1] in g.consts and b in g.consts \
                    and g.consts[mm.inputs[1]].ndim == 2 and _single_user(g, a, users) is node \
                    and g.consts[b].size in (1, g.consts[mm.inputs[1]].shape[1]):
                return mm, node
    return None


def _fold_affine_into_linear(g: OnnxGraph) -> None:
    """Linear -> Mul(c) [-> Add(d)] with per-output-channel constants becomes one Linear."""
    changed = True
    while changed:
        changed = False
        users = g.consumer_map()
        for node in list(g.nodes):
            parts = _linear_parts(g, node, users)
            if parts is None:
                continue
            mm, bias_add = parts
            out = node.outputs[0]
            nxt = _single_user(g, out, users)
            if nxt is None or nxt.op not in ("Mul", "Add"):
                continue
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            width = g.consts[mm.inputs[1]].shape[1]
            if other not in g.consts or g.consts[other].size not in (1, width) or (g.consts[other].ndim > 1 and g.consts[other].shape[-1] != g.consts[other].size):
                continue
            if other == out:
                continue
            c = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,))
            w = g.consts[mm.inputs[1]].astype(np.float32)
            b = np.broadcast_to(g.consts[bias_add.inputs[1] if bias_add.inputs[0] == mm.outputs[0] else bias_add.inputs[0]].astype(np.float32).reshape(-1), (width,)) if bias_add else np.zeros(width, np.float32)
            if nxt.op == "Mul":
                w, b = w * c[None, :], b * c
            else:
                b = b + c
            mm.inputs[1] = g.add_const(np.ascontiguousarray(w), "weight")
            new_bias = g.add_const(np.ascontiguousarray(b), "bias")
            if bias_add is None:
                bias_add = Node("Add", [mm.outputs[0], new_bias], [nxt.outputs[0]], {}, g.fresh(f"{mm.name}.bias"), mm.scope)
                g.nodes[g.nodes.index(nxt)] = bias_add
            else:
                # The bias Add takes over the folded node's output name (a graph output keeps its name).
                bias_add.inputs = [mm.outputs[0], new_bias]
                g.nodes.remove(nxt)
                g.replace_uses(bias_add.outputs[0], nxt.outputs[0])
                bias_add.outputs = [nxt.outputs[0]]
            changed = True
            break
    g.prune()


def _drop_neutral(g: OnnxGraph) -> None:
    for node in list(g.nodes):
        if node.op in ("Add", "Mul") and len(node.inputs) == 2:
            neutral = 0.0 if node.op == "Add" else 1.0
            for a, b in (node.inputs, node.inputs[::-1]):
                if b in g.consts and a not in g.consts and np.all(g.consts[b] == neutral) \
                        and len(g.shapes1.get(b, g.consts[b].shape)) <= len(g.shapes1.get(a, ())) \
                        and g.shapes1.get(a) == g.shapes1.get(node.outputs[0]) and node.outputs[0] not in g.outputs:
                    _bypass(g, node, a)
                    break
    g.prune()


# --- data movement ----------------------------------------------------------------------


def _movement_output(node: Node, g: OnnxGraph, array: np.ndarray) -> np.ndarray:
    """Apply a movement node to a concrete array (shapes at batch 2 or 1)."""
    if node.op == "Transpose":
        return np.transpose(array, node.attrs.get("perm"))
    if node.op == "Reshape":
        return array.reshape(_reshape_target(array.shape, g.consts[node.inputs[1]], node.attrs.get("allowzero", 0)))
    if node.op == "Flatten":
        axis = node.attrs.get("axis", 1) % max(array.ndim, 1)
        return array.reshape(int(np.prod(array.shape[:axis], dtype=np.int64)), -1)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        axes = [int(a) for a in g.consts[node.inputs[1]].reshape(-1)]
    if node.op == "Squeeze":
        return np.squeeze(array, axis=tuple(axes) if axes is not None else None)
    if node.op == "Unsqueeze":
        out_rank = array.ndim + len(axes)
        return np.expand_dims(array, tuple(a % out_rank for a in axes))
    raise AssertionError(node.op)


def _reshape_target(in_shape, target, allowzero) -> list[int]:
    out = []
    for i, d in enumerate(np.asarray(target).reshape(-1).tolist()):
        out.append(in_shape[i] if d == 0 and not allowzero else d)
    return out


def _compress_movement(g: OnnxGraph) -> None:
    """Replace each maximal chain of movement ops by the one Reshape/Transpose it amounts to."""
    users = g.consumer_map()
    producers = g.producers()
    heads = []
    for node in g.nodes:
        if node.op not in MOVEMENT_OPS:
            continue
        before = producers.get(node.inputs[0])
        if before is not None and before.op in MOVEMENT_OPS and _single_user(g, before.outputs[0], users) is node:
            continue
        heads.append(node)
    for head in heads:
        chain = [head]
        while True:
            nxt = _single_user(g, chain[-1].outputs[0], users)
            if nxt is None or nxt.op not in MOVEMENT_OPS:
                break
            chain.append(nxt)
        _replace_chain(g, chain)


def _replace_chain(g: OnnxGraph, chain: list[Node]) -> None:
    x, out = chain[0].inputs[0], chain[-1].outputs[0]
    in1 = g.shapes1[x]
    out1 = g.shapes1[out]
    in_sym = g.shapes[x]
    out_sym = g.shapes[out]
    probe_in = tuple(2 if d == BATCH else (1 if d is None else d) for d in in_sym)
    if None in in_sym or None in out_sym:
        probe_in = in1
    index = np.arange(int(np.prod(probe_in, dtype=np.int64))).reshape(probe_in)
    moved = index
    for node in chain:
        moved = _movement_output(node, g, moved)
    scope = chain[-1].scope or chain[0].scope
    position = g.nodes.index(chain[0])
    for node in chain:
        g.nodes.remove(node)
    if moved.shape == index.shape and np.array_equal(moved, index) and out not in g.outputs:
        g.replace_uses(out, x)
        return
    replacement = _single_movement(g, x, out, index, moved, in1, out1, probe_in, scope)
    if replacement is not None:
        g.nodes[position:position] = replacement
        return
    # Nothing simpler does it: keep the chain, with Squeeze/Unsqueeze/Flatten as Reshapes.
    for offset, node in enumerate(chain):
        if node.op in ("Squeeze", "Unsqueeze", "Flatten"):
            i, o = node.inputs[0], node.outputs[0]
            probe = tuple(2 if d == BATCH else d for d in g.shapes[i]) if None not in g.shapes[i] else g.shapes1[i]
            target = generalize_target(g.shapes1[o], _movement_output(node, g, np.zeros(probe)).shape, g.shapes1[i], probe)
            node = Node("Reshape", [i, g.add_const(np.array(target, np.int64), "shape")], [o], {}, node.name, node.scope)
        g.nodes.insert(position + offset, node)


def _single_movement(g: OnnxGraph, x: str, out: str, index, moved, in1, out1, probe_in, scope) -> list[Node] | None:
    """One Transpose or Reshape, or a Reshape and a Transpose (either order), that moves
    `index` into `moved`; None if there is none."""

    def reshape(src: str, dst: str, shape1, shape2, from1, from2) -> Node:
        target = generalize_target(shape1, shape2, from1, from2)
        return Node("Reshape", [src, g.add_const(np.array(target, np.int64), "shape")], [dst], {},
                    g.fresh(f"{scope or 'move'}.Reshape"), scope)

    def transpose(src: str, dst: str, perm) -> Node:
        return Node("Transpose", [src], [dst], {"perm": [int(p) for p in perm]}, g.fresh(f"{scope or 'move'}.Transpose"), scope)

    flat = index.reshape(-1)
    if moved.ndim == index.ndim and moved.ndim <= 6:
        for perm in itertools.permutations(range(index.ndim)):
            if np.array_equal(np.transpose(index, perm), moved):
                return [transpose(x, out, perm)]
    if np.array_equal(moved.reshape(-1), flat):
        return [reshape(x, out, out1, moved.shape, in1, probe_in)]
    if moved.ndim <= 6:
        for perm in itertools.permutations(range(moved.ndim)):
            mid = np.transpose(moved, np.argsort(perm))
            if np.array_equal(mid.reshape(-1), flat):
                mid1 = tuple(out1[i] for i in np.argsort(perm))
                t = g.fresh(f"{out}.reshaped")
                return [reshape(x, t, mid1, mid.shape, in1, probe_in), transpose(t, out, perm)]
    if index.ndim <= 6:
        for perm in itertools.permutations(range(index.ndim)):
            mid = np.transpose(index, perm)
            if np.array_equal(mid.reshape(-1), moved.reshape(-1)):
                mid1 = tuple(in1[p] for p in perm)
                t = g.fresh(f"{out}.transposed")
                return [transpose(x, t, perm), reshape(t, out, out1, moved.shape, mid1, mid.shape)]
    return None


# --- attention ---------------------------------------------------------------------------------


@dataclass
class LinearMatch:
    """A linear layer in a canonical graph: y = x @ weight (+ bias)."""

    x: str
    weight: str  # constant [in, out]
    bias: str | None  # constant, or None
    out: str  # the layer's output (after the bias Add, if any)
    nodes: list[Node]


@dataclass
class AttentionMatch:
    """Multi-head self-attention from the Q/K/V projections to the output projection.

    `factor` is the product of the positive scalar factors applied to the scores (on Q, on
    K or on Q.K^T: 1/sqrt(P) as one or two factors); `mask` is the key-padding mask input
    added to the scores, or None.
    """

    q: LinearMatch
    k: LinearMatch
    v: LinearMatch
    o: LinearMatch
    heads: int
    head_dim: int
    factor: float
    mask: str | None
    scores: str  # the scaled scores entering softmax (before the mask)
    softmax: Node
    probs: str  # softmax output
    context: str  # A.V (batch, heads, seq, head_dim)
    nodes: list[Node]  # every node from the projections to the output projection

    @property
    def name(self) -> str:
        scopes = [n.scope for n in self.nodes if n.scope]
        common = _common_scope([n for n in self.nodes if n.scope]) if scopes else ""
        return common or self.softmax.name


def linear_at(g: OnnxGraph, out: str) -> LinearMatch | None:
    """The linear layer producing `out` (MatMul with constant 2-D weights, optional bias Add)."""
    producers = g.producers()
    node = producers.get(out)
    if node is None:
        return None
    if node.op == "Add":
        for a, b in (node.inputs, node.inputs[::-1]):
            mm = producers.get(a)
            if mm is not None and mm.op == "MatMul" and b in g.consts and mm.inputs[1] in g.consts \
                    and g.consts[mm.inputs[1]].ndim == 2 and mm.inputs[0] not in g.consts \
                    and len(g.consumers(a)) == 1 and g.consts[b].size == g.consts[mm.inputs[1]].shape[1]:
                return LinearMatch(mm.inputs[0], mm.inputs[1], b, out, [mm, node])
        return None
    if node.op == "MatMul" and node.inputs[1] in g.consts and g.consts[node.inputs[1]].ndim == 2 and node.inputs[0] not in g.consts:
        return LinearMatch(node.inputs[0], node.inputs[1], None, out, [node])
    return None


def _movement_chain_back(g: OnnxGraph, name: str, producers) -> tuple[str, list[Node], float]:
    """Walk back from `name` through Reshape/Transpose and positive scalar Muls with single
    users; returns (start tensor, nodes in order, product of the scalar factors)."""
    nodes, factor = [], 1.0
    while True:
        node = producers.get(name)
        if node is None or len(g.consumers(name)) != 1 or name in g.outputs:
            break
        if node.op in ("Reshape", "Transpose"):
            nodes.insert(0, node)
            name = node.inputs[0]
            continue
        if node.op == "Mul":
            c = _scalar(g, node.inputs[1]) if node.inputs[0] not in g.consts else _scalar(g, node.inputs[0])
            if c is not None and c > 0:
                nodes.insert(0, node)
                factor *= c
                name = node.inputs[0] if node.inputs[1] in g.consts else node.inputs[1]
                continue
        break
    return name, nodes, factor


def _moves_like(g: OnnxGraph, start: str, chain: list[Node], expected) -> bool:
    """Whether the movement nodes of `chain` move a (1, ...) tensor `start` as `expected`
    (a function of an index array) does."""
    shape = g.shapes1[start]
    index = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    moved = index
    try:
        for node in chain:
            if node.op != "Mul":
                moved = _movement_output(node, g, moved)
        want = expected(index)
    except (ValueError, KeyError):
        return False
    return moved.shape == want.shape and np.array_equal(moved, want)


def match_attention(g: OnnxGraph) -> list[AttentionMatch]:
    """Every multi-head attention in the canonical graph (see AttentionMatch)."""
    producers = g.producers()
    found = []
    for softmax in [n for n in g.nodes if n.op == "Softmax"]:
        x = softmax.inputs[0]
        mask = None
        node = producers.get(x)
        if node is not None and node.op == "Add":
            keys = [i for i in node.inputs if i in g.key_padding_masks]
            if keys:
                mask = g.key_padding_masks[keys[0]]
                x = node.inputs[1] if node.inputs[0] == keys[0] else node.inputs[0]
        x, score_chain, factor = _movement_chain_back(g, x, producers)
        if any(n.op != "Mul" for n in score_chain):
            continue
        qk = producers.get(x)
        if qk is None or qk.op != "MatMul" or any(i in g.consts for i in qk.inputs[:2]):
            continue
        probs = softmax.outputs[0]
        users = g.consumers(probs)
        if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] != probs:
            continue
        av = users[0]
        q_start, q_chain, q_factor = _movement_chain_back(g, qk.inputs[0], producers)
        k_start, k_chain, k_factor = _movement_chain_back(g, qk.inputs[1], producers)
        v_start, v_chain, v_factor = _movement_chain_back(g, av.inputs[1], producers)
        q, k, v = linear_at(g, q_start), linear_at(g, k_start), linear_at(g, v_start)
        if q is None or k is None or v is None or k.x != v.x or v_factor != 1.0:
            continue
        width = g.consts[q.weight].shape[1]
        heads_shape = g.shapes1[qk.inputs[0]]
        if len(heads_shape) != 4:
            continue
        _, heads, seq, head_dim = heads_shape
        if heads * head_dim != width or g.consts[k.weight].shape[1] != width or g.consts[v.weight].shape[1] != width:
            continue

        def split(i, h=heads, d=head_dim):
            return i.reshape(i.shape[0], i.shape[1], h, d).transpose(0, 2, 1, 3)

        if not (_moves_like(g, q_start, q_chain, split) and _moves_like(g, v_start, v_chain, split)
                and _moves_like(g, k_start, k_chain, lambda i: split(i).transpose(0, 1, 3, 2))):
            continue
        # A.V back to (batch, seq, width), then the output projection.
        chain, out = [], av.outputs[0]
        while True:
            following = g.consumers(out)
            if len(following) != 1 or following[0].op not in ("Reshape", "Transpose") or out in g.outputs:
                break
            chain.append(following[0])
            out = following[0].outputs[0]
        following = g.consumers(out)
        if not chain or len(following) != 1 or following[0].op != "MatMul" or following[0].inputs[0] != out:
            continue
        o_out = following[0].outputs[0]
        bias_users = g.consumers(o_out)
        if len(bias_users) == 1 and bias_users[0].op == "Add" and any(i in g.consts for i in bias_users[0].inputs):
            o_out = bias_users[0].outputs[0]
        o = linear_at(g, o_out)
        if o is None or o.x != out or not _moves_like(
                g, av.outputs[0], chain, lambda i: i.transpose(0, 2, 1, 3).reshape(i.shape[0], i.shape[2], -1)):
            continue
        nodes = q.nodes + k.nodes + v.nodes + q_chain + k_chain + v_chain + [qk] + score_chain
        if mask is not None:
            nodes.append(producers[softmax.inputs[0]])
        nodes += [softmax, av] + chain + o.nodes
        found.append(AttentionMatch(q, k, v, o, heads, head_dim, factor * q_factor * k_factor, mask,
                                    score_chain[-1].outputs[0] if score_chain else qk.outputs[0],
                                    softmax, probs, av.outputs[0], nodes))
    return found
