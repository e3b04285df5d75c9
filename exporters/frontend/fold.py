"""Constant folding, with shape arithmetic kept symbolic in the batch size.

Exported graphs carry a lot of integer arithmetic around their data path: `Shape -> Gather
-> Unsqueeze -> Concat -> Reshape` chains, `Range`/`Expand` index grids, `Constant` nodes,
the mask build-up of Hugging Face models. `fold_constants` evaluates every node whose
inputs are known at export time, with onnx's reference implementation of the op (so each
op means what the ONNX specification says), and removes it:

- `Shape`/`Size` of a tensor are known once shape inference knows its dimensions;
- a value may depend on the free batch size (`frontend.shapes.Sym`, a * batch + c). Such
  values are folded too, for the ops shape arithmetic uses (Gather, Concat, Slice,
  Unsqueeze, Squeeze, Reshape, Cast, Add, Sub, Mul, Div, Max, Min, comparisons and Where
  where the answer holds for every batch >= 1);
- a constant repeated for every sample (`ConstantOfShape` or `Expand` to the batch size,
  the CLS token, HF's buffered token-type ids) is kept as one row, named in
  `Graph.batch_rows`, and folds on through ops that treat every sample alike;
- a batch-dependent Reshape target becomes a fixed one (0 copies a dimension, -1 infers
  it), a batch-dependent Expand target keeps the input's dimension (1).

A batch-dependent value needed anywhere else stays computed in the graph (an index grid
over the batch in a mask build-up is evaluated with the mask, `frontend.masks`); one left
over for a data-carrying node at the end of the passes stops the export with one line
naming the node and suggesting a fixed batch (`batch_dependent_uses`). Shape inference
and folding alternate until nothing changes, since a folded Reshape target lets shape
inference name the shapes after it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..dyadic import ExportError
from .checks import SizeBudget, array_bytes, take_fold
from .graph import BROADCASTING_OPS, SUB_BYTE_TYPES, Graph, Node, elem_to_numpy
from .shapes import Sym, Undecidable, dim_text, infer_shapes, known, parse_dim, product

NONDETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
UNARY_OPS = ("Cast", "Identity", "Not", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round",
             "Sign", "IsNaN", "IsInf", "Relu", "Sigmoid", "Tanh", "Erf", "CastLike")


# --- evaluating one node on constants -----------------------------------------------------


def _gather_elements(node, values):
    # onnx's reference builds this on np.choose, which takes at most 64 choices.
    data, indices = values[0], values[1].astype(np.int64)
    axis = node.attrs.get("axis", 0)
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    return [np.take_along_axis(data, indices, axis=axis)]


# Ops whose reference implementation cannot take every valid input: the same ONNX semantics in NumPy.
_NUMPY_FOLDS = {"GatherElements": _gather_elements}


def evaluate(node: Node, values: list[np.ndarray | None], opsets: dict[str, int],
             budget: SizeBudget | None = None) -> list[np.ndarray]:
    """Evaluate one node on constant inputs with onnx's reference implementation.

    With a `budget`, the results' sizes are inferred first and taken from it
    (`frontend.checks`), so a few bytes of attributes cannot make this allocate gigabytes."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if v is not None else "" for i, v in enumerate(values)]
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.UNDEFINED, None) for i in range(len(node.outputs))]
    attrs = {k: numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v for k, v in node.attrs.items()}
    single = helper.make_node(node.op, names, [o.name for o in outputs], domain=node.domain or None, **attrs)
    take_fold(budget, node.describe(), node.op, single, values, opsets)
    if node.op in _NUMPY_FOLDS and node.standard:
        return _NUMPY_FOLDS[node.op](node, values)
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), np.shape(v))
              for n, v in zip(names, values) if n]
    graph = helper.make_graph([single], "fold", inputs, outputs)
    opset_imports = [helper.make_opsetid(d, v) for d, v in opsets.items()]
    model = helper.make_model(graph, opset_imports=opset_imports)
    try:
        results = ReferenceEvaluator(model).run(None, {n: np.asarray(v) for n, v in zip(names, values) if n})
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"{node.describe()}: cannot evaluate on constant inputs: {reason}") from None
    return [np.asarray(r) for r in results]


