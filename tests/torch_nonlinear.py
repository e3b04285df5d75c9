"""Independent torch int64 implementations of the nonlinear ops, written from docs/OPS.md.

Nothing here imports refsim: these are the second opinion the op tests compare against.
Every function takes int64 tensors x of shape (rows, n) and a bool keep-mask of the same
shape (True = position kept), and returns an int64 tensor, or None where the formula
divides by zero.
"""

from __future__ import annotations

import torch

I64 = torch.int64
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
NEG_INF = torch.iinfo(I64).min


def t64(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=I64)


def shr(v, s):
    """floor(v / 2^s) for s >= 0 of any size."""
    v, s = t64(v), t64(s)
    return torch.bitwise_right_shift(v, torch.clamp(s, max=63))


def floordiv(a, b):
    return torch.div(t64(a), t64(b), rounding_mode="floor")


def truncdiv(a, b):
    return torch.div(t64(a), t64(b), rounding_mode="trunc")


def sign(v):
    return torch.sign(v)


def round_half_up_shift(v, s):
    """(v + 2^(s-1)) >> s, v for s = 0 (written with floor and the half bit)."""
    v, s = t64(v), t64(s)
    half = torch.where(s > 0, shr(v, torch.clamp(s - 1, min=0)) & 1, 0)
    return shr(v, s) + half


def round_half_even_shift(v, s):
    v, s = t64(v), t64(s)
    q = shr(v, s)
    rem = v - q * (t64(1) << torch.clamp(s, max=62))  # s <= 62 wherever used
    twice = 2 * rem
    den = t64(1) << torch.clamp(s, max=62)
    up = (twice > den) | ((twice == den) & ((q & 1) == 1))
    return torch.where(s > 0, q + up.to(I64), v)


def row_max(x, keep):
    return torch.where(keep, x, NEG_INF).amax(dim=-1, keepdim=True)


def isqrt(n):
    """Exact floor square root: float estimate, corrected with integer comparisons."""
    n = t64(n)
    r = torch.floor(torch.sqrt(n.to(torch.float64))).to(I64)
    for _ in range(4):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


# --- softmax ----------------------------------------------------------------------------


def rs(d, k):
    return d if k == 0 else (d + (1 << (k - 1))) >> k


def ita_max(x, keep, k, numerator, offset):
    m = row_max(x, keep)
    sh = rs(torch.where(keep, m - x, 0), k)
    total = torch.where(keep, shr(256, sh), 0).sum(-1, keepdim=True)
    inv = floordiv(numerator, torch.clamp(total, min=1))
    return torch.where(keep, shr(inv, sh), 0) + offset


def ita_partial_max(x, keep, group_width, k, numerator, max_init, offset, acc_bits, overflow):
    rows, n = x.shape
    gmax = torch.full((rows,), max_init, dtype=I64)
    acc = torch.zeros(rows, dtype=I64)
    acc_max = 2**acc_bits - 1
    for start in range(0, n, group_width):
        xs, ks = x[:, start:start + group_width], keep[:, start:start + group_width]
        has = ks.any(-1)
        c = torch.where(ks, xs, NEG_INF).amax(-1)
        grows = has & (c > gmax)
        s = torch.where(grows, rs(torch.where(grows, c - gmax, 0), k), 0)
        gmax = torch.where(grows, c, gmax)
        contrib = torch.where(ks, shr(256, rs(torch.where(ks, gmax[:, None] - xs, 0), k)), 0)
        acc = shr(acc, s) + contrib.sum(-1)
        if overflow == "wrap":
            acc = acc % (acc_max + 1)
        elif overflow == "saturate":
            acc = torch.clamp(acc, max=acc_max)
        elif bool((acc > acc_max).any()):
            return None
    kept_rows = keep.any(-1)
    if bool((kept_rows & (acc == 0)).any()):
        return None
    inv = floordiv(numerator, torch.clamp(acc, min=1))
    sh = rs(torch.where(keep, gmax[:, None] - x, 0), k)
    return torch.where(keep, shr(inv[:, None], sh), 0) + offset


def i_softmax(x, keep, coeffA, coeffB, coeffC, log2, n_levels):
    d = torch.where(keep, x - row_max(x, keep), 0)
    z = torch.clamp(floordiv(-d, log2), max=31)
    p = d + z * log2
    y = torch.where(keep, shr(coeffA * (p + coeffB) ** 2 + coeffC, z), 0)
    total = y.sum(-1, keepdim=True)
    if bool((keep.any(-1) & (total[:, 0] == 0)).any()):
        return None
    return floordiv(y * (n_levels - 1), torch.clamp(total, min=1))


def ibert_softmax(x, keep, x0_int, b_int, c_int, n, exp_mul, exp_shift, exp_bit, output_bit):
    d = torch.where(keep, x - row_max(x, keep), 0)
    d = torch.maximum(d, t64(n * x0_int))
    q = floordiv(d, x0_int)
    r = d - x0_int * q
    z = torch.clamp((r + b_int) * r + c_int, min=0)
    s = exp_shift - (n - q)
    product = z * exp_mul
    e = torch.where(s >= 0, round_half_even_shift(product, torch.clamp(s, min=0)), product << torch.clamp(-s, min=0))
    e = torch.where(keep, torch.clamp(e, max=2 ** (exp_bit - 1) - 1), 0)
    total = e.sum(-1, keepdim=True)
    if bool((keep.any(-1) & (total[:, 0] == 0)).any()):
        return None
    factor = floordiv(2**32, torch.clamp(total, min=1))
    return (e * factor) >> (32 - output_bit)


# gemmlowp, on int64 tensors holding int32 values


