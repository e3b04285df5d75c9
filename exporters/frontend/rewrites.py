"""Small canonical rewrites of float graphs, one function each (listed in `frontend.passes`).

Each takes a `Graph` whose shapes are inferred and rewrites it in place into an equivalent
graph closer to the quantizer's vocabulary.
"""

from __future__ import annotations

import math

import numpy as np

from ..dyadic import ExportError
from .graph import Graph, Node

# --- no-ops ------------------------------------------------------------------------------------


def _expands_to_itself(g: Graph, node: Node) -> bool:
    """An Expand whose constant target broadcasts to the input's own (known) shape: X-MOD's
    `index_put` of a whole tensor, as dynamo writes it."""
    if node.op != "Expand" or node.inputs[1] not in g.consts:
        return False
    shape = g.shape(node.inputs[0])
    if not all(isinstance(d, int) for d in shape):
        return False
    try:
        return tuple(np.broadcast_shapes(shape, tuple(int(d) for d in g.consts[node.inputs[1]].reshape(-1)))) == tuple(shape)
    except ValueError:
        return False


def remove_identities(g: Graph) -> None:
    """Identity, Dropout, a Cast to the type the tensor already has, an Expand to the shape
    the tensor already has, and `Where(IsNaN(p), 0, p)` (a guard of fully masked softmax rows,
    a no-op otherwise) are removed."""
    for node in list(g.nodes):
        if node.outputs[0] in g.outputs:
            continue
        same_type = node.op == "Cast" and node.attrs.get("to") == g.elem_type(node.inputs[0])
        if node.op in ("Identity", "Dropout") or same_type or _expands_to_itself(g, node):
            g.bypass(node, node.inputs[0])
    producers = g.producers()
    for node in list(g.nodes):
        if node.op == "Where" and len(node.inputs) == 3 and node.outputs[0] not in g.outputs:
            cond = producers.get(node.inputs[0])
            if cond is not None and cond.op == "IsNaN" and cond.inputs[0] == node.inputs[2] and g.scalar(node.inputs[1]) == 0.0:
                g.bypass(node, node.inputs[2])
    g.prune()


def drop_neutral(g: Graph) -> None:
    """Adding zeros or multiplying by ones (that changes no shape) is removed."""
    for node in list(g.nodes):
        if node.op not in ("Add", "Mul") or len(node.inputs) != 2 or node.outputs[0] in g.outputs:
            continue
        neutral = 0.0 if node.op == "Add" else 1.0
        for a, b in (node.inputs, node.inputs[::-1]):
            if b in g.consts and a not in g.consts and np.all(g.consts[b] == neutral) \
                    and g.consts[b].ndim <= g.rank(a) and g.shape(a) == g.shape(node.outputs[0]):
                g.bypass(node, a)
                break
    g.prune()


def global_pools(g: Graph) -> None:
    """GlobalAveragePool (torch's AdaptiveAvgPool(1), Swin's pooler) -> ReduceMean over the
    spatial axes, keeping them as 1s."""
    for node in [n for n in g.nodes if n.op == "GlobalAveragePool"]:
        axes = list(range(2, g.rank(node.inputs[0])))
        node.op, node.attrs = "ReduceMean", {"keepdims": 1}
        node.inputs = [node.inputs[0], g.add_const(np.array(axes, np.int64), "axes")]


def _enumerates(indices: np.ndarray, shape: tuple) -> bool:
    """Whether constant ND indices [..., k] list every position of shape[:k], in order."""
    k = indices.shape[-1] if indices.ndim else 0
    lead = shape[:k]
    if k == 0 or len(lead) < k or not all(isinstance(d, int) for d in lead):
        return False
    every = np.indices(lead).reshape(k, -1).T
    return indices.reshape(-1, k).shape == every.shape and bool(np.all(indices.reshape(-1, k) == every))


