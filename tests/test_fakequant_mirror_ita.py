"""The ITA modes' fake-quant mirrors (exporters/mirror/ita.py): each builder's one-node DOUBLE
graph, run in onnxruntime, equals the refsim op (its NumPy spec) exactly, on hypothesis
inputs including each type's extremes, masks with fully masked rows, and the ops' parameter
ranges; at the opsets before and after ReduceMax took its axes as an input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nonlinear_helpers import run
from onnx import TensorProto
from refsim import ops
from refsim.errors import OpError
from refsim.exporters.frontend.graph import Graph
from refsim.exporters.mirror import builder

ort = pytest.importorskip("onnxruntime")
OPSETS = (17, 20)
EXAMPLES = settings(max_examples=60, deadline=None)


def mirror(op_type: str, arrays: list[np.ndarray | None], attrs: dict, consts: dict | None = None, opset: int = 20):
    """Run op_type's mirror on `arrays` (graph inputs, None: absent) in onnxruntime."""
    fg = Graph("mirror", {"": opset})
    names = []
    feeds = {}
    for i, a in enumerate(arrays):
        if a is None:
            names.append("")
            continue
        name = f"in{i}"
        fg.inputs.append(name)
        fg.input_types[name] = (TensorProto.DOUBLE, tuple(a.shape))
        feeds[name] = np.asarray(a, np.float64)
        names.append(name)
    out = builder(op_type)(fg, names, attrs, consts or {})
    fg.outputs = [out]
    fg.output_types[out] = TensorProto.DOUBLE
    fg.toposort()
    session = ort.InferenceSession(fg.to_model().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def spec(op, *args, **attrs):
    """The refsim op on its NumPy backend, or the OpError it raises."""
    try:
        return run(op, *args, backend_name="numpy", **attrs)
    except OpError as e:
        return e


def assert_exact(got: np.ndarray, expected: np.ndarray):
    assert got.shape == expected.shape
    assert np.all(got == np.round(got)), "the mirror's output is not integer"
    np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64))


@st.composite
def scores(draw, dtype=np.int8, max_cols=70):
    """(rows, cols) scores with the type's extremes likely, and a keep mask (same shape, a
    broadcast key mask, or None) that may mask whole rows."""
    info = np.iinfo(dtype)
    r, c = draw(st.integers(1, 5)), draw(st.integers(1, max_cols))
    values = st.one_of(st.sampled_from([int(info.min), int(info.max), 0, -1]), st.integers(int(info.min), int(info.max)))
    x = draw(hnp.arrays(dtype, (r, c), elements=values))
    kind = draw(st.sampled_from(["none", "full", "keys", "rows_masked"]))
    if kind == "none":
        return x, None
    if kind == "keys":
        return x, draw(hnp.arrays(np.uint8, (1, c), elements=st.integers(0, 1)))
    keep = draw(hnp.arrays(np.uint8, (r, c), elements=st.integers(0, 1)))
    if kind == "rows_masked":
        keep[0] = 0
    return x, keep


@pytest.mark.parametrize("opset", OPSETS)
@EXAMPLES
@given(data=scores(), k=st.integers(0, 6), numerator=st.one_of(st.none(), st.integers(1, 1 << 40)),
       offset=st.sampled_from([0, -128]))
def test_ita_max_mirror(opset, data, k, numerator, offset):
    x, keep = data
    attrs = dict(k=k, numerator=numerator, output_offset=offset)
    expected = spec(ops.ITAMax, x, keep, **attrs)
    if isinstance(expected, OpError):  # an output outside its type: the op refuses, nothing to mirror
        return
    assert_exact(mirror("ITAMax", [x, keep], attrs, opset=opset), expected)


@pytest.mark.parametrize("opset", OPSETS)
@EXAMPLES
@given(data=scores(), group_width=st.integers(1, 20), k=st.integers(0, 6),
       numerator=st.one_of(st.none(), st.integers(1, 1 << 40)),
       max_init=st.one_of(st.sampled_from([-128, -127]), st.integers(-200, 127)), offset=st.sampled_from([0, -128]),
       acc_bits=st.integers(9, 32), overflow=st.sampled_from(["error", "wrap", "saturate"]))
def test_ita_partial_max_mirror(opset, data, group_width, k, numerator, max_init, offset, acc_bits, overflow):
    x, keep = data
    attrs = dict(group_width=group_width, k=k, numerator=numerator, max_init=max_init, output_offset=offset,
                 acc_bits=acc_bits, overflow=overflow)
    expected = spec(ops.ITAPartialMax, x, keep, **attrs)
    if isinstance(expected, OpError):  # overflow (policy error), a wrapped zero sum or an output out of range
        return
    assert_exact(mirror("ITAPartialMax", [x, keep], attrs, opset=opset), expected)