def store_const(g: Graph, name: str, array: np.ndarray) -> None:
    """A folded result as a constant; sub-byte integers (ml_dtypes int4, ...) stored unpacked."""
    array = np.asarray(array)
    if array.dtype.kind not in "iubf" and array.dtype != object:
        try:
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        except Exception:
            elem = None
        if elem in SUB_BYTE_TYPES:
            g.const_types[name] = elem
            array = array.astype(elem_to_numpy(elem))
    g.consts[name] = array


# --- the folding loop -----------------------------------------------------------------------


def fold_constants(g: Graph, keep: Callable[[Node], bool] | None = None, rounds: int = 64) -> None:
    """Fold everything known at export time (module docstring). `keep(node)` protects nodes
    a caller wants to see (an importer's DequantizeLinear of weights). Nodes computing
    batch-dependent values stay in the graph for consumers that need them (an index grid
    over the batch in a mask build-up, evaluated with the mask); `batch_dependent_uses`
    names what is left over at the end."""
    keep = keep or (lambda node: False)
    symbolic = g.symbolic
    shapes_known = -1
    for _ in range(rounds):
        infer_shapes(g)
        now_known = sum(known(s) for s in g.shapes.values())
        if not _fold_round(g, keep, symbolic) and now_known == shapes_known:
            break
        shapes_known = now_known
    g.prune()
    live = {o for n in g.nodes for o in n.outputs}
    for name in [n for n in symbolic if n not in live]:
        del symbolic[name]
    infer_shapes(g)


def shape_only(g: Graph) -> set[str]:
    """Tensors computed from nothing but constants and the shapes of other tensors."""
    found = set()
    for node in g.nodes:
        data = [i for i in node.inputs if i and i not in g.consts]
        if node.op in ("Shape", "Size") or (data and all(i in found for i in data)):
            found.update(o for o in node.outputs if o)
    return found


def batch_dependent_uses(g: Graph, allowed: set[str] = frozenset()) -> None:
    """Stop with one line if a data-carrying node still takes a batch-dependent value."""
    values = shape_only(g)
    for node in g.nodes:
        if any(o in values for o in node.outputs):
            continue
        for i in node.inputs:
            if i in values and i not in allowed:
                raise ExportError(
                    f"{node.describe()}: input {i!r} depends on the batch size, which refsim keeps free only in "
                    f"Reshape and Expand targets; export the model with a fixed batch size (no dynamic batch axis)")


def _fold_round(g: Graph, keep, symbolic: dict) -> bool:
    changed = False
    for node in list(g.nodes):
        if keep(node) or node.op in NONDETERMINISTIC or not node.standard:
            continue
        if all(o in symbolic for o in node.outputs if o):
            continue  # already evaluated: a batch-dependent value its users may fold further
        if _generalise_target(g, node, symbolic):
            changed = True
            continue
        results = _known_results(g, node, symbolic)
        if results is None:
            continue
        values = []
        for value, rows in results:
            value = np.asarray(value, dtype=object) if isinstance(value, Sym) else np.asarray(value)
            if value.dtype == object and all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in value.reshape(-1)):
                value = value.astype(np.int64)
            values.append((value, rows))
        if any(v.dtype == object for v, _ in values):
            for name, (value, _) in zip(node.outputs, values):
                if name:
                    symbolic[name] = value
            changed = True
            continue
        g.nodes.remove(node)
        for name, (value, rows) in zip(node.outputs, values):
            if name:
                store_const(g, name, value)
                if rows:
                    g.batch_rows.add(name)
        changed = True
    return changed


