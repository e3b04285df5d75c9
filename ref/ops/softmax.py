"""Integer softmax, every variant the field uses: ITA (ITAMax, ITAPartialMax), quantlib/Deeploy
iSoftmax, I-BERT's i-exp softmax (IBertSoftmax) and TFLite/CMSIS-NN int8 (TFLiteSoftmax).

Each op normalises along the last axis and takes an optional `mask` that broadcasts to x:
a nonzero mask value keeps a position, zero masks it (the Hugging Face attention_mask
convention). A masked position takes no part in the row maximum or the sum and outputs the
integer that stands for probability 0; a row with every position masked outputs that value
everywhere. The exact formulas are in docs/OPS.md.

Each op runs per row: a Numba kernel (`prange` over rows) and a NumPy twin that computes
the same integers with whole-array operations. The exponential of the iSoftmax and TFLite
variants depends only on `x - max(row)`, so for inputs of at most 16 bits the Numba path
evaluates it once per possible difference into a table. IBertSoftmax is its NumPy formula
only; its fast path is a kernel prepared per node (`refsim.kernels.softmax`).
"""

from __future__ import annotations

import functools

import numpy as np

from .. import backend
from ..dtypes import TYPES, IntType, type_for_range
from ..errors import AccumulatorOverflow, GraphError, OpError
from ..jit import njit, prange
from .fixedpoint import (
    exp_on_negative_values_q5_26,
    np_exp_on_negative_values_q5_26,
    np_one_over_one_plus_x_for_x_in_0_1,
    np_rdbpot,
    np_srdhm,
    one_over_one_plus_x_for_x_in_0_1,
    rdbpot,
    srdhm,
)
from .intmath import INT32_MAX, INT32_MIN, INT64_MAX, clz32, np_clz32, np_shr, shr
from .registry import OVERFLOW_POLICIES, Int, OneOf, broadcast_shapes, op
from .requant import levels_type
from .rounding import HALF_EVEN, _np_round_shift

_NO_MASK = np.zeros((1, 1), dtype=np.bool_)


# --- shared plumbing ----------------------------------------------------------------------


def _rows(x, mask, what: str):
    """x as a C-contiguous (rows, n) array and the keep-mask as bool (rows, n) or None."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise OpError(f"{what}: input must have at least one axis")
    if x.dtype.kind not in "iu":
        raise OpError(f"{what}: input must be an integer array, got {x.dtype}")
    n = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(int(np.prod(x.shape[:-1])), n)
    if mask is None:
        return x2, None
    try:
        keep = np.broadcast_to(np.asarray(mask) != 0, x.shape)
    except ValueError:
        raise OpError(f"{what}: mask of shape {list(np.shape(mask))} does not broadcast to {list(x.shape)}") from None
    return x2, np.ascontiguousarray(keep).reshape(x2.shape)


def _keep_args(keep):
    return (_NO_MASK, False) if keep is None else (keep, True)


def _infer_softmax(out_type):
    def infer(ins, attrs):
        x, mask = ins[0], ins[1] if len(ins) > 1 else None
        if not x.shape:
            raise GraphError("input must have at least one axis")
        if mask is not None and broadcast_shapes(mask.shape, x.shape) != tuple(x.shape):
            raise GraphError(f"mask of shape {list(mask.shape)} does not broadcast to {list(x.shape)}")
        try:
            t = out_type(x.dtype, attrs)
        except OpError as e:
            raise GraphError(str(e)) from None
        return [(t, x.shape)]

    return infer


def _finish(values, bad, shape, t: IntType, what: str):
    """Raise for rows a kernel flagged; else the result in t's storage type."""
    if bad is not None and np.any(bad):
        row = int(np.argmax(bad))
        raise OpError(f"{what}: row {row}: a result falls outside the output type {t.name} [{t.lo}, {t.hi}]")
    return values.reshape(shape).astype(t.storage, copy=False)