def test_ita_partial_max_mirror_streams_groups():
    """A row whose maximum arrives late: the early groups' sum is shifted down (floored) when
    it does, which the whole-row ITAMax never does; the mirror follows the stream."""
    x = np.array([[0, -8, -8, -8, 1, -100, -100, -100]], np.int8)  # stream: (259 >> 1) + 256, whole row: 128 + 256
    attrs = dict(group_width=4, k=0, numerator=255 * 256, max_init=-128)
    expected = spec(ops.ITAPartialMax, x, None, **attrs)
    assert not np.array_equal(expected, spec(ops.ITAMax, x, None, k=0, numerator=255 * 256))
    assert_exact(mirror("ITAPartialMax", [x, None], attrs), expected)


@pytest.mark.parametrize("opset", OPSETS)
@EXAMPLES
@given(x=hnp.arrays(np.int8, st.tuples(st.integers(1, 3), st.integers(1, 40)),
                    elements=st.one_of(st.sampled_from([-128, -127, 127, 0]), st.integers(-128, 127))),
       q_b=st.integers(-(1 << 15), 0), q_c=st.integers(-(1 << 15), (1 << 15) - 1), q_1=st.integers(-(1 << 15), (1 << 15) - 1),
       requant=st.booleans(), eps_mul=st.integers(-(1 << 15), (1 << 15) - 1),
       eps_shift=st.one_of(st.integers(0, 40), st.integers(41, 62)), eps_add=st.integers(-128, 127))
def test_ita_gelu_mirror(opset, x, q_b, q_c, q_1, requant, eps_mul, eps_shift, eps_add):
    attrs = dict(q_1=q_1, q_b=q_b, q_c=q_c)
    if requant:
        attrs.update(eps_mul=eps_mul, eps_shift=eps_shift, eps_add=eps_add)
    expected = spec(ops.ITAGelu, x, **attrs)
    if isinstance(expected, OpError):  # a raw result beyond int32
        return
    assert_exact(mirror("ITAGelu", [x], attrs, opset=opset), expected)


def test_ita_gelu_mirror_pyita_constants():
    """The constants the exporter derives (nonlinear.pyita_gelu_params) on every int8 input."""
    from refsim.exporters import nonlinear

    x = np.arange(-128, 128, dtype=np.int8).reshape(1, -1)
    for scale in (0.0197, 0.05, 0.1, 0.4):
        attrs = nonlinear.pyita_gelu_params(scale, scale * 0.7).attrs
        assert_exact(mirror("ITAGelu", [x], attrs), spec(ops.ITAGelu, x, **attrs))


@st.composite
def layernorm_case(draw):
    dtype = draw(st.sampled_from([np.int8, np.int16]))
    info = np.iinfo(dtype)
    r, n = draw(st.integers(1, 4)), draw(st.integers(1, 48))
    values = st.one_of(st.sampled_from([int(info.min), int(info.max), 0]), st.integers(int(info.min), int(info.max)))
    x = draw(hnp.arrays(dtype, (r, n), elements=values))
    if draw(st.booleans()):
        x[0] = x[0, 0]  # a constant row: variance 0, std isqrt(1) = 1
    wide = st.integers(-(1 << 31), (1 << 31) - 1)
    w = draw(hnp.arrays(np.int32, (n,), elements=st.one_of(wide, st.integers(-(1 << 12), 1 << 12))))
    b = draw(hnp.arrays(np.int32, (n,), elements=st.one_of(wide, st.integers(-(1 << 12), 1 << 12))))
    D = 1 << draw(st.integers(0, 40))
    n_levels = draw(st.sampled_from([256, 1 << 16, 100]))
    overflow = draw(st.sampled_from(["saturate", "wrap"] if n_levels != 100 else ["saturate"]))
    return x, w, b, dict(D=D, n_levels=n_levels, overflow=overflow)


@pytest.mark.parametrize("opset", OPSETS)
@EXAMPLES
@given(case=layernorm_case(), as_consts=st.booleans())
def test_i_layernorm_mirror(opset, case, as_consts):
    x, w, b, attrs = case
    expected = spec(ops.iLayerNorm, x, w, b, **attrs)
    assert not isinstance(expected, OpError), expected
    if as_consts:  # as the exporter stores them: constant inputs
        got = mirror("iLayerNorm", [x], attrs, consts={1: w, 2: b}, opset=opset)
    else:
        got = mirror("iLayerNorm", [x, w, b], attrs, opset=opset)
    assert_exact(got, expected)


def test_i_layernorm_mirror_exporter_constants():
    """A 16-bit row with the weights nonlinear.ilayernorm_params derives (D up to 2^24)."""
    from refsim.exporters import nonlinear

    rng = np.random.default_rng(0)
    x = rng.integers(-(1 << 15), 1 << 15, (6, 64)).astype(np.int16)
    p = nonlinear.ilayernorm_params(0.01, rng.normal(1, 0.2, 64), rng.normal(0, 0.1, 64), 1 / 2000, n_levels=1 << 16)
    w, b = p.consts["weight"], p.consts["bias"]
    assert_exact(mirror("iLayerNorm", [x], p.attrs, consts={1: w, 2: b}), spec(ops.iLayerNorm, x, w, b, **p.attrs))
