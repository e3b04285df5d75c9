"""The training ops (`refsim.exporters.qat.ops`) against refsim's own ops: the same integers,
exactly, on random and extreme inputs; the float64 view equal to them; gradients present.

refsim's ops are themselves tested against independent torch implementations of
docs/OPS.md (test_*_ops.py); here the trainer's copy is held to refsim's, op by op, with
the attributes the exporter derives (exporters.nonlinear) for random input scales.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from refsim import ops
from refsim.dtypes import TYPES
from refsim.exporters import nonlinear
from refsim.ir import Node

torch = pytest.importorskip("torch")
Q = pytest.importorskip("refsim.exporters.qat.ops")


def q_of(array, grad: bool = False):
    """A training tensor holding `array` (int), optionally requiring a gradient."""
    a = np.asarray(array)
    f = torch.as_tensor(a.astype(np.float64)).requires_grad_(grad)
    return Q.Q(torch.as_tensor(a.astype(np.int64)) if np.abs(a.astype(np.float64)).max(initial=0) >= 2**53 else None, f)


def run_op(op: str, inputs, types, **attrs):
    return run_with_inputs(op, inputs, types, **attrs)[0]


def run_with_inputs(op: str, inputs, types, **attrs):
    """(result, the training tensors fed in: the first one requires a gradient)."""
    node = Node(op, [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)], ["out"], attrs, "node")
    args = [None if x is None else q_of(x, grad=i == 0) for i, x in enumerate(inputs)]
    while args and args[-1] is None:
        args.pop()
    return Q.OPS[op](node, *args, types=[None if t is None else TYPES[t] for t in types]), args


def input_gradient(op: str, inputs, types, weights=None, **attrs) -> np.ndarray:
    """d(sum(weights * op(inputs)))/d(first input), through the surrogate."""
    result, args = run_with_inputs(op, inputs, types, **attrs)
    (result.f * (1.0 if weights is None else torch.as_tensor(weights))).sum().backward()
    return args[0].f.grad.numpy()


def assert_exact(result, expected):
    expected = np.asarray(expected).astype(np.int64)
    np.testing.assert_array_equal(result.e.numpy().reshape(expected.shape), expected)
    f = result.f.detach().numpy().reshape(expected.shape)
    np.testing.assert_array_equal(f, expected.astype(np.float64))  # the float view is the integer itself


def arrays(dtype: str, shape):
    t = TYPES[dtype]
    edges = sorted(v for v in {t.lo, t.lo + 1, -1, 0, 1, t.hi - 1, t.hi} if t.lo <= v <= t.hi)
    return hnp.arrays(t.storage, shape, elements=st.one_of(st.sampled_from(edges), st.integers(t.lo, t.hi)))


# --- Requant: every rounding, per tensor and per channel, shifts at and past 63 -----------------------


@settings(max_examples=120)
@given(data=st.data(), x_type=st.sampled_from(["int8", "int16", "int32", "int64"]),
       rounding=st.sampled_from(["floor", "half_up", "half_away", "half_even", "trunc"]),
       per_channel=st.booleans(), out=st.sampled_from(["int4", "int8", "int16", "int32"]))
def test_requant_matches_refsim(data, x_type, rounding, per_channel, out):
    x = data.draw(arrays(x_type, (3, 5)))
    if x_type == "int64":
        x = np.clip(x, -(1 << 40), 1 << 40)  # refsim refuses products past int64
    n = 5 if per_channel else 1
    mul = data.draw(hnp.arrays(np.int64, (n,), elements=st.integers(-(1 << 21), (1 << 21) - 1)))
    shift = data.draw(hnp.arrays(np.int64, (n,), elements=st.sampled_from([0, 1, 2, 7, 20, 31, 40, 62, 63, 64, 70, 93])))
    bias = data.draw(st.none() | hnp.arrays(np.int64, (n,), elements=st.integers(-(1 << 30), 1 << 30)))
    offset = data.draw(st.none() | hnp.arrays(np.int64, (n,), elements=st.integers(-5, 5)))
    attrs = dict(axis=-1, rounding=rounding, dtype=out)
    if data.draw(st.booleans()):
        t = TYPES[out]
        attrs.update(lo=t.lo + 1, hi=t.hi - 1)
    expected = ops.Requant(x, mul, shift, bias, offset, **attrs)
    result = run_op("Requant", [x, mul, shift, bias, offset], [x_type, "int64", "int64", "int64", "int64"], **attrs)
    assert_exact(result, expected)


def test_requant_near_ties_falls_back_to_exact_integers():
    # x * mul / 2^s lands exactly on .5 (and one off it) for large x, where float64 alone
    # cannot tell the two apart: the exact path decides.
    x = np.array([(1 << 52) + 1, (1 << 52) + 3, -(1 << 52) - 1, 3, -3, 5], np.int64)
    for rounding in ("half_even", "half_up", "half_away", "floor", "trunc"):
        expected = ops.Requant(x, np.array(1), np.array(1), rounding=rounding, dtype="int64")
        assert_exact(run_op("Requant", [x, np.array(1), np.array(1)], ["int64", "int32", "int8"], rounding=rounding, dtype="int64"), expected)


def test_requant_gradient_is_the_scale_inside_the_range():
    node = Node("Requant", ["x", "m", "s"], ["y"], dict(rounding="half_even", dtype="int8"), "rq")
    x = Q.Q(None, torch.tensor([10.0, 4000.0], dtype=torch.float64, requires_grad=True))
    y = Q.OPS["Requant"](node, x, q_of(np.array(3)), q_of(np.array(4)), types=[TYPES["int32"], None, None])
    y.f.sum().backward()
    assert x.f.grad.tolist() == [3 / 16, 0.0]  # 4000 * 3/16 is clipped to 127: no gradient


# --- matrix products, elementwise, movement ----------------------------------------------------------


@settings(max_examples=40)
@given(data=st.data(), acc_bits=st.sampled_from([26, 32, 64]))
def test_matmul_matches_refsim(data, acc_bits):
    a = data.draw(arrays("int8", (2, 3, 7)))
    b = data.draw(arrays("int8", (7, 4)))
    bias = data.draw(st.none() | hnp.arrays(np.int32, (4,), elements=st.integers(-(1 << 20), 1 << 20)))
    overflow = "saturate" if acc_bits == 26 else "error"
    expected = ops.MatMul(a, b, None, None, bias, acc_bits=acc_bits, overflow=overflow)
    assert_exact(run_op("MatMul", [a, b, None, None, bias], ["int8", "int8", None, None, "int32"], acc_bits=acc_bits,
                        overflow=overflow), expected)


def test_matmul_saturates_as_ita():
    a = np.full((1, 64), 127, np.int8)
    b = np.full((64, 1), 127, np.int8)
    bias = np.array([1 << 24], np.int32)
    expected = ops.MatMul(a, b, None, None, bias, acc_bits=20, overflow="saturate")
    assert int(expected[0, 0]) == (1 << 19) - 1
    assert_exact(run_op("MatMul", [a, b, None, None, bias], ["int8", "int8", None, None, "int32"], acc_bits=20,
                        overflow="saturate"), expected)


@given(data=st.data(), kind=st.sampled_from(["Add", "Sub", "Mul"]))
def test_arithmetic_matches_refsim(data, kind):
    a = data.draw(arrays("int32", (2, 3)))
    b = data.draw(arrays("int32", (3,)))
    expected = getattr(ops, kind)(a, b, dtype="int64")
    assert_exact(run_op(kind, [a, b], ["int32", "int32"], dtype="int64"), expected)


def test_wide_products_keep_exact_integers():
    # The exactly rescaled additions multiply 16-bit values by ~2^44: past float64's 2^53.
    a = np.array([[32767, -32768, 12345]], np.int16)
    m = np.array([(1 << 44) + 1], np.int64)
    expected = ops.Mul(a, m, dtype="int64")
    result = run_op("Mul", [a, m], ["int16", "int64"], dtype="int64")
    np.testing.assert_array_equal(result.e.numpy(), expected)
    summed = Q.OPS["Requant"](Node("Requant", ["p", "m", "s"], ["y"], dict(rounding="half_even", dtype="int16"), "r"),
                              result, q_of(np.array(1)), q_of(np.array(44)), types=[TYPES["int64"], None, None])
    np.testing.assert_array_equal(summed.e.numpy(), ops.Requant(expected, np.array(1), np.array(44), rounding="half_even", dtype="int16"))


@given(data=st.data())
def test_movement_and_reductions_match_refsim(data):
    x = data.draw(arrays("int16", (2, 4, 6)))
    cases = [
        ("Reshape", [x], ["int16"], dict(shape=[0, 4, 2, 3])),
        ("Transpose", [x], ["int16"], dict(perm=[0, 2, 1])),
        ("Slice", [x], ["int16"], dict(starts=[1, -4], ends=[3, 1 << 62], axes=[1, 2], steps=[1, 2])),
        ("Slice", [x], ["int16"], dict(starts=[-1], ends=[-(1 << 62)], axes=[2], steps=[-2])),
        ("Concat", [x, x[:, :1]], ["int16", "int16"], dict(axis=1)),
        ("Gather", [x, np.array([[0, -1], [1, 1]], np.int32)], ["int16", "int32"], dict(axis=1)),
        ("ReduceSum", [x], ["int16"], dict(axes=[1], keepdims=False)),
        ("ReduceMean", [x], ["int16"], dict(axes=[2], keepdims=True, rounding="half_even")),
        ("Relu", [x], ["int16"], {}),
        ("Cast", [x], ["int16"], dict(dtype="int32")),
    ]
    for op, inputs, types, attrs in cases:
        assert_exact(run_op(op, inputs, types, **attrs), getattr(ops, op)(*inputs, **attrs))


def test_lut_matches_refsim_and_has_a_slope():
    x = np.arange(-128, 128, dtype=np.int8).reshape(16, 16)
    table = np.rint(np.tanh(np.arange(-128, 128) / 32) * 100).astype(np.int16)
    assert_exact(run_op("Lut", [x, table], ["int8", "int16"]), ops.Lut(x, table))
    grad = input_gradient("Lut", [x, table], ["int8", "int16"]).reshape(-1)
    assert grad[128] == pytest.approx((table[129] - table[127]) / 2)  # tanh is steepest at 0
    assert grad[128] > grad[100] > 0 and grad[5] == 0  # flat where the rounded table is flat


@settings(max_examples=30)
@given(scale=st.floats(1e-4, 1e-3), out_ratio=st.floats(0.05, 2.0), approximate=st.sampled_from(["none", "tanh"]))
def test_lut_interp16_matches_refsim_and_has_the_segment_slope(scale, out_ratio, approximate):
    p = nonlinear.gelu_table_params(scale, scale * out_ratio, approximate)
    table = p.consts["table"]
    x = np.concatenate([np.arange(-32768, 32768, 97), [-32768, -32767, -1, 0, 1, 32639, 32640, 32766, 32767]]).astype(np.int16)
    assert_exact(run_op("LutInterp16", [x, table], ["int16", "int16"]), ops.LutInterp16(x, table))
    grad = input_gradient("LutInterp16", [x, table], ["int16", "int16"])
    segment = (x.astype(np.int64) + 32768) >> 7
    np.testing.assert_allclose(grad, (table[segment + 1].astype(np.int64) - table[segment]) / 128, rtol=1e-12, atol=0)


# --- the nonlinear ops with the exporter's attributes ------------------------------------------


@settings(max_examples=40)
@given(data=st.data(), scale=st.floats(0.001, 0.2), masked=st.booleans())
def test_ibert_softmax_matches_refsim(data, scale, masked):
    p = nonlinear.ibert_softmax_params(scale)
    x = data.draw(arrays("int16", (3, 9)))
    mask = data.draw(hnp.arrays(np.uint8, (1, 9), elements=st.integers(0, 1))) if masked else None
    try:
        expected = ops.IBertSoftmax(x, mask, **p.attrs)
    except Exception:
        return  # a row whose every exponential is 0: refsim refuses, and so does training
    result = run_op("IBertSoftmax", [x, mask], ["int16", "uint8"], **p.attrs)
    assert_exact(result, expected)


@settings(max_examples=40)
@given(data=st.data(), streaming=st.booleans(), preset=st.sampled_from(["ita_rtl", "deeploy", "quantlib"]), masked=st.booleans())
def test_ita_softmax_matches_refsim(data, streaming, preset, masked):
    p = nonlinear.ita_softmax_params(streaming=streaming, preset=preset)
    x = data.draw(arrays("int8", (2, 37)))
    mask = data.draw(hnp.arrays(np.uint8, (2, 37), elements=st.integers(0, 1))) if masked else None
    expected = getattr(ops, p.op)(x, mask, **p.attrs)
    assert_exact(run_op(p.op, [x, mask], ["int8", "uint8"], **p.attrs), expected)


@settings(max_examples=40)
@given(data=st.data(), scale=st.floats(1e-4, 0.05))
def test_ibert_gelu_matches_refsim(data, scale):
    p = nonlinear.ibert_gelu_params(scale)
    x = data.draw(arrays("int16", (4, 8)))
    assert_exact(run_op("IBertGelu", [x], ["int16"], **p.attrs), ops.IBertGelu(x, **p.attrs))


@settings(max_examples=40)
@given(data=st.data(), scale=st.floats(0.015, 0.2), requantize=st.booleans())
def test_ita_gelu_matches_refsim(data, scale, requantize):
    p = nonlinear.pyita_gelu_params(scale, 0.05 if requantize else None, requantize=requantize)
    x = data.draw(arrays("int8", (4, 8)))
    assert_exact(run_op("ITAGelu", [x], ["int8"], **p.attrs), ops.ITAGelu(x, **p.attrs))


@settings(max_examples=40)
@given(data=st.data(), bits=st.sampled_from([8, 16]))
def test_layernorms_and_nonorm_match_refsim(data, bits):
    x = data.draw(arrays(f"int{bits}", (3, 12)))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    weight, bias = rng.uniform(0.5, 2, 12), rng.uniform(-1, 1, 12)
    p = nonlinear.ibert_layernorm_params(0.01, weight, bias, input_bits=bits)
    assert_exact(run_op("IBertLayerNorm", [x, p.consts["bias"]], [f"int{bits}", "int64"], **p.attrs),
                 ops.IBertLayerNorm(x, p.consts["bias"], **p.attrs))
    p = nonlinear.ilayernorm_params(0.01, weight, bias, 0.02, n_levels=1 << bits)
    w, b = p.consts["weight"], p.consts["bias"]
    assert_exact(run_op("iLayerNorm", [x, w, b], [f"int{bits}", "int32", "int32"], **p.attrs),
                 ops.iLayerNorm(x, w, b, **p.attrs))
    gamma, beta = rng.integers(-300, 300, 12), rng.integers(-1000, 1000, 12)
    assert_exact(run_op("NoNorm", [x, gamma, beta], [f"int{bits}", "int32", "int32"], dtype="int64"),
                 ops.NoNorm(x, gamma, beta, dtype="int64"))


def test_ibert_layernorm_divides_two_to_the_31_when_std_is_a_power_of_two():
    # I-BERT's floor(2^31 / std), not (2^31 - 1) // std: they differ when std is a power of
    # two. Row 1: mean 0, d = +-2, sum of squares 64, std 8: -2 * factor >> 1 is -268435456,
    # not -268435455.
    x = np.zeros((2, 16), np.int8)
    x[0, 0], x[1, :] = 64, [2, -2] * 8
    bias = np.zeros(16, np.int64)
    assert_exact(run_op("IBertLayerNorm", [x, bias], ["int8", "int64"]), ops.IBertLayerNorm(x, bias))


def test_surrogate_gradients_follow_the_real_functions():
    x = np.arange(-300, 300, 5, dtype=np.int16).reshape(4, 30)
    # GELU's slope: ~0 far left, the full ratio far right (at a 16-bit input scale, -6..6 real)
    wide = np.arange(-6000, 6000, 100, dtype=np.int16).reshape(4, 30)
    gelu = input_gradient("IBertGelu", [wide], ["int16"], **nonlinear.ibert_gelu_params(0.001).attrs).reshape(-1)
    assert abs(gelu[0]) < 0.01 * abs(gelu[-1]) and gelu[-1] != 0
    # softmax outputs sum to a constant: the gradient of their sum vanishes
    soft = input_gradient("IBertSoftmax", [x], ["int16"], **nonlinear.ibert_softmax_params(0.05).attrs)
    assert np.abs(soft).max() < 1e-6
    x8 = np.array([[0, 5, 10]], np.int8)
    node = Node("ITAMax", ["x"], ["y"], nonlinear.ita_softmax_params(preset="ita_rtl").attrs, "sm")
    inp = Q.Q(None, torch.tensor(x8.astype(np.float64), requires_grad=True))
    Q.OPS["ITAMax"](node, inp, types=[TYPES["int8"]]).f[0, 2].backward()
    assert inp.f.grad[0, 2] > 0 > inp.f.grad[0, 1]  # raising a score raises its probability, lowers the others'
    rng = np.random.default_rng(0)
    rows = rng.integers(-3000, 3000, (4, 30)).astype(np.int16)
    ln = input_gradient("IBertLayerNorm", [rows], ["int16"], weights=rng.standard_normal(30), shift=0)
    assert np.abs(ln).max() > 0
    assert np.abs(ln.sum(axis=-1)).max() < 1e-6 * np.abs(ln).max()  # shifting a row does not change its normalised values
