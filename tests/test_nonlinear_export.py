"""Export-time constants of the nonlinear ops: hand-worked values, and fidelity.

Fidelity: at realistic input scales, each variant's dequantized output approximates the
float function it stands for within the bound docs/OPS.md states for it (section
"Fidelity of the nonlinear ops"). Exact-vs-torch tests cannot catch a wrong constant; these do.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from refsim import ops
from refsim.exporters import nonlinear as nl
from refsim.exporters.dyadic import ExportError

ALL_INT8 = np.arange(-128, 128, dtype=np.int8)
_erf = np.vectorize(math.erf)


def gelu(v):
    return 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0)))


def softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def layernorm(v, w, b, eps):
    d = v - v.mean(-1, keepdims=True)
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + eps) * w + b


def apply(p: nl.OpParams, x, *extra):
    consts = [p.consts[name] for name in p.consts]
    y = getattr(ops, p.op)(x, *extra, *consts, **p.attrs)
    return (y.astype(np.float64) - p.output_zero_point) * p.output_scale


def quantize(real, scale, dtype=np.int8):
    info = np.iinfo(dtype)
    return np.clip(np.round(real / scale), info.min, info.max).astype(dtype)


# --- hand-worked constants ------------------------------------------------------------------


def test_tflite_softmax_constants_for_scale_0_05():
    # float32(0.05) * 2^26 = 3355443.25 = 0.800000011920929 * 2^22 -> left shift 22;
    # the mantissa * 2^31 = 3355443.25 * 2^9 = 1717986944 exactly; diff_min = -(31 * 2^26 >> 22) = -496.
    p = nl.tflite_softmax_params(0.05)
    assert p.attrs == dict(input_multiplier=1717986944, input_left_shift=22, diff_min=-496)
    assert (p.output_scale, p.output_zero_point) == (1 / 256, -128)


def test_tflite_quantize_multiplier_rounds_ties_away_from_zero():
    # A tie needs 32 significant bits: real = (2^31 + 1) / 2^11 lies in [2^20, 2^21), so f = real / 2^21,
    # exponent 21, and f * 2^31 = (2^31 + 1) / 2 = 2^30 + 0.5.
    from refsim.exporters.importers.tflite_prepare import quantize_multiplier

    mul, shift = quantize_multiplier((2**31 + 1) / 2**11)  # what TFLite's softmax prepare uses
    assert (mul, shift) == (2**30 + 1, 21)  # half away from zero; half to even would give 2^30


def test_quantlib_and_ibert_constants():
    # iSoftmax at 0.05: coeffB = round(27.06) = 27, coeffC = round(0.344 / (0.0025*0.3585)) = round(383.8) = 384,
    # log2 = round(1/0.05) = 20.
    assert nl.isoftmax_params(0.05).attrs == dict(coeffA=1, coeffB=27, coeffC=384, log2=20, n_levels=256)
    # iGELU at 0.1: epsB = 0.0707107, b = floor(-25.017 + 0.5) = -25, one = floor(1/(0.005*0.2888) + 0.5) = 693.
    assert nl.igelu_params(0.1).attrs == dict(b=-25, one=693)
    # I-BERT softmax at 0.1: x0 = floor(-6.931) = -7, b = floor(2.7073/0.1) = 27, c = floor(2.7921/0.01) = 279.
    p = nl.ibert_softmax_params(0.1)
    assert (p.attrs["x0_int"], p.attrs["b_int"], p.attrs["c_int"]) == (-7, 27, 279)
    # I-BERT GELU at 1.0: S' = 0.70711, b = floor(-2.5017) = -3, c = floor(-3.4626/0.50001) = -7,
    # S_erf = 0.50001 * -0.2888 * 16384 = -2365.9, shift_int = floor(-0.00042) = -1.
    assert nl.ibert_gelu_params(1.0).attrs == dict(b_int=-3, c_int=-7, n=14, shift_int=-1)
    # PyITA at 0.1: S2 = 0.0707107, q_b = floor(-25.017 + 0.5) = -25, q_c = floor(-692.52 + 0.5) = -693.
    assert nl.pyita_gelu_params(0.1, requantize=False).attrs == dict(q_1=-693, q_b=-25, q_c=-693)


def test_ita_presets_and_required_input_scale():
    p = nl.ita_softmax_params(streaming=True, preset="ita_rtl", acc_bits=19)
    assert p.op == "ITAPartialMax"
    assert p.attrs == dict(n_levels=256, k=0, numerator=65280, max_init=-128, group_width=16, acc_bits=19)
    assert p.input_scale == pytest.approx(math.log(2))
    p = nl.ita_softmax_params(preset="deeploy", output_offset=-128)
    assert (p.op, p.attrs["k"], p.input_scale, p.output_scale, p.output_zero_point) == ("ITAMax", 5, pytest.approx(math.log(2) / 32), 1 / 255, -128)


def test_scales_the_anchors_cannot_represent_are_export_errors():
    with pytest.raises(ExportError, match="int16"):
        nl.pyita_gelu_params(0.01)
    with pytest.raises(ExportError, match="int8"):
        nl.igelu_params(0.01)
    with pytest.raises(ExportError, match="2/3"):
        nl.isoftmax_params(0.9)
    with pytest.raises(ExportError, match="weight of channel 1"):
        nl.ibert_layernorm_params(0.1, [1.0, 0.0], [0.0, 0.0])
    with pytest.raises(ExportError, match="positive"):
        nl.tflite_softmax_params(-0.1)


# --- fidelity: softmax ----------------------------------------------------------------------


def attention_logits(scale, dtype=np.int8, shape=(64, 128), std=2.0, seed=0):
    """Realistic attention scores (std 2 in real units) quantized at `scale`, a quarter of
    each row masked; returns the integers, the real values they stand for, and the mask."""
    rng = np.random.default_rng(seed)
    x = quantize(rng.normal(0.0, std, shape), scale, dtype)
    mask = np.ones(shape, np.uint8)
    mask[:, -shape[1] // 4:] = 0
    return x, x.astype(np.float64) * scale, mask


SOFTMAX_BOUNDS = {  # variant -> (params, max |p - p_float| allowed); docs/OPS.md states these
    "ITAMax deeploy": (lambda: nl.ita_softmax_params(preset="deeploy"), 0.03),
    "ITAMax ita_rtl": (lambda: nl.ita_softmax_params(preset="ita_rtl"), 0.05),
    "ITAMax deeploy, int8 output": (lambda: nl.ita_softmax_params(preset="deeploy", output_offset=-128), 0.03),
    "ITAPartialMax deeploy": (lambda: nl.ita_softmax_params(streaming=True, preset="deeploy"), 0.04),
    "ITAPartialMax ita_rtl": (lambda: nl.ita_softmax_params(streaming=True, preset="ita_rtl", acc_bits=19), 0.03),
    "ITAPartialMax quantlib": (lambda: nl.ita_softmax_params(streaming=True, preset="quantlib"), 0.035),
    "IBertSoftmax": (lambda: nl.ibert_softmax_params(0.05), 0.02),
    "TFLiteSoftmax": (lambda: nl.tflite_softmax_params(0.05), 0.0025),
}


@pytest.mark.parametrize("variant", SOFTMAX_BOUNDS)
def test_softmax_fidelity(variant):
    make, bound = SOFTMAX_BOUNDS[variant]
    p = make()
    x, real, mask = attention_logits(p.input_scale)
    got = apply(p, x, mask)
    keep = mask.astype(bool)
    expected = np.where(keep, softmax(np.where(keep, real, -np.inf)), 0.0)
    assert np.abs(got - expected).max() <= bound
    assert np.all(got[~keep] == 0)


def test_ibert_softmax_fidelity_on_wide_inputs():
    # I-BERT's softmax takes int32 attention scores with small scales.
    p = nl.ibert_softmax_params(2e-4)
    x, real, mask = attention_logits(2e-4, np.int32)
    expected = np.where(mask > 0, softmax(np.where(mask > 0, real, -np.inf)), 0.0)
    assert np.abs(apply(p, x, mask) - expected).max() <= 0.006


def quantlib_float_softmax(v):
    """quantlib's float PACTSoftmax with log2 = 1 (see iSoftmax in docs/OPS.md)."""
    d = v - v.max(-1, keepdims=True)
    z = np.floor(-d)
    y = (0.3585 * (d + z + 1.353) ** 2 + 0.344) / 2**z
    return y / y.sum(-1, keepdims=True)