def _check_range(values, t: IntType, what: str):
    if values.size and (int(values.min()) < t.lo or int(values.max()) > t.hi):
        bad = np.argwhere((values < t.lo) | (values > t.hi))[0]
        raise OpError(f"{what}: row {int(bad[0])}: a result falls outside the output type {t.name} [{t.lo}, {t.hi}]")


@njit(cache=True, inline="always")
def _kept_max(x, keep, has_mask, r, start, stop):
    """(max over the kept x[r, start:stop], whether any was kept)."""
    if stop <= start:
        return np.int64(0), False
    if not has_mask:
        m = np.int64(x[r, start])
        for j in range(start + 1, stop):
            v = np.int64(x[r, j])
            if v > m:
                m = v
        return m, True
    m = np.int64(0)
    seen = False
    for j in range(start, stop):
        if keep[r, j]:
            v = np.int64(x[r, j])
            if not seen or v > m:
                m = v
                seen = True
    return m, seen


def _zero_exp_message(what, row):
    return f"{what}: row {row}: every exponential is 0, the softmax divides by their sum"


def _input_span(dtype) -> int | None:
    """hi - lo of a narrow input dtype (the largest |x - max(row)|), None past 16 bits."""
    info = np.iinfo(dtype)
    return int(info.max) - int(info.min) if info.bits <= 16 else None


# --- ITA: ITAMax and ITAPartialMax --------------------------------------------------------

# Named attribute sets for the anchors that disagree (docs/OPS.md explains each).
ITA_PRESETS = {
    "deeploy": dict(k=5),  # the defaults: what Deeploy's test networks expect
    "ita_rtl": dict(k=0, numerator=255 * 256, max_init=-128),
    "quantlib": dict(k=5, numerator=255 * 256, max_init=-127),
}


