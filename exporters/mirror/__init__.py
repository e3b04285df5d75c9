"""Fake-quant mirrors of the integer nonlinear ops.

The fake-quant model (`exporters.fakequant`) replaces each float nonlinearity the exporter
lowered to an integer op (softmax, GELU, LayerNorm, tables) by a mirror: float64 ONNX ops
that compute, on the exact integer values of the op's input, exactly the integer output the
refsim op computes (as I-BERT's QAT modules compute the integer formula in float tensors).
The integer model and the fake-quant model then differ only by what integer arithmetic
costs outside the nonlinearities.

A builder is registered for one or more integer op types with `@mirrors("OpType", ...)`:

    build(fg, inputs, attrs, consts) -> str

- `fg`: the `exporters.frontend.graph.Graph` being turned into the fake-quant model. Add
  nodes with `emit` below (it appends them to `fg.nodes`; the caller toposorts); every op
  must run in onnxruntime on DOUBLE.
- `inputs`: names of DOUBLE tensors in `fg` holding the integer node's runtime inputs exactly
  (integers); a mask input, where the op has one, is a DOUBLE 0/1 "keep" tensor
  broadcastable to the scores.
- `attrs`: the integer node's attributes as stored in the .intq; `consts`: its constant
  inputs by input position (e.g. {1: bias} for IBertLayerNorm(x, bias)).
- returns the name of a DOUBLE tensor holding exactly the refsim op's integer output.

Exactness in float64: every intermediate is an integer below 2^53 (each builder says why),
floor divisions are corrected where fl(a/b) can round across an integer (`floor_div`),
integer square roots are corrected where y*y > v (`isqrt`).

Builders live in `ibert.py` (I-BERT mode, tables) and `ita.py` (ITA); importing this
package imports them.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

MIRRORS: dict[str, Callable] = {}
DOUBLE = 11  # onnx.TensorProto.DOUBLE
BOOL = 9


def mirrors(*op_types: str):
    """Register the decorated builder for the integer op types `op_types`."""

    def register(build: Callable) -> Callable:
        for op in op_types:
            if op in MIRRORS:
                raise ValueError(f"two fake-quant mirrors for {op}")
            MIRRORS[op] = build
        return build

    return register


# --- helpers shared by the builders ------------------------------------------------------------


def emit(fg, op: str, inputs: list[str], stem: str, **attrs) -> str:
    """Add one node to `fg` and return its output's name."""
    node = fg.make_node(op, inputs, stem, **attrs)
    fg.nodes.append(node)
    return node.outputs[0]


def const(fg, value, stem: str = "mirror") -> str:
    """A DOUBLE constant."""
    return fg.add_const(np.asarray(value, np.float64), stem)


def as_double(fg, flag: str) -> str:
    """A BOOL tensor as DOUBLE 0/1."""
    return emit(fg, "Cast", [flag], "mirror.flag", to=DOUBLE)


def at_most(fg, a: str, b: str, stem: str) -> str:
    """DOUBLE 0/1: a <= b (Not(Greater): LessOrEqual needs opset 12, the float model may be older)."""
    return as_double(fg, emit(fg, "Not", [emit(fg, "Greater", [a, b], stem)], stem))


def odd(fg, v: str, stem: str) -> str:
    """DOUBLE 0/1: whether the integer-valued v (|v| < 2^53) is odd."""
    half = emit(fg, "Floor", [emit(fg, "Mul", [v, const(fg, 0.5, f"{stem}.half")], stem)], stem)
    return emit(fg, "Sub", [v, emit(fg, "Add", [half, half], stem)], stem)


def reduce_last(fg, op: str, x: str, stem: str) -> str:
    """ReduceSum / ReduceMax over the last axis, keeping it; axes is an input from opset 13
    (ReduceSum) / 18 (ReduceMax) on, an attribute before."""
    since = 13 if op == "ReduceSum" else 18
    if fg.opset >= since:
        axes = fg.add_const(np.array([-1], np.int64), f"{stem}.axes")
        return emit(fg, op, [x, axes], stem, keepdims=1)
    return emit(fg, op, [x], stem, axes=[-1], keepdims=1)


def floor_div(fg, a: str, b: str, stem: str) -> str:
    """floor(a / b) exactly, for integer-valued DOUBLE a and b > 0 with |a|, |b| < 2^53.

    fl(a / b) can round onto the integer next to the true quotient, so floor(fl(a / b)) can
    be one off either way; q * b > a and (q + 1) * b <= a detect it (the products are exact
    integers below 2^53 because |q * b| <= |a| + b)."""
    q = emit(fg, "Floor", [emit(fg, "Div", [a, b], stem)], stem)
    q = emit(fg, "Sub", [q, as_double(fg, emit(fg, "Greater", [emit(fg, "Mul", [q, b], stem), a], stem))], stem)
    q1 = emit(fg, "Add", [q, const(fg, 1.0, f"{stem}.one")], stem)
    return emit(fg, "Add", [q, at_most(fg, emit(fg, "Mul", [q1, b], stem), a, stem)], stem)


def isqrt(fg, v: str, stem: str) -> str:
    """floor(sqrt(v)) exactly for integer-valued DOUBLE 0 <= v < 2^53: sqrt is correctly
    rounded, so floor(fl(sqrt(v))) is off by at most one (below 2^52 never; from 2^52 on,
    sqrt(k^2 - 1) rounds up to k); fix y*y > v and (y+1)^2 <= v (a square past 2^53 rounds,
    but to a value still above v)."""
    y = emit(fg, "Floor", [emit(fg, "Sqrt", [v], stem)], stem)
    y = emit(fg, "Sub", [y, as_double(fg, emit(fg, "Greater", [emit(fg, "Mul", [y, y], stem), v], stem))], stem)
    y1 = emit(fg, "Add", [y, const(fg, 1.0, f"{stem}.one")], stem)
    return emit(fg, "Add", [y, at_most(fg, emit(fg, "Mul", [y1, y1], stem), v, stem)], stem)


def builder(op_type: str) -> Callable | None:
    """The mirror of integer op `op_type`, or None (the float node then stays float)."""
    _load()
    return MIRRORS.get(op_type)


_LOADED = False


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name in ("ibert", "ita"):
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise


__all__ = ["MIRRORS", "mirrors", "builder", "emit", "const", "as_double", "at_most", "odd", "reduce_last",
           "floor_div", "isqrt", "DOUBLE", "BOOL"]
