"""Fake-quant mirrors of the I-BERT-mode integer ops and the lookup tables (see the package
docstring for the builder contract; the formulas are in docs/OPS.md and ref/ops/).

Each builder computes the refsim op's integers in float64; the comments bound every
intermediate below 2^53, where float64 holds integers exactly (sums, differences and
products of exact integers are then exact, and scaling by a power of two always is).
"""

from __future__ import annotations

import numpy as np

from ..dyadic import ExportError
from . import BOOL, as_double, const, emit, floor_div, isqrt, mirrors, odd, reduce_last

EXACT = float(2**53)


def _check(bound: float, what: str) -> None:
    if bound >= EXACT:
        raise ExportError(f"fake-quant mirror of {what}: an intermediate can reach {bound:.3g}, "
                          f"beyond the integers float64 holds exactly (2^53)")


# --- IBertSoftmax ------------------------------------------------------------------------------


def _round_shift_half_even(fg, a2: str, b2: str, q: str, shifts: np.ndarray, stem: str) -> str:
    """round_half_even(V / 2^s) (V * 2^-s for s <= 0) for V = a2 * 2^16 + b2, 0 <= b2 < 2^16,
    0 <= a2 < 2^53, s = shifts[q] per element: V itself may pass 2^53 (z * exp_mul reaches
    2^63), so it is kept in two limbs.

    s >= 17: F = floor(a2 / 2^(s-16)) and the remainder's upper limb Rh = a2 - F * 2^(s-16)
    are exact; the remainder Rh * 2^16 + b2 is above half (2^(s-1)) iff 2 Rh > 2^(s-16), or
    2 Rh == 2^(s-16) and b2 > 0 (2 Rh is even and 2^(s-16) >= 2, so 2 Rh < 2^(s-16) means
    2 Rh <= 2^(s-16) - 2, too little for b2 to make up); a tie (b2 == 0) rounds to even F.
    s <= 16: F = a2 * 2^(16-s) + floor(b2 / 2^s), remainder b2 mod 2^s (0 for s <= 0). F
    is exact below 2^53; above, the caller's clip to exp_max (< 2^53) takes it, and float
    rounding is monotone, so a value above exp_max stays at or above it."""
    index = emit(fg, "Cast", [q], f"{stem}.index", to=7)  # INT64: q is a small exact integer

    def per_q(values) -> str:
        return emit(fg, "Gather", [const(fg, np.asarray(values, np.float64), f"{stem}.table"), index], stem, axis=0)

    s = shifts.astype(np.int64)
    high = s >= 17
    d = np.where(high, 2.0 ** (s - 16).clip(1, None), 1.0)
    # the high branch
    f_hi = emit(fg, "Floor", [emit(fg, "Mul", [a2, per_q(1.0 / d)], stem)], stem)
    d_q = per_q(d)
    twice_rh = emit(fg, "Mul", [emit(fg, "Sub", [a2, emit(fg, "Mul", [f_hi, d_q], stem)], stem), const(fg, 2.0)], stem)
    above = as_double(fg, emit(fg, "Greater", [twice_rh, d_q], stem))
    at_half = as_double(fg, emit(fg, "Equal", [twice_rh, d_q], stem))
    b2_nonzero = as_double(fg, emit(fg, "Greater", [b2, const(fg, 0.0)], stem))
    tie_up = emit(fg, "Max", [b2_nonzero, odd(fg, f_hi, stem)], stem)
    up_hi = emit(fg, "Add", [above, emit(fg, "Mul", [at_half, tie_up], stem)], stem)
    r_hi = emit(fg, "Add", [f_hi, up_hi], stem)
    # the low branch
    lo_s = np.where(high, 0, s)
    t = 2.0 ** lo_s.astype(np.float64)
    b2_floor = emit(fg, "Floor", [emit(fg, "Mul", [b2, per_q(1.0 / t)], stem)], stem)
    rem = emit(fg, "Sub", [b2, emit(fg, "Mul", [b2_floor, per_q(t)], stem)], stem)
    f_lo = emit(fg, "Add", [emit(fg, "Mul", [a2, per_q(2.0 ** (16 - lo_s.astype(np.float64)))], stem), b2_floor], stem)
    twice_rem = emit(fg, "Mul", [rem, const(fg, 2.0)], stem)
    t_q = per_q(np.where(lo_s > 0, t, 2.0))  # s <= 0: no remainder, nothing rounds up
    above_lo = as_double(fg, emit(fg, "Greater", [twice_rem, t_q], stem))
    tie_lo = emit(fg, "Mul", [as_double(fg, emit(fg, "Equal", [twice_rem, t_q], stem)), odd(fg, f_lo, stem)], stem)
    r_lo = emit(fg, "Add", [f_lo, emit(fg, "Add", [above_lo, tie_lo], stem)], stem)
    is_high = emit(fg, "Cast", [per_q(high.astype(np.float64))], stem, to=BOOL)
    return emit(fg, "Where", [is_high, r_hi, r_lo], stem)


