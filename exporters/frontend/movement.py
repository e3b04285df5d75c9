"""Data movement: chains of Reshape/Transpose/Squeeze/Unsqueeze/Flatten, compressed.

What a chain of movement ops does is a permutation of its input's elements. Applying the
chain to an index array (at batch 2, so that the batch dimension is told apart) shows
that permutation; `compress_movement` replaces the chain by the single Transpose or
Reshape, or Reshape + Transpose, that does the same, or removes it when it does nothing.
Squeeze, Unsqueeze and Flatten become Reshapes everywhere.
"""

from __future__ import annotations

import itertools

import numpy as np

from .graph import Graph, Node
from .shapes import reshape_target

MOVEMENT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")
PROBE_BATCH = 2


def movement_output(node: Node, g: Graph, array: np.ndarray) -> np.ndarray:
    """Apply a movement node to a concrete array."""
    if node.op == "Transpose":
        return np.transpose(array, node.attrs.get("perm"))
    if node.op == "Reshape":
        target = np.asarray(g.consts[node.inputs[1]]).reshape(-1).tolist()
        allowzero = node.attrs.get("allowzero", 0)
        return array.reshape([array.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)])
    if node.op == "Flatten":
        axis = node.attrs.get("axis", 1) % max(array.ndim, 1)
        return array.reshape(int(np.prod(array.shape[:axis], dtype=np.int64)), -1)
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        axes = [int(a) for a in g.consts[node.inputs[1]].reshape(-1)]
    if node.op == "Squeeze":
        return np.squeeze(array, axis=tuple(axes) if axes is not None else None)
    if node.op == "Unsqueeze":
        out_rank = array.ndim + len(axes)
        return np.expand_dims(array, tuple(a % out_rank for a in axes))
    raise AssertionError(node.op)


def _static_movement(g: Graph, node: Node) -> bool:
    """A movement op whose target shape or axes are constants (others are left alone)."""
    return node.op in MOVEMENT_OPS and all(i in g.consts for i in node.inputs[1:] if i)


def index_array(g: Graph, name: str, batch: int = PROBE_BATCH) -> np.ndarray:
    shape = g.concrete_shape(name, batch)
    return np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)


def compress_movement(g: Graph) -> None:
    """Replace each maximal chain of movement ops by the one it amounts to (module docstring)."""
    users = g.consumer_map()
    producers = g.producers()
    heads = []
    for node in g.nodes:
        if not _static_movement(g, node):
            continue
        before = producers.get(node.inputs[0])
        if before is not None and _static_movement(g, before) and g.single_user(before.outputs[0], users) is node:
            continue
        heads.append(node)
    for head in heads:
        chain = [head]
        while True:
            nxt = g.single_user(chain[-1].outputs[0], users)
            if nxt is None or not _static_movement(g, nxt):
                break
            chain.append(nxt)
        _replace_chain(g, chain)


def _replace_chain(g: Graph, chain: list[Node]) -> None:
    x, out = chain[0].inputs[0], chain[-1].outputs[0]
    index = index_array(g, x)
    moved = index
    for node in chain:
        moved = movement_output(node, g, moved)
    scope = chain[-1].scope or chain[0].scope
    position = g.nodes.index(chain[0])
    for node in chain:
        g.nodes.remove(node)
    if moved.shape == index.shape and np.array_equal(moved, index) and out not in g.outputs:
        g.replace_uses(out, x)
        return
    replacement = _single_movement(g, x, out, index, moved, scope)
    if replacement is not None:
        g.nodes[position:position] = replacement
        return
    # Nothing simpler does it: keep the chain, with Squeeze/Unsqueeze/Flatten as Reshapes.
    for offset, node in enumerate(chain):
        if node.op in ("Squeeze", "Unsqueeze", "Flatten"):
            i, o = node.inputs[0], node.outputs[0]
            target = reshape_target(g.shape(i), g.shape(o))
            node = Node("Reshape", [i, g.add_const(np.array(target, np.int64), "shape")], [o], {}, node.name, node.scope)
        g.nodes.insert(position + offset, node)


