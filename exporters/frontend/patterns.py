"""Patterns the quantizer recognises in a canonical graph: linear layers and self-attention."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import Graph, Node
from .movement import movement_output
from .rewrites import common_scope


@dataclass
class LinearMatch:
    """A linear layer in a canonical graph: y = x @ weight (+ bias)."""

    x: str
    weight: str  # constant [in, out]
    bias: str | None  # constant, or None
    out: str  # the layer's output (after the bias Add, if any)
    nodes: list[Node]


@dataclass
class AttentionMatch:
    """Self-attention from the Q/K/V projections to the output projection, with or without
    a split into heads (one head: `q @ k.transpose(-1, -2)` on [batch, seq, width]).

    `factor` is the product of the positive scalar factors applied to the scores (on Q, on
    K or on Q.K^T: 1/sqrt(P) as one or two factors); `mask` is the key-padding mask input
    added to the scores, or None.
    """

    q: LinearMatch
    k: LinearMatch
    v: LinearMatch
    o: LinearMatch
    heads: int
    head_dim: int
    factor: float
    mask: str | None
    scores: str  # the scaled scores entering softmax (before the mask)
    softmax: Node
    probs: str  # softmax output
    context: str  # A.V ((batch, heads, seq, head_dim), or (batch, seq, width) for one head)
    nodes: list[Node]  # every node from the projections to the output projection

    @property
    def name(self) -> str:
        return common_scope([n for n in self.nodes if n.scope]) or self.softmax.name


def linear_at(g: Graph, out: str) -> LinearMatch | None:
    """The linear layer producing `out` (MatMul with constant 2-D weights, optional bias Add)."""
    producers = g.producers()
    node = producers.get(out)
    if node is None:
        return None
    if node.op == "Add":
        for a, b in (node.inputs, node.inputs[::-1]):
            mm = producers.get(a)
            if mm is not None and mm.op == "MatMul" and b in g.consts and mm.inputs[1] in g.consts \
                    and g.consts[mm.inputs[1]].ndim == 2 and mm.inputs[0] not in g.consts \
                    and len(g.consumers(a)) == 1 and g.consts[b].size == g.consts[mm.inputs[1]].shape[1]:
                return LinearMatch(mm.inputs[0], mm.inputs[1], b, out, [mm, node])
        return None
    if node.op == "MatMul" and node.inputs[1] in g.consts and g.consts[node.inputs[1]].ndim == 2 and node.inputs[0] not in g.consts:
        return LinearMatch(node.inputs[0], node.inputs[1], None, out, [node])
    return None


def _chain_back(g: Graph, name: str, producers) -> tuple[str, list[Node], float]:
    """Walk back from `name` through Reshape/Transpose and positive scalar Muls with single
    users; returns (start tensor, nodes in order, product of the scalar factors)."""
    nodes, factor = [], 1.0
    while True:
        node = producers.get(name)
        if node is None or len(g.consumers(name)) != 1 or name in g.outputs:
            break
        if node.op in ("Reshape", "Transpose"):
            nodes.insert(0, node)
            name = node.inputs[0]
            continue
        if node.op == "Mul":
            c = g.scalar(node.inputs[1]) if node.inputs[0] not in g.consts else g.scalar(node.inputs[0])
            if c is not None and c > 0:
                nodes.insert(0, node)
                factor *= c
                name = node.inputs[0] if node.inputs[1] in g.consts else node.inputs[1]
                continue
        break
    return name, nodes, factor


def _moves_like(g: Graph, start: str, chain: list[Node], expected) -> bool:
    """Whether the movement nodes of `chain` move a (1, ...) tensor `start` as `expected`
    (a function of an index array) does."""
    shape = g.concrete_shape(start, 1)
    index = np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    moved = index
    try:
        for node in chain:
            if node.op != "Mul":
                moved = movement_output(node, g, moved)
        want = expected(index)
    except (ValueError, KeyError):
        return False
    return moved.shape == want.shape and np.array_equal(moved, want)


def match_attention(g: Graph) -> list[AttentionMatch]:
    """Every self-attention in the canonical graph (see AttentionMatch)."""
    producers = g.producers()
    found = []
    for softmax in [n for n in g.nodes if n.op == "Softmax"]:
        x = softmax.inputs[0]
        mask = None
        node = producers.get(x)
        if node is not None and node.op == "Add":
            keys = [i for i in node.inputs if i in g.key_padding_masks]
            if keys:
                mask = g.key_padding_masks[keys[0]]
                x = node.inputs[1] if node.inputs[0] == keys[0] else node.inputs[0]
        x, score_chain, factor = _chain_back(g, x, producers)
        if any(n.op != "Mul" for n in score_chain):
            continue
        qk = producers.get(x)
        if qk is None or qk.op != "MatMul" or any(i in g.consts for i in qk.inputs[:2]):
            continue
        probs = softmax.outputs[0]
        users = g.consumers(probs)
        if len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] != probs:
            continue
        av = users[0]
        q_start, q_chain, q_factor = _chain_back(g, qk.inputs[0], producers)
        k_start, k_chain, k_factor = _chain_back(g, qk.inputs[1], producers)
        v_start, v_chain, v_factor = _chain_back(g, av.inputs[1], producers)
        q, k, v = linear_at(g, q_start), linear_at(g, k_start), linear_at(g, v_start)
        if q is None or k is None or v is None or k.x != v.x or v_factor != 1.0:
            continue
        width = g.consts[q.weight].shape[1]
        heads_shape = g.concrete_shape(qk.inputs[0], 1)
        if len(heads_shape) == 4:
            _, heads, _, head_dim = heads_shape
        elif len(heads_shape) == 3:
            heads, head_dim = 1, heads_shape[-1]
        else:
            continue
        if heads * head_dim != width or g.consts[k.weight].shape[1] != width or g.consts[v.weight].shape[1] != width:
            continue

        rank = len(heads_shape)

        def split(i, h=heads, d=head_dim, rank=rank):
            if rank == 3:
                return i
            return i.reshape(i.shape[0], i.shape[1], h, d).transpose(0, 2, 1, 3)

        def split_t(i):
            return np.swapaxes(split(i), -1, -2)

        if not (_moves_like(g, q_start, q_chain, split) and _moves_like(g, v_start, v_chain, split)
                and _moves_like(g, k_start, k_chain, split_t)):
            continue
        # A.V back to (batch, seq, width), then the output projection.
        chain, out = [], av.outputs[0]
        while True:
            following = g.consumers(out)
            if len(following) != 1 or following[0].op not in ("Reshape", "Transpose") or out in g.outputs:
                break
            chain.append(following[0])
            out = following[0].outputs[0]
        following = g.consumers(out)
        if (not chain and len(heads_shape) == 4) or len(following) != 1 or following[0].op != "MatMul" \
                or following[0].inputs[0] != out:
            continue
        o_out = following[0].outputs[0]
        bias_users = g.consumers(o_out)
        if len(bias_users) == 1 and bias_users[0].op == "Add" and any(i in g.consts for i in bias_users[0].inputs):
            o_out = bias_users[0].outputs[0]
        o = linear_at(g, o_out)

        def merge(i, rank=rank):
            return i if rank == 3 else i.transpose(0, 2, 1, 3).reshape(i.shape[0], i.shape[2], -1)

        if o is None or o.x != out or not _moves_like(g, av.outputs[0], chain, merge):
            continue
        nodes = q.nodes + k.nodes + v.nodes + q_chain + k_chain + v_chain + [qk] + score_chain
        if mask is not None:
            nodes.append(producers[softmax.inputs[0]])
        nodes += [softmax, av] + chain + o.nodes
        found.append(AttentionMatch(q, k, v, o, heads, head_dim, factor * q_factor * k_factor, mask,
                                    score_chain[-1].outputs[0] if score_chain else qk.outputs[0],
                                    softmax, probs, av.outputs[0], nodes))
    return found


@dataclass
class FeedForwardMatch:
    """A transformer feed-forward layer: Linear -> GELU or ReLU -> Linear (BERT's
    intermediate/output dense, ViT's MLP), the hidden tensors used by nothing else."""

    fc1: LinearMatch
    activation: Node  # the Gelu or Relu node
    fc2: LinearMatch
    nodes: list[Node]

    @property
    def name(self) -> str:
        """The module holding both layers (ViT's `mlp`); `<layer>.ffn` when that is the whole
        encoder layer (BERT's `intermediate.dense` and `output.dense`)."""
        common = common_scope([n for n in self.nodes if n.scope])
        if not common:
            return self.fc1.nodes[0].name
        depth = common.count(".") + 1
        deeper = any(n.scope.count(".") > depth for n in (self.fc1.nodes[0], self.fc2.nodes[0]) if n.scope)
        return f"{common}.ffn" if deeper else common


def match_feedforward(g: Graph) -> list[FeedForwardMatch]:
    """Every feed-forward layer in the canonical graph (see FeedForwardMatch)."""
    found = []
    for act in [n for n in g.nodes if n.op in ("Gelu", "Relu")]:
        fc1 = linear_at(g, act.inputs[0])
        users = g.consumers(act.outputs[0])
        if fc1 is None or len(g.consumers(fc1.out)) != 1 or fc1.out in g.outputs or act.outputs[0] in g.outputs \
                or len(users) != 1 or users[0].op != "MatMul" or users[0].inputs[0] != act.outputs[0]:
            continue
        out = users[0].outputs[0]
        following = g.consumers(out)
        if len(following) == 1 and following[0].op == "Add" and any(i in g.consts for i in following[0].inputs):
            out = following[0].outputs[0]
        fc2 = linear_at(g, out)
        if fc2 is None or fc2.x != act.outputs[0]:
            continue
        w1, w2 = g.consts[fc1.weight], g.consts[fc2.weight]
        if w2.shape != w1.shape[::-1]:
            continue
        found.append(FeedForwardMatch(fc1, act, fc2, fc1.nodes + [act] + fc2.nodes))
    return found
