"""Fused kernels against the ops they stand for: each fused step must give, under Numba,
what the unfused ops give under NumPy (their readable formulas), refuse what they refuse,
and hand a traced run every intermediate exactly."""

import numpy as np
from core_strategies import ROUNDINGS, lut_interp16_case
from hypothesis import given
from hypothesis import strategies as st
from refsim import GraphBuilder, Model, RefsimError, backend
from refsim.kernels.requant import NARROW, requant_plan, requant_rows
from refsim.ops.rounding import mode_code, requantize
from test_kernels import requant_params


def _lut_requant_model(table, cols, params, rounding, dtype, table_const=True, fuse=True):
    mul, bias, shift, offset = params
    b = GraphBuilder("lut_requant")
    x = b.input("x", "int16", ["batch", cols])
    t = b.const(table, "int16", name="table") if table_const else b.input("table", "int16", [513])
    g = b.node("LutInterp16", [x, t], outputs="g")
    consts = [b.const(p, ty, name=n) for p, ty, n in ((mul, "int64", "mul"), (shift, "int32", "shift"),
                                                      (bias, "int64", "bias"), (offset, "int32", "offset"))]
    b.output(b.node("Requant", [g, *consts], outputs="q", rounding=rounding, dtype=dtype))
    model = b.model()
    return model if fuse else Model(model.graph, fuse=False)


def _outcome(run):
    try:
        return run()
    except RefsimError as e:
        return e


@given(case=lut_interp16_case(), rows=st.integers(1, 9), data=st.data())
def test_fused_lut_interp16_and_requant_match_the_ops(case, rows, data):
    """The GELU table lookup and its Requant as one pass: the result, the looked-up values
    a trace sees, and every refusal (a table with slopes beyond int16) are the ops' own."""
    x, table = case.inputs
    cols = max(x.size, 1)
    x = np.resize(x.reshape(-1), rows * cols).reshape(rows, cols) if x.size else np.zeros((rows, cols), np.int16)
    x.reshape(-1)[:2] = [-32768, 32767][: x.size]
    params, rounding, (_, _, storage) = data.draw(requant_params(cols))
    dtype = np.dtype(storage).name
    feeds = {"x": x}
    with backend.use("numpy"):
        plain = _lut_requant_model(table, cols, params, rounding, dtype, fuse=False)
        expected = _outcome(lambda: plain.run(feeds, outputs=["g", "q"]))
    fused = _lut_requant_model(table, cols, params, rounding, dtype)
    seen = {}
    got = _outcome(lambda: fused.run(feeds))
    traced = _outcome(lambda: fused.run(feeds, trace=lambda node, name, a: seen.__setitem__(name, a.copy())))
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError) and isinstance(traced, RefsimError)
        return
    assert [s.node.op for s in fused._steps] == ["Requant"]  # one step
    assert got["q"].dtype == expected["q"].dtype and np.array_equal(got["q"], expected["q"])
    assert list(seen) == ["g", "q"]
    assert all(seen[n].dtype == expected[n].dtype and np.array_equal(seen[n], expected[n]) for n in seen)


def test_lut_interp16_with_a_computed_table_runs_the_op():
    table = np.arange(-256, 257, dtype=np.int16)
    params = [np.array([1]), np.array([0]), np.array([0]), np.array([0])]
    model = _lut_requant_model(table, 4, params, "half_even", "int16", table_const=False)
    x = np.array([[-32768, -1, 0, 32767]], np.int16)
    with backend.use("numpy"):
        expected = model.run({"x": x, "table": table})["q"]
    assert np.array_equal(model.run({"x": x, "table": table})["q"], expected)


def _layernorm_requant_model(x_type, cols, bias, shift, params, rounding, dtype, fuse=True):
    """IBertLayerNorm -> Requant, with the LayerNorm's output also read by a Mul (the
    residual branch of an encoder)."""
    mul, rq_bias, rq_shift, offset = params
    b = GraphBuilder("layernorm_requant")
    x = b.input("x", x_type, ["batch", cols])
    inputs = [x] if bias is None else [x, b.const(bias, "int64", name="bias")]
    n = b.node("IBertLayerNorm", inputs, outputs="n", shift=shift)
    consts = [b.const(p, ty, name=nm) for p, ty, nm in ((mul, "int64", "mul"), (rq_shift, "int32", "shift"),
                                                        (rq_bias, "int64", "rq_bias"), (offset, "int32", "offset"))]
    b.output(b.node("Requant", [n, *consts], outputs="q", rounding=rounding, dtype=dtype))
    b.output(b.node("Mul", [n, b.const(np.array(3), "int8", name="three")], outputs="r", dtype="int64", overflow="wrap"))
    model = b.model()
    return model if fuse else Model(model.graph, fuse=False)


