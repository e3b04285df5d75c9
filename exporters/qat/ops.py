"""refsim's integer ops in torch, exact, with straight-through gradients.

Every tensor of the trained graph is a `Q`: `e`, its exact integer values (int64), and `f`,
the same values as float64 carrying the gradient. Each op computes its exact result `e`
from the exact inputs as docs/OPS.md states it (the formula of `refsim.ops`, written again
in torch int64, and tested equal to it), and a *surrogate*: the real-valued computation
the integers approximate (rounding and shifts as exact division, integer softmax as softmax
at the input's scale), differentiable in the inputs' `f`. The result is

    f = surrogate + (e - surrogate).detach()

so its value is the exact integer (as float64: exact below 2^53, where every tensor but
the int64 sums of exactly rescaled additions lies) and its gradient the surrogate's: the
straight-through estimator. Matrix products, sums and data movement compute `f` directly
in float64 (exact: their operands' bounds keep every partial sum below 2^53), which is both
value and gradient.

Only what `refsim export` emits is here; an op it does not emit (or an attribute it never
sets, such as MatMul zero points) is a clear QatError.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from refsim.dtypes import int_type

from .errors import QatError

F64 = torch.float64
I64 = torch.int64
FLOAT64_EXACT = 1 << 53
LN2_IBERT = 0.6931  # I-BERT's x0 = -0.6931 / S (exporters.nonlinear)


class Q:
    """One tensor: exact integers `e` (int64) and the same values `f` (float64, gradient).

    `e` is made from `f` on first use when `f` alone is exact (|values| < 2^53); results
    that may pass 2^53 (the int64 sums of exactly rescaled additions) are given `e`."""

    __slots__ = ("_e", "f")

    def __init__(self, e: torch.Tensor | None, f: torch.Tensor):
        self._e, self.f = e, f

    @property
    def e(self) -> torch.Tensor:
        if self._e is None:
            self._e = self.f.detach().to(I64)
        return self._e

    def moved(self, fn) -> "Q":
        """The same data movement applied to both forms."""
        return Q(None if self._e is None else fn(self._e), fn(self.f))


def const_q(values) -> Q:
    e = torch.as_tensor(np.asarray(values, np.int64))
    return Q(e, e.to(F64))


def ste(exact: torch.Tensor, surrogate: torch.Tensor | None, wide: bool = False) -> Q:
    """The exact result with the surrogate's gradient (see the module docstring). The
    value is float(exact) itself, not surrogate + (exact - surrogate), which float
    rounding could move off the integer. `wide`: the values may pass 2^53 (keep `e`)."""
    value = exact.to(F64)
    if surrogate is not None and surrogate.requires_grad:
        value = value + (surrogate - surrogate.detach())
    return Q(exact if wide else None, value)


def dyadic_round(xf: torch.Tensor, ratio: torch.Tensor, offset: torch.Tensor, mode: str, exact) -> tuple[torch.Tensor, torch.Tensor]:
    """round(x * ratio + offset) by `mode`, exact, where x * ratio + offset stands for an
    integer expression over 2^s (ratio = mul / 2^s, offset = bias / 2^s: both exact in
    float64): (int64 result, the float64 value x * ratio + offset, differentiable).

    The float value is within (|x * ratio| + |offset|) * 2^-51 of the exact rational; where
    that leaves the rounding in doubt (near a tie or an integer, or beyond 2^51) the
    elements are recomputed in int64 by `exact(mask)`, so the result is always exact and
    the fast path costs a few float operations."""
    y = xf * ratio + offset
    yd = y.detach()
    floor = torch.floor(yd)
    frac = yd - floor
    if mode == "half_even":
        candidate = torch.round(yd)
    elif mode == "half_up":
        candidate = floor + (frac >= 0.5).to(F64)
    elif mode == "half_away":
        candidate = torch.sign(yd) * torch.floor(yd.abs() + 0.5)
    elif mode == "floor":
        candidate = floor
    elif mode == "trunc":
        candidate = torch.trunc(yd)
    else:
        raise QatError(f"rounding {mode!r} is not supported in training")
    margin = ((xf.detach() * ratio).abs() + offset.abs() + 1) * 2.0**-49
    if mode.startswith("half"):
        doubt = (frac - 0.5).abs() <= margin
    else:
        doubt = (frac <= margin) | (frac >= 1 - margin)
    doubt |= yd.abs() >= 2.0**51
    e = candidate.to(I64)
    if bool(doubt.any()):
        e = torch.where(doubt, exact(doubt), e)
    return e, y


def from_float(f: torch.Tensor) -> Q:
    """A result computed exactly in float64 (bounded integer arithmetic)."""
    return Q(None, f)


# --- integer helpers (docs/OPS.md, Conventions) ------------------------------------------------


def shr(v: torch.Tensor, s) -> torch.Tensor:
    """floor(v / 2^s) for s >= 0 (shifts past 63 clamp: every bit is then the sign)."""
    s = torch.as_tensor(s, dtype=I64)
    return torch.bitwise_right_shift(v, torch.clamp(s, max=63))


def _low_bits_nonzero(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    clamped = torch.clamp(n, 0, 63)
    mask = torch.bitwise_xor(torch.tensor(-1, dtype=I64), torch.bitwise_left_shift(torch.tensor(-1, dtype=I64), clamped))
    return torch.where(n >= 64, x != 0, torch.bitwise_and(x, mask) != 0)


def round_shift(x: torch.Tensor, s, mode: str) -> torch.Tensor:
    """x / 2^s rounded by `mode` (floor, half_up, half_away, half_even, trunc), exact."""
    s = torch.as_tensor(s, dtype=I64)
    q = shr(x, s)
    if mode == "floor":
        out = q
    else:
        half = torch.bitwise_and(shr(x, torch.clamp(s - 1, min=0)), 1)
        if mode == "half_up":
            out = q + half
        elif mode == "trunc":
            out = q + ((x < 0) & _low_bits_nonzero(x, s)).to(I64)
        elif mode in ("half_away", "half_even"):
            above = _low_bits_nonzero(x, s - 1)
            tie = (x >= 0) if mode == "half_away" else (torch.bitwise_and(q, 1) == 1)
            out = q + ((half == 1) & (above | tie)).to(I64)
        else:
            raise QatError(f"rounding {mode!r} is not supported in training")
    return torch.where(s <= 0, x, out)


def round_div(num: torch.Tensor, den, mode: str) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=I64)
    q = torch.div(num, den, rounding_mode="floor")
    r = num - q * den
    if mode == "floor":
        return q
    if mode == "trunc":
        return q + ((num < 0) & (r != 0)).to(I64)
    twice = 2 * r
    if mode == "half_up":
        return q + (twice >= den).to(I64)
    if mode == "half_away":
        return q + ((twice > den) | ((twice == den) & (num >= 0))).to(I64)
    if mode == "half_even":
        return q + ((twice > den) | ((twice == den) & (torch.bitwise_and(q, 1) == 1))).to(I64)
    raise QatError(f"rounding {mode!r} is not supported in training")


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(n)) for 0 <= n < 2^62, exact (a float estimate, then corrected)."""
    r = torch.floor(torch.sqrt(n.to(F64))).to(I64)
    for _ in range(2):
        r = torch.where(r * r > n, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def fit(e: torch.Tensor, lo: int, hi: int, overflow: str, what: str) -> torch.Tensor:
    """The overflow policy of docs/OPS.md on exact values ('wrap' is never exported)."""
    if overflow == "saturate":
        return torch.clamp(e, lo, hi)
    if e.numel() and (int(e.min()) < lo or int(e.max()) > hi):
        raise QatError(f"{what}: a value leaves [{lo}, {hi}] (overflow policy {overflow!r})")
    return e


def _along(param: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    """A scalar or per-channel vector shaped to broadcast along `axis` of a rank-`rank` tensor."""
    if param.numel() <= 1:
        return param.reshape(())
    view = [1] * rank
    view[axis] = param.numel()
    return param.reshape(view)


def _sign(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x)


def _masked_softmax(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        x = x.masked_fill(~keep, float("-inf"))
    p = torch.softmax(x, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # a row with every position masked


def _keep(mask: Q | None, shape) -> torch.Tensor | None:
    return None if mask is None else torch.broadcast_to(mask.e != 0, shape)


# --- the ops ---------------------------------------------------------------------------------

OPS = {}


def op(name):
    def register(fn):
        OPS[name] = fn
        return fn
    return register


@op("MatMul")
def matmul(node, a, b, a_zero_point=None, b_zero_point=None, bias=None, *, types):
    attrs = node.attrs
    if a_zero_point is not None or b_zero_point is not None:
        raise QatError(f"{node.name}: MatMul zero points are not exported by refsim export")
    ta, tb = types[0], types[1]
    k = a.f.shape[-2] if attrs.get("transA") else a.f.shape[-1]
    bound = k * max(-ta.lo, ta.hi) * max(-tb.lo, tb.hi) + (int(bias.e.abs().max()) if bias is not None and bias.e.numel() else 0)
    if bound >= FLOAT64_EXACT:
        raise QatError(f"{node.name}: a sum of {k} products can reach {bound}, beyond float64's exact integers")
    af = a.f.transpose(-1, -2) if attrs.get("transA") else a.f
    bf = b.f.transpose(-1, -2) if attrs.get("transB") else b.f
    y = torch.matmul(af, bf)
    if bias is not None:
        y = y + bias.f
    acc_bits = int(attrs.get("acc_bits", 32))
    if acc_bits < 64:
        lo, hi = -(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1
        if attrs.get("overflow", "error") == "saturate":
            y = torch.clamp(y, lo, hi)
        else:
            fit(y.detach().to(I64), lo, hi, attrs.get("overflow", "error"), f"{node.name}: accumulator")
    return from_float(y)


@op("Requant")
def requant(node, x, mul, shift, bias=None, offset=None, *, types):
    attrs = node.attrs
    rounding = attrs.get("rounding", "half_up")
    if rounding == "double":
        raise QatError(f"{node.name}: TFLite's double rounding is not exported by refsim export")
    rank = x.e.dim()
    axis = int(attrs.get("axis", -1)) % max(rank, 1)
    m, s = _along(mul.e, rank, axis), _along(shift.e, rank, axis)
    b = _along(bias.e, rank, axis) if bias is not None else torch.zeros((), dtype=I64)
    o = _along(offset.e, rank, axis) if offset is not None else torch.zeros((), dtype=I64)
    t = int_type(attrs.get("dtype", "int8"))
    lo = t.lo if attrs.get("lo") is None else int(attrs["lo"])
    hi = t.hi if attrs.get("hi") is None else int(attrs["hi"])
    if bool((s < 0).any()):
        raise QatError(f"{node.name}: negative shift")
    scale = torch.pow(2.0, -s.to(F64))

    def exact(where: torch.Tensor) -> torch.Tensor:
        shape = x.e.shape
        full = torch.zeros(shape, dtype=I64)
        v = x.e[where] * torch.broadcast_to(m, shape)[where] + torch.broadcast_to(b, shape)[where]
        full[where] = round_shift(v, torch.broadcast_to(s, shape)[where], rounding)
        return full

    rounded, y = dyadic_round(x.f, m.to(F64) * scale, b.to(F64) * scale, rounding, exact)
    e = torch.clamp(rounded + o, lo, hi)
    return ste(e, torch.clamp(y + o.to(F64), lo, hi))


def _arith(kind):
    def run(node, a, b, *, types):
        e = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[kind](a.e, b.e)
        f = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[kind](a.f, b.f)
        dtype = node.attrs.get("dtype")
        if dtype is not None:
            t = int_type(dtype)
            e = fit(e, t.lo, t.hi, node.attrs.get("overflow", "error"), f"{node.name}: output")
        return ste(e, f, wide=True)
    return run


for _kind in ("Add", "Sub", "Mul"):
    op(_kind)(_arith(_kind))


@op("Relu")
def relu(node, x, *, types):
    return from_float(torch.relu(x.f))


@op("Clip")
def clip(node, x, *, types):
    lo, hi = node.attrs.get("lo"), node.attrs.get("hi")
    return from_float(torch.clamp(x.f, lo, hi))


@op("Cast")
def cast(node, x, *, types):
    t = int_type(node.attrs["dtype"])
    e = fit(x.e, t.lo, t.hi, node.attrs.get("overflow", "error"), f"{node.name}: output")
    return ste(e, x.f)


class _TableLookup(torch.autograd.Function):
    """table[index] with the table's central difference as the gradient in the index."""

    @staticmethod
    def forward(ctx, xf, index, values, slope):
        ctx.save_for_backward(index, slope)
        return values[index]

    @staticmethod
    def backward(ctx, grad):
        index, slope = ctx.saved_tensors
        return grad * slope[index], None, None, None


@op("Lut")
def lut(node, x, table, *, types):
    size = table.e.numel()
    index = x.e + (size // 2 if types[0].signed else 0)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise QatError(f"{node.name}: Lut input outside its {size}-entry table")
    values = table.e.to(F64)
    slope = torch.zeros_like(values)
    if size > 2:
        slope[1:-1] = (values[2:] - values[:-2]) / 2
        slope[0], slope[-1] = values[1] - values[0], values[-1] - values[-2]
    f = _TableLookup.apply(x.f, index, values, slope) if x.f.requires_grad else values[index]
    return from_float(f)


@op("LutInterp16")
def lut_interp16(node, x, table, *, types):
    """LiteRT's interpolated int16 lookup; its gradient is the segment's slope (the line
    through the two table entries, unrounded)."""
    t = table.e.reshape(-1)
    if t.numel() != 513:
        raise QatError(f"{node.name}: LutInterp16 needs a 513-entry table, got {t.numel()}")
    slope = t[1:] - t[:-1]
    if bool(((slope < -(1 << 15)) | (slope >= 1 << 15)).any()):
        raise QatError(f"{node.name}: LutInterp16 table neighbours differ by more than an int16 slope")
    u = x.e + (1 << 15)
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << 16):
        raise QatError(f"{node.name}: LutInterp16 input outside int16")
    segment = torch.bitwise_right_shift(u, 7)
    position = torch.bitwise_and(u, 127)
    start, rise = t[segment], slope[segment]
    e = start + torch.bitwise_right_shift(rise * position + 64, 7)
    surrogate = start.to(F64) + rise.to(F64) * (x.f + float(1 << 15) - (segment * 128).to(F64)) / 128
    return ste(e, surrogate)


# --- data movement ---------------------------------------------------------------------------


def _reshape_target(shape_attr, shape) -> list[int]:
    target = [int(d) for d in shape_attr]
    return [shape[i] if d == 0 else d for i, d in enumerate(target)]


@op("Reshape")
def reshape(node, x, *, types):
    target = _reshape_target(node.attrs["shape"], list(x.f.shape))
    return x.moved(lambda t: t.reshape(target))


@op("Transpose")
def transpose(node, x, *, types):
    perm = node.attrs.get("perm") or list(range(x.f.dim()))[::-1]
    return x.moved(lambda t: t.permute(*perm))


def _slice_indices(start: int, end: int, step: int, dim: int) -> list[int]:
    """ONNX Slice clamping (docs/OPS.md)."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return list(range(start, end, step))


@op("Slice")
def slice_(node, x, *, types):
    a = node.attrs
    starts, ends = a["starts"], a["ends"]
    axes = a.get("axes") or list(range(len(starts)))
    steps = a.get("steps") or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % x.f.dim()
        idx = torch.tensor(_slice_indices(int(start), int(end), int(step), x.f.shape[axis]), dtype=I64)
        x = x.moved(lambda t, axis=axis, idx=idx: t.index_select(axis, idx))
    return x


@op("Concat")
def concat(node, *xs, types):
    axis = int(node.attrs["axis"])
    wide = any(x._e is not None for x in xs)
    return Q(torch.cat([x.e for x in xs], axis) if wide else None, torch.cat([x.f for x in xs], axis))


@op("Gather")
def gather(node, data, indices, *, types):
    axis = int(node.attrs.get("axis", 0)) % data.f.dim()
    n = data.f.shape[axis]
    idx = indices.e
    if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise QatError(f"{node.name}: Gather index outside [-{n}, {n})")
    idx = torch.where(idx < 0, idx + n, idx)
    flat = idx.reshape(-1)
    shape = list(data.f.shape[:axis]) + list(idx.shape) + list(data.f.shape[axis + 1:])
    return data.moved(lambda t: t.index_select(axis, flat).reshape(shape))


# --- reductions --------------------------------------------------------------------------------


def _axes(node, rank):
    axes = node.attrs.get("axes")
    return list(range(rank)) if axes is None else sorted(int(a) % rank for a in axes)


@op("ReduceSum")
def reduce_sum(node, x, *, types):
    axes = _axes(node, x.e.dim())
    keep = bool(node.attrs.get("keepdims", True))
    return ste(x.e.sum(dim=axes, keepdim=keep), x.f.sum(dim=axes, keepdim=keep))


@op("ReduceMean")
def reduce_mean(node, x, *, types):
    axes = _axes(node, x.e.dim())
    keep = bool(node.attrs.get("keepdims", True))
    n = math.prod(x.e.shape[a] for a in axes)
    e = round_div(x.e.sum(dim=axes, keepdim=keep), n, node.attrs.get("rounding", "trunc"))
    return ste(e, x.f.sum(dim=axes, keepdim=keep) / n)


# --- softmax -------------------------------------------------------------------------------


def _rows_max(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return x.max(dim=-1, keepdim=True).values
    return torch.where(keep, x, torch.iinfo(torch.int64).min).max(dim=-1, keepdim=True).values


@op("IBertSoftmax")
def ibert_softmax(node, x, mask=None, *, types):
    a = node.attrs
    x0, b_int, c_int, n = int(a["x0_int"]), int(a["b_int"]), int(a["c_int"]), int(a.get("n", 30))
    exp_mul, exp_shift = int(a["exp_mul"]), int(a["exp_shift"])
    exp_max = (1 << (int(a.get("exp_bit", 16)) - 1)) - 1
    output_bit = int(a.get("output_bit", 8))
    keep = _keep(mask, x.e.shape)
    kept = torch.ones_like(x.e, dtype=torch.bool) if keep is None else keep
    m = _rows_max(x.e, keep)
    d = torch.where(kept, x.e - m, 0)
    d = torch.clamp(d, min=n * x0)
    q = torch.div(d, x0, rounding_mode="floor")
    r = d - x0 * q
    z = torch.clamp((r + b_int) * r + c_int, min=0)
    s = exp_shift - (n - q)
    right = round_shift(z * exp_mul, torch.clamp(s, min=0), "half_even")
    left = torch.bitwise_left_shift(z * exp_mul, torch.clamp(-s, min=0))
    e16 = torch.where(kept, torch.clamp(torch.where(s >= 0, right, left), max=exp_max), 0)
    total = e16.sum(dim=-1, keepdim=True)
    if bool(((total == 0) & kept.any(dim=-1, keepdim=True)).any()):
        raise QatError(f"{node.name}: every exponential of a row is 0")
    factor = torch.div(torch.tensor(1 << 32, dtype=I64), torch.clamp(total, min=1), rounding_mode="floor")
    e = torch.bitwise_right_shift(e16 * factor, 32 - output_bit)
    scale = -LN2_IBERT / x0  # the input scale the attributes were derived from (x0 = floor(-0.6931 / S))
    surrogate = _masked_softmax(x.f * scale, keep) * float(1 << output_bit)
    return ste(e, surrogate)


def _ita_rs(d: torch.Tensor, k: int) -> torch.Tensor:
    return d if k == 0 else torch.bitwise_right_shift(d + (1 << (k - 1)), k)


def _ita_surrogate(x: Q, keep, k: int, numerator: int, offset: int) -> torch.Tensor:
    return _masked_softmax(x.f * (math.log(2) / (1 << k)), keep) * (numerator / 256) + offset


def _ita_numerator(a, partial: bool) -> int:
    if a.get("numerator") is not None:
        return int(a["numerator"])
    n_levels = int(a.get("n_levels", 256))
    return (n_levels // 2 - 1) * 256 if partial else (n_levels - 1) * 256


@op("ITAMax")
def ita_max(node, x, mask=None, *, types):
    a = node.attrs
    k, offset = int(a.get("k", 5)), int(a.get("output_offset", 0))
    numerator = _ita_numerator(a, partial=False)
    keep = _keep(mask, x.e.shape)
    kept = torch.ones_like(x.e, dtype=torch.bool) if keep is None else keep
    m = _rows_max(x.e, keep)
    sh = _ita_rs(torch.where(kept, m - x.e, 0), k)
    total = torch.where(kept, shr(torch.tensor(256, dtype=I64), sh), 0).sum(dim=-1, keepdim=True)
    inv = torch.div(torch.tensor(numerator, dtype=I64), torch.clamp(total, min=1), rounding_mode="floor")
    e = torch.where(kept, shr(inv, sh), 0) + offset
    return ste(e, _ita_surrogate(x, keep, k, numerator, offset))


@op("ITAPartialMax")
def ita_partial_max(node, x, mask=None, *, types):
    a = node.attrs
    k, offset = int(a.get("k", 5)), int(a.get("output_offset", 0))
    width, max_init = int(a.get("group_width", 16)), int(a.get("max_init", -128))
    acc_bits, overflow = int(a.get("acc_bits", 32)), a.get("overflow", "error")
    numerator = _ita_numerator(a, partial=True)
    keep = _keep(mask, x.e.shape)
    kept = torch.ones_like(x.e, dtype=torch.bool) if keep is None else keep
    shape = x.e.shape
    gmax = torch.full(shape[:-1], max_init, dtype=I64)
    acc = torch.zeros(shape[:-1], dtype=I64)
    acc_max = (1 << acc_bits) - 1
    small = torch.iinfo(torch.int64).min
    for start in range(0, shape[-1], width):
        xs, ks = x.e[..., start:start + width], kept[..., start:start + width]
        cmax = torch.where(ks, xs, small).max(dim=-1).values
        grows = ks.any(dim=-1) & (cmax > gmax)
        s = torch.where(grows, _ita_rs(torch.where(grows, cmax - gmax, 0), k), 0)
        gmax = torch.where(grows, cmax, gmax)
        diff = torch.where(ks, gmax[..., None] - xs, 0)
        acc = shr(acc, s) + torch.where(ks, shr(torch.tensor(256, dtype=I64), _ita_rs(diff, k)), 0).sum(dim=-1)
        if bool((acc > acc_max).any()):
            if overflow != "saturate":
                raise QatError(f"{node.name}: the streaming softmax accumulator overflows {acc_bits} bits")
            acc = torch.clamp(acc, max=acc_max)
    if bool((kept.any(dim=-1) & (acc == 0)).any()):
        raise QatError(f"{node.name}: the softmax sum of a row is 0")
    inv = torch.div(torch.tensor(numerator, dtype=I64), torch.clamp(acc, min=1), rounding_mode="floor")
    sh = _ita_rs(torch.where(kept, gmax[..., None] - x.e, 0), k)
    e = torch.where(kept, shr(inv[..., None], sh), 0) + offset
    return ste(e, _ita_surrogate(x, keep, k, numerator, offset))


# --- GELU ----------------------------------------------------------------------------------------


@op("IBertGelu")
def ibert_gelu(node, x, *, types):
    a = node.attrs
    b_int, c_int, n, shift_int = int(a["b_int"]), int(a["c_int"]), int(a.get("n", 14)), int(a["shift_int"])
    d = torch.clamp(x.e.abs(), max=-b_int) + b_int
    erf = torch.bitwise_right_shift(_sign(x.e) * (d * d + c_int), n)
    e = x.e * (erf + shift_int)
    df = torch.clamp(x.f.abs(), max=-b_int) + b_int
    surrogate = x.f * (_sign(x.f) * (df * df + c_int) / float(1 << n) + shift_int)
    return ste(e, surrogate)


@op("ITAGelu")
def ita_gelu(node, x, *, types):
    a = node.attrs
    q_1, q_b, q_c = int(a["q_1"]), int(a["q_b"]), int(a["q_c"])
    q = torch.clamp(x.e, min=-127)
    d = torch.clamp(q.abs(), max=-q_b) + q_b
    y = q * (_sign(q) * (d * d + q_c) + q_1)
    qf = torch.clamp(x.f, min=-127)
    df = torch.clamp(qf.abs(), max=-q_b) + q_b
    yf = qf * (_sign(qf) * (df * df + q_c) + q_1)
    if a.get("eps_mul") is None:
        return ste(y, yf)
    mul, shift, add = int(a["eps_mul"]), int(a.get("eps_shift", 0)), int(a.get("eps_add", 0))
    e = torch.clamp(round_shift(y * mul, shift, "half_up") + add, -128, 127)
    return ste(e, torch.clamp(yf * mul / float(1 << shift) + add, -128, 127))


# --- LayerNorm and NoNorm ------------------------------------------------------------------------


@op("IBertLayerNorm")
def ibert_layernorm(node, x, bias=None, *, types):
    shift = int(node.attrs.get("shift", 0))
    n = x.e.shape[-1]
    b = bias.e if bias is not None else torch.zeros((), dtype=I64)
    mean = round_div(x.e.sum(dim=-1, keepdim=True), n, "half_even")
    d = x.e - mean
    scaled = torch.bitwise_right_shift(d, shift)
    if bool((scaled.abs() >= 1 << 16).any()):
        raise QatError(f"{node.name}: the sum of squares reaches 2^32; raise shift")
    var = (scaled * scaled).sum(dim=-1, keepdim=True)
    if bool((var >= 1 << 32).any()):
        raise QatError(f"{node.name}: the sum of squares reaches 2^32; raise shift")
    std = torch.bitwise_left_shift(isqrt(var), shift)
    factor = torch.div(torch.tensor(1 << 31, dtype=I64), torch.clamp(std, min=1), rounding_mode="floor")
    e = torch.bitwise_right_shift(d * factor, 1) + b
    df = x.f - x.f.mean(dim=-1, keepdim=True)
    stdf = torch.sqrt((df * df).sum(dim=-1, keepdim=True)).clamp(min=1.0)
    surrogate = df * ((1 << 31) / stdf) / 2 + b.to(F64)
    return ste(e, surrogate)


@op("iLayerNorm")
def i_layernorm(node, x, weight, bias, *, types):
    a = node.attrs
    D = int(a["D"])
    log2_d = min(D.bit_length() - 1, 63)
    n_levels = int(a.get("n_levels", 256))
    lo, hi = -(n_levels // 2), n_levels // 2 - 1
    n = x.e.shape[-1]
    w, b = weight.e.reshape(-1), bias.e.reshape(-1)
    mean = round_div(x.e.sum(dim=-1, keepdim=True), n, "trunc")
    d = x.e - mean
    std = isqrt(torch.div(( d * d).sum(dim=-1, keepdim=True), n, rounding_mode="floor") + 1)
    y = torch.bitwise_right_shift(round_div(d * w, std, "trunc") + b, log2_d)
    e = fit(y, lo, hi, a.get("overflow", "saturate"), f"{node.name}: output")
    df = x.f - x.f.mean(dim=-1, keepdim=True)
    stdf = torch.sqrt((df * df).sum(dim=-1, keepdim=True) / n + 1)
    surrogate = torch.clamp((df * w.to(F64) / stdf + b.to(F64)) / float(D), lo, hi)
    return ste(e, surrogate)


@op("NoNorm")
def nonorm(node, x, gamma, beta, *, types):
    t = int_type(node.attrs.get("dtype", "int32"))
    g, b = gamma.e.reshape(-1), beta.e.reshape(-1)
    e = fit(x.e * g + b, t.lo, t.hi, node.attrs.get("overflow", "error"), f"{node.name}: output")
    return ste(e, x.f * g.to(F64) + b.to(F64))
