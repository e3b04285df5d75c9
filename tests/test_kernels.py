"""The fast kernels (refsim.kernels) against the readable ops they stand for.

Every registered kernel runs, inside a one-node graph, on the same hypothesis cases as its
op's torch tests, and must give what the op's NumPy formula gives (or refuse what it
refuses). The integer GEMMs are also checked directly, at shapes that cross their tile
edges, with extreme operands, every rounding of the fused requantization, and the bounds
they must refuse.
"""

import numpy as np
import pytest
from core_harness import build_graph
from core_strategies import CASES, ROUNDINGS, SHIFT_EDGES
from hypothesis import given
from hypothesis import strategies as st
from refsim import GraphBuilder, Model, RefsimError, backend
from refsim.kernels import KERNELS, cpu
from refsim.kernels import matmul as kmatmul
from refsim.kernels.requant import requant_plan
from refsim.ops.rounding import mode_code, requantize

needs_vnni = pytest.mark.skipif(not cpu.vnni_usable(), reason="AVX-512 VNNI not usable on this machine")
needs_avx2 = pytest.mark.skipif(not cpu.avx2_usable(), reason="AVX2 not usable on this machine")
ENGINES = [pytest.param("amx", marks=pytest.mark.skipif(not cpu.amx_usable(), reason="AMX int8 not usable here")),
           pytest.param("vnni", marks=needs_vnni), pytest.param("avx2", marks=needs_avx2)]
BYTE_GEMMS = [pytest.param("vnni", marks=needs_vnni), pytest.param("avx2", marks=needs_avx2)]
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "ternary": (-1, 1), "int2": (-2, 1)}


def _graph_result(case, backend_name):
    """The one-node graph's output under a backend, or the RefsimError it raises. Under
    NumPy the engine runs the op's own formula (with the types the graph declares); under
    Numba it runs the registered kernel."""
    with backend.use(backend_name):
        try:
            model, feeds, y = build_graph(case)
            return model.run(feeds)[y]
        except RefsimError as e:
            return e


@given(st.sampled_from(sorted(KERNELS)).flatmap(lambda op: CASES[op]))
def test_every_kernel_matches_its_op(case):
    expected = _graph_result(case, "numpy")
    got = _graph_result(case, "numba")
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError), f"the op refuses ({expected}), the kernel gave {got!r}"
        return
    assert not isinstance(got, RefsimError), f"the kernel refused ({got}), the op gives {expected!r}"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("engine", ENGINES)