LN_TYPES = {"int8": (-128, 127), "int16": (-(1 << 15), (1 << 15) - 1), "int32": (-(1 << 31), (1 << 31) - 1)}


@given(x_type=st.sampled_from(sorted(LN_TYPES)), rows=st.integers(1, 6), cols=st.integers(1, 70),
       shift=st.integers(0, 30), bias_kind=st.sampled_from(["none", "scalar", "row"]), narrow=st.booleans(),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fused_layernorm_and_requant_match_the_ops(x_type, rows, cols, shift, bias_kind, narrow, seed, data):
    """IBertLayerNorm and its Requant as one step that still hands its int64 output to
    the other reader: results, traced intermediates and refusals (a sum of squares past
    2^32, a Requant whose x*mul + bias leaves int64) are the ops' own."""
    rng = np.random.default_rng(seed)
    lo, hi = LN_TYPES[x_type]
    x = rng.integers(-300, 301, (rows, cols)) if narrow else rng.integers(lo, hi, (rows, cols), endpoint=True)
    x.reshape(-1)[:2] = [lo, hi][: x.size]
    x = np.clip(x, lo, hi).astype(x_type)
    bias = None if bias_kind == "none" else rng.integers(-(1 << 40), 1 << 40, 1 if bias_kind == "scalar" else cols)
    params, rounding, (_, _, storage) = data.draw(requant_params(cols))
    args = (x_type, cols, bias, shift, params, rounding, np.dtype(storage).name)
    with backend.use("numpy"):
        expected = _outcome(lambda: _layernorm_requant_model(*args, fuse=False).run({"x": x}, outputs=["n", "q", "r"]))
    fused = _layernorm_requant_model(*args)
    seen = {}
    got = _outcome(lambda: fused.run({"x": x}))
    traced = _outcome(lambda: fused.run({"x": x}, trace=lambda node, name, a: seen.__setitem__(name, a.copy())))
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError) and isinstance(traced, RefsimError)
        return
    assert [s.node.op for s in fused._steps] == ["Requant", "Mul"]  # the LayerNorm fused, its output shared
    assert all(got[n].dtype == expected[n].dtype and np.array_equal(got[n], expected[n]) for n in ("q", "r"))
    assert list(seen) == ["n", "q", "r"]
    assert all(seen[n].dtype == expected[n].dtype and np.array_equal(seen[n], expected[n]) for n in seen)


@given(rows=st.integers(1, 5), cols=st.integers(1, 40), per_channel=st.booleans(), rounding=st.sampled_from(ROUNDINGS),
       ties=st.booleans(), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_narrow_plans_requantize_as_the_formula(rows, cols, per_channel, rounding, ties, seed, data):
    """A plan whose multipliers fit int32 and whose shifts lie in [1, 62] takes the narrow
    path (a 32 x 32-bit product) for inputs within int32: exactly `requantize`, on the
    int32 extremes and on exact ties (x * mul + bias an odd multiple of 2^(shift - 1))."""
    rng = np.random.default_rng(seed)
    width = cols if per_channel else 1
    shift = data.draw(st.lists(st.sampled_from([1, 2, 30, 31, 62]) | st.integers(1, 62), min_size=width, max_size=width))
    shift = np.array(shift, np.int64)
    mul = rng.integers(-(1 << 31), 1 << 31, width, endpoint=False)
    mul[0] = data.draw(st.sampled_from([-(1 << 31), (1 << 31) - 1, int(mul[0])]))
    bias = rng.integers(-(1 << 61), 1 << 61, width)
    offset = rng.integers(-300, 301, width)
    x = rng.integers(-(1 << 31), 1 << 31, (rows, cols)).astype(np.int32)
    x.reshape(-1)[:2] = [-(1 << 31), (1 << 31) - 1][: x.size]
    if ties:  # mul 1 and a bias that puts x = 0 on a tie: multiples of 2^shift stay ties, odd and even
        mul[:] = 1
        shift = np.minimum(shift, 20)  # |x| up to 2^10 * 2^20: within int32
        bias = np.left_shift(np.int64(1), shift - 1) + rng.integers(-3, 4, width) * np.left_shift(np.int64(1), shift)
        x = rng.integers(-(1 << 10), 1 << 10, (rows, cols)).astype(np.int64)
        x = (x << np.broadcast_to(shift, (cols,)) if per_channel else x << int(shift[0]))
        x = x.astype(np.int32)
    lo, hi, storage = (-(1 << 15), (1 << 15) - 1, np.int16)
    plan = requant_plan(mul, bias, shift, offset, cols)
    assert plan[NARROW, 0] == 1
    out = np.empty(x.shape, storage)
    requant_rows(x, plan, lo, hi, mode_code(rounding), out)
    expected = requantize(x.astype(np.int64), mul, bias, shift, offset, lo, hi, rounding)
    assert np.array_equal(out, expected.astype(storage))
