"""Building integer graphs by hand (tests, examples and the exporters use this).

    b = GraphBuilder("tiny")
    x = b.input("x", "int8", ["batch", 4])
    w = b.const([[1, -2], [3, 4], [-5, 6], [7, -8]], "int4")
    acc = b.node("MatMul", [x, w])
    y = b.node("Requant", [acc, b.const(3, "int32"), b.const(4, "int8")], dtype="int8")
    b.output(y)
    model = b.model()

Each node's output type and shape come from its op's inference, so a builder graph is
valid by construction; `build()` validates it once more as a whole.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .dtypes import int_type
from .engine import Model
from .errors import GraphError
from .ir import Graph, Node, Tensor, const_tensor, make_shape, validate
from .ops import registry


class GraphBuilder:
    def __init__(self, name: str = "graph"):
        self.name = name
        self.tensors: dict[str, Tensor] = {}
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.blobs: dict[str, bytes] = {}
        self._counter = 0
        self._node_names: set[str] = set()
        self._reserved: set[str] = set()
        self._stem_counts: dict[str, int] = {}

    def _taken(self, name: str) -> bool:
        return name in self.tensors or name in self._node_names or name in self._reserved

    def _fresh(self, stem: str) -> str:
        while True:
            self._counter += 1
            name = f"{stem}_{self._counter}"
            if not self._taken(name):
                return name

    def unique_name(self, stem: str) -> str:
        """A tensor/node name not used (or handed out) yet: `stem` itself if free, else
        `stem_2`, `stem_3`, ... The name is reserved until the caller declares it."""
        stem = stem.strip(".") or "t"
        name, n = stem, self._stem_counts.get(stem, 1)
        while self._taken(name):
            n += 1
            name = f"{stem}_{n}"
        self._stem_counts[stem] = n
        self._reserved.add(name)
        return name

    def _add(self, tensor: Tensor) -> str:
        if tensor.name in self.tensors:
            raise GraphError(f"tensor {tensor.name!r} is declared twice")
        self.tensors[tensor.name] = tensor
        return tensor.name

    def input(self, name: str, dtype: str, shape: Sequence, **quant) -> str:
        """Declare a graph input; shape entries may be ints, symbols (str) or None."""
        self._add(Tensor(name, int_type(dtype), make_shape(shape), **quant))
        self.inputs.append(name)
        return name

    def const(self, values, dtype: str, name: str | None = None, **quant) -> str:
        """Add a constant tensor; its values must fit `dtype`."""
        return self._add(const_tensor(name or self._fresh("const"), np.asarray(values), dtype, **quant))

    def node(
        self,
        op: str,
        inputs: Sequence[str | None],
        outputs: Sequence[str] | str | None = None,
        name: str | None = None,
        **attrs,
    ) -> str | tuple[str, ...]:
        """Append `op(*inputs, **attrs)`; returns the output name (a tuple if several)."""
        schema = registry.lookup(op)
        # An attribute given as None is omitted: its default (None) applies, and the node
        # stays serialisable.
        attrs = {k: v for k, v in attrs.items() if not (v is None and schema.defaults.get(k) is None)}
        node = Node(op, [i or "" for i in inputs], [], attrs, name or self._fresh(op))
        if isinstance(outputs, str):
            outputs = [outputs]
        outputs = list(outputs) if outputs else (
            [node.name] if len(schema.outputs) == 1 else [f"{node.name}.{o}" for o in schema.outputs]
        )
        node.outputs = outputs
        schema.check_arity(node)
        schema.check_attrs(node)
        for i in node.inputs:
            if i and i not in self.tensors:
                raise GraphError(f"{node.describe()}: input {i!r} is not declared yet")
        for out in outputs:
            if out in self.tensors or outputs.count(out) > 1:
                raise GraphError(f"{node.describe()}: output {out!r} is already declared")
        if node.name in self._node_names:
            raise GraphError(f"two nodes are named {node.name!r}")
        for out, (dtype, shape) in zip(outputs, schema.infer_node(node, self.tensors)):
            self._add(Tensor(out, dtype, tuple(shape)))
        self.nodes.append(node)
        self._node_names.add(node.name)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def set_quant(self, name: str, scale=None, zero_point=None, axis: int | None = None) -> None:
        """Record the float scale/zero point a tensor stands for (display only)."""
        t = self.tensors[name]
        t.scale, t.zero_point, t.quant_axis = scale, zero_point, axis

    def output(self, *names: str) -> None:
        self.outputs.extend(names)

    def build(self) -> Graph:
        graph = Graph(self.name, list(self.inputs), list(self.outputs), dict(self.tensors),
                      list(self.nodes), dict(self.metadata), dict(self.blobs))
        validate(graph)
        return graph

    def model(self) -> Model:
        return Model(self.build())
