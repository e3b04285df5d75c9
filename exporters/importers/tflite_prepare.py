"""TFLite's prepare-time arithmetic, done at import: float scales become the integer
multipliers and shifts a kernel uses, and elementwise functions of a narrow input become
lookup tables.

Everything here reproduces what a TFLite kernel's Prepare (or its per-element code, for
tables) computes, following TFLite Micro's reference kernels (tensorflow/lite/kernels/
internal/reference, the micro kernels' *_common.cc) and, where LiteRT's reference kernels
compute differently, LiteRT's (`reference="litert"`):

- `quantize_multiplier`: QuantizeMultiplier, real = q * 2^(e - 31), q rounded half away
  from zero (std::round), as a (q, e) pair;
- scalar helpers for gemmlowp's fixed-point functions on int32 raw values (exp, logistic,
  tanh, the inverse square root), used to tabulate a kernel over every int8/int16 input;
- float32 tables (`float_lut`), as TFLite's LUTPopulate computes them, with the C library's
  float functions (glibc's expf/tanhf/erfcf, called through ctypes, which is what LiteRT
  calls here; an MCU's libm may differ in the last bit).

No table here is approximated: each entry is the kernel's own integer arithmetic (or its
float32 arithmetic, operation by operation) for that input value.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from typing import Callable

import numpy as np
from refsim.ops.fixedpoint import (
    EXP_BARREL,
    exp_on_interval_between_negative_one_quarter_and_0_excl,
    exp_on_negative_values_q5_26,
    one_over_one_plus_x_for_x_in_0_1,
    rdbpot,
    saturating_shl,
    srdhm,
)
from refsim.ops.intmath import INT32_MAX, INT32_MIN

from .base import ImportFailure
from .tflite_tables import SIGMOID_TABLE_UINT16

F32 = np.float32
TYPE_RANGES = {"int8": (-128, 127), "int16": (-32768, 32767), "uint8": (0, 255), "int32": (INT32_MIN, INT32_MAX)}

# Fused activation functions (ActivationFunctionType) TFLite applies as a clamp on quantized outputs.
ACT_NONE, ACT_RELU, ACT_RELU_N1_TO_1, ACT_RELU6 = 0, 1, 2, 3
ACT_NAMES = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}


def wrap32(v: int) -> int:
    return ((int(v) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def round_half_away(v: float) -> int:
    """C's round() / std::round: halves away from zero (exact for any float)."""
    t = math.trunc(v)
    return int(t + (1 if v - t >= 0.5 else -1 if v - t <= -0.5 else 0))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier (double-rounding build): (q, e), real ~ q * 2^(e - 31).

    frexp gives real = f * 2^e, f in [0.5, 1); q = round(f * 2^31) half away from zero (f *
    2^31 is exact); a q of 2^31 is halved; below 2^-31 everything flushes to (0, 0).
    """
    real = float(real)
    if real == 0.0:
        return 0, 0
    if not math.isfinite(real) or real < 0:
        raise ImportFailure(f"a multiplier of {real!r} cannot be quantized (TFLite needs a finite, positive scale ratio)")
    f, e = math.frexp(real)
    q = round_half_away(f * 2.0**31)
    if q == 1 << 31:
        q //= 2
        e += 1
    if e < -31:
        return 0, 0
    return q, e


def calculate_input_radius(integer_bits: int, left_shift: int, total_signed_bits: int = 31) -> int:
    """TFLite CalculateInputRadius: floor((2^ib - 1) * 2^(tsb - ib) / 2^left_shift)."""
    max_rescaled = 1.0 * ((1 << integer_bits) - 1) * (1 << (total_signed_bits - integer_bits)) / (1 << left_shift)
    return int(math.floor(max_rescaled))


def quantize_value(f: float, scale: float, zero_point: int) -> int:
    """TFLite's Quantize(scale, zp, f) in kernel_util: zp + round(f / scale) in float32."""
    return int(zero_point) + round_half_away(float(F32(f) / F32(scale)))


