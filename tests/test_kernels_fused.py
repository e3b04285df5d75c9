"""Fused kernels against the ops they stand for: each fused step must give, under Numba,
what the unfused ops give under NumPy (their readable formulas), refuse what they refuse,
and hand a traced run every intermediate exactly."""

import numpy as np
from core_strategies import lut_interp16_case
from hypothesis import given
from hypothesis import strategies as st
from refsim import GraphBuilder, Model, RefsimError, backend
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
