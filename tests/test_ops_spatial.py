"""Conv, MaxPool, Pad and RequantF32 against independent torch references (docs/OPS.md).

The references are written from the formulas with torch int64 tensors (Conv, MaxPool,
Pad) or with torch's own float32 arithmetic (RequantF32, whose formula *is* float32
arithmetic), never by calling refsim.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from refsim import ops
from refsim.builder import GraphBuilder
from refsim.errors import AccumulatorOverflow, GraphError, OpError

# --- torch references ------------------------------------------------------------------


def torch_conv(x, w, x_zp, w_zp, bias, strides, pads, dilations, group):
    x = torch.tensor(x.astype(np.int64)) - int(x_zp)
    w = torch.tensor(w.astype(np.int64)) - torch.tensor(np.asarray(w_zp, np.int64)).reshape(-1, *[1] * (w.ndim - 1))
    spatial = w.dim() - 2
    widths = []
    for i in reversed(range(spatial)):  # torch's pad lists the last axis first
        widths += [pads[i], pads[spatial + i]]
    x = torch.nn.functional.pad(x, widths)
    n, c = x.shape[:2]
    m = w.shape[0]
    kernel = w.shape[2:]
    out = [(x.shape[2 + i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(spatial)]
    acc = torch.zeros((n, m, *out), dtype=torch.int64)
    cg, mg = c // group, m // group
    for mm in range(m):
        g = mm // mg
        for offset in itertools.product(*(range(k) for k in kernel)):
            index = [slice(None), slice(g * cg, (g + 1) * cg)]
            for i in range(spatial):
                start = offset[i] * dilations[i]
                index.append(slice(start, start + (out[i] - 1) * strides[i] + 1, strides[i]))
            window = x[tuple(index)]  # [n, cg, out...]
            weights = w[(mm, slice(None)) + offset].reshape(1, cg, *[1] * spatial)
            acc[:, mm] += (window * weights).sum(dim=1)
    acc += torch.tensor(np.asarray(bias, np.int64)).reshape(1, -1, *[1] * spatial)
    return acc.numpy()


def torch_maxpool(x, kernel, strides, pads, dilations, ceil_mode):
    x = torch.tensor(x.astype(np.int64))
    spatial = len(kernel)
    sizes = x.shape[2:]
    out = []
    for i in range(spatial):
        span = sizes[i] + pads[i] + pads[spatial + i] - ((kernel[i] - 1) * dilations[i] + 1)
        o = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (o - 1) * strides[i] >= sizes[i] + pads[i]:
            o -= 1
        out.append(o)
    y = torch.full((*x.shape[:2], *out), -(2**62), dtype=torch.int64)
    for position in itertools.product(*(range(o) for o in out)):
        for offset in itertools.product(*(range(k) for k in kernel)):
            source = [position[i] * strides[i] + offset[i] * dilations[i] - pads[i] for i in range(spatial)]
            if all(0 <= s < sizes[i] for i, s in enumerate(source)):
                index = (slice(None), slice(None), *position)
                y[index] = torch.maximum(y[index], x[(slice(None), slice(None), *source)])
    return y.numpy()


def _source_index(i, size, mode):
    """Where output position i (relative to the unpadded start) reads from."""
    if 0 <= i < size:
        return i
    if mode == "edge":
        return min(max(i, 0), size - 1)
    if mode == "wrap":
        return i % size
    period = 2 * (size - 1)  # reflect
    i = abs(i) % period
    return i if i < size else period - i


def torch_pad(x, pads, mode, value):
    t = torch.tensor(x.astype(np.int64))
    rank = t.dim()
    for axis in range(rank):
        begin, end = pads[axis], pads[rank + axis]
        size = t.shape[axis]
        positions = range(-begin, size + end)
        if mode == "constant":
            pieces = []
            for i in positions:
                if 0 <= i < size:
                    pieces.append(t.narrow(axis, i, 1))
                else:
                    shape = list(t.shape)
                    shape[axis] = 1
                    pieces.append(torch.full(shape, value, dtype=torch.int64))
            t = torch.cat(pieces, dim=axis) if pieces else t.narrow(axis, 0, 0)
        else:
            index = torch.tensor([_source_index(i, size, mode) for i in positions], dtype=torch.int64)
            t = torch.index_select(t, axis, index)
    return t.numpy()


# --- Conv ------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    spatial = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2]))
    cg = draw(st.integers(1, 3))
    mg = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 3)) for _ in range(spatial)]
    pads = [draw(st.integers(0, 2)) for _ in range(2 * spatial)]
    sizes = []
    for i in range(spatial):
        extent = (kernel[i] - 1) * dilations[i] + 1
        sizes.append(draw(st.integers(max(1, extent - pads[i] - pads[spatial + i]), extent + 4)))
    x_type = draw(st.sampled_from(["uint8", "int8", "int4"]))
    w_type = draw(st.sampled_from(["int8", "uint8", "int4", "ternary"]))
    seed = draw(st.integers(0, 2**32 - 1))
    extremes = draw(st.booleans())
    rng = np.random.default_rng(seed)
    lo_hi = {"uint8": (0, 255), "int8": (-128, 127), "int4": (-8, 7), "ternary": (-1, 1)}
    storage = {"uint8": np.uint8, "int8": np.int8, "int4": np.int8, "ternary": np.int8}
    xl, xh = lo_hi[x_type]
    wl, wh = lo_hi[w_type]
    n = draw(st.integers(1, 2))
    if extremes:
        x = rng.choice([xl, xh], size=(n, cg * group, *sizes))
        w = rng.choice([wl, wh], size=(mg * group, cg, *kernel))
    else:
        x = rng.integers(xl, xh + 1, size=(n, cg * group, *sizes))
        w = rng.integers(wl, wh + 1, size=(mg * group, cg, *kernel))
    x_zp = int(rng.integers(xl, xh + 1))
    w_zp = rng.integers(wl, wh + 1, size=mg * group) if draw(st.booleans()) else np.zeros(mg * group, np.int64)
    bias = rng.integers(-(2**20), 2**20, size=mg * group)
    return dict(
        x=x.astype(storage[x_type]), w=w.astype(storage[w_type]), x_zp=np.asarray(x_zp, storage[x_type]),
        w_zp=w_zp.astype(storage[w_type]), bias=bias.astype(np.int32), strides=strides, pads=pads,
        dilations=dilations, group=group, x_type=x_type, w_type=w_type,
    )


@given(conv_cases())
def test_conv_matches_torch(every_backend, case):
    expected = torch_conv(case["x"], case["w"], case["x_zp"], case["w_zp"], case["bias"],
                          case["strides"], case["pads"], case["dilations"], case["group"])
    got = ops.Conv(case["x"], case["w"], case["x_zp"], case["w_zp"], case["bias"], strides=case["strides"],
                   pads=case["pads"], dilations=case["dilations"], group=case["group"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


@given(conv_cases())
def test_conv_in_a_graph_with_prepared_weights_matches_torch(every_backend, case):
    b = GraphBuilder("conv")
    x = b.input("x", case["x_type"], case["x"].shape)
    w = b.const(case["w"], case["w_type"])
    y = b.node("Conv", [x, w, b.const(case["x_zp"], case["x_type"]), b.const(case["w_zp"], case["w_type"]),
                        b.const(case["bias"], "int32")],
               strides=case["strides"], pads=case["pads"], dilations=case["dilations"], group=case["group"])
    b.output(y)
    got = b.model().run({"x": case["x"]})[y]
    expected = torch_conv(case["x"], case["w"], case["x_zp"], case["w_zp"], case["bias"],
                          case["strides"], case["pads"], case["dilations"], case["group"])
    np.testing.assert_array_equal(got, expected)


def test_conv_hand_worked_1d():
    # x = [1, 2, 3, 4] (zero point 1 -> [0, 1, 2, 3]), w = [1, -1], pads 1 and 0, stride 2:
    # padded [0, 0, 1, 2, 3]; windows at 0 and 2: 0*1 + 0*-1 = 0 and 1*1 + 2*-1 = -1; bias 10.
    x = np.array([[[1, 2, 3, 4]]], np.uint8)
    w = np.array([[[1, -1]]], np.int8)
    got = ops.Conv(x, w, np.uint8(1), None, np.array([10], np.int32), strides=[2], pads=[1, 0])
    assert got.tolist() == [[[10, 9]]]


def test_conv_accumulator_policies():
    x = np.full((1, 1, 2, 2), 127, np.int8)
    w = np.full((1, 1, 2, 2), 127, np.int8)  # 4 * 127 * 127 = 64516, beyond 16 bits
    with pytest.raises(AccumulatorOverflow, match="Conv"):
        ops.Conv(x, w, acc_bits=16)
    assert ops.Conv(x, w, acc_bits=16, overflow="saturate").item() == 32767
    assert ops.Conv(x, w, acc_bits=16, overflow="wrap").item() == 64516 - 65536


def test_conv_rejects_bad_groups():
    b = GraphBuilder("bad")
    x = b.input("x", "int8", [1, 3, 4])
    w = b.const(np.zeros((2, 2, 1), np.int8), "int8")
    with pytest.raises(GraphError, match="groups"):
        b.node("Conv", [x, w], group=2)


# --- MaxPool ---------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    spatial = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(spatial)]
    dilations = [draw(st.integers(1, 2)) for _ in range(spatial)]
    strides = [draw(st.integers(1, 3)) for _ in range(spatial)]
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = [draw(st.integers(0, e - 1)) for e in extents] + [draw(st.integers(0, e - 1)) for e in extents]
    sizes = [draw(st.integers(e, e + 4)) for e in extents]
    dtype = draw(st.sampled_from([np.int8, np.uint8, np.int16, np.int32]))
    info = np.iinfo(dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), *sizes)
    if draw(st.booleans()):
        x = rng.choice([info.min, info.max], size=shape).astype(dtype)
    else:
        x = rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    return x, kernel, strides, pads, dilations, draw(st.booleans())


@given(pool_cases())
def test_maxpool_matches_torch(case):
    x, kernel, strides, pads, dilations, ceil_mode = case
    got = ops.MaxPool(x, kernel_shape=kernel, strides=strides, pads=pads, dilations=dilations, ceil_mode=ceil_mode)
    expected = torch_maxpool(x, kernel, strides, pads, dilations, ceil_mode)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, expected)


def test_maxpool_hand_worked():
    # [3, -128, 5, 1] with kernel 2, stride 2, pad 1 at the start: windows {pad, 3}, {-128, 5}, {1}
    # (ceil_mode keeps the last, which starts inside the input).
    x = np.array([[[3, -128, 5, 1]]], np.int8)
    got = ops.MaxPool(x, kernel_shape=[2], strides=[2], pads=[1, 0], ceil_mode=True)
    assert got.tolist() == [[[3, 5, 1]]]
    got = ops.MaxPool(x, kernel_shape=[2], strides=[2], pads=[1, 0], ceil_mode=False)
    assert got.tolist() == [[[3, 5]]]


def test_maxpool_rejects_pads_as_large_as_the_window():
    b = GraphBuilder("bad")
    x = b.input("x", "int8", [1, 1, 4])
    with pytest.raises(GraphError, match="smaller than the window"):
        b.node("MaxPool", [x], kernel_shape=[2], pads=[2, 0])


# --- Pad -------------------------------------------------------------------------------


@st.composite
def pad_cases(draw):
    rank = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    mode = draw(st.sampled_from(["constant", "reflect", "edge", "wrap"]))
    pads = []
    for side in range(2):
        for axis in range(rank):
            limit = shape[axis] - 1 if mode == "reflect" else 3
            low = -(shape[axis] // 2) if mode == "constant" else 0
            pads.append(draw(st.integers(low, max(limit, 0))))
    if mode != "constant":
        pads = [max(p, 0) for p in pads]
    dtype = draw(st.sampled_from([np.int8, np.uint8, np.int32]))
    info = np.iinfo(dtype)
    value = draw(st.integers(int(info.min), int(info.max)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    return x, pads, mode, value


@given(pad_cases())
def test_pad_matches_torch(case):
    x, pads, mode, value = case
    got = ops.Pad(x, pads=pads, mode=mode, value=value)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, torch_pad(x, pads, mode, value))


def test_pad_hand_worked():
    x = np.array([1, 2, 3], np.int8)
    assert ops.Pad(x, pads=[2, 1], mode="constant", value=-5).tolist() == [-5, -5, 1, 2, 3, -5]
    assert ops.Pad(x, pads=[2, 1], mode="reflect").tolist() == [3, 2, 1, 2, 3, 2]
    assert ops.Pad(x, pads=[2, 1], mode="edge").tolist() == [1, 1, 1, 2, 3, 3]
    assert ops.Pad(x, pads=[2, 1], mode="wrap").tolist() == [2, 3, 1, 2, 3, 1]
    assert ops.Pad(x, pads=[-1, 0], mode="constant").tolist() == [2, 3]


def test_pad_value_must_fit():
    with pytest.raises(OpError, match="does not fit"):
        ops.Pad(np.zeros(2, np.uint8), pads=[1, 0], value=-1)


# --- RequantF32 ------------------------------------------------------------------------


def float32_parts(scale: np.float32) -> tuple[int, int]:
    """(mul, exp) with scale == mul * 2^exp exactly, mul < 2^24 (a float32's significand)."""
    fraction, exponent = np.frexp(np.float64(scale))
    mul, exp = int(fraction * 2**24), int(exponent) - 24
    assert mul * 2.0**exp == float(scale)
    return mul, exp


def torch_requant_f32(x, scale, offset, lo, hi):
    product = torch.tensor(x, dtype=torch.int64).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    rounded = torch.round(product)  # ties to even, in float32
    clipped = torch.clamp(rounded.to(torch.float64), lo - offset, hi - offset)
    return (clipped.to(torch.int64) + offset).numpy()


float32_scales = st.floats(min_value=2.0**-60, max_value=2.0**30, width=32, allow_subnormal=False)
accumulators = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**24) - 8, 2**24 + 8),
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 2**24 + 1, -(2**24) - 3, 2**62, -(2**63)]),
)


