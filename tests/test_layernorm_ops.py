"""Integer LayerNorm / NoNorm ops and the exact integer square root."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch_nonlinear as T
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nonlinear_helpers import BACKENDS, assert_matches, both, rows, run
from refsim import GraphBuilder, ops
from refsim.errors import AccumulatorOverflow, OpError
from refsim.ops.intmath import isqrt

INT64_MAX = 2**63 - 1


# --- isqrt -----------------------------------------------------------------------------------


def _isqrt_edge_values():
    values = {0, 1, 2, 3, 4, 5, 2**62, 2**62 - 1, INT64_MAX, INT64_MAX - 1}
    for root in (1, 2, 3, 46340, 46341, 2**31 - 1, 2**31, 2**32 - 1, 3037000498, 3037000499):
        values.update({root * root - 1, root * root, root * root + 1})
    rng = np.random.default_rng(0)
    for bits in range(1, 64):
        values.update(int(v) for v in rng.integers(0, 2**bits, 20, dtype=np.uint64) if int(v) <= INT64_MAX)
    return sorted(v for v in values if 0 <= v <= INT64_MAX)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_isqrt_is_the_exact_floor_square_root(backend_name):
    values = _isqrt_edge_values()
    got = run(isqrt, np.array(values, np.int64), backend_name=backend_name)
    assert got.tolist() == [math.isqrt(v) for v in values]
    assert math.isqrt(INT64_MAX) == 3037000499 == got[values.index(INT64_MAX)]


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(v=st.integers(0, INT64_MAX))
def test_isqrt_hypothesis(backend_name, v):
    assert int(run(isqrt, np.array([v, v // 3]), backend_name=backend_name)[0]) == math.isqrt(v)


def test_isqrt_refuses_negative_values():
    with pytest.raises(OpError, match="negative"):
        isqrt(np.array([4, -1]))


# --- iLayerNorm --------------------------------------------------------------------------------


@st.composite
def layernorm_rows(draw, dtype=np.int8, max_rows=4, max_cols=40):
    r, c = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    info = np.iinfo(dtype)
    x = draw(hnp.arrays(dtype, (r, c), elements=st.integers(int(info.min), int(info.max))))
    per_channel = draw(st.booleans())
    shape = (c,) if per_channel else (1,)
    return x, shape


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    data=layernorm_rows(),
    weight_bits=st.integers(1, 31),
    bias_bits=st.integers(1, 31),
    log2_d=st.integers(0, 40),
    n_levels=st.sampled_from([256, 16, 2**16]),
    overflow=st.sampled_from(["saturate", "wrap", "error"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_i_layernorm_matches_torch(backend_name, data, weight_bits, bias_bits, log2_d, n_levels, overflow, seed):
    x, shape = data
    rng = np.random.default_rng(seed)
    w = rng.integers(-(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1), shape).astype(np.int32)
    b = rng.integers(-(2 ** (bias_bits - 1)), 2 ** (bias_bits - 1), shape).astype(np.int32)
    lo, hi = -(n_levels // 2), n_levels // 2 - 1
    expected = T.i_layernorm(rows(x), torch.as_tensor(w.astype(np.int64)), torch.as_tensor(b.astype(np.int64)),
                             log2_d, lo, hi, overflow)
    attrs = dict(D=2**log2_d, n_levels=n_levels, overflow=overflow)
    if overflow == "error" and (int(expected.min()) < lo or int(expected.max()) > hi):
        with pytest.raises(AccumulatorOverflow):
            run(ops.iLayerNorm, x, w, b, backend_name=backend_name, **attrs)
        return
    got = run(ops.iLayerNorm, x, w, b, backend_name=backend_name, **attrs)
    assert got.dtype == {256: np.int8, 16: np.int8, 2**16: np.int16}[n_levels]
    assert_matches(got, expected)


def test_i_layernorm_hand_worked():
    # x = [1, 2, 3, 6]: mean = 12 // 4 = 3, d = [-2, -1, 0, 3], sum d^2 = 14, 14 // 4 + 1 = 4, std = 2.
    # weight 3: d*w = [-6, -3, 0, 9], trunc_div by 2 = [-3, -1, 0, 4] (-1.5 -> -1), + bias [0, 1, 2, 3]
    # = [-3, 0, 2, 7], >> 1 (D = 2) = [-2, 0, 1, 3] (floor of -1.5 is -2).
    x = np.array([1, 2, 3, 6], np.int8)
    got = both(ops.iLayerNorm, x, np.array([3], np.int32), np.array([0, 1, 2, 3], np.int32), D=2)
    assert got.tolist() == [-2, 0, 1, 3]
    # The mean is C division: x = [-1, -2, 0, 0], sum -3, mean trunc(-0.75) = 0 (floor would give -1).
    # d = x, sum d^2 = 5, 5 // 4 + 1 = 2, std = isqrt(2) = 1; weight 2: y = 2*d = [-2, -4, 0, 0].
    got = both(ops.iLayerNorm, np.array([-1, -2, 0, 0], np.int8), np.array([2]), np.array([0]), D=1)
    assert got.tolist() == [-2, -4, 0, 0]


def test_i_layernorm_saturates_or_wraps_like_its_anchors():
    # x = [0, 10]: mean 5, d = [-5, 5], 50 // 2 + 1 = 26, std 5; weight 1000: y = [-1000, 1000].
    x = np.array([0, 10], np.int8)
    w, b = np.array([1000], np.int32), np.array([0], np.int32)
    assert both(ops.iLayerNorm, x, w, b, D=1).tolist() == [-128, 127]  # quantlib clips
    # The C kernel's int8 cast: -1000 + 1024 = 24, 1000 - 1024 = -24.
    assert both(ops.iLayerNorm, x, w, b, D=1, overflow="wrap").tolist() == [24, -24]
    with pytest.raises(AccumulatorOverflow, match="iLayerNorm"):
        both(ops.iLayerNorm, x, w, b, D=1, overflow="error")


# --- IBertLayerNorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    data=st.one_of(layernorm_rows(np.int8), layernorm_rows(np.int16), layernorm_rows(np.int32, max_cols=8)),
    shift=st.integers(0, 30),
    seed=st.integers(0, 2**32 - 1),
    with_bias=st.booleans(),
)
def test_ibert_layernorm_matches_torch(backend_name, data, shift, seed, with_bias):
    x, shape = data
    bias = np.random.default_rng(seed).integers(-(2**40), 2**40, shape) if with_bias else None
    expected = T.ibert_layernorm(rows(x), torch.as_tensor(bias if with_bias else np.zeros(1, np.int64)), shift)
    if expected is None:
        with pytest.raises(OpError, match="raise shift"):
            run(ops.IBertLayerNorm, x, bias, backend_name=backend_name, shift=shift)
        return
    got = run(ops.IBertLayerNorm, x, bias, backend_name=backend_name, shift=shift)
    assert got.dtype == np.int64
    assert_matches(got, expected)


def test_ibert_layernorm_hand_worked():
    # x = [1, 2, 3, 6]: mean 3, d = [-2, -1, 0, 3], var = 14, std = isqrt(14) = 3,
    # factor = 2^31 // 3 = 715827882; y = (d*factor) >> 1 + bias [0, 0, 0, 10]:
    # -1431655764 >> 1 = -715827882; -715827882 >> 1 = -357913941; 0; 2147483646 >> 1 = 1073741823 (+10).
    got = both(ops.IBertLayerNorm, np.array([1, 2, 3, 6], np.int8), np.array([0, 0, 0, 10]))
    assert got.tolist() == [-715827882, -357913941, 0, 1073741833]
    # The mean rounds half to even: [0, 1] has mean 0.5 -> 0, d = [0, 1], var 1, std 1,
    # y = [0, 2^31 >> 1] = [0, 1073741824].
    assert both(ops.IBertLayerNorm, np.array([0, 1], np.int8)).tolist() == [0, 1073741824]
    # shift 2: x = [0, 4, 8, 12], mean 6, d = [-6, -2, 2, 6], d >> 2 = [-2, -1, 0, 1], var 6,
    # std = isqrt(6) << 2 = 8, factor = 2^31 // 8 = 268435456, y = d*factor >> 1.
    got = both(ops.IBertLayerNorm, np.array([0, 4, 8, 12], np.int8), shift=2)
    assert got.tolist() == [-805306368, -268435456, 268435456, 805306368]


def test_ibert_layernorm_divides_2_to_31_as_i_bert_does():
    """Issue 17's examples: where std is a power of two, I-BERT's floor(2^31 / std) is one
    more than (2^31 - 1) // std, which refsim computed before."""
    # mean 0; var = 4 + 4 + 121 + 121 + 4 + 4 = 258, std = isqrt(258) = 16; d = -2
    got = both(ops.IBertLayerNorm, np.array([-2, 2, -11, 11, -2, 2], np.int8))
    assert got[0] == -134_217_728 != (-2 * ((2**31 - 1) // 16)) >> 1
    # var = 2 * 131^2 + 2 * 125^2 = 65572, std = 256; d = -131
    got = both(ops.IBertLayerNorm, np.array([-131, 131, -125, 125], np.int16))
    assert got[0] == -549_453_824 != (-131 * ((2**31 - 1) // 256)) >> 1


def _transformers_int_layernorm(x: np.ndarray, shift: int, beta: np.ndarray):
    """y_int + bias_int of transformers' own I-BERT IntLayerNorm (quant_mode, weight 1), run
    in float64 so that every intermediate is an exact integer; and the bias_int it adds."""
    from transformers.models.ibert.quant_modules import IntLayerNorm

    n = x.shape[-1]
    module = IntLayerNorm(n, eps=1e-5, quant_mode=True).double().eval()
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.bias.copy_(torch.as_tensor(beta, dtype=torch.float64))
    module.shift = torch.tensor([float(shift)], dtype=torch.float64)
    module.dim_sqrt = torch.sqrt(torch.tensor(float(n), dtype=torch.float64))
    scale = torch.tensor(0.5, dtype=torch.float64)  # cancels out: x_int = x / scale
    out, out_scale = module(torch.as_tensor(x, dtype=torch.float64).reshape(1, *x.shape) * scale, scale)
    y = torch.round(out / out_scale).to(torch.int64).reshape(x.shape).numpy()
    bias_int = np.floor(beta / (math.sqrt(n) / 2**30)).astype(np.int64)  # I-BERT's floor((beta/gamma) / scale)
    return y, bias_int


def _ibert_variance(row, shift: int) -> int:
    mean = round(Fraction(int(row.astype(np.int64).sum()), row.size))  # half to even, as torch.round
    return sum(((int(v) - mean) >> shift) ** 2 for v in row)


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(layernorm_rows(np.int8), layernorm_rows(np.int16, max_cols=16)), shift=st.integers(0, 8),
       seed=st.integers(0, 2**32 - 1))
@example(data=(np.array([[-2, 2, -11, 11, -2, 2]], np.int16), (1,)), shift=0, seed=1)  # std 16
@example(data=(np.array([[-131, 131, -125, 125], [-524, 524, -500, 500]], np.int16), (1,)), shift=1, seed=2)  # std 256, 512
def test_ibert_layernorm_matches_transformers_int_layernorm(data, shift, seed):
    """Against I-BERT's own module (transformers' IntLayerNorm), with its bias; where the sum
    of squares reaches 2^32 (I-BERT raises its shift while training) refsim asks for a larger one."""
    x, _ = data
    beta = np.random.default_rng(seed).normal(0, 0.5, x.shape[-1])
    expected, bias_int = _transformers_int_layernorm(x, shift, beta)
    variances = [_ibert_variance(row, shift) for row in x]
    if max(variances) >= 2**32:
        with pytest.raises(OpError, match="raise shift"):
            ops.IBertLayerNorm(x, bias_int, shift=shift)
        return
    got = ops.IBertLayerNorm(x, bias_int, shift=shift)
    # std = 0 (every (d >> shift) is 0): I-BERT divides by zero (2^31 / 0 = inf, then NaN or
    # +-inf); refsim divides by max(std, 1), docs/OPS.md. Compare the other rows.
    kept = [i for i, v in enumerate(variances) if v > 0]
    np.testing.assert_array_equal(got[kept], expected[kept])


def test_ibert_layernorm_wants_a_shift_when_the_variance_reaches_2_to_32():
    x = np.tile(np.array([-32768, 32767], np.int16), 8)  # 16 * 32767.5^2 > 2^32
    with pytest.raises(OpError, match="raise shift"):
        both(ops.IBertLayerNorm, x)
    both(ops.IBertLayerNorm, x, shift=2)


# --- iNoNorm and NoNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    x=hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=st.integers(-128, 127)),
    per_channel=st.booleans(),
    mul=st.integers(-(2**20), 2**20),
    log2_d=st.integers(0, 40),
    overflow=st.sampled_from(["saturate", "wrap"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_i_nonorm_matches_torch(backend_name, x, per_channel, mul, log2_d, overflow, seed):
    rng = np.random.default_rng(seed)
    shape = (x.shape[-1],) if per_channel else (1,)
    w = rng.integers(-128, 128, shape).astype(np.int8)
    b = rng.integers(-(2**20), 2**20, shape).astype(np.int32)
    got = run(ops.iNoNorm, x, w, b, backend_name=backend_name, D=2**log2_d, mul=mul, overflow=overflow)
    y = T.i_nonorm(torch.as_tensor(x.astype(np.int64)), torch.as_tensor(w.astype(np.int64)),
                   torch.as_tensor(b.astype(np.int64)), mul, log2_d)
    y = torch.clamp(y, -128, 127) if overflow == "saturate" else (y + 128) % 256 - 128
    assert_matches(got, y)


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    x=hnp.arrays(np.int16, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8), elements=st.integers(-32768, 32767)),
    seed=st.integers(0, 2**32 - 1),
)
def test_nonorm_matches_torch(backend_name, x, seed):
    rng = np.random.default_rng(seed)
    gamma = rng.integers(-128, 128, x.shape[-1]).astype(np.int8)
    beta = rng.integers(-(2**24), 2**24, x.shape[-1]).astype(np.int32)
    got = run(ops.NoNorm, x, gamma, beta, backend_name=backend_name)
    assert got.dtype == np.int32
    assert_matches(got, T.nonorm(torch.as_tensor(x.astype(np.int64)), torch.as_tensor(gamma.astype(np.int64)),
                                 torch.as_tensor(beta.astype(np.int64))))


def test_nonorms_hand_worked():
    # iNoNorm, mul 3, D 4: (3*5 + 1)*3 = 48 >> 2 = 12; (-2*7 - 1)*3 = -45 >> 2 = -12 (floor -11.25).
    x = np.array([3, -2], np.int8)
    got = both(ops.iNoNorm, x, np.array([5, 7], np.int8), np.array([1, -1], np.int32), D=4, mul=3)
    assert got.tolist() == [12, -12]
    # NoNorm: 3*5 + 1 = 16, -2*7 - 1 = -15.
    assert both(ops.NoNorm, x, np.array([5, 7]), np.array([1, -1])).tolist() == [16, -15]
    with pytest.raises(AccumulatorOverflow):
        both(ops.NoNorm, x, np.array([5, 7]), np.array([1, -1]), dtype="int4")


# --- long rows, rows of one, all-equal rows, graph types ---------------------------------------------


def test_long_short_and_constant_rows():
    rng = np.random.default_rng(11)
    w, b = rng.integers(-(2**20), 2**20, 4096).astype(np.int32), rng.integers(-(2**20), 2**20, 4096).astype(np.int32)
    x = rng.integers(-128, 128, (2, 4096)).astype(np.int8)
    x[0, :2] = (-128, 127)
    expected = T.i_layernorm(rows(x), torch.as_tensor(w.astype(np.int64)), torch.as_tensor(b.astype(np.int64)), 12, -128, 127, "saturate")
    assert_matches(both(ops.iLayerNorm, x, w, b, D=2**12), expected)
    assert_matches(both(ops.IBertLayerNorm, x, b.astype(np.int64)), T.ibert_layernorm(rows(x), torch.as_tensor(b.astype(np.int64)), 0))
    # A row of one and a constant row: d = 0 everywhere, so y = bias >> log2(D) (iLayerNorm: std = isqrt(0 + 1) = 1)
    # and y = bias (I-BERT: var 0, std taken as 1, d*factor = 0).
    for x in (np.array([[-128], [127]], np.int8), np.full((2, 50), 77, np.int8)):
        n = x.shape[-1]
        assert both(ops.iLayerNorm, x, np.array([1000]), np.array([96]), D=32).tolist() == [[3] * n] * 2
        assert both(ops.IBertLayerNorm, x, np.array([-5])).tolist() == [[-5] * n] * 2


@pytest.mark.parametrize("name, params", [
    ("iLayerNorm", dict(D=2**10)),
    ("IBertLayerNorm", dict(shift=0)),
    ("iNoNorm", dict(D=2**10, mul=37)),
    ("NoNorm", dict()),
])
def test_graph_types_agree_with_the_op(name, params):
    b = GraphBuilder(name)
    x = b.input("x", "int8", ["batch", 8])
    consts = {"iLayerNorm": [(np.arange(8) * 100, "int32"), (np.arange(8), "int32")],
              "IBertLayerNorm": [(np.arange(8), "int64")],
              "iNoNorm": [(np.arange(8) - 4, "int8"), (np.arange(8) * 7, "int32")],
              "NoNorm": [(np.arange(8) - 4, "int8"), (np.arange(8) * 7, "int32")]}[name]
    inputs = [x] + [b.const(values, dtype) for values, dtype in consts]
    b.output(b.node(name, inputs, **params))
    feeds = {"x": np.random.default_rng(5).integers(-128, 128, (3, 8)).astype(np.int8)}
    out = next(iter(b.model().run(feeds).values()))
    expected = getattr(ops, name)(feeds["x"], *[np.asarray(v).astype(d) for v, d in consts], **params)
    np.testing.assert_array_equal(out, expected)