def whole_selections(g: Graph) -> None:
    """`x[mask]` and `y[mask] = v` with a constant mask that keeps every sample or none
    (X-MOD's per-language adapters at a fixed batch: every sample has the default language,
    so one adapter takes the whole batch and the others nothing): a GatherND or ScatterND
    whose constant indices list every position in order is a Reshape; a ScatterND with no
    indices is its data (the empty branch feeding it is then dead)."""
    for node in list(g.nodes):
        if node.op not in ("GatherND", "ScatterND") or node.inputs[1] not in g.consts or node.outputs[0] in g.outputs:
            continue
        indices = g.consts[node.inputs[1]]
        data_shape = g.shape(node.inputs[0])
        if node.op == "ScatterND" and node.attrs.get("reduction", "none") == "none":
            if indices.size == 0:
                g.bypass(node, node.inputs[0])
            elif _enumerates(indices, data_shape):
                node.op, node.attrs = "Reshape", {}
                node.inputs = [node.inputs[2], g.add_const(np.array(data_shape, np.int64), "shape")]
        elif node.op == "GatherND" and not node.attrs.get("batch_dims", 0) and _enumerates(indices, data_shape):
            out_shape = list(indices.shape[:-1]) + list(data_shape[indices.shape[-1]:])
            if all(isinstance(d, int) for d in out_shape):
                node.op, node.attrs = "Reshape", {}
                node.inputs = [node.inputs[0], g.add_const(np.array(out_shape, np.int64), "shape")]
    g.prune()


# --- decompositions -----------------------------------------------------------------------------


def _reduce_axes(g: Graph, node: Node) -> list[int] | None:
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > 1 and node.inputs[1] in g.consts:
        return [int(a) for a in g.consts[node.inputs[1]].reshape(-1)]
    return None


def _last_axis(g: Graph, axes, name: str) -> bool:
    rank = g.rank(name)
    return axes is not None and len(axes) == 1 and axes[0] % rank == rank - 1


def common_scope(nodes: list[Node]) -> str:
    scopes = [n.scope for n in nodes if n.scope]
    if not scopes:
        return ""
    parts = [s.split(".") for s in scopes]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def fuse_layernorm(g: Graph) -> None:
    """ReduceMean-Sub-Pow-ReduceMean[-Add(eps)]-Sqrt-Div[-Mul(gamma)][-Add(beta)] ->
    LayerNormalization. The division may be a Mul by Reciprocal(Sqrt); an epsilon the
    exporter dropped (Hugging Face's I-BERT in float mode: `y / sqrt(eps + var)` came out
    of the dynamo exporter as Sqrt(var)) is 0."""
    for mean in [n for n in g.nodes if n.op == "ReduceMean"]:
        if mean not in g.nodes:
            continue
        users = g.consumer_map()
        x = mean.inputs[0]
        if not _last_axis(g, _reduce_axes(g, mean), x):
            continue
        sub = g.single_user(mean.outputs[0], users)
        if sub is None or sub.op != "Sub" or sub.inputs != [x, mean.outputs[0]]:
            continue
        d = sub.outputs[0]
        d_users = users.get(d, [])
        square = next((u for u in d_users if (u.op == "Pow" and g.scalar(u.inputs[1]) == 2.0)
                       or (u.op == "Mul" and u.inputs == [d, d])), None)
        div = next((u for u in d_users if u is not square and u.op in ("Div", "Mul") and d in u.inputs
                       and (u.op == "Mul" or u.inputs[0] == d)), None)
        if square is None or div is None or len(d_users) != 2:
            continue
        var = g.single_user(square.outputs[0], users)
        if var is None or var.op != "ReduceMean" or not _last_axis(g, _reduce_axes(g, var), square.outputs[0]):
            continue
        add_eps = g.single_user(var.outputs[0], users)
        eps = 0.0
        if add_eps is not None and add_eps.op == "Add":
            eps = g.scalar(add_eps.inputs[1]) if add_eps.inputs[0] == var.outputs[0] else g.scalar(add_eps.inputs[0])
            std_input = add_eps.outputs[0]
        else:
            add_eps, std_input = None, var.outputs[0]
        sqrt = g.single_user(std_input, users)
        if eps is None or sqrt is None or sqrt.op != "Sqrt":
            continue
        steps = [sqrt]
        if div.op == "Mul":  # d * Reciprocal(sqrt)
            inverse = g.single_user(sqrt.outputs[0], users)
            if inverse is None or inverse.op != "Reciprocal" or sorted(div.inputs) != sorted([d, inverse.outputs[0]]):
                continue
            steps.append(inverse)
        elif div.inputs[1] != sqrt.outputs[0]:
            continue
        matched = [mean, sub, square, var, *([add_eps] if add_eps is not None else []), *steps, div]
        width = g.concrete_shape(x)[-1]
        out = div.outputs[0]
        gamma = np.ones(width, np.float32)
        beta = np.zeros(width, np.float32)
        nxt = g.single_user(out, users)
        if nxt is not None and nxt.op == "Mul":
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            if other in g.consts and g.consts[other].size in (1, width):
                gamma = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,)).copy()
                matched.append(nxt)
                out = nxt.outputs[0]
                nxt = g.single_user(out, users)
        if nxt is not None and nxt.op == "Add":
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            if other in g.consts and g.consts[other].size in (1, width):
                beta = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,)).copy()
                matched.append(nxt)
                out = nxt.outputs[0]
        scope = common_scope(matched)
        ln = Node("LayerNormalization", [x, g.add_const(gamma, "ln.weight"), g.add_const(beta, "ln.bias")],
                  [out], {"axis": -1, "epsilon": float(eps)}, g.fresh(f"{scope or 'layernorm'}.LayerNormalization"), scope)
        position = g.nodes.index(mean)
        for n in matched:
            g.nodes.remove(n)
        g.nodes.insert(position, ln)
    g.toposort()


