"""Fused kernels against the ops they stand for: each fused step must give, under Numba,
what the unfused ops give under NumPy (their readable formulas), refuse what they refuse,
and hand a traced run every intermediate exactly."""

import numpy as np
import pytest
from core_strategies import ROUNDINGS, lut_interp16_case, lut_interp16_table
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim import GraphBuilder, Model, RefsimError, backend
from refsim.errors import OpError
from refsim.kernels.layernorm import ibert_layernorm_requant_rows
from refsim.kernels.lut import LutInterp16Kernel, lut_interp16_requant_rows
from refsim.kernels.requant import NARROW, requant_plan, requant_rows
from refsim.ops.elementwise import LutInterp16
from refsim.ops.layernorm import IBertLayerNorm
from refsim.ops.rounding import INT64_MAX, mode_code, requantize
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


def _narrow_plan_params(rng, data, cols, bias_bits, x_bits):
    """Per-channel or per-tensor parameters of a narrow plan (multipliers within int32,
    shifts in [1, 62], |bias| and |offset| below 2^62), mostly, or a wide one. Half the
    time each shift brings |x * mul| (x below 2^x_bits) to about 2^7, so that the results
    are rounded rather than all clipped."""
    width = cols if data.draw(st.booleans()) else 1
    mul = rng.integers(-(1 << 31), 1 << 31, width)
    mul[0] = data.draw(st.sampled_from([-(1 << 31), (1 << 31) - 1, 1, int(mul[0])]))
    shift = np.array(data.draw(st.lists(st.sampled_from([1, 2, 30, 31, 47, 62]) | st.integers(1, 62),
                                        min_size=width, max_size=width)), np.int64)
    if data.draw(st.booleans()):
        bits = np.array([abs(int(m)).bit_length() for m in mul])
        shift = np.clip(bits + x_bits - 7 + rng.integers(-2, 3, width), 1, 62)
    if data.draw(st.integers(0, 3)) == 0:
        shift[-1] = data.draw(st.sampled_from([0, 63, 64, 70]))  # a wide plan: the general loop
    bias = rng.integers(-(1 << bias_bits), (1 << bias_bits) + 1, width)
    offset = rng.integers(-300, 301, width)
    return mul, bias, shift, offset


OUT_RANGES = [(-128, 127, np.int8), (-32768, 32767, np.int16), (0, 255, np.uint8), (-7, 100, np.int8)]


@given(table=lut_interp16_table(), rounding=st.sampled_from(ROUNDINGS), out_range=st.sampled_from(OUT_RANGES),
       seed=st.integers(0, 2**32 - 1), data=st.data())
@settings(max_examples=30, deadline=None)
def test_fused_lut_interp16_and_requant_on_every_int16_input(table, rounding, out_range, seed, data):
    """Both twins of the fused kernel on all 65536 int16 inputs (512 channels, above the
    parallel threshold), with and without the looked-up values kept: the full table and
    the rounding made a constant (half_even) or left a variable give the ops' results."""
    kernel = LutInterp16Kernel.prepare(table)
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int16).reshape(128, 512)
    if kernel is None:  # the op refuses the table
        with pytest.raises(OpError):
            LutInterp16(x, table)
        return
    rng = np.random.default_rng(seed)
    mul, bias, shift, offset = _narrow_plan_params(rng, data, 512, data.draw(st.sampled_from([0, 20, 40, 61])), 15)
    lo, hi, storage = out_range
    looked_up = LutInterp16(x, table)
    expected = requantize(looked_up.astype(np.int64), mul, bias, shift, offset, lo, hi, rounding).astype(storage)
    plan = requant_plan(mul, bias, shift, offset, 512)
    for twin in (lut_interp16_requant_rows.parallel, lut_interp16_requant_rows.sequential):
        for keep in (False, True):
            out, kept = np.empty(x.shape, storage), np.empty(x.shape if keep else (0, 0), np.int16)
            twin(x, kernel.full, plan, lo, hi, mode_code(rounding), out, kept)
            assert np.array_equal(out, expected)
            assert not keep or np.array_equal(kept, looked_up)


@given(rows=st.integers(1, 140), cols=st.sampled_from([1, 2, 3, 17, 384]), shift=st.integers(0, 30),
       spread_bits=st.sampled_from([0, 4, 15, 24, 29, 30, 31]), bias_bits=st.sampled_from([0, 20, 29, 40, 61]),
       rounding=st.sampled_from(ROUNDINGS), out_range=st.sampled_from(OUT_RANGES), extremes=st.booleans(),
       seed=st.integers(0, 2**32 - 1), data=st.data())