def activation_range(activation: int, scale: float, zero_point: int, dtype: str, what: str) -> tuple[int, int]:
    """CalculateActivationRangeQuantized: the fused activation as a clamp of the output."""
    qmin, qmax = TYPE_RANGES[dtype]
    if activation == ACT_NONE:
        return qmin, qmax
    if activation == ACT_RELU:
        return max(qmin, quantize_value(0.0, scale, zero_point)), qmax
    if activation == ACT_RELU6:
        return max(qmin, quantize_value(0.0, scale, zero_point)), min(qmax, quantize_value(6.0, scale, zero_point))
    if activation == ACT_RELU_N1_TO_1:
        return max(qmin, quantize_value(-1.0, scale, zero_point)), min(qmax, quantize_value(1.0, scale, zero_point))
    raise ImportFailure(f"{what}: fused activation {ACT_NAMES.get(activation, activation)} is not supported on quantized tensors")


# --- MultiplyByQuantizedMultiplier, scalar (for tables) --------------------------------------


def mbqm(x: int, q: int, e: int) -> int:
    """MultiplyByQuantizedMultiplier(int32 x, q, e), double rounding (TFLite's default build)."""
    left, right = max(e, 0), max(-e, 0)
    return int(rdbpot(srdhm(wrap32(x * (1 << left)), q), right))


def mbqm_smaller_than_one_exp(x: int, q: int, e: int) -> int:
    return int(rdbpot(srdhm(x, q), -e))


# --- gemmlowp fixed point, any number of integer bits -----------------------------------------


def exp_on_negative_values(a: int, integer_bits: int) -> int:
    """gemmlowp exp_on_negative_values for FixedPoint<int32, integer_bits>: Q0.31 result."""
    if integer_bits == 5:
        return int(exp_on_negative_values_q5_26(a))
    fractional = 31 - integer_bits
    one_quarter = 1 << (fractional - 2)
    a_mod = (a & (one_quarter - 1)) - one_quarter
    result = int(exp_on_interval_between_negative_one_quarter_and_0_excl(saturating_shl(a_mod, integer_bits)))
    remainder = wrap32(a_mod - a)
    for exponent, multiplier in EXP_BARREL:
        if integer_bits > exponent and remainder & (1 << (fractional + exponent)):
            result = int(srdhm(result, multiplier))
    if integer_bits > 5 and a < -(1 << (36 - integer_bits)):
        result = 0
    return INT32_MAX if a == 0 else result


def logistic_fixed(a: int, integer_bits: int) -> int:
    """gemmlowp logistic: Q(integer_bits) in, Q0.31 out."""
    if a == 0:
        return 1 << 30
    positive = int(one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(wrap32(-abs(a)), integer_bits)))
    return positive if a > 0 else wrap32(INT32_MAX - positive)


def one_minus_x_over_one_plus_x_for_x_in_0_1(a: int) -> int:
    """gemmlowp (1 - a) / (1 + a) for a in [0, 1), Q0.31: Newton-Raphson in Q2.29."""
    half_denominator = (a + INT32_MAX + 1) >> 1  # RoundingHalfSum(a, One) for a >= 0
    x = wrap32(1515870810 + srdhm(half_denominator, -1010580540))
    for _ in range(3):
        one_minus = wrap32((1 << 29) - srdhm(half_denominator, x))
        x = wrap32(x + saturating_shl(srdhm(x, one_minus), 2))
    return int(saturating_shl(wrap32(x - (1 << 29)), 2))


def tanh_fixed(a: int, integer_bits: int) -> int:
    """gemmlowp tanh: Q(integer_bits) in, Q0.31 out (exp of 2a read as Q(integer_bits + 1))."""
    if a == 0:
        return 0
    n = a if a < 0 else wrap32(-a)
    t = one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(n, integer_bits + 1))
    return wrap32(-t) if a < 0 else t


