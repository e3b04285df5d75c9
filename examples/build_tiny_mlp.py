"""Build examples/tiny_mlp.intq: a hand-made two-layer integer MLP classifier.

int8 input [batch, 16] -> MatMul with packed int4 weights + int32 bias -> Requant to int8
-> Relu -> MatMul with ternary weights -> Requant to int8 logits -> ArgMax. The weights are
fixed pseudo-random integers, so the file is reproducible byte for byte:

    python examples/build_tiny_mlp.py
"""

from pathlib import Path

import numpy as np
from refsim import GraphBuilder
from refsim.intq import save

HERE = Path(__file__).parent


def build():
    rng = np.random.default_rng(20261123)
    b = GraphBuilder("tiny_mlp")
    b.metadata["labels"] = ["north", "east", "south", "west"]
    x = b.input("x", "int8", ["batch", 16], scale=0.05, zero_point=0)
    w1 = b.const(rng.integers(-8, 8, (16, 32)), "int4", name="fc1.weight")
    b1 = b.const(rng.integers(-300, 300, 32), "int32", name="fc1.bias")
    acc1 = b.node("MatMul", [x, w1, None, None, b1], outputs="fc1.acc")
    h = b.node(
        "Requant",
        [acc1, b.const(rng.integers(80, 160, 32), "int32", name="fc1.mul"), b.const(12, "int8", name="fc1.shift")],
        outputs="fc1.out", rounding="half_up", dtype="int8",
    )
    h = b.node("Relu", [h], outputs="relu.out")
    w2 = b.const(rng.integers(-1, 2, (32, 4)), "ternary", name="fc2.weight")
    acc2 = b.node("MatMul", [h, w2], outputs="fc2.acc")
    logits = b.node("Requant", [acc2, b.const(181, "int32"), b.const(8, "int8")], outputs="logits", dtype="int8")
    label = b.node("ArgMax", [logits], outputs="label", axis=-1, keepdims=False)
    b.output(logits, label)
    return b.build()


if __name__ == "__main__":
    save(build(), HERE / "tiny_mlp.intq")
    rng = np.random.default_rng(7)
    lines = [" ".join(str(v) for v in rng.integers(-128, 128, 16)) for _ in range(4)]
    (HERE / "tiny_mlp_inputs.txt").write_text("# one sample per line: 16 int8 values\n" + "\n".join(lines) + "\n")
    print("wrote", HERE / "tiny_mlp.intq")
