"""The one requantization planner: how a real ratio between two scales becomes integers.

A requantization takes integers x at scale s_in (zero point z_in) to integers y at scale
s_out (zero point z_out): y = clip(round((x - z_in) * r) + z_out), r = s_in / s_out. Three
policies compute it:

- `dyadic` (integer hardware): `Requant` with r ~ mul / 2^shift (`exporters.dyadic`);
- `ort` (onnxruntime): `RequantF32`, onnxruntime's float32 multiply replayed exactly with
  integers (for QDQ models that must match onnxruntime bit for bit);
- `ita` (the ITA accelerator's requantizer): an 8-bit unsigned multiplier, shift <= 255,
  an int8 add, rounding half up, int8 out, one multiplier per layer.

The bit rule, one for every integer intermediate a requantization forms: **it stays below
2^62 in magnitude** (headroom under int64 for the rounding constant and a bias). For a
source bounded by |x - z_in| <= B that gives the `dyadic` multiplier
`m = clamp(62 - bitlength(B), 8, 31)` bits (`multiplier_bits`). An exact rescaled sum
y = round(sum_i (x_i - z_i) * r_i + c) (residual adds, embedding sums, QDQ Add/Sub/affine
chains) puts every term on one grid of k fraction bits, M_i = round(r_i * 2^k), with k
the largest for which every |M_i| < 2^31 and each of the n terms (constants included)
stays below 2^62 / 2^ceil(log2 n), so the sum does too; where int32 multipliers would leave a
term off by more than 2^-10 of an output step, the M_i are int64 (`sum_fraction_bits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from refsim.dtypes import TYPES

from ..dyadic import ExportError, dyadic
from .emitter import Emitter

POLICIES = ("dyadic", "ort", "ita")
PRODUCT_BITS = 62
MAX_MUL_BITS = 31
MIN_MUL_BITS = 8
# The largest error, in output steps, an exact sum's int32 multipliers may put on a term
# before the sum takes int64 ones (`sum_fraction_bits`).
SUM_TOLERANCE = 2.0 ** -10


def multiplier_bits(bound: int) -> int:
    """Bits of a dyadic multiplier for a source with |x - z_in| <= bound (module docstring)."""
    return max(MIN_MUL_BITS, min(MAX_MUL_BITS, PRODUCT_BITS - int(bound).bit_length()))


def type_bound(dtype: str, zero_point: int = 0) -> int:
    """The largest |x - zero_point| a value of `dtype` can have."""
    t = TYPES[dtype]
    return max(t.hi - int(zero_point), int(zero_point) - t.lo)


def float32_parts(scale) -> tuple[np.ndarray, np.ndarray]:
    """Each float32 value as the exact integer pair (mul, exp): value = mul * 2^exp, mul < 2^24."""
    s = np.asarray(scale, np.float32).astype(np.float64)
    fraction, exponent = np.frexp(s)
    mul = np.round(fraction * (1 << 24)).astype(np.int64)
    exp = exponent.astype(np.int64) - 24
    while mul.size and np.all((mul % 2 == 0) & (mul != 0)):  # smaller numbers, same value
        mul //= 2
        exp += 1
    return mul, exp


def requantize(em: Emitter, x: str, ratio, *, bound: int, dtype: str = "int8", policy: str = "dyadic",
               zero_point: int = 0, input_zero_point: int = 0, lo: int | None = None, hi: int | None = None,
               rounding: str = "half_even", axis: int = -1, ort_ratio=None, stem: str, what: str) -> str:
    """y = clip(round((x - input_zero_point) * ratio) + zero_point, lo, hi) as `dtype`.

    `ratio` is the exact real factor (scalar, or one per channel along `axis`; negative
    entries allowed for `dyadic`); `bound` bounds |x - input_zero_point|; `ort_ratio` is
    the float32 multiplier onnxruntime computes (its order of operations), for `ort`.
    `what` names the layer or node in errors.
    """
    if policy not in POLICIES:
        raise ExportError(f"unknown requantization {policy!r}; choose from {', '.join(POLICIES)}")
    ratio = np.asarray(ratio, np.float64)
    clip = {} if lo is None and hi is None else {"lo": lo, "hi": hi}
    if policy == "ita":
        return _ita(em, x, ratio, dtype, stem, what)
    if policy == "ort" and rounding == "half_even":
        f32 = np.asarray(ort_ratio if ort_ratio is not None else ratio, np.float32)
        if np.any(f32 < 0) or not np.all(np.isfinite(f32)):
            raise ExportError(f"{what}: scales must be positive and finite")
        mul, exp = float32_parts(f32)
        if input_zero_point:
            x = em.node("Sub", [x, em.const(np.asarray(input_zero_point), stem=f"{stem}.input_zero_point")], f"{stem}.centered")
        offset = em.const(np.asarray(zero_point), stem=f"{stem}.zero_point") if zero_point else None
        return em.node("RequantF32", [x, em.const(mul, "int32", f"{stem}.mul"), em.const(exp, "int16", f"{stem}.exp"), offset],
                       stem, axis=axis, dtype=dtype, **clip)
    sign = np.where(ratio < 0, -1, 1).astype(np.int64)
    mul_bits = multiplier_bits(bound)
    # A channel whose every value rounds to 0 (a LayerNorm gamma of ~0) gets multiplier 0.
    magnitude = np.where(np.abs(ratio) * (bound + 1) < 0.25, 0.0, np.abs(ratio))
    d = dyadic(magnitude, mul_bits=mul_bits, max_shift=PRODUCT_BITS + mul_bits, what=f"{what}: requantization")
    mul = d.mul * sign
    bias = em.const(-mul * int(input_zero_point), "int64", f"{stem}.bias") if input_zero_point else None
    offset = em.const(np.asarray(zero_point), stem=f"{stem}.zero_point") if zero_point else None
    shift = em.const(d.shift, "int8" if int(d.shift.max(initial=0)) < 128 else "int16", f"{stem}.shift")
    return em.node("Requant", [x, em.const(mul, "int32", f"{stem}.mul"), shift, bias, offset], stem,
                   axis=axis, rounding=rounding, dtype=dtype, **clip)


def _ita(em: Emitter, x: str, ratio: np.ndarray, dtype: str, stem: str, what: str) -> str:
    if dtype != "int8":
        raise ExportError(f"{what}: ITA's requantizer produces int8, not {dtype}")
    if np.any(ratio < 0):
        raise ExportError(f"{what}: ITA's requantizer takes an unsigned multiplier; the scale ratio is negative")
    d = ita_dyadic(ratio, what)
    mul = em.const(d.mul.reshape(()), "uint8", f"{stem}.mul")
    shift = em.const(d.shift.reshape(()), "uint8", f"{stem}.shift")
    add = em.const(0, "int8", f"{stem}.add")
    return em.node("Requant", [x, mul, shift, None, add], stem, rounding="half_up", dtype="int8")


def ita_dyadic(ratio, what: str):
    """ITA's requantizer constants: 8-bit unsigned multiplier, shift <= 255, one per layer."""
    d = dyadic(np.asarray(ratio, np.float64), mul_bits=8, max_shift=255, what=f"{what}: ITA requantization")
    if d.mul.size > 1:
        raise ExportError(f"{what}: ITA's requantizer takes one multiplier per layer; export without --per-channel")
    return d