def _known_results(g: Graph, node: Node, symbolic: dict):
    """[(value, is_batch_row)] for each output if the node can be evaluated now, else None."""
    if node.op in ("Shape", "Size"):
        x = node.inputs[0]
        if x in g.consts:
            dims = [Sym(1) if (a == 0 and x in g.batch_rows) else d for a, d in enumerate(g.consts[x].shape)]
        elif x in symbolic:
            dims = list(symbolic[x].shape)
        else:
            dims = [parse_dim(d) for d in g.shapes.get(x, [None])] if x in g.shapes else [None]
        if any(d is None for d in dims):
            return None
        if node.op == "Size":
            total = product(dims)
            return None if total is None else [(np.array(total, dtype=object), False)]
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return [(np.array(dims[start:end], dtype=object), False)]
    values = []
    for i in node.inputs:
        if not i:
            values.append(None)
        elif i in symbolic:
            values.append((symbolic[i], False))
        elif i in g.consts:
            values.append((g.consts[i], i in g.batch_rows))
        else:
            return None
    if node.op == "Constant":
        return [(_constant_value(node), False)]
    if not values:
        return None
    present = [v for v in values if v is not None]
    is_symbolic = any(v.dtype == object for v, _ in present)
    has_rows = any(rows for _, rows in present)
    try:
        if is_symbolic:
            return _symbolic(node, values, g.budget)
        if has_rows:
            return _rows(g, node, values)
    except Undecidable:
        return None
    except (ValueError, IndexError) as e:
        raise ExportError(f"{node.describe()}: cannot be computed for inputs shaped {_input_shapes(g)} ({e}); "
                          f"does the model take these sizes? (text models: --max-length)") from None
    outputs = evaluate(node, [None if v is None else v[0] for v in values], g.opsets, g.budget)
    return [(o, False) for o in outputs]


def _input_shapes(g: Graph) -> str:
    return ", ".join(f"{n}: {list(g.input_types[n][1])}" for n in g.inputs)


def _constant_value(node: Node) -> np.ndarray:
    a = node.attrs
    for key, dtype in (("value_int", np.int64), ("value_ints", np.int64), ("value_float", np.float32),
                       ("value_floats", np.float32)):
        if key in a:
            return np.asarray(a[key], dtype)
    if "value" in a:
        return np.asarray(a["value"])
    raise ExportError(f"{node.describe()}: a Constant without a numeric value is not supported")


# --- symbolic values (shape arithmetic in the batch size) -------------------------------------


def _ints(v) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _axes(node: Node, values, index: int = 1):
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(values) > index and values[index] is not None:
        return _ints(values[index][0])
    return None


def _trunc_div(a, b):
    if isinstance(a, Sym) or isinstance(b, Sym):
        if isinstance(b, Sym):
            raise Undecidable("division by a batch-dependent size")
        return a // b
    q = abs(int(a)) // abs(int(b))
    return q if (a >= 0) == (b > 0) else -q


def _compare(op: str):
    def cmp(a, b):
        if isinstance(a, Sym):
            c = a.compare(b)
        elif isinstance(b, Sym):
            c = -b.compare(a)
        else:
            c = (a > b) - (a < b)
        return {"Equal": c == 0, "Less": c < 0, "Greater": c > 0, "LessOrEqual": c <= 0, "GreaterOrEqual": c >= 0}[op]
    return cmp


def _max(a, b):
    return a if _compare("GreaterOrEqual")(a, b) else b


def _min(a, b):
    return a if _compare("LessOrEqual")(a, b) else b


_ELEMENTWISE = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": _trunc_div,
    "Max": _max, "Min": _min,
    **{op: _compare(op) for op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual")},
}


def _pyint(v):
    return v if isinstance(v, Sym) else int(v)


