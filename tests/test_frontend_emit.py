"""The front end's emitter and requantization planner (exporters.frontend.emitter/requant):
names, the one bit rule, and each policy's integers checked against exact rational
arithmetic (Python fractions, independent of the planner's own float work)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim import GraphBuilder
from refsim.exporters.dyadic import ExportError
from refsim.exporters.frontend import requant as rq
from refsim.exporters.frontend.emitter import Emitter, narrowest_type


def test_unique_names_are_the_stem_then_numbered():
    b = GraphBuilder("g")
    assert [b.unique_name("x") for _ in range(3)] == ["x", "x_2", "x_3"]
    b.const(1, "int8", name="w")
    assert b.unique_name("w") == "w_2" and b.unique_name(".") == "t"


def test_emitter_names_nodes_after_their_outputs_and_reports_builder_errors():
    em = Emitter("g")
    x = em.input("x", "int8", [2])
    y = em.node("Relu", [x], "layer.relu")
    assert y == "layer.relu" and em.builder.nodes[-1].name == "layer.relu"
    assert em.node("Relu", [x], "layer.relu") == "layer.relu_2"
    with pytest.raises(ExportError, match="Relu for 'bad'"):
        em.node("Relu", ["missing"], "bad")
    assert narrowest_type([-129, 5]).name == "int16" and narrowest_type([]).name == "int8"


@pytest.mark.parametrize("bound, bits", [(127, 31), ((1 << 31) - 1, 31), (1 << 31, 30), (1 << 40, 21), (1 << 60, 8)])
def test_the_multiplier_bit_rule(bound, bits):
    """|x| * mul < 2^62: m = clamp(62 - bitlength(bound), 8, 31)."""
    assert rq.multiplier_bits(bound) == bits
    if 62 - bound.bit_length() >= 8:
        assert bound * ((1 << bits) - 1) < 1 << 62


def run(em: Emitter, out: str, feeds: dict) -> np.ndarray:
    em.builder.output(out)
    return em.builder.model().run(feeds)[out]


def round_half_even(q: Fraction) -> int:
    floor = q.numerator // q.denominator
    rest = q - floor
    return floor + (1 if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and floor % 2) else 0)


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-6, 50.0), st.integers(-20, 20), st.integers(-20, 20))
def test_dyadic_requantization_is_exactly_its_multiplier_and_shift(ratio, zp_in, zp_out):
    em = Emitter("g")
    x = em.input("x", "int16", [64])
    y = rq.requantize(em, x, ratio, bound=rq.type_bound("int16", zp_in), dtype="int8", zero_point=zp_out,
                      input_zero_point=zp_in, stem="y", what="test")
    values = np.linspace(-32768, 32767, 64).astype(np.int16)
    got = run(em, y, {"x": values})
    node = em.builder.nodes[-1]
    mul = int(em.builder.tensors[node.inputs[1]].data)
    shift = int(em.builder.tensors[node.inputs[2]].data)
    assert mul.bit_length() == rq.multiplier_bits(rq.type_bound("int16", zp_in)) or mul == 0
    for v, g in zip(values.tolist(), got.tolist()):
        want = round_half_even(Fraction((v - zp_in) * mul, 1 << shift)) + zp_out
        assert g == min(max(want, -128), 127)
    # The multiplier approximates the ratio to its bits' precision.
    assert abs(mul / 2**shift - ratio) <= ratio * 2.0 ** -(mul.bit_length() - 1)


def test_ort_requantization_replays_float32():
    em = Emitter("g")
    x = em.input("x", "int32", [5])
    ratio = np.float32(0.0123)
    y = rq.requantize(em, x, float(ratio), bound=1 << 31, dtype="uint8", policy="ort", zero_point=3, stem="y", what="t")
    assert em.builder.nodes[-1].op == "RequantF32"
    values = np.array([-1000, 0, 41, 123456, 7], np.int32)
    got = run(em, y, {"x": values})
    # onnxruntime: rne(f32(f32(acc) * f32(ratio))) + zp, saturated
    want = np.clip(np.rint((values.astype(np.float32) * ratio).astype(np.float32)) + 3, 0, 255)
    assert got.tolist() == want.astype(np.int64).tolist()


def test_ita_requantization_constants_and_limits():
    em = Emitter("g")
    x = em.input("x", "int32", [3])
    y = rq.requantize(em, x, 0.01, bound=1 << 25, policy="ita", stem="y", what="layer")
    node = em.builder.nodes[-1]
    assert node.attrs["rounding"] == "half_up" and em.builder.tensors[node.inputs[1]].dtype.name == "uint8"
    assert em.builder.tensors[node.inputs[4]].dtype.name == "int8"
    got = run(em, y, {"x": np.array([1000, -1000, 50], np.int32)})
    mul, shift = int(em.builder.tensors[node.inputs[1]].data), int(em.builder.tensors[node.inputs[2]].data)
    assert got.tolist() == [(v * mul + (1 << (shift - 1))) >> shift for v in (1000, -1000, 50)]
    with pytest.raises(ExportError, match="layer: ITA's requantizer produces int8"):
        rq.requantize(em, x, 0.01, bound=1 << 25, policy="ita", dtype="int16", stem="z", what="layer")
    with pytest.raises(ExportError, match="unsigned multiplier"):
        rq.requantize(em, x, -0.01, bound=1 << 25, policy="ita", stem="z", what="layer")
    with pytest.raises(ExportError, match="one multiplier per layer"):
        rq.requantize(em, x, [0.01, 0.02], bound=1 << 25, policy="ita", stem="z", what="layer")


def test_exact_sum_fraction_bits_follow_the_rule():
    terms = [rq.Term("a", np.array(0.7), 32767), rq.Term("b", np.array([0.01, 3.0]), 32767)]
    k = rq.sum_fraction_bits(terms, [np.array([2.5, -1.0])])
    for t in terms:  # three terms: each below 2^62 / 4, every multiplier below 2^31
        m = np.abs(np.rint(t.ratio * 2.0**k))
        assert np.all(m < 2**31) and np.all(m * t.bound < 2.0**60)
    m = np.abs(np.rint(np.array(3.0) * 2.0 ** (k + 1)))
    assert m >= 2**31  # one more bit would break the multiplier limit


def test_an_exact_sum_of_far_apart_ratios_takes_int64_multipliers():
    """MobileBERT's residual sum: an int8 feed-forward output (ratio 104) plus an int64 NoNorm
    term (ratio 2.2e-5, |x| < 2^30). int32 multipliers put the grid at k = 24, where the NoNorm
    term's multiplier has 9 bits (371) and the term is off by up to 32 output steps; the sum
    takes int64 multipliers instead, and every term stays within SUM_TOLERANCE of its real
    value and below the 62-bit bound."""
    ratios, bounds = (104.08, 2.2e-5), (128, 1 << 30)
    em = Emitter("g")
    a = em.input("a", "int8", [64])
    b = em.input("b", "int64", [64])
    terms = [rq.Term(a, np.array(ratios[0]), bounds[0]), rq.Term(b, np.array(ratios[1]), bounds[1])]
    y, _, k = rq.exact_sum(em, terms, dtype="int16", rounding="half_up", stem="y", what="t")
    assert k > 31
    for r, bound in zip(ratios, bounds):
        m = int(np.rint(r * 2.0**k))
        assert abs(Fraction(m, 1 << k) - Fraction(r)) * bound <= Fraction(rq.SUM_TOLERANCE) and m * bound < 2**61
    rng = np.random.default_rng(1)
    av = rng.integers(-128, 128, 64).astype(np.int8)
    bv = rng.integers(-(1 << 30), 1 << 30, 64).astype(np.int64)
    got = run(em, y, {"a": av, "b": bv})
    real = [Fraction(int(x)) * Fraction(ratios[0]) + Fraction(int(z)) * Fraction(ratios[1]) for x, z in zip(av, bv)]
    assert all(abs(Fraction(int(g)) - min(max(v, Fraction(-32768)), Fraction(32767))) <= Fraction(1, 2) + Fraction(rq.SUM_TOLERANCE)
               for g, v in zip(got, real))


def test_an_exact_sum_of_near_ratios_keeps_int32_multipliers():
    """Residual sums of int8 / int16 terms at ratios within a few powers of two: the int32 grid
    already keeps every term within SUM_TOLERANCE, and stays."""
    terms = [rq.Term("a", np.array(0.9), 32767), rq.Term("b", np.array(13.0), 127)]
    k = rq.sum_fraction_bits(terms)
    assert np.rint(13.0 * 2.0**k) < 2**31 <= np.rint(13.0 * 2.0 ** (k + 1))


def test_exact_sum_is_one_rounding_of_the_exact_integer_sum():
    em = Emitter("g")
    a = em.input("a", "int16", [2, 4])
    b = em.input("b", "int8", [2, 4])
    terms = [rq.Term(a, np.array(0.3), 32768), rq.Term(b, np.array([0.5, 1.0, 2.0, 0.25]), 128, zero_point=3)]
    y, (c,), k = rq.exact_sum(em, terms, [(np.array(7.25), "c")], dtype="int16", stem="y", what="t")
    rng = np.random.default_rng(0)
    av = rng.integers(-32768, 32767, (2, 4)).astype(np.int16)
    bv = rng.integers(-128, 127, (2, 4)).astype(np.int8)
    got = run(em, y, {"a": av, "b": bv})
    ma = int(np.rint(0.3 * 2**k))
    mb = np.rint(np.array([0.5, 1.0, 2.0, 0.25]) * 2**k).astype(np.int64)
    cq = int(em.builder.tensors[c].data)
    for i in range(2):
        for j in range(4):
            total = int(av[i, j]) * ma + (int(bv[i, j]) - 3) * int(mb[j]) + cq
            assert got[i, j] == min(max(round_half_even(Fraction(total, 1 << k)), -32768), 32767)
