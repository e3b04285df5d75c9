"""The importer skeleton every format shares: inputs, the node loop, data movement, graph
outputs and metadata. A format subclasses `Importer` and adds handlers for its ops.

The graph comes from the front end (`exporters.frontend`: one loader, constant folding and
shape inference for export and import); integer nodes go through its emitter, and every
requantization through its planner (`frontend.requant`, policies `dyadic` and `ort`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from refsim.dtypes import TYPES
from refsim.errors import InternalError, RefsimError
from refsim.ir import Graph

from ..dyadic import ExportError
from ..frontend import requant as rq
from ..frontend.checks import array_bytes, first_line
from ..frontend.emitter import Emitter, narrowest_type
from ..frontend.fold import evaluate, store_const
from ..frontend.graph import FLOAT_TYPES, INTEGER_TYPES, Node, type_name
from ..frontend.graph import Graph as OnnxGraph
from .values import FLOAT_OPS_CHOICES, REQUANT_CHOICES, Const, Dequantized, FloatOp, Moved, QTensor


class ImportFailure(ExportError):
    """An ONNX model cannot be imported: the message names the node, the op and why."""


def fail(node: Node | None, why: str) -> ImportFailure:
    return ImportFailure(f"{node.describe()}: {why}" if node is not None else why)


def describe(node: Node) -> str:
    return node.describe()


@dataclass
class GraphInput:
    name: str
    elem_type: int
    shape: tuple  # ints, and strings for symbolic dimensions

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES


class FloatInput:
    """A float graph input, waiting for the QuantizeLinear that says how it is quantized."""

    def __init__(self, info: GraphInput):
        self.info = info
        self.quantized: QTensor | None = None


Handler = Callable[[Node, list, dict], Any]


class Importer:
    format_name = "onnx"
    # Nodes the front end's folding must leave for the importer (even on constants).
    KEEP: tuple[str, ...] = ()

    def __init__(self, graph: OnnxGraph, emitter: Emitter, requant: str = "dyadic", float_ops: str = "integer"):
        if requant not in REQUANT_CHOICES:
            raise ImportFailure(f"unknown requantization {requant!r}; choose from {', '.join(REQUANT_CHOICES)}")
        if float_ops not in FLOAT_OPS_CHOICES:
            raise ImportFailure(f"unknown float ops {float_ops!r}; choose from {', '.join(FLOAT_OPS_CHOICES)}")
        self.g = graph
        self.em = emitter
        self.requant_policy = requant
        self.float_ops = float_ops
        self.rounding = "half_even"
        self.values: dict[str, Any] = {"": None}
        self.handlers: dict[tuple[str, str], Handler] = {}
        self.input_quantization: dict[str, dict] = {}
        self.const_types: dict[str, int] = {}  # ONNX element type of folded sub-byte constants
        # Readings of the graph a user should know of (each names its node), kept in the
        # .intq's import metadata and printed by `refsim import`.
        self.notes: list[str] = []
        for op in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice", "Concat",
                   "Split", "Identity", "MaxPool", "Pad", "Shape", "Size"):
            self.handlers[("", op)] = getattr(self, f"op_{op}")

    # --- the loop -----------------------------------------------------------------------

    @classmethod
    def keeps(cls, node: Node) -> bool:
        return node.op in cls.KEEP

    def graph_inputs(self) -> list[GraphInput]:
        return [GraphInput(n, *self.g.input_types[n]) for n in self.g.inputs]

    def run(self) -> Graph:
        for name, array in self.g.consts.items():
            self.values[name] = Const(array)
            if name in self.g.const_types:
                self.const_types[name] = self.g.const_types[name]
        for info in self.graph_inputs():
            if info.elem_type in INTEGER_TYPES:
                dtype = INTEGER_TYPES[info.elem_type]
                name = self.em.builder.input(info.name, dtype, info.shape)
                self.values[info.name] = QTensor(name, TYPES[dtype], tuple(info.shape))
            elif info.elem_type in FLOAT_TYPES:
                self.values[info.name] = FloatInput(info)
            else:
                raise ImportFailure(f"input {info.name!r} has type {type_name(info.elem_type)}, which refsim cannot take")
        for node in self.g.nodes:
            self.visit(node)
        return self.finish()

    # Custom ops a format defines, checked like onnx's own when the graph is read
    # (frontend.checks.OpSpec).
    specs: dict = {}

    def visit(self, node: Node) -> None:
        """Map `node` (checked against its schema when the graph was read); whatever a
        malformed node still makes a handler raise becomes an ImportFailure naming the node
        (InternalError, a refsim bug, is left alone)."""
        try:
            self._visit(node)
        except (ImportFailure, InternalError):
            raise
        except RefsimError as e:
            raise fail(node, str(e)) from None
        except MemoryError:
            raise fail(node, "needs more memory than is available") from None
        except Exception as e:
            raise fail(node, f"cannot be imported ({type(e).__name__}: {first_line(e)})") from e

    def _visit(self, node: Node) -> None:
        domain = node.domain
        ins = []
        for name in node.inputs:
            if name not in self.values:
                raise fail(node, f"input {name!r} is never produced (is the graph topologically sorted?)")
            ins.append(self.values[name])
        attrs = node.attrs
        if node.op == "Constant" and domain == "":
            results = evaluate(node, [], self.g.opsets, self.g.budget)
        elif ins and all(isinstance(v, Const) or v is None for v in ins) and self.foldable(domain, node.op):
            results = evaluate(node, [None if v is None else v.value for v in ins], self.g.opsets, self.g.budget)
        else:
            handler = self.handlers.get((domain, node.op))
            result = self.unhandled(node, ins, attrs) if handler is None else handler(node, ins, attrs)
            results = list(result) if isinstance(result, (list, tuple)) else [result]
            if len(results) != len(node.outputs):
                raise fail(node, f"produces {len(node.outputs)} outputs, refsim maps {len(results)}")
            for name, value in zip(node.outputs, results):
                if name:
                    self.values[name] = value
            return
        for name, value in zip(node.outputs, results):
            if name:
                self.values[name] = Const(self.keep_const_type(name, np.asarray(value)))

    def keep_const_type(self, name: str, array: np.ndarray) -> np.ndarray:
        """Folded sub-byte integers (ml_dtypes int4, ...) are stored unpacked; remember their type."""
        scratch = OnnxGraph()
        store_const(scratch, name, array)
        if name in scratch.const_types:
            self.const_types[name] = scratch.const_types[name]
        return scratch.consts[name]

    # --- emitting ------------------------------------------------------------------------------

    def place(self, q: QTensor) -> str:
        """The refsim tensor name of q, placing a constant in the graph on first use."""
        if q.name is None:
            q.name = self.em.const(q.data, q.dtype, "const")
        elif q.name not in self.em.builder.tensors and q.data is not None:
            self.em.builder.const(q.data, q.dtype.name, name=q.name)
        return q.name

    def qnode(self, op: str, inputs, out: str, node_name: str | None = None, **attrs) -> QTensor:
        """Append a refsim node with one output named (close to) `out`; returns it as a QTensor."""
        name = self.em.node(op, inputs, out, node_name, **attrs)
        t = self.em.builder.tensors[name]
        return QTensor(name, t.dtype, tuple(t.shape))

    def requantize(self, src: QTensor, ratio: np.ndarray, target: QTensor, out: str, onnx_node=None,
                   ort_ratio: np.ndarray | None = None, axis: int | None = None, value_bits: int | None = None) -> QTensor:
        """y = clip(round(ratio * (src - src.zero_point)) + target.zero_point) in target's type,
        with the importer's policy (`frontend.requant`). `ratio` is the exact real multiplier
        (scalar or per channel along `axis`); `ort_ratio` the float32 one onnxruntime
        computes; `value_bits` bounds |src| when it is narrower than its type."""
        ratio = np.asarray(ratio, np.float64)
        src_zp = src.zero_point
        if ratio.size > 1 and axis is None:
            raise fail(onnx_node, "a per-channel requantization needs an axis")
        if src_zp is not None and np.asarray(src_zp).size > 1 and np.unique(np.asarray(src_zp)).size == 1:
            src_zp = np.asarray(src_zp).reshape(-1)[:1]
        if src_zp is not None and np.asarray(src_zp).size > 1:
            raise fail(onnx_node, "per-channel zero points on a tensor that is requantized are not supported")
        zp_in = 0 if src_zp is None else int(np.asarray(src_zp).reshape(-1)[0])
        bound = (1 << (value_bits - 1)) + abs(zp_in) if value_bits else (
            src.bound if src.bound is not None else rq.type_bound(src.dtype.name, zp_in))
        rounding = target.rounding or self.rounding
        clip = target.clip or (None, None)
        what = onnx_node.name if onnx_node is not None else out
        try:
            name = rq.requantize(self.em, self.place(src), ratio, bound=bound, dtype=target.dtype.name,
                                 policy=self.requant_policy, zero_point=int(target.zp_scalar()), input_zero_point=zp_in,
                                 lo=clip[0], hi=clip[1], rounding=rounding, axis=-1 if axis is None else axis,
                                 ort_ratio=ort_ratio, stem=out, what=what)
        except ImportFailure:
            raise
        except ExportError as e:
            raise ImportFailure(f"{describe(onnx_node)}: {e}" if onnx_node is not None else str(e)) from None
        t = self.em.builder.tensors[name]
        return replace(target, name=name, shape=tuple(t.shape), data=None, factors=None)

    def foldable(self, domain: str, op_type: str) -> bool:
        """Nodes on constants are evaluated at import time (onnx's own reference semantics)."""
        return domain == ""

    def unhandled(self, node, ins, attrs):
        raise fail(node, f"op {node.op!r} is not supported by the {self.format_name} importer")

    # --- graph outputs --------------------------------------------------------------------

    def finish(self) -> Graph:
        b = self.em.builder
        outputs: dict[str, dict] = {}
        for name in self.g.outputs:
            value = self.values.get(name)
            q = value.q if isinstance(value, Dequantized) else value
            if isinstance(value, FloatOp):
                value = self.float_output(name, value)
                q = value.q
            if isinstance(value, (Const, FloatInput)) or value is None:
                raise ImportFailure(f"graph output {name!r} is a constant or a float input; nothing integer computes it")
            tensor = self.place(q)
            if tensor != name or name in b.inputs or b.tensors[tensor].is_const:
                rank = len(q.shape)
                q = replace(q, name=self.qnode("Reshape", [tensor], name, shape=[0] * rank).name)
            b.output(q.name)
            entry: dict[str, Any] = {"tensor": q.name, "dtype": q.dtype.name}
            if q.scale is not None:
                entry.update(quantization_entry(q))
                entry["dequantize"] = isinstance(value, Dequantized)
                t = b.tensors[q.name]
                t.scale, t.zero_point, t.quant_axis = _display_quant(q)
            outputs[name] = entry
        for name, value in self.values.items():
            if isinstance(value, FloatInput) and value.quantized is None:
                raise ImportFailure(f"float input {name!r} is never quantized by a QuantizeLinear")
        order = {name: i for i, name in enumerate(self.g.inputs)}
        b.inputs.sort(key=lambda n: order.get(n, len(order)))
        b.metadata["import"] = {
            "format": self.format_name,
            "requant": self.requant_policy,
            "float_ops": self.float_ops,
            "producer": self.g.producer,
        }
        if self.notes:
            b.metadata["import"]["notes"] = list(dict.fromkeys(self.notes))
        b.metadata["boundary"] = {"inputs": self.input_quantization, "outputs": outputs}
        b.metadata["onnx_names"] = self.record_onnx_names()
        try:
            return b.build()
        except RefsimError as e:
            raise ImportFailure(f"the imported graph is invalid: {e}") from None

    def record_onnx_names(self) -> dict[str, str]:
        """{refsim tensor: the ONNX tensor whose integers it holds}, for every computed integer
        tensor that stands for one (the first ONNX name when several share it), each labelled
        with its ONNX scale and zero point: `refsim compare` lines them up against
        onnxruntime's by these names (`exporters.lineup`), also where refsim had to rename."""
        b = self.em.builder
        names: dict[str, str] = {}
        for onnx_name, value in self.values.items():
            if not isinstance(value, QTensor) or value.is_const or value.name not in b.tensors:
                continue
            t = b.tensors[value.name]
            if t.is_const or value.name in names:
                continue
            names[value.name] = onnx_name
            if value.scale is not None and t.scale is None and np.isfinite(np.asarray(value.scale, np.float64)).all():
                scale, zero_point, axis = _display_quant(value)  # an infinite mask scale stays unlabelled
                if scale is not None and (axis is None or -len(t.shape) <= axis < len(t.shape)):
                    t.scale, t.zero_point, t.quant_axis = scale, zero_point, axis
        return names

    def float_output(self, name: str, value: FloatOp) -> Dequantized:
        """A graph output computed by float ops after the last QuantizeLinear: a format may know
        an integer form for it (the QDQ importer: masked mean pooling); otherwise refused."""
        raise fail(value.node, f"its float result is graph output {name!r}; refsim outputs integers, "
                               "so the output needs a QuantizeLinear/DequantizeLinear pair")

    # --- helpers ----------------------------------------------------------------------------

    def const_value(self, node, value, what: str) -> np.ndarray:
        if value is None:
            return None
        if isinstance(value, Const):
            return value.value
        if isinstance(value, QTensor) and value.is_const:
            return value.data
        raise fail(node, f"{what} must be a constant (known when importing)")

    def ints(self, node, value, what: str) -> list[int] | None:
        array = self.const_value(node, value, what)
        return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]

    def integer(self, node, value, what: str) -> QTensor:
        """An integer operand: a tensor of the graph, or a constant with integer values."""
        if isinstance(value, QTensor):
            return value
        if isinstance(value, Const):
            array = np.asarray(value.value)
            if array.dtype.kind not in "iub":
                raise fail(node, f"{what} is a float constant; an integer is needed here")
            t = narrowest_type(array) if array.dtype.kind != "u" else TYPES["uint8" if array.max(initial=0) < 256 else "int64"]
            return QTensor(None, t, array.shape, data=array.astype(t.storage))
        raise fail(node, f"{what} is a float value; refsim computes with integers here")

    # --- data movement: the same op on the integers, the same scale ------------------------

    def _unwrap(self, node, value):
        if isinstance(value, Dequantized):
            return value.q, True
        if isinstance(value, QTensor):
            return value, False
        if isinstance(value, FloatInput):
            raise fail(node, f"float input {value.info.name!r} must be quantized (QuantizeLinear) before this op")
        if isinstance(value, FloatOp):
            raise fail(node, f"takes the float result of {describe(value.node)}; quantize it first")
        raise fail(node, "takes a value refsim cannot represent")

    def _move(self, node, value, op: str, params: dict, const_fn: Callable[[np.ndarray], np.ndarray],
              axis_map: Callable[[int], int | None] | None = None, extra_inputs=()):
        if isinstance(value, FloatOp) and op in ("Reshape", "Transpose", "Slice", "Gather") and not extra_inputs:
            # a float result moved before its quantizer: moved as integers once quantized
            shape = const_fn(np.zeros(self._shape_of(node, value), np.int8)).shape
            return Moved(node, [value], {}, apply=lambda q: self._move(node, q, op, params, const_fn, axis_map),
                         const_fn=const_fn, shape=shape)
        q, wrapped = self._unwrap(node, value)
        if q.scale is not None and not q.per_tensor:
            if axis_map is None or (new_axis := axis_map(q.axis)) is None:
                raise fail(node, f"moves a per-channel quantized tensor (axis {q.axis}) in a way refsim does not track")
        else:
            new_axis = q.axis
        if q.is_const and all(e.is_const for e in extra_inputs):
            data = const_fn(q.data)
            out = replace(q, name=None, data=np.ascontiguousarray(data), shape=data.shape, axis=new_axis)
        else:
            extra = [self.place(e) for e in extra_inputs]
            result = self.qnode(op, [self.place(q), *extra], node.outputs[0], node.name, **params)
            out = replace(q, name=result.name, shape=result.shape, data=None, axis=new_axis)
        if q.row_norm is not None:
            out = replace(out, row_norm=_moved_row_norm(op, params, tuple(q.shape), tuple(out.shape), q.row_norm))
        return Dequantized(out) if wrapped else out

    def _shape_of(self, node, value) -> tuple:
        q, _ = self._unwrap(node, value)
        return tuple(q.shape)

    def _reshape_attr(self, in_shape, out_shape) -> list[int]:
        target, inferred = [], False
        for i, d in enumerate(out_shape):
            if isinstance(d, int):
                target.append(d)
            elif i < len(in_shape) and in_shape[i] == d:
                target.append(0)
            elif not inferred:
                target.append(-1)
                inferred = True
            else:
                raise ImportFailure(f"cannot express reshape {list(in_shape)} -> {list(out_shape)} with static sizes; give --shape")
        return target

    def _reshape_to(self, node, value, out_shape, axis_map=None):
        in_shape = self._shape_of(node, value)
        target = self._reshape_attr(in_shape, out_shape)
        return self._move(node, value, "Reshape", {"shape": target},
                          lambda a: a.reshape([d if isinstance(d, int) else -1 for d in out_shape]), axis_map)

    def op_Identity(self, node, ins, attrs):
        return ins[0]

    def op_Shape(self, node, ins, attrs):
        shape = self._shape_of(node, ins[0])
        start, end = attrs.get("start", 0), attrs.get("end", None)
        shape = shape[start:end]
        if not all(isinstance(d, int) for d in shape):
            raise fail(node, f"needs the static shape of a tensor shaped {list(shape)}; give the input shapes with --shape")
        return Const(np.array(shape, np.int64))

    def op_Size(self, node, ins, attrs):
        shape = self._shape_of(node, ins[0])
        if not all(isinstance(d, int) for d in shape):
            raise fail(node, "needs static shapes; give the input shapes with --shape")
        return Const(np.array(int(np.prod(shape)), np.int64))

    def op_Reshape(self, node, ins, attrs):
        shape = self.ints(node, ins[1], "the target shape")
        if attrs.get("allowzero", 0) and 0 in shape:
            raise fail(node, "allowzero with a 0 in the shape is not supported")
        in_shape = self._shape_of(node, ins[0])
        axis_map = (lambda axis: axis if axis < len(shape) and (shape[axis] == 0 or shape[axis] == in_shape[axis])
                    and all(s == 0 or s == d for s, d in zip(shape[:axis], in_shape[:axis])) else None)
        return self._move(node, ins[0], "Reshape", {"shape": shape}, lambda a: _onnx_reshape(a, shape), axis_map)

    def op_Transpose(self, node, ins, attrs):
        rank = len(self._shape_of(node, ins[0]))
        perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
        return self._move(node, ins[0], "Transpose", {"perm": perm}, lambda a: np.transpose(a, perm),
                          lambda axis: perm.index(axis))

    def _axes(self, node, ins, attrs, rank):
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = self.ints(node, ins[1], "axes")
        return None if axes is None else [a % rank for a in axes]

    def op_Squeeze(self, node, ins, attrs):
        shape = self._shape_of(node, ins[0])
        axes = self._axes(node, ins, attrs, len(shape))
        if axes is None:
            if not all(isinstance(d, int) for d in shape):
                raise fail(node, "squeezing unknown axes of a symbolic shape; give the axes or --shape")
            axes = [i for i, d in enumerate(shape) if d == 1]
        out = [d for i, d in enumerate(shape) if i not in axes]
        return self._reshape_to(node, ins[0], out, lambda a: None if a in axes else a - sum(x < a for x in axes))

    def op_Unsqueeze(self, node, ins, attrs):
        shape = list(self._shape_of(node, ins[0]))
        raw = attrs["axes"] if "axes" in attrs else self.ints(node, ins[1], "axes")
        rank = len(shape) + len(raw)
        axes = sorted(a % rank for a in raw)
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
        kept = [i for i in range(rank) if i not in axes]
        return self._reshape_to(node, ins[0], out, lambda a: kept[a])

    def op_Flatten(self, node, ins, attrs):
        shape = self._shape_of(node, ins[0])
        axis = attrs.get("axis", 1)
        axis = axis + len(shape) if axis < 0 else axis  # ONNX allows axis = rank: [size, 1]
        def size(dims):
            if not all(isinstance(d, int) for d in dims):
                return None
            return int(np.prod(dims))
        out = [size(shape[:axis]), size(shape[axis:])]
        if None in out:
            if out.count(None) > 1:
                raise fail(node, "flattens symbolic dimensions; give --shape")
            out = [d if d is not None else -1 for d in out]
            return self._move(node, ins[0], "Reshape", {"shape": out}, lambda a: a.reshape(out))
        return self._reshape_to(node, ins[0], out)

    def op_Gather(self, node, ins, attrs):
        axis = attrs.get("axis", 0)
        data, indices = ins
        if isinstance(indices, Const) and isinstance(data, (QTensor, Dequantized)) and self._unwrap(node, data)[0].is_const:
            idx = np.asarray(indices.value).astype(np.int64)
            table = self._unwrap(node, data)[0].data
            at = axis % max(table.ndim, 1)
            if self.g.budget is not None:
                self.g.budget.take(array_bytes(table.shape[:at] + idx.shape + table.shape[at + 1:], table.itemsize),
                                   node.describe(), "the gathered constant")
            return self._move(node, data, "Gather", {}, lambda a: np.take(a, idx, axis=axis))
        index = self.integer(node, indices, "the indices")
        if isinstance(data, Const) and np.asarray(data.value).dtype.kind in "iub":
            data = self.integer(node, data, "the table")  # an integer table (QOperator's quantized embedding)
        shape = self._shape_of(node, data)
        rank = len(shape)
        axis %= rank
        axis_map = (lambda a: a if a < axis else (None if a == axis else a - 1 + len(index.shape)))
        return self._move(node, data, "Gather", {"axis": axis}, lambda a: np.take(a, index.data, axis=axis),
                          axis_map, extra_inputs=[index])

    def op_Slice(self, node, ins, attrs):
        if "starts" in attrs:  # opset < 10
            starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
        else:
            starts = self.ints(node, ins[1], "starts")
            ends = self.ints(node, ins[2], "ends")
            axes = self.ints(node, ins[3], "axes") if len(ins) > 3 else None
            steps = self.ints(node, ins[4], "steps") if len(ins) > 4 else None
        shape = self._shape_of(node, ins[0])
        rank = len(shape)
        axes_n = [a % rank for a in (axes if axes is not None else range(len(starts)))]
        steps_n = steps or [1] * len(starts)
        index = [slice(None)] * rank
        for s, e, a, st in zip(starts, ends, axes_n, steps_n):
            index[a] = slice(s, e, st)
        params = {"starts": starts, "ends": ends, "axes": axes_n, "steps": steps_n}
        return self._move(node, ins[0], "Slice", params, lambda arr: arr[tuple(index)],
                          lambda a: a if index[a] == slice(None) else None)

    def op_Concat(self, node, ins, attrs):
        axis = attrs["axis"]
        qs = [self._unwrap(node, v) for v in ins]
        wrapped = {w for _, w in qs}
        first = qs[0][0]
        if len(wrapped) > 1 or any(not _same_meaning(first, q) for q, _ in qs):
            return self.concat_mixed(node, ins, attrs)
        if any(q.scale is not None and not q.per_tensor for q, _ in qs):
            raise fail(node, "concatenates per-channel quantized tensors")
        if all(q.is_const for q, _ in qs):
            data = np.concatenate([q.data for q, _ in qs], axis=axis)
            out = replace(first, name=None, data=data, shape=data.shape)
        else:
            dtypes = {q.dtype.name for q, _ in qs}
            if len(dtypes) > 1:
                raise fail(node, f"concatenates tensors of different types {sorted(dtypes)}")
            result = self.qnode("Concat", [self.place(q) for q, _ in qs], node.outputs[0], node.name, axis=axis)
            out = replace(first, name=result.name, shape=result.shape, data=None)
        return Dequantized(out) if wrapped == {True} else out

    def concat_mixed(self, node, ins, attrs):
        raise fail(node, "concatenates tensors quantized differently")

    def op_Split(self, node, ins, attrs):
        shape = self._shape_of(node, ins[0])
        axis = attrs.get("axis", 0) % len(shape)
        size = shape[axis]
        split = attrs.get("split")
        if split is None and len(ins) > 1 and ins[1] is not None:
            split = self.ints(node, ins[1], "split")
        count = len(node.outputs)
        if split is None:
            if not isinstance(size, int):
                raise fail(node, "splits a symbolic dimension; give --shape")
            chunk = -(-size // count)
            split = [min(chunk, size - i * chunk) for i in range(count)]
        results, start = [], 0
        for i, part in enumerate(split):
            sub = Node("Slice", [], [node.outputs[i]], {}, f"{node.name or node.outputs[0]}.{i}")
            index = [slice(None)] * len(shape)
            index[axis] = slice(start, start + part)
            results.append(self._move(sub, ins[0], "Slice", {"starts": [start], "ends": [start + part], "axes": [axis]},
                                      lambda a, index=tuple(index): a[index], lambda a: a if a != axis else None))
            start += part
        return results

    def op_MaxPool(self, node, ins, attrs):
        if len(node.outputs) > 1 and node.outputs[1]:
            raise fail(node, "the Indices output is not supported")
        q, _ = self._unwrap(node, ins[0])
        if q.scale is not None and np.any(np.asarray(q.scale) <= 0):
            raise fail(node, "needs positive scales")
        params = self.window_params(node, attrs, q.shape, list(attrs["kernel_shape"]))
        params.pop("group", None)
        params["kernel_shape"] = list(attrs["kernel_shape"])
        params["ceil_mode"] = bool(attrs.get("ceil_mode", 0))
        result = self._move(node, ins[0], "MaxPool", params, lambda a: a)
        return [result] + ([None] if len(node.outputs) > 1 else [])

    def bound_padding(self, node, shape, pads, itemsize: int = 1) -> None:
        """Pads are attributes: the smallest tensor they can make (unknown dimensions taken as
        1) must fit what the model may allocate, whatever the batch a run binds."""
        spatial = len(pads) // 2
        if not pads or len(pads) % 2 or spatial > len(shape) or self.g.budget is None:
            return
        lead = len(shape) - spatial
        dims = [d if isinstance(d, int) else 1 for d in shape]
        for i in range(spatial):
            dims[lead + i] += pads[i] + pads[spatial + i]
        if array_bytes(dims, itemsize) > self.g.budget.limit:
            raise fail(node, f"pads {list(pads)} make a tensor of at least {array_bytes(dims, itemsize)} bytes, "
                             f"beyond what this model may allocate ({self.g.budget.limit})")

    def window_params(self, node, attrs, shape, kernel) -> dict:
        spatial = len(kernel)
        strides = list(attrs.get("strides", [1] * spatial))
        dilations = list(attrs.get("dilations", [1] * spatial))
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0] * (2 * spatial)
            for i in range(spatial):
                size = shape[2 + i]
                if not isinstance(size, int):
                    raise fail(node, "auto_pad needs static spatial sizes; give --shape")
                out = -(-size // strides[i])
                total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
                small, large = total // 2, total - total // 2
                pads[i], pads[spatial + i] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        elif auto_pad == "VALID":
            pads = [0] * (2 * spatial)
        self.bound_padding(node, shape, pads)
        return {"strides": strides, "pads": pads, "dilations": dilations, "group": attrs.get("group", 1)}

    def op_Pad(self, node, ins, attrs):
        mode = attrs.get("mode", "constant")
        q, wrapped = self._unwrap(node, ins[0])
        rank = len(q.shape)
        if "pads" in attrs:  # opset < 11
            pads = list(attrs["pads"])
            value = attrs.get("value", 0.0)
        else:
            pads = self.ints(node, ins[1], "pads")
            value = self.const_value(node, ins[2], "the pad value") if len(ins) > 2 and ins[2] is not None else 0
            if len(ins) > 3 and ins[3] is not None:
                axes = [a % rank for a in self.ints(node, ins[3], "axes")]
                full = [0] * (2 * rank)
                for i, a in enumerate(axes):
                    full[a], full[rank + a] = pads[i], pads[len(axes) + i]
                pads = full
        value = float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
        if wrapped and q.scale is not None:
            if not q.per_tensor:
                raise fail(node, "pads a per-channel quantized tensor")
            level = value / float(np.asarray(q.scale).reshape(-1)[0]) + q.zp_scalar()
        else:
            level = value
        if level != round(level) or not q.dtype.lo <= level <= q.dtype.hi:
            raise fail(node, f"the pad value {value} is not exactly representable in the quantized tensor")
        level = int(round(level))
        modes = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}
        if mode not in modes:
            raise fail(node, f"pad mode {mode!r} is not supported")
        self.bound_padding(node, q.shape, pads, q.dtype.storage.itemsize)

        def const_fn(a):
            from refsim.ops import Pad
            padded = [d + pads[i] + pads[rank + i] for i, d in enumerate(a.shape)] if len(pads) == 2 * rank else a.shape
            if self.g.budget is not None:
                self.g.budget.take(array_bytes(padded, a.itemsize), node.describe(), "the padded constant")
            return Pad(a, pads=pads, mode=mode, value=level)
        return self._move(node, ins[0], "Pad", {"pads": pads, "mode": mode, "value": level}, const_fn,
                          lambda a: a if pads[a] == pads[rank + a] == 0 else None)


