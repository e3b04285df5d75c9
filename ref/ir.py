"""The integer graph: tensors with declared types, nodes, and validation.

A graph is a list of nodes in any order plus a table of every tensor it names. A tensor is
a graph input, a constant (it has data), or the output of exactly one node. Shapes may
hold symbolic dimensions (strings such as "batch" or "seq") that are bound when the graph
runs, or None where a dimension is unknown before running.

Floats appear here only as `scale`/`zero_point` metadata for display and comparison; they
never take part in computation.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .dtypes import IntType, check_fits, int_type
from .errors import GraphError, RefsimError

Dim = int | str | None
Shape = tuple[Dim, ...]


@dataclass
class Tensor:
    """A named tensor: declared integer type and shape, optional constant data."""

    name: str
    dtype: IntType
    shape: Shape
    data: np.ndarray | None = None
    scale: float | list[float] | None = None
    zero_point: int | list[int] | None = None
    # Axis that per-channel scale/zero_point run along; None for per-tensor.
    quant_axis: int | None = None

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def size(self) -> int | None:
        """Element count, or None when a dimension is symbolic or unknown."""
        if all(isinstance(d, int) for d in self.shape):
            return math.prod(self.shape)
        return None


@dataclass
class Node:
    """One op application: `outputs = op(*inputs, **attrs)`. '' marks an omitted input."""

    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def describe(self) -> str:
        return f"node {self.name!r} ({self.op})"


@dataclass
class Graph:
    name: str
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, Tensor]
    nodes: list[Node]
    # Free-form JSON metadata (labels, tokenizer settings, calibration fingerprint, ...).
    metadata: dict[str, Any] = field(default_factory=dict)
    # Named byte strings stored beside the tensors (for example a tokenizer.json).
    blobs: dict[str, bytes] = field(default_factory=dict)
    # The memory map the constants were read from, if any (see Model.__init__).
    mapping: Any = field(default=None, repr=False, compare=False)

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                if name:
                    users.setdefault(name, []).append(node)
        return users


def make_shape(dims) -> Shape:
    """Normalise a shape given as a list of ints, strings and None."""
    shape = []
    for d in dims:
        if d is None or isinstance(d, str):
            shape.append(d)
        elif isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            shape.append(int(d))
        else:
            raise RefsimError(f"invalid dimension {d!r} in shape {list(dims)!r}")
    return tuple(shape)


def const_tensor(name: str, values, dtype: str | IntType, **meta) -> Tensor:
    """A constant tensor whose values are checked against the declared type."""
    t = int_type(dtype)
    array = np.asarray(values)
    if array.dtype.kind == "O":  # Python ints beyond int64, or mixed objects
        try:
            array = array.astype(np.int64)
        except (OverflowError, TypeError, ValueError):
            raise RefsimError(f"constant {name!r}: values are not integers within int64") from None
    if array.dtype.kind not in "iubf":
        raise RefsimError(f"constant {name!r}: values are not integers (dtype {array.dtype})")
    if array.dtype.kind == "f" and array.size and not (
        np.all(np.mod(array, 1) == 0) and np.all(np.abs(array) < 2.0**63)
    ):
        raise RefsimError(f"constant {name!r}: values are not integers")
    check_fits(array.astype(np.int64, copy=False), t, f"constant {name!r}")
    array = np.asarray(array.astype(t.storage, copy=False), order="C")
    return Tensor(name, t, array.shape, array, **meta)


def _check_quantization(t: Tensor) -> None:
    """scale / zero_point / quant_axis are display metadata, but consumers index with them."""
    for key, limit in (("scale", math.inf), ("zero_point", 2.0**63)):
        value = getattr(t, key)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        if not values or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            and math.isfinite(v) and abs(v) < limit
            for v in values
        ):
            what = "finite numbers" if key == "scale" else "numbers within int64"
            raise GraphError(f"tensor {t.name!r}: {key} must be one of {what} or a non-empty list of them")
    axis = t.quant_axis
    if axis is not None and not (isinstance(axis, (int, np.integer)) and -len(t.shape) <= axis < len(t.shape)):
        raise GraphError(f"tensor {t.name!r}: quant_axis {axis!r} is not an axis of its shape {list(t.shape)}")


def toposort(graph: Graph) -> list[Node]:
    """Nodes in an order where every input is produced before use; errors on cycles.

    Kahn's algorithm, taking the ready node that comes first in the file each time, so a
    graph already in order keeps its order. Linear in the size of the graph.
    """
    available = set(graph.inputs) | {n for n, t in graph.tensors.items() if t.is_const}
    available.add("")
    waiting_on: list[int] = []
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.nodes):
        missing = {name for name in node.inputs if name not in available}
        waiting_on.append(len(missing))
        for name in missing:
            consumers.setdefault(name, []).append(index)
    ready = [i for i, count in enumerate(waiting_on) if count == 0]
    heapq.heapify(ready)
    ordered: list[Node] = []
    while ready:
        node = graph.nodes[heapq.heappop(ready)]
        ordered.append(node)
        for name in node.outputs:
            for user in consumers.pop(name, ()):
                waiting_on[user] -= 1
                if waiting_on[user] == 0:
                    heapq.heappush(ready, user)
    if len(ordered) < len(graph.nodes):
        done = {id(n) for n in ordered}
        stuck = next(n for n in graph.nodes if id(n) not in done)
        produced = {out for n in graph.nodes for out in n.outputs}
        missing = [n for n in stuck.inputs if n not in available and not any(n in m.outputs for m in ordered)]
        why = "form a cycle" if all(n in produced for n in missing) else "are never produced"
        raise GraphError(f"{stuck.describe()}: inputs {missing} {why}")
    return ordered


def validate(graph: Graph) -> list[Node]:
    """Check the graph's structure and every node against its op's schema.

    Returns the nodes in execution order. Raises GraphError naming the node or tensor at
    fault: unknown op, missing or dangling tensor, duplicate producer, cycle, input types
    an op does not accept, bad attributes, or a declared output type or shape that
    disagrees with what the op produces.
    """
    from .ops import registry  # the op table imports this module

    tensors = graph.tensors
    for t in tensors.values():
        _check_quantization(t)
    for name in graph.inputs:
        if name not in tensors:
            raise GraphError(f"graph input {name!r} has no tensor entry")
        if tensors[name].is_const:
            raise GraphError(f"graph input {name!r} is also a constant")
    produced: dict[str, Node] = {}
    names_seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name:
            node.name = f"{node.op}_{index}"
        if node.name in names_seen:
            raise GraphError(f"two nodes are named {node.name!r}")
        names_seen.add(node.name)
        schema = registry.lookup(node.op, node)
        for name in node.inputs:
            if name and name not in tensors:
                raise GraphError(f"{node.describe()}: input {name!r} is not a declared tensor")
        for name in node.outputs:
            if not name:
                raise GraphError(f"{node.describe()}: an output has an empty name")
            if name not in tensors:
                raise GraphError(f"{node.describe()}: output {name!r} is not a declared tensor")
            if name in produced:
                raise GraphError(
                    f"tensor {name!r} is produced by both {produced[name].describe()} "
                    f"and {node.describe()}"
                )
            if name in graph.inputs or tensors[name].is_const:
                raise GraphError(f"{node.describe()}: output {name!r} is a graph input or constant")
            produced[name] = node
        schema.check_arity(node)
        schema.check_attrs(node)
    for name in graph.outputs:
        if name not in tensors:
            raise GraphError(f"graph output {name!r} has no tensor entry")
        if name not in produced and name not in graph.inputs and not tensors[name].is_const:
            raise GraphError(f"graph output {name!r} is never produced")
    for name, t in tensors.items():
        if not t.is_const and name not in produced and name not in graph.inputs:
            raise GraphError(f"tensor {name!r} is neither an input, a constant nor produced by a node")
    order = toposort(graph)
    for node in order:
        registry.lookup(node.op, node).check_types(node, tensors)
    return order