# The largest clamp of a norm taken as a guard against dividing by zero (F.normalize: 1e-12).
NORM_GUARD = 1e-6


def _norm_of(g: Graph, x: str, name: str, producers) -> float | None:
    """The epsilon guarding `name` when it is max(||x||_2, eps) over x's last axis, kept as
    a dimension (ReduceL2 -> optional Clip(min) or Max -> optional Expand): 0.0 for an
    unguarded norm, None when `name` is no such norm."""
    eps = 0.0
    node = producers.get(name)
    while node is not None and node.op in ("Expand", "Clip", "Max"):
        if node.op == "Clip":
            low = g.scalar(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
            if low is None or not 0 <= low <= NORM_GUARD or (len(node.inputs) > 2 and node.inputs[2]):
                return None
            eps = max(eps, low)
        elif node.op == "Max":
            if len(node.inputs) != 2 or node.inputs[1] not in g.consts or g.consts[node.inputs[1]].size != 1:
                return None
            low = g.scalar(node.inputs[1])
            if low is None or not 0 <= low <= NORM_GUARD:
                return None
            eps = max(eps, low)
        node = producers.get(node.inputs[0])
    if node is None or node.op != "ReduceL2" or node.inputs[0] != x or not node.attrs.get("keepdims", 1):
        return None
    return eps if _last_axis(g, _reduce_axes(g, node), x) else None


def l2_normalize(g: Graph) -> None:
    """x / max(||x||_2, eps) over the last axis (sentence-transformers' Normalize,
    F.normalize, x / x.norm(dim=-1, keepdim=True)) -> the first half of
    LayerNormalization([x, -x]) with gamma 1/sqrt(D), D the width of x: [x, -x] has mean 0
    exactly and mean square ||x||^2 / D, so LayerNorm divides it by ||x|| / sqrt(D), and the
    integer LayerNorm computes the norm (an epsilon of eps^2 / D stands for the guard)."""
    producers = g.producers()
    for div in [n for n in g.nodes if n.op == "Div"]:
        x, norm = div.inputs
        eps = _norm_of(g, x, norm, producers)
        width = g.shape(x)[-1] if g.rank(x) else None
        if eps is None or not isinstance(width, int) or g.shape(div.outputs[0]) != g.shape(x):
            continue
        scope = div.scope
        neg = g.make_node("Neg", [x], f"{scope or 'normalize'}.negated", scope)
        both = g.make_node("Concat", [x, neg.outputs[0]], f"{scope or 'normalize'}.signed", scope, axis=-1)
        gamma = np.full(2 * width, 1 / math.sqrt(width), np.float32)
        ln = g.make_node("LayerNormalization", [both.outputs[0], g.add_const(gamma, "normalize.weight"),
                                               g.add_const(np.zeros(2 * width, np.float32), "normalize.bias")],
                         f"{scope or 'normalize'}.norm", scope, axis=-1, epsilon=float(eps * eps / width))
        half = g.make_node("Slice", [ln.outputs[0], g.add_const(np.array([0], np.int64), "starts"),
                                     g.add_const(np.array([width], np.int64), "ends"),
                                     g.add_const(np.array([g.rank(x) - 1], np.int64), "axes")],
                           f"{scope or 'normalize'}.half", scope)
        half.outputs = [div.outputs[0]]
        position = g.nodes.index(div)
        g.nodes[position:position + 1] = [neg, both, ln, half]
    g.prune()


def fuse_gelu(g: Graph) -> None:
    """0.5 * x * (1 + erf(x / sqrt 2)) in any association -> Gelu (and the tanh form)."""
    for erf in [n for n in g.nodes if n.op in ("Erf", "Tanh")]:
        if erf not in g.nodes:
            continue
        users = g.consumer_map()
        producers = g.producers()
        scaled = producers.get(erf.inputs[0])
        if scaled is None:
            continue
        if erf.op == "Erf":
            x = _scaled_input(g, scaled, 1 / math.sqrt(2))
            inner_nodes = [scaled]
            approximate = "none"
        else:
            x, inner_nodes = _tanh_gelu_input(g, scaled, producers)
            approximate = "tanh"
        if x is None:
            continue
        plus = g.single_user(erf.outputs[0], users)
        if plus is None or plus.op != "Add":
            continue
        one = plus.inputs[1] if plus.inputs[0] == erf.outputs[0] else plus.inputs[0]
        if g.scalar(one) != 1.0:
            continue
        product = _product_of(g, plus.outputs[0], x, users, producers)
        if product is None:
            continue
        out, muls = product
        matched = inner_nodes + [erf, plus] + muls
        scope = common_scope(matched)
        gelu = Node("Gelu", [x], [out], {"approximate": approximate}, g.fresh(f"{scope or 'gelu'}.Gelu"), scope)
        position = min(g.nodes.index(n) for n in matched if n in g.nodes)
        for n in matched:
            if n in g.nodes:
                g.nodes.remove(n)
        g.nodes.insert(position, gelu)
    g.toposort()


def _scaled_input(g: Graph, node: Node, factor: float) -> str | None:
    """x when node computes x * factor (as Mul or Div)."""
    if node.op == "Mul":
        for a, b in (node.inputs, node.inputs[::-1]):
            c = g.scalar(b)
            if c is not None and abs(c - factor) < 1e-4 * abs(factor):
                return a
    if node.op == "Div":
        c = g.scalar(node.inputs[1])
        if c is not None and c != 0 and abs(1 / c - factor) < 1e-4 * abs(factor):
            return node.inputs[0]
    return None


def _tanh_gelu_input(g: Graph, node: Node, producers) -> tuple[str | None, list[Node]]:
    """x for tanh(sqrt(2/pi) * (x + 0.044715 * x^3))."""
    inner = _scaled_input(g, node, math.sqrt(2 / math.pi))
    add = producers.get(inner) if inner else None
    if add is None or add.op != "Add":
        return None, []
    for x, cube_term in (add.inputs, add.inputs[::-1]):
        term = producers.get(cube_term)
        if term is None:
            continue
        cube = _scaled_input(g, term, 0.044715)
        cube_nodes = _cube_of(g, cube, x, producers) if cube else None
        if cube_nodes is not None:
            return x, [node, add, term, *cube_nodes]
    return None, []


def _cube_of(g: Graph, name: str, x: str, producers) -> list[Node] | None:
    """The nodes computing x^3 as `name` (Pow(x, 3), or x * (x * x) in either order)."""
    node = producers.get(name)
    if node is None:
        return None
    if node.op == "Pow" and node.inputs[0] == x and g.scalar(node.inputs[1]) == 3.0:
        return [node]
    if node.op == "Mul" and x in node.inputs:
        other = node.inputs[1] if node.inputs[0] == x else node.inputs[0]
        square = producers.get(other)
        if square is not None and square.op == "Mul" and square.inputs == [x, x]:
            return [node, square]
    return None


def _is_half_of(g: Graph, node: Node | None, x: str) -> bool:
    if node is None or node.op != "Mul" or x not in node.inputs or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] == x else node.inputs[0]
    return g.scalar(other) == 0.5


