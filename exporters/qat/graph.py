"""The integer graph `refsim export` emits, executed in torch (`qat.ops`), with the constants
that stand for float weights computed from trainable float parameters.

The exporter's fake-quant record says, for every weight, bias, embedding table and added
constant, which integer constant(s) hold it and at which scale: q = clip(round(w / s), lo,
hi). Here each such w is a float64 parameter and its integer constant is computed from it
at every forward pass, with the straight-through estimator (the value is the exact
integer, the gradient that of w / s clipped to [lo, hi]). Every other constant (requant
multipliers and shifts, LayerNorm and softmax parameters, tables) stays what the exporter
made. At initialisation the computed constants equal the exported ones exactly (checked),
so the untrained forward pass is the exported model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from refsim.ir import Graph, Node, const_tensor, toposort

from .errors import QatError
from .ops import F64, I64, OPS, Q, const_q


@dataclass
class Recipe:
    """One trainable float parameter and the integer constant(s) it becomes."""

    parameter: str  # key in IntegerGraph.weights
    parts: list[str]  # integer constants, joined along `axis` when more than one
    axis: int
    scale: np.ndarray  # scalar, or per channel along the joined constant's last axis
    lo: int
    hi: int


def _split_sizes(graph: Graph, parts: list[str], axis: int) -> list[int]:
    return [graph.tensors[p].data.shape[axis] for p in parts]


class IntegerGraph(torch.nn.Module):
    """`graph` (a refsim integer graph) as a torch module whose forward pass computes
    exactly what `refsim run` computes, for the current weights."""

    def __init__(self, graph: Graph, recipes: list[Recipe], initial: dict[str, np.ndarray], train_embeddings: bool = False):
        super().__init__()
        self.graph = graph
        self.order = toposort(graph)
        tables = {node.inputs[0] for node in self.order if node.op == "Gather"}
        # Embedding tables hold most of a text model's weights but few rows of them see a
        # gradient: unless asked, they keep their exported integers (and cost no optimiser state).
        trainable = [r for r in recipes if train_embeddings or not (set(r.parts) & tables)]
        self.recipes = trainable
        self.weights = torch.nn.ParameterDict(
            {_key(r.parameter): torch.nn.Parameter(torch.as_tensor(np.asarray(initial[r.parameter], np.float64)))
             for r in trainable})
        derived = {p for r in trainable for p in r.parts}
        self._frozen = {n: const_q(t.data) for n, t in graph.tensors.items() if t.is_const and n not in derived}
        self.length = _padded_length(graph)
        self._at_length: dict[int, tuple[dict, list]] = {}
        self.trim = self.length is not None  # run text batches at their longest kept length (see forward)
        self._types = {n: t.dtype for n, t in graph.tensors.items()}
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.order):
            for name in node.inputs:
                if name:
                    last_use[name] = i
        self._last_use = last_use
        for node in self.order:
            if node.op not in OPS:
                raise QatError(f"{node.describe()}: op {node.op} cannot be trained (supported: {', '.join(sorted(OPS))})")

    def parameter(self, name: str) -> torch.nn.Parameter:
        return self.weights[_key(name)]

    def constants(self) -> dict[str, Q]:
        """The integer constants computed from the current weights."""
        out = {}
        for r in self.recipes:
            w = self.parameter(r.parameter)
            joined_shape = _joined_shape(self.graph, r)
            x = w.reshape(joined_shape) / torch.as_tensor(np.asarray(r.scale, np.float64))
            e = torch.clamp(torch.round(x.detach()), r.lo, r.hi).to(I64)
            f = torch.clamp(x, r.lo, r.hi)
            f = e.to(F64) + (f - f.detach())  # exactly the integer, the gradient of w / s
            if len(r.parts) == 1:
                out[r.parts[0]] = Q(e, f)
                continue
            sizes = _split_sizes(self.graph, r.parts, r.axis)
            for name, pe, pf in zip(r.parts, torch.split(e, sizes, r.axis), torch.split(f, sizes, r.axis)):
                out[name] = Q(pe, pf)
        return out

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, Q]:
        """The graph's outputs for integer `feeds`.

        A text batch whose attention mask ends in zeros runs at its longest kept length:
        what the mask hides takes no part in any kept token's result (the softmax skips
        masked keys, pooling divides by the kept count), so the outputs are the same
        integers as at the full padded length, for a fraction of the work. The first
        trimmed batch is run both ways and compared, and a graph where they differ is run
        at full length from then on."""
        length = self._kept_length(feeds) if self.trim else None
        if length is None:
            return self._run(feeds, self._frozen, self.order, None)
        short = {k: np.asarray(v)[:, :length] if np.ndim(v) == 2 and np.shape(v)[1] == self.length else v for k, v in feeds.items()}
        frozen, order = self._trimmed(length)
        result = self._run(short, frozen, order, length)
        if not getattr(self, "_trim_checked", False):
            with torch.no_grad():
                full = self._run(feeds, self._frozen, self.order, None)
            self._trim_checked = True
            if not all(torch.equal(full[n].e, result[n].e) for n in self.graph.outputs):
                self.trim = False
                return self._run(feeds, self._frozen, self.order, None)
        return result

    def _kept_length(self, feeds) -> int | None:
        masks = [np.asarray(feeds[n]) for n in self.graph.inputs
                 if self._types[n].name == "uint8" and np.ndim(feeds.get(n)) == 2 and np.shape(feeds[n])[1] == self.length]
        if not masks:
            return None
        kept = np.any(np.stack(masks) != 0, axis=(0, 1))
        length = int(np.flatnonzero(kept).max()) + 1 if kept.any() else 1
        length = min(self.length, -(-length // 8) * 8)  # a few distinct lengths, not one per batch
        return None if length >= self.length else length

    def _trimmed(self, length: int):
        if length not in self._at_length:
            frozen = {n: _trim(q, self.length, length) for n, q in self._frozen.items()}
            order = []
            for node in self.order:
                if node.op == "Reshape" and self.length in node.attrs["shape"]:
                    shape = [length if d == self.length else d for d in node.attrs["shape"]]
                    node = Node(node.op, node.inputs, node.outputs, {**node.attrs, "shape": shape}, node.name)
                order.append(node)
            self._at_length[length] = (frozen, order)
        return self._at_length[length]

    def _run(self, feeds, frozen, order, length) -> dict[str, Q]:
        env: dict[str, Q] = dict(frozen)
        derived = self.constants()
        env.update(derived if length is None else {n: _trim(q, self.length, length) for n, q in derived.items()})
        for name in self.graph.inputs:
            if name not in feeds:
                raise QatError(f"missing input {name!r}")
            t = self._types[name]
            array = np.asarray(feeds[name])
            if array.dtype.kind not in "iub" or (array.size and (int(array.min()) < t.lo or int(array.max()) > t.hi)):
                raise QatError(f"input {name!r} must hold {t.name} integers")
            env[name] = const_q(array)
        keep = set(self.graph.outputs)
        for i, node in enumerate(order):
            args = [env[n] if n else None for n in node.inputs]
            while args and args[-1] is None:
                args.pop()
            types = [self._types[n] if n else None for n in node.inputs]
            result = OPS[node.op](node, *args, types=types)
            env[node.outputs[0]] = result
            for name in node.inputs:
                if name and self._last_use.get(name) == i and name not in keep and name not in frozen:
                    env.pop(name, None)  # autograd keeps what backward needs
        return {name: env[name] for name in self.graph.outputs}

    def integer_constants(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {name: q.e.numpy() for name, q in self.constants().items()}

    def exported_graph(self) -> Graph:
        """The graph with the current integer constants (metadata unchanged)."""
        tensors = dict(self.graph.tensors)
        for name, values in self.integer_constants().items():
            old = tensors[name]
            tensors[name] = const_tensor(name, values.reshape(old.data.shape), old.dtype, scale=old.scale,
                                         zero_point=old.zero_point, quant_axis=old.quant_axis)
        return Graph(self.graph.name, list(self.graph.inputs), list(self.graph.outputs), tensors, list(self.graph.nodes),
                     dict(self.graph.metadata), dict(self.graph.blobs))


def _padded_length(graph: Graph) -> int | None:
    """The padded sequence length of a text graph (its uint8 attention-mask input's last
    axis), when no weight has a dimension of that size (which trimming could confuse)."""
    lengths = {graph.tensors[n].shape[1] for n in graph.inputs
               if graph.tensors[n].dtype.name == "uint8" and len(graph.tensors[n].shape) == 2}
    if len(lengths) != 1 or not isinstance(next(iter(lengths)), int):
        return None
    length = next(iter(lengths))
    for node in graph.nodes:
        if node.op == "MatMul" and any(graph.tensors[i].is_const and length in graph.tensors[i].shape for i in node.inputs[:2]):
            return None
    return length


def _trim(q: Q, full: int, length: int) -> Q:
    """A constant's sequence axis (the one of size `full`, if exactly one) cut to `length`."""
    axes = [i for i, d in enumerate(q.f.shape) if d == full]
    if len(axes) != 1 or q.f.dim() < 2:
        return q
    return q.moved(lambda t: t.narrow(axes[0], 0, length))


def _joined_shape(graph: Graph, r: Recipe) -> list[int]:
    shapes = [list(graph.tensors[p].data.shape) for p in r.parts]
    joined = list(shapes[0])
    if len(shapes) > 1:
        joined[r.axis] = sum(s[r.axis] for s in shapes)
    return joined


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots
    return name.replace(".", "\u2024")