def test_i_softmax_fidelity():
    p = nl.isoftmax_params(0.05)
    x, real, _ = attention_logits(0.05)
    got = apply(p, x)
    assert np.abs(got - quantlib_float_softmax(real)).max() <= 0.01
    # Against the exp-based softmax the base-2-per-unit exponential shows (docs/OPS.md):
    assert np.abs(got - softmax(real)).max() <= 0.35


# --- fidelity: GELU ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.02, 0.05, 0.1])
def test_gelu_fidelity_on_every_int8_input(scale):
    real = ALL_INT8.astype(np.float64) * scale
    expected = gelu(real)
    assert np.abs(apply(nl.igelu_params(scale), ALL_INT8) - expected).max() <= 0.03
    # Requantized to the input scale: one output step plus the iGELU error.
    for p in (nl.requantized_igelu_params(scale, scale), nl.pyita_gelu_params(scale)):
        assert np.abs(apply(p, ALL_INT8) - expected).max() <= scale + 0.03, p.op
    # I-BERT's >> 14 needs wide inputs; with n = 0 it serves int8 too.
    assert np.abs(apply(nl.ibert_gelu_params(scale, n=0), ALL_INT8) - expected).max() <= 0.04


@pytest.mark.parametrize("scale, dtype", [(1e-4, np.int32), (3e-4, np.int16)])
def test_ibert_gelu_fidelity_on_wide_inputs(scale, dtype):
    x = quantize(np.random.default_rng(2).uniform(-6, 6, 20000), scale, dtype)
    got = apply(nl.ibert_gelu_params(scale), x)
    assert np.abs(got - gelu(x.astype(np.float64) * scale)).max() <= 0.03


