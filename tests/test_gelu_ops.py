"""Integer GELU ops: exact agreement with the torch references, hand-worked cases, types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_nonlinear as T
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from nonlinear_helpers import BACKENDS, assert_matches, both, run
from refsim import GraphBuilder, ops
from refsim.errors import GraphError, OpError

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)


def int_arrays(dtype, max_side=12):
    info = np.iinfo(dtype)
    return hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=3, max_side=max_side),
                      elements=st.integers(int(info.min), int(info.max)))


def tensor(x):
    return torch.as_tensor(np.asarray(x).astype(np.int64))


# --- iGELU and RequantizediGELU -----------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(x=int_arrays(np.int8), b=st.integers(-128, 0), one=st.integers(-32768, 32767))
def test_i_gelu_matches_torch(backend_name, x, b, one):
    got = run(ops.iGELU, x, backend_name=backend_name, b=b, one=one)
    assert got.dtype == np.int32 and got.shape == x.shape
    assert_matches(got, T.i_gelu(tensor(x), b, one))


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    x=int_arrays(np.int8),
    b=st.integers(-128, 0),
    one=st.integers(0, 32767),
    mul=st.integers(-(2**15), 2**15),
    add=st.integers(-(2**20), 2**20),
    shift=st.integers(0, 40),
    levels=st.sampled_from([(256, True), (256, False), (16, True), (2**16, True)]),
)
def test_requantized_i_gelu_matches_torch(backend_name, x, b, one, mul, add, shift, levels):
    n_levels, signed = levels
    lo, hi = (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)
    got = run(ops.RequantizediGELU, x, np.array([mul]), np.array(add), np.array([shift], np.int32),
              backend_name=backend_name, b=b, one=one, div=2**shift, n_levels=n_levels, signed=signed)
    assert_matches(got, T.requantized_i_gelu(tensor(x), mul, add, shift, b, one, lo, hi))


def test_i_gelu_hand_worked():
    # b = -3, one = 10: d = min(|x|, 3) - 3; L = sgn(x)*(10 - d^2); y = x*((10 + L) >> 1).
    # x=-5: d=0, L=-10, 0 -> 0;   x=-2: d=-1, L=-9, 1>>1 = 0 -> 0;   x=-1: d=-2, L=-6, 4>>1 = 2 -> -2;
    # x=0: L=0, 5 -> 0;           x=1: L=6, 16>>1 = 8 -> 8;          x=2: L=9, 19>>1 = 9 -> 18;
    # x=5: L=10, 10 -> 50.
    x = np.array([-5, -2, -1, 0, 1, 2, 5], np.int8)
    assert both(ops.iGELU, x, b=-3, one=10).tolist() == [0, 0, -2, 0, 8, 18, 50]
    # Fused requant, mul 3, add 1, shift 2: 3y + 1 = 1, 1, -5, 1, 25, 55, 151;
    # (v + 2) >> 2 = 0, 0, -1, 0, 6, 14, 38.
    got = both(ops.RequantizediGELU, x, np.array([3]), np.array([1]), np.array([2]), b=-3, one=10, div=4)
    assert got.dtype == np.int8
    assert got.tolist() == [0, 0, -1, 0, 6, 14, 38]


def test_requantized_i_gelu_checks_its_inputs():
    x = np.zeros(3, np.int8)
    with pytest.raises(OpError, match="div=8 disagrees"):
        ops.RequantizediGELU(x, np.array([1]), np.array([0]), np.array([2]), b=-3, one=10, div=8)
    with pytest.raises(OpError, match="single integer"):
        ops.RequantizediGELU(x, np.array([1, 2]), np.array([0]), np.array([2]), b=-3, one=10)


def test_i_gelu_refuses_int32_overflow():
    with pytest.raises(OpError, match="int32"):
        ops.iGELU(np.array([100], np.int16), b=-30000, one=2**30)


# --- IBertGelu -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    x=st.one_of(int_arrays(np.int8), int_arrays(np.int16), int_arrays(np.int32)),
    b_int=st.integers(-(2**20), 0),
    c_int=st.integers(-(2**40), 2**20),
    n=st.integers(0, 30),
    shift_int=st.integers(-(2**20), 2**20),
)
def test_ibert_gelu_matches_torch(backend_name, x, b_int, c_int, n, shift_int):
    attrs = dict(b_int=b_int, c_int=c_int, n=n, shift_int=shift_int)
    # The output type must hold y for every input of x's type: |L| <= ((b^2 + |c|) >> n) + 1.
    # refsim.ops takes an array x's type refuses at the narrowest type holding its values
    # (issue 17), so the bound is that type's.
    fits = [t for t in (np.int8, np.int16, np.int32)
            if np.dtype(t).itemsize <= x.dtype.itemsize and np.iinfo(t).min <= x.min() and x.max() <= np.iinfo(t).max]
    x_type = np.iinfo(fits[0] if fits else x.dtype)
    x_bound = max(-int(x_type.min), int(x_type.max))
    if x_bound * (((b_int**2 + abs(c_int)) >> n) + 1 + abs(shift_int)) > 2**63 - 1:
        with pytest.raises(OpError, match="beyond int64"):
            run(ops.IBertGelu, x, backend_name=backend_name, **attrs)
        return
    got = run(ops.IBertGelu, x, backend_name=backend_name, **attrs)
    assert_matches(got, T.ibert_gelu(tensor(x), b_int, c_int, n, shift_int))


def test_ibert_gelu_hand_worked():
    # b -3, c -10, n 1, shift_int -6: L = (sgn(x)*((min(|x|,3) - 3)^2 - 10)) >> 1; y = x*(L - 6).
    # x=-5: (-1)*(0 - 10) = 10 >> 1 = 5, -5*(5-6) = 5;   x=-1: (-1)*(4 - 10) = 6 >> 1 = 3, -1*(3-6) = 3;
    # x=0: 0;   x=2: 1*(1 - 10) = -9 >> 1 = -5, 2*(-5-6) = -22;   x=5: -10 >> 1 = -5, 5*(-11) = -55.
    got = both(ops.IBertGelu, np.array([-5, -1, 0, 2, 5], np.int8), b_int=-3, c_int=-10, n=1, shift_int=-6)
    assert got.tolist() == [5, 3, 0, -22, -55]
    # |y| <= 128 * ((9 + 10) >> 1 + 1 + 6) = 128 * 16: int16 holds it.
    assert got.dtype == np.int16


def test_ibert_gelu_type_follows_the_declared_input_type():
    b = GraphBuilder("g")
    x = b.input("x", "int4", [5])
    attrs = dict(b_int=-3, c_int=-10, n=1, shift_int=-6)
    y = b.node("IBertGelu", [x], **attrs)
    b.output(y)
    model = b.model()
    # int4: |y| <= 8 * 16 = 128 -> int16 (int8 stops at 127); the same values as a direct call.
    assert model.graph.tensors[y].dtype.name == "int16"
    xs = np.array([-8, -1, 0, 2, 7], np.int8)
    np.testing.assert_array_equal(model.run({"x": xs})[y], ops.IBertGelu(xs, **attrs))


# --- ITAGelu -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", BACKENDS)
@given(
    x=int_arrays(np.int8),
    q_b=st.integers(-181, 0),
    q_c=st.integers(-(2**15), 2**15 - 1),
    q_1=st.integers(-(2**15), 2**15 - 1),
    requant=st.one_of(st.none(), st.tuples(st.integers(-128, 127), st.integers(0, 40), st.integers(-128, 127))),
)
def test_ita_gelu_matches_torch(backend_name, x, q_b, q_c, q_1, requant):
    attrs = dict(q_1=q_1, q_b=q_b, q_c=q_c)
    if requant is not None:
        attrs.update(eps_mul=requant[0], eps_shift=requant[1], eps_add=requant[2])
    got = run(ops.ITAGelu, x, backend_name=backend_name, **attrs)
    assert got.dtype == (np.int32 if requant is None else np.int8)
    assert_matches(got, T.ita_gelu(tensor(x), **attrs))


def test_ita_gelu_hand_worked():
    # q_1 -10, q_b -3, q_c -10: q = max(x, -127); y = q*(sgn(q)*((min(|q|,3) - 3)^2 - 10) - 10).
    # x=-128: q=-127, (-1)*(0 - 10) = 10, 10 - 10 = 0 -> 0;   x=-2: (-1)*(1 - 10) = 9, -1 -> 2;
    # x=0 -> 0;   x=1: (4 - 10) - 10 = -16 -> -16;   x=4: (0 - 10) - 10 = -20 -> -80.
    x = np.array([-128, -2, 0, 1, 4], np.int8)
    assert both(ops.ITAGelu, x, q_1=-10, q_b=-3, q_c=-10).tolist() == [0, 2, 0, -16, -80]
    # Requant eps_mul -3, eps_shift 2, eps_add 1: -3y = 0, -6, 0, 48, 240; (v + 2) >> 2 = 0, -1, 0, 12, 60; +1.
    got = both(ops.ITAGelu, x, q_1=-10, q_b=-3, q_c=-10, eps_mul=-3, eps_shift=2, eps_add=1)
    assert got.tolist() == [1, 0, 1, 13, 61]


def test_ita_gelu_takes_int8():
    with pytest.raises(OpError, match="int8"):  # values beyond int8; int16 values that fit are taken (issue 17)
        ops.ITAGelu(np.array([0, 200, 0], np.int16), q_1=-10, q_b=-3, q_c=-10)
    b = GraphBuilder("g")
    x = b.input("x", "int16", [3])
    with pytest.raises(GraphError, match="int8"):
        b.node("ITAGelu", [x], q_1=-10, q_b=-3, q_c=-10)


# --- all variants: full range, both backends, graph types ----------------------------------------

VARIANTS = {
    "iGELU": (dict(b=-63, one=4328), lambda x: T.i_gelu(x, -63, 4328)),
    "IBertGelu": (dict(b_int=-63, c_int=-4329, n=0, shift_int=-4328), lambda x: T.ibert_gelu(x, -63, -4329, 0, -4328)),
    "ITAGelu": (dict(q_1=-4328, q_b=-63, q_c=-4328, eps_mul=-121, eps_shift=20),
                lambda x: T.ita_gelu(x, -4328, -63, -4328, -121, 20, 0)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_int8_input(name):
    attrs, reference = VARIANTS[name]
    x = np.tile(ALL_INT8, (3, 1))
    assert_matches(both(getattr(ops, name), x, **attrs), reference(tensor(x)))


@pytest.mark.parametrize("name", VARIANTS)
def test_graph_types_agree_with_the_op(name):
    attrs, _ = VARIANTS[name]
    b = GraphBuilder(name)
    x = b.input("x", "int8", ["batch", 256])
    b.output(b.node(name, [x], **attrs))
    feeds = {"x": np.tile(ALL_INT8, (2, 1))}
    out = next(iter(b.model().run(feeds).values()))
    np.testing.assert_array_equal(out, getattr(ops, name)(feeds["x"], **attrs))