@mirrors("IBertSoftmax")
def ibert_softmax(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """I-BERT's i-exp softmax (ref/ops/softmax.py IBertSoftmax) with its key mask."""
    x0, b, c, n = attrs["x0_int"], attrs["b_int"], attrs["c_int"], attrs.get("n", 30)
    mul, shift = attrs["exp_mul"], attrs["exp_shift"]
    exp_max = float((1 << (attrs.get("exp_bit", 16) - 1)) - 1)
    output_bit = attrs.get("output_bit", 8)
    stem = "mirror.ibert_softmax"
    # |x - max| < 2^33 (at most 32-bit scores); its clip n * x0 and q * x0 below it.
    _check(abs(n * x0) + 2.0**33, "IBertSoftmax (n * x0_int)")
    # z <= |x0| (|x0| + |b|) + |c|; z * (exp_mul >> 16) and z * (exp_mul & 0xffff) < 2^53.
    z_bound = abs(x0) * (abs(x0) + abs(b)) + abs(c)
    _check(z_bound * 2.0**16, "IBertSoftmax (z * exp_mul limb)")
    x = inputs[0]
    keep = None
    if len(inputs) > 1 and inputs[1]:
        keep = emit(fg, "Cast", [inputs[1]], f"{stem}.keep", to=BOOL)
        x_kept = emit(fg, "Where", [keep, x, const(fg, -(2.0**60))], stem)
    else:
        x_kept = x
    m = reduce_last(fg, "ReduceMax", x_kept, stem)  # a fully masked row: -2^60, its d is replaced by 0
    d = emit(fg, "Sub", [x, m], stem)
    if keep is not None:
        d = emit(fg, "Where", [keep, d, const(fg, 0.0)], stem)
    # i-exp: x = max(d, n x0), q = x // x0 (both negative: floor(|x| / |x0|) in [0, n]), r = x - x0 q
    xc = emit(fg, "Max", [d, const(fg, float(n * x0))], stem)
    q = floor_div(fg, emit(fg, "Neg", [xc], stem), const(fg, float(-x0)), stem)
    r = emit(fg, "Sub", [xc, emit(fg, "Mul", [q, const(fg, float(x0))], stem)], stem)
    z = emit(fg, "Mul", [emit(fg, "Add", [r, const(fg, float(b))], stem), r], stem)
    z = emit(fg, "Max", [emit(fg, "Add", [z, const(fg, float(c))], stem), const(fg, 0.0)], stem)
    # z * exp_mul in two limbs: a = z * (mul >> 16), bl = z * (mul & 0xffff), carried into a2 * 2^16 + b2
    a = emit(fg, "Mul", [z, const(fg, float(mul >> 16))], stem)
    bl = emit(fg, "Mul", [z, const(fg, float(mul & 0xFFFF))], stem)
    carry = emit(fg, "Floor", [emit(fg, "Mul", [bl, const(fg, 2.0**-16)], stem)], stem)
    b2 = emit(fg, "Sub", [bl, emit(fg, "Mul", [carry, const(fg, 2.0**16)], stem)], stem)
    a2 = emit(fg, "Add", [a, carry], stem)
    shifts = shift - (n - np.arange(n + 1))  # s = exp_shift - (n - q)
    e = _round_shift_half_even(fg, a2, b2, q, shifts, stem)
    e = emit(fg, "Min", [e, const(fg, exp_max)], stem)
    if keep is not None:
        e = emit(fg, "Where", [keep, e, const(fg, 0.0)], stem)
    # sum <= row length * exp_max; e * factor <= total * (2^32 // total) <= 2^32
    total = reduce_last(fg, "ReduceSum", e, stem)
    factor = floor_div(fg, const(fg, 2.0**32), emit(fg, "Max", [total, const(fg, 1.0)], stem), stem)
    out = emit(fg, "Mul", [emit(fg, "Mul", [e, factor], stem), const(fg, 2.0 ** -(32 - output_bit))], stem)
    return emit(fg, "Floor", [out], stem)


# --- IBertLayerNorm ----------------------------------------------------------------------------


@mirrors("IBertLayerNorm")
def ibert_layernorm(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """I-BERT's LayerNorm (ref/ops/layernorm.py IBertLayerNorm): mean rounded half to even,
    std = isqrt(sum(((x - mean) >> shift)^2)) << shift, y = ((x - mean) * (2^31 // std)) >> 1
    + bias. Its input is at most 32 bits (the exporter's: 16 plus an upshift of at most 8),
    so with rows below 2^20 the row sum stays below 2^52; the op itself refuses a sum of
    squares from 2^32 on, so isqrt's argument is below 2^32."""
    shift = int(attrs.get("shift", 0))
    stem = "mirror.ibert_layernorm"
    x = inputs[0]
    count = reduce_last(fg, "ReduceSum", emit(fg, "Add", [emit(fg, "Mul", [x, const(fg, 0.0)], stem), const(fg, 1.0)], stem), stem)
    total = reduce_last(fg, "ReduceSum", x, stem)
    mean = floor_div(fg, total, count, stem)
    rest = emit(fg, "Sub", [total, emit(fg, "Mul", [mean, count], stem)], stem)  # in [0, n)
    twice = emit(fg, "Add", [rest, rest], stem)
    up = emit(fg, "Add", [as_double(fg, emit(fg, "Greater", [twice, count], stem)),
                          emit(fg, "Mul", [as_double(fg, emit(fg, "Equal", [twice, count], stem)), odd(fg, mean, stem)], stem)], stem)
    mean = emit(fg, "Add", [mean, up], stem)
    d = emit(fg, "Sub", [x, mean], stem)  # |d| < 2^33
    scaled = emit(fg, "Floor", [emit(fg, "Mul", [d, const(fg, 2.0**-shift)], stem)], stem)
    var = reduce_last(fg, "ReduceSum", emit(fg, "Mul", [scaled, scaled], stem), stem)
    std = emit(fg, "Mul", [isqrt(fg, var, stem), const(fg, 2.0**shift)], stem)  # < 2^16 * 2^30
    factor = floor_div(fg, const(fg, 2.0**31), emit(fg, "Max", [std, const(fg, 1.0)], stem), stem)
    # d * factor can pass 2^53 (|d| < 2^(shift+1) with a small std): factor in 16-bit limbs,
    # d * (factor >> 16) < 2^48 and d * (factor & 0xffff) < 2^49, and
    # (d * factor) >> 1 = d * (factor >> 16) * 2^15 + (d * (factor & 0xffff)) >> 1.
    f_hi = emit(fg, "Floor", [emit(fg, "Mul", [factor, const(fg, 2.0**-16)], stem)], stem)
    f_lo = emit(fg, "Sub", [factor, emit(fg, "Mul", [f_hi, const(fg, 2.0**16)], stem)], stem)
    y = emit(fg, "Add", [emit(fg, "Mul", [emit(fg, "Mul", [d, f_hi], stem), const(fg, 2.0**15)], stem),
                         emit(fg, "Floor", [emit(fg, "Mul", [emit(fg, "Mul", [d, f_lo], stem), const(fg, 0.5)], stem)], stem)], stem)
    bias = consts.get(1)
    if bias is not None:
        _check(float(np.abs(np.asarray(bias, np.float64)).max(initial=0)), "IBertLayerNorm (bias)")
        y = emit(fg, "Add", [y, const(fg, np.asarray(bias, np.float64).reshape(-1))], stem)
    return y


# --- GELU: the interpolated table and I-BERT's polynomial ----------------------------------------


@mirrors("LutInterp16")
def lut_interp16(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """LiteRT's interpolated int16 table (ref/ops/elementwise.py LutInterp16): i = (x + 2^15) >> 7,
    f = (x + 2^15) & 127, y = t[i] + (((t[i+1] - t[i]) * f + 64) >> 7); all below 2^24."""
    stem = "mirror.lut_interp16"
    table = const(fg, np.asarray(consts[1], np.float64).reshape(-1), f"{stem}.table")
    offset = emit(fg, "Add", [inputs[0], const(fg, 2.0**15)], stem)
    i = emit(fg, "Floor", [emit(fg, "Mul", [offset, const(fg, 2.0**-7)], stem)], stem)
    frac = emit(fg, "Sub", [offset, emit(fg, "Mul", [i, const(fg, 2.0**7)], stem)], stem)
    index = emit(fg, "Cast", [i], stem, to=7)  # INT64
    t0 = emit(fg, "Gather", [table, index], stem, axis=0)
    t1 = emit(fg, "Gather", [table, emit(fg, "Add", [index, fg.add_const(np.array(1, np.int64), f"{stem}.one")], stem)], stem, axis=0)
    step = emit(fg, "Mul", [emit(fg, "Sub", [t1, t0], stem), frac], stem)
    step = emit(fg, "Floor", [emit(fg, "Mul", [emit(fg, "Add", [step, const(fg, 64.0)], stem), const(fg, 2.0**-7)], stem)], stem)
    return emit(fg, "Add", [t0, step], stem)


@mirrors("Lut")
def lut(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """table[x + L // 2]: the exporter's Lut inputs are signed (`Walker.lookup_table` reads
    them with `Walker.get`), so the table starts at the type's lowest value."""
    stem = "mirror.lut"
    values = np.asarray(consts[1], np.float64).reshape(-1)
    index = emit(fg, "Cast", [emit(fg, "Add", [inputs[0], const(fg, float(values.size // 2))], stem)], stem, to=7)
    return emit(fg, "Gather", [const(fg, values, f"{stem}.table"), index], stem, axis=0)


@mirrors("IBertGelu")
def ibert_gelu(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """I-BERT's i-GELU (ref/ops/gelu.py IBertGelu): y = x * ((sgn(x) ((min(|x|, -b) + b)^2 + c)) >> n
    + shift_int), on an input of at most 16 bits (the exporter's)."""
    b, c, n, shift_int = attrs["b_int"], attrs["c_int"], attrs.get("n", 14), attrs["shift_int"]
    stem = "mirror.ibert_gelu"
    _check(float(b * b + abs(c)), "IBertGelu (d^2 + c)")
    _check(2.0**16 * ((((b * b) + abs(c)) >> n) + 1 + abs(shift_int)), "IBertGelu (y)")
    x = inputs[0]
    d = emit(fg, "Add", [emit(fg, "Min", [emit(fg, "Abs", [x], stem), const(fg, float(-b))], stem), const(fg, float(b))], stem)
    poly = emit(fg, "Mul", [emit(fg, "Sign", [x], stem), emit(fg, "Add", [emit(fg, "Mul", [d, d], stem), const(fg, float(c))], stem)], stem)
    erf = emit(fg, "Floor", [emit(fg, "Mul", [poly, const(fg, 2.0**-n)], stem)], stem)
    return emit(fg, "Mul", [x, emit(fg, "Add", [erf, const(fg, float(shift_int))], stem)], stem)
