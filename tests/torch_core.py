"""Independent torch int64 implementations of refsim's core ops, written from docs/OPS.md.

Nothing here imports refsim. Every function is the formula of docs/OPS.md in torch int64
tensor arithmetic, with rounding done by exact integer floor division (`torch.div(...,
rounding_mode="floor")`) and a comparison of the remainder with half the divisor, not by
the bit tricks of `refsim.ops.rounding`. TFLite's double rounding is written as TFLite and
gemmlowp write it (nudge and truncating division; mask and threshold), a third source.

Each reference takes the op's inputs as NumPy arrays (None for an omitted optional input),
`types=` the declared IR type name of each input, and the op's attributes, and returns an
`Expected(values, dtype)`: int64 values and the IR type name of the result. Where the
formula leaves the result undefined (a value that does not fit and policy 'error', an index
out of range, an intermediate beyond int64 by the bound OPS.md states) it raises
`Undefined`: the op must then raise a RefsimError instead of answering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def _signed(bits):
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1, bits


def _unsigned(bits):
    return 0, (1 << bits) - 1, bits


# name -> (lo, hi, bits), from the type conventions of docs/OPS.md.
TYPES = {
    "int2": _signed(2), "uint2": _unsigned(2), "int4": _signed(4), "uint4": _unsigned(4),
    "int8": _signed(8), "uint8": _unsigned(8), "int16": _signed(16), "uint16": _unsigned(16),
    "int32": _signed(32), "uint32": _unsigned(32), "int64": _signed(64),
    "ternary": (-1, 1, 2),
}
# Sub-byte types live unpacked in int8/uint8 arrays in memory (docs/OPS.md conventions).
STORAGE = {
    "int2": np.int8, "uint2": np.uint8, "int4": np.int8, "uint4": np.uint8, "ternary": np.int8,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64,
}
STANDARD_SIGNED = ("int8", "int16", "int32", "int64")
STANDARD_UNSIGNED = ("uint8", "uint16", "uint32")
ROUNDINGS = ("floor", "half_up", "half_away", "half_even", "trunc")


class Undefined(Exception):
    """The formula gives no result for these inputs; the op must refuse them."""


@dataclass
class Expected:
    values: np.ndarray  # int64
    dtype: str


def storage_type_name(array) -> str:
    """The IR type an array of this NumPy dtype stands for when no declared type is known."""
    return np.dtype(np.asarray(array).dtype).name


def T(a) -> torch.Tensor:
    """An int64 tensor holding the values of `a` exactly."""
    if isinstance(a, torch.Tensor):
        return a.to(torch.int64)
    return torch.from_numpy(np.array(a, dtype=np.int64, order="C", copy=True))


def result(t: torch.Tensor, dtype: str) -> Expected:
    values = t.numpy().astype(np.int64)
    lo, hi, _ = TYPES[dtype]
    assert values.size == 0 or (lo <= values.min() and values.max() <= hi), "reference bug: value outside its type"
    return Expected(values, dtype)


def _absmax(t) -> int:
    t = T(t) if not isinstance(t, torch.Tensor) else t
    if t.numel() == 0:
        return 0
    return max(abs(int(t.min())), abs(int(t.max())))


def _difference_fits_int64(x, zero_point) -> bool:
    """Every x - zero_point lies in int64 (exact, with Python integers)."""
    if x.numel() == 0 or zero_point.numel() == 0:
        return True
    lo = int(x.min()) - int(zero_point.max())
    hi = int(x.max()) - int(zero_point.min())
    return -(1 << 63) <= lo and hi <= INT64_MAX


def _require(condition: bool, why: str = "") -> None:
    if not condition:
        raise Undefined(why)


# --- rounding ----------------------------------------------------------------------------


def round_div(v: torch.Tensor, d: torch.Tensor, mode: str) -> torch.Tensor:
    """v / d rounded as `mode` says (d > 0), from q = floor(v / d) and r = v - q*d."""
    v, d = torch.broadcast_tensors(T(v), T(d))
    q = torch.div(v, d, rounding_mode="floor")
    r = v - q * d  # in [0, d); any int64 wrap in q*d cancels here, the true r fits
    twice = 2 * r
    if mode == "floor":
        return q
    if mode == "trunc":  # toward zero: a negative quotient that is not exact moves up
        return q + ((v < 0) & (r != 0))
    if mode == "half_up":  # ties toward +inf
        return q + (twice >= d)
    if mode == "half_away":  # ties away from zero
        return q + ((twice > d) | ((twice == d) & (v >= 0)))
    if mode == "half_even":  # ties to the even neighbour
        return q + ((twice > d) | ((twice == d) & (q % 2 != 0)))
    raise ValueError(mode)


def _compare(v: torch.Tensor, k: int, op: str) -> torch.Tensor:
    """v == k or v < k for a Python int k that may lie outside int64."""
    if k < INT64_MIN:
        return torch.zeros_like(v, dtype=torch.bool)
    if k > INT64_MAX:
        return torch.full_like(v, op == "<", dtype=torch.bool)
    return v == k if op == "==" else v < k


def _same_class_over_4(v: torch.Tensor, s: int) -> torch.Tensor:
    """For s >= 63, an integer c such that c/4 rounds like v/2^s in every mode.

    |v| <= 2^63 <= 2^s, so v/2^s lies in [-1, 1). Every rounding mode is constant on the
    open intervals between consecutive multiples of 1/2, so c/4 only has to sit in the same
    place as v/2^s: at -1, in (-1, -1/2), at -1/2, in (-1/2, 0), at 0, in (0, 1/2), at 1/2,
    in (1/2, 1).
    """
    # where v/2^s = 1/2; from s = 65 on it lies beyond every int64 v, as it does for s = 65
    half = 1 << (min(s, 65) - 1)
    c = torch.sign(v)
    c = torch.where(_compare(v, -half, "<"), -3, c)
    c = torch.where(_compare(v, -2 * half, "=="), -4, c)
    c = torch.where(_compare(v, -half, "=="), -2, c)
    c = torch.where(_compare(v, half, "=="), 2, c)
    c = torch.where(~_compare(v, half, "<") & ~_compare(v, half, "=="), 3, c)
    return c


def round_shift(v, s, mode: str) -> torch.Tensor:
    """v / 2^s rounded as `mode` says, for every int64 v and every s >= 0."""
    v, s = torch.broadcast_tensors(T(v), T(s))
    out = torch.empty_like(v)
    for shift in torch.unique(s).tolist():
        sel = s == shift
        part = v[sel]
        if shift == 0:
            out[sel] = part
            continue
        if shift >= 63:
            part, shift = _same_class_over_4(part, shift), 2
        out[sel] = round_div(part, torch.tensor(1 << shift), mode)
    return out


def srdhm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul, written as TFLite writes it."""
    ab = a * b
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    high = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    return torch.where((a == b) & (a == INT32_MIN), torch.tensor(INT32_MAX), high)


