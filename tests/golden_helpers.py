"""Shared by the golden/hw_vectors tests: small random ITA attention graphs.

Until the ITA softmax ops land from their own branch, `ensure_ita_softmax()` registers a
stand-in `ITAPartialMax` written from the formula in shared/OPS_REFERENCE.md section 4
(k = 5, numerator 255*256, initial max -128, groups of 16, uint8 output). The layout
tests do not depend on what the softmax computes, only on the tensors the run produced.
"""

from __future__ import annotations

import numpy as np
from refsim import GraphBuilder
from refsim.blocks.ita import ItaAttention, ItaHead, ItaRequant, ItaSoftmax, add_attention_block
from refsim.dtypes import TYPES
from refsim.ops import registry

# Tensor names that must never become paths outside the set (or clash, or break C).
NASTY_NAMES = [
    "../escape", "/etc/passwd", "a/../../b", "nul\x00byte", "x" * 5000, "Logits", "logits", "CON", ".hidden",
    "", "..", "\u00fc:*?", "a/b", "a_b", "a:b", "*/ int evil; /*", "int", "FC1_OUT", "fc1.out", "9lives",
]


def nasty_graph():
    """A chain of Relu nodes whose outputs carry the names above (an empty one gets a default)."""
    b = GraphBuilder("nasty */ name")
    x = b.input("in/../../x", "int8", [2])
    for i, name in enumerate(NASTY_NAMES):
        x = b.node("Relu", [x], outputs=name or None, name=f"n{i}")
    b.output(x)
    return b.model()


def ensure_ita_softmax() -> None:
    if "ITAPartialMax" in registry.OPS:
        return

    def infer(ins, attrs):
        return [(TYPES["uint8"], ins[0].shape)]

    @registry.op("ITAPartialMax", inputs=["x"], infer=infer)
    def ITAPartialMax(x):
        """Stand-in for tests: ITA streaming softmax, k=5, NUM=65280, MAX_INIT=-128, G=16."""
        x = np.asarray(x).astype(np.int64)
        k, num, group = 5, 255 * 256, 16

        def rs(d):
            return (d + (1 << (k - 1))) >> k

        rows = x.reshape(-1, x.shape[-1])
        gmax = np.full(rows.shape[0], -128, np.int64)
        acc = np.zeros(rows.shape[0], np.int64)
        for g in range(0, rows.shape[1], group):
            part = rows[:, g : g + group]
            c = part.max(axis=1)
            s = np.where(c > gmax, rs(c - gmax), 0)
            gmax = np.maximum(gmax, c)
            acc = (acc >> s) + np.sum(256 >> rs(gmax[:, None] - part), axis=1)
        out = (num // acc)[:, None] >> rs(gmax[:, None] - rows)
        return out.reshape(x.shape).astype(np.uint8)


def random_requant(rng, acc_std: float) -> ItaRequant:
    """A random 7-bit multiplier with the shift that brings an accumulator of about
    `acc_std` to about 32, so that tests see spread-out int8 values, not clipped ones."""
    mul = int(rng.integers(64, 128))
    return ItaRequant(mul, max(int(round(np.log2(mul * acc_std / 32))), 0), int(rng.integers(-3, 4)))


def random_attention(rng, E: int, P: int, H: int, bias: bool = True) -> ItaAttention:
    heads = []
    int8_std = 74.0  # of uniform int8 values
    for _ in range(H):
        w = lambda *shape: rng.integers(-128, 128, shape)  # noqa: E731
        b = (lambda n: rng.integers(-(1 << 12), 1 << 12, n)) if bias else (lambda n: None)  # noqa: E731
        projection = lambda: random_requant(rng, np.sqrt(E) * int8_std * int8_std)  # noqa: E731
        heads.append(ItaHead(
            wq=w(E, P), wk=w(E, P), wv=w(E, P), wo=w(P, E),
            bq=b(P), bk=b(P), bv=b(P), bo=b(E),
            q=projection(), k=projection(), v=projection(),
            qk=random_requant(rng, np.sqrt(P) * 32 * 32 * 4),
            av=random_requant(rng, 255 * 32 / 4),
            ow=random_requant(rng, np.sqrt(P) * 32 * int8_std),
        ))
    return ItaAttention(heads, random_requant(rng, 32 * np.sqrt(H)), ItaSoftmax("ITAPartialMax"))


def ita_model(S=64, E=64, P=64, H=2, seed=0, cross=False, bias=True):
    """A graph that is one ITA attention block on int8 inputs q (and kv when `cross`)."""
    ensure_ita_softmax()
    rng = np.random.default_rng(seed)
    b = GraphBuilder("ita_block")
    q = b.input("q", "int8", [S, E])
    kv = b.input("kv", "int8", [S, E]) if cross else q
    out = add_attention_block(b, "enc0.attn", q, kv, random_attention(rng, E, P, H, bias)).out
    b.output(out)
    return b.model()