def _product_of(g: Graph, start: str, x: str, users, producers):
    """Follow Mul nodes from `start` until x and 0.5 have both been multiplied in."""
    need_x, need_half = True, True
    current, muls = start, []
    while need_x or need_half:
        nxt = g.single_user(current, users)
        if nxt is None or nxt.op != "Mul" or len(nxt.inputs) != 2:
            return None
        other = nxt.inputs[1] if nxt.inputs[0] == current else nxt.inputs[0]
        if need_x and other == x:
            need_x = False
        elif need_half and g.scalar(other) == 0.5:
            need_half = False
        elif need_x and need_half and _is_half_of(g, producers.get(other), x) and len(users.get(other, [])) == 1:
            need_x = need_half = False
            muls.append(producers[other])
        else:
            return None
        muls.append(nxt)
        current = nxt.outputs[0]
    return current, muls


# --- linear layers ---------------------------------------------------------------------------


def gemm_to_matmul(g: Graph) -> None:
    """Gemm with constant B -> MatMul (B transposed and scaled by alpha) + Add (C * beta)."""
    for node in [n for n in g.nodes if n.op == "Gemm"]:
        a, b = node.inputs[0], node.inputs[1]
        c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
        if node.attrs.get("transA", 0) or b not in g.consts:
            raise ExportError(f"{node.describe()}: Gemm with a transposed or non-constant first operand is not supported")
        w = g.consts[b].astype(np.float32)
        if node.attrs.get("transB", 0):
            w = w.T
        w = w * float(node.attrs.get("alpha", 1.0))
        mm = Node("MatMul", [a, g.add_const(np.ascontiguousarray(w), "weight")], [node.outputs[0]], {}, node.name, node.scope)
        position = g.nodes.index(node)
        g.nodes[position] = mm
        if c is not None:
            if c not in g.consts:
                raise ExportError(f"{node.describe()}: Gemm with a non-constant C is not supported")
            bias = g.consts[c].astype(np.float32) * float(node.attrs.get("beta", 1.0))
            mm.outputs = [g.fresh(f"{node.outputs[0]}.matmul")]
            add = Node("Add", [mm.outputs[0], g.add_const(bias, "bias")], [node.outputs[0]], {}, g.fresh(f"{node.name}.bias"), node.scope)
            g.nodes.insert(position + 1, add)