ALL_INT16 = np.arange(-32768, 32768).astype(np.int16)


def gelu_tanh(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


@pytest.mark.parametrize("clip", [3.0, 6.0, 10.0, 20.0])
@pytest.mark.parametrize("approximate, reference", [("none", gelu), ("tanh", gelu_tanh)])
def test_gelu_table_fidelity_on_every_int16_input(clip, approximate, reference):
    scale = clip / 32767
    p = nl.gelu_table_params(scale, scale, approximate)
    assert p.op == "LutInterp16" and p.output_scale == scale  # no slope needed coarsening
    got = apply(p, ALL_INT16)
    assert np.abs(got - reference(ALL_INT16.astype(np.float64) * scale)).max() <= 2 * scale


def test_lut_interp16_table_construction():
    # A line needs no bias correction: its table is the line at the segment starts.
    p = nl.lut_interp16_params(lambda v: v, 1.0, 1.0)
    np.testing.assert_array_equal(p.consts["table"], np.clip(np.arange(513) * 128 - 32768, -32768, 32767))
    # f = 4 (v/128)^2 is 4 m^2 at the start of segment m = k - 256 and 4 m^2 + 4 m + 1 at its
    # midpoint, where the chord gives 4 m^2 + 4 m + 2: the bias R(1/2) = 1 lowers each sample.
    p = nl.lut_interp16_params(lambda v: 4 * (v / 128) ** 2, 1.0, 1.0)
    m = np.arange(512) - 256
    np.testing.assert_array_equal(p.consts["table"][:512], np.minimum(4 * m * m - 1, 32767))
    assert p.consts["table"][512] == 32767 and p.output_scale == 1.0  # saturated; steps of 2044 at most
    # A slope of 300 per input step moves 38400 output steps per segment: the output scale
    # is coarsened to 38400 / 32000.
    assert nl.lut_interp16_params(lambda v: 300 * v, 1.0, 1.0).output_scale == pytest.approx(1.2)


# --- fidelity: LayerNorm and NoNorm -------------------------------------------------------------


def hidden_states(scale, n=768, rows=32, seed=4):
    """Transformer-like rows: std 1.5 with four outlier channels 8x larger."""
    rng = np.random.default_rng(seed)
    real = rng.normal(0.0, 1.5, (rows, n))
    real[:, :4] *= 8
    x = quantize(real, scale)
    return x, x.astype(np.float64) * scale


LN_W = np.random.default_rng(9).normal(1.0, 0.2, 768)
LN_B = np.random.default_rng(10).normal(0.0, 0.1, 768)
OUT_SCALE = 8 / 127


@pytest.mark.parametrize("scale", [0.02, 0.05])
def test_layernorm_fidelity(scale):
    x, real = hidden_states(scale)
    expected = layernorm(real, LN_W, LN_B, eps=scale**2)  # the integer ops' epsilon: one step squared
    clipped = np.clip(expected, -128 * OUT_SCALE, 127 * OUT_SCALE)
    got = apply(nl.ilayernorm_params(scale, LN_W, LN_B, OUT_SCALE), x)
    # The floor square root of the integer variance loses up to one input step of std:
    # relative error 1/std_int on outputs up to 127 steps, plus half an output step.
    std_int = np.sqrt(((x - x.mean(-1, keepdims=True)) ** 2).mean(-1)).min()
    assert np.abs(got - clipped).max() <= 0.5 * OUT_SCALE + 127 * OUT_SCALE / std_int
    assert np.abs(apply(nl.ibert_layernorm_params(scale, LN_W, LN_B), x) - expected).max() <= 0.04


@pytest.mark.parametrize("scale", [0.02, 0.05])
def test_nonorm_fidelity(scale):
    x, real = hidden_states(scale)
    expected = real * LN_W + LN_B
    eps_w = np.abs(LN_W).max() / 127
    # NoNorm is exact apart from gamma's int8 rounding: |x| * eps_w / 2, plus beta's rounding.
    bound = np.abs(real).max() * eps_w / 2 + scale * eps_w
    assert np.abs(apply(nl.nonorm_params(scale, LN_W, LN_B), x) - expected).max() <= bound
    clipped = np.clip(expected, -128 * OUT_SCALE, 127 * OUT_SCALE)
    assert np.abs(apply(nl.inonorm_params(scale, LN_W, LN_B, OUT_SCALE), x) - clipped).max() <= bound + OUT_SCALE


def test_ibert_layernorm_shift_from_calibrated_variance():
    """A 16-bit LayerNorm input whose outliers set the scale: typical rows are a few dozen
    steps wide. The worst-case shift (any 16-bit row) leaves them no variance resolution;
    the calibrated one keeps every row up to 256x the calibration variance below 2^32 and
    the output near the float LayerNorm."""
    rng = np.random.default_rng(3)
    n = 384
    w, b = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)
    x = np.round(rng.normal(0, 45, (64, n))).astype(np.int16)  # std 45 steps, as MiniLM's FFN output
    sumsq = float(((x - x.mean(-1, keepdims=True)) ** 2).sum(-1).max())
    worst = nl.ibert_layernorm_params(1.0, w, b, input_bits=16)
    calibrated = nl.ibert_layernorm_params(1.0, w, b, input_bits=16, max_sumsq=sumsq)
    assert worst.attrs["shift"] == 5 and calibrated.attrs["shift"] == 0
    # a row with 16x the RMS deviation (256x the sum of squares) still fits: no OpError
    wide = np.round(x[:1] * 16.0).astype(np.int16)
    assert ops.IBertLayerNorm(wide, calibrated.consts["bias"], **calibrated.attrs).shape == wide.shape
    expected = layernorm(x.astype(np.float64), w, b, eps=0.0)
    err = {k: np.abs(apply(p, x) - expected).max() for k, p in (("worst", worst), ("calibrated", calibrated))}
    assert err["calibrated"] < 0.02 < err["worst"], err
    # huge calibrated rows never raise the shift beyond the worst case
    assert nl.ibert_layernorm_params(1.0, w, b, input_bits=16, max_sumsq=1e30).attrs["shift"] == 5


