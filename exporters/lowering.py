"""Integer-only ONNX subgraphs as refsim integer ops, exactly.

Some models compute integers from their integer inputs at run time: RoBERTa-family
position ids from `input_ids != padding_idx` (Equal, Not, Cast, CumSum, Mul, Add), position
ids counted from a mask, token-type grids. Everything the export can evaluate is folded
(`frontend.fold`); what depends on the inputs is computed here with refsim's integer ops,
so nothing of it becomes a float in the integer model. Booleans are 0/1 integers.

| ONNX | refsim, exact for integers a, b (booleans 0/1) |
|---|---|
| Add, Sub, Mul | the same op, in the ONNX result type (int64 wraps around as in ONNX) |
| Neg(a) | 0 - a |
| Equal(a, b) | 1 - min((a - b)^2, 1) |
| Not(a) | 1 - a |
| Greater(a, b), Less(b, a) | clip(a - b, 0, 1) |
| GreaterOrEqual(a, b), LessOrEqual(b, a) | clip(a - b + 1, 0, 1) |
| And(a, b), Or(a, b), Xor(a, b) | a * b, min(a + b, 1), (a - b)^2 |
| Where(c, a, b) | c * a + (1 - c) * b |
| Max(a, b), Min(a, b) | b + relu(a - b), a - relu(a - b) |
| Cast(a) to an integer type | a when every value fits (widening), else Cast with ONNX's wrap-around |
| Cast(a) to bool | min(a^2, 1) |
| CumSum(a, axis = last) | a @ T, T[i, j] = 1 for i <= j (i < j exclusive; reversed for reverse) |
| Concat | Concat |
| GatherElements(table, a, axis) of a constant table with one row | Gather(table as 1-D, a) (HF's buffered token-type ids gathered by position ids) |

Movement ops (Reshape, Transpose, Slice, Gather by constant indices, Concat) on these values
are the ordinary ones; a Gather from a constant table by them is an embedding lookup.
"""

from __future__ import annotations

import numpy as np
import onnx
from refsim.dtypes import TYPES

from .dyadic import ExportError
from .frontend.graph import INTEGER_TYPES, Node

INTEGER_OPS = ("Add", "Sub", "Mul", "Neg", "Equal", "Not", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
               "And", "Or", "Xor", "Where", "Max", "Min", "Cast", "CumSum", "Concat", "GatherElements")