def inv_sqrt_quantized_multiplier_exp(value: int) -> tuple[int, int]:
    """TFLite GetInvSqrtQuantizedMultiplierExp(value, kReverseShift): (multiplier, left shift)."""
    if value <= 1:
        return INT32_MAX, 0
    shift = 11
    while value >= 1 << 29:
        value //= 4
        shift += 1
    max_left_shift_bits = (32 - value.bit_length()) - 1
    left_shift_bit_pairs = max_left_shift_bits // 2 - 1
    shift -= left_shift_bit_pairs
    value <<= 2 * left_shift_bit_pairs
    half_input = int(rdbpot(value >> 1, 1))  # F3 raw, SaturatingRoundingMultiplyByPOT<-1>
    half_three = (1 << 28) + (1 << 27)
    x = 1 << 28  # F3 one
    for _ in range(5):
        x3 = int(saturating_shl(srdhm(srdhm(x, x), x), 6))  # Rescale<3> of an F9
        x = int(saturating_shl(wrap32(srdhm(half_three, x) - srdhm(half_input, x3)), 3))  # Rescale<3> of an F6
    x = int(srdhm(x, 1518500250))
    if shift < 0:
        x = wrap32(x << -shift)
        shift = 0
    return x, -shift


# --- tables ---------------------------------------------------------------------------------


def all_values(dtype: str) -> np.ndarray:
    lo, hi = TYPE_RANGES[dtype]
    return np.arange(lo, hi + 1, dtype=np.int64)


def tabulate(dtype: str, fn: Callable[[int], int]) -> np.ndarray:
    """fn evaluated at every value of dtype, smallest first: refsim's Lut table order."""
    return np.array([fn(int(v)) for v in all_values(dtype)], np.int64)


def _q4_27_table(what: str, in_scale: float, in_zp: int, fixed_fn, output_shift: int, output_offset: int) -> np.ndarray:
    """What TFLite Micro's int8 LOGISTIC and TANH share: the input rescaled to Q4.27
    (multiplier from frexp(scale * 2^27), saturating beyond CalculateInputRadius(4, shift)),
    gemmlowp's fixed-point function, its Q0.31 result rounded down by `output_shift` bits."""
    real = float(F32(in_scale)) * float(1 << 27)
    f, left_shift = math.frexp(real)
    multiplier = round_half_away(f * 2.0**31)
    if multiplier >= 1 << 31:
        raise ImportFailure(f"{what}: input multiplier overflows int32")
    radius = calculate_input_radius(4, left_shift, 31)

    def one(v: int) -> int:
        x = v - in_zp
        if x <= -radius:
            return -128
        if x >= radius:
            return 127
        q4 = mbqm(x, multiplier, left_shift)
        out = int(rdbpot(fixed_fn(q4, 4), output_shift))
        return min(max(out + output_offset, -128), 127)

    return tabulate("int8", one)


def logistic_int8_tflm(in_scale: float, in_zp: int) -> np.ndarray:
    """TFLite Micro LOGISTIC int8 (reference_integer_ops::Logistic): output scale 1/256, zp -128."""
    return _q4_27_table("LOGISTIC", in_scale, in_zp, logistic_fixed, 23, -128)


def tanh_int8_tflm(in_scale: float, in_zp: int) -> np.ndarray:
    """TFLite Micro TANH int8 (reference_integer_ops::Tanh): output scale 1/128, zp 0."""
    return _q4_27_table("TANH", in_scale, in_zp, tanh_fixed, 24, 0)


