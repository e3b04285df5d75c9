"""The fake-quant model rounds where the integer graph rounds: at the scale each requantizer
realizes (mul / 2^shift), not the exact one (`frontend.requant.rounding_gain`).

ITA's requantizer has an 8-bit multiplier, so an ITA layer's int8 result is the float value
rounded at s_out * g with |g - 1| up to 2^-8; a fake-quant model rounding at s_out put about
6% of the first ITA layer's values of a random ViT on the neighbouring step (41.8 dB from the
integer model there), and every later point disagreed more.
"""

from pathlib import Path

import numpy as np
import pytest
import refsim
from refsim.exporters.dyadic import dyadic
from refsim.exporters.frontend.requant import ita_dyadic, rounding_gain

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ita"


def _half_up(acc, mul, shift):
    return (acc * mul + (1 << (shift - 1))) >> shift  # ITA's requantizer (exact integers)


@pytest.mark.parametrize("seed", range(5))
def test_rounding_at_the_realized_scale_gives_the_integer_result(seed):
    """For accumulators acc at scale s_acc requantized to s_out by ITA's requantizer, the
    float value acc * s_acc rounded at s_out * g is the integer result (ties apart); rounded
    at s_out it is not, for a few percent of the values."""
    rng = np.random.default_rng(seed)
    s_acc = float(rng.uniform(1e-5, 1e-3))
    ratio = float(rng.uniform(1e-4, 1e-2))
    s_out = s_acc / ratio
    d = ita_dyadic(ratio, "test")
    mul, shift = int(d.mul), int(d.shift)
    acc = rng.integers(-(1 << 20), 1 << 20, 200_000)
    exact = _half_up(acc, mul, shift)
    tie = (acc * mul) % (1 << shift) == 1 << (shift - 1)
    g = rounding_gain(ratio, mul, shift)
    assert g is not None and abs(g - 1) <= 2.0**-8
    realized = np.rint(acc * s_acc / (s_out * g)).astype(np.int64)
    nominal = np.rint(acc * s_acc / s_out).astype(np.int64)
    assert np.array_equal(realized[~tie], exact[~tie])
    # the exact ratio's rounding misses wherever |acc * ratio| * |g - 1| crosses a half step
    assert np.mean(nominal != exact) > 0.1 * abs(g - 1) * np.mean(np.abs(acc * ratio))


def test_a_wide_multiplier_has_no_gain_and_channels_keep_theirs():
    ratio = np.array([0.3, 1e-3, 7.7])
    wide = dyadic(ratio, mul_bits=31)
    assert rounding_gain(ratio, wide.mul, wide.shift) is None  # within float32 resolution
    narrow = dyadic(ratio, mul_bits=8)
    g = rounding_gain(ratio, narrow.mul, narrow.shift)
    assert g.shape == (3,) and np.allclose(g * narrow.mul / 2.0**narrow.shift, ratio, rtol=1e-15)
    assert rounding_gain(np.array([0.5, 1e-12]), np.array([128, 0]), np.array([8, 0])) is None  # a zero multiplier