def rdbpot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT (mask and threshold) of an int32-valued x.

    gemmlowp allows exponents up to 31; for |x| <= 2^31 every exponent from 33 up gives
    0 (|x / 2^e| < 1/2), so clamping at 62 changes nothing and keeps the mask in int64.
    """
    e = torch.clamp(exponent, max=62)
    mask = torch.bitwise_left_shift(torch.ones_like(e), e) - 1
    remainder = x & mask
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0)
    return torch.bitwise_right_shift(x, e) + (remainder > threshold)


# --- fitting into a declared width --------------------------------------------------------


def fit(v: torch.Tensor, lo: int, hi: int, bits: int, policy: str) -> torch.Tensor:
    """The overflow policy of docs/OPS.md on exact values v."""
    if v.numel() == 0 or (int(v.min()) >= lo and int(v.max()) <= hi):
        return v
    if policy == "saturate":
        return torch.clamp(v, lo, hi)
    if policy == "wrap":
        _require(hi - lo + 1 == 1 << bits, "wrap needs a full two's complement range")
        # ((v - lo) mod 2^bits) + lo, as v minus the right multiple of 2^bits
        mode = "floor" if lo == 0 else "half_up"  # [0, 2^b) or [-2^(b-1), 2^(b-1))
        k = round_shift(v, torch.tensor(bits), mode)
        step = 1 << min(bits, 62)
        for _ in range(1 << (bits - min(bits, 62))):  # 2^bits = step * (1 or 2)
            v = v - k * step
        return v
    raise Undefined(f"value outside [{lo}, {hi}] with overflow='error'")


def narrowest_standard(lo: int, hi: int) -> str:
    ladder = STANDARD_UNSIGNED + STANDARD_SIGNED if lo >= 0 else STANDARD_SIGNED
    for name in ladder:
        tlo, thi, _ = TYPES[name]
        if tlo <= lo and hi <= thi:
            return name
    raise Undefined(f"no standard type holds [{lo}, {hi}]")


# --- requantization ------------------------------------------------------------------------


def _along(p, ndim: int, axis: int, channels: int):
    """A scalar or per-channel parameter shaped to broadcast along `axis`."""
    t = T(p)
    if t.numel() == 1:
        return t.reshape(())
    _require(t.ndim == 1 and ndim > 0 and t.numel() == channels, "per-channel size mismatch")
    shape = [1] * ndim
    shape[axis] = t.numel()
    return t.reshape(shape)


def requant(x, mul, shift, bias=None, offset=None, *, types=None, axis=-1, rounding="half_up", dtype="int8", lo=None, hi=None):
    """y = clip(round_shift(x*mul + bias, shift, rounding) + offset, lo, hi), or TFLite's
    clip(RDBPOT(SRDHM(x << left, mul), right) + offset, lo, hi) for rounding 'double'."""
    X = T(x)
    ndim = max(X.ndim, 1)
    _require(-ndim <= axis < ndim, "axis out of range")
    axis %= ndim
    channels = X.shape[axis] if X.ndim else 1
    M, S = _along(mul, X.ndim, axis, channels), _along(shift, X.ndim, axis, channels)
    B = _along(bias, X.ndim, axis, channels) if bias is not None else torch.tensor(0)
    O = _along(offset, X.ndim, axis, channels) if offset is not None else torch.tensor(0)
    tlo, thi, _ = TYPES[dtype]
    lo = tlo if lo is None else lo
    hi = thi if hi is None else hi
    _require(tlo <= lo <= hi <= thi, "clip range outside the output type")
    _require(S.numel() == 0 or int(S.min()) >= 0, "negative shift")
    if rounding == "double":
        _require(bias is None or _absmax(B) == 0, "double rounding takes no bias")
        _require(M.numel() == 0 or (int(M.min()) >= INT32_MIN and int(M.max()) <= INT32_MAX), "mul beyond int32")
        _require(_absmax(X) <= 1 << 31, "x beyond int32")
        left = torch.clamp(31 - S, min=0)
        right = torch.clamp(S - 31, min=0)
        a = X * torch.bitwise_left_shift(torch.ones_like(left), left)  # x << left, exact in int64
        _require(a.numel() == 0 or (int(a.min()) >= INT32_MIN and int(a.max()) <= INT32_MAX), "x << left beyond int32")
        _require(X.numel() == 0 or _absmax(O) + (1 << 31) <= INT64_MAX, "offset beyond int64")
        v = rdbpot(srdhm(a, M), right)
    else:
        _require(_absmax(X) * _absmax(M) + _absmax(B) + _absmax(O) <= INT64_MAX, "x*mul + bias + offset beyond int64")
        v = round_shift(X * M + B, S, rounding)
    return result(torch.clamp(v + O, lo, hi), dtype)


def requant_shift(x, mul, add, *, types=None, div, n_levels=256, signed=True):
    """quantlib/Deeploy: clip(floor((x*mul + add)/div + 1/2)) to n_levels (broadcasting)."""
    _require(div >= 1 and div & (div - 1) == 0, "div is not a power of two")
    X, M, A = T(x), T(mul), T(add)
    _require(_absmax(X) * _absmax(M) + _absmax(A) <= INT64_MAX, "x*mul + add beyond int64")
    lo, hi = (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)
    ladder = ("int2", "int4", "int8", "int16", "int32") if signed else ("uint2", "uint4", "uint8", "uint16", "uint32")
    out = next((n for n in ladder if TYPES[n][0] <= lo and hi <= TYPES[n][1]), None)
    _require(out is not None, "n_levels beyond 32 bits")
    z = X * M + A
    # floor(z/div + 1/2) = floor((z + div/2) / div): half_up division by div = 2^log2(div)
    y = round_shift(z, torch.tensor(div.bit_length() - 1), "half_up")
    return result(torch.clamp(y, lo, hi), out)


# --- matrix products -----------------------------------------------------------------------


def matmul(a, b, a_zero_point=None, b_zero_point=None, bias=None, *, types=None, transA=False, transB=False, acc_bits=32, overflow="error"):
    """acc = (A - a_zero_point) @ (B - b_zero_point) + bias, fitted into acc_bits."""
    A, B = T(a), T(b)
    _require(A.ndim >= 2 and B.ndim >= 2, "rank < 2")
    if transA:
        A = A.transpose(-1, -2)
    if transB:
        B = B.transpose(-1, -2)
    _require(A.shape[-1] == B.shape[-2], "inner dimensions differ")
    if a_zero_point is not None:
        za = T(a_zero_point)
        _require(za.numel() == 1, "a_zero_point not a scalar")
        _require(_difference_fits_int64(A, za), "a - a_zero_point beyond int64")
        A = A - za.reshape(())
    if b_zero_point is not None:
        zb = T(b_zero_point)
        _require(zb.ndim <= 1 and (zb.numel() == 1 or zb.numel() == B.shape[-1]), "bad b_zero_point")
        _require(_difference_fits_int64(B, zb), "b - b_zero_point beyond int64")
        B = B - zb.reshape(-1)
    k = A.shape[-1]
    bias_t = T(bias) if bias is not None else torch.tensor(0)
    if bias is not None:
        _require(bias_t.ndim <= 1 and (bias_t.numel() in (1, B.shape[-1])), "bad bias")
        bias_t = bias_t.reshape(-1)
    _require(k * _absmax(A) * _absmax(B) + _absmax(bias_t) <= INT64_MAX, "sum may leave int64")
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    except RuntimeError:
        raise Undefined("batch shapes do not broadcast") from None
    acc = torch.matmul(A, B) if A.numel() and B.numel() else torch.zeros(batch + (A.shape[-2], B.shape[-1]), dtype=torch.int64)
    acc = acc + bias_t
    if acc_bits < 64:
        lo, hi, bits = _signed(acc_bits)
        acc = fit(acc, lo, hi, bits, overflow)
    return result(acc, "int32" if acc_bits <= 32 else "int64")


# --- elementwise ---------------------------------------------------------------------------


_INTERVAL = {
    "Add": lambda a, b: (a[0] + b[0], a[1] + b[1]),
    "Sub": lambda a, b: (a[0] - b[1], a[1] - b[0]),
    "Mul": lambda a, b: (min(x * y for x in a for y in b), max(x * y for x in a for y in b)),
}
_TORCH = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}


def _arith(op, a, b, types, dtype, overflow):
    A, B = T(a), T(b)
    if dtype is None:
        # the narrowest standard type holding every result the declared input types allow
        out = narrowest_standard(*_INTERVAL[op](TYPES[types[0]][:2], TYPES[types[1]][:2]))
    else:
        out = dtype
    try:
        shape = torch.broadcast_shapes(A.shape, B.shape)
    except RuntimeError:
        raise Undefined("shapes do not broadcast") from None
    va = (int(A.min()), int(A.max())) if A.numel() else (0, 0)
    vb = (int(B.min()), int(B.max())) if B.numel() else (0, 0)
    lo_v, hi_v = _INTERVAL[op](va, vb)
    _require(INT64_MIN <= lo_v and hi_v <= INT64_MAX, "exact result beyond int64")
    lo, hi, bits = TYPES[out]
    y = _TORCH[op](A, B).reshape(shape)
    return result(fit(y, lo, hi, bits, overflow), out)


def add(a, b, *, types, dtype=None, overflow="error"):
    return _arith("Add", a, b, types, dtype, overflow)


def sub(a, b, *, types, dtype=None, overflow="error"):
    return _arith("Sub", a, b, types, dtype, overflow)


def mul(a, b, *, types, dtype=None, overflow="error"):
    return _arith("Mul", a, b, types, dtype, overflow)


def relu(x, *, types):
    return result(torch.clamp(T(x), min=0), types[0])


def clip(x, *, types, lo=None, hi=None):
    X = T(x)
    tlo, thi, _ = TYPES[types[0]]
    _require(lo is None or hi is None or lo <= hi, "lo > hi")
    # the result keeps x's type: a bound beyond it would give values the type cannot hold
    _require((lo is None or lo <= thi) and (hi is None or hi >= tlo), "a bound lies beyond x's type")
    if lo is not None and lo > tlo:  # a bound below every value of the type changes nothing
        X = torch.maximum(X, torch.tensor(lo))
    if hi is not None and hi < thi:
        X = torch.minimum(X, torch.tensor(hi))
    return result(X, types[0])


def cast(x, *, types, dtype, overflow="error"):
    lo, hi, bits = TYPES[dtype]
    return result(fit(T(x), lo, hi, bits, overflow), dtype)


def lut(x, table, *, types, in_graph=False):
    """y = table[x + L/2] for signed x, table[x] for unsigned x, L = len(table)."""
    X, table_t = T(x), T(table)
    L = table_t.numel()
    _require(table_t.ndim == 1 and L > 0, "table not a non-empty vector")
    lo, hi, _ = TYPES[types[0]]
    if in_graph:  # in a graph the table must list every value of x's declared type
        _require(L == hi - lo + 1, "table length differs from the number of values of x's type")
    index = X + (L // 2 if lo < 0 else 0)
    _require(index.numel() == 0 or (int(index.min()) >= 0 and int(index.max()) < L), "x outside the table")
    return result(table_t[index], types[1])


def lut_interp16(x, table, *, types):
    """LiteRT's int16 LUTLookup: 512 segments of 128 inputs, linear between table[k] and
    table[k+1], the step rounded half up in 1/128ths; the slope must fit int16."""
    X, table_t = T(x), T(table)
    _require(tuple(table_t.shape) == (513,), "table not 513 entries")
    _require(bool(((table_t >= -32768) & (table_t <= 32767)).all()), "table value outside int16")
    slopes = table_t[1:] - table_t[:-1]
    _require(bool(((slopes >= -32768) & (slopes <= 32767)).all()), "slope outside int16")
    _require(X.numel() == 0 or (int(X.min()) >= -32768 and int(X.max()) <= 32767), "x outside int16")
    segment = torch.div(X + 32768, 128, rounding_mode="floor")
    position = X + 32768 - segment * 128
    start = table_t[segment]
    step = torch.div(slopes[segment] * position + 64, 128, rounding_mode="floor")
    return result(start + step, "int16")


# --- data movement -------------------------------------------------------------------------


def reshape(x, *, types, shape):
    X = T(x)
    target = []
    for i, d in enumerate(shape):
        if d == 0:  # ONNX: 0 copies the input's dimension
            _require(i < X.ndim, "0 beyond the input rank")
            target.append(X.shape[i])
        else:
            _require(d >= -1, "bad shape entry")
            target.append(d)
    _require(target.count(-1) <= 1, "two -1")
    if -1 in target:
        rest = math.prod(d for d in target if d != -1)
        _require(rest != 0 and X.numel() % rest == 0, "cannot infer -1")
        target[target.index(-1)] = X.numel() // rest
    _require(math.prod(target) == X.numel(), "element count differs")
    return result(X.reshape(target), types[0])


def transpose(x, *, types, perm=None):
    X = T(x)
    perm = list(range(X.ndim))[::-1] if perm is None else list(perm)
    _require(sorted(perm) == list(range(X.ndim)), "not a permutation")
    return result(X.permute(perm), types[0])


def slice_(x, *, types, starts, ends, axes=None, steps=None):
    """ONNX Slice: negative starts/ends count from the end, then clamp, then step."""
    X = T(x)
    rank = X.ndim
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else list(steps)
    _require(len(starts) == len(ends) == len(axes) == len(steps), "length mismatch")
    _require(all(-rank <= a < rank for a in axes), "axis out of range")
    axes = [a % rank for a in axes]
    _require(len(set(axes)) == len(axes), "repeated axis")
    for start, end, axis, step in zip(starts, ends, axes, steps):
        _require(step != 0, "step 0")
        dim = X.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        index = torch.tensor(list(range(start, end, step)), dtype=torch.int64)
        X = torch.index_select(X, axis, index)
    return result(X, types[0])


def concat(*xs, types, axis):
    _require(len(xs) > 0, "no inputs")
    _require(len(set(types)) == 1, "inputs of different types")
    tensors = [T(x) for x in xs]
    rank = tensors[0].ndim
    _require(all(t.ndim == rank for t in tensors) and -rank <= axis < rank, "rank or axis")
    a = axis % rank
    _require(all(t.shape[:a] + t.shape[a + 1 :] == tensors[0].shape[:a] + tensors[0].shape[a + 1 :] for t in tensors), "shapes differ")
    return result(torch.cat(tensors, dim=a), types[0])


def gather(data, indices, *, types, axis=0):
    D, I = T(data), T(indices)
    _require(-D.ndim <= axis < D.ndim, "axis out of range")
    axis %= D.ndim
    n = D.shape[axis]
    _require(I.numel() == 0 or (int(I.min()) >= -n and int(I.max()) < n), "index out of range")
    I = torch.where(I < 0, I + n, I)  # negative indices count from the end
    picked = torch.index_select(D, axis, I.reshape(-1))
    shape = D.shape[:axis] + I.shape + D.shape[axis + 1 :]
    return result(picked.reshape(shape), types[0])


# --- reductions ----------------------------------------------------------------------------


def _reduce_axes(rank, axes):
    if axes is None:
        return list(range(rank))
    _require(len(axes) > 0, "empty axes")
    _require(all(-rank <= a < rank for a in axes), "axis out of range")
    out = sorted(a % rank for a in axes)
    _require(len(set(out)) == len(out), "repeated axis")
    return out


def reduce_sum(x, *, types, axes=None, keepdims=True):
    X = T(x)
    ax = _reduce_axes(X.ndim, axes)
    n = max(math.prod(X.shape[a] for a in ax), 1)
    lo, hi, _ = TYPES[types[0]]
    out = narrowest_standard(min(0, n * lo), max(0, n * hi))  # any sum of n values of x's type
    y = X.sum(dim=ax, keepdim=keepdims) if ax else X.clone()
    return result(y, out)


def reduce_mean(x, *, types, axes=None, keepdims=True, rounding="trunc"):
    X = T(x)
    ax = _reduce_axes(X.ndim, axes)
    n = math.prod(X.shape[a] for a in ax)
    _require(n > 0, "mean of no values")
    lo, hi = (int(X.min()), int(X.max())) if X.numel() else (0, 0)
    _require(n * lo >= INT64_MIN and n * hi <= INT64_MAX, "sum beyond int64")
    total = X.sum(dim=ax, keepdim=keepdims) if ax else X.clone()
    return result(round_div(total, torch.tensor(n), rounding), types[0])


def argmax(x, *, types, axis=-1, keepdims=True, select_last_index=False):
    X = T(x)
    _require(-X.ndim <= axis < X.ndim, "axis out of range")
    axis %= X.ndim
    _require(X.shape[axis] > 0, "empty axis")
    if select_last_index:
        index = X.shape[axis] - 1 - torch.argmax(torch.flip(X, [axis]), dim=axis)
    else:
        index = torch.argmax(X, dim=axis)  # torch returns the first maximal index
    if keepdims:
        index = index.unsqueeze(axis)
    return result(index, "int64")


REFERENCES = {
    "Requant": requant, "RequantShift": requant_shift, "MatMul": matmul,
    "Add": add, "Sub": sub, "Mul": mul, "Relu": relu, "Clip": clip, "Cast": cast, "Lut": lut,
    "LutInterp16": lut_interp16,
    "Reshape": reshape, "Transpose": transpose, "Slice": slice_, "Concat": concat, "Gather": gather,
    "ReduceSum": reduce_sum, "ReduceMean": reduce_mean, "ArgMax": argmax,
}