def pointwise_convs(g: Graph) -> None:
    """A 1-D Conv with kernel 1 (stride 1, no padding; any number of groups) is a linear layer
    on the channels of each position (SqueezeBERT's projections on [B, C, S]): transposed to
    [B, S, C], a MatMul by the block-diagonal weight of its groups, transposed back."""
    for node in [n for n in g.nodes if n.op == "Conv"]:
        x, w_name = node.inputs[0], node.inputs[1]
        if w_name not in g.consts or g.consts[w_name].ndim != 3:
            continue
        w = g.consts[w_name].astype(np.float32)
        a = node.attrs
        if list(a.get("kernel_shape", w.shape[2:])) != [1] or list(a.get("strides", [1])) != [1] \
                or any(a.get("pads", [0, 0])) or list(a.get("dilations", [1])) != [1] \
                or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            continue
        groups = int(a.get("group", 1))
        c_out, c_group, _ = w.shape
        weight = np.zeros((c_group * groups, c_out), np.float32)
        per = c_out // groups
        for k in range(groups):
            weight[k * c_group:(k + 1) * c_group, k * per:(k + 1) * per] = w[k * per:(k + 1) * per, :, 0].T
        scope = node.scope
        steps = [g.make_node("Transpose", [x], f"{scope or 'conv'}.positions", scope, perm=[0, 2, 1])]
        steps.append(Node("MatMul", [steps[-1].outputs[0], g.add_const(weight, "weight")], [g.fresh(f"{scope}.matmul")], {},
                          node.name, scope))
        if len(node.inputs) > 2 and node.inputs[2]:
            steps.append(g.make_node("Add", [steps[-1].outputs[0], g.add_const(g.consts[node.inputs[2]].astype(np.float32), "bias")],
                                     f"{scope or 'conv'}.bias", scope))
        back = g.make_node("Transpose", [steps[-1].outputs[0]], f"{scope or 'conv'}.channels", scope, perm=[0, 2, 1])
        back.outputs = [node.outputs[0]]
        steps.append(back)
        position = g.nodes.index(node)
        g.nodes[position:position + 1] = steps