def _single_movement(g: Graph, x: str, out: str, index, moved, scope) -> list[Node] | None:
    """One Transpose or Reshape, or a Reshape and a Transpose (either order), that moves
    `index` into `moved`; None if there is none."""
    in_shape, out_shape = g.shape(x), g.shape(out)

    def reshape(src: str, dst: str, to_shape) -> Node:
        src_shape = in_shape if src == x else g.shapes[src]
        target = reshape_target(src_shape, to_shape)
        g.shapes[dst] = tuple(to_shape)
        return Node("Reshape", [src, g.add_const(np.array(target, np.int64), "shape")], [dst], {},
                    g.fresh(f"{scope or 'move'}.Reshape"), scope)

    def transpose(src: str, dst: str, perm) -> Node:
        return Node("Transpose", [src], [dst], {"perm": [int(p) for p in perm]}, g.fresh(f"{scope or 'move'}.Transpose"), scope)

    flat = index.reshape(-1)
    if moved.ndim == index.ndim and moved.ndim <= 6:
        for perm in itertools.permutations(range(index.ndim)):
            if np.array_equal(np.transpose(index, perm), moved):
                return [transpose(x, out, perm)]
    if np.array_equal(moved.reshape(-1), flat):
        return [reshape(x, out, out_shape)]
    if moved.ndim <= 6:
        for perm in itertools.permutations(range(moved.ndim)):
            mid = np.transpose(moved, np.argsort(perm))
            if np.array_equal(mid.reshape(-1), flat):
                t = g.fresh(f"{out}.reshaped")
                mid_shape = tuple(out_shape[i] for i in np.argsort(perm))
                return [reshape(x, t, mid_shape), transpose(t, out, perm)]
    if index.ndim <= 6:
        for perm in itertools.permutations(range(index.ndim)):
            mid = np.transpose(index, perm)
            if np.array_equal(mid.reshape(-1), moved.reshape(-1)):
                t = g.fresh(f"{out}.transposed")
                g.shapes[t] = tuple(in_shape[p] for p in perm)
                return [transpose(x, t, perm), reshape(t, out, out_shape)]
    return None


# --- fused projections ---------------------------------------------------------------------------


def _selected(node: Node, g: Graph, array: np.ndarray) -> np.ndarray | None:
    """A Slice with constant bounds (step 1) or a Gather of one constant index, applied to a
    concrete array; None for anything else."""
    if node.op == "Gather" and node.inputs[1] in g.consts and g.consts[node.inputs[1]].size == 1:
        return np.take(array, int(g.consts[node.inputs[1]].reshape(-1)[0]), axis=int(node.attrs.get("axis", 0)))
    if node.op != "Slice" or not all(i in g.consts for i in node.inputs[1:] if i):
        return None
    starts, ends = (g.consts[node.inputs[k]].reshape(-1).tolist() for k in (1, 2))
    axes = g.consts[node.inputs[3]].reshape(-1).tolist() if len(node.inputs) > 3 and node.inputs[3] else range(len(starts))
    steps = g.consts[node.inputs[4]].reshape(-1).tolist() if len(node.inputs) > 4 and node.inputs[4] else [1] * len(starts)
    if any(s != 1 for s in steps):
        return None
    index = [slice(None)] * array.ndim
    for a, s, e in zip(axes, starts, ends):
        index[a] = slice(s, e)
    return array[tuple(index)]


def _chain_from(g: Graph, name: str, users) -> list[Node]:
    """The static movement nodes that follow `name`, each the only user of the one before."""
    chain = []
    while True:
        nxt = g.single_user(chain[-1].outputs[0] if chain else name, users)
        if nxt is None or not _static_movement(g, nxt):
            return chain
        chain.append(nxt)


