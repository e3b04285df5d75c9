"""The AMX GEMM kernel: exact against int64 for every shape and operand range it accepts,
and MatMul gives the same integers with AMX on and off."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from refsim import GraphBuilder
from refsim.kernels import cpu
from refsim.kernels.gemm import AmxWeight

needs_amx = pytest.mark.skipif(not cpu.amx_usable(), reason="AMX int8 not usable on this machine")

RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "ternary": (-1, 1), "int2": (-2, 1)}


@needs_amx
@given(
    m=st.integers(1, 70), k=st.integers(1, 200), n=st.integers(1, 70),
    a_type=st.sampled_from(["int8", "uint8", "int4"]), b_type=st.sampled_from(["int8", "int4", "ternary", "int2"]),
    zero_point=st.integers(-8, 8), with_bias=st.booleans(), extremes=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_amx_weight_is_exact(m, k, n, a_type, b_type, zero_point, with_bias, extremes, seed):
    rng = np.random.default_rng(seed)
    alo, ahi = RANGES[a_type]
    blo, bhi = RANGES[b_type]
    a = rng.integers(alo, ahi + 1, (m, k))
    b = rng.integers(blo, bhi + 1, (k, n))
    if extremes:  # the corners where a sum is largest
        a[: m // 2 + 1] = alo
        b[:, : n // 2 + 1] = blo
    bias = rng.integers(-(1 << 20), 1 << 20, n) if with_bias else None
    weight = AmxWeight.prepare(b)
    assert weight is not None
    assert weight.fits_int32(alo, ahi, zero_point, 1 << 20)
    storage = np.uint8 if alo >= 0 else np.int8
    got = weight.matmul(a.astype(storage), alo, zero_point, bias)
    expected = (a - zero_point) @ b + (0 if bias is None else bias)
    assert got.dtype == np.int32
    assert np.array_equal(got, expected)


@needs_amx
def test_amx_refuses_what_int32_cannot_hold():
    weight = AmxWeight.prepare(np.full((70000, 2), -128))
    assert not weight.fits_int32(-128, 127, 0, 0)
    assert AmxWeight.prepare(np.full((4, 4), 200)) is None  # weights beyond int8


def _matmul_model(rng, k, n):
    b = GraphBuilder("mm")
    x = b.input("x", "int8", ["batch", k])
    w = b.const(rng.integers(-128, 128, (k, n)), "int8", name="w")
    bias = b.const(rng.integers(-5000, 5000, n), "int32", name="bias")
    b.output(b.node("MatMul", [x, w, None, None, bias], outputs="y"))
    return b.model()


def test_matmul_same_integers_with_and_without_amx(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.integers(-128, 128, (33, 1500)).astype(np.int8)
    x[0] = -128
    rng_model = np.random.default_rng(6)
    with_amx = _matmul_model(rng_model, 1500, 96).run({"x": x})["y"]
    monkeypatch.setenv("REFSIM_GEMM", "blas")
    assert not cpu.amx_usable()
    rng_model = np.random.default_rng(6)
    model = _matmul_model(rng_model, 1500, 96)
    without = model.run({"x": x})["y"]
    w = model.graph.tensors["w"].data.astype(np.int64)
    expected = x.astype(np.int64) @ w + model.graph.tensors["bias"].data
    assert np.array_equal(with_amx, expected)
    assert np.array_equal(without, expected)
