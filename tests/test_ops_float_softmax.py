"""FloatSoftmax against an independent torch float32 implementation of docs/OPS.md, and its
importer tables against float64 exponentials."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from refsim import ops
from refsim.dtypes import TYPES
from refsim.exporters.importers.ort_float import float_softmax_tables
from refsim.ops import float32 as f32


def torch_float_softmax(x, hi, lo, k, y_scale, zero_point, dtype):
    """The same steps in torch float32 (IEEE, one rounding per operation)."""
    t = TYPES[dtype]
    rows = torch.tensor(x.reshape(-1, x.shape[-1]), dtype=torch.int64)
    d = rows.max(dim=1, keepdim=True).values - rows
    hi_t, lo_t = torch.tensor(hi, dtype=torch.float32), torch.tensor(lo, dtype=torch.float32)
    inside = torch.div(d, 2**k, rounding_mode="floor") < len(hi)
    top = torch.where(inside, torch.div(d, 2**k, rounding_mode="floor"), torch.zeros_like(d))
    e = torch.where(inside, hi_t[top] * lo_t[torch.remainder(d, 2**k)], torch.zeros((), dtype=torch.float32))
    total = torch.zeros(rows.shape[0], dtype=torch.float32)
    for j in range(rows.shape[1]):
        total = total + e[:, j]
    p = e * (torch.ones((), dtype=torch.float32) / total)[:, None]
    y = torch.round(p / torch.tensor(y_scale, dtype=torch.float32)).to(torch.int64) + zero_point
    return y.clamp(t.lo, t.hi).numpy().reshape(x.shape)


@st.composite
def cases(draw):
    k = draw(st.integers(0, 6))
    n_hi = draw(st.integers(1, 12))
    positive = st.floats(2.0**-60, 16.0, width=32)
    hi = np.array(draw(st.lists(positive, min_size=n_hi, max_size=n_hi)), np.float32)
    lo = np.array(draw(st.lists(positive, min_size=1 << k, max_size=1 << k)), np.float32)
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    x_dtype = draw(st.sampled_from([np.int32, np.int16, np.int8, np.uint8]))
    info = np.iinfo(x_dtype)
    spread = draw(st.sampled_from([(int(info.min), int(info.max)), (0, n_hi * (1 << k) + 3)]))
    values = st.integers(max(spread[0], int(info.min)), min(spread[1], int(info.max)))
    x = np.array(draw(st.lists(values, min_size=rows * length, max_size=rows * length)), x_dtype).reshape(rows, length)
    if draw(st.booleans()):
        x[0, 0], x[-1, -1] = info.max, info.min  # extremes: differences past hi's end
    y_scale = np.float32(draw(st.floats(2.0**-16, 0.5, width=32)))
    dtype = draw(st.sampled_from(["uint8", "int8", "uint16"]))  # uint16: unquantized probabilities (2^-15)
    zero_point = draw(st.integers(TYPES[dtype].lo, TYPES[dtype].hi))
    return x, hi, lo, k, y_scale, zero_point, dtype


@given(cases())
@settings(max_examples=300, deadline=None)
def test_float_softmax_matches_torch(case):
    x, hi, lo, k, y_scale, zero_point, dtype = case
    (hm, he), (lm, le) = f32.from_float32(hi), f32.from_float32(lo)
    (ym,), (ye,) = (np.atleast_1d(v) for v in f32.from_float32(y_scale))
    got = ops.FloatSoftmax(x, hm, he, lm, le, k=k, y_scale_m=int(ym), y_scale_e=int(ye), zero_point=zero_point, dtype=dtype)
    np.testing.assert_array_equal(got, torch_float_softmax(x, hi, lo, k, y_scale, zero_point, dtype))


def test_float_softmax_tables_are_float32_exponentials():
    """hi[j] * lo[i] stands for exp(-(j * 2^k + i) * s): each table entry is float32(exp) of
    its own argument, and the tables reach past exp's float32 underflow."""
    s = np.float32(2.65e-6)
    k, hi, lo = float_softmax_tables(s)
    assert len(lo) == 1 << k and len(hi) * 2**k * float(s) >= 104
    for i in (0, 1, 777, len(lo) - 1):
        assert lo[i] == np.float32(np.exp(-i * np.float64(s)))
    for j in (0, 3, len(hi) // 2):
        assert hi[j] == np.float32(np.exp(-j * 2.0**k * np.float64(s)))
    assert hi[-1] == 0 and hi[0] == lo[0] == 1