def conv_patches(g: Graph) -> None:
    """Conv with stride == kernel, no padding or dilation, one group: a linear layer on
    non-overlapping patches (the ViT patch embedding)."""
    for node in [n for n in g.nodes if n.op == "Conv"]:
        x, w_name = node.inputs[0], node.inputs[1]
        if w_name not in g.consts:
            raise ExportError(f"{node.describe()}: Conv with non-constant weights is not supported")
        w = g.consts[w_name].astype(np.float32)
        kernel = list(node.attrs.get("kernel_shape", w.shape[2:]))
        strides = list(node.attrs.get("strides", [1] * len(kernel)))
        pads = list(node.attrs.get("pads", [0] * 2 * len(kernel)))
        dil = list(node.attrs.get("dilations", [1] * len(kernel)))
        if len(kernel) != 2 or strides != kernel or any(pads) or any(d != 1 for d in dil) or node.attrs.get("group", 1) != 1 \
                or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise ExportError(
                f"{node.describe()}: only a 2-D Conv with stride equal to its kernel, no padding, no dilation "
                f"and one group (a patch embedding) is supported; other convolutions (ConvBERT's depthwise span "
                f"convolution, a convolutional stem) have no integer form here and no --config setting changes that: "
                f"export the model without them, or please report it"
            )
        _, c, h, wd = g.concrete_shape(x)
        e, _, p, q = w.shape
        if h % p or wd % q:
            raise ExportError(f"{node.describe()}: image size {h}x{wd} is not a multiple of the patch size {p}x{q}")
        gh, gw = h // p, wd // q
        scope = node.scope
        steps = []

        def add(op, inputs, **attrs):
            n = g.make_node(op, inputs, f"{scope or 'conv'}.patches", scope, **attrs)
            steps.append(n)
            return n.outputs[0]

        t = add("Reshape", [x, g.add_const(np.array([0, c, gh, p, gw, q], np.int64), "shape")])
        t = add("Transpose", [t], perm=[0, 2, 4, 1, 3, 5])
        t = add("Reshape", [t, g.add_const(np.array([0, gh * gw, c * p * q], np.int64), "shape")])
        weight = np.ascontiguousarray(w.reshape(e, c * p * q).T)
        mm = Node("MatMul", [t, g.add_const(weight, "weight")], [g.fresh(f"{scope}.matmul")], {}, node.name, scope)
        steps.append(mm)
        t = mm.outputs[0]
        if len(node.inputs) > 2 and node.inputs[2]:
            t = add("Add", [t, g.add_const(g.consts[node.inputs[2]].astype(np.float32), "bias")])
        t = add("Reshape", [t, g.add_const(np.array([0, gh, gw, e], np.int64), "shape")])
        last = g.make_node("Transpose", [t], f"{scope or 'conv'}.patches", scope, perm=[0, 3, 1, 2])
        last.outputs = [node.outputs[0]]
        steps.append(last)
        position = g.nodes.index(node)
        g.nodes[position:position + 1] = steps