@given(
    st.lists(accumulators, min_size=1, max_size=40),
    float32_scales,
    st.sampled_from([("int8", -128, 127), ("uint8", 0, 255), ("int16", -32768, 32767), ("int32", -(2**31), 2**31 - 1)]),
    st.integers(-20, 20),
)
def test_requant_f32_matches_torch_float32(each_backend, xs, scale, out, offset):
    dtype, lo, hi = out
    offset = min(max(offset, lo), hi)
    scale = np.float32(scale)
    mul, exp = float32_parts(scale)
    x = np.array(xs, np.int64)
    got = ops.RequantF32(x, np.int32(mul), np.int16(exp), np.int32(offset), dtype=dtype)
    np.testing.assert_array_equal(got.astype(np.int64), torch_requant_f32(x, scale, offset, lo, hi))


@given(st.integers(0, 2**32 - 1))
def test_requant_f32_per_channel_matches_torch(each_backend, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**30), 2**30, size=(3, 5, 4))
    scales = (rng.random(5) * 1e-3).astype(np.float32)
    offsets = rng.integers(-10, 10, size=5)
    parts = [float32_parts(s) for s in scales]
    got = ops.RequantF32(x, np.array([p[0] for p in parts], np.int32), np.array([p[1] for p in parts], np.int16),
                         offsets.astype(np.int8), axis=1, dtype="int8")
    for c in range(5):
        np.testing.assert_array_equal(got[:, c].astype(np.int64), torch_requant_f32(x[:, c], scales[c], int(offsets[c]), -128, 127))


def test_requant_f32_hand_worked():
    # scale 0.75 = 3 * 2^-2. 5 * 0.75 = 3.75 -> 4; 6 * 0.75 = 4.5 -> 4 (tie to even);
    # 10 * 0.75 = 7.5 -> 8; -6 * 0.75 = -4.5 -> -4; plus offset 1, clipped to int8.
    x = np.array([5, 6, 10, -6, 1000], np.int32)
    got = ops.RequantF32(x, np.int32(3), np.int8(-2), np.int8(1), dtype="int8")
    assert got.tolist() == [5, 5, 9, -3, 127]
    # float32(2^24 + 1) is 2^24 (tie to even), so with scale 2^-24 the result is 1, not 1 + 2^-24 -> 1.
    # float32(2^24 + 3) is 2^24 + 4; times 2^-2 gives 2^22 + 1 exactly.
    assert ops.RequantF32(np.array([2**24 + 3], np.int64), np.int32(1), np.int8(-2), dtype="int32").tolist() == [2**22 + 1]


def test_requant_f32_rejects_a_wide_multiplier():
    with pytest.raises(OpError, match="mul"):
        ops.RequantF32(np.array([1]), np.int32(1 << 24), np.int8(0))