@pytest.fixture(scope="module")
def vit_ita(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from refsim.exporters import export

    intq = tmp_path_factory.mktemp("fq_rounding") / "vit_ita.intq"
    export(EXAMPLE / "vit_ita.onnx", intq, EXAMPLE / "calib.npy", mode="ita")
    return refsim.load(intq)


def _first_ita_point(model, record):
    """The int8 values of the first point the record rounds at a realized scale, in the
    integer model and in the fake-quant model built from `record`, on the example images."""
    from refsim.boundary import quantize_feeds
    from refsim.exporters.fakequant import fake_quant_model
    from refsim.exporters.frontend.graph import load
    from refsim.exporters.frontend.passes import canonicalize
    from refsim.exporters.runtime import FloatRunner

    meta = model.metadata
    float_tensors = meta["float_tensors"]
    rounded = {row[0]: row for row in meta["fake_quant"]["tensors"] if len(row) == 5}
    point = next(n for node in model.order for n in node.outputs if float_tensors.get(n) in rounded)
    g = canonicalize(load(EXAMPLE / "vit_ita.onnx"), {k: list(v) for k, v in meta["source_model"]["input_shapes"].items()})
    tensors = model.graph.tensors
    fq = FloatRunner(fake_quant_model(g, record, {n: t.data for n, t in tensors.items() if t.is_const},
                                      {n: t.scale for n, t in tensors.items() if t.is_const}), expose=[float_tensors[point]])
    images = np.load(EXAMPLE / "images.npy")[:2]
    name = model.graph.inputs[0]
    ints, fqs = [], []
    for image in images:
        feeds = {name: image[None].astype(np.float32)}
        seen = {}
        model.run(quantize_feeds(model, dict(feeds)), trace=lambda node, n, a: seen.__setitem__(n, np.asarray(a)))
        ints.append(seen[point].reshape(-1))
        fqs.append(np.asarray(fq.run(feeds)[float_tensors[point]], np.float64).reshape(-1) / float(tensors[point].scale))
    return np.concatenate(ints), np.concatenate(fqs), point


def test_the_fake_quant_model_reproduces_an_ita_layers_int8_result(vit_ita):
    """The first ITA layer's int8 output (its input is the quantized image, the same in both
    models): the fake-quant model's values are the integer model's, to float32 rounding; with
    the record's realized scales dropped (rounding at the exact scale) a few percent move."""
    record = vit_ita.metadata["fake_quant"]
    ints, fqs, point = _first_ita_point(vit_ita, record)
    assert np.all(np.abs(fqs - np.rint(fqs)) < 1e-3)  # the fake-quant value is on the int8 grid
    assert np.mean(np.rint(fqs) != ints) < 1e-3, point  # float32 ties at most
    nominal = dict(record, tensors=[row[:4] for row in record["tensors"]])
    ints, fqs, _ = _first_ita_point(vit_ita, nominal)
    assert np.mean(np.rint(fqs) != ints) > 0.01


def _fake_quant_rounding(values: np.ndarray, ties: str) -> np.ndarray:
    """exporters.fakequant._rounded on float64 values, run by onnxruntime."""
    import onnx
    from refsim.exporters.fakequant import _rounded
    from refsim.exporters.frontend.graph import Graph
    from refsim.exporters.runtime import FloatRunner

    g = Graph()
    g.inputs, g.input_types = ["v"], {"v": (onnx.TensorProto.DOUBLE, ("n",))}
    g.opsets = {"": 20}
    g.nodes = _rounded(g, "v", ties, "r")
    g.outputs, g.output_types = [g.nodes[-1].outputs[0]], {g.nodes[-1].outputs[0]: onnx.TensorProto.DOUBLE}
    return FloatRunner(g.to_model()).run({"v": values})[g.outputs[0]]


@pytest.mark.parametrize("seed", range(3))
def test_the_float64_fake_quant_model_breaks_ties_as_the_requantizer(seed):
    """ITA's requantizer rounds acc * mul / 2^shift half up; its exact ties reach the float64
    fake-quant model as acc * s_acc / (s_out * g), k + 1/2 within float64's error. They are
    rounded half up (ITA) or to even (I-BERT) like the integer graph; every other value as
    np.rint."""
    rng = np.random.default_rng(seed)
    s_acc, ratio = float(rng.uniform(1e-5, 1e-3)), float(rng.uniform(1e-4, 1e-2))
    s_out = s_acc / ratio
    d = ita_dyadic(ratio, "test")
    mul, shift = int(d.mul), int(d.shift)
    acc = rng.integers(-(1 << 20), 1 << 20, 200_000)
    tie = (acc * mul) % (1 << shift) == 1 << (shift - 1)
    acc = np.concatenate([acc, (np.arange(-500, 500) * (1 << shift) + (1 << (shift - 1))) // np.gcd(mul, 1 << shift)])
    tie = (acc * mul) % (1 << shift) == 1 << (shift - 1)
    assert tie.sum() >= 500
    v = acc * s_acc / (s_out * rounding_gain(ratio, mul, shift))  # the fake-quant model's float64 value
    half_up = _fake_quant_rounding(v, "half_up").astype(np.int64)
    assert np.array_equal(half_up, _half_up(acc, mul, shift))
    q = acc * mul  # to even: exact, from the integers
    floor, rest = q >> shift, q & ((1 << shift) - 1)
    even = floor + ((rest > (1 << (shift - 1))) | ((rest == (1 << (shift - 1))) & (floor % 2 == 1)))
    assert np.array_equal(_fake_quant_rounding(v, "half_even").astype(np.int64), even)
    assert not np.array_equal(np.rint(v).astype(np.int64)[tie], half_up[tie])  # what Round alone gives