def _moved_row_norm(op: str, params: dict, before: tuple, after: tuple, norm: float) -> float | None:
    """A bound on the L2 norm of each row (last axis) after a movement, from one before it:
    rows that stay rows, or split (Reshape to a divisor of the last axis, in C order), keep it;
    c rows merged into one multiply it by sqrt(c); anything else loses it."""
    if not before or not after or not isinstance(before[-1], int) or not isinstance(after[-1], int):
        return None
    if op == "Transpose":
        return norm if list(params.get("perm") or [])[-1:] == [len(before) - 1] else None
    if op == "Slice":
        return norm
    if op == "Reshape":
        if before[-1] % after[-1] == 0:
            return norm
        if after[-1] % before[-1] == 0:
            return norm * float(np.sqrt(after[-1] // before[-1]))
    return None


def _onnx_reshape(array: np.ndarray, shape: list[int]) -> np.ndarray:
    target = [array.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return array.reshape(target)


def _same_meaning(a: QTensor, b: QTensor) -> bool:
    if (a.scale is None) != (b.scale is None):
        return False
    if a.scale is None:
        return True
    return (np.array_equal(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point)) and a.axis == b.axis)


def quantization_entry(q: QTensor) -> dict:
    entry = {
        "scale": [float(v) for v in np.asarray(q.scale, np.float32).reshape(-1)],
        "zero_point": [int(v) for v in np.asarray(q.zero_point if q.zero_point is not None else np.zeros_like(q.scale, np.int64)).reshape(-1)],
    }
    if q.axis is not None and not q.per_tensor:
        entry["axis"] = int(q.axis)
        entry["scale_shape"] = list(np.asarray(q.scale).shape)
    if q.block_size:
        entry["block_size"] = int(q.block_size)
    return entry


def _display_quant(q: QTensor):
    scale = [float(v) for v in np.asarray(q.scale, np.float32).reshape(-1)]
    zp = [int(v) for v in np.asarray(q.zero_point if q.zero_point is not None else 0).reshape(-1)]
    if len(scale) == 1:
        return scale[0], zp[0], None
    if q.block_size:
        return None, None, None
    return scale, zp, q.axis
