"""onnxruntime's float32 kernels replayed with integers (refsim.ops.ort_replay, float32).

Each op is checked against an independent torch implementation of its formula (torch
float32 arithmetic, step by step, or torch int64 for LayerNormRound), exact equality, and
against onnxruntime itself: QLinearSoftmax, QLinearAdd/QLinearMul over every input pair,
DynamicQuantizeLinear, and LayerNormalization between QDQ pairs (the documented residue).
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from refsim.dtypes import TYPES
from refsim.exporters.importers import ort_float
from refsim.exporters.importers.values import QTensor
from refsim.ops import DynamicQuantizeLinear, LayerNormRound, Lut2, OrtSoftmax, RescaleF32
from refsim.ops import float32 as f32

FLOAT32 = st.floats(min_value=2.0**-100, max_value=2.0**100, width=32, allow_subnormal=False)


def _session(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _np_dtype(signed):
    return np.int8 if signed else np.uint8


# --- float32 arithmetic on (m, e) pairs ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(FLOAT32, FLOAT32)
def test_float32_pairs_match_ieee(a, b):
    a, b = abs(np.float32(a)), abs(np.float32(b))
    pa, pb = f32.from_float32(a), f32.from_float32(b)
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    for got, want in ((f32.add(pa, pb), ta + tb), (f32.mul(pa, pb), ta * tb), (f32.div(pa, pb), ta / tb)):
        want = float(want)
        if math.isfinite(want) and want >= 2.0**-126:
            assert float(f32.to_float64(*got)) == want
    if a < 2.0**40:
        assert int(f32.rint(pa)) == int(torch.round(ta).item())


# --- Lut2 ---------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_lut2_matches_torch_indexing(sa, sb, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128 if sa else 0, 128 if sa else 256, size=(3, 5)).astype(_np_dtype(sa))
    b = rng.integers(-128 if sb else 0, 128 if sb else 256, size=(5,)).astype(_np_dtype(sb))
    a[0, 0], b[0] = (-128 if sa else 0), (127 if sb else 255)  # the table's corners
    table = rng.integers(-128, 128, size=(256, 256)).astype(np.int8)
    ia = torch.tensor(a.astype(np.int64)) + (128 if sa else 0)
    ib = torch.tensor(b.astype(np.int64)) + (128 if sb else 0)
    want = torch.tensor(table)[ia, ib.expand_as(ia)].numpy()
    np.testing.assert_array_equal(Lut2(a, b, table), want)


# --- OrtSoftmax ---------------------------------------------------------------------------


def torch_qlinear_softmax(x: np.ndarray, x_scale: float, y_scale: float, zero_point: int) -> np.ndarray:
    """QLinearSoftmax written from its description with torch float32 (float64 exp for the table)."""
    d = x.shape[-1]
    xs = torch.tensor(np.float32(x_scale), dtype=torch.float64)
    shift = max(0.0, math.log(float(np.finfo(np.float32).max) / d) - 5.0) / xs
    table = torch.exp((torch.arange(256, dtype=torch.float64) - 255 + shift) * xs).to(torch.float32)
    rows = torch.tensor(x.reshape(-1, d).astype(np.int64))
    t = table[rows - rows.max(dim=1, keepdim=True).values + 255]
    total = torch.zeros(len(rows), dtype=torch.float32)
    for j in range(d):
        total = total + t[:, j]
    factor = torch.floor(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(np.float32(y_scale)))
    quotient = (t * factor) / total[:, None]
    lo, hi = (0, 255) if x.dtype == np.uint8 else (-128, 127)
    y = (torch.round(torch.nan_to_num(quotient, posinf=0.0)).to(torch.int64) + zero_point).clamp(lo, hi)
    y = torch.where(torch.isinf(quotient), torch.tensor(zero_point), y)  # x86: an infinite quotient leaves the zero point
    return y.numpy().astype(x.dtype).reshape(x.shape)


def _ort_softmax_inputs(x_scale, length, y_scale):
    mant, expo = f32.from_float32(ort_float.softmax_table(x_scale, length))
    return mant, expo, ort_float.softmax_y_factor(y_scale)


@settings(max_examples=60, deadline=None)
@given(st.booleans(), st.floats(0.002, 2.0), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_ort_softmax_matches_torch(signed, x_scale, length, seed):
    rng = np.random.default_rng(seed)
    dt = _np_dtype(signed)
    x = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, size=(4, length)).astype(dt)
    x[0, 0], x[1, :] = np.iinfo(dt).max, np.iinfo(dt).min  # extremes; a constant row
    zp, y_scale = (-128, 1 / 256) if signed else (0, 1 / 256)
    mant, expo, factor = _ort_softmax_inputs(x_scale, length, y_scale)
    np.testing.assert_array_equal(OrtSoftmax(x, mant, expo, y_factor=factor, zero_point=zp),
                                  torch_qlinear_softmax(x, x_scale, y_scale, zp))


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("x_scale, y_scale, zp", [(0.206, 1 / 256, 0), (0.05, 1 / 255, 3), (1.3, 1 / 256, 0), (0.01, 0.0043, 7)])
def test_ort_softmax_matches_onnxruntime(signed, x_scale, y_scale, zp):
    dt = _np_dtype(signed)
    T = TensorProto.INT8 if signed else TensorProto.UINT8
    zp = -128 if signed and zp == 0 else zp
    x = np.random.default_rng(0).integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, size=(300, 23)).astype(dt)
    node = helper.make_node("QLinearSoftmax", ["x", "xs", "xz", "ys", "yz"], ["y"], domain="com.microsoft", axis=-1, opset=13)
    inits = [numpy_helper.from_array(np.float32(x_scale), "xs"), numpy_helper.from_array(np.array(0, dt), "xz"),
             numpy_helper.from_array(np.float32(y_scale), "ys"), numpy_helper.from_array(np.array(zp, dt), "yz")]
    session = _session([node], [helper.make_tensor_value_info("x", T, list(x.shape))], [helper.make_tensor_value_info("y", T, None)], inits)
    mant, expo, factor = _ort_softmax_inputs(x_scale, 23, y_scale)
    np.testing.assert_array_equal(OrtSoftmax(x, mant, expo, y_factor=factor, zero_point=zp), session.run(None, {"x": x})[0])


# --- QLinearAdd / QLinearMul tables -------------------------------------------------------


def _q(dtype, scale, zp):
    return QTensor(None, TYPES[dtype], (), scale=np.asarray(np.float32(scale), np.float64), zero_point=np.asarray(zp, np.int64))


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("signed", [False, True])
def test_qlinear_tables_match_onnxruntime_on_every_pair(op, signed):
    """Every one of the 65,536 input pairs, for several random scale sets: exact by construction."""
    dt = _np_dtype(signed)
    T = TensorProto.INT8 if signed else TensorProto.UINT8
    levels = np.arange(np.iinfo(dt).min, np.iinfo(dt).max + 1)
    a, b = (v.reshape(-1).astype(dt) for v in np.meshgrid(levels, levels, indexing="ij"))
    rng = np.random.default_rng(7 if signed else 3)
    for _ in range(5):
        sa, sb, sc = rng.random(3) * 0.1 + 0.005
        za, zb, zc = (int(v) for v in rng.integers(np.iinfo(dt).min, np.iinfo(dt).max + 1, 3))
        node = helper.make_node(op, ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"], domain="com.microsoft")
        inits = [numpy_helper.from_array(np.float32(v), n) for v, n in ((sa, "sa"), (sb, "sb"), (sc, "sc"))]
        inits += [numpy_helper.from_array(np.array(v, dt), n) for v, n in ((za, "za"), (zb, "zb"), (zc, "zc"))]
        session = _session([node], [helper.make_tensor_value_info(n, T, [a.size]) for n in ("a", "b")],
                           [helper.make_tensor_value_info("y", T, None)], inits)
        want = session.run(None, {"a": a, "b": b})[0]
        qa, qb, qc = _q(dt.__name__, sa, za), _q(dt.__name__, sb, zb), _q(dt.__name__, sc, zc)
        table = ort_float.qlinear_add_table(qa, qb, qc) if op == "QLinearAdd" else ort_float.qlinear_mul_table(qa, qb, qc)
        np.testing.assert_array_equal(Lut2(a, b, table), want)
        if op == "QLinearAdd":  # B a single value: the kernel folds its product into its constant first
            single_b = _session([node], [helper.make_tensor_value_info("a", T, [levels.size]), helper.make_tensor_value_info("b", T, [1])],
                                [helper.make_tensor_value_info("y", T, None)], inits)
            scalar_table = ort_float.qlinear_add_table(qa, qb, qc, scalar="b")
            for k in (0, 77, 255):
                bk = np.array([levels[k]], dt)
                want = single_b.run(None, {"a": levels.astype(dt), "b": bk})[0]
                np.testing.assert_array_equal(Lut2(levels.astype(dt), bk, scalar_table), want)


# --- DynamicQuantizeLinear ----------------------------------------------------------------


def torch_dynamic_quantize(q: np.ndarray, scale: float, zp: int):
    """ONNX DynamicQuantizeLinear of float32((q - zp) * scale), in torch float32, step by step."""
    s = torch.tensor(np.float32(scale))
    x = torch.tensor((q.astype(np.int64) - zp).astype(np.float32)) * s
    lo, hi = torch.minimum(x.min(), torch.tensor(0.0)), torch.maximum(x.max(), torch.tensor(0.0))
    y_scale = torch.tensor(1.0) if hi == lo else (hi - lo) / torch.tensor(255.0)
    y_zp = int(torch.round(torch.clamp(torch.tensor(0.0) - lo / y_scale, 0, 255)).item())
    y = torch.clamp(torch.round(x / y_scale) + y_zp, 0, 255).to(torch.uint8)
    return y.numpy(), float(y_scale), y_zp


@settings(max_examples=80, deadline=None)
@given(st.floats(1e-4, 10.0), st.integers(0, 255), st.integers(0, 2**32 - 1), st.sampled_from(["random", "above", "constant"]))
def test_dynamic_quantize_linear_matches_torch(scale, zp, seed, kind):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, size=(5, 17)).astype(np.uint8)
    if kind == "above":
        q = np.maximum(q, zp).astype(np.uint8)
    elif kind == "constant":
        q[:] = zp
    m, e = f32.from_float32(np.float32(scale))
    y, ym, ye, yz = DynamicQuantizeLinear(q, m, e, np.uint8(zp))
    want_y, want_scale, want_zp = torch_dynamic_quantize(q, scale, zp)
    np.testing.assert_array_equal(y, want_y)
    assert float(f32.to_float64(ym, ye)) == want_scale and int(yz) == want_zp


def test_dynamic_quantize_linear_matches_onnxruntime():
    rng = np.random.default_rng(1)
    for trial in range(20):
        scale, zp = np.float32(rng.random() * 0.1 + 1e-3), int(rng.integers(0, 256))
        q = rng.integers(0, 256, size=(7, 33)).astype(np.uint8)
        if trial % 3 == 0:
            q = np.clip(q, zp, 255).astype(np.uint8)
        nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]), helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "ys", "yz"])]
        outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("y", TensorProto.UINT8), ("ys", TensorProto.FLOAT), ("yz", TensorProto.UINT8))]
        session = _session(nodes, [helper.make_tensor_value_info("q", TensorProto.UINT8, list(q.shape))], outs,
                           [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(np.uint8(zp), "z")])
        y, ys, yz = session.run(None, {"q": q})
        m, e = f32.from_float32(scale)
        gy, gm, ge, gz = DynamicQuantizeLinear(q, m, e, np.uint8(zp))
        np.testing.assert_array_equal(gy, y)
        assert float(f32.to_float64(gm, ge)) == float(ys) and int(gz) == int(yz)


@settings(max_examples=120, deadline=None)
@given(st.integers(-40, 10), st.integers(0, 2**32 - 1), st.sampled_from(["random", "positive", "negative", "zero", "one", "extreme"]))
def test_dynamic_quantize_linear_of_a_fine_grid_matches_torch(exponent, seed, kind):
    """quantize_dynamic's inputs as refsim holds them: int32 values of up to 24 bits at a
    power-of-two scale (zero point 0), including the all-zero tensor (scale 1, zero point 0),
    one-sided ranges and a single non-zero value."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-(1 << 23) + 1, 1 << 23, size=(3, 11)).astype(np.int32)
    if kind == "positive":
        q = np.abs(q)
    elif kind == "negative":
        q = -np.abs(q)
    elif kind == "zero":
        q[:] = 0
    elif kind == "one":
        q[:] = 0
        q[1, 2] = rng.choice([-1, 1]) * int(rng.integers(1, 1 << 23))
    elif kind == "extreme":
        q[0, 0], q[0, 1] = (1 << 23) - 1, -(1 << 23) + 1
    scale = 2.0**exponent
    m, e = f32.from_float32(np.float32(scale))
    y, ym, ye, yz = DynamicQuantizeLinear(q, m, e, np.int32(0))
    want_y, want_scale, want_zp = torch_dynamic_quantize(q, scale, 0)
    np.testing.assert_array_equal(y, want_y)
    assert float(f32.to_float64(ym, ye)) == want_scale and int(yz) == want_zp


