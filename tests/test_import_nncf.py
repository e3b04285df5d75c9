"""NNCF's patterns between quantizers, imported with `--requant ort --float-ops ort` and
compared with onnxruntime running the same graph (docs/IMPORT.md, "NNCF").

- LayerNormalization of the float sum of dequantized tensors and constants (NNCF's embedding
  sum and residual Add): the sum on one power-of-two grid (exact, or rounded once to 24 bits
  of its range), then LayerNormRound.
- SmoothQuant's per-channel Mul after a LayerNorm, folded into gamma and beta.
- transformers' `Where(IsNaN(softmax), 0, softmax)` guard.
Each differs from onnxruntime's float32 only where its result lies within float32 error of a
rounding tie (the LayerNorm residue), by one step; the bounds below are that residue's.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from refsim.exporters.importers import import_model, quantize_inputs

ort = pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _both(model, feeds):
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    imported = import_model(model, requant="ort", float_ops="ort")
    traced = {}
    got = imported.run(quantize_inputs(imported, feeds), trace=lambda node, name, a: traced.__setitem__(name, a))
    return imported, [got[o.name] for o in model.graph.output], want, traced


def _residual_layernorm(sa, sb, n=64, rows=512, smooth=True, seed=0, pos=True):
    """DQ(a) + DQ(b) + a constant -> LayerNormalization [-> Mul(per channel)] -> Q (int8), NNCF's form."""
    rng = np.random.default_rng(seed)
    inits = {"sa": np.float32(sa), "za": np.int8(3), "sb": np.float32(sb), "zb": np.int8(-1),
             "pos": (0.01 * rng.standard_normal((1, n))).astype(np.float32),
             "g": (1 + 0.3 * rng.standard_normal(n)).astype(np.float32), "be": (0.1 * rng.standard_normal(n)).astype(np.float32),
             "c": (0.5 + rng.random((1, n))).astype(np.float32), "sy": np.float32(0.0213), "zy": np.int8(-2)}
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["ad"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
             helper.make_node("Add", ["ad", "bd"], ["s0" if pos else "s"])]
    if pos:  # a constant added too (NNCF's position embeddings)
        nodes.append(helper.make_node("Add", ["s0", "pos"], ["s"]))
    nodes.append(helper.make_node("LayerNormalization", ["s", "g", "be"], ["ln"], axis=-1, epsilon=1e-12))
    if smooth:
        nodes.append(helper.make_node("Mul", ["ln", "c"], ["lnc"]))
    nodes.append(helper.make_node("QuantizeLinear", ["lnc" if smooth else "ln", "sy", "zy"], ["y"]))
    io = [helper.make_tensor_value_info(x, TensorProto.INT8, [rows, n]) for x in ("a", "b")]
    model = _model(nodes, io, [helper.make_tensor_value_info("y", TensorProto.INT8, [rows, n])], inits)
    feeds = {x: rng.integers(-128, 128, (rows, n)).astype(np.int8) for x in ("a", "b")}
    feeds["a"][0, :] = 127  # an extreme row
    return model, feeds, inits


@pytest.mark.parametrize("smooth, pos", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("sa, sb", [(0.0213, 0.00377), (0.5, 0.25), (1.7e-3, 3.1e-7)])
def test_layernorm_of_a_float_sum_matches_onnxruntime(sa, sb, smooth, pos, record_property):
    model, feeds, _ = _residual_layernorm(sa, sb, smooth=smooth, pos=pos)
    imported, (got,), (want,), _ = _both(model, feeds)
    assert "LayerNormRound" in {n.op for n in imported.graph.nodes}
    diff = np.abs(got.astype(int) - want.astype(int))
    record_property("exact", f"{int((diff == 0).sum())}/{diff.size}")
    assert diff.max() <= 1
    assert (diff != 0).mean() < 1e-3, f"{int((diff != 0).sum())} of {diff.size} differ"


def _finest_bit(x: float) -> int:
    """E with x an odd multiple of 2^-E."""
    f = Fraction(x)
    return (f.denominator.bit_length() - 1) - ((f.numerator & -f.numerator).bit_length() - 1)


@pytest.mark.parametrize("sa, sb, coarse_pos, rounded", [(0.5, 0.25, True, False), (0.0213, 0.00377, False, True)])
def test_the_float_sum_is_exact_on_its_grid(sa, sb, coarse_pos, rounded):
    """The LayerNorm's input, the integer tensor refsim computes, against the exact rational sum
    on the grid docs/IMPORT.md states (2^-E, E the finest bit of a scale or constant; coarsened
    to keep the sum's bound within 24 bits): equal when no coarsening is needed, else within half
    a step, and the rounding half to even."""
    model, feeds, inits = _residual_layernorm(sa, sb, smooth=False, rows=16)
    if coarse_pos:  # constants on a 2^-10 grid: the whole sum fits 24 bits exactly
        pos = np.round(inits["pos"] * 1024) / 1024
        model.graph.initializer[[t.name for t in model.graph.initializer].index("pos")].CopyFrom(
            numpy_helper.from_array(pos.astype(np.float32), "pos"))
        inits["pos"] = pos.astype(np.float32)
    imported, _, _, traced = _both(model, feeds)
    ln = next(n for n in imported.graph.nodes if n.op == "LayerNormRound")
    q = traced[ln.inputs[0]].astype(np.int64)
    finest = max(_finest_bit(float(v)) for v in [inits["sa"], inits["sb"], *inits["pos"].reshape(-1)] if v)
    bound = (int(Fraction(float(inits["sa"])) * 2**finest) * 131 + int(Fraction(float(inits["sb"])) * 2**finest) * 129
             + int(max(abs(Fraction(float(v))) for v in inits["pos"].reshape(-1)) * 2**finest))
    step = Fraction(2) ** (max(0, bound.bit_length() - 23) - finest)
    assert (step != Fraction(2) ** -finest) == rounded
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            exact = (Fraction(float(inits["sa"])) * (int(feeds["a"][r, c]) - 3) + Fraction(float(inits["sb"])) * (int(feeds["b"][r, c]) + 1)
                     + Fraction(float(inits["pos"][0, c])))
            units = exact / step
            nearest = round(units)  # Python rounds a Fraction half to even
            assert int(q[r, c]) == nearest, (r, c)


def test_nan_guarded_softmax_matches_onnxruntime():
    """Where(IsNaN(Softmax(DQ(x))), 0, Softmax(DQ(x))) -> Q: the guard never fires on refsim's
    softmax, which onnxruntime fuses into QLinearSoftmax: exact."""
    rng = np.random.default_rng(1)
    inits = {"sx": np.float32(0.173), "zx": np.uint8(120), "zero": np.float32(0), "sy": np.float32(1 / 256), "zy": np.uint8(0)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]),
             helper.make_node("Softmax", ["xd"], ["p"], axis=-1), helper.make_node("IsNaN", ["p"], ["nan"]),
             helper.make_node("Where", ["nan", "zero", "p"], ["pg"]), helper.make_node("QuantizeLinear", ["pg", "sy", "zy"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [64, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.UINT8, [64, 16])], inits)
    feeds = {"x": rng.integers(0, 256, (64, 16)).astype(np.uint8)}
    imported, (got,), (want,), _ = _both(model, feeds)
    assert "OrtSoftmax" in {n.op for n in imported.graph.nodes}
    np.testing.assert_array_equal(got, want)
