"""Write the small quantized ONNX models the README's `refsim import` examples use.

    python examples/make_import_examples.py      # rewrites examples/{qdq,qonnx,deeploy}_tiny.onnx
                                                 # and qdq_tiny_inputs.npy

qdq_tiny: a QDQ MLP as onnxruntime's quantizer writes it (float input, int8 weights with
int32 bias, uint8 activations). qonnx_tiny: a Brevitas-style QONNX MLP with 4-bit and
ternary weights. deeploy_tiny: a quantlib integer graph (MatMul, RequantShift, iGELU,
RequantShift) whose float tensors hold integers.
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
rng = np.random.default_rng(2024)


def init(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def save(nodes, inputs, outputs, inits, path, opsets):
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              producer_name="refsim examples")
    model.ir_version = 9
    onnx.save(model, path)


def qdq_tiny():
    w1 = rng.integers(-127, 128, size=(16, 8)).astype(np.int8)
    w2 = rng.integers(-127, 128, size=(8, 4)).astype(np.int8)
    inits = [init("x_s", 0.03, np.float32), init("x_z", 128, np.uint8),
             init("w1", w1), init("w1_s", 0.004, np.float32), init("w1_z", 0, np.int8),
             init("b1", rng.integers(-500, 500, 8), np.int32), init("b1_s", np.float32(0.03) * np.float32(0.004)),
             init("b1_z", 0, np.int32), init("h_s", 0.02, np.float32), init("h_z", 0, np.uint8),
             init("w2", w2), init("w2_s", 0.005, np.float32), init("w2_z", 0, np.int8),
             init("y_s", 0.05, np.float32), init("y_z", 128, np.uint8)]
    dq = lambda x, s, z, y: helper.make_node("DequantizeLinear", [x, s, z], [y])  # noqa: E731
    q = lambda x, s, z, y: helper.make_node("QuantizeLinear", [x, s, z], [y])  # noqa: E731
    nodes = [q("x", "x_s", "x_z", "xq"), dq("xq", "x_s", "x_z", "xd"), dq("w1", "w1_s", "w1_z", "w1d"),
             dq("b1", "b1_s", "b1_z", "b1d"), helper.make_node("Gemm", ["xd", "w1d", "b1d"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), q("r", "h_s", "h_z", "hq"), dq("hq", "h_s", "h_z", "hd"),
             dq("w2", "w2_s", "w2_z", "w2d"), helper.make_node("MatMul", ["hd", "w2d"], ["m"]),
             q("m", "y_s", "y_z", "yq"), dq("yq", "y_s", "y_z", "y")]
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits, HERE / "qdq_tiny.onnx", [("", 21)])


def qonnx_tiny():
    domain = "qonnx.custom_op.general"
    inits = [init("s_in", 2.0**-4, np.float32), init("zero", 0, np.float32), init("b8", 8, np.float32),
             init("w1", rng.standard_normal((16, 8)), np.float32), init("s_w1", 2.0**-2, np.float32),
             init("b4", 4, np.float32), init("s_h", 2.0**-3, np.float32),
             init("w2", rng.standard_normal((8, 4)), np.float32), init("s_w2", 2.0**-1, np.float32),
             init("b2", 2, np.float32), init("s_out", 2.0**-2, np.float32)]
    quant = lambda name, ins, **a: helper.make_node("Quant", ins, [name], domain=domain, **a)  # noqa: E731
    nodes = [quant("xq", ["x", "s_in", "zero", "b8"], signed=1, narrow=0, rounding_mode="ROUND"),
             quant("w1q", ["w1", "s_w1", "zero", "b4"], signed=1, narrow=1, rounding_mode="ROUND"),
             helper.make_node("MatMul", ["xq", "w1q"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             quant("hq", ["r", "s_h", "zero", "b4"], signed=0, narrow=0, rounding_mode="FLOOR"),
             quant("w2q", ["w2", "s_w2", "zero", "b2"], signed=1, narrow=1, rounding_mode="ROUND"),
             helper.make_node("MatMul", ["hq", "w2q"], ["m"]),
             quant("y", ["m", "s_out", "zero", "b8"], signed=1, narrow=0, rounding_mode="ROUND")]
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits, HERE / "qonnx_tiny.onnx",
         [("", 13), (domain, 1)])


def deeploy_tiny():
    inits = [init("w", rng.integers(-20, 21, size=(16, 8)), np.float32), init("m1", 3, np.float32),
             init("a1", 64, np.float32), init("m2", rng.integers(1, 8, size=8), np.float32), init("a2", 0, np.float32)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["acc"]),
             helper.make_node("RequantShift", ["acc", "m1", "a1"], ["h"], div=256, n_levels_out=256, signed=1),
             helper.make_node("iGELU", ["h"], ["g"], b=-22, one=2430),
             helper.make_node("RequantShift", ["g", "m2", "a2"], ["y"], div=2**16, n_levels_out=256, signed=1)]
    save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits, HERE / "deeploy_tiny.onnx", [("", 13)])


def qdq_tiny_inputs():
    """Three float samples for qdq_tiny (`refsim compare` against onnxruntime, README)."""
    samples = np.random.default_rng(7).normal(0, 1.5, (3, 1, 16)).astype(np.float32)
    np.save(HERE / "qdq_tiny_inputs.npy", samples)


if __name__ == "__main__":
    qdq_tiny()
    qonnx_tiny()
    deeploy_tiny()
    qdq_tiny_inputs()
