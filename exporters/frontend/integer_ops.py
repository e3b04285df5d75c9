"""Integer-only ONNX ops as refsim integer ops, exactly: one lowering for export and import.

Models compute integers from their integer inputs at run time: RoBERTa-family position ids
from `input_ids != padding_idx` (Equal, Not, Cast, CumSum, Mul, Add), masks built by
comparisons and `Where`, token-type grids gathered by position ids. What the front end can
evaluate at export time is folded (`frontend.fold`); what depends on the inputs is
computed with refsim's integer ops here, so nothing of it becomes a float in the integer
model. Booleans are 0/1 integers. Every form is exact wherever its intermediate values fit
int64 (comparisons form a - b); refsim refuses, with an error naming the node, a value
that leaves int64 (where ONNX would wrap around).

| ONNX | refsim, exact for integers a, b (booleans 0/1) |
|---|---|
| Add, Sub, Mul | the same op in the ONNX result type (a result beyond int64, where ONNX would wrap around, is refused) |
| Neg(a) | 0 - a |
| Equal(a, b) | 1 - c^2, c = clip(a - b, -1, 1) (the difference saturated: no overflow) |
| Not(a) | 1 - a |
| Greater(a, b), Less(b, a) | clip(a - b, 0, 1) |
| GreaterOrEqual(a, b), LessOrEqual(b, a) | 1 - clip(b - a, 0, 1) |
| And(a, b), Or(a, b), Xor(a, b) | a * b, a + b - a * b, (a - b)^2 |
| Where(c, a, b) | c * a + (1 - c) * b |
| Max(a, b), Min(a, b) | b + relu(a - b), a - relu(a - b) |
| Cast(a) to an integer type | a when every value fits (widening), else Cast wrapping as ONNX does |
| Cast(a) to bool | c^2, c = clip(a, -1, 1) |
| CumSum(a, axis = last) | a @ T, T[i, j] = 1 for i <= j (i < j exclusive; mirrored for reverse) |
| Expand(a, shape) | a + zeros(shape) |
| Concat | Concat |
| GatherElements(table, a, axis) of a constant table with one row | Gather(table as 1-D, a) (HF's buffered token-type ids gathered by position ids) |
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from refsim.dtypes import TYPES, type_for_range

from ..dyadic import ExportError
from .emitter import Emitter
from .graph import INTEGER_TYPES, Node

INTEGER_OPS = ("Add", "Sub", "Mul", "Neg", "Equal", "Not", "Greater", "Less", "GreaterOrEqual", "LessOrEqual",
               "And", "Or", "Xor", "Where", "Max", "Min", "Cast", "CumSum", "Expand", "Concat", "GatherElements")


def lower(em: Emitter, node: Node, operand: Callable[[int], str], const: Callable[[int], np.ndarray | None],
          out_dtype: np.dtype | None, stem: str, name: str | None = None) -> str:
    """The integer form of `node`: `operand(k)` is the refsim tensor of input k (a constant
    placed in the graph on demand), `const(k)` its value when it is a constant (else None),
    `out_dtype` the ONNX result type (from shape inference); the node is named `name` (its
    output `stem`). Returns the output tensor."""
    op = node.op
    if op not in INTEGER_OPS:
        raise ExportError(f"{node.describe()}: op {op} on integers is not supported")
    out = _onnx_type(out_dtype)
    if op == "CumSum":
        return _cumsum(em, node, operand(0), const(1), stem, name)
    if op == "Expand":
        shape = const(1)
        if shape is None:
            raise ExportError(f"{node.describe()}: an Expand to a shape computed at run time is not supported")
        x = operand(0)
        zeros = em.const(np.zeros([int(d) for d in np.asarray(shape).reshape(-1)], np.int8), "int8", f"{stem}.zeros")
        return em.node("Add", [x, zeros], stem, name, dtype=em.dtype(x).name)
    if op == "GatherElements":
        return _gather_elements(em, node, const(0), operand(1), stem, name)
    ins = [operand(k) if i else None for k, i in enumerate(node.inputs)]
    a = ins[0]
    b = ins[1] if len(ins) > 1 else None
    if op in ("Add", "Sub", "Mul"):
        return em.node(op, [a, b], stem, name, **out)
    if op == "Neg":
        return em.node("Sub", [em.const(0, "int8", f"{stem}.zero"), a], stem, name, **out)
    if op == "Equal":
        differs = nonzero(em, em.node("Sub", [a, b], f"{stem}.difference", dtype="int64", overflow="saturate"), stem)
        return em.node("Sub", [_one(em, stem), differs], stem, name, dtype="uint8")
    if op == "Not":
        return em.node("Sub", [_one(em, stem), a], stem, name, dtype="uint8")
    if op in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual"):
        # a > b: clip(a - b, 0, 1); a >= b = 1 - (b > a). The difference saturates: no overflow.
        high, low = {"Greater": (a, b), "Less": (b, a), "GreaterOrEqual": (b, a), "LessOrEqual": (a, b)}[op]
        d = em.node("Sub", [high, low], f"{stem}.difference", dtype="int64", overflow="saturate")
        if not op.endswith("OrEqual"):
            return em.node("Cast", [em.node("Clip", [d], f"{stem}.clip", lo=0, hi=1)], stem, name, dtype="uint8")
        greater = em.node("Cast", [em.node("Clip", [d], f"{stem}.clip", lo=0, hi=1)], f"{stem}.opposite", dtype="uint8")
        return em.node("Sub", [_one(em, stem), greater], stem, name, dtype="uint8")
    if op == "And":
        return em.node("Mul", [a, b], stem, name, dtype="uint8")
    if op == "Or":
        both = em.node("Mul", [a, b], f"{stem}.both")
        return em.node("Sub", [em.node("Add", [a, b], f"{stem}.sum"), both], stem, name, dtype="uint8")
    if op == "Xor":
        d = em.node("Sub", [a, b], f"{stem}.difference")
        return em.node("Mul", [d, d], stem, name, dtype="uint8")
    if op == "Where":
        return select(em, a, b, ins[2], stem, name)
    if op in ("Max", "Min"):
        if len(ins) != 2:
            raise ExportError(f"{node.describe()}: {op} of {len(ins)} integer inputs is not supported")
        excess = em.node("Relu", [em.node("Sub", [a, b], f"{stem}.difference", dtype="int64")], f"{stem}.excess")
        if op == "Max":
            return em.node("Add", [b, excess], stem, name, **out)
        return em.node("Sub", [a, excess], stem, name, **out)
    if op == "Cast":
        return cast(em, node, a, stem, name)
    return em.node("Concat", ins, stem, name, axis=int(node.attrs["axis"]))


def nonzero(em: Emitter, x: str, stem: str) -> str:
    """x != 0 as 0/1 (uint8): c^2 with c = clip(x, -1, 1) (never near int64's limits)."""
    c = em.node("Clip", [x], f"{stem}.clip", lo=-1, hi=1)
    return em.node("Mul", [c, c], f"{stem}.nonzero", dtype="uint8")


def select(em: Emitter, cond: str, x: str, y: str, stem: str, node_name: str | None = None) -> str:
    """Where(cond, x, y) for a 0/1 condition: cond * x + (1 - cond) * y (one term is always 0,
    so nothing can overflow), in the narrowest type holding x and y."""
    tx, ty = em.dtype(x), em.dtype(y)
    dtype = type_for_range(min(tx.lo, ty.lo), max(tx.hi, ty.hi)).name
    kept = em.node("Mul", [cond, x], f"{stem}.kept", dtype=tx.name)
    not_cond = em.node("Sub", [_one(em, stem), cond], f"{stem}.not", dtype="uint8")
    other = em.node("Mul", [not_cond, y], f"{stem}.other", dtype=ty.name)
    return em.node("Add", [kept, other], stem, node_name, dtype=dtype)


def cast(em: Emitter, node: Node, x: str, stem: str, name: str | None = None) -> str:
    to = node.attrs["to"]
    if to == onnx.TensorProto.BOOL:
        return nonzero(em, x, stem)
    if to not in INTEGER_TYPES:
        raise ExportError(f"{node.describe()}: casts integers to {onnx.TensorProto.DataType.Name(to)}; refsim keeps "
                          f"integers computed from integer inputs integers (embedding indices, masks, integer ops)")
    target = TYPES[INTEGER_TYPES[to]]
    source = em.dtype(x)
    if target.lo <= source.lo and source.hi <= target.hi:
        return x  # widening: the same values
    return em.node("Cast", [x], stem, name, dtype=target.name, overflow="wrap")


def _one(em: Emitter, stem: str) -> str:
    return em.const(1, "uint8", f"{stem}.one")


def _onnx_type(dtype) -> dict:
    """The ONNX result type of integer arithmetic, wrapping around as ONNX integers do."""
    if dtype is None or np.dtype(dtype).kind not in "iub":
        return {"dtype": "int64", "overflow": "wrap"}
    dtype = np.dtype(dtype)
    return {"dtype": "uint8" if dtype.kind == "b" else dtype.name, "overflow": "wrap"}


def _cumsum(em: Emitter, node: Node, x: str, axis_value, stem: str, name: str | None) -> str:
    shape = em.shape(x)
    if axis_value is None:
        raise ExportError(f"{node.describe()}: CumSum along an axis computed at run time is not supported")
    axis = int(np.asarray(axis_value).reshape(())) % len(shape)
    if axis != len(shape) - 1:
        raise ExportError(f"{node.describe()}: CumSum along axis {axis} (not the last) is not supported")
    n = shape[-1]
    if not isinstance(n, int):
        raise ExportError(f"{node.describe()}: CumSum over an axis of unknown size")
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    exclusive, reverse = node.attrs.get("exclusive", 0), node.attrs.get("reverse", 0)
    if reverse:
        tri = (i > j) if exclusive else (i >= j)
    else:
        tri = (i < j) if exclusive else (i <= j)
    return em.node("MatMul", [x, em.const(tri.astype(np.int8), "int8", f"{stem}.triangle")], stem, name)


def _gather_elements(em: Emitter, node: Node, table, indices: str, stem: str, name: str | None) -> str:
    if table is None:
        raise ExportError(f"{node.describe()}: GatherElements of run-time data is not supported")
    table = np.asarray(table)
    axis = int(node.attrs.get("axis", 0)) % table.ndim
    if any(d != 1 for k, d in enumerate(table.shape) if k != axis) or table.dtype.kind not in "iub":
        raise ExportError(f"{node.describe()}: GatherElements from an integer table with more than one row is not supported")
    flat = em.const(table.reshape(-1).astype(np.int64), None, f"{stem}.table")
    return em.node("Gather", [flat, indices], stem, name, axis=0)