@settings(max_examples=60, deadline=None)
def test_fused_layernorm_and_requant_rows_in_both_twins(rows, cols, shift, spread_bits, bias_bits, rounding,
                                                         out_range, extremes, seed, data):
    """Both twins of the fused LayerNorm+Requant at MiniLM's width and around it, on rows
    whose spread max |x - mean| lies below and at 2^31 (the int32 loop and the narrow row
    against the int64 ones), with biases near and past the narrow row's int32 bound:
    the LayerNorm's output and its requantization are the ops', and a refused row (a sum of
    squares past 2^32, a |y| past the Requant's limit) is reported."""
    rng = np.random.default_rng(seed)
    half = 1 << spread_bits
    center = int(rng.integers(-(1 << 31) + half, (1 << 31) - half, endpoint=True)) if spread_bits < 31 else 0
    x = np.clip(center + rng.integers(-half, half, (rows, cols), endpoint=True), -(1 << 31), (1 << 31) - 1)
    if extremes:  # int32's ends in one row: its spread reaches 2^31, the general loop
        x[0, :2] = [-(1 << 31), (1 << 31) - 1][:cols]
    x = x.astype(np.int32)
    ln_bias = rng.integers(-(1 << bias_bits), (1 << bias_bits) + 1, cols)
    mul, bias, rq_shift, offset = _narrow_plan_params(rng, data, cols, data.draw(st.sampled_from([0, 20, 61])), 31)
    lo, hi, storage = out_range
    rest = int(np.abs(bias).max()) + int(np.abs(offset).max())
    largest_mul = int(np.abs(mul).max())
    limit = (INT64_MAX - rest) // largest_mul if largest_mul else INT64_MAX  # as the planned Requant's
    with backend.use("numpy"):
        try:
            y = IBertLayerNorm(x, ln_bias, shift=shift)
        except OpError:
            y = None
    plan = requant_plan(mul, bias, rq_shift, offset, cols)
    for twin in (ibert_layernorm_requant_rows.parallel, ibert_layernorm_requant_rows.sequential):
        got_y, out = np.empty(x.shape, np.int64), np.empty(x.shape, storage)
        bad = twin(x, ln_bias, int(np.abs(ln_bias).max()), shift, plan, limit, lo, hi, mode_code(rounding), got_y, out)
        if y is None or int(np.abs(y).max()) > limit:
            assert bad
            continue
        assert not bad and np.array_equal(got_y, y)
        assert np.array_equal(out, requantize(y, mul, bias, rq_shift, offset, lo, hi, rounding).astype(storage))


@pytest.mark.parametrize("shift", [0, 1, 15, 16, 17, 30])
def test_layernorm_rows_whose_spread_reaches_2_to_31(shift):
    """Rows holding int32's ends, whose |x - mean| reaches 2^31 or passes it (the mean off
    zero): the op's kernel and both twins of the fused one take the int64 differences and
    give the spec's output, or refuse as it does (a shift of 15 puts a term at 2^16; at 0
    two squares already pass 2^63)."""
    ends = [-(1 << 31), (1 << 31) - 1]
    x = np.array([ends + [v] for v in (-(1 << 31), -(1 << 30), -5, -1, 0, 1, 1 << 30, (1 << 31) - 1)], np.int32)
    x = np.concatenate([x, x[:, [1, 0, 2]], np.array([[-(1 << 31), -(1 << 31), (1 << 31) - 1]] * 3, np.int32)])
    bias = np.array([0, -7, 1 << 40])
    with backend.use("numpy"):
        expected = _outcome(lambda: IBertLayerNorm(x, bias, shift=shift))
    got = _outcome(lambda: IBertLayerNorm(x, bias, shift=shift))
    assert isinstance(got, RefsimError) if isinstance(expected, RefsimError) else np.array_equal(got, expected)
    plan = requant_plan(np.array([1]), np.array([0]), np.array([20]), np.array([0]), 3)
    for twin in (ibert_layernorm_requant_rows.parallel, ibert_layernorm_requant_rows.sequential):
        y, out = np.empty(x.shape, np.int64), np.empty(x.shape, np.int16)
        bad = twin(x, bias, 1 << 40, shift, plan, INT64_MAX, -(1 << 15), (1 << 15) - 1, mode_code("half_even"), y, out)
        assert bad == isinstance(expected, RefsimError)
        if not bad:
            assert np.array_equal(y, expected)
            assert np.array_equal(out, requantize(expected, 1, 0, 20, 0, -(1 << 15), (1 << 15) - 1, "half_even"))