def wrap32(v):
    return ((v + 2**31) % 2**32) - 2**31


def srdhm(a, b):
    a, b = t64(a), t64(b)
    both_min = (a == INT32_MIN) & (b == INT32_MIN)
    return torch.where(both_min, INT32_MAX, torch.floor_divide(a * b + 2**30, 2**31))


def rdbpot(x, exponent):
    """Round half away from zero of x / 2^exponent, from gemmlowp's mask/threshold form."""
    x, exponent = t64(x), t64(exponent)
    mask = (t64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(I64)
    return (x >> exponent) + (remainder > threshold).to(I64)


def saturating_shl(x, exponent):
    threshold = 2 ** (31 - exponent) - 1
    return torch.where(x > threshold, INT32_MAX, torch.where(x < -threshold, INT32_MIN, x * 2**exponent))


def exp_interval(a):
    x = a + 2**28
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = rdbpot(x4, 2)
    t = rdbpot(wrap32(srdhm(wrap32(x4_over_4 + x3), 715827883) + x2), 1)
    return wrap32(1895147668 + srdhm(1895147668, wrap32(x + t)))


def exp_on_negative_values_q5_26(a):
    quarter = 2**24
    amq = (a & (quarter - 1)) - quarter
    result = exp_interval(saturating_shl(amq, 5))
    remainder = wrap32(amq - a)
    for exponent, multiplier in ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308),
                                 (2, 39332535), (3, 720401), (4, 242)):
        result = torch.where((remainder & (1 << (26 + exponent))) != 0, srdhm(result, multiplier), result)
    return torch.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x(a):
    half = floordiv(a + INT32_MAX + 1, 2)
    x = wrap32(1515870810 + srdhm(half, -1010580540))
    for _ in range(3):
        x = wrap32(x + saturating_shl(srdhm(x, wrap32(2**29 - srdhm(half, x))), 2))
    return saturating_shl(x, 1)


def clz32(u):
    """Leading zeros of 0 < u < 2^32, by counting: 31 - floor(log2 u)."""
    count = torch.zeros_like(u)
    for bit in range(1, 32):
        count = count + (u < 2**bit).to(I64)
    return count


def tflite_softmax(x, keep, input_multiplier, input_left_shift, diff_min):
    m = row_max(x, keep)
    d = x - torch.where(keep.any(-1, keepdim=True), m, 0)
    used = keep & (d >= diff_min)
    e = torch.where(used, exp_on_negative_values_q5_26(srdhm(torch.where(used, d, 0) * 2**input_left_shift, input_multiplier)), 0)
    total = torch.where(used, rdbpot(e, 12), 0).sum(-1, keepdim=True)
    if bool((total > INT32_MAX).any()):
        return None
    total = torch.clamp(total, min=1)
    h = clz32(total)
    scale = one_over_one_plus_x(total * 2**h - 2**31)
    out = torch.clamp(rdbpot(srdhm(scale, e), 12 - h + 23) - 128, -128, 127)
    return torch.where(used, out, -128)


# --- GELU -------------------------------------------------------------------------------


def i_gelu(x, b, one):
    d = torch.clamp(torch.abs(x), max=-b) + b
    erf = sign(x) * (one - d * d)
    return x * floordiv(one + erf, 2)


def requantized_i_gelu(x, mul, add, shift, b, one, lo, hi):
    return torch.clamp(round_half_up_shift(i_gelu(x, b, one) * mul + add, shift), lo, hi)


def ibert_gelu(x, b_int, c_int, n, shift_int):
    d = torch.clamp(torch.abs(x), max=-b_int) + b_int
    erf = floordiv(sign(x) * (d * d + c_int), 2**n)
    return x * (erf + shift_int)


def ita_gelu(x, q_1, q_b, q_c, eps_mul=None, eps_shift=0, eps_add=0):
    q = torch.clamp(x, min=-127)
    d = torch.clamp(torch.abs(q), max=-q_b) + q_b
    y = q * (sign(q) * (d * d + q_c) + q_1)
    if eps_mul is None:
        return y
    return torch.clamp(round_half_up_shift(y * eps_mul, eps_shift) + eps_add, -128, 127)


# --- LayerNorm --------------------------------------------------------------------------


def i_layernorm(x, weight, bias, log2_d, lo, hi, overflow):
    n = x.shape[-1]
    mean = truncdiv(x.sum(-1, keepdim=True), n)
    d = x - mean
    std = isqrt(floordiv((d * d).sum(-1, keepdim=True), n) + 1)
    y = shr(truncdiv(d * weight, std) + bias, log2_d)
    if overflow == "saturate":
        return torch.clamp(y, lo, hi)
    if overflow == "wrap":
        return (y - lo) % (hi - lo + 1) + lo
    return y


def ibert_layernorm(x, bias, shift):
    n = x.shape[-1]
    total = x.sum(-1, keepdim=True)
    mean = floordiv(total, n)
    twice_rem = 2 * (total - mean * n)
    mean = mean + ((twice_rem > n) | ((twice_rem == n) & ((mean & 1) == 1))).to(I64)
    d = x - mean
    scaled = shr(d, shift)
    if bool((torch.abs(scaled) >= 2**16).any()):
        return None  # that square alone reaches 2^32
    var = (scaled**2).sum(-1, keepdim=True)
    if bool((var >= 2**32).any()):
        return None
    std = isqrt(var) * 2**shift
    factor = floordiv(torch.full_like(std, 2**31), torch.clamp(std, min=1))
    return floordiv(d * factor, 2) + bias


def i_nonorm(x, weights, bias, mul, log2_d):
    return shr((x * weights + bias) * mul, log2_d)


def nonorm(x, gamma, beta):
    return x * gamma + beta