class IntegerLowering:
    """Emits the integer form of one node whose data inputs are all plain integers."""

    def __init__(self, walker):
        self.w = walker
        self.em = walker.em

    def operand(self, node: Node, name: str) -> str:
        g = self.w.g
        if g.is_const(name):
            value = g.const(name)
            if value.dtype.kind not in "iub":
                raise ExportError(f"{node.describe()}: a float constant in an integer computation is not supported")
            return self.em.const(value.astype(np.int64), None, f"{self.layer(node)}.const")
        return self.w.value(name).name

    def layer(self, node: Node) -> str:
        return self.w.layer_name(node)

    def emit(self, node: Node) -> str:
        op = node.op
        stem = f"{self.layer(node)}.{op.lower()}"
        ins = [self.operand(node, i) for i in node.inputs if i]
        node_ = self.em.node
        one = lambda: self.em.const(1, "int8", f"{stem}.one")  # noqa: E731
        wrap = self._onnx_type(node)
        if op in ("Add", "Sub", "Mul"):
            return node_(op, ins[:2], stem, **wrap)
        if op == "Neg":
            return node_("Sub", [self.em.const(0, "int8", f"{stem}.zero"), ins[0]], stem, **wrap)
        if op == "Equal":
            return node_("Sub", [one(), self._nonzero(self._diff(ins[0], ins[1], stem), stem)], stem, dtype="uint8")
        if op == "Not":
            return node_("Sub", [one(), ins[0]], stem, dtype="uint8")
        if op in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
            a, b = (ins[0], ins[1]) if op.startswith("Greater") else (ins[1], ins[0])
            d = node_("Sub", [a, b], f"{stem}.diff", dtype="int64")
            if op.endswith("OrEqual"):
                d = node_("Add", [d, one()], f"{stem}.diff", dtype="int64")
            return self._small(node_("Clip", [d], f"{stem}.clip", lo=0, hi=1), stem)
        if op == "And":
            return node_("Mul", ins[:2], stem)
        if op == "Or":
            return self._small(node_("Clip", [node_("Add", ins[:2], f"{stem}.sum")], f"{stem}.clip", hi=1), stem)
        if op == "Xor":
            d = self._diff(ins[0], ins[1], stem)
            return self._small(node_("Mul", [d, d], f"{stem}.square", dtype="int64"), stem)
        if op == "Where":
            c, a, b = ins
            kept = node_("Mul", [c, a], f"{stem}.kept", dtype="int64")
            other = node_("Mul", [node_("Sub", [one(), c], f"{stem}.not", dtype="uint8"), b], f"{stem}.other", dtype="int64")
            return node_("Add", [kept, other], stem, **wrap)
        if op in ("Max", "Min"):
            if len(ins) != 2:
                raise ExportError(f"{node.describe()}: {op} of {len(ins)} integer inputs is not supported")
            excess = node_("Relu", [node_("Sub", [ins[0], ins[1]], f"{stem}.diff", dtype="int64")], f"{stem}.excess")
            if op == "Max":
                return node_("Add", [ins[1], excess], stem, **wrap)
            return node_("Sub", [ins[0], excess], stem, **wrap)
        if op == "Cast":
            return self._cast(node, ins[0], stem)
        if op == "CumSum":
            return self._cumsum(node, ins[0], stem)
        if op == "Concat":
            return node_("Concat", ins, stem, axis=int(node.attrs["axis"]))
        if op == "GatherElements":
            return self._gather_elements(node, stem)
        raise ExportError(f"{node.describe()}: op {op} on integers is not supported")

    def _onnx_type(self, node: Node) -> dict:
        """The ONNX result type, wrapping around as ONNX integer arithmetic does."""
        dtype = self.w.g.dtypes.get(node.outputs[0])
        if dtype is None or dtype.kind not in "iub":
            return {"dtype": "int64", "overflow": "wrap"}
        name = "uint8" if dtype.kind == "b" else dtype.name
        return {"dtype": name, "overflow": "wrap"}

    def _diff(self, a: str, b: str, stem: str) -> str:
        return self.em.node("Sub", [a, b], f"{stem}.diff", dtype="int64")

    def _nonzero(self, x: str, stem: str) -> str:
        """1 where x != 0, else 0: min(x^2, 1), as uint8."""
        square = self.em.node("Mul", [x, x], f"{stem}.square", dtype="int64")
        return self._small(self.em.node("Clip", [square], f"{stem}.clip", hi=1), f"{stem}.nonzero")

    def _small(self, x: str, stem: str) -> str:
        """A 0/1 result in its own narrow type (Clip keeps its input's)."""
        return self.em.node("Cast", [x], stem, dtype="uint8")

    def _cast(self, node: Node, x: str, stem: str) -> str:
        to = node.attrs["to"]
        if to == onnx.TensorProto.BOOL:
            return self._nonzero(x, stem)
        if to not in INTEGER_TYPES:
            raise ExportError(f"{node.describe()}: casts integers computed from the model's integer inputs to "
                              f"{onnx.TensorProto.DataType.Name(to)}; refsim keeps them integers (only integer "
                              f"inputs can feed embedding lookups, masks and integer ops)")
        target = TYPES[INTEGER_TYPES[to]]
        source = self.em.dtype(x)
        if target.lo <= source.lo and source.hi <= target.hi:
            return x  # widening: the same values
        return self.em.node("Cast", [x], stem, dtype=target.name, overflow="wrap")

    def _gather_elements(self, node: Node, stem: str) -> str:
        g = self.w.g
        data, indices = node.inputs[:2]
        if not g.is_const(data) or g.is_const(indices):
            raise ExportError(f"{node.describe()}: GatherElements of run-time data is not supported")
        table = g.const(data)
        axis = int(node.attrs.get("axis", 0)) % table.ndim
        if any(d != 1 for a, d in enumerate(table.shape) if a != axis) or table.dtype.kind not in "iub":
            raise ExportError(f"{node.describe()}: GatherElements from an integer table with more than one row "
                              f"is not supported")
        flat = self.em.const(table.reshape(-1).astype(np.int64), None, f"{stem}.table")
        return self.em.node("Gather", [flat, self.w.value(indices).name], stem, axis=0)

    def _cumsum(self, node: Node, x: str, stem: str) -> str:
        rank = len(self.em.shape(x))
        axis_name = node.inputs[1]
        if not self.w.g.is_const(axis_name):
            raise ExportError(f"{node.describe()}: CumSum along an axis computed at run time is not supported")
        axis = int(self.w.g.const(axis_name).reshape(())) % rank
        if axis != rank - 1:
            raise ExportError(f"{node.describe()}: CumSum along axis {axis} (not the last) is not supported")
        n = self.em.shape(x)[-1]
        if not isinstance(n, int):
            raise ExportError(f"{node.describe()}: CumSum over an axis of unknown size")
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        exclusive, reverse = node.attrs.get("exclusive", 0), node.attrs.get("reverse", 0)
        if reverse:
            tri = (i > j) if exclusive else (i >= j)
        else:
            tri = (i < j) if exclusive else (i <= j)
        t = self.em.const(tri.astype(np.int8), "int8", f"{stem}.triangle")
        return self.em.node("MatMul", [x, t], stem)
