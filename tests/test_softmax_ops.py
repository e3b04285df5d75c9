"""Integer softmax ops: exact agreement with the torch references, hand-worked cases, edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch_nonlinear as T
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nonlinear_helpers import BACKENDS, assert_matches, both, keep_rows, rows, run
from refsim import GraphBuilder, ops
from refsim.errors import AccumulatorOverflow, OpError

TFLITE_005 = dict(input_multiplier=1717986944, input_left_shift=22, diff_min=-496)  # S = 0.05, worked out in test_nonlinear_export
ISOFT = dict(coeffA=1, coeffB=27, coeffC=384, log2=20)  # quantlib's constants for S = 0.05
IBERT_01 = dict(x0_int=-7, b_int=27, c_int=279, exp_mul=1968898441, exp_shift=54)  # I-BERT's for S = 0.1


@st.composite
def int_rows(draw, dtype=np.int8, max_rows=4, max_cols=40, masked=True):
    """A (rows, cols) integer array, and a keep-mask of the same or a broadcast shape, or None."""
    r, c = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    info = np.iinfo(dtype)
    x = draw(hnp.arrays(dtype, (r, c), elements=st.integers(int(info.min), int(info.max))))
    if not masked or draw(st.booleans()):
        return x, None
    shape = draw(st.sampled_from([(r, c), (1, c)]))
    return x, draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 1)))


def check_against(result_or_error, expected, out_dtype):
    """expected None (the formula divides by zero or overflows) or out of range: refsim raised."""
    if expected is None or int(expected.min()) < np.iinfo(out_dtype).min or int(expected.max()) > np.iinfo(out_dtype).max:
        assert isinstance(result_or_error, OpError), result_or_error
        return
    assert not isinstance(result_or_error, Exception), result_or_error
    assert result_or_error.dtype == out_dtype
    assert_matches(result_or_error, expected)


def attempt(op, *args, backend_name, **attrs):
    try:
        return run(op, *args, backend_name=backend_name, **attrs)
    except OpError as e:
        return e


# --- ITAMax / ITAPartialMax ------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    data=int_rows(),
    k=st.integers(0, 6),
    numerator=st.one_of(st.none(), st.integers(1, 255 * 256)),
    offset=st.sampled_from([0, -128]),
)
def test_ita_max_matches_torch(backend_name, data, k, numerator, offset):
    x, mask = data
    got = attempt(ops.ITAMax, x, mask, backend_name=backend_name, k=k, numerator=numerator, output_offset=offset)
    expected = T.ita_max(rows(x), keep_rows(mask, x.shape), k, numerator or 255 * 256, offset)
    check_against(got, expected, np.uint8 if offset == 0 else np.int8)


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    data=int_rows(max_cols=70),
    group_width=st.integers(1, 20),
    k=st.integers(0, 6),
    numerator=st.one_of(st.none(), st.integers(1, 255 * 256)),
    max_init=st.one_of(st.sampled_from([-128, -127]), st.integers(-128, 127)),
    offset=st.sampled_from([0, -128]),
    acc_bits=st.integers(9, 32),
    overflow=st.sampled_from(["error", "wrap", "saturate"]),
)
def test_ita_partial_max_matches_torch(backend_name, data, group_width, k, numerator, max_init, offset, acc_bits, overflow):
    x, mask = data
    attrs = dict(group_width=group_width, k=k, numerator=numerator, max_init=max_init,
                 output_offset=offset, acc_bits=acc_bits, overflow=overflow)
    got = attempt(ops.ITAPartialMax, x, mask, backend_name=backend_name, **attrs)
    expected = T.ita_partial_max(rows(x), keep_rows(mask, x.shape), group_width, k, numerator or 127 * 256,
                                 max_init, offset, acc_bits, overflow)
    check_against(got, expected, np.uint8 if offset == 0 else np.int8)


def test_ita_max_hand_worked():
    # k=5: rs(d) = (d + 16) >> 5. x = [0, -16, -32, -48]: m = 0, diffs 0, 16, 32, 48,
    # shifts 0, 1, 1, 2 (48+16 = 64 -> 2). S = 256 + 128 + 128 + 64 = 576.
    # inv = 65280 // 576 = 113 (576*113 = 65088 <= 65280 < 65664 = 576*114).
    # y = 113 >> [0, 1, 1, 2] = [113, 56, 56, 28].
    x = np.array([0, -16, -32, -48], np.int8)
    assert both(ops.ITAMax, x).tolist() == [113, 56, 56, 28]
    # Deeploy stores y - 128 as int8:
    assert both(ops.ITAMax, x, output_offset=-128).tolist() == [-15, -72, -72, -100]
    # k=0 (ITA RTL): x = [5, 4, 2] -> shifts 0, 1, 3; S = 256 + 128 + 32 = 416;
    # inv = 65280 // 416 = 156 (416*156 = 64896); y = [156, 78, 19].
    assert both(ops.ITAMax, np.array([5, 4, 2], np.int8), k=0).tolist() == [156, 78, 19]
    # A masked 100 takes no part and outputs 0.
    got = both(ops.ITAMax, np.array([5, 4, 2, 100], np.int8), np.array([1, 1, 1, 0]), k=0)
    assert got.tolist() == [156, 78, 19, 0]


def pyita_fast_softmax(x: np.ndarray) -> np.ndarray:
    """PyITA's `fastSoftmax` (integerize=True), written from its arithmetic: with B = 8 and
    range_scale 32 its eps_max is 1, so shift = floor(max - x + 0.5 + eps32) = max - x; the sum
    floor(sum(2^8 / 2^shift)) is taken in float64; inv = floor((2^8 - 1) * 2^8 / sum);
    y = floor(inv / 2^shift), cast to int8 (wrapping, as from its float64 values)."""
    shift = (x.max(axis=-1, keepdims=True) - x).astype(np.int64)
    total = np.floor(np.sum(2.0**8 / 2.0**shift, axis=-1, keepdims=True))
    inv = np.floor((2**8 - 1) * 2**8 / total)
    return np.floor(inv / 2.0**shift).astype(np.int64).astype(np.int8)


ITA_RTL = ops.softmax.ITA_PRESETS["ita_rtl"]


@given(hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 40)), elements=st.integers(0, 8)),
       st.integers(-120, 127))
def test_ita_max_agrees_with_pyita_fast_softmax_on_rows_spanning_at_most_8(offsets, top):
    x = (top - offsets).astype(np.int8)  # every entry within 8 of its row's maximum (which may sit below top)
    got = ops.ITAMax(x, k=ITA_RTL["k"], numerator=ITA_RTL["numerator"])
    np.testing.assert_array_equal(got.view(np.int8), pyita_fast_softmax(x))


def test_ita_max_differs_from_pyita_fast_softmax_where_dropped_fractions_add_up():
    """docs/OPS.md: on rows spanning 9 or more, fastSoftmax's float sum can exceed refsim's."""
    x = np.array([[0, -9, -9], [0, -9, 0]], np.int8)
    got = ops.ITAMax(x, k=ITA_RTL["k"], numerator=ITA_RTL["numerator"])
    assert got.tolist() == [[255, 0, 0], [127, 0, 127]]  # S = 256: inv 255; S = 512: inv 127
    assert pyita_fast_softmax(x).view(np.uint8).tolist() == [[254, 0, 0], [127, 0, 127]]  # S = 257, then 512.5 -> 512
    # a single far entry adds only 1/2: both sum 256
    one_far = np.array([[0, -9]], np.int8)
    assert ops.ITAMax(one_far, k=0, numerator=255 * 256).view(np.int8).tolist() == pyita_fast_softmax(one_far).tolist() == [[-1, 0]]


def test_ita_partial_max_hand_worked():
    # group_width 2, k=0, numerator 255*256, x = [1, 3 | 4, 0]:
    # group 0: c = 3 > -128: s = 131 (acc 0 stays 0), gmax = 3, acc = (256 >> 2) + (256 >> 0) = 320.
    # group 1: c = 4 > 3: s = 1, gmax = 4, acc = (320 >> 1) + (256 >> 0) + (256 >> 4) = 160 + 256 + 16 = 432.
    # inv = 65280 // 432 = 151 (432*151 = 65232); y = 151 >> [3, 1, 0, 4] = [18, 75, 151, 9].
    x = np.array([1, 3, 4, 0], np.int8)
    assert both(ops.ITAPartialMax, x, group_width=2, k=0, numerator=255 * 256).tolist() == [18, 75, 151, 9]
    # Streaming rounds differently from ITAMax. group_width 1, k=5, default numerator 127*256 = 32512,
    # x = [0, 16, 32]: g0 acc = 256 (gmax 0); g1: s = rs(16) = 1, acc = 128 + 256 = 384 (gmax 16);
    # g2: s = 1, acc = 192 + 256 = 448 (gmax 32). inv = 32512 // 448 = 72 (448*72 = 32256);
    # shifts rs(32) = 1, rs(16) = 1, 0: y = [36, 36, 72].
    x = np.array([0, 16, 32], np.int8)
    assert both(ops.ITAPartialMax, x, group_width=1).tolist() == [36, 36, 72]
    # ITAMax on the same row with that numerator: S = 128 + 128 + 256 = 512, inv = 63: [31, 31, 63].
    assert both(ops.ITAMax, x, numerator=127 * 256).tolist() == [31, 31, 63]


def test_ita_partial_max_accumulator_policies():
    # group_width 1, k=0, numerator 255*256, x = [0, 0, 0], 9-bit accumulator (max 511):
    # acc 256, then 512 (overflow), then +256.
    x = np.zeros(3, np.int8)
    attrs = dict(group_width=1, k=0, numerator=255 * 256, acc_bits=9)
    with pytest.raises(AccumulatorOverflow, match="row 0, group 1"):
        both(ops.ITAPartialMax, x, **attrs)
    # wrap: 512 -> 0, then 256; inv = 65280 // 256 = 255.
    assert both(ops.ITAPartialMax, x, overflow="wrap", **attrs).tolist() == [255, 255, 255]
    # saturate: 511, then 511; inv = 65280 // 511 = 127 (511*127 = 64897).
    assert both(ops.ITAPartialMax, x, overflow="saturate", **attrs).tolist() == [127, 127, 127]
    # Two columns wrap to an accumulator of exactly 0: the division is refused.
    with pytest.raises(OpError, match="accumulator is 0"):
        both(ops.ITAPartialMax, np.zeros(2, np.int8), overflow="wrap", **attrs)


def test_ita_partial_max_masked_group_changes_nothing():
    # group_width 2; the middle group is fully masked: the result equals the row without it.
    x = np.array([3, 1, 127, 127, 0, 2], np.int8)
    mask = np.array([1, 1, 0, 0, 1, 1])
    got = both(ops.ITAPartialMax, x, mask, group_width=2, numerator=255 * 256)
    alone = both(ops.ITAPartialMax, np.array([3, 1, 0, 2], np.int8), group_width=2, numerator=255 * 256)
    assert got.tolist() == [alone[0], alone[1], 0, 0, alone[2], alone[3]]


def test_ita_partial_max_groups_attribute_is_checked():
    x = np.zeros((2, 32), np.int8)
    both(ops.ITAPartialMax, x, groups=2)
    with pytest.raises(OpError, match="groups=3"):
        both(ops.ITAPartialMax, x, groups=3)


# --- iSoftmax -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    data=int_rows(),
    coeffA=st.integers(0, 4),
    coeffB=st.integers(-50, 300),
    coeffC=st.integers(0, 100_000),
    log2=st.integers(1, 64),
    n_levels=st.integers(2, 256),
)
def test_i_softmax_matches_torch(backend_name, data, coeffA, coeffB, coeffC, log2, n_levels):
    x, mask = data
    attrs = dict(coeffA=coeffA, coeffB=coeffB, coeffC=coeffC, log2=log2, n_levels=n_levels)
    got = attempt(ops.iSoftmax, x, mask, backend_name=backend_name, **attrs)
    expected = T.i_softmax(rows(x), keep_rows(mask, x.shape), coeffA, coeffB, coeffC, log2, n_levels)
    check_against(got, expected, np.uint8)


def test_i_softmax_hand_worked():
    # coeffA 1, coeffB 4, coeffC 2, log2 3; x = [0, -3, -7]: d = 0, -3, -7;
    # z = 0, 1, 2 (7 // 3); p = 0, 0, -1; y = 18 >> 0, 18 >> 1, ((3)^2 + 2) >> 2 = 18, 9, 2; sum 29.
    # out = 255*y // 29 = 4590 // 29, 2295 // 29, 510 // 29 = 158, 79, 17.
    got = both(ops.iSoftmax, np.array([0, -3, -7], np.int8), coeffA=1, coeffB=4, coeffC=2, log2=3)
    assert got.tolist() == [158, 79, 17]


# --- IBertSoftmax --------------------------------------------------------------------------------


@st.composite
def ibert_softmax_attrs(draw):
    n = draw(st.integers(0, 30))
    exp_shift = draw(st.integers(0, 70))
    # Keep z*exp_mul (z < 2^18 here), shifted left by n - exp_shift when positive, inside int64.
    mul_bits = 31 if exp_shift >= n else max(0, 44 - (n - exp_shift))
    return dict(
        x0_int=draw(st.integers(-100, -1)),
        b_int=draw(st.integers(-10, 300)),
        c_int=draw(st.integers(-10, 100_000)),
        n=n,
        exp_mul=draw(st.integers(0, min(2**mul_bits, 2**31 - 1))),
        exp_shift=exp_shift,
        exp_bit=draw(st.integers(2, 16)),
        output_bit=draw(st.integers(1, 16)),
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(data=st.one_of(int_rows(np.int8), int_rows(np.int16), int_rows(np.int32, max_cols=12)), attrs=ibert_softmax_attrs())
def test_ibert_softmax_matches_torch(backend_name, data, attrs):
    x, mask = data
    got = attempt(ops.IBertSoftmax, x, mask, backend_name=backend_name, **attrs)
    expected = T.ibert_softmax(rows(x), keep_rows(mask, x.shape), **attrs)
    out_dtype = np.uint8 if attrs["output_bit"] < 8 else (np.uint16 if attrs["output_bit"] < 16 else np.uint32)
    check_against(got, expected, out_dtype)


def test_ibert_softmax_hand_worked():
    # x0 -4, b 10, c 30, n 3, exp_mul 1, exp_shift 3: e16 = round_half_even(z / 2^q).
    # x = [0, -5, -9, -40]: d clamps at n*x0 = -12 -> 0, -5, -9, -12; q = d // -4 = 0, 1, 2, 3;
    # r = d + 4q = 0, -1, -1, 0; z = (r + 10)*r + 30 = 30, 21, 21, 30;
    # e16 = 30, 21/2 = 10.5 -> 10 (even), 21/4 = 5.25 -> 5, 30/8 = 3.75 -> 4; sum 49.
    # factor = 2^32 // 49 = 87652393; out = (e*factor) >> 24 = 156, 52, 26, 20.
    got = both(ops.IBertSoftmax, np.array([0, -5, -9, -40], np.int8),
               x0_int=-4, b_int=10, c_int=30, n=3, exp_mul=1, exp_shift=3)
    assert got.dtype == np.uint16
    assert got.tolist() == [156, 52, 26, 20]


def test_ibert_softmax_left_shift_path():
    # exp_shift 0 < n - q: e16 = z * exp_mul << (n - q). n 2, x0 -4, b 0, c 1, exp_mul 1:
    # x = [0, -4]: q = 0, 1; r = 0, 0; z = 1, 1; e16 = 1 << 2, 1 << 1 = 4, 2; sum 6;
    # factor = 2^32 // 6 = 715827882; out = (e*factor) >> 24: 2863311528 >> 24 = 170, 1431655764 >> 24 = 85.
    got = both(ops.IBertSoftmax, np.array([0, -4], np.int8), x0_int=-4, b_int=0, c_int=1, n=2, exp_mul=1, exp_shift=0)
    assert got.tolist() == [170, 85]


# --- TFLiteSoftmax --------------------------------------------------------------------------------


@st.composite
def tflite_attrs(draw):
    left_shift = draw(st.integers(0, 31))
    radius = (31 << 26) >> left_shift
    return dict(
        input_multiplier=draw(st.integers(1 << 30, (1 << 31) - 1)),
        input_left_shift=left_shift,
        diff_min=-draw(st.integers(0, min(radius, 300))),
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(data=int_rows(), attrs=tflite_attrs())
def test_tflite_softmax_matches_torch(backend_name, data, attrs):
    x, mask = data
    got = attempt(ops.TFLiteSoftmax, x, mask, backend_name=backend_name, **attrs)
    expected = T.tflite_softmax(rows(x), keep_rows(mask, x.shape), **attrs)
    check_against(got, expected, np.int8)


def test_tflite_softmax_hand_worked():
    # d = 0 gives exp = 2^31 - 1 (gemmlowp's special case), RDBPOT(2^31 - 1, 12) = 2^19.
    # N equal values: sum = N * 2^19 = 2^(19+j) for N = 2^j, h = 12 - j, (sum << h) - 2^31 = 0,
    # so 1/(1+0) leaves the scale within 2^-20 of 1 (three Newton steps from 32/17), and
    # out = RDBPOT(~2^31, 23 + j) - 128 = 2^(8-j) - 128, clipped at 127.
    for n, expected in ((1, 127), (2, 0), (4, -64), (8, -96), (256, -127)):
        assert both(ops.TFLiteSoftmax, np.full(n, 7, np.int8), **TFLITE_005).tolist() == [expected] * n
    # 512 equal values: 2^(8-9) = 1/2 rounds (from just below) to 0: every output -128.
    assert set(both(ops.TFLiteSoftmax, np.full(512, 7, np.int8), **TFLITE_005).tolist()) == {-128}
    # A difference below diff_min is skipped and outputs -128: with diff_min = -3 the row
    # [0, -4] has one usable value, exactly as the row [0].
    got = both(ops.TFLiteSoftmax, np.array([0, -4], np.int8), input_multiplier=1 << 30, input_left_shift=20, diff_min=-3)
    assert got.tolist() == [127, -128]


def test_tflite_softmax_refuses_int32_overflow_of_the_sum():
    # 4096 equal values: the Q12.19 sum is 4096 * 2^19 = 2^31, past int32.
    with pytest.raises(OpError, match="Q12.19 sum"):
        both(ops.TFLiteSoftmax, np.zeros((1, 4096), np.int8), **TFLITE_005)


def test_tflite_softmax_takes_int8_only():
    with pytest.raises(OpError, match="int8"):  # values beyond int8; int16 values that fit are taken (issue 17)
        ops.TFLiteSoftmax(np.array([0, 0, -300, 0], np.int16), **TFLITE_005)
    np.testing.assert_array_equal(ops.TFLiteSoftmax(np.zeros(4, np.int16), **TFLITE_005),
                                  ops.TFLiteSoftmax(np.zeros(4, np.int8), **TFLITE_005))


# --- all variants: edges -----------------------------------------------------------------------

VARIANTS = {
    "ITAMax": (ops.ITAMax, {}, lambda x, keep: T.ita_max(x, keep, 5, 255 * 256, 0)),
    "ITAPartialMax": (ops.ITAPartialMax, {}, lambda x, keep: T.ita_partial_max(x, keep, 16, 5, 127 * 256, -128, 0, 32, "error")),
    "iSoftmax": (ops.iSoftmax, ISOFT, lambda x, keep: T.i_softmax(x, keep, n_levels=256, **ISOFT)),
    "IBertSoftmax": (ops.IBertSoftmax, IBERT_01, lambda x, keep: T.ibert_softmax(x, keep, n=30, exp_bit=16, output_bit=8, **IBERT_01)),
    "TFLiteSoftmax": (ops.TFLiteSoftmax, TFLITE_005, lambda x, keep: T.tflite_softmax(x, keep, **TFLITE_005)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_full_int8_range_long_and_short_rows(name):
    op, attrs, reference = VARIANTS[name]
    rng = np.random.default_rng(7)
    for shape in ((3, 4096), (64, 1), (6, 7, 33)):
        x = rng.integers(-128, 128, shape).astype(np.int8)
        x.reshape(-1)[:2] = (-128, 127)
        mask = rng.integers(0, 4, shape[:-2] + (1, shape[-1])) > 0 if len(shape) > 2 else None
        got = both(op, x, mask, **attrs)
        assert_matches(got, reference(rows(x), keep_rows(mask, x.shape)))


@pytest.mark.parametrize("name", VARIANTS)
def test_fully_masked_rows_output_probability_zero(name):
    op, attrs, _ = VARIANTS[name]
    x = np.arange(24, dtype=np.int8).reshape(2, 12)
    mask = np.array([[1] * 12, [0] * 12])
    got = both(op, x, mask, **attrs)
    zero = -128 if name == "TFLiteSoftmax" else 0
    assert got[1].tolist() == [zero] * 12
    assert got[0].tolist() == both(op, x[:1], **attrs)[0].tolist()


def test_rows_of_one_and_all_equal_rows():
    one = np.array([[-128], [0], [127]], np.int8)
    # A row of one: S = 256, 65280 // 256 = 255; ITAPartialMax's default numerator 127*256 gives 127;
    # iSoftmax: y*255 // y = 255; TFLite: 1.0 saturates at 127.
    assert both(ops.ITAMax, one).tolist() == [[255]] * 3
    assert both(ops.ITAPartialMax, one).tolist() == [[127]] * 3
    assert both(ops.iSoftmax, one, **ISOFT).tolist() == [[255]] * 3
    assert both(ops.TFLiteSoftmax, one, **TFLITE_005).tolist() == [[127]] * 3
    # I-BERT: (e * (2^32 // e)) >> 24 = 255 unless e divides 2^32.
    assert both(ops.IBertSoftmax, one, **IBERT_01).tolist() == [[255]] * 3
    # N equal values: ITAMax 65280 // (256 N) = 255 // N; ITAPartialMax 127 // N; iSoftmax 255 // N.
    for n in (5, 16, 100, 4096):
        row = np.full((1, n), -9, np.int8)
        assert set(both(ops.ITAMax, row).reshape(-1).tolist()) == {255 // n}
        assert set(both(ops.ITAPartialMax, row).reshape(-1).tolist()) == {127 // n}
        assert set(both(ops.iSoftmax, row, **ISOFT).reshape(-1).tolist()) == {255 // n}


def test_mask_must_broadcast():
    with pytest.raises(OpError, match="does not broadcast"):
        ops.ITAMax(np.zeros((2, 4), np.int8), np.ones((3, 4)))


@pytest.mark.parametrize("name", VARIANTS)
def test_graph_types_agree_with_the_op(name):
    """Declared output types from `infer` match what the op returns (the engine checks)."""
    op, attrs, _ = VARIANTS[name]
    b = GraphBuilder(name)
    x = b.input("x", "int8", ["batch", "seq", "seq"])
    m = b.input("m", "uint8", ["batch", 1, "seq"])
    b.output(b.node(name, [x, m], **attrs))
    model = b.model()
    rng = np.random.default_rng(3)
    feeds = dict(x=rng.integers(-128, 128, (2, 16, 16)).astype(np.int8), m=rng.integers(0, 2, (2, 1, 16)).astype(np.uint8))
    out = next(iter(model.run(feeds).values()))
    np.testing.assert_array_equal(out, op(feeds["x"], feeds["m"], **attrs))