def _ita_out_type(n_levels: int, output_offset: int) -> IntType:
    if output_offset == 0:
        return levels_type(n_levels, signed=False)
    if output_offset == -(n_levels // 2):
        return levels_type(n_levels, signed=True)
    return type_for_range(output_offset, output_offset + n_levels - 1)


def _ita_numerator(numerator, n_levels, partial: bool) -> int:
    if numerator is not None:
        return numerator
    return (n_levels // 2 - 1) * 256 if partial else (n_levels - 1) * 256


@njit(cache=True, inline="always")
def _rs(d, k):
    """d / 2^k rounded half up (d >= 0); the identity for k = 0."""
    if k == 0:
        return d
    return (d + (np.int64(1) << (k - 1))) >> k


def _np_rs(d, k: int):
    return d if k == 0 else (d + (1 << (k - 1))) >> k


@njit(cache=True, parallel=True)
def _ita_max_kernel(x, keep, has_mask, k, numerator, offset, lo, hi, out, bad):
    rows, n = x.shape
    for r in prange(rows):
        m, seen = _kept_max(x, keep, has_mask, r, 0, n)
        if not seen:
            for j in range(n):
                out[r, j] = offset
            continue
        total = np.int64(0)
        for j in range(n):
            if has_mask and not keep[r, j]:
                continue
            total += shr(np.int64(256), _rs(m - np.int64(x[r, j]), k))
        inv = numerator // total
        for j in range(n):
            y = np.int64(offset)
            if not has_mask or keep[r, j]:
                y += shr(inv, _rs(m - np.int64(x[r, j]), k))
            if y < lo or y > hi:
                bad[r] = True
                y = lo
            out[r, j] = y


def _np_ita_max(x, keep, k, numerator, offset):
    x = x.astype(np.int64)
    kept = np.ones(x.shape, bool) if keep is None else keep
    m = np.where(kept, x, np.iinfo(np.int64).min).max(axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1), np.int64)
    diff = np.where(kept, m - x, 0)
    sh = _np_rs(diff, k)
    total = np.where(kept, np_shr(256, sh), 0).sum(axis=1, keepdims=True)
    inv = numerator // np.maximum(total, 1)
    return np.where(kept, np_shr(inv, sh), 0) + offset


@op(
    "ITAMax",
    inputs=["x", "mask?"],
    attrs=dict(
        n_levels=Int(min=2, max=1 << 16),
        k=Int(min=0, max=32),
        numerator=Int(min=1, max=1 << 40, optional=True),
        output_offset=Int(min=-(1 << 16), max=1 << 16),
    ),
    infer=_infer_softmax(lambda dtype, a: _ita_out_type(a["n_levels"], a["output_offset"])),
)
def ITAMax(x, mask=None, *, n_levels=256, k=5, numerator=None, output_offset=0):
    """ITA softmax over the last axis (quantlib PACTIntegerITAMax, Deeploy ITAMax_s8)."""
    what = "ITAMax"
    t = _ita_out_type(n_levels, output_offset)
    x2, keep = _rows(x, mask, what)
    num = _ita_numerator(numerator, n_levels, partial=False)
    if backend.use_numba():
        out = np.empty(x2.shape, t.storage)
        bad = np.zeros(x2.shape[0], np.bool_)
        _ita_max_kernel(x2, *_keep_args(keep), k, num, output_offset, t.lo, t.hi, out, bad)
        return _finish(out, bad, np.shape(x), t, what)
    y = _np_ita_max(x2, keep, k, num, output_offset)
    _check_range(y, t, what)
    return y.reshape(np.shape(x)).astype(t.storage)


# Status codes a streaming row can end with.
_OK, _OVERFLOW, _ZERO_SUM, _OUT_OF_RANGE = 0, 1, 2, 3
_POLICY = {"error": 0, "wrap": 1, "saturate": 2}


@functools.lru_cache(maxsize=64)
def _ita_shift_tables(k: int, span: int):
    """rs(d) and 256 >> rs(d) for every difference 0 <= d <= span."""
    shifts = _np_rs(np.arange(span + 1, dtype=np.int64), k)
    weights = np_shr(256, shifts)
    shifts.setflags(write=False)
    weights.setflags(write=False)
    return shifts, weights


@njit(cache=True, parallel=True)
def _ita_partial_kernel(x, keep, has_mask, group_width, k, numerator, max_init, offset,
                        acc_max, policy, lo, hi, out, status, where_group, where_value,
                        shifts, weights, use_table):
    rows, n = x.shape
    for r in prange(rows):
        gmax = np.int64(max_init)
        acc = np.int64(0)
        any_kept = False
        start = 0
        group = 0
        while start < n:
            stop = min(start + group_width, n)
            cmax, seen = _kept_max(x, keep, has_mask, r, start, stop)
            s = np.int64(0)
            if seen:
                any_kept = True
                if cmax > gmax:
                    s = _rs(cmax - gmax, k)
                    gmax = cmax
            group_sum = np.int64(0)
            for j in range(start, stop):
                if has_mask and not keep[r, j]:
                    continue
                d = gmax - np.int64(x[r, j])
                group_sum += weights[d] if use_table else shr(np.int64(256), _rs(d, k))
            acc = shr(acc, s) + group_sum
            if acc > acc_max:
                if policy == 0:
                    if status[r] == _OK:
                        status[r] = _OVERFLOW
                        where_group[r] = group
                        where_value[r] = acc
                    acc = acc_max
                elif policy == 1:
                    acc = acc & acc_max
                else:
                    acc = acc_max
            start = stop
            group += 1
        if status[r] != _OK:
            continue
        if not any_kept:
            for j in range(n):
                out[r, j] = offset
            continue
        if acc == 0:
            status[r] = _ZERO_SUM
            continue
        inv = numerator // acc
        for j in range(n):
            y = np.int64(offset)
            if not has_mask or keep[r, j]:
                d = gmax - np.int64(x[r, j])
                y += shr(inv, shifts[d] if use_table else _rs(d, k))
            if y < lo or y > hi:
                status[r] = _OUT_OF_RANGE
                y = lo
            out[r, j] = y


def _np_ita_partial(x, keep, group_width, k, numerator, max_init, offset, acc_bits, overflow, what):
    x = x.astype(np.int64)
    rows, n = x.shape
    kept = np.ones(x.shape, bool) if keep is None else keep
    acc_max = (1 << acc_bits) - 1
    gmax = np.full(rows, max_init, np.int64)
    acc = np.zeros(rows, np.int64)
    for group, start in enumerate(range(0, n, group_width)):
        xs, ks = x[:, start:start + group_width], kept[:, start:start + group_width]
        cmax = np.where(ks, xs, np.iinfo(np.int64).min).max(axis=1)
        grows = ks.any(axis=1) & (cmax > gmax)
        s = np.where(grows, _np_rs(np.where(grows, cmax - gmax, 0), k), 0)
        gmax = np.where(grows, cmax, gmax)
        diff = np.where(ks, gmax[:, None] - xs, 0)
        acc = np_shr(acc, s) + np.where(ks, np_shr(256, _np_rs(diff, k)), 0).sum(axis=1)
        over = acc > acc_max
        if over.any():
            if overflow == "error":
                row = int(np.argmax(over))
                raise AccumulatorOverflow(_overflow_message(what, row, group, int(acc[row]), acc_bits))
            acc = acc & acc_max if overflow == "wrap" else np.minimum(acc, acc_max)
    any_kept = kept.any(axis=1)
    if np.any(any_kept & (acc == 0)):
        raise OpError(_zero_sum_message(what, int(np.argmax(any_kept & (acc == 0)))))
    inv = numerator // np.maximum(acc, 1)
    sh = _np_rs(np.where(kept, gmax[:, None] - x, 0), k)
    return np.where(kept, np_shr(inv[:, None], sh), 0) + offset


def _overflow_message(what, row, group, value, acc_bits):
    return (
        f"{what}: row {row}, group {group}: the running sum {value} overflows the "
        f"{acc_bits}-bit unsigned accumulator; use overflow='wrap' or 'saturate', or a wider acc_bits"
    )


def _zero_sum_message(what, row):
    return f"{what}: row {row}: the wrapped accumulator is 0, the softmax divides by it"


@op(
    "ITAPartialMax",
    inputs=["x", "mask?"],
    attrs=dict(
        group_width=Int(min=1),
        groups=Int(min=1, optional=True),
        n_levels=Int(min=2, max=1 << 16),
        k=Int(min=0, max=32),
        numerator=Int(min=1, max=1 << 40, optional=True),
        max_init=Int(min=-(1 << 31), max=(1 << 31) - 1),
        output_offset=Int(min=-(1 << 16), max=1 << 16),
        acc_bits=Int(min=1, max=62),
        overflow=OneOf(OVERFLOW_POLICIES),
    ),
    infer=_infer_softmax(lambda dtype, a: _ita_out_type(a["n_levels"], a["output_offset"])),
)
def ITAPartialMax(x, mask=None, *, group_width=16, groups=None, n_levels=256, k=5, numerator=None,
                  max_init=-128, output_offset=0, acc_bits=32, overflow="error"):
    """ITA streaming softmax, groups of group_width columns (quantlib PACTIntegerITAPartialMax, Deeploy, PyITA)."""
    what = "ITAPartialMax"
    t = _ita_out_type(n_levels, output_offset)
    x2, keep = _rows(x, mask, what)
    n = x2.shape[1]
    if groups is not None and groups != -(-n // group_width):
        raise OpError(f"{what}: groups={groups} but a row of {n} holds {-(-n // group_width)} groups of {group_width}")
    num = _ita_numerator(numerator, n_levels, partial=True)
    if backend.use_numba():
        rows = x2.shape[0]
        out = np.empty(x2.shape, t.storage)
        status = np.zeros(rows, np.int8)
        where_group = np.zeros(rows, np.int64)
        where_value = np.zeros(rows, np.int64)
        # gmax - x lies in [0, max(max_init, x.max) - x.min]: tabulate rs for narrow inputs.
        info = np.iinfo(x2.dtype)
        span = max(max_init, int(info.max)) - int(info.min)
        use_table = info.bits <= 16 and span <= 1 << 17
        shifts, weights = _ita_shift_tables(k, span if use_table else 0)
        _ita_partial_kernel(x2, *_keep_args(keep), group_width, k, num, max_init, output_offset,
                            (1 << acc_bits) - 1, _POLICY[overflow], t.lo, t.hi, out, status, where_group, where_value,
                            shifts, weights, use_table)
        if np.any(status != _OK):
            row = int(np.argmax(status != _OK))
            code = int(status[row])
            if code == _OVERFLOW:
                raise AccumulatorOverflow(_overflow_message(what, row, int(where_group[row]), int(where_value[row]), acc_bits))
            if code == _ZERO_SUM:
                raise OpError(_zero_sum_message(what, row))
            raise OpError(f"{what}: row {row}: a result falls outside the output type {t.name} [{t.lo}, {t.hi}]")
        return out.reshape(np.shape(x))
    y = _np_ita_partial(x2, keep, group_width, k, num, max_init, output_offset, acc_bits, overflow, what)
    _check_range(y, t, what)
    return y.reshape(np.shape(x)).astype(t.storage)


# --- quantlib / Deeploy iSoftmax -----------------------------------------------------------


@njit(cache=True, inline="always")
def _i_exp(d, coeffA, coeffB, coeffC, log2):
    """quantlib's integer exp of d = x - max <= 0: a quadratic in p, shifted right by z."""
    z = min((-d) // log2, 31)
    p = d + z * log2
    t = p + coeffB
    return (coeffA * t * t + coeffC) >> z


def _np_i_exp(d, coeffA, coeffB, coeffC, log2):
    z = np.minimum((-d) // log2, 31)
    p = d + z * log2
    t = p + coeffB
    return (coeffA * t * t + coeffC) >> z


@njit(cache=True)
def _i_exp_table(span, coeffA, coeffB, coeffC, log2):
    table = np.empty(span + 1, np.int64)
    for i in range(span + 1):
        table[i] = _i_exp(-np.int64(i), coeffA, coeffB, coeffC, log2)
    return table


@njit(cache=True, parallel=True)
def _i_softmax_kernel(x, keep, has_mask, table, use_table, coeffA, coeffB, coeffC, log2, levels_minus_one, out, zero_rows):
    rows, n = x.shape
    for r in prange(rows):
        m, seen = _kept_max(x, keep, has_mask, r, 0, n)
        if not seen:
            for j in range(n):
                out[r, j] = 0
            continue
        total = np.int64(0)
        for j in range(n):
            if has_mask and not keep[r, j]:
                continue
            d = np.int64(x[r, j]) - m
            total += table[-d] if use_table else _i_exp(d, coeffA, coeffB, coeffC, log2)
        if total == 0:
            zero_rows[r] = True
            continue
        # The output depends on x only through d = x - max: for rows longer than the table
        # of differences, divide once per d.
        use_memo = use_table and n > table.size
        memo = np.full(table.size if use_memo else 0, -1, np.int64)
        for j in range(n):
            if has_mask and not keep[r, j]:
                out[r, j] = 0
                continue
            d = np.int64(x[r, j]) - m
            if use_memo:
                if memo[-d] < 0:
                    memo[-d] = (table[-d] * levels_minus_one) // total
                out[r, j] = memo[-d]
            else:
                y = table[-d] if use_table else _i_exp(d, coeffA, coeffB, coeffC, log2)
                out[r, j] = (y * levels_minus_one) // total


def _check_i_softmax_bounds(dtype, coeffA, coeffB, coeffC, log2, n_levels, n, what):
    """Everything stays in int64: the quadratic, the row sum and y*(n_levels-1)."""
    info = np.iinfo(dtype)
    span = int(info.max) - int(info.min)
    p_bound = span + 31 * log2
    y_bound = coeffA * (p_bound + abs(coeffB)) ** 2 + coeffC
    if y_bound * max(n, 1) * (n_levels - 1) > INT64_MAX:
        raise OpError(f"{what}: coefficients this large can overflow int64 (bound {y_bound} per element)")


@functools.lru_cache(maxsize=64)
def _cached_i_exp_table(span, coeffA, coeffB, coeffC, log2):
    table = _i_exp_table(span, coeffA, coeffB, coeffC, log2)
    table.setflags(write=False)
    return table


@op(
    "iSoftmax",
    inputs=["x", "mask?"],
    attrs=dict(
        coeffA=Int(min=0),
        coeffB=Int(),
        coeffC=Int(min=0),
        log2=Int(min=1),
        n_levels=Int(min=2, max=1 << 16),
    ),
    infer=_infer_softmax(lambda dtype, a: levels_type(a["n_levels"], signed=False)),
)
def iSoftmax(x, mask=None, *, coeffA, coeffB, coeffC, log2, n_levels=256):
    """quantlib/Deeploy integer softmax (PACTIntegerSoftmax, Softmax_s8_s8) over the last axis."""
    what = "iSoftmax"
    t = levels_type(n_levels, signed=False)
    x2, keep = _rows(x, mask, what)
    _check_i_softmax_bounds(x2.dtype, coeffA, coeffB, coeffC, log2, n_levels, x2.shape[1], what)
    if backend.use_numba():
        span = _input_span(x2.dtype)
        table = _cached_i_exp_table(span, coeffA, coeffB, coeffC, log2) if span is not None else np.zeros(1, np.int64)
        out = np.empty(x2.shape, t.storage)
        zero_rows = np.zeros(x2.shape[0], np.bool_)
        _i_softmax_kernel(x2, *_keep_args(keep), table, span is not None, coeffA, coeffB, coeffC, log2, n_levels - 1, out, zero_rows)
        if zero_rows.any():
            raise OpError(_zero_exp_message(what, int(np.argmax(zero_rows))))
        return out.reshape(np.shape(x))
    xs = x2.astype(np.int64)
    kept = np.ones(xs.shape, bool) if keep is None else keep
    m = np.where(kept, xs, np.iinfo(np.int64).min).max(axis=1, keepdims=True) if xs.shape[1] else 0
    y = np.where(kept, _np_i_exp(np.where(kept, xs - m, 0), coeffA, coeffB, coeffC, log2), 0)
    total = y.sum(axis=1, keepdims=True)
    zero = kept.any(axis=1) & (total[:, 0] == 0)
    if zero.any():
        raise OpError(_zero_exp_message(what, int(np.argmax(zero))))
    out = (y * (n_levels - 1)) // np.maximum(total, 1)
    return out.reshape(np.shape(x)).astype(t.storage)


# --- I-BERT i-exp softmax -------------------------------------------------------------------


def _np_ibert_exp(d, x0_int, b_int, c_int, n, exp_mul, exp_shift, exp_max):
    """I-BERT's i-exp of d = x - max <= 0, requantized to exp_bit bits (half to even)."""
    x = np.maximum(d, n * x0_int)
    q = x // x0_int
    r = x - x0_int * q
    z = np.maximum((r + b_int) * r + c_int, 0)
    s = exp_shift - (n - q)
    right = _np_round_shift(z * exp_mul, np.maximum(s, 0), HALF_EVEN)
    left = (z * exp_mul) << np.maximum(-s, 0)
    return np.minimum(np.where(s >= 0, right, left), exp_max)


def _ibert_softmax_type(output_bit: int) -> IntType:
    return type_for_range(0, 1 << output_bit)


def _check_ibert_softmax_bounds(x0_int, b_int, c_int, n, exp_mul, exp_shift, what):
    z_bound = abs(x0_int) * (abs(x0_int) + abs(b_int)) + abs(c_int)
    product = z_bound * exp_mul
    if n > exp_shift:
        product <<= n - exp_shift
    if product > INT64_MAX or abs(n * x0_int) > INT64_MAX:
        raise OpError(f"{what}: the exponential's intermediate z*exp_mul can reach {product}, beyond int64")


@op(
    "IBertSoftmax",
    inputs=["x", "mask?"],
    attrs=dict(
        x0_int=Int(max=-1),
        b_int=Int(),
        c_int=Int(),
        n=Int(min=0, max=62),
        exp_mul=Int(min=0, max=(1 << 31) - 1),
        exp_shift=Int(min=0, max=126),
        exp_bit=Int(min=2, max=32),
        output_bit=Int(min=1, max=31),
    ),
    infer=_infer_softmax(lambda dtype, a: _ibert_softmax_type(a["output_bit"])),
)
def IBertSoftmax(x, mask=None, *, x0_int, b_int, c_int, n=30, exp_mul, exp_shift, exp_bit=16, output_bit=8):
    """I-BERT's integer softmax (IntSoftmax) with its 16-bit exp requantization done in integers.

    The formula only: the fast path is the registered kernel `refsim.kernels.softmax`."""
    what = "IBertSoftmax"
    t = _ibert_softmax_type(output_bit)
    x2, keep = _rows(x, mask, what)
    _check_ibert_softmax_bounds(x0_int, b_int, c_int, n, exp_mul, exp_shift, what)
    exp_max = (1 << (exp_bit - 1)) - 1
    params = (x0_int, b_int, c_int, n, exp_mul, exp_shift, exp_max)
    xs = x2.astype(np.int64)
    kept = np.ones(xs.shape, bool) if keep is None else keep
    m = np.where(kept, xs, np.iinfo(np.int64).min).max(axis=1, keepdims=True) if xs.shape[1] else 0
    e = np.where(kept, _np_ibert_exp(np.where(kept, xs - m, 0), *params), 0)
    total = e.sum(axis=1, keepdims=True)
    zero = kept.any(axis=1) & (total[:, 0] == 0)
    if zero.any():
        raise OpError(_zero_exp_message(what, int(np.argmax(zero))))
    factor = (1 << 32) // np.maximum(total, 1)
    out = (e * factor) >> (32 - output_bit)
    return out.reshape(np.shape(x)).astype(t.storage)


# --- TFLite / CMSIS-NN int8 softmax (gemmlowp fixed point) ---------------------------------

_ACCUM_INTEGER_BITS = 12  # the sum of exponentials is Q12.19
_INT8_OUTPUT_SHIFT = 31 - 8  # from Q0.31 to the int8 output's 1/256 steps


@njit(cache=True)
def _tflite_exp_table(span, multiplier, left_shift, diff_min):
    """exp(beta * S * d) in Q0.31 for d = 0, -1, ..., -span; -1 where d < diff_min (skipped)."""
    table = np.empty(span + 1, np.int64)
    for i in range(span + 1):
        d = -np.int64(i)
        if d >= diff_min:
            table[i] = exp_on_negative_values_q5_26(srdhm(d << left_shift, multiplier))
        else:
            table[i] = -1
    return table


@functools.lru_cache(maxsize=64)
def _cached_tflite_tables(multiplier, left_shift, diff_min):
    """exp of each difference (Q0.31, -1 where skipped) and its Q12.19 term of the sum."""
    exp = _tflite_exp_table(255, multiplier, left_shift, diff_min)
    term = np.where(exp >= 0, np_rdbpot(np.maximum(exp, 0), _ACCUM_INTEGER_BITS), 0)
    exp.setflags(write=False)
    term.setflags(write=False)
    return exp, term


@njit(cache=True, parallel=True)
def _tflite_softmax_kernel(x, keep, has_mask, table, terms, out, overflow_rows):
    rows, n = x.shape
    for r in prange(rows):
        m, seen = _kept_max(x, keep, has_mask, r, 0, n)
        if not seen:
            for j in range(n):
                out[r, j] = -128
            continue
        total = np.int64(0)
        for j in range(n):
            if not has_mask or keep[r, j]:
                total += terms[m - np.int64(x[r, j])]
        if total > INT32_MAX:
            overflow_rows[r] = True
            continue
        headroom_plus_one = clz32(total)
        shifted_scale = one_over_one_plus_x_for_x_in_0_1((total << headroom_plus_one) - (np.int64(1) << 31))
        exponent = _ACCUM_INTEGER_BITS - headroom_plus_one + _INT8_OUTPUT_SHIFT
        for j in range(n):
            y = np.int64(-128)
            if not has_mask or keep[r, j]:
                e = table[m - np.int64(x[r, j])]
                if e >= 0:
                    y = min(max(rdbpot(srdhm(shifted_scale, e), exponent) - 128, -128), 127)
            out[r, j] = y


def _np_tflite_softmax(x, keep, multiplier, left_shift, diff_min, what):
    x = x.astype(np.int64)
    kept = np.ones(x.shape, bool) if keep is None else keep
    m = np.where(kept, x, -129).max(axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1), np.int64)
    d = x - m
    used = kept & (d >= diff_min)
    e = np.where(used, np_exp_on_negative_values_q5_26(np_srdhm(np.where(used, d, 0) << left_shift, multiplier)), 0)
    total = np.where(used, np_rdbpot(e, _ACCUM_INTEGER_BITS), 0).sum(axis=1, keepdims=True)
    if np.any(total > INT32_MAX):
        raise OpError(_tflite_overflow_message(what, int(np.argmax(total[:, 0] > INT32_MAX))))
    safe_total = np.maximum(total, 1)
    headroom_plus_one = np_clz32(safe_total)
    shifted_scale = np_one_over_one_plus_x_for_x_in_0_1((safe_total << headroom_plus_one) - (1 << 31))
    exponent = _ACCUM_INTEGER_BITS - headroom_plus_one + _INT8_OUTPUT_SHIFT
    y = np.clip(np_rdbpot(np_srdhm(shifted_scale, e), exponent) - 128, -128, 127)
    return np.where(used, y, -128)


def _tflite_overflow_message(what, row):
    return f"{what}: row {row}: the Q12.19 sum of exponentials leaves int32 (TFLite overflows here: too many near-maximal values)"


def _infer_tflite(dtype, attrs):
    if dtype is not TYPES["int8"]:
        raise OpError(f"TFLite's int8 softmax takes int8 input, got {dtype}")
    return TYPES["int8"]


@op(
    "TFLiteSoftmax",
    inputs=["x", "mask?"],
    attrs=dict(
        input_multiplier=Int(min=0, max=INT32_MAX),
        input_left_shift=Int(min=0, max=31),
        diff_min=Int(max=0),
    ),
    infer=_infer_softmax(_infer_tflite),
)
def TFLiteSoftmax(x, mask=None, *, input_multiplier, input_left_shift, diff_min):
    """TFLite Micro / CMSIS-NN int8 softmax (output zero point -128, scale 1/256) over the last axis."""
    what = "TFLiteSoftmax"
    x2, keep = _rows(x, mask, what)
    if x2.dtype != np.int8:
        raise OpError(f"{what}: TFLite's int8 softmax takes int8 input, got {x2.dtype}")
    if max(diff_min, -255) * (1 << input_left_shift) < INT32_MIN:
        raise OpError(f"{what}: a difference of {max(diff_min, -255)} shifted left by {input_left_shift} leaves int32")
    if backend.use_numba():
        table, terms = _cached_tflite_tables(input_multiplier, input_left_shift, diff_min)
        out = np.empty(x2.shape, np.int8)
        overflow_rows = np.zeros(x2.shape[0], np.bool_)
        _tflite_softmax_kernel(x2, *_keep_args(keep), table, terms, out, overflow_rows)
        if overflow_rows.any():
            raise OpError(_tflite_overflow_message(what, int(np.argmax(overflow_rows))))
        return out.reshape(np.shape(x))
    y = _np_tflite_softmax(x2, keep, input_multiplier, input_left_shift, diff_min, what)
    return y.reshape(np.shape(x)).astype(np.int8)