def test_ibert_layernorm_upshift_gives_the_row_mean_fraction_bits():
    """A 16-bit residual whose scale one outlier channel sets (MiniLM after its first
    feed-forward block): IBertLayerNorm rounds the row mean to a whole step, a few percent of
    the other channels' spread. The input scaled by 2^p (nonlinear.ibert_layernorm_upshift)
    brings the LayerNorm of those channels several times closer to the float one, while its
    factor 2^31 // std keeps >= 14 bits on the widest calibration row."""
    rng = np.random.default_rng(4)
    n = 384
    w, b = rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n)
    x = rng.normal(0, 6, (64, n))  # typical channels: std 6 steps
    x[:, 7] = rng.choice([-1, 1], 64) * rng.uniform(5000, 8000, 64)  # the outlier channel
    x = np.round(x).astype(np.int16)
    d = x - x.mean(-1, keepdims=True)
    sumsq = float((d * d).sum(-1).max())
    p = nl.ibert_layernorm_upshift(sumsq, 16)
    assert p == math.floor(31 - nl.LAYERNORM_FACTOR_BITS - 0.5 * math.log2(sumsq)) > 0
    assert 2**31 // (math.isqrt(int(sumsq)) << p) >= 2**nl.LAYERNORM_FACTOR_BITS
    plain = nl.ibert_layernorm_params(1.0, w, b, input_bits=16, max_sumsq=sumsq)
    shifted = nl.ibert_layernorm_params(2.0**-p, w, b, input_bits=16 + p, max_sumsq=sumsq * 4.0**p)
    expected = layernorm(x.astype(np.float64), w, b, eps=0.0)
    typical = np.arange(n) != 7
    err_plain = np.abs(apply(plain, x) - expected)[:, typical]
    err_shifted = np.abs(apply(shifted, x.astype(np.int32) << p) - expected)[:, typical]
    assert np.sqrt((err_shifted**2).mean()) < 0.4 * np.sqrt((err_plain**2).mean()), (err_shifted.mean(), err_plain.mean())


@pytest.mark.parametrize("sumsq, bits, p", [(None, 16, 0), (0.0, 16, 0), (2.0**28, 16, 3), (2.0**30, 16, 2),
                                            (2.0**34, 16, 0), (2.0**40, 16, 0), (4.0, 16, 8), (4.0, 20, 4), (4.0, 24, 0)])
def test_ibert_layernorm_upshift_bounds(sumsq, bits, p):
    """p: the factor keeps LAYERNORM_FACTOR_BITS on the widest row, at most 8, the input in 24 bits."""
    assert nl.ibert_layernorm_upshift(sumsq, bits) == p