def _int16_logistic_params(in_scale: float) -> tuple[int, int]:
    """LOGISTIC int16 Prepare: (input_multiplier, input_left_shift); multiplier 0 marks the
    power-of-two scale 2^-12 the kernel handles with a plain shift."""
    s = float(F32(in_scale))
    log2 = math.log2(s)
    rounded = round(log2)
    pot = abs(log2 - rounded) < 1e-3  # CheckedLog2
    left_shift = 12 + rounded
    if pot and left_shift == 0:
        return 0, left_shift
    multiplier = s * 4096.0 * 3.0
    left_shift = 0
    while multiplier <= 32767.0 / 2.0 and left_shift <= 30:
        left_shift += 1
        multiplier *= 2.0
    return int(multiplier), left_shift


def float_lut(in_dtype: str, in_scale: float, in_zp: int, out_scale: float, out_zp: int, transform: Callable) -> np.ndarray:
    """TFLite LUTPopulate for int8/uint8 (LUTPopulateInt8), every step in float32."""
    lo, hi = TYPE_RANGES[in_dtype]
    inverse = F32(1) / F32(out_scale)
    table = []
    for v in range(lo, hi + 1):
        dequantized = F32(in_scale) * F32(v - in_zp)
        transformed = F32(transform(dequantized))
        rescaled = F32(round_half_away(float(F32(transformed * inverse))))
        quantized = int(F32(rescaled + F32(out_zp))) if math.isfinite(rescaled) else (hi if rescaled > 0 else lo)
        table.append(min(max(quantized, lo), hi))
    return np.array(table, np.int64)


class _Libm:
    """The C library's float32 functions (what TFLite's kernels call), through ctypes."""

    def __init__(self):
        self.lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for name in ("expf", "tanhf", "erfcf"):
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = ctypes.c_float, [ctypes.c_float]

    def __getattr__(self, name):
        fn = getattr(self.lib, name)
        return lambda v: F32(fn(float(v)))


_LIBM: _Libm | None = None


def libm() -> _Libm:
    global _LIBM
    if _LIBM is None:
        _LIBM = _Libm()
    return _LIBM


def sigmoid_f32(v):
    return F32(1) / (F32(1) + libm().expf(-v))


def tanh_f32(v):
    return libm().tanhf(v)


SQRT2_OVER_PI_F32 = F32((2 / math.sqrt(math.pi)) * math.sqrt(0.5))  # M_2_SQRTPI * M_SQRT1_2, then float
MINUS_SQRT1_2_F32 = F32(-math.sqrt(0.5))


def gelu_f32(v):
    """GeluTransform: 0.5f * x * erfcf(x * -M_SQRT1_2), in float32."""
    return F32(F32(0.5) * v) * libm().erfcf(F32(v * MINUS_SQRT1_2_F32))


def gelu_approx_f32(v):
    """GeluTransformApproximate: 0.5f * x * (1 + tanhf(sqrt(2/pi) * (x + 0.044715f * x^3)))."""
    cube = F32(F32(F32(F32(0.044715) * v) * v) * v)
    inner = F32(SQRT2_OVER_PI_F32 * F32(v + cube))
    return F32(F32(0.5) * v) * F32(F32(1) + libm().tanhf(inner))


def logistic_int16(in_scale: float) -> np.ndarray:
    """LOGISTIC int16 (reference_integer_ops::Logistic for int16): scale 1/32768 out."""
    multiplier, left_shift = _int16_logistic_params(in_scale)
    if multiplier == 0:
        multiplier, left_shift = 3 << left_shift, 0
    rounding = (1 << (left_shift - 1)) if left_shift > 0 else 0
    table = SIGMOID_TABLE_UINT16

    def one(v: int) -> int:
        x = (v * multiplier + rounding) >> left_shift
        a = abs(x)
        uh = a >> 9
        if uh >= 255:
            result = 0x7FFF << 10
        else:
            ua, ub = table[uh], table[uh + 1]
            result = (ua << 9) + (a & 0x1FF) * (ub - ua)
        result = (result + (1 << 9)) if x >= 0 else ((1 << 25) - result + (1 << 9) - 1)
        return (result & 0xFFFFFFFF) >> 10

    return tabulate("int16", one)