def test_dynamic_quantize_linear_of_a_fine_grid_matches_onnxruntime():
    rng = np.random.default_rng(2)
    for trial in range(12):
        q = rng.integers(-(1 << 23) + 1, 1 << 23, size=(4, 19)).astype(np.int32)
        if trial % 4 == 1:
            q = np.abs(q)
        elif trial % 4 == 2:
            q[:] = 0
        scale = np.float32(2.0 ** -int(rng.integers(10, 30)))
        nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["x"]), helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "ys", "yz"])]
        outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("y", TensorProto.UINT8), ("ys", TensorProto.FLOAT), ("yz", TensorProto.UINT8))]
        session = _session(nodes, [helper.make_tensor_value_info("q", TensorProto.INT32, list(q.shape))], outs,
                           [numpy_helper.from_array(scale, "s")])
        y, ys, yz = session.run(None, {"q": q})
        m, e = f32.from_float32(scale)
        gy, gm, ge, gz = DynamicQuantizeLinear(q, m, e, np.int32(0))
        np.testing.assert_array_equal(gy, y)
        assert float(f32.to_float64(gm, ge)) == float(ys) and int(gz) == int(yz)


# --- LayerNormRound -----------------------------------------------------------------------


def torch_layernorm_round(x, gamma, beta, offset, eps, k, shift, lo, hi):
    """The formula in docs/OPS.md with torch int64 and Python's exact integer square root."""
    x = torch.tensor(np.asarray(x, np.int64))
    n = x.shape[-1]
    total = x.sum(-1, keepdim=True)
    centred = n * x - total
    variance = n * (x * x).sum(-1, keepdim=True) - total * total
    root = torch.tensor([[max(math.isqrt((int(v) + eps) << (2 * k)), 1)] for v in variance.reshape(-1)]).reshape(variance.shape)
    num = (centred * torch.tensor(gamma)) << k
    q = torch.div(num, root, rounding_mode="floor")
    r = num - q * root
    q = q + ((2 * r > root) | ((2 * r == root) & (q % 2 == 1))).to(torch.int64)  # half to even
    v = q + torch.tensor(beta)
    if shift:
        f = v >> shift
        rem = v - (f << shift)
        half = 1 << (shift - 1)
        v = f + ((rem > half) | ((rem == half) & (f % 2 == 1))).to(torch.int64)
    return (v + offset).clamp(lo, hi).numpy()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 64), st.integers(0, 2**32 - 1), st.integers(0, 12), st.integers(0, 20))