def split_to_slices(g: Graph) -> None:
    """Split -> one Slice per output (TorchScript writes a fused QKV projection's `unbind` or
    `chunk`, as timm's attention does, as a Split). The part sizes are the `split` input or
    attribute, or equal parts (`num_outputs`, or one per output) of the axis' fixed size."""
    for node in [n for n in g.nodes if n.op == "Split"]:
        x = node.inputs[0]
        axis = int(node.attrs.get("axis", 0)) % g.rank(x)
        sizes_input = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else None
        if sizes_input is not None:
            if sizes_input not in g.consts:
                raise ExportError(f"{node.describe()}: Split with part sizes computed at run time is not supported")
            sizes = [int(v) for v in g.consts[sizes_input].reshape(-1)]
        elif "split" in node.attrs:
            sizes = [int(v) for v in node.attrs["split"]]
        else:
            length = g.shape(x)[axis]
            if not isinstance(length, int):
                raise ExportError(f"{node.describe()}: Split into equal parts of a symbolic axis ({length}) is not supported")
            parts = len(node.outputs)
            step = -(-length // parts)  # ONNX: equal parts, the last one smaller if need be
            sizes = [min(step, length - i * step) for i in range(parts)]
        if len(sizes) != len(node.outputs):
            raise ExportError(f"{node.describe()}: {len(sizes)} part sizes for {len(node.outputs)} outputs")
        slices, start = [], 0
        for out, size in zip(node.outputs, sizes):
            piece = g.make_node("Slice", [x, g.add_const(np.array([start], np.int64), "starts"),
                                          g.add_const(np.array([start + size], np.int64), "ends"),
                                          g.add_const(np.array([axis], np.int64), "axes")], f"{node.name}.part", node.scope)
            piece.outputs = [out]
            slices.append(piece)
            start += size
        position = g.nodes.index(node)
        g.nodes[position:position + 1] = [s for s, out in zip(slices, node.outputs) if out]


def constant_arithmetic(g: Graph) -> None:
    """x - c -> x + (-c); x / c -> x * (1/c), for a constant c."""
    for node in g.nodes:
        if node.op == "Sub" and node.inputs[1] in g.consts and node.inputs[0] not in g.consts:
            node.op = "Add"
            node.inputs[1] = g.add_const(-g.consts[node.inputs[1]], "negated")
        elif node.op == "Div" and node.inputs[1] in g.consts and node.inputs[0] not in g.consts \
                and g.consts[node.inputs[1]].dtype.kind == "f":
            node.op = "Mul"
            c = g.consts[node.inputs[1]]
            node.inputs[1] = g.add_const((1.0 / c.astype(np.float64)).astype(c.dtype), "reciprocal")


def _linear_parts(g: Graph, node: Node, users) -> tuple[Node, Node | None] | None:
    """(MatMul, bias Add or None) if node ends a linear layer with constant weights."""
    producers = g.producers()
    if node.op == "MatMul" and node.inputs[1] in g.consts and g.consts[node.inputs[1]].ndim == 2:
        user = g.single_user(node.outputs[0], users)
        if user is not None and _linear_parts(g, user, users) is not None:
            return None  # the layer ends at its bias Add
        return node, None
    if node.op == "Add":
        for a, b in (node.inputs, node.inputs[::-1]):
            mm = producers.get(a)
            if mm is not None and mm.op == "MatMul" and mm.inputs[1] in g.consts and b in g.consts \
                    and g.consts[mm.inputs[1]].ndim == 2 and g.single_user(a, users) is node \
                    and g.consts[b].size in (1, g.consts[mm.inputs[1]].shape[1]):
                return mm, node
    return None


def fold_affine_into_linear(g: Graph) -> None:
    """Linear -> Mul(c) [-> Add(d)] with per-output-channel constants becomes one Linear
    (MobileBERT's NoNorm right after a dense layer)."""
    changed = True
    while changed:
        changed = False
        users = g.consumer_map()
        for node in list(g.nodes):
            parts = _linear_parts(g, node, users)
            if parts is None:
                continue
            mm, bias_add = parts
            out = node.outputs[0]
            nxt = g.single_user(out, users)
            if nxt is None or nxt.op not in ("Mul", "Add"):
                continue
            other = nxt.inputs[1] if nxt.inputs[0] == out else nxt.inputs[0]
            width = g.consts[mm.inputs[1]].shape[1]
            if other not in g.consts or other == out or g.consts[other].size not in (1, width) \
                    or (g.consts[other].ndim > 1 and g.consts[other].shape[-1] != g.consts[other].size):
                continue
            c = np.broadcast_to(g.consts[other].astype(np.float32).reshape(-1), (width,))
            w = g.consts[mm.inputs[1]].astype(np.float32)
            if bias_add is not None:
                bias_name = bias_add.inputs[1] if bias_add.inputs[0] == mm.outputs[0] else bias_add.inputs[0]
                b = np.broadcast_to(g.consts[bias_name].astype(np.float32).reshape(-1), (width,))
            else:
                b = np.zeros(width, np.float32)
            if nxt.op == "Mul":
                w, b = w * c[None, :], b * c
            else:
                b = b + c
            mm.inputs[1] = g.add_const(np.ascontiguousarray(w), "weight")
            new_bias = g.add_const(np.ascontiguousarray(b), "bias")
            if bias_add is None:
                bias_add = Node("Add", [mm.outputs[0], new_bias], [nxt.outputs[0]], {}, g.fresh(f"{mm.name}.bias"), mm.scope)
                g.nodes[g.nodes.index(nxt)] = bias_add
            else:
                # The bias Add takes over the folded node's output name (a graph output keeps its name).
                bias_add.inputs = [mm.outputs[0], new_bias]
                g.nodes.remove(nxt)
                g.replace_uses(bias_add.outputs[0], nxt.outputs[0])
                bias_add.outputs = [nxt.outputs[0]]
            changed = True
            break
    g.prune()