def _symbolic(node: Node, values, budget: SizeBudget | None = None):
    """Shape arithmetic on values holding batch-dependent entries (object arrays)."""
    op = node.op
    data = [None if v is None else np.asarray(v[0], dtype=object if v[0].dtype == object else None) for v in values]
    x = data[0]
    if op == "Identity":
        return [(x, False)]
    if op == "Cast":
        to = node.attrs["to"]
        if to == TensorProto.BOOL:
            flat = [bool(_compare("Greater")(v, 0) or _compare("Less")(v, 0)) for v in x.reshape(-1)]
            return [(np.array(flat, bool).reshape(x.shape), False)]
        if elem_to_numpy(to).kind not in "iu":
            raise Undecidable("a batch-dependent size cast to float")
        return [(x, False)]
    if op in _ELEMENTWISE:
        fn = np.frompyfunc(lambda a, b: _pyint(_ELEMENTWISE[op](_pyint(a), _pyint(b))), 2, 1)
        out = np.asarray(fn(x.astype(object), data[1].astype(object)), dtype=object)  # 0-d: a scalar
        if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual"):
            out = out.astype(bool)
        return [(out, False)]
    if op == "Neg":
        return [(np.asarray(-x, dtype=object), False)]
    if op == "Where":
        return [(np.where(np.asarray(data[0], bool), data[1].astype(object), data[2].astype(object)), False)]
    if op == "Unsqueeze":
        out = x
        for a in sorted(a % (x.ndim + len(_axes(node, values))) for a in _axes(node, values)):
            out = np.expand_dims(out, a)
        return [(out, False)]
    if op == "Squeeze":
        axes = _axes(node, values)
        return [(np.squeeze(x, axis=None if axes is None else tuple(axes)), False)]
    if op == "Concat":
        return [(np.concatenate([d.astype(object) for d in data], axis=node.attrs["axis"]), False)]
    if op == "Gather":
        return [(np.take(x, np.asarray(data[1], np.int64), axis=node.attrs.get("axis", 0)), False)]
    if op == "Slice":
        return [(onnx_slice(x, *[None if d is None else _ints(d) for d in (data + [None] * 5)[1:5]]), False)]
    if op == "Reshape" and x.dtype == object and data[1].dtype != object:
        target = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(data[1].reshape(-1))]
        return [(x.reshape(target), False)]
    if op in ("ReduceProd", "ReduceSum") and x.ndim == 1:
        total = 1 if op == "ReduceProd" else 0
        for v in x:
            total = total * v if op == "ReduceProd" else total + v
        keep = node.attrs.get("keepdims", 1)
        return [(np.array([total] if keep else total, dtype=object), False)]
    if op == "ConstantOfShape":
        return [_rows_of_shape(node, x, np.asarray(node.attrs.get("value", np.zeros(1, np.float32))).reshape(-1)[:1], budget)]
    if op == "Expand":
        return [_expand_to_batch(node, values[0], x, data[1], budget)]
    if op == "Reshape":
        # A batch row reshaped to a target starting with the batch size.
        target = list(data[1].reshape(-1))
        if values[0][1] and target and target[0] == Sym(1) and all(isinstance(t, (int, np.integer)) for t in target[1:]):
            return [(np.asarray(values[0][0]).reshape([1] + [int(t) for t in target[1:]]), True)]
    raise Undecidable(f"{op} of a batch-dependent value")


def _rows_of_shape(node: Node, shape: np.ndarray, fill: np.ndarray, budget: SizeBudget | None = None):
    dims = list(shape.reshape(-1))
    if not dims or dims[0] != Sym(1) or not all(isinstance(d, (int, np.integer)) for d in dims[1:]):
        raise Undecidable("a constant shaped by the batch size")
    if budget is not None:
        budget.take(array_bytes([1] + dims[1:], fill.dtype.itemsize), node.describe(), "one batch row of its result")
    return np.full([1] + [int(d) for d in dims[1:]], fill[0] if fill.size else 0, dtype=fill.dtype), True


def _expand_to_batch(node: Node, source, data, target, budget: SizeBudget | None = None):
    """Expand(constant, [batch, ...]): the constant as one batch row."""
    dims = list(target.reshape(-1))
    if source[0].dtype == object or any(isinstance(d, Sym) for d in dims[1:]) or dims[0] != Sym(1):
        raise Undecidable("an expansion to a batch-dependent shape")
    value = np.asarray(source[0])
    fixed = [1] + [int(d) for d in dims[1:]]
    shape = np.broadcast_shapes(value.shape, tuple(fixed))
    if budget is not None:
        budget.take(array_bytes(shape, value.itemsize), node.describe(), "one batch row of its result")
    if shape[0] != 1:
        raise Undecidable("an expansion whose batch axis is not the first")
    return np.broadcast_to(value, shape).copy(), True


def onnx_slice(x: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    """ONNX Slice semantics (docs/OPS.md: clamping differs from Python's stepping backwards)."""
    axes = list(range(len(starts))) if axes is None else [a % x.ndim for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        d = x.shape[a]
        s = s + d if s < 0 else s
        e = e + d if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), d), min(max(e, 0), d)
            index[a] = slice(s, e, st)
        else:
            s, e = min(max(s, 0), d - 1), min(max(e, -1), d - 1)
            index[a] = slice(s, e if e >= 0 else None, st)
    return x[tuple(index)]


