"""The IBertSoftmax kernel (refsim.kernels.softmax) against the op's NumPy formula.

test_kernels.py runs it on the op's cases with every other kernel; here it gets many more
of them, its exponential table is checked entry by entry against the formula (past the
entries it keeps, too), and it runs at MiniLM's size, where the parallel kernel (not its
sequential twin) computes, with each kind of mask.
"""

import numpy as np
import pytest
from core_harness import build_graph
from core_strategies import CASES, IBERT_SOFTMAX_PRESETS, ibert_softmax_attrs
from hypothesis import example, given, settings
from hypothesis import strategies as st
from refsim import GraphBuilder, RefsimError, backend, ops
from refsim.errors import OpError
from refsim.exporters import nonlinear as nl
from refsim.kernels import choose
from refsim.kernels import softmax as ksoftmax
from refsim.ops.softmax import _np_ibert_exp

MINILM = IBERT_SOFTMAX_PRESETS[0]
TABLE_KEYS = ("x0_int", "b_int", "c_int", "n", "exp_mul", "exp_shift", "exp_bit")


def _graph_result(case, backend_name):
    with backend.use(backend_name):
        try:
            model, feeds, y = build_graph(case)
            return model.run(feeds)[y]
        except RefsimError as e:
            return e


@settings(max_examples=300)
@given(CASES["IBertSoftmax"])
def test_kernel_matches_the_op_on_its_cases(case):
    expected = _graph_result(case, "numpy")
    got = _graph_result(case, "numba")
    if isinstance(expected, RefsimError):
        assert isinstance(got, RefsimError), f"the op refuses ({expected}), the kernel gave {got!r}"
        assert str(got) == str(expected)
        return
    assert not isinstance(got, RefsimError), f"the kernel refused ({got}), the op gives {expected!r}"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


def _spec_exp(attrs, differences):
    params = [attrs[k] for k in TABLE_KEYS[:-1]] + [(1 << (attrs["exp_bit"] - 1)) - 1]
    return _np_ibert_exp(-np.asarray(differences, np.int64), *params)


@given(attrs=ibert_softmax_attrs(), far=st.lists(st.integers(0, (1 << 32) - 1), max_size=20),
       span=st.sampled_from([(1 << 16) - 1, 1 << 20]))
@example(attrs=dict(x0_int=-(1 << 20), b_int=0, c_int=1, n=37, exp_mul=2052, exp_shift=49, exp_bit=2, output_bit=1),
         far=[], span=1 << 20)  # a complete 32-bit table of 2^20 + 1 entries with no trailing run to cut
def test_table_read_at_a_clamped_index_is_the_exponential(attrs, far, span):
    """table[min(d, last)] = iexp(-d) for every difference a 16-bit input has, and for any
    difference up to 2^32 - 1 when the table says it is complete."""
    try:
        ops.IBertSoftmax(np.zeros(1, np.int8), **attrs)
    except OpError:
        return  # attributes the op refuses; the kernel is not prepared for them
    table, complete = ksoftmax.exp_table(*(attrs[k] for k in TABLE_KEYS), span)
    assert complete == (-attrs["n"] * attrs["x0_int"] <= span)
    assert table.dtype.kind == "u" and table.size <= span + 1  # up to the clamp, or the 16-bit span
    d = np.arange(1 << 16)
    if complete:
        d = np.concatenate([d, np.array(far, np.int64), [(1 << 32) - 1]])
    expected = _spec_exp(attrs, d)
    assert int(expected.max()) <= np.iinfo(table.dtype).max
    assert np.array_equal(table[np.minimum(d, table.size - 1)], expected)


def test_minilm_table_is_short_and_narrow():
    # iexp(-d) is 0 from d = 5520 on for these attributes (checked against the spec here):
    # the table keeps 5520 entries and one 0 for every larger difference.
    table, complete = ksoftmax.exp_table(*(MINILM[k] for k in TABLE_KEYS))
    e = _spec_exp(MINILM, np.arange(1 << 16))
    assert int(np.flatnonzero(e)[-1]) == 5519 and not e[5520:].any()
    assert complete and table.dtype == np.uint16 and table.size == 5521