def rounding_gain(ratio, mul, shift):
    """How far a requantization's realized factor mul / 2^shift is from the exact `ratio`:
    g = ratio / (mul / 2^shift), or None where every channel's g is 1 to float32 resolution
    (2^-24, finer than a fake-quant model's float32 scale can hold).

    The integers y = round(x * mul / 2^shift) stand for y * s_out, but are the float value
    rounded at the scale s_out * g: a fake-quant model that rounds at that scale (and
    dequantizes by s_out) rounds exactly where the integer graph does. ITA's 8-bit
    multipliers leave |g - 1| up to 2^-8, enough to move a few percent of an int8 tensor's
    values to the neighbouring step (6% at a random ViT's first ITA layer): a fake-quant
    model rounding at s_out disagrees with the integer model from there on. A
    channel whose multiplier is 0 (every value rounds to 0) keeps g = 1."""
    ratio = np.asarray(ratio, np.float64).reshape(-1)
    realized = (np.asarray(mul, np.float64) / np.exp2(np.asarray(shift, np.float64))).reshape(-1)
    g = np.divide(ratio, realized, out=np.ones(np.broadcast(ratio, realized).shape), where=realized != 0)
    if np.all(np.abs(g - 1.0) <= 2.0**-24):
        return None
    return float(g[0]) if g.size == 1 else g


def requant_gain(builder, tensor: str, ratio):
    """`rounding_gain` of the Requant that computed `tensor` in `builder`, from the integer
    graph's own constants (None: no Requant, or one exact to float32 resolution)."""
    node = next((n for n in reversed(builder.nodes) if tensor in n.outputs), None)
    if node is None or node.op != "Requant":
        return None
    mul, shift = (builder.tensors[i] for i in node.inputs[1:3])
    if not (mul.is_const and shift.is_const):
        return None
    return rounding_gain(ratio, mul.data, shift.data)


# --- exact rescaled sums --------------------------------------------------------------------


