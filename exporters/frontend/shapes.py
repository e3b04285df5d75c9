"""Shapes from the graph itself: declared input shapes, their `dim_param` names, and ONNX
shape inference.

A fixed dimension stays fixed and a symbolic one stays symbolic. `bind_inputs` decides,
once, what each symbolic input dimension is:

- export (`free_batch=True`): a symbol on axis 0 of an input is the batch, renamed
  `"batch"` everywhere; the integer graph keeps it free. Every other symbol (a sequence
  length, an image size) takes the size the caller gives (from the calibration data, or
  `--max-length`), the same value wherever the symbol appears;
- import: `--shape` replaces an input's shape; symbols stay as the model names them.

`infer_shapes` then runs `onnx.shape_inference` (with data propagation) on the graph and
reads back every tensor's shape and element type. Dimensions the batch multiplies are
written `"batch*K"` (K an integer), so a shape is a tuple of ints and such strings, or None
where nothing is known. ONNX leaves a Reshape's `-1` unknown when its input is symbolic;
those are computed here from the input's symbolic size.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import onnx
from onnx import shape_inference

from ..dyadic import ExportError
from .graph import Graph, Node, elem_to_numpy

BATCH = "batch"
_SYM = re.compile(r"^batch(?:\*(-?\d+))?(?:([+-]\d+))?$")


class Sym:
    """The symbolic integer a * batch + c (a != 0), for the batch size batch >= 1."""

    __slots__ = ("a", "c")

    def __init__(self, a: int, c: int = 0):
        self.a, self.c = int(a), int(c)

    @staticmethod
    def make(a: int, c: int = 0):
        return Sym(a, c) if a else int(c)

    def __add__(self, other):
        if isinstance(other, Sym):
            return Sym.make(self.a + other.a, self.c + other.c)
        if isinstance(other, (int, np.integer)):
            return Sym(self.a, self.c + int(other))
        return NotImplemented

    __radd__ = __add__

    def __neg__(self):
        return Sym(-self.a, -self.c)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mul__(self, other):
        if isinstance(other, (int, np.integer)):
            return Sym.make(self.a * int(other), self.c * int(other))
        if isinstance(other, Sym):
            raise Undecidable("a product of two batch-dependent sizes")
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, other):
        if isinstance(other, (int, np.integer)) and other and self.a % int(other) == 0 and self.c % int(other) == 0:
            return Sym.make(self.a // int(other), self.c // int(other))
        raise Undecidable("a batch-dependent size divided unevenly")

    def __truediv__(self, other):
        return self.__floordiv__(other)

    def __eq__(self, other):
        return isinstance(other, Sym) and (self.a, self.c) == (other.a, other.c)

    def __hash__(self):
        return hash((self.a, self.c))

    def lowest(self) -> int | None:
        """The smallest value over batch >= 1 (None when unbounded below)."""
        return self.a + self.c if self.a > 0 else None

    def compare(self, other) -> int:
        """-1, 0 or 1 for self <, ==, > other when that holds for every batch >= 1."""
        diff = self - other
        if not isinstance(diff, Sym):
            return (diff > 0) - (diff < 0)
        low = diff.lowest()
        if low is not None and low > 0:
            return 1
        if diff.a < 0 and diff.a + diff.c < 0:
            return -1
        raise Undecidable("a comparison that depends on the batch size")

    def at(self, batch: int) -> int:
        return self.a * batch + self.c

    def __repr__(self):
        text = BATCH if self.a == 1 else f"{BATCH}*{self.a}"
        return text + (f"{self.c:+d}" if self.c else "")

    __str__ = __repr__


class Undecidable(ExportError):
    """A value that depends on the batch size where refsim needs it fixed."""


def parse_dim(d):
    """A shape entry as an int, a Sym, or None (unknown or a foreign symbol)."""
    if d is None or isinstance(d, (int, np.integer)):
        return None if d is None else int(d)
    if isinstance(d, Sym):
        return d
    m = _SYM.match(str(d))
    if not m:
        return None
    return Sym(int(m.group(1) or 1), int(m.group(2) or 0))


def dim_text(d):
    """Back from int/Sym/None to a shape entry."""
    return str(d) if isinstance(d, Sym) else d


def concrete(shape: Iterable, batch: int = 1, what: str = "") -> tuple[int, ...]:
    out = []
    for d in shape:
        p = parse_dim(d)
        if p is None:
            raise ExportError(f"refsim cannot infer the shape of tensor {what!r} ({list(shape)}); does the model take "
                              f"the input sizes it was given? (text models: --max-length)")
        out.append(p if isinstance(p, int) else p.at(batch))
    return tuple(out)


def has_batch(shape: Iterable) -> bool:
    return any(isinstance(parse_dim(d), Sym) for d in shape)


def known(shape) -> bool:
    return shape is not None and all(parse_dim(d) is not None for d in shape)


# --- inputs ---------------------------------------------------------------------------------


def bind_inputs(g: Graph, given: dict[str, Iterable[int]] | None = None, free_batch: bool = True) -> dict[str, int]:
    """Decide every input dimension (see the module docstring); returns the bound symbols."""
    given = {k: [int(d) for d in v] for k, v in (given or {}).items()}
    unknown = sorted(set(given) - set(g.inputs))
    if unknown:
        raise ExportError(f"shapes given for {unknown}, which are not inputs of the model (inputs: {', '.join(g.inputs)})")
    bindings: dict[str, int] = {}
    if not free_batch:
        for name in g.inputs:
            elem, dims = g.input_types[name]
            if name in given:
                new = tuple(given[name])
                if len(new) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, new)):
                    raise ExportError(f"input {name!r}: shape {list(new)} does not fit its declared shape {list(dims)}")
                dims = new
            g.input_types[name] = (elem, tuple(dims))
            g.shapes[name] = tuple(dims)
        return bindings
    batch_symbols = set()
    for name in g.inputs:
        dims = g.input_types[name][1]
        if dims and not isinstance(dims[0], int):
            batch_symbols.add(dims[0])  # None (no name) included
    for name in g.inputs:
        elem, dims = g.input_types[name]
        data = given.get(name)
        if data is not None and len(data) != len(dims) and dims:
            raise ExportError(f"input {name!r} has rank {len(dims)} ({_show(dims)}), but its data has shape {data}")
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                if data is not None and axis > 0 and data[axis] != d:
                    raise ExportError(f"input {name!r} has the fixed shape {_show(dims)}, but its data has size "
                                      f"{data[axis]} on axis {axis}")
                shape.append(d)
            elif d in batch_symbols and (axis == 0 or d is not None):
                shape.append(BATCH)
            elif d is not None and d in bindings:
                shape.append(bindings[d])
            elif data is not None and data[axis] > 0:
                shape.append(data[axis])
                if d is not None:
                    bindings[d] = data[axis]
            else:
                raise ExportError(f"input {name!r} has an open dimension {axis} ({d or '?'!r}); give its size "
                                  f"(for text models: --max-length)")
        g.input_types[name] = (elem, tuple(shape))
        g.shapes[name] = tuple(shape)
    return bindings


def _show(dims) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def free_batch(g: Graph) -> bool:
    """Whether the graph's inputs keep a free batch dimension."""
    return any(has_batch(g.input_types[n][1]) for n in g.inputs)


