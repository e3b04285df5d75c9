"""Small valid models shared by the robustness tests and the fuzz targets' seeds."""

from __future__ import annotations

import numpy as np
from refsim import GraphBuilder


def sample_graph(quantized: bool = False, softmax: bool = False):
    """Packed int4 and ternary weights, a blob, metadata and symbolic shapes. `quantized` adds
    scales and zero points to the input and the int4 weight (per channel); `softmax` adds an
    ITAMax output."""
    rng = np.random.default_rng(5)
    b = GraphBuilder("sample")
    b.metadata["labels"] = ["a", "b", "c"]
    b.blobs["notes.txt"] = b"hello"
    quant_x = {"scale": 0.05, "zero_point": 0} if quantized else {}
    quant_w = {"scale": [0.1] * 6, "zero_point": [0] * 6, "quant_axis": 1} if quantized else {}
    x = b.input("x", "int8", ["batch", 8], **quant_x)
    ids = b.input("ids", "int32", ["batch"])
    w1 = b.const(rng.integers(-8, 8, (8, 6)), "int4", name="w1", **quant_w)
    acc = b.node("MatMul", [x, w1, None, None, b.const(rng.integers(-50, 50, 6), "int32", name="b1")], outputs="acc", name="fc1")
    h = b.node("Requant", [acc, b.const(77, "int32", name="m1"), b.const(9, "int8", name="s1")], outputs="h", name="rq1", dtype="int8")
    h = b.node("Relu", [h], outputs="h_relu", name="relu")
    emb = b.node("Gather", [b.const(rng.integers(-128, 128, (10, 6)), "int8", name="table"), ids], outputs="emb", name="lookup")
    s = b.node("Add", [h, emb], outputs="sum", name="add")
    w2 = b.const(rng.integers(-1, 2, (6, 3)), "ternary", name="w2")
    logits = b.node("MatMul", [s, w2], outputs="logits", name="fc2")
    probs = b.node("ITAMax", [logits], outputs="probs", name="softmax") if softmax else None
    label = b.node("ArgMax", [logits], outputs="label", name="argmax", axis=-1, keepdims=False)
    b.output(logits, label, *([probs] if softmax else []))
    return b.build()
