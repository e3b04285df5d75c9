"""The fake-quant mirrors of the I-BERT-mode ops and tables (exporters/mirror/ibert.py): the
one-node mirror graph, run in onnxruntime on float64, equals the refsim op's spec exactly."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from refsim import ops
from refsim.errors import OpError
from refsim.exporters import nonlinear
from refsim.exporters.frontend.graph import Graph
from refsim.exporters.mirror import builder

ort = pytest.importorskip("onnxruntime")


def run_mirror(op: str, arrays: list[np.ndarray], attrs: dict, consts: dict | None = None, opset: int = 17) -> np.ndarray:
    """The mirror of `op` as a graph of its own, on `arrays` (DOUBLE inputs), in onnxruntime."""
    g = Graph("mirror", {"": opset})
    names = []
    for i, a in enumerate(arrays):
        name = f"in{i}"
        g.inputs.append(name)
        g.input_types[name] = (11, tuple(a.shape))
        names.append(name)
    out = builder(op)(g, names, attrs, consts or {})
    g.outputs = [out]
    g.output_types[out] = 11
    g.toposort()
    session = ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: np.asarray(a, np.float64) for n, a in zip(names, arrays)})[0]


def assert_same(mirror: np.ndarray, spec: np.ndarray) -> None:
    assert np.all(mirror == np.floor(mirror)), "the mirror's output is not integer"
    bad = np.argwhere(mirror.astype(np.int64) != np.asarray(spec, np.int64))
    assert bad.size == 0, f"{len(bad)} differ, first at {bad[0]}: mirror {mirror[tuple(bad[0])]} spec {spec[tuple(bad[0])]}"


# Scales of the int16 scores: from the exporter's floor (IBERT_SOFTMAX_MIN_SCALE) to coarse ones.
softmax_scales = st.floats(4.4e-5, 0.5)


@st.composite
def scores(draw, dtype=np.int16):
    r, c = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    info = np.iinfo(dtype)
    extremes = st.sampled_from([int(info.min), int(info.max), 0, -1, 1])
    x = draw(hnp.arrays(dtype, (r, c), elements=st.one_of(st.integers(int(info.min), int(info.max)), extremes)))
    if draw(st.booleans()):
        return x, None
    keep = draw(hnp.arrays(np.uint8, (r, c), elements=st.integers(0, 1)))
    if draw(st.booleans()):
        keep[0] = 0  # a fully masked row
    return x, keep


@given(scores(), softmax_scales, st.sampled_from([15, 8]), st.sampled_from([17, 20]))
@settings(max_examples=80, deadline=None)
def test_ibert_softmax(data, scale, output_bit, opset):
    x, keep = data
    p = nonlinear.ibert_softmax_params(scale, output_bit=output_bit)
    try:
        spec = ops.IBertSoftmax(x, keep, **p.attrs)
    except OpError:
        return  # every exponential 0: the integer op refuses the row
    arrays = [x] if keep is None else [x, keep]
    assert_same(run_mirror("IBertSoftmax", arrays, p.attrs, opset=opset), spec)


@given(st.integers(-(2**15), 2**15 - 1), st.integers(0, 30), softmax_scales)
@settings(max_examples=80, deadline=None)
def test_ibert_softmax_exp_rounding(top, gap, scale):
    """Two-entry rows at every distance: each shift s the exponent takes, and its ties."""
    p = nonlinear.ibert_softmax_params(scale, output_bit=15)
    other = max(-(2**15), top - gap * (-p.attrs["x0_int"]) // 3)
    x = np.array([[top, other], [other, other]], np.int16)
    assert_same(run_mirror("IBertSoftmax", [x], p.attrs), ops.IBertSoftmax(x, None, **p.attrs))


@st.composite
def layernorm_case(draw):
    width = draw(st.sampled_from([1, 2, 7, 32, 96]))
    bits = draw(st.sampled_from([8, 16]))
    up = draw(st.integers(0, 8))
    lim = 1 << (bits - 1)
    rows = draw(st.integers(1, 3))
    elements = st.one_of(st.integers(-lim, lim - 1), st.sampled_from([-lim, lim - 1, 0]))
    x = draw(hnp.arrays(np.int64, (rows, width), elements=elements)) * (1 << up)
    if draw(st.booleans()):
        x[0] = x[0, 0]  # a constant row: std 0
    weight = draw(hnp.arrays(np.float64, (width,), elements=st.floats(0.05, 3.0))) * draw(st.sampled_from([1, -1]))
    bias = draw(hnp.arrays(np.float64, (width,), elements=st.floats(-2, 2)))
    scale = draw(st.floats(1e-4, 0.1)) / (1 << up)
    sumsq = None if draw(st.booleans()) else draw(st.floats(1.0, 1e12))
    return x.astype(np.int32), nonlinear.ibert_layernorm_params(scale, weight, bias, input_bits=bits + up, max_sumsq=sumsq)


@given(layernorm_case(), st.sampled_from([17, 20]))
@settings(max_examples=80, deadline=None)
def test_ibert_layernorm(case, opset):
    x, p = case
    try:
        spec = ops.IBertLayerNorm(x, p.consts["bias"], **p.attrs)
    except OpError:
        return  # the sum of squares reaches 2^32: the integer op refuses the row
    assert_same(run_mirror("IBertLayerNorm", [x], p.attrs, {1: p.consts["bias"]}, opset=opset), spec)


@given(st.integers(0, 30), st.integers(1, 96), st.data())
@settings(max_examples=60, deadline=None)
def test_ibert_layernorm_shifts(shift, width, data):
    """Every shift the op takes, on rows whose spread is just around 2^shift (small std,
    large factor: d * factor passes 2^53)."""
    span = 1 << min(shift + 1, 31)
    x = data.draw(hnp.arrays(np.int64, (2, width), elements=st.integers(-span, span - 1)))
    bias = data.draw(hnp.arrays(np.int64, (width,), elements=st.integers(-(2**40), 2**40)))
    try:
        spec = ops.IBertLayerNorm(x.astype(np.int64), bias, shift=shift)
    except OpError:
        return
    assert_same(run_mirror("IBertLayerNorm", [x], dict(shift=shift), {1: bias}), spec)


@given(st.floats(1e-4, 0.05), st.sampled_from(["none", "tanh"]))
@settings(max_examples=25, deadline=None)
def test_lut_interp16_every_input(scale, approximate):
    p = nonlinear.gelu_table_params(scale, scale * 0.7, approximate)
    x = np.arange(-(2**15), 2**15, dtype=np.int16)
    table = p.consts["table"]
    assert_same(run_mirror("LutInterp16", [x], {}, {1: table}), ops.LutInterp16(x, table))


@given(st.sampled_from([np.int8, np.int16]), st.data())
@settings(max_examples=20, deadline=None)
def test_lut_every_input(dtype, data):
    info = np.iinfo(dtype)
    size = int(info.max) - int(info.min) + 1
    table = data.draw(hnp.arrays(np.int64, (size,), elements=st.integers(-(2**15), 2**15 - 1)))
    x = np.arange(info.min, int(info.max) + 1).astype(dtype)
    assert_same(run_mirror("Lut", [x], {}, {1: table}), ops.Lut(x, table))


@given(st.floats(1e-4, 0.5))
@settings(max_examples=40, deadline=None)
def test_ibert_gelu_every_input(scale):
    p = nonlinear.ibert_gelu_params(scale)
    x = np.arange(-(2**15), 2**15, dtype=np.int16)
    assert_same(run_mirror("IBertGelu", [x], p.attrs), ops.IBertGelu(x, **p.attrs))


@st.composite
def raw_softmax_attrs(draw):
    """Any attributes the op takes: small multipliers with powers of two in them make the
    exp's round-shift hit exact ties at every shift, high and low, which the exporter's
    31-bit multipliers almost never do."""
    x0 = draw(st.integers(-300, -1))
    mul = draw(st.one_of(st.integers(0, 2**31 - 1), st.integers(0, 64).map(lambda k: k << draw(st.integers(0, 24)))))
    return dict(x0_int=x0, b_int=draw(st.integers(-400, 400)), c_int=draw(st.integers(-(10**5), 10**5)),
                n=draw(st.integers(0, 30)), exp_mul=min(mul, 2**31 - 1), exp_shift=draw(st.integers(0, 70)),
                exp_bit=draw(st.sampled_from([16, 24])), output_bit=draw(st.sampled_from([8, 15])))


@given(scores(np.int8), raw_softmax_attrs())
@settings(max_examples=150, deadline=None)
def test_ibert_softmax_any_attrs(data, attrs):
    x, keep = data
    try:
        spec = ops.IBertSoftmax(x, keep, **attrs)
    except OpError:
        return
    arrays = [x] if keep is None else [x, keep]
    assert_same(run_mirror("IBertSoftmax", arrays, attrs), spec)


_LIMB_SHIFTS = np.arange(-40, 71)


@functools.cache
def _limb_session():
    """One graph for every shift in _LIMB_SHIFTS: q indexes them."""
    from refsim.exporters.mirror.ibert import _round_shift_half_even

    g = Graph("limbs", {"": 17})
    for name in ("a2", "b2", "q"):
        g.inputs.append(name)
        g.input_types[name] = (11, ("n",))
    out = _round_shift_half_even(g, "a2", "b2", "q", _LIMB_SHIFTS, "t")
    g.outputs, g.output_types[out] = [out], 11
    g.toposort()
    return ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])


@given(st.lists(st.tuples(st.integers(0, 2**62), st.integers(-40, 70), st.booleans()), min_size=1, max_size=40))
@settings(max_examples=300, deadline=None)
def test_round_shift_in_two_limbs(cases):
    """The softmax exp's round-shift of V = a2 * 2^16 + b2 (past 2^53) by s, half to even,
    against the integer op's rounding, ties included (V made a tie where asked)."""
    from refsim.ops.rounding import HALF_EVEN, _np_round_shift

    values = []
    for v, s, tie in cases:
        if tie and s >= 1:
            v = (v >> s << s) | (1 << (s - 1))  # exactly half a step
        values.append(min(v, 2**62))
    v = np.array(values, np.int64)
    s = np.array([c[1] for c in cases], np.int64)
    q = (s - _LIMB_SHIFTS[0]).astype(np.float64)
    got = _limb_session().run(None, {"a2": (v >> 16).astype(np.float64), "b2": (v & 0xFFFF).astype(np.float64), "q": q})[0]
    right = _np_round_shift(v, np.maximum(s, 0), HALF_EVEN)
    expected = np.where(s >= 0, right, v.astype(np.float64) * 2.0 ** -s.astype(np.float64))
    # exact below 2^53 (the softmax clips its exp far below); above, within float rounding
    small = np.abs(expected) < 2**53
    assert np.array_equal(got[small], expected[small].astype(np.float64)), (got[small], expected[small])
    assert np.allclose(got[~small], expected[~small].astype(np.float64), rtol=2**-50)