@dataclass
class Term:
    """One operand of an exact sum: integers `tensor` (|x| <= bound), real factor `ratio`
    (to the output scale; scalar or broadcasting along the last axes), zero point."""

    tensor: str
    ratio: np.ndarray
    bound: int
    zero_point: np.ndarray | int = 0


def sum_fraction_bits(terms: list[Term], constants: list[np.ndarray] = (), what: str = "sum") -> int:
    """The fraction bits k of an exact sum's common grid (module docstring).

    The grid is first sized for int32 multipliers. When the terms' ratios are far apart, that
    leaves the small-ratio terms few bits: a term x_i with |x_i| <= B_i is off by up to
    B_i * 2^-(k+1) output steps (MobileBERT's residual sum of an int8 feed-forward output,
    ratio 104, and its int64 NoNorm term, ratio 2.2e-5, got a 9-bit multiplier, 371 / 2^24,
    and half its sums a step or two off). Where some term could be off by more than
    SUM_TOLERANCE steps, the grid takes int64 multipliers, as fine as the 62-bit bound allows."""
    count = len(terms) + len(constants) + (1 if any(np.any(t.zero_point) for t in terms) else 0)
    limit = 2.0 ** (PRODUCT_BITS - math.ceil(math.log2(max(count, 1))))

    def reach(t: Term):
        return t.bound + np.abs(np.asarray(t.zero_point))

    def fits(k: int, mul_bits: int) -> bool:
        for t in terms:
            m = np.abs(np.rint(np.asarray(t.ratio, np.float64) * 2.0**k))
            if np.any(m >= 2.0**mul_bits) or np.any(m * reach(t) >= limit):
                return False
        return all(np.all(np.abs(np.rint(np.asarray(c, np.float64) * 2.0**k)) < limit) for c in constants)

    def finest(mul_bits: int) -> int | None:
        return next((k for k in range(PRODUCT_BITS, -1, -1) if fits(k, mul_bits)), None)

    k = finest(MAX_MUL_BITS)
    if k is None or any(np.max(reach(t)) * 2.0 ** -(k + 1) > SUM_TOLERANCE for t in terms):
        k = finest(PRODUCT_BITS)  # int64 multipliers: every int32 grid is one too, so k only grows
    if k is None:
        raise ExportError(f"{what}: the operands' scales are too far apart for an exact integer sum")
    return k


def exact_sum(em: Emitter, terms: list[Term], constants: list[tuple[np.ndarray, str]] = (), *, dtype: str,
              zero_point: int = 0, lo: int | None = None, hi: int | None = None, rounding: str = "half_even",
              stem: str, what: str) -> tuple[str, list[str], int]:
    """y = clip(round_shift(sum_i (x_i - z_i) * M_i + sum_j C_j, k) + zero_point) with
    M_i = round(r_i * 2^k), C_j = round(c_j * 2^k) (c_j in units of the output scale).
    Returns (y, the constant tensors C_j, k); a constant with one value goes into the
    Requant's bias, others are added as int64 tensors."""
    k = sum_fraction_bits(terms, [c for c, _ in constants], what)
    total, bias = None, np.int64(0)
    for i, t in enumerate(terms):
        m = np.rint(np.asarray(t.ratio, np.float64) * 2.0**k).astype(np.int64)
        zp = np.asarray(t.zero_point, np.int64)
        if np.any(zp):
            bias = bias - m * zp
        mul = em.const(m, "int32" if np.all(np.abs(m) < 2**MAX_MUL_BITS) else "int64", f"{stem}.term{i}.mul")
        part = em.node("Mul", [t.tensor, mul], f"{stem}.term{i}", dtype="int64")
        total = part if total is None else em.node("Add", [total, part], f"{stem}.sum", dtype="int64")
    names = []
    for c, cstem in constants:
        q = np.rint(np.asarray(c, np.float64) * 2.0**k).astype(np.int64)
        names.append(em.const(q, "int64", cstem))
        total = names[-1] if total is None else em.node("Add", [total, names[-1]], f"{stem}.sum", dtype="int64")
    bias = np.asarray(bias)
    bias_input = None
    if bias.size == 1 and int(bias.reshape(-1)[0]):
        bias_input = em.const(bias.reshape(()), "int64", f"{stem}.bias")
    elif bias.size > 1:
        total = em.node("Add", [total, em.const(bias, "int64", f"{stem}.bias")], f"{stem}.sum", dtype="int64")
    clip = {} if lo is None and hi is None else {"lo": lo, "hi": hi}
    offset = em.const(np.asarray(zero_point), stem=f"{stem}.zero_point") if zero_point else None
    y = em.node("Requant", [total, em.const(1, "int32", f"{stem}.one"), em.const(k, "int8", f"{stem}.shift"),
                            bias_input, offset], stem, rounding=rounding, dtype=dtype, **clip)
    return y, names, k