def test_layernorm_round_matches_torch(n, seed, k, shift):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(3, n)).astype(np.int8)
    x[0, 0], x[1, :] = -128, 5  # an extreme and a constant row
    gamma = rng.integers(-(1 << 20), 1 << 20, size=n)
    beta = rng.integers(-(1 << 24), 1 << 24, size=n)
    eps = int(rng.integers(0, 100))
    got = LayerNormRound(x, gamma, beta, np.int64(3), eps=eps, k=k, shift=shift, dtype="int8")
    np.testing.assert_array_equal(got, torch_layernorm_round(x, gamma, beta, 3, eps, k, shift, -128, 127))


def test_layernorm_round_residue_against_onnxruntime():
    """DequantizeLinear -> LayerNormalization -> QuantizeLinear in onnxruntime (float32) against
    LayerNormRound (exact, rounded once): they differ only where onnxruntime's float32 result
    lies within its rounding error of a tie, by one step, rarely."""
    rng = np.random.default_rng(5)
    n, rows = 384, 400
    x = rng.integers(0, 256, size=(rows, n)).astype(np.uint8)
    sx, zx, sy, zy = np.float32(0.043), 131, np.float32(0.031), 125
    gamma = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(n)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xd"]),
             helper.make_node("LayerNormalization", ["xd", "g", "b"], ["ln"], axis=-1, epsilon=1e-12),
             helper.make_node("QuantizeLinear", ["ln", "sy", "zy"], ["y"])]
    inits = [numpy_helper.from_array(v, name) for v, name in ((sx, "sx"), (np.uint8(zx), "zx"), (sy, "sy"), (np.uint8(zy), "zy"), (gamma, "g"), (beta, "b"))]
    want = _session(nodes, [helper.make_tensor_value_info("x", TensorProto.UINT8, [rows, n])],
                    [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits).run(None, {"x": x})[0]
    p = ort_float.layernorm_params(_q("uint8", sx, zx), gamma.astype(np.float64), beta.astype(np.float64), 1e-12, _q("uint8", sy, zy), n)
    got = LayerNormRound(x, p["gamma"], p["beta"], np.int64(zy), eps=p["eps"], k=p["k"], shift=p["shift"], dtype="uint8")
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1
    assert (diff != 0).mean() < 1e-3, f"{int((diff != 0).sum())} of {diff.size} differ"


# --- RescaleF32 ---------------------------------------------------------------------------


def torch_rescale(x, a, b, c, shift, lo, hi):
    """docs/OPS.md's RescaleF32 in torch float32, one operation at a time (no fused ops)."""
    s = torch.tensor(np.float32(a)) * torch.tensor(np.asarray(b, np.float32))
    v = torch.tensor(np.asarray(x, np.int64)).to(torch.float32) * s
    if c is not None:
        v = v + torch.tensor(np.asarray(c, np.float32))
    y = torch.round(v.to(torch.float64) * 2.0**shift)  # exact: a float32 times a power of two
    return torch.clamp(y, lo, hi).to(torch.int64).numpy()


SIGNED_F32 = st.one_of(st.just(0.0), FLOAT32.map(lambda v: v * 1e-28), FLOAT32.map(lambda v: -v * 1e-28),
                       st.floats(-1e4, 1e4, width=32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**31, 2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1, -2**31, 2**24 + 1])),
                min_size=12, max_size=12),
       st.floats(2.0**-40, 2.0**10, width=32), st.lists(st.floats(2.0**-30, 2.0**4, width=32), min_size=1, max_size=3),
       st.one_of(st.none(), st.lists(SIGNED_F32, min_size=3, max_size=3)), st.integers(-20, 40),
       st.sampled_from([(-2**31, 2**31 - 1), (-2**15, 2**15 - 1), (-5, 5)]), st.booleans())