# --- batch rows (one row standing for every sample) -------------------------------------------


def _rows(g: Graph, node: Node, values):
    """Fold a node on batch-row constants when every sample's row is computed alike."""
    op = node.op
    rows = [v is not None and v[1] for v in values]
    arrays = [None if v is None else v[0] for v in values]
    ok = False
    if op in BROADCASTING_OPS and op != "Expand" or op in UNARY_OPS:
        ok = True
    elif op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node, values)
        ok = axes is not None and 0 not in [a % max(arrays[0].ndim + (len(axes) if op == "Unsqueeze" else 0), 1) for a in axes]
    elif op == "Transpose":
        perm = node.attrs.get("perm")
        ok = perm is not None and perm[0] == 0
    elif op == "Slice":
        axes = _ints(arrays[3]) if len(arrays) > 3 and arrays[3] is not None else list(range(len(_ints(arrays[1]))))
        ok = rows[0] and 0 not in [a % arrays[0].ndim for a in axes] and not any(rows[1:])
    elif op == "Gather":
        axis = node.attrs.get("axis", 0) % arrays[0].ndim
        ok = (rows[0] and not rows[1] and axis > 0) or (rows[1] and not rows[0] and axis == 0)
    elif op == "Concat":
        ok = all(rows) and node.attrs["axis"] % arrays[0].ndim != 0
    elif op == "Expand":
        ok = rows[0] and not rows[1] and _ints(arrays[1])[:1] in ([1], [])
    elif op == "Reshape":
        if rows[0] and not rows[1] and _ints(arrays[1])[:1] == [-1]:
            raise ExportError(f"{node.describe()}: reshapes a constant repeated for every sample so that the samples "
                              f"interleave with another axis; export the model with a fixed batch size")
        ok = rows[0] and not rows[1] and _ints(arrays[1])[:1] in ([0], [1])
    if not ok:
        raise Undecidable(f"{op} across the samples of a batch")
    outputs = evaluate(node, arrays, g.opsets, g.budget)
    for out in outputs:
        if out.ndim == 0 or out.shape[0] != 1:
            raise Undecidable(f"{op} across the samples of a batch")
    return [(o, True) for o in outputs]


# --- batch-dependent targets of data-carrying nodes ------------------------------------------


def _generalise_target(g: Graph, node: Node, symbolic: dict) -> bool:
    """A Reshape or Expand of run-time data to a batch-dependent shape gets a fixed target."""
    if node.op not in ("Reshape", "Expand") or len(node.inputs) < 2 or node.inputs[1] not in symbolic:
        return False
    x = node.inputs[0]
    if x in g.consts or x in symbolic:
        return False
    in_shape = [parse_dim(d) for d in g.shapes.get(x, ())]
    if x not in g.shapes or any(d is None for d in in_shape):
        return False
    target = list(symbolic[node.inputs[1]].reshape(-1))
    if node.op == "Reshape":
        fixed = []
        for i, t in enumerate(target):
            if isinstance(t, Sym):
                fixed.append(0 if i < len(in_shape) and in_shape[i] == t else -1)
            else:
                fixed.append(int(t))
        if fixed.count(-1) > 1:
            raise ExportError(f"{node.describe()}: reshapes {_show(in_shape)} to {_show(target)}, which merges the "
                              f"batch size into more than one dimension; export the model with a fixed batch size (no dynamic batch axis)")
        node.attrs["allowzero"] = 0
    else:
        fixed = []
        offset = len(target) - len(in_shape)
        for j, t in enumerate(target):
            if not isinstance(t, Sym):
                fixed.append(int(t))
                continue
            d = in_shape[j - offset] if j >= offset else None
            if d != t:
                raise ExportError(f"{node.describe()}: expands a tensor shaped {_show(in_shape)} to the batch size "
                                  f"{_show(target)}; export the model with a fixed batch size")
            fixed.append(1)
    node.inputs[1] = g.add_const(np.array(fixed, np.int64), "shape")
    return True


def _show(dims) -> str:
    return "[" + ", ".join(str(dim_text(d)) for d in dims) + "]"


__all__ = ["batch_dependent_uses", "evaluate", "fold_constants", "onnx_slice", "shape_only", "store_const"]
