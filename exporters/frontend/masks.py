"""Attention masks as Hugging Face models build them, replaced by canonical expressions.

A model's integer `*mask*` inputs go through casts, comparisons, `Where`, `Expand`,
gathers and `And`s, into an additive mask of 0 and -inf (or finfo.min) before a Softmax,
a 0/1 factor on hidden states, or a token count (mean pooling). Whatever the chain, only
what it computes matters: `canonical_masks` evaluates the part of the graph that depends
on the mask alone (with onnxruntime, on a random 0/1 mask at the shapes the graph
declares) and recognises the value each mask-only tensor hands to the rest of the graph:

- added to the scores of a Softmax: 0 for kept keys, <= -1000 for masked ones (a
  key-padding mask) -> `Where(Cast(Unsqueeze(mask)), 0, lowest)`;
- `Where(m, scores, very negative)` on the scores (or `Where(masked, very negative, scores)`,
  DeBERTa's masked_fill): the same mask, added;
- a product with hidden states: the mask itself as a float (a token mask);
- a divisor of pooled sums: the number of kept tokens, clipped away from 0.

The canonical expressions are named in `Graph.key_padding_masks`, `token_masks` and
`token_counts`; the quantizer turns them into the integer mask inputs of its ops. Mask-only
integer tensors (position ids counted from a mask) stay as they are: integer graph ops.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..dyadic import ExportError
from ..runtime import FloatRunner
from .fold import shape_only
from .graph import Graph, Node, elem_to_numpy

MASK_VERY_NEGATIVE = -1000.0  # an additive mask entry at or below this masks the key
FLOAT32_LOWEST = float(np.finfo(np.float32).min)


def is_mask_input(name: str, elem: int) -> bool:
    return "mask" in name.lower() and elem_to_numpy(elem).kind in "iub"


def mask_derived(g: Graph) -> set[str]:
    """Tensors computed only from mask inputs, constants and shapes (masks themselves
    included), and depending on a mask."""
    derived = set(g.mask_inputs)
    shapes = shape_only(g)
    for node in g.nodes:  # nodes are in topological order
        data = [i for i in node.inputs if i and i not in g.consts and i not in shapes]
        if data and all(i in derived for i in data):
            derived.update(node.outputs)
    return derived


def synthetic_masks(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """A random 0/1 mask per mask input, at the declared shape (batch 2 when it is free),
    with the first position of every row kept and at least one position masked."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name in sorted(g.mask_inputs):
        shape = g.concrete_shape(name, batch=2)
        value = rng.integers(0, 2, shape)
        if value.ndim >= 1 and value.shape[-1] > 1:
            value[..., 0] = 1
            value.reshape(-1, value.shape[-1])[0, -1] = 0
        feeds[name] = value.astype(elem_to_numpy(g.input_types[name][0]))
    return feeds