def test_rescale_f32_matches_torch(x, a, b, c, shift, bounds, cancel):
    x = np.asarray(x, np.int64).reshape(4, 3)
    b = np.asarray(b if len(b) in (1, 3) else b[:1], np.float32)
    if cancel and c is not None:  # a bias that cancels a product exactly: the sum is 0
        c = list(-(np.float32(x[0, 0]) * (np.float32(a) * b[0])).astype(np.float32).repeat(3))
    lo, hi = bounds
    am, ae = f32.from_float32(np.float32(a))
    bm, be = f32.from_float32(b)
    inputs = [x, am, ae, bm, be]
    if c is not None:
        cm, ce = f32.from_float32(np.abs(np.asarray(c, np.float32)))
        inputs += [np.where(np.asarray(c, np.float32) < 0, -cm, cm), ce]
    got = RescaleF32(*inputs, shift=shift, dtype="int32", lo=lo, hi=hi)
    np.testing.assert_array_equal(got, torch_rescale(x, a, b, c, shift, lo, hi))


@settings(max_examples=300, deadline=None)
@given(SIGNED_F32, SIGNED_F32)
def test_float32_add_signed_matches_torch(a, b):
    pa, pb = (f32.from_float32(np.abs(np.float32(v))) for v in (a, b))
    sign = lambda v, p: (-p[0] if v < 0 else p[0], p[1])  # noqa: E731
    m, e = f32.add_signed(sign(a, pa), sign(b, pb))
    want = float(torch.tensor(np.float32(a)) + torch.tensor(np.float32(b)))
    assert float(np.sign(m)) * float(f32.to_float64(abs(m), e)) == want