# --- inference -------------------------------------------------------------------------------

_SEED_LIMIT = 4096  # constants up to this many elements go in with their values


def infer_shapes(g: Graph, rounds: int = 4) -> None:
    """Every tensor's shape and element type, from ONNX shape inference (module docstring)."""
    live = {o for n in g.nodes for o in n.outputs} | set(g.inputs)
    g.shapes = {k: v for k, v in g.shapes.items() if k in live}
    for name in g.inputs:
        g.shapes[name] = tuple(g.input_types[name][1])
        g.dtypes[name] = elem_to_numpy(g.input_types[name][0])
    for _ in range(rounds):
        _onnx_inference(g)
        if not _fill_unknown(g):
            break


def _onnx_inference(g: Graph) -> None:
    model = g.to_model(large_consts_as_inputs=_SEED_LIMIT)
    seeds = []
    for name, shape in g.shapes.items():
        if name in g.inputs or name in g.outputs or not known(shape) or name not in g.dtypes:
            continue
        try:
            elem = onnx.helper.np_dtype_to_tensor_dtype(g.dtypes[name])
        except Exception:
            continue
        seeds.append(onnx.helper.make_tensor_value_info(name, elem, [dim_text(parse_dim(d)) for d in shape]))
    model.graph.value_info.extend(seeds)
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            return  # custom ops onnx cannot reason about: shapes stay unknown
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if tt.elem_type:
            try:
                g.dtypes[vi.name] = elem_to_numpy(tt.elem_type)
            except Exception:
                pass
        if not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.dim_param and not d.dim_param.startswith("unk__"):
                p = parse_dim(d.dim_param)
                dims.append(str(p) if p is not None else d.dim_param)
            else:
                dims.append(None)
        old = g.shapes.get(vi.name)
        if old is not None and len(old) == len(dims):
            # A dimension computed here (a Reshape's -1) beats ONNX's unknown.
            dims = [o if n is None else n for n, o in zip(dims, old)]
        g.shapes[vi.name] = tuple(dims)