@functools.cache
def _helper_session():
    from refsim.exporters.mirror import floor_div, isqrt

    g = Graph("helpers", {"": 17})
    for name in ("a", "b", "v"):
        g.inputs.append(name)
        g.input_types[name] = (11, ("n",))
    g.outputs = [floor_div(g, "a", "b", "div"), isqrt(g, "v", "sqrt")]
    g.output_types.update({o: 11 for o in g.outputs})
    g.toposort()
    return ort.InferenceSession(g.to_model().SerializeToString(), providers=["CPUExecutionProvider"])


@given(st.lists(st.tuples(st.integers(-(2**52), 2**52), st.integers(1, 2**52), st.integers(0, math.isqrt(2**53 - 1)),
                          st.sampled_from([-1, 0, 1]), st.booleans()), min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_floor_div_and_isqrt_are_exact(cases):
    """The shared helpers on the values where float rounding bites: quotients next to an
    integer (a = q * b + {-1, 0, 1}), perfect squares and their neighbours, below 2^53."""
    a, b, v = [], [], []
    for x, y, root, near, multiple in cases:
        a.append(max(-(2**52), min(2**52, (x // y) * y + near)) if multiple else x)
        b.append(y)
        v.append(min(max(root * root + near, 0), 2**53 - 1))
    got_div, got_sqrt = _helper_session().run(None, {"a": np.array(a, np.float64), "b": np.array(b, np.float64),
                                                     "v": np.array(v, np.float64)})
    assert [int(q) for q in got_div] == [x // y for x, y in zip(a, b)]
    assert [int(r) for r in got_sqrt] == [math.isqrt(x) for x in v]
