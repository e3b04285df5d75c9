"""The one emitter: integer nodes and constants appended to a `refsim.GraphBuilder`.

Export (`exporters.quantize`) and import (`exporters.importers`) build their integer
graphs through it: every name comes from `GraphBuilder.unique_name` (the stem itself when
free, else `stem_2`, `stem_3`, ...), a node's output tensor carries the node's name, and a
builder error (a type or shape the op refuses) becomes one line naming the node.
Requantizations go through `frontend.requant`.
"""

from __future__ import annotations

import math

import numpy as np
from refsim import GraphBuilder
from refsim.dtypes import TYPES, IntType
from refsim.errors import RefsimError

from ..dyadic import ExportError


def narrowest_type(values: np.ndarray) -> IntType:
    """The narrowest of int8/int16/int32/int64 holding every value."""
    values = np.asarray(values)
    if values.size == 0:
        return TYPES["int8"]
    lo, hi = int(values.min()), int(values.max())
    for name in ("int8", "int16", "int32", "int64"):
        if TYPES[name].contains(lo, hi):
            return TYPES[name]
    raise ExportError(f"constant values span [{lo}, {hi}], beyond int64")


class Emitter:
    def __init__(self, name: str, max_declared_bytes: int | None = None):
        self.builder = GraphBuilder(name or "model")
        # What the tensors emitted nodes declare may add up to (bytes, fully known shapes):
        # a small model's attributes (Pad's pads, Reshape's shape) must not ask a run for
        # gigabytes (frontend.checks).
        self.max_declared_bytes = max_declared_bytes
        self.declared_bytes = 0

    # --- names, tensors ----------------------------------------------------------------------

    def name(self, stem: str) -> str:
        return self.builder.unique_name(stem)

    def dtype(self, tensor: str) -> IntType:
        return self.builder.tensors[tensor].dtype

    def shape(self, tensor: str) -> tuple:
        return tuple(self.builder.tensors[tensor].shape)

    def input(self, name: str, dtype: str, shape, **quant) -> str:
        return self.builder.input(name, dtype, shape, **quant)

    def const(self, values, dtype: str | IntType | None = None, stem: str = "const") -> str:
        """A constant of `dtype` (the narrowest signed type holding the values when None)."""
        values = np.asarray(values)
        t = narrowest_type(values) if dtype is None else (dtype if isinstance(dtype, IntType) else TYPES[dtype])
        try:
            return self.builder.const(values, t.name, name=self.name(stem))
        except RefsimError as e:
            raise ExportError(str(e)) from None

    def node(self, op: str, inputs, stem: str, node_name: str | None = None, **attrs) -> str:
        """Append `op`; its output tensor is named after `stem` (as is the node, unless
        `node_name` is given). Returns the output name."""
        out = self.name(stem)
        name = self.name(node_name) if node_name and node_name != stem else out
        try:
            self.builder.node(op, [i if i else None for i in inputs], outputs=out, name=name, **attrs)
        except RefsimError as e:
            raise ExportError(f"{op} for {stem!r}: {e}") from None
        t = self.builder.tensors[out]
        if self.max_declared_bytes is not None and all(isinstance(d, int) for d in t.shape):
            self.declared_bytes += math.prod(t.shape) * t.dtype.storage.itemsize
            if self.declared_bytes > self.max_declared_bytes:
                raise ExportError(f"{op} for {stem!r}: its result {t.dtype}{list(t.shape)} takes the tensors a run "
                                  f"computes to {self.declared_bytes} bytes, beyond what this model may allocate "
                                  f"({self.max_declared_bytes})")
        return out

    def label(self, tensor: str, scale, zero_point=0, axis: int | None = None) -> None:
        """The real-valued meaning of an integer tensor (scale metadata)."""
        if np.ndim(scale) == 0:
            self.builder.set_quant(tensor, float(scale), int(np.asarray(zero_point).reshape(-1)[0]) if np.size(zero_point) else 0)
        else:
            zp = np.broadcast_to(np.asarray(zero_point, np.int64), np.shape(scale))
            self.builder.set_quant(tensor, [float(s) for s in np.asarray(scale).reshape(-1)],
                                   [int(z) for z in zp.reshape(-1)], axis=-1 if axis is None else axis)