def split_fused_projections(g: Graph) -> None:
    """A linear layer whose output is only moved and then cut into parts (timm's fused QKV
    projection: reshaped to [B, N, 3, H, D], permuted, unbound into q, k and v) becomes one
    linear layer per part, each on its own columns of the weight and bias, followed by the
    movement that puts its columns where the part had them. The attention pattern then sees
    three projections, as in BERT, and the ITA modes can map it onto an attention block.
    Left alone unless every part is the whole of a set of the layer's output columns."""
    users = g.consumer_map()
    for mm in [n for n in g.nodes if n.op == "MatMul" and n.inputs[1] in g.consts and g.consts[n.inputs[1]].ndim == 2]:
        weight = g.consts[mm.inputs[1]]
        width = weight.shape[1]
        y, bias, add = mm.outputs[0], None, g.single_user(mm.outputs[0], users)
        if add is not None and add.op == "Add":
            other = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
            if other in g.consts and g.consts[other].reshape(-1).size == width:
                y, bias = add.outputs[0], g.consts[other].reshape(-1)
        if bias is None:
            add = None
        if y in g.outputs or len(g.shape(y)) < 2:
            continue
        moves = _chain_from(g, y, users)
        cut = moves[-1].outputs[0] if moves else y
        selectors = users.get(cut, [])
        if len(selectors) < 2 or cut in g.outputs:
            continue
        index = index_array(g, y)
        moved = index
        for node in moves:
            moved = movement_output(node, g, moved)
        parts = []
        for sel in selectors:
            part = _selected(sel, g, moved)
            if part is None:
                break
            after = _chain_from(g, sel.outputs[0], users)
            for node in after:
                part = movement_output(node, g, part)
            parts.append((sel, after, part))
        if len(parts) != len(selectors):
            continue
        rows = index.size // width
        plans = []
        for sel, after, part in parts:
            columns = np.unique(part % width)
            if part.size != rows * len(columns) or np.unique(part).size != part.size:
                break  # not every row of these columns: not a projection of its own
            position = np.searchsorted(columns, part % width)
            plans.append((sel, after, columns, (part // width) * len(columns) + position))
        if len(plans) != len(parts):
            continue
        scope, position = mm.scope, g.nodes.index(mm)
        x_shape = g.shape(mm.inputs[0])
        replacement, replaced = [], {id(n) for n in (mm, *moves, *([add] if add else []))}
        for k, (sel, after, columns, part_index) in enumerate(plans):
            out = (after[-1] if after else sel).outputs[0]
            replaced |= {id(n) for n in (sel, *after)}
            product = Node("MatMul", [mm.inputs[0], g.add_const(np.ascontiguousarray(weight[:, columns]), "weight")],
                           [g.fresh(f"{y}.part{k}")], {}, g.fresh(f"{mm.name}.part{k}"), scope)
            g.shapes[product.outputs[0]] = (*x_shape[:-1], len(columns))
            replacement.append(product)
            source = product.outputs[0]
            if bias is not None:
                biased = Node("Add", [source, g.add_const(bias[columns].astype(np.float32), "bias")], [g.fresh(f"{y}.part{k}.biased")],
                              {}, g.fresh(f"{mm.name}.part{k}.bias"), scope)
                g.shapes[biased.outputs[0]] = g.shapes[source]
                replacement.append(biased)
                source = biased.outputs[0]
            part_source = index_array(g, source)
            if part_index.shape == part_source.shape and np.array_equal(part_index, part_source):
                replacement[-1].outputs = [out]  # the part is these columns as they come
                g.shapes[out] = g.shapes[source]
                continue
            move = _single_movement(g, source, out, part_source, part_index, scope)
            if move is None:
                break
            replacement.extend(move)
        else:
            g.nodes = [n for n in g.nodes[:position] if id(n) not in replaced] + replacement + \
                      [n for n in g.nodes[position:] if id(n) not in replaced]
            users = g.consumer_map()
        # else a part no single movement produces: the layer stays fused