def _fill_unknown(g: Graph) -> bool:
    """Output sizes ONNX cannot name (a Reshape's -1 on a symbolic input); True if any."""
    changed = False
    for node in g.nodes:
        out = node.outputs[0] if node.outputs else None
        shape = g.shapes.get(out)
        if shape is not None and known(shape):
            continue
        computed = _movement_shape(g, node)
        if computed is not None:
            g.shapes[out] = tuple(dim_text(d) for d in computed)
            changed = True
    return changed


def _movement_shape(g: Graph, node: Node):
    if node.op == "Range":
        return _range_shape(g, node)
    if node.op not in ("Reshape", "Flatten") or not node.inputs:
        return None
    x = node.inputs[0]
    in_shape = g.shapes.get(x, g.consts[x].shape if x in g.consts else None)
    if not known(in_shape):
        return None
    dims = [parse_dim(d) for d in in_shape]
    total = product(dims)
    if total is None:
        return None
    if node.op == "Flatten":
        axis = node.attrs.get("axis", 1) % max(len(dims), 1)
        left = product(dims[:axis])
        return None if left is None else [left, _divide(total, left)]
    if len(node.inputs) < 2 or node.inputs[1] not in g.consts:
        return None
    shape = np.asarray(g.consts[node.inputs[1]])
    if shape.dtype.kind not in "iu":  # ONNX wants int64; a float one may hold NaN
        raise ExportError(f"{node.describe()}: its shape input must be integers, got {shape.dtype}")
    target = [int(v) for v in shape.reshape(-1)]
    copy = not node.attrs.get("allowzero", 0)
    if copy and any(t == 0 and i >= len(dims) for i, t in enumerate(target)):
        raise ExportError(f"{node.describe()}: its target {target} copies (0) a dimension the input {list(in_shape)} does not have")
    out = [dims[i] if t == 0 and copy else t for i, t in enumerate(target)]
    if -1 in out:
        rest = product([d for d in out if d != -1])
        out[out.index(-1)] = None if rest is None else _divide(total, rest)
    return None if any(d is None for d in out) else out


def _range_shape(g: Graph, node: Node):
    """Range(start, limit, delta) up to a batch-dependent limit: batch-dependent length."""
    if len(node.inputs) != 3:  # a custom domain's Range, which onnx's schema check does not cover
        return None
    values = []
    for name in node.inputs:
        if name in g.consts and g.consts[name].size == 1 and g.consts[name].dtype.kind in "iu":
            values.append(int(g.consts[name].reshape(())))
        elif name in g.symbolic and g.symbolic[name].size == 1:
            values.append(g.symbolic[name].reshape(-1)[0])
        else:
            return None
    start, limit, delta = values
    if isinstance(start, Sym) or isinstance(delta, Sym) or delta == 0:
        return None
    try:
        length = (limit - start) // delta if isinstance(limit, Sym) else None
    except Undecidable:
        return None
    return None if length is None else [length]


def product(dims):
    """The product of (possibly symbolic) dimensions, or None when it cannot be decided."""
    total = 1
    try:
        for d in dims:
            total = total * d
    except Undecidable:
        return None
    return total


def _divide(total, part):
    try:
        if isinstance(total, int) and isinstance(part, int):
            return total // part if part and total % part == 0 else None
        if isinstance(total, Sym) and isinstance(part, int):
            return total // part
        if isinstance(total, Sym) and isinstance(part, Sym) and total.c == 0 and part.c == 0 and total.a % part.a == 0:
            return total.a // part.a
    except Undecidable:
        return None
    return None


def reshape_target(in_shape, out_shape) -> list[int]:
    """A Reshape target taking `in_shape` to `out_shape` for every batch size: fixed sizes
    as they are, a batch-dependent size copied (0) where the input has it on the same
    axis, otherwise inferred (-1, at most once)."""
    ins = [parse_dim(d) for d in in_shape]
    target = []
    for i, d in enumerate(parse_dim(d) for d in out_shape):
        if d is None:
            raise ExportError(f"internal: a reshape to an unknown shape {list(out_shape)}")
        if isinstance(d, int):
            target.append(d)
        elif i < len(ins) and ins[i] == d:
            target.append(0)
        else:
            target.append(-1)
    if target.count(-1) > 1:
        raise ExportError(f"a reshape from {list(in_shape)} to {list(out_shape)} merges the batch dimension twice")
    return target