@given(
    m=st.integers(0, 70), k=st.integers(1, 200), n=st.integers(1, 140),  # m = 0: an empty batch
    a_type=st.sampled_from(["int8", "uint8", "int4"]), b_type=st.sampled_from(["int8", "int4", "ternary", "int2"]),
    zero_point=st.integers(-8, 8), with_bias=st.booleans(), extremes=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_packed_weight_is_exact(monkeypatch, engine, m, k, n, a_type, b_type, zero_point, with_bias, extremes, seed):
    monkeypatch.setenv("REFSIM_GEMM", engine)
    rng = np.random.default_rng(seed)
    alo, ahi = RANGES[a_type]
    blo, bhi = RANGES[b_type]
    a = rng.integers(alo, ahi + 1, (m, k))
    b = rng.integers(blo, bhi + 1, (k, n))
    if extremes:  # the corners where a sum is largest
        a[: m // 2 + 1] = alo
        b[:, : n // 2 + 1] = blo
    bias = rng.integers(-(1 << 20), 1 << 20, n) if with_bias else None
    weight = kmatmul.PackedWeight.prepare(b)
    assert weight is not None and weight.engine == engine
    assert kmatmul.int32_exact(k, alo, ahi, zero_point, weight.bound, 1 << 20)
    storage = np.uint8 if alo >= 0 else np.int8
    got = weight.product(a.astype(storage), alo, weight.correction(alo, zero_point, bias))
    expected = (a - zero_point) @ b + (0 if bias is None else bias)
    assert got.dtype == np.int32
    assert np.array_equal(got, expected)


PLAN_SHIFTS = st.one_of(st.sampled_from(SHIFT_EDGES[:-2]), st.integers(0, 70))


@st.composite
def requant_params(draw, n):
    per_channel = draw(st.booleans())
    width = n if per_channel else 1
    mul = draw(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=width, max_size=width))
    shift = draw(st.lists(PLAN_SHIFTS, min_size=width, max_size=width))
    bias = draw(st.lists(st.integers(-(1 << 40), 1 << 40), min_size=width, max_size=width))
    offset = draw(st.lists(st.integers(-300, 300), min_size=width, max_size=width))
    if draw(st.integers(0, 3)) == 0:  # a Mul by a constant posing as a requantization (MULTIPLY_ONLY plans)
        shift, bias, offset = [0] * width, [0] * width, [0] * width
    rounding = draw(st.sampled_from(ROUNDINGS))
    out = draw(st.sampled_from([(-128, 127, np.int8), (-32768, 32767, np.int16), (0, 255, np.uint8), (-7, 100, np.int8)]))
    return [np.array(p, np.int64) for p in (mul, bias, shift, offset)], rounding, out


@pytest.mark.parametrize("engine", ENGINES)
@given(m=st.integers(1, 40), k=st.integers(1, 100), n=st.integers(1, 130), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_fused_requantization_matches_requantize(monkeypatch, engine, m, k, n, seed, data):
    monkeypatch.setenv("REFSIM_GEMM", engine)
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (k, n))
    a[0] = -128
    b[:, 0] = -128
    (mul, bias, shift, offset), rounding, (lo, hi, storage) = data.draw(requant_params(n))
    weight = kmatmul.PackedWeight.prepare(b)
    corr = weight.correction(-128, 0, None)
    plan = requant_plan(mul, bias, shift, offset, n)
    acc, got = weight.product(a, -128, corr, plan, (lo, hi, mode_code(rounding)), storage, keep_acc=True)
    exact = a.astype(np.int64) @ b
    assert np.array_equal(acc, exact)
    assert np.array_equal(got, requantize(exact, mul, bias, shift, offset, lo, hi, rounding).astype(storage))


def _vnni_weight_gemm(a, b, corr, threads, requant=None, keep_acc=True):
    """vnni.gemm_weight called directly (int8 a, lo = -128) on `threads` threads' tasks:
    (out, acc), where acc is the int32 sum (requant None: out itself)."""
    from refsim.kernels import vnni

    m, n = a.shape[0], b.shape[1]
    packed, kp = vnni.pack_b(b.astype(np.int8)), vnni.padded(b.shape[0], vnni.KG)
    none = np.empty((0, 0), np.int32)
    if requant is None:
        out = np.empty((m, n), np.int32)
        vnni.gemm_weight(a, -128, packed, kp, n, corr, np.zeros((12, 1), np.int64), 0, 0, 0, 0, out, none, threads)
        return out, out
    plan, (lo, hi, mode), storage = requant
    out, acc = np.empty((m, n), storage), np.empty((m, n), np.int32) if keep_acc else none
    vnni.gemm_weight(a, -128, packed, kp, n, corr, plan, lo, hi, mode, 1, out, acc, threads)
    return out, acc


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@given(m=st.integers(1, 40), k=st.integers(1, 1100), n=st.integers(1, 300), fused=st.booleans(),
       seed=st.integers(0, 2**32 - 1), data=st.data())
def test_vnni_weight_gemm_is_exact_however_its_tasks_fall(threads, m, k, n, fused, seed, data):
    """However many threads the VNNI weight GEMM is told it runs on (few rows: each takes
    a share of the columns, `panels.task_grid`; 8 threads: more than 300 columns have
    panels), and wherever K is cut into chunks that stay in L1 (B_CHUNK_GROUPS: 48-column
    panels cut K past 512 in two, past 1024 in three), the sum and its fused
    requantization are exact; both twins run (inputs from 16k values on run the parallel
    one)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (k, n))
    a[0], b[:, -1] = -128, -128  # the largest sums
    corr = 128 * b.sum(axis=0) + rng.integers(-(1 << 20), 1 << 20, n)
    exact = (a.astype(np.int64) + 128) @ b + corr
    if not fused:
        got, _ = _vnni_weight_gemm(a, b, corr, threads)
        assert np.array_equal(got, exact)
        return
    (mul, bias, shift, offset), rounding, (lo, hi, storage) = data.draw(requant_params(n))
    plan = requant_plan(mul, bias, shift, offset, n)
    got, acc = _vnni_weight_gemm(a, b, corr, threads, (plan, (lo, hi, mode_code(rounding)), storage))
    assert np.array_equal(acc, exact)
    assert np.array_equal(got, requantize(exact, mul, bias, shift, offset, lo, hi, rounding).astype(storage))


@needs_vnni
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_vnni_weight_gemm_splits_many_rows_into_row_tasks(threads):
    """Rows whose copy of A exceeds a task's share of L2 (A_TASK_BYTES; 300 x 2000 bytes:
    two tasks, four or three on 2 or 3 threads) are split by rows, each task with all the
    panels, an uneven last row block and K in chunks, its requantization fused."""
    from refsim.kernels import vnni

    m, k, n = 301, 2001, 130
    assert m * k > vnni.A_TASK_BYTES and k > 2 * vnni.KG * vnni.B_CHUNK_GROUPS
    rng = np.random.default_rng(threads)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (k, n))
    a[-1], b[:, 0] = -128, -128
    corr = 128 * b.sum(axis=0)
    exact = ((a.astype(np.float64) + 128) @ b.astype(np.float64)).astype(np.int64) + corr  # |sums| < 2^53: exact
    plan = requant_plan(rng.integers(1, 1 << 20, n), 7, 21, -3, n)
    got, acc = _vnni_weight_gemm(a, b, corr, threads, (plan, (-128, 127, mode_code("half_even")), np.int8))
    assert np.array_equal(acc, exact)
    assert np.array_equal(got, requantize(exact, plan[0], 7, 21, -3, -128, 127, "half_even").astype(np.int8))


def test_task_grid_splits_rows_first_then_columns():
    """What `panels.task_grid` deals (compiled, called from Python here): rows in tasks of
    at most task_bytes, a whole multiple of the threads; columns only when rows are few."""
    from refsim.kernels.panels import task_grid

    assert task_grid(16, 8 * 768, 16, 1, 512 << 10) == (1, 1)  # BERT-base b1, one thread: one task
    assert task_grid(16, 8 * 768, 16, 2, 512 << 10) == (1, 2)  # two threads: half the columns each
    assert task_grid(16, 8 * 768, 1, 2, 512 << 10) == (1, 1)  # one panel: nothing to split
    assert task_grid(128, 8 * 768, 16, 2, 512 << 10) == (2, 1)  # batch 8 (1024 rows): two row tasks
    assert task_grid(128, 8 * 3072, 16, 2, 512 << 10) == (6, 1)  # K = 3072: six row tasks
    assert task_grid(128, 8 * 2400, 16, 2, 512 << 10) == (6, 1)  # five, rounded up to a multiple of the threads
    assert task_grid(128, 8 * 768, 16, 0, 512 << 10) == (2, 1)  # no thread count: taken as one
    assert task_grid(3, 8 * 100000, 16, 2, 512 << 10) == (3, 1)  # never more row tasks than blocks


@pytest.mark.parametrize("module", BYTE_GEMMS)
@given(t=st.integers(1, 3), m=st.integers(1, 40), k=st.integers(1, 140), n=st.integers(1, 80),
       lo=st.sampled_from([0, -128, 5]), seed=st.integers(0, 2**32 - 1), wide_rows=st.integers(0, 3))
def test_activation_gemm_is_exact_up_to_lo_plus_its_span(module, t, m, k, n, lo, seed, wide_rows):
    """a with a - lo in [A_LOW, A_SPAN] (VNNI: [0, 256], the byte GEMM with its fix-up for
    256; AVX2: any int16), b in [-128, 127]; one value beyond either end is reported, not
    computed."""
    import importlib

    gemm = importlib.import_module(f"refsim.kernels.{module}")
    rng = np.random.default_rng(seed)
    a = rng.integers(lo + gemm.A_LOW, lo + gemm.A_SPAN, (t, m, k)).astype(np.int32)
    for r in range(min(wide_rows, m)):  # values at both ends (VNNI's 256: I-BERT's probability 1 at 8 bits)
        a[:, r, rng.integers(0, k)] = lo + gemm.A_SPAN
        a[:, r, rng.integers(0, k)] = lo + gemm.A_LOW
    b = rng.integers(-128, 128, (t, k, n)).astype(np.int8)
    b[:, :, 0] = -128
    out = np.empty((t, m, n), np.int32)
    none = np.empty((0, 0, 0), np.int32)
    assert gemm.gemm_activations(a, lo, b, np.zeros((10, 1), np.int64), 0, 0, 0, 0, out, none)
    assert np.array_equal(out, a.astype(np.int64) @ b)
    for beyond in (lo + gemm.A_SPAN + 1, lo + gemm.A_LOW - 1):  # beyond what the GEMM can take
        wrong = a.copy()
        wrong[0, 0, 0] = beyond
        assert not gemm.gemm_activations(wrong, lo, b, np.zeros((10, 1), np.int64), 0, 0, 0, 0, out, none)


@pytest.mark.parametrize("module", BYTE_GEMMS)
@given(t=st.integers(1, 3), m=st.integers(1, 30), k=st.integers(1, 100), n=st.integers(1, 130),
       lo=st.sampled_from([0, -128, 5]), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_activation_gemm_requantizes_as_requantize(module, t, m, k, n, lo, seed, data):
    """Attention's Q.K^T with its Requant fused: every plan (narrow, wide, multiply-only)
    and rounding, the int32 sums kept alongside, values at both ends of the GEMM's span."""
    import importlib

    gemm = importlib.import_module(f"refsim.kernels.{module}")
    rng = np.random.default_rng(seed)
    span_lo, span_hi = lo + max(gemm.A_LOW, -128), lo + min(gemm.A_SPAN, 256)  # int32 sums for k <= 100
    a = rng.integers(span_lo, span_hi + 1, (t, m, k)).astype(np.int32)
    a[0, 0, 0], a[-1, -1, -1] = span_lo, span_hi
    b = rng.integers(-128, 128, (t, k, n)).astype(np.int8)
    b[:, :, 0] = -128
    (mul, bias, shift, offset), rounding, (out_lo, out_hi, storage) = data.draw(requant_params(n))
    plan = requant_plan(mul, bias, shift, offset, n)
    out, acc = np.empty((t, m, n), storage), np.empty((t, m, n), np.int32)
    assert gemm.gemm_activations(a, lo, b, plan, out_lo, out_hi, mode_code(rounding), 1, out, acc)
    exact = a.astype(np.int64) @ b
    assert np.array_equal(acc, exact)
    assert np.array_equal(out, requantize(exact, mul, bias, shift, offset, out_lo, out_hi, rounding).astype(storage))


@pytest.mark.skipif(kmatmul.gemm_engine() is None, reason="no integer GEMM on this machine")
@pytest.mark.parametrize("dtype", ["uint16", "int16"])
def test_a_16_bit_activation_product_runs_on_the_integer_gemm(dtype):
    """P.V with P a full 16-bit type (I-BERT's softmax output is uint16, 0..2^15) takes the
    integer GEMM for every value of its type, on VNNI machines too (through AVX2's words),
    not the int64 fallback; exact at both ends of the type."""
    from refsim.dtypes import int_type

    info = np.iinfo(dtype)
    kernel = kmatmul.ActivationMatMul(dict(transA=False, transB=False, acc_bits=32, overflow="error"),
                                      int_type(dtype), int_type("int8"))
    rng = np.random.default_rng(0)
    a = rng.integers(info.min, int(info.max) + 1, (3, 20, 128)).astype(dtype)
    a[0, 0, :], a[0, 1, :] = info.max, info.min
    b = rng.integers(-128, 128, (3, 128, 40)).astype(np.int8)
    b[0, :, 0], b[0, :, 1] = -128, 127
    got = kernel.product(a, b)
    assert got is not None and got.dtype == np.int32
    assert np.array_equal(got, a.astype(np.int64) @ b)


@given(m=st.integers(1, 30), k=st.integers(1, 130), n=st.integers(1, 40), top=st.sampled_from([256, 32767, 65535]),
       seed=st.integers(0, 2**32 - 1))
def test_a_product_of_a_uint16_probability_and_int8_values_is_exact(m, k, n, top, seed):
    """Attention's P.V with P stored as uint16 (I-BERT's softmax, 0..2^15): the integer GEMM
    where the values allow (AVX2 takes them all, VNNI up to 256), the exact fallback else."""
    rng = np.random.default_rng(seed)
    g = GraphBuilder("pv")
    p = g.input("p", "uint16", [2, m, k])
    v = g.input("v", "int8", [2, k, n])
    g.output(g.node("MatMul", [p, v], outputs="y"))
    model = g.model()
    feeds = {"p": rng.integers(0, top + 1, (2, m, k)).astype(np.uint16), "v": rng.integers(-128, 128, (2, k, n)).astype(np.int8)}
    feeds["p"][0, 0, 0], feeds["v"][0, 0, :] = top, -128
    got = model.run(feeds)["y"]
    assert got.dtype == np.int32
    assert np.array_equal(got, feeds["p"].astype(np.int64) @ feeds["v"])


def test_int32_bounds_refuse_what_a_byte_gemm_cannot_hold():
    assert kmatmul.int32_exact(65793, -128, 127, 0, 128, 0)  # 65793 * 255 * 128 = 2^31 - 127
    assert not kmatmul.int32_exact(65794, -128, 127, 0, 128, 0)  # one more row of K leaves int32
    assert kmatmul.int32_exact(1000, -128, 127, 0, 128, 0)
    assert not kmatmul.int32_exact(10, -129, 127, 0, 128, 0)  # 257 values do not fit a byte
    assert not kmatmul.int32_exact(100, -128, 127, 0, 128, 0, acc_bits=16)  # the accumulator could overflow
    assert kmatmul.PackedWeight.prepare(np.full((4, 4), 200)) is None  # weights beyond int8


@pytest.mark.skipif(kmatmul.gemm_engine() is None, reason="no integer GEMM on this machine")
def test_int8_weights_of_minus_128_bound_the_sums():
    """The bound of an int8 weight holding -128 is 128 (NumPy's abs of an int8 -128 is -128)."""
    weight = kmatmul.PackedWeight.prepare(np.full((4, 1), -128, np.int8))
    assert weight.bound == 128
    assert not kmatmul.int32_exact(4, -128, 127, 0, weight.bound, 0, acc_bits=16)  # 4 * 128 * 128 = 65536


def test_a_weight_too_deep_for_int32_falls_back_exactly():
    k = 70000  # 70000 * 255 * 128 leaves int32: float BLAS chunks instead
    b = GraphBuilder("deep")
    x = b.input("x", "int8", [1, k])
    w = b.const(np.full((k, 2), -128), "int8", name="w")
    b.output(b.node("MatMul", [x, w], outputs="y", acc_bits=64))
    model = b.model()
    a = np.full((1, k), -128, np.int8)
    assert model.run({"x": a})["y"].tolist() == [[k * 128 * 128] * 2]


def _dense_model(rng, k=96, n=80):
    b = GraphBuilder("dense")
    x = b.input("x", "int8", ["batch", k])
    w = b.const(rng.integers(-128, 128, (k, n)), "int8", name="w")
    bias = b.const(rng.integers(-5000, 5000, n), "int32", name="bias")
    acc = b.node("MatMul", [x, w, None, None, bias], outputs="acc")
    mul = b.const(rng.integers(1, 1 << 16, n), "int32", name="mul")
    shift = b.const(np.full(n, 18), "int8", name="shift")
    b.output(b.node("Requant", [acc, mul, shift], outputs="y", rounding="half_even", dtype="int8"))
    return b.model()


def test_fused_steps_give_every_intermediate_when_traced():
    rng = np.random.default_rng(3)
    fused = _dense_model(rng)
    plain = Model(_dense_model(np.random.default_rng(3)).graph, fuse=False)
    assert any(s.hidden is not None for s in fused._steps) == (kmatmul.gemm_engine() is not None)
    assert all(s.hidden is None for s in plain._steps)
    x = rng.integers(-128, 128, (37, 96)).astype(np.int8)
    x[0] = -128
    seen = {"fused": {}, "plain": {}}
    out_f = fused.run({"x": x}, trace=lambda node, name, a: seen["fused"].__setitem__(name, (node.name, a.copy())))
    out_p = plain.run({"x": x}, trace=lambda node, name, a: seen["plain"].__setitem__(name, (node.name, a.copy())))
    assert np.array_equal(out_f["y"], out_p["y"])
    assert list(seen["fused"]) == list(seen["plain"]) == ["acc", "y"]
    for name, (node, array) in seen["plain"].items():
        assert seen["fused"][name][0] == node
        assert np.array_equal(seen["fused"][name][1], array)
    both = fused.run({"x": x}, outputs=["acc", "y"])  # asking for the skipped tensor
    assert np.array_equal(both["acc"], seen["plain"]["acc"][1])
    with backend.use("numpy"):  # the other backend plans its own steps
        assert np.array_equal(fused.run({"x": x})["y"], out_p["y"])


def _residual_model(seed, k, n, mul_shape, out_dtype):
    """MatMul with bias -> Mul by a constant (the residual branch's multiplier)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder("residual")
    x = b.input("x", "int8", ["batch", k])
    w = b.const(rng.integers(-128, 128, (k, n)), "int8", name="w")
    bias = b.const(rng.integers(-(1 << 20), 1 << 20, n), "int32", name="bias")
    acc = b.node("MatMul", [x, w, None, None, bias], outputs="acc")
    c = rng.integers(-(1 << 31), 1 << 31, mul_shape)
    c.reshape(-1)[0] = -(1 << 31)  # the extreme multiplier
    mul = b.const(c, "int32", name="mul")
    b.output(b.node("Mul", [acc, mul], outputs="y", dtype=out_dtype))
    return b.model()


@pytest.mark.parametrize("mul_shape", [(), (1,), (70,), (1, 70)])
@given(m=st.integers(1, 40), k=st.integers(1, 120), seed=st.integers(0, 2**32 - 1))
def test_matmul_and_mul_by_a_constant_fuse_exactly(mul_shape, m, k, seed):
    fused = _residual_model(seed, k, 70, mul_shape, "int64")
    plain = Model(fused.graph, fuse=False)
    assert any(s.hidden is not None for s in fused._steps) == (kmatmul.gemm_engine() is not None)
    x = np.random.default_rng(seed).integers(-128, 128, (m, k)).astype(np.int8)
    x[0] = -128
    with backend.use("numpy"):
        expected = plain.run({"x": x}, outputs=["acc", "y"])
    assert np.array_equal(fused.run({"x": x})["y"], expected["y"])
    seen = {}
    fused.run({"x": x}, trace=lambda node, name, a: seen.__setitem__(name, a.copy()))
    assert list(seen) == ["acc", "y"]
    assert all(np.array_equal(seen[name], expected[name]) and seen[name].dtype == expected[name].dtype for name in seen)


def test_a_mul_whose_output_type_the_values_decide_is_not_fused():
    fused = _residual_model(5, 30, 70, (70,), "int32")  # int32 * int32 may leave int32
    assert all(s.hidden is None for s in fused._steps)


def test_thread_choice_follows_measured_costs():
    choice = backend.ThreadChoice(2)
    tried = [choice.pick() for _ in range(4)]
    assert sorted(tried) == [0, 0, 1, 1]  # each option tried twice first
    for option in (1, 0):  # each option's first run compiles or loads its kernel: not counted
        choice.record(option, 1000.0 if option else 0.1)
    assert choice.cost == [float("inf"), float("inf")]
    for option in (1, 0):
        choice.record(option, 1.0 if option else 3.0)  # all threads cheaper
    assert choice.cost == [3.0, 1.0]
    picks = []
    for _ in range(64):
        option = choice.pick()
        picks.append(option)
        choice.record(option, 1.0 if option else 3.0)
    assert picks.count(1) > 56 and 0 in picks  # mostly the cheaper, with probes of the other
    for _ in range(64):  # the load changes: one thread becomes the cheaper
        option = choice.pick()
        choice.record(option, 5.0 if option else 0.5)
    assert choice.counts[choice.pick()] == 1


def test_requant_with_the_int64_minimum_multiplier_is_refused_like_the_op():
    b = GraphBuilder("rq")
    x = b.input("x", "int32", [1, 2])
    mul = b.const(np.array(-(1 << 63)), "int64", name="mul")
    shift = b.const(np.array(3), "int8", name="shift")
    b.output(b.node("Requant", [x, mul, shift], outputs="y", dtype="int8"))
    model = b.model()
    with pytest.raises(RefsimError, match="int64"):
        model.run({"x": np.array([[2, -5]], np.int32)})
    assert model.run({"x": np.zeros((1, 2), np.int32)})["y"].tolist() == [[0, 0]]


@pytest.mark.parametrize("rounding", ["half_even", "trunc"])
def test_parallel_kernel_and_its_sequential_twin_agree(monkeypatch, rounding):
    """A parallel kernel runs as its sequential twin below the threading threshold: both
    compute the op's formula (here the planned requantization, on extreme int32 inputs)."""
    from refsim import jit
    from refsim.kernels import requant as krequant

    jit.one_thread(False)  # an earlier run on one thread would pick the twin whatever the size
    twin = krequant.requant_rows
    rng = np.random.default_rng(7)
    x = rng.integers(-(2**31), 2**31, size=(96, 200), dtype=np.int64).astype(np.int32)
    x[0, :4] = [-(2**31), 2**31 - 1, 0, -1]
    mul = rng.integers(1, 2**20, size=200)
    bias = rng.integers(-(2**40), 2**40, size=200)
    shift = rng.integers(0, 70, size=200)
    offset = rng.integers(-5, 5, size=200)
    plan = requant_plan(mul, bias, shift, offset, 200)
    expected = requantize(x, mul, bias, shift, offset, -128, 127, rounding).astype(np.int8)
    results = {}
    for name, threshold in (("parallel", 0), ("sequential", x.size + 1)):
        monkeypatch.setattr(twin, "threshold", threshold)
        out = np.empty(x.shape, np.int8)
        twin(x, plan, -128, 127, mode_code(rounding), out)
        results[name] = out
        assert getattr(twin, name).signatures, f"the {name} variant did not run"
    assert np.array_equal(results["parallel"], expected)
    assert np.array_equal(results["sequential"], expected)


def test_a_kernel_the_engine_runs_on_one_thread_runs_as_its_sequential_twin(monkeypatch):
    """On one thread a parallel kernel's launch is pure cost: the twin runs instead, at
    any size, and the parallel kernel again when all threads are asked for."""
    from refsim.kernels import requant as krequant

    if backend.max_threads() < 2:
        pytest.skip("one Numba thread here")
    twin = krequant.requant_rows
    calls = []
    for name in ("parallel", "sequential"):
        kernel = getattr(twin, name)
        monkeypatch.setattr(twin, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int32).reshape(256, 256)  # above the threading threshold
    plan = requant_plan(3, 0, 2, 0, 256)
    out = np.empty(x.shape, np.int8)
    try:
        for threads in (1, backend.max_threads()):
            backend.set_threads(threads)
            twin(x, plan, -128, 127, mode_code("half_even"), out)
    finally:
        backend.set_threads(1)
    assert calls == ["sequential", "parallel"]
    assert np.array_equal(out, requantize(x, 3, 0, 2, 0, -128, 127, "half_even").astype(np.int8))


ARITH_TYPES = {"int8": (-128, 127), "int16": (-(1 << 15), (1 << 15) - 1), "int32": (-(1 << 31), (1 << 31) - 1),
               "int64": (-(1 << 63), (1 << 63) - 1)}


def _arith_requant_model(op, a_type, b_type, b_const, rows, cols, params, rounding, dtype, fuse=True):
    (mul, bias, shift, offset) = params
    b = GraphBuilder("arith_requant")
    x = b.input("x", a_type, ["batch", cols])
    y = b.input("y", b_type, ["batch", cols]) if b_const is None else b.const(b_const, b_type, name="c")
    s = b.node(op, [x, y], outputs="s", dtype="int64", overflow="error")
    consts = [b.const(p, t, name=n) for p, t, n in ((mul, "int64", "mul"), (shift, "int32", "shift"),
                                                    (bias, "int64", "bias"), (offset, "int32", "offset"))]
    b.output(b.node("Requant", [s, *consts], outputs="q", rounding=rounding, dtype=dtype))
    model = b.model()
    return model if fuse else Model(model.graph, fuse=False)


@st.composite
def arith_requant_case(draw):
    op = draw(st.sampled_from(["Add", "Sub", "Mul"]))
    a_type, b_type = draw(st.sampled_from(sorted(ARITH_TYPES))), draw(st.sampled_from(sorted(ARITH_TYPES)))
    rows, cols = draw(st.integers(1, 70)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def values(type_name, shape):
        lo, hi = ARITH_TYPES[type_name]
        narrow = draw(st.booleans())  # mostly small values, so the int64 result usually fits
        v = rng.integers(-1000, 1001, shape) if narrow else rng.integers(lo, hi, shape, endpoint=True)
        v = np.clip(v, lo, hi)
        if draw(st.booleans()):  # the type's extremes
            v.reshape(-1)[:2] = [lo, hi][: v.size]
        return v.astype(type_name)

    a = values(a_type, (rows, cols))
    const = draw(st.sampled_from(["no", "row", "scalar"]))
    b_values = values(b_type, (rows, cols) if const == "no" else (cols,) if const == "row" else ())
    (mul, bias, shift, offset), rounding, (_, _, storage) = draw(requant_params(cols))
    dtype = np.dtype(storage).name
    return op, a_type, b_type, a, b_values, const != "no", (mul, bias, shift, offset), rounding, dtype


@given(arith_requant_case())
def test_fused_add_sub_mul_and_requant_match_the_ops(case):
    """An Add, Sub or Mul and the Requant after it run as one pass (the residual sums of
    an exported encoder): every result, and every refusal, is the two ops' own, on each
    type's extreme values and with per-tensor and per-channel parameters."""
    op, a_type, b_type, a, b_values, b_const, params, rounding, dtype = case
    results = []
    seen = {}
    for backend_name, fuse, trace in (("numpy", False, None), ("numba", True, None),
                                      ("numba", True, lambda node, name, x: seen.__setitem__(name, x.copy()))):
        with backend.use(backend_name):
            model = _arith_requant_model(op, a_type, b_type, b_values if b_const else None, *a.shape, params,
                                         rounding, dtype, fuse=fuse)
            if fuse:
                assert [s.node.op for s in model._steps] == ["Requant"]  # fused into one step
            feeds = {"x": a} if b_const else {"x": a, "y": b_values}
            try:
                results.append(model.run(feeds, trace=trace, outputs=None if fuse else ["s", "q"]))
            except RefsimError as e:
                results.append(e)
    expected, got, traced = results
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError), f"the ops refuse ({expected}), the fused step gave {got!r}"
        assert isinstance(traced, RefsimError)
        return
    assert not isinstance(got, RefsimError), f"the fused step refused ({got}), the ops give {expected!r}"
    assert got["q"].dtype == expected["q"].dtype and np.array_equal(got["q"], expected["q"])
    assert list(seen) == ["s", "q"]  # a traced run: the sum too, from the same pass
    assert all(seen[n].dtype == expected[n].dtype and np.array_equal(seen[n], expected[n]) for n in seen)


@pytest.mark.parametrize("op", ["Add", "Sub"])
@pytest.mark.parametrize("rounding", ["half_even", "half_up", "half_away", "floor", "trunc"])
def test_fused_residual_sum_and_requant_round_every_tie_as_the_ops(op, rounding):
    """The residual sums' Add (and a Sub) with the Requant after it, on sums that are all
    ties or one away from a tie (shift 1 and 2, per-channel multipliers of both signs):
    the fused pass's loops of their own per rounding round each as the ops do."""
    rng = np.random.default_rng(7)
    cols = 40
    x = rng.integers(-(1 << 40), 1 << 40, (9, cols)).astype(np.int64)
    y = rng.integers(-(1 << 40), 1 << 40, (9, cols)).astype(np.int64)
    for shift in (1, 2):
        params = [rng.integers(-3, 4, cols).astype(np.int64) | 1, np.zeros(1, np.int64),
                  np.array([shift], np.int64), np.array([3], np.int64)]
        results = []
        for backend_name, fuse in (("numpy", False), ("numba", True)):
            with backend.use(backend_name):
                model = _arith_requant_model(op, "int64", "int64", None, *x.shape, params, rounding, "int32", fuse=fuse)
                results.append(model.run({"x": x, "y": y})["q"])
        assert np.array_equal(results[0], results[1])


def test_fused_add_and_requant_give_the_sum_when_traced():
    params = [np.array([3], np.int64), np.array([5], np.int64), np.array([2], np.int64), np.array([1], np.int64)]
    model = _arith_requant_model("Add", "int64", "int64", None, 4, 8, params, "half_even", "int8")
    x = np.arange(32, dtype=np.int64).reshape(4, 8) - 16
    y = np.full((4, 8), -(1 << 40), np.int64)
    seen = {}
    out = model.run({"x": x, "y": y}, trace=lambda node, name, a: seen.__setitem__(name, a.copy()))
    assert list(seen) == ["s", "q"] and np.array_equal(seen["s"], x + y)
    assert np.array_equal(out["q"], model.run({"x": x, "y": y})["q"])


@given(
    a_type=st.sampled_from(["int8", "int16", "int32"]), out=st.sampled_from(["int16", "int32"]),
    const=st.sampled_from(["scalar", "row"]), power=st.integers(0, 30), policy=st.sampled_from(["error", "saturate"]),
    rows=st.integers(1, 40), cols=st.integers(1, 90), seed=st.integers(0, 2**32 - 1),
)
def test_mul_by_a_constant_is_bounded_by_the_constants_values(a_type, out, const, power, policy, rows, cols, seed):
    """A Mul by a constant declared wider than its values (LayerNorm's 2^p upshift: an int32
    scalar) is bounded by the constant's own extremes: the unchecked pass runs where they
    keep every product in the output type, the overflow policy where they do not; either
    way every result and refusal is the op's."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(a_type)
    x = rng.integers(info.min, info.max, (rows, cols), dtype=a_type, endpoint=True)
    x.reshape(-1)[:2] = [info.min, info.max][: x.size]
    c = np.full(() if const == "scalar" else (cols,), 1 << power, np.int32)
    if const == "row":
        c[rng.integers(0, cols)] = -(1 << power)
    results = []
    for backend_name in ("numpy", "numba"):
        with backend.use(backend_name):
            b = GraphBuilder("mul_const")
            y = b.node("Mul", [b.input("x", a_type, ["batch", cols]), b.const(c, "int32", name="c")], outputs="y",
                       dtype=out, overflow=policy)
            b.output(y)
            try:
                results.append(b.model().run({"x": x})["y"])
            except RefsimError as e:
                results.append(e)
    expected, got = results
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError), f"the op refuses ({expected}), the kernel gave {got!r}"
    else:
        assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("mul, shift, identity", [
    (2147483615, 31, True),  # a scale within a rounding of its own (MiniLM's Q and K before Q.K^T)
    (1073741870, 30, True),
    ((1 << 31) - (1 << 24), 31, False),  # x * (1 - 2^-7): 127 -> 126, one value off
    (1 << 30, 31, False),  # halves
])
def test_a_requant_that_maps_every_value_to_itself_is_no_pass(mul, shift, identity):
    """A Requant whose formula returns every value of its int8 input unchanged (checked at
    prepare time on all 256) returns its input; one that moves any value runs the plan. Both
    give the formula's integers on every value of the type."""
    from refsim.kernels.requant import PlannedRequant

    g = GraphBuilder("rq")
    x = g.input("x", "int8", ["batch", 256])
    y = g.node("Requant", [x, g.const(np.array(mul), "int32"), g.const(np.array(shift), "int8")], outputs="y",
               dtype="int8", rounding="half_even")
    g.output(y)
    model = g.model()
    values = np.arange(-128, 128, dtype=np.int8).reshape(1, 256)
    kernel = next(s.kernel for s in model._steps if s.node.op == "Requant")
    assert isinstance(kernel, PlannedRequant) and kernel.identity == identity
    got = model.run({"x": values})["y"]
    expected = requantize(values.astype(np.int64), mul, 0, shift, 0, -128, 127, "half_even")
    assert np.array_equal(got, expected) and got.dtype == np.int8
    assert np.array_equal(got, values) == identity