def hard_swish_int8(in_dtype: str, in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """HARD_SWISH int8 (reference_ops::HardSwish, quantized): int16 fixed point per value."""
    hires_input_scale = F32(F32(1.0) / F32(128.0)) * F32(in_scale)
    reluish_scale = F32(3.0) / F32(32768.0)
    out_mult, out_exp = quantize_multiplier(float(hires_input_scale / F32(out_scale)))
    out_m16 = _down_scale_to_int16(out_mult)
    if out_exp > 0:
        raise ImportFailure("HARD_SWISH: output multiplier exponent must be <= 0")
    rel_mult, rel_exp = quantize_multiplier(float(hires_input_scale / reluish_scale))
    rel_m16 = _down_scale_to_int16(rel_mult)
    lo, hi = TYPE_RANGES[in_dtype]

    def srdhm16(a, b):
        if a == b == -32768:
            return 32767
        ab = a * b
        nudge = (1 << 14) if ab >= 0 else 1 - (1 << 14)
        return _trunc_div(ab + nudge, 1 << 15)

    def sdhm16(a, b):  # SaturatingDoublingHighMul: truncating
        if a == b == -32768:
            return 32767
        return _to_int16(_trunc_div(a * b, 1 << 15))

    def sat_shl16(v, amount):
        return min(max(v * (1 << amount), -32768), 32767)

    def one(v: int) -> int:
        value = _to_int16(v - in_zp)
        hires = _to_int16(value * 128)
        preshift = _to_int16(srdhm16(hires, out_m16))
        reluish = hires
        if rel_exp > 0:
            reluish = sat_shl16(reluish, rel_exp - 1)
        reluish = _to_int16(srdhm16(reluish, rel_m16))
        if rel_exp > 0:
            reluish = sat_shl16(reluish, 1)
        if rel_exp < 0:
            reluish = _to_int16(int(rdbpot(reluish, -rel_exp)))
        reluish = _to_int16((reluish + (1 << 15)) >> 1)
        pre_out = sdhm16(reluish, preshift)
        out = _to_int16(int(rdbpot(pre_out, -out_exp)) + out_zp)
        return min(max(out, lo), hi)

    return tabulate(in_dtype, one)


def _trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _to_int16(v: int) -> int:
    return ((int(v) + 32768) & 0xFFFF) - 32768


def _down_scale_to_int16(m: int) -> int:
    """DownScaleInt32ToInt16Multiplier."""
    if m >= INT32_MAX - (1 << 15):
        return 32767
    return (m + (1 << 15)) >> 16


def rsqrt_int8(in_scale: float, in_zp: int, out_scale: float, out_zp: int) -> np.ndarray:
    """RSQRT int8 (elementwise.cc RsqrtEvalQuantized). Inputs below the zero point, which
    TFLite refuses at run time, map to 127 here (noted in docs/IMPORT.md)."""
    root = F32(np.sqrt(F32(in_scale)))
    q, e = quantize_multiplier(1.0 / float(F32(root * F32(out_scale))))

    def one(v: int) -> int:
        value = v - in_zp
        if value <= 0:
            return 127
        inv, inv_shift = inv_sqrt_quantized_multiplier_exp(value)
        data = mbqm(1, inv, inv_shift + 20)
        out = mbqm(data, q, e - 20) + out_zp
        return min(max(out, -128), 127)

    return tabulate("int8", one)


def float64_parts(value: float) -> tuple[int, int]:
    """A non-negative double as the exact pair (mul, exp): value = mul * 2^exp, mul < 2^53
    (odd unless zero), what RequantF64 takes."""
    if value == 0:
        return 0, 0
    f, e = math.frexp(value)
    mul, exp = int(f * (1 << 53)), e - 53
    while mul % 2 == 0:
        mul //= 2
        exp += 1
    return mul, exp