def _minilm_scores(seed, shape=(1, 12, 128, 128)):
    """Scores like MiniLM's int16 ones: most differences within the table, some beyond
    its last nonzero entry, and the type's extremes."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-4000, 4000, shape)
    x[..., :3] = rng.integers(-32768, 32768, shape[:-1] + (3,))
    x.reshape(-1)[:2] = (-32768, 32767)
    return x.astype(np.int16)


@pytest.mark.parametrize("mask_kind", ["none", "padding", "batch padding", "per head", "all kept", "per row", "full", "all masked"])
def test_kernel_at_minilm_size(mask_kind):
    """1536 rows of 128 (three sentences for "batch padding"): the parallel kernel, on one
    and two threads."""
    x = _minilm_scores(1, (3, 12, 128, 128) if mask_kind == "batch padding" else (1, 12, 128, 128))
    rng = np.random.default_rng(2)
    masks = {
        "none": None,
        "padding": (np.arange(128) < 11).astype(np.uint8).reshape(1, 1, 1, 128),
        "batch padding": (np.arange(128) < np.array([[11], [128], [0]])).astype(np.int64).reshape(3, 1, 1, 128),
        "per head": rng.integers(0, 2, (1, 12, 1, 128)).astype(np.uint8),
        "all kept": np.ones((1, 1, 1, 128), np.uint8),
        "per row": rng.integers(0, 2, (1, 12, 128, 1)).astype(np.uint8),
        "full": rng.integers(0, 2, (1, 12, 128, 128)).astype(np.uint8),
        "all masked": np.zeros((1, 1, 1, 128), np.uint8),
    }
    mask = masks[mask_kind]
    with backend.use("numpy"):
        expected = ops.IBertSoftmax(x, mask, **MINILM)
    kernel = ksoftmax.IBertSoftmaxKernel.prepare(MINILM, [])
    for threads in (1, 2):
        backend.set_threads(min(threads, backend.max_threads()))
        got = kernel(x, mask)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert np.array_equal(got, expected)


def test_zero_sum_is_refused_with_the_ops_message():
    attrs = IBERT_SOFTMAX_PRESETS[3]  # iexp(0) = 0: a row of equal values sums to 0
    x = np.zeros((2, 128, 128), np.int16)
    x[0] = np.arange(128)  # differences 0..127: a nonzero sum
    x[1, :, :5] = np.arange(5)  # differences 3 and 4: nonzero
    x[1, 7, :] = 3  # row 128 + 7 = 135: every kept value equal
    kernel = ksoftmax.IBertSoftmaxKernel.prepare(attrs, [])
    with backend.use("numpy"), pytest.raises(OpError) as expected:
        ops.IBertSoftmax(x, **attrs)
    assert "row 135:" in str(expected.value)
    with pytest.raises(OpError) as got:
        kernel(x)
    assert str(got.value) == str(expected.value)


def test_inputs_it_does_not_take_go_to_the_op():
    kernel = ksoftmax.IBertSoftmaxKernel.prepare(MINILM, [])
    x = np.array([[0, -6000, 1 << 40]], np.int64)  # beyond 32 bits: the op's formula
    with backend.use("numpy"):
        expected = ops.IBertSoftmax(x, **MINILM)
    assert np.array_equal(kernel(x), expected)
    with pytest.raises(OpError, match="does not broadcast"):
        kernel(np.zeros((2, 4), np.int16), np.ones((3, 4), np.uint8))
    too_wide = dict(MINILM, exp_mul=(1 << 31) - 1, exp_shift=0)  # z*exp_mul << 30 leaves int64
    assert ksoftmax.IBertSoftmaxKernel.prepare(too_wide, []) is None


def test_int32_scores_at_a_fine_scale():
    """I-BERT's own int32 scores (S = 2e-4: the clamp at 103980 is past 16 bits): a 32-bit
    input gets the whole table (to 55456, where it reaches 0), and any difference up to
    2^32 - 1 is exact."""
    attrs = nl.ibert_softmax_params(2e-4).attrs
    g = GraphBuilder("scores")
    g.output(g.node("IBertSoftmax", [g.input("x", "int32", [2, 64, 128]), g.input("m", "uint8", [2, 1, 128])], **attrs))
    model = g.model()
    rng = np.random.default_rng(3)
    x = rng.integers(-200_000, 200_000, (2, 64, 128))
    x[0, :, :4] = rng.integers(-(1 << 31), 1 << 31, (64, 4))
    x.reshape(-1)[:2] = (-(1 << 31), (1 << 31) - 1)
    feeds = {"x": x.astype(np.int32), "m": (np.arange(128) < np.array([[90], [128]])).astype(np.uint8).reshape(2, 1, 128)}
    [node] = model.graph.nodes
    chosen = choose("IBertSoftmax", attrs, {}, [model.graph.tensors[name] for name in node.inputs])
    assert isinstance(chosen, ksoftmax.IBertSoftmaxKernel) and np.dtype(np.int32) in chosen.dtypes  # the whole table
    with backend.use("numpy"):
        expected = ops.IBertSoftmax(feeds["x"], feeds["m"], **attrs)
    with backend.use("numba"):
        [got] = model.run(feeds).values()
    assert np.array_equal(got, expected)
