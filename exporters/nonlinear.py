"""Export-time constants of the integer softmax, GELU and LayerNorm ops (floats live here only).

Every function takes the real scale of the op's input (one integer step of x is worth
`input_scale`) and returns an `OpParams`: the op name, its integer attributes, its constant
inputs (if any), and the scales that tie its integers to real values:

    p = ibert_softmax_params(0.05)
    y = builder.node(p.op, [x], **p.attrs)                  # consts: builder.const(...) per p.consts
    # real(y) = (y - p.output_zero_point) * p.output_scale

`p.input_scale` is the scale the op needs on its input: the given one, except for the ITA
softmax, whose shifts fix it (the exporter requantizes x to it first, as quantlib does).
Each function reproduces its anchor's derivation (named in its docstring) so that graphs
exported here hold the integers the anchor would hold; a scale the anchor cannot represent
is an ExportError, never a silent clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from refsim.ops.softmax import ITA_PRESETS

from .dyadic import ExportError, dyadic
from .importers.tflite_prepare import quantize_multiplier

# Coefficients the anchors use (floats, export time only).
LN2 = 0.6931  # I-BERT's -x0 (it writes -0.6931, not ln 2)
IBERT_EXP_POLY = (0.35815147, 0.96963238, 1.0)  # a*x^2 + b*x + c ~ exp(x) on [-ln2, 0]
ERF_A, ERF_B = -0.2888, -1.769  # erf(x) ~ sgn(x) * (a*(min(|x|, -b) + b)^2 + 1)
IBERT_SQRT2 = 1.4142  # I-BERT's k
QUANTLIB_EXP = (0.3585, 1.353, 0.344)  # quantlib's i-exp: A*(p + B)^2 + C
FLOAT32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class OpParams:
    """What an exporter needs to emit one integer nonlinearity.

    op: the IR op name; attrs: its attributes (plain ints/bools); consts: its constant
    inputs by input name, in the op's input order (int arrays in the storage type the op
    expects);
    input_scale: the scale x must have; output_scale, output_zero_point: real(y) =
    (y - output_zero_point) * output_scale (output_scale may be a per-channel array, and is
    negative where the anchor's integers carry a negative scale: see each function).
    """

    op: str
    attrs: dict
    input_scale: float
    output_scale: float | np.ndarray
    output_zero_point: int = 0
    consts: dict = field(default_factory=dict)


def _positive(scale, what: str) -> float:
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ExportError(f"{what}: input scale must be a positive finite number, got {scale!r}")
    return s


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


# --- softmax -------------------------------------------------------------------------------


def ita_softmax_params(input_scale=None, *, streaming: bool = False, preset: str = "deeploy",
                       n_levels: int = 256, group_width: int = 16, **overrides) -> OpParams:
    """ITAMax / ITAPartialMax attributes for a preset ('deeploy', 'ita_rtl', 'quantlib').

    The op approximates exp by powers of two: a difference of 2^k input steps halves the
    weight, so the input scale must be ln(2) / 2^k (quantlib's eps_in = eps_max / log2(e)
    with eps_max = 2^-k). `input_scale` is ignored beyond that: the returned input_scale is
    the one the exporter must requantize x to. The output is p * numerator / 256 +
    output_offset, i.e. output_scale = 256 / numerator and zero point output_offset.
    `overrides` set any attribute (k, numerator, max_init, output_offset, acc_bits, overflow).
    """
    if preset not in ITA_PRESETS:
        raise ExportError(f"ITA softmax: unknown preset {preset!r}; choose from {', '.join(ITA_PRESETS)}")
    attrs = dict(n_levels=n_levels, **ITA_PRESETS[preset])
    if streaming:
        attrs["group_width"] = group_width
    elif "max_init" in attrs:
        del attrs["max_init"]  # the non-streaming form starts from the row maximum
    attrs.update(overrides)
    k = attrs.get("k", 5)
    numerator = attrs.get("numerator") or ((n_levels // 2 - 1) * 256 if streaming else (n_levels - 1) * 256)
    return OpParams(
        op="ITAPartialMax" if streaming else "ITAMax",
        attrs=attrs,
        input_scale=math.log(2) / 2**k,
        output_scale=256 / numerator,
        output_zero_point=attrs.get("output_offset", 0),
    )


def isoftmax_params(input_scale, *, n_levels: int = 256) -> OpParams:
    """quantlib PACTIntegerSoftmax.updateCoeffs: coeffA = round(0.3585/0.3585) = 1,
    coeffB = round(1.353/eps), coeffC = round(0.344/(eps^2 * 0.3585)), log2 = round(1/eps).

    quantlib computes log2 as round(log2(2)/eps) = round(1/eps), so the integer exp halves
    per unit of real input, not per ln 2: the op is the softmax quantlib trains with (its
    float PACTSoftmax uses the same log2), which differs from exp-based softmax (docs/OPS.md).
    Output: y * (n_levels - 1) / sum, output_scale 1/(n_levels - 1).
    """
    eps = _positive(input_scale, "iSoftmax")
    a, b, c = QUANTLIB_EXP
    log2 = round(1.0 / eps)
    if log2 < 2:
        raise ExportError(f"iSoftmax: input scale {eps:.4g} gives log2={log2}; Deeploy's kernel needs an input scale below 2/3")
    attrs = dict(coeffA=round(a / a), coeffB=round(b / eps), coeffC=round(c / (eps * eps * a)), log2=log2, n_levels=n_levels)
    return OpParams("iSoftmax", attrs, input_scale=eps, output_scale=1.0 / (n_levels - 1))


def ibert_softmax_params(input_scale, *, output_bit: int = 8, exp_bit: int = 16, n: int = 30) -> OpParams:
    """I-BERT IntSoftmax: x0_int = floor(-0.6931/S), b_int = floor((b/a)/S), c_int = floor((c/a)/S^2).

    I-BERT then requantizes exp (scale a*S^2/2^n) to exp_bit bits with its QuantAct, whose
    range after calibration is [-1, 1]: exp_mul / 2^exp_shift ~ (a*S^2/2^n) * (2^(exp_bit-1) - 1),
    a 31-bit dyadic multiplier as I-BERT's batch_frexp makes. Output scale 2^-output_bit.
    """
    s = _positive(input_scale, "IBertSoftmax")
    a, b, c = IBERT_EXP_POLY
    exp_scale = a * s * s / 2**n
    d = dyadic(exp_scale * (2 ** (exp_bit - 1) - 1), mul_bits=31, max_shift=126, what="IBertSoftmax exp requant")
    attrs = dict(
        x0_int=math.floor(-LN2 / s),
        b_int=math.floor((b / a) / s),
        c_int=math.floor((c / a) / (s * s)),
        n=n,
        exp_mul=int(d.mul),
        exp_shift=int(d.shift),
        exp_bit=exp_bit,
        output_bit=output_bit,
    )
    if attrs["x0_int"] >= 0:
        raise ExportError(f"IBertSoftmax: input scale {s:.4g} is too coarse (x0_int = {attrs['x0_int']})")
    return OpParams("IBertSoftmax", attrs, input_scale=s, output_scale=2.0**-output_bit)


def tflite_softmax_params(input_scale, *, beta: float = 1.0) -> OpParams:
    """TFLite Micro SoftmaxPrepare for int8 in, int8 out (CalculateSoftmaxParams).

    real = min(beta * S * 2^(31-5), 2^31 - 1) in double from TFLite's float32 beta and
    scale; (input_multiplier, input_left_shift) = QuantizeMultiplierGreaterThanOne(real);
    diff_min = -floor(31 * 2^26 / 2^input_left_shift) (CalculateInputRadius(5, shift)).
    Output: zero point -128, scale 1/256.
    """
    s = _positive(input_scale, "TFLiteSoftmax")
    real = min(float(np.float32(beta)) * float(np.float32(s)) * 2.0**26, 2.0**31 - 1)
    if real <= 1.0:
        raise ExportError(f"TFLiteSoftmax: beta * scale = {beta * s:.4g} is too small (TFLite needs a multiplier > 1)")
    multiplier, left_shift = quantize_multiplier(real)  # real > 1: finite and positive
    if not 0 <= left_shift <= 31:
        raise ExportError(f"TFLiteSoftmax: input left shift {left_shift} outside [0, 31]")
    attrs = dict(input_multiplier=multiplier, input_left_shift=left_shift, diff_min=-((31 << 26) >> left_shift))
    return OpParams("TFLiteSoftmax", attrs, input_scale=s, output_scale=1.0 / 256, output_zero_point=-128)


# --- GELU ----------------------------------------------------------------------------------


def _quantlib_gelu_constants(eps: float) -> tuple[int, int, float]:
    """quantlib PACTIntegerGELU.updateCoeffs: b = RQ(-1.769, epsB), one = RQ(1, epsB^2*0.2888).

    RQ(v, e) = floor(v/e + 0.5) and epsB = eps/sqrt(2). Returns (b, one, output scale), the
    output scale being eps * epsB^2 * 0.2888.
    """
    eps_b = eps / math.sqrt(2.0)
    eps_one = eps_b * eps_b * -ERF_A
    b = _round_half_up(ERF_B / eps_b)
    one = _round_half_up(1.0 / eps_one)
    if b < -128 or one > 32767:
        raise ExportError(
            f"iGELU: input scale {eps:.4g} gives b={b}, one={one}; Deeploy's kernel holds b in int8 and "
            f"one in int16 (input scale >= 0.0196 keeps both)"
        )
    return b, one, eps * eps_one


def igelu_params(input_scale) -> OpParams:
    """quantlib/Deeploy iGELU(b, one) for an input scale; int32 output at scale eps*epsB^2*0.2888."""
    eps = _positive(input_scale, "iGELU")
    b, one, out_scale = _quantlib_gelu_constants(eps)
    return OpParams("iGELU", dict(b=b, one=one), input_scale=eps, output_scale=out_scale)


def requantized_igelu_params(input_scale, output_scale, *, n_levels: int = 256, signed: bool = True) -> OpParams:
    """Deeploy RequantizediGELU: iGELU then RequantShift to `output_scale`.

    mul/2^shift ~ iGELU scale / output_scale with mul as wide as the C kernel's int32
    `y*mul + add` allows for int8 input (|y| <= 128 * one); add = 0.
    """
    eps = _positive(input_scale, "RequantizediGELU")
    out = _positive(output_scale, "RequantizediGELU output")
    b, one, gelu_scale = _quantlib_gelu_constants(eps)
    y_bound = 128 * one
    mul_bits = max(1, min(31, (((1 << 31) - 1) // y_bound).bit_length() - 1))
    d = dyadic(gelu_scale / out, mul_bits=mul_bits, max_shift=62, what="RequantizediGELU requant")
    shift = int(d.shift)
    consts = dict(mul=np.array(int(d.mul), np.int32), add=np.array(0, np.int32), shift=np.array(shift, np.int32))
    attrs = dict(b=b, one=one, div=1 << shift, n_levels=n_levels, signed=signed)
    return OpParams("RequantizediGELU", attrs, input_scale=eps, output_scale=out, consts=consts)


def ibert_gelu_params(input_scale, *, n: int = 14) -> OpParams:
    """I-BERT IntGELU: S' = S/1.4142, b_int = floor(-1.769/S'), c_int = floor((1/-0.2888)/S'^2),
    erf scale S_erf = -0.2888 * S'^2 * 2^n, shift_int = floor(1/S_erf).

    The output scale S * S_erf / 2 is negative, as in I-BERT: real(y) = y * output_scale
    (a following Requant folds the sign into its multiplier).
    """
    s = _positive(input_scale, "IBertGelu")
    s_erf_in = s / IBERT_SQRT2
    erf_scale = s_erf_in * s_erf_in * ERF_A * 2**n
    attrs = dict(
        b_int=math.floor(ERF_B / s_erf_in),
        c_int=math.floor((1.0 / ERF_A) / (s_erf_in * s_erf_in)),
        n=n,
        shift_int=math.floor(1.0 / erf_scale),
    )
    return OpParams("IBertGelu", attrs, input_scale=s, output_scale=s * erf_scale / 2)


def _round_to_i16(v: float) -> int:
    """PyITA util.round_to_i16: floor(v + 0.5 + eps32), clipped to int16."""
    return min(max(math.floor(v + 0.5 + FLOAT32_EPS), -(1 << 15)), (1 << 15) - 1)


def pyita_gelu_params(input_scale, output_scale=None, *, requantize: bool = True) -> OpParams:
    """PyITA get_i_gelu_constants: S2 = S/sqrt(2), q_b = round(-1.769/S2), q_c = q_1 = round(1/(-0.2888*S2^2)).

    The raw product y = q*(L + q_1) has the negative scale S*(-0.2888)*S2^2/2. With
    `requantize`, ITA's 8-bit requantizer maps it to `output_scale` (default: the input scale,
    as PyITA does): eps_mul/2^eps_shift ~ |raw scale| / output_scale with a 7-bit magnitude,
    negated so the output scale is positive and eps_mul fits ITA's signed 8-bit register.
    (PyITA itself keeps eps_mul positive and reports the output scale as -S.)
    """
    s = _positive(input_scale, "ITAGelu")
    s2 = s / math.sqrt(2.0)
    q_b = _round_to_i16(ERF_B / s2)
    q_c = _round_to_i16(1.0 / (ERF_A * s2 * s2))
    if q_b < -181 or q_c <= -(1 << 15):
        raise ExportError(
            f"ITAGelu: input scale {s:.4g} gives q_b={q_b}, q_c={q_c}; PyITA squares q+q_b in int16 and "
            f"holds q_c in int16, exact only for an input scale >= 0.0147"
        )
    raw_scale = s * ERF_A * s2 * s2 / 2
    attrs = dict(q_1=q_c, q_b=q_b, q_c=q_c)
    if not requantize:
        return OpParams("ITAGelu", attrs, input_scale=s, output_scale=raw_scale)
    out = s if output_scale is None else _positive(output_scale, "ITAGelu output")
    d = dyadic(-raw_scale / out, mul_bits=7, max_shift=127, what="ITAGelu requant")
    attrs.update(eps_mul=-int(d.mul), eps_shift=int(d.shift), eps_add=0)
    return OpParams("ITAGelu", attrs, input_scale=s, output_scale=out)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def pyita_gelu_gain(p: OpParams):
    """The rounding gain of ITAGelu's output requantizer (`frontend.requant.rounding_gain`):
    eps_mul / 2^eps_shift against the exact raw-to-output scale ratio."""
    from .frontend.requant import rounding_gain

    raw = pyita_gelu_params(p.input_scale, requantize=False).output_scale
    return rounding_gain(raw / p.output_scale, p.attrs["eps_mul"], p.attrs["eps_shift"])


def gelu(x, approximate: str = "none") -> np.ndarray:
    """The float GELU: 0.5 x (1 + erf(x / sqrt 2)), or ONNX's tanh form (approximate="tanh")."""
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _tflite_round(v: np.ndarray) -> np.ndarray:
    """TfLiteRound: halves away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


# Largest step between neighbouring table entries the exporter allows (LutInterp16 holds the
# slope in an int16; the margin covers the bias correction).
_LUT_INTERP_MAX_STEP = 32000


def lut_interp16_params(fn, input_scale, output_scale, *, what: str = "LutInterp16") -> OpParams:
    """LiteRT's LUTPopulate<int16_t> table for y ~ fn(x) on int16 x at `input_scale`, int16 y.

    Entry k holds fn at the start of segment k, x_k = (-32768 + 128 k) * input_scale, in
    output steps, rounded half away from zero, minus LiteRT's bias correction: half the
    rounded error of linear interpolation at the segment's midpoint, which halves the
    largest interpolation error. Entry 512 is fn(32768 * input_scale), rounded (only the
    last slope uses it). Entries saturate at the int16 ends. (LiteRT spreads its 512
    segments over the 65535 steps from -32768 to 32767, so its anchors miss the 128-input
    segments LUTLookup interpolates over by up to one input step; here they fall on them.)

    The output scale is the given one, coarsened where needed so that neighbouring entries
    differ by at most 32000 (the int16 slope), which only a function far steeper than its
    output range suggests needs.
    """
    s_in = _positive(input_scale, what)
    s_out = _positive(output_scale, f"{what} output")
    anchors = (np.arange(513, dtype=np.float64) * 128 - 32768) * s_in
    f = np.asarray(fn(anchors), np.float64)
    mid = np.asarray(fn(anchors[:-1] + 64 * s_in), np.float64)
    if not (np.isfinite(f).all() and np.isfinite(mid).all()):
        raise ExportError(f"{what}: the function is not finite over the int16 input range at scale {s_in:.4g}")
    s_out = max(s_out, float(np.abs(np.diff(f)).max(initial=0.0)) / _LUT_INTERP_MAX_STEP)
    sample = _tflite_round(f / s_out)
    interpolated_mid = _tflite_round((f[1:] / s_out + sample[:-1]) / 2)
    bias = _tflite_round((interpolated_mid - _tflite_round(mid / s_out)) / 2)
    table = np.concatenate([sample[:-1] - bias, sample[-1:]])
    table = np.clip(table, -(1 << 15), (1 << 15) - 1).astype(np.int64)
    if np.abs(np.diff(table)).max(initial=0) >= 1 << 15:
        raise ExportError(f"{what}: neighbouring table entries differ by more than an int16 slope holds")
    return OpParams("LutInterp16", {}, input_scale=s_in, output_scale=s_out, consts=dict(table=table.astype(np.int16)))


def gelu_table_params(input_scale, output_scale, approximate: str = "none") -> OpParams:
    """GELU (exact erf, or the tanh form) as a LutInterp16 table on int16 inputs."""
    return lut_interp16_params(lambda x: gelu(x, approximate), input_scale, output_scale, what="GELU table")


# --- LayerNorm and NoNorm ---------------------------------------------------------------------


def _float_vector(values, name: str, what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ExportError(f"{what}: {name} holds non-finite values")
    return v


def ilayernorm_params(input_scale, weight, bias, output_scale, *, n_levels: int = 256, D: int | None = None) -> OpParams:
    """quantlib/Deeploy iLayerNorm: weight_int = round(w*D/S_out), bias_int = round(b*D/S_out).

    (x - mean)/std is scale free, so the input scale only sets LayerNorm's epsilon, which
    the integer op fixes at one input step squared (var + 1). D is the largest power of two
    up to 2^24 (quantlib's default) that keeps both in the kernel's int32.
    """
    _positive(input_scale, "iLayerNorm")
    out = _positive(output_scale, "iLayerNorm output")
    w = _float_vector(weight, "weight", "iLayerNorm")
    b = np.broadcast_to(_float_vector(bias, "bias", "iLayerNorm"), w.shape)
    largest = float(max(np.abs(w).max(initial=0.0), np.abs(b).max(initial=0.0)))
    if D is None:
        D = 1 << 24
        while D > 1 and round(largest * D / out) > (1 << 31) - 1:
            D >>= 1
    weight_int, bias_int = np.round(w * D / out), np.round(b * D / out)
    if max(np.abs(weight_int).max(initial=0), np.abs(bias_int).max(initial=0)) > (1 << 31) - 1:
        raise ExportError(f"iLayerNorm: weights up to {largest:.4g} do not fit int32 at output scale {out:.4g}")
    consts = dict(weight=weight_int.astype(np.int32), bias=bias_int.astype(np.int32))
    return OpParams("iLayerNorm", dict(D=D, n_levels=n_levels), input_scale=float(input_scale), output_scale=out, consts=consts)


# Rows whose variance reaches this many times the calibration data's still fit IBertLayerNorm's
# 2^32 (a row with 16x the largest RMS deviation calibration saw); the op refuses a row beyond,
# so the margin is wide: unseen data must not stop a run. Each factor 4 costs one bit of shift,
# and typical rows (MiniLM's FFN output: about 2^20 against 2^32) keep shift 0 even so.
LAYERNORM_SUMSQ_HEADROOM = 256


def ibert_layernorm_params(input_scale, weight, bias, *, input_bits: int = 8, max_sumsq: float | None = None) -> OpParams:
    """I-BERT IntLayerNorm: bias_int = floor((bias/weight) / (sqrt(N)/2^30)) per channel.

    The integer output y has the per-channel scale sqrt(N)/2^30 * weight (negative where the
    weight is). `shift` keeps the sum of N squared (shifted) differences below 2^32. Without
    `max_sumsq` it is the smallest that does for any `input_bits`-bit row. With it (the
    largest sum of squared deviations from the row mean that calibration saw, in input
    steps), it is I-BERT's own choice, the smallest shift the calibration rows never
    overflow, with LAYERNORM_SUMSQ_HEADROOM to spare, and never more than the worst case:
    every bit of shift drops a bit of the variance's resolution, which at a 16-bit input
    whose outliers set the scale leaves typical rows a few steps of std.
    """
    s = _positive(input_scale, "IBertLayerNorm")
    w = _float_vector(weight, "weight", "IBertLayerNorm")
    b = np.broadcast_to(_float_vector(bias, "bias", "IBertLayerNorm"), w.shape)
    if np.any(w == 0):
        raise ExportError(f"IBertLayerNorm: weight of channel {int(np.argmax(w == 0))} is 0; I-BERT divides the bias by it")
    n = w.size
    scaling = math.sqrt(n) / 2**30
    max_diff = (1 << input_bits) - 1
    shift = 0
    while n * (max_diff >> shift) ** 2 >= 1 << 32:
        shift += 1
    if max_sumsq is not None:
        worst = max_sumsq * LAYERNORM_SUMSQ_HEADROOM
        # sum((d >> k)^2) <= sum((|d| / 2^k + 1)^2) <= worst / 4^k + 2 sqrt(n * worst) / 2^k + n
        fits = [k for k in range(shift + 1) if worst / 4**k + 2 * math.sqrt(n * worst) / 2**k + n < 1 << 32]
        shift = fits[0] if fits else shift
    bias_int = np.floor((b / w) / scaling).astype(np.int64)
    return OpParams("IBertLayerNorm", dict(shift=shift), input_scale=s, output_scale=scaling * w, consts=dict(bias=bias_int))


# IBertLayerNorm rounds the row mean to a whole input step, and its factor 2^31 // std loses
# relative precision std / 2^31 (std = sqrt of the row's sum of squared deviations, in input
# steps). On a 16-bit residual stream whose scale an outlier channel sets (MiniLM: +-442 after
# the first feed-forward block), the mean's half step is up to 1e-3 of a typical row's spread
# and moves every output of the row by it. Scaling the input up by 2^p before the op gives
# the mean p fraction bits and costs the factor p bits: the exporter takes the largest p that
# keeps the factor >= 2^LAYERNORM_FACTOR_BITS on the widest calibration row (both errors are
# then about 1e-5 .. 1e-4 of a row's spread). Wider rows seen later still run exactly, with a
# coarser factor.
LAYERNORM_FACTOR_BITS = 14
LAYERNORM_MAX_UPSHIFT = 8


def ibert_layernorm_upshift(max_sumsq: float | None, input_bits: int) -> int:
    """p for an IBertLayerNorm input scaled by 2^p (see LAYERNORM_FACTOR_BITS): 0 without
    calibration statistics; `input_bits + p` stays <= 24, so the input fits int32."""
    if not max_sumsq or max_sumsq <= 0:
        return 0
    room = (31 - LAYERNORM_FACTOR_BITS) - 0.5 * math.log2(max_sumsq)  # log2 of 2^31 / 2^bits / widest std
    return int(max(0, min(math.floor(room), LAYERNORM_MAX_UPSHIFT, 24 - input_bits)))


def _symmetric(values: np.ndarray, bits: int):
    limit = (1 << (bits - 1)) - 1
    largest = float(np.abs(values).max(initial=0.0))
    eps = largest / limit if largest > 0 else 1.0
    return np.round(values / eps).astype(np.int64), eps


def inonorm_params(input_scale, weight, bias, output_scale, *, n_levels: int = 256) -> OpParams:
    """Deeploy iNoNorm for MobileBERT's NoNorm(gamma, beta): int8 weights at eps_w = max|gamma|/127,
    int32 bias at eps_in*eps_w, and mul/D ~ eps_in*eps_w/S_out with mul as wide as the C
    kernel's int32 (x*w + b)*mul allows for int8 x."""
    eps = _positive(input_scale, "iNoNorm")
    out = _positive(output_scale, "iNoNorm output")
    g = _float_vector(weight, "weight", "iNoNorm")
    b = np.broadcast_to(_float_vector(bias, "bias", "iNoNorm"), g.shape)
    w_int, eps_w = _symmetric(g, 8)
    b_int = np.round(b / (eps * eps_w)).astype(np.int64)
    acc_bound = 128 * 127 + int(np.abs(b_int).max(initial=0))
    if acc_bound > (1 << 31) - 1:
        raise ExportError("iNoNorm: the bias does not fit the kernel's int32")
    mul_bits = max(1, min(31, (((1 << 31) - 1) // acc_bound).bit_length() - 1))
    d = dyadic(eps * eps_w / out, mul_bits=mul_bits, max_shift=62, what="iNoNorm requant")
    consts = dict(weights=w_int.astype(np.int8), bias=b_int.astype(np.int32))
    attrs = dict(D=1 << int(d.shift), mul=int(d.mul), n_levels=n_levels)
    return OpParams("iNoNorm", attrs, input_scale=eps, output_scale=out, consts=consts)


def nonorm_params(input_scale, weight, bias, *, weight_bits: int = 8) -> OpParams:
    """MobileBERT NoNorm: gamma symmetric at weight_bits, beta at eps_in*eps_gamma; int32 output at that scale."""
    eps = _positive(input_scale, "NoNorm")
    g = _float_vector(weight, "gamma", "NoNorm")
    b = np.broadcast_to(_float_vector(bias, "beta", "NoNorm"), g.shape)
    g_int, eps_g = _symmetric(g, weight_bits)
    b_int = np.round(b / (eps * eps_g))
    if np.abs(b_int).max(initial=0) > (1 << 31) - 1:
        raise ExportError("NoNorm: beta does not fit int32 at the accumulator scale")
    consts = dict(gamma=g_int.astype(np.int8 if weight_bits <= 8 else np.int32), beta=b_int.astype(np.int32))
    return OpParams("NoNorm", dict(dtype="int32"), input_scale=eps, output_scale=eps * eps_g, consts=consts)
