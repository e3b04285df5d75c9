"""Threshold against an independent torch implementation of docs/OPS.md, and the importer's
threshold search (exporters/importers/thresholds.py) against the function it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim import ops
from refsim.dtypes import TYPES
from refsim.errors import OpError
from refsim.exporters.importers.thresholds import step_thresholds

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)


def torch_threshold(x, y0, up, down, axis, dtype):
    """Every comparison made: y = y0[c] + sum_i (x >= up[c, i]) - sum_j (x >= down[c, j])."""
    t = TYPES[dtype]
    xt = torch.movedim(torch.tensor(x, dtype=torch.int64), axis, -1)
    channels = xt.shape[-1]
    up_t = torch.tensor(up, dtype=torch.int64).expand(channels, -1)
    down_t = torch.tensor(down, dtype=torch.int64).expand(channels, -1)
    ups = (xt.unsqueeze(-1) >= up_t).sum(-1)
    downs = (xt.unsqueeze(-1) >= down_t).sum(-1)
    y = torch.tensor(y0, dtype=torch.int64).expand(channels) + ups - downs
    return torch.movedim(y.clamp(t.lo, t.hi), -1, axis).numpy()


@st.composite
def cases(draw):
    channels = draw(st.integers(1, 5))
    rows = draw(st.integers(1, 6))
    axis = draw(st.sampled_from([0, 1, -1, -2]))
    shape = [rows, channels] if axis in (1, -1) else [channels, rows]
    x_dtype = draw(st.sampled_from([np.int8, np.int16, np.int32, np.uint8]))
    info = np.iinfo(x_dtype)
    values = st.integers(int(info.min), int(info.max))
    x = np.array(draw(st.lists(values, min_size=rows * channels, max_size=rows * channels)), x_dtype).reshape(shape)
    if draw(st.booleans()):
        x.reshape(-1)[0] = info.max  # extremes
        x.reshape(-1)[-1] = info.min
    per = 1 if draw(st.booleans()) else channels
    width_up, width_down = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    up = np.array(draw(st.lists(INT64 | INT32 | values, min_size=per * width_up, max_size=per * width_up)), np.int64)
    down = np.array(draw(st.lists(INT64 | INT32 | values, min_size=per * width_down, max_size=per * width_down)), np.int64)
    y0 = np.array(draw(st.lists(st.integers(-300, 300), min_size=per, max_size=per)), np.int64)
    dtype = draw(st.sampled_from(["int8", "uint8", "int16", "int4"]))
    return x, y0, up.reshape(per, width_up), down.reshape(per, width_down), axis, dtype


@given(cases())
@settings(max_examples=300, deadline=None)
def test_threshold_matches_torch(case):
    x, y0, up, down, axis, dtype = case
    got = ops.Threshold(x, y0, up, down, axis=axis, dtype=dtype)
    np.testing.assert_array_equal(got, torch_threshold(x, y0, up, down, axis, dtype))
    assert got.dtype == TYPES[dtype].storage


def test_threshold_hand_worked():
    # channel 0: y0 0, up {0, 5}, down {-3, 100}; channel 1: y0 1, up {1, 2}, down {-9, -9}.
    x = np.array([[-5, 0], [10, 2]], np.int32)
    got = ops.Threshold(x, np.array([0, 1]), np.array([[0, 5], [1, 2]]), np.array([[-3, 100], [-9, -9]]), dtype="int8")
    assert got.tolist() == [[0, -1], [1, 1]]  # 0+0-0, 1+0-2; 0+2-1, 1+2-2
    with pytest.raises(OpError, match="at most 32 bits"):
        ops.OPS["Threshold"].fn(x.astype(np.int64), np.array([0]), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))
    with pytest.raises(OpError, match="3 rows for 2 channels"):
        ops.Threshold(x, np.array([0, 0, 0]), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64))


def _quantized_gelu(scale, bias, out_scale, zero_point):
    """q_c(acc) = clip(rne(GELU(f32(acc * scale_c) + bias_c) / out_scale) + zp), in float64 GELU
    (an independent function: the search only needs one to reproduce)."""
    from math import erf

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))

    def q_of(acc):
        x = (acc * scale).astype(np.float32).astype(np.float64) + bias
        return np.clip(np.rint(gelu(x) / out_scale) + zero_point, -128, 127).astype(np.int64)

    return q_of


def test_the_threshold_search_reproduces_a_quantized_gelu_on_every_accumulator():
    """Every accumulator in range, per channel: the found thresholds give q_c exactly, and
    a down step exists (GELU falls below -0.75)."""
    scale = np.array([3e-3, 1.1e-3, 7e-4])
    bias = np.array([0.0, -0.4, 1.3])
    q_of = _quantized_gelu(scale, bias, 0.0041, -20)
    bound = np.array([3000, 6000, 9000])
    y0, up, down = step_thresholds(q_of, bound, scale)
    assert (down < 1 << 31).any(axis=1).all()
    for c in range(3):
        acc = np.arange(-bound[c], bound[c] + 1)
        column = np.zeros((acc.size, 3), np.int64)
        column[:, c] = acc
        want = q_of(column)[:, c]
        got = ops.Threshold(acc.astype(np.int32)[:, None], y0[c:c + 1], up[c:c + 1], down[c:c + 1], dtype="int8")[:, 0]
        np.testing.assert_array_equal(got, want)