def evaluate_mask_tensors(g: Graph, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The values of mask-only tensors for the given masks (the mask subgraph run alone)."""
    derived = mask_derived(g)
    shapes = shape_only(g)
    sub = Graph(g.name, g.opsets)
    sub.consts = dict(g.consts)
    for n in g.nodes:
        if n.op in ("Shape", "Size") and n.outputs[0] in shapes:
            # The shapes of everything else, at the batch size of the masks.
            dims = g.concrete_shape(n.inputs[0], batch=2)
            start, end = n.attrs.get("start", 0), n.attrs.get("end", None)
            sub.consts[n.outputs[0]] = (np.array(dims[start:end], np.int64) if n.op == "Shape"
                                        else np.array(int(np.prod(dims)), np.int64))
        elif n.outputs and all(o in derived or o in shapes for o in n.outputs if o):
            sub.nodes.append(n)
    sub.const_types = dict(g.const_types)
    sub.batch_rows = set(g.batch_rows)  # prune() narrows these in place
    sub.inputs = sorted(g.mask_inputs)
    sub.input_types = {n: g.input_types[n] for n in sub.inputs}
    sub.shapes = {n: g.shapes[n] for n in sub.inputs}
    sub.dtypes = dict(g.dtypes)
    sub.outputs = [n for n in names if n not in g.mask_inputs]
    values = dict(feeds)
    if sub.outputs:
        sub.prune()
        values.update(FloatRunner(sub.to_model()).run(feeds))
    return values


def canonical_masks(g: Graph) -> None:
    """Replace every use of a mask-only tensor by a canonical mask expression (module docstring)."""
    g.mask_inputs = {n for n in g.inputs if is_mask_input(n, g.input_types[n][0])}
    if not g.mask_inputs:
        return
    derived = mask_derived(g)
    uses = [(node, k, name) for node in g.nodes if not any(o in derived for o in node.outputs)
            for k, name in enumerate(node.inputs) if name in derived]
    float_uses = [(node, k, name) for node, k, name in uses if g.dtypes.get(name, np.dtype(np.float32)).kind == "f"
                  or node.op == "Where" and k == 0]
    if not float_uses:
        return
    feeds = synthetic_masks(g)
    values = evaluate_mask_tensors(g, sorted({name for _, _, name in float_uses}), feeds)
    made: dict[tuple, str] = {}
    for node, k, name in float_uses:
        mask = single_mask_source(g, name, derived)
        m = np.asarray(feeds[mask])
        value = np.asarray(values[name])
        if node.op == "Add" and is_key_padding(value, m):
            node.inputs[k] = key_padding_mask(g, mask, node, made)
        elif node.op == "Where" and k == 0 and _where_masks_scores(g, node, value, m) is not None:
            scores = node.inputs[_where_masks_scores(g, node, value, m)]
            node.op, node.attrs = "Add", {}
            node.inputs = [scores, key_padding_mask(g, mask, node, made)]
        elif node.op == "Mul" and is_token_mask(value, m):
            node.inputs[k] = token_mask(g, mask, node, made)
        elif node.op == "Div" and k == 1 and is_token_count(value, m):
            node.inputs[k] = token_count(g, mask, node, made)
        else:
            raise ExportError(
                f"{node.describe()}: uses the mask input {mask!r} in a way refsim does not recognise "
                f"(supported: an additive key-padding mask before Softmax, a 0/1 token mask, mean pooling); for "
                f"unpadded inputs export the model without the mask input, otherwise please report this model"
            )
    g.toposort()
    g.prune()


def _where_masks_scores(g: Graph, node: Node, cond: np.ndarray, mask: np.ndarray) -> int | None:
    """Where(m, scores, c) with m true exactly for kept keys, or Where(m, c, scores) with m
    true exactly for masked ones (DeBERTa's masked_fill), c a very negative constant: the
    input index of the scores, else None."""
    if len(node.inputs) != 3:
        return None
    expected = mask_broadcast(cond, mask, cond.ndim - 1)
    if expected is None or expected.shape != cond.shape:
        return None
    rows = query_rows(cond, mask)
    for scores, fill, keeps in ((1, 2, True), (2, 1, False)):
        c = g.scalar(node.inputs[fill])
        if node.inputs[scores] in g.consts or c is None or c > MASK_VERY_NEGATIVE:
            continue
        if np.array_equal(cond.astype(bool)[rows], ((expected != 0) == keeps)[rows]):
            return scores
    return None


def key_padding_mask(g: Graph, mask: str, node: Node, made: dict) -> str:
    key = ("keys", mask)
    if key not in made:
        rank = len(g.shape(mask))
        axes = g.add_const(np.array([1, 2] if rank == 2 else [1], np.int64), "axes")
        u = g.make_node("Unsqueeze", [mask, axes], "key_mask", node.scope)
        c = g.make_node("Cast", [u.outputs[0]], "key_mask", node.scope, to=onnx.TensorProto.BOOL)
        zero = g.add_const(np.array(0.0, np.float32), "zero")
        low = g.add_const(np.array(FLOAT32_LOWEST, np.float32), "lowest")
        w = g.make_node("Where", [c.outputs[0], zero, low], "key_mask", node.scope)
        g.nodes.extend([u, c, w])
        made[key] = w.outputs[0]
        g.key_padding_masks[w.outputs[0]] = mask
    return made[key]


def token_mask(g: Graph, mask: str, node: Node, made: dict) -> str:
    key = ("token", mask)
    if key not in made:
        rank = len(g.shape(mask))
        axes = g.add_const(np.array([rank], np.int64), "axes")
        u = g.make_node("Unsqueeze", [mask, axes], "token_mask", node.scope)
        c = g.make_node("Cast", [u.outputs[0]], "token_mask", node.scope, to=onnx.TensorProto.FLOAT)
        g.nodes.extend([u, c])
        made[key] = c.outputs[0]
        g.token_masks[c.outputs[0]] = mask
    return made[key]


def token_count(g: Graph, mask: str, node: Node, made: dict) -> str:
    key = ("count", mask)
    if key not in made:
        tm = token_mask(g, mask, node, made)
        axes = g.add_const(np.array([1], np.int64), "axes")
        s = g.make_node("ReduceSum", [tm, axes], "token_count", node.scope, keepdims=0)
        lo = g.add_const(np.array(1e-9, np.float32), "tiny")
        c = g.make_node("Clip", [s.outputs[0], lo], "token_count", node.scope)
        g.nodes.extend([s, c])
        g.token_counts[c.outputs[0]] = mask
        made[key] = c.outputs[0]
    return made[key]


def single_mask_source(g: Graph, name: str, derived: set[str]) -> str:
    sources = set()
    producers = g.producers()
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.mask_inputs:
            sources.add(t)
        elif t in producers:
            stack.extend(i for i in producers[t].inputs if i and i not in g.consts)
    if len(sources) != 1:
        raise ExportError(f"tensor {name!r} combines several mask inputs {sorted(sources)}")
    return sources.pop()


def mask_broadcast(value: np.ndarray, mask: np.ndarray, key_axis: int) -> np.ndarray | None:
    """`mask` (batch, seq) placed on axis 0 and `key_axis` of value's rank, or None."""
    if value.ndim < 2 or mask.ndim != 2 or value.shape[0] not in (1, mask.shape[0]):
        return None
    if value.shape[key_axis] != mask.shape[1]:
        return None
    shape = [1] * value.ndim
    shape[0], shape[key_axis] = mask.shape
    try:
        return np.broadcast_to(mask.reshape(shape), np.broadcast_shapes(value.shape, tuple(shape)))
    except ValueError:
        return None


def query_rows(value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Which entries of a (batch, ..., queries, keys) mask value belong to kept queries: a
    mask that also masks the queries of padding tokens (DeBERTa's mask_i * mask_j) acts
    as a key-padding mask on every row that matters (the graph is checked on real data)."""
    rows = np.ones(value.shape, bool)
    if value.ndim >= 3 and value.shape[-2] == mask.shape[1] and value.shape[0] in (1, mask.shape[0]):
        shape = [1] * value.ndim
        shape[0], shape[-2] = mask.shape
        rows = np.broadcast_to(mask.reshape(shape) != 0, value.shape)
    return rows


def is_key_padding(value, mask) -> bool:
    expected = mask_broadcast(value, mask, value.ndim - 1)
    if expected is None or expected.shape != value.shape:
        return False
    kept, rows = expected != 0, query_rows(value, mask)
    return bool(np.all(value[kept & rows] == 0) and np.all(value[~kept & rows] <= MASK_VERY_NEGATIVE))


def is_token_mask(value, mask) -> bool:
    expected = mask_broadcast(value, mask, 1)
    if expected is None or expected.shape != value.shape:
        return False
    return bool(np.array_equal(value, expected.astype(value.dtype)))


def is_token_count(value, mask) -> bool:
    counts = np.maximum(mask.sum(axis=1).astype(np.float64), 1e-9)
    value = np.asarray(value, np.float64)
    if value.ndim < 1 or value.shape[0] != mask.shape[0]:
        return False
    expected = np.broadcast_to(counts.reshape((-1,) + (1,) * (value.ndim - 1)), value.shape)
    return bool(np.allclose(value, expected, rtol=1e-6, atol=0))
