"""Integer LayerNorm and its MobileBERT replacement: quantlib/Deeploy iLayerNorm, I-BERT's
integer LayerNorm (IBertLayerNorm), Deeploy iNoNorm and MobileBERT NoNorm.

The LayerNorms normalise along the last axis with an exact integer square root
(`intmath.isqrt`, floor sqrt for every int64); the NoNorms are per-element affine maps.
Row kernels run in Numba (`prange` over rows) with NumPy twins giving identical results.
Formulas: docs/OPS.md.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import TYPES, int_type
from ..errors import GraphError, OpError
from ..jit import njit, prange
from .intmath import INT64_MAX, _np_isqrt, div_half_even, isqrt_scalar, trunc_div
from .overflow import fit_range
from .registry import OVERFLOW_POLICIES, Int, OneOf, TypeName, broadcast_shapes, op
from .requant import levels_type
from .rounding import round_div


def _rows(x, what: str):
    x = np.asarray(x)
    if x.ndim == 0 or x.dtype.kind not in "iu":
        raise OpError(f"{what}: input must be an integer array with at least one axis, got {x.dtype}{list(x.shape)}")
    n = x.shape[-1]
    return np.ascontiguousarray(x).reshape(int(np.prod(x.shape[:-1])), n)


def _per_channel(param, n: int, name: str, what: str) -> np.ndarray:
    """A scalar or one value per channel of the last axis, as int64 of length n."""
    if param is None:
        return np.zeros(n, np.int64)
    p = np.asarray(param)
    if p.dtype.kind not in "iu":
        raise OpError(f"{what}: {name} must hold integers, got {p.dtype}")
    if p.size not in (1, n):
        raise OpError(f"{what}: {name} has {p.size} values for {n} channels")
    return np.ascontiguousarray(np.broadcast_to(p.reshape(-1).astype(np.int64), (n,)))


def _value_bound(a: np.ndarray) -> int:
    return max(abs(int(a.min())), abs(int(a.max()))) if a.size else 0


def _log2_exact(D: int, what: str) -> int:
    if D < 1 or D & (D - 1):
        raise OpError(f"{what}: D must be a positive power of two, got {D}")
    return min(D.bit_length() - 1, 63)  # a shift of 63 already floors every int64 to 0 or -1


def _infer_channels(ins, n_params):
    x = ins[0]
    if not x.shape:
        raise GraphError("input must have at least one axis")
    for t in ins[1:1 + n_params]:
        if t is None:
            continue
        if t.size not in (1, None) and (len(t.shape) != 1 or (isinstance(x.shape[-1], int) and t.shape[0] != x.shape[-1])):
            raise GraphError(f"per-channel parameters must have 1 or {x.shape[-1]} values, got shape {list(t.shape)}")


# --- quantlib / Deeploy iLayerNorm ----------------------------------------------------------


@njit(cache=True, parallel=True)
def _i_layernorm_kernel(x, weight, bias, log2_d, out):
    rows, n = x.shape
    for r in prange(rows):
        total = np.int64(0)
        for j in range(n):
            total += x[r, j]
        mean = trunc_div(total, n)
        squares = np.int64(0)
        for j in range(n):
            d = np.int64(x[r, j]) - mean
            squares += d * d
        std = isqrt_scalar(squares // n + 1)
        for j in range(n):
            d = np.int64(x[r, j]) - mean
            out[r, j] = (trunc_div(d * weight[j], std) + bias[j]) >> log2_d


def _np_trunc_div(a, b):
    return round_div(a, b, "trunc")


def _np_i_layernorm(x, weight, bias, log2_d):
    x = x.astype(np.int64)
    n = x.shape[1]
    mean = _np_trunc_div(x.sum(axis=1, keepdims=True), n)
    d = x - mean
    std = _np_isqrt((d * d).sum(axis=1, keepdims=True) // n + 1)
    return (_np_trunc_div(d * weight, std) + bias) >> log2_d


def _infer_i_layernorm(ins, attrs):
    _infer_channels(ins, 2)
    try:
        _log2_exact(attrs["D"], "iLayerNorm")
        return [(levels_type(attrs["n_levels"], signed=True), ins[0].shape)]
    except OpError as e:
        raise GraphError(str(e)) from None


@op(
    "iLayerNorm",
    inputs=["x", "weight", "bias"],
    attrs=dict(D=Int(min=1), n_levels=Int(min=2, max=1 << 32), overflow=OneOf(OVERFLOW_POLICIES)),
    infer=_infer_i_layernorm,
)
def iLayerNorm(x, weight, bias, *, D, n_levels=256, overflow="saturate"):
    """quantlib/Deeploy integer LayerNorm over the last axis (PACTIntegerLayerNorm, Layernorm_s8_s8)."""
    what = "iLayerNorm"
    log2_d = _log2_exact(D, what)
    t = levels_type(n_levels, signed=True)
    x2 = _rows(x, what)
    n = x2.shape[1]
    w, b = _per_channel(weight, n, "weight", what), _per_channel(bias, n, "bias", what)
    span = _value_bound(x2) * 2 + 1
    if span * _value_bound(w) + _value_bound(b) > INT64_MAX or span * span * max(n, 1) > INT64_MAX:
        raise OpError(f"{what}: (x - mean) * weight + bias can leave int64")
    if n == 0:
        return np.zeros(np.shape(x), t.storage)
    if backend.use_numba():
        y = np.empty(x2.shape, np.int64)
        _i_layernorm_kernel(x2, w, b, log2_d, y)
    else:
        y = _np_i_layernorm(x2, w, b, log2_d)
    lo, hi = -(n_levels // 2), n_levels // 2 - 1
    y = fit_range(y, lo, hi, t.bits, overflow, f"{what}: output")
    return y.reshape(np.shape(x)).astype(t.storage)


# --- I-BERT integer LayerNorm -----------------------------------------------------------------

_VAR_LIMIT = 1 << 32  # I-BERT keeps the sum of squares below 2^32 (it raises `shift` until it does)
_TERM_LIMIT = 1 << 16  # one (d >> shift) this large already puts the sum past 2^32
_FACTOR_NUMERATOR = 1 << 31  # I-BERT's floor(2^31 / std), exactly
_BIAS_LIMIT = 1 << 62
_INT32_LIMIT = 1 << 31


@njit(cache=True)  # a call LLVM inlines (as `requant_one`)
def ibert_row_mean_factor(x, r, shift):
    """Row r's mean rounded half to even, I-BERT's factor floor(2^31 / std) and the row's
    spread max |x - mean|; the factor is -1 when the row's sum of squares of
    (x - mean) >> shift reaches 2^32 (the op refuses it). Shared by this op's kernel and the
    fused one in ref/kernels/layernorm.py.

    For x of at most 32 bits the sum cannot wrap (n < 2^31 values below 2^32) and the mean
    lies in [min, max], so every |x - mean| <= spread, and the largest |(x - mean) >> shift|
    comes from the row's min or max. When that one is below 2^16 every term is below 2^32
    and n < 2^31 of them stay within int64: the sum of squares needs neither the per-term
    cap nor an early exit, and vectorizes (on int32 differences when the spread fits);
    when it is not, that term alone reaches 2^32. Measured 2x faster than the loop with
    the exit, which other rows take (their spread is given as -1)."""
    n = x.shape[1]
    if x.itemsize > 4 or n >= _INT32_LIMIT:
        return _row_mean_factor_wide(x, r, shift)
    total = np.int64(0)
    for j in range(n):
        total += x[r, j]
    small, large = x[r, 0], x[r, 0]
    for j in range(n):  # its own loop: the extremes in x's type, 8 to a vector for int32
        small, large = min(small, x[r, j]), max(large, x[r, j])
    mean = div_half_even(total, n)
    spread = max(np.int64(large) - mean, mean - np.int64(small))
    if max((np.int64(large) - mean) >> shift, -((np.int64(small) - mean) >> shift)) >= _TERM_LIMIT:
        return mean, np.int64(-1), spread
    var = np.int64(0)
    if spread < _INT32_LIMIT:
        for j in range(n):
            d = np.int32(np.int32(np.int64(x[r, j]) - mean) >> shift)
            var += np.int64(d) * np.int64(d)
    else:
        for j in range(n):
            d = (np.int64(x[r, j]) - mean) >> shift
            var += d * d
    if var >= _VAR_LIMIT:
        return mean, np.int64(-1), spread
    std = isqrt_scalar(var) << shift
    return mean, _FACTOR_NUMERATOR // max(std, 1), spread


@njit(cache=True)
def _row_mean_factor_wide(x, r, shift):
    """`ibert_row_mean_factor` for 64-bit x, whose sums may wrap as the spec's do: each
    term capped at 2^32, stopping once the sum reaches 2^32."""
    n = x.shape[1]
    total = np.int64(0)
    for j in range(n):
        total += x[r, j]
    mean = div_half_even(total, n)
    var = np.int64(0)
    for j in range(n):
        d = (np.int64(x[r, j]) - mean) >> shift
        var += d * d if abs(d) < _TERM_LIMIT else _VAR_LIMIT
        if var >= _VAR_LIMIT:
            return mean, np.int64(-1), np.int64(-1)
    std = isqrt_scalar(var) << shift
    return mean, _FACTOR_NUMERATOR // max(std, 1), np.int64(-1)


@njit(cache=True, parallel=True)
def _ibert_layernorm_kernel(x, bias, shift, out, var_too_big):
    rows, n = x.shape
    for r in prange(rows):
        mean, factor, _ = ibert_row_mean_factor(x, r, shift)
        if factor < 0:
            var_too_big[r] = True
            continue
        for j in range(n):
            out[r, j] = (((np.int64(x[r, j]) - mean) * factor) >> 1) + bias[j]


def _np_ibert_layernorm(x, bias, shift, what):
    x = x.astype(np.int64)
    n = x.shape[1]
    mean = round_div(x.sum(axis=1, keepdims=True), n, "half_even")
    d = x - mean
    scaled = d >> shift
    big = np.abs(scaled) >= _TERM_LIMIT
    var = np.where(big, 0, scaled * scaled).sum(axis=1, keepdims=True)
    too_big = big.any(axis=1) | (var[:, 0] >= _VAR_LIMIT)
    if too_big.any():
        raise OpError(_var_message(what, int(np.argmax(too_big)), shift))
    std = _np_isqrt(var) << shift
    factor = _FACTOR_NUMERATOR // np.maximum(std, 1)
    return ((d * factor) >> 1) + bias


def _var_message(what, row, shift):
    return f"{what}: row {row}: the sum of squares reaches 2^32 with shift={shift}; raise shift"


def _infer_ibert_layernorm(ins, attrs):
    _infer_channels(ins, 1)
    return [(TYPES["int64"], ins[0].shape)]


@op("IBertLayerNorm", inputs=["x", "bias?"], attrs=dict(shift=Int(min=0, max=30)), infer=_infer_ibert_layernorm)
def IBertLayerNorm(x, bias=None, *, shift=0):
    """I-BERT's integer LayerNorm over the last axis with an exact floor square root (IntLayerNorm)."""
    what = "IBertLayerNorm"
    if not 0 <= shift <= 30:
        raise OpError(f"{what}: shift must lie in [0, 30], got {shift}")
    x2 = _rows(x, what)
    n = x2.shape[1]
    b = _per_channel(bias, n, "bias", what)
    # |d * factor| < 2^62 for shift <= 30: if |d| >= 2^(shift+1), std >= |d| - 2^shift >= |d|/2 and
    # factor <= 2^32/|d|; otherwise |d| < 2^31 and factor <= 2^31. So a bias below 2^62 is safe.
    if _value_bound(b) >= _BIAS_LIMIT:
        raise OpError(f"{what}: bias must stay below 2^62 in magnitude")
    if n == 0:
        return np.zeros(np.shape(x), np.int64)
    if backend.use_numba():
        y = np.empty(x2.shape, np.int64)
        var_too_big = np.zeros(x2.shape[0], np.bool_)
        _ibert_layernorm_kernel(x2, b, shift, y, var_too_big)
        if var_too_big.any():
            raise OpError(_var_message(what, int(np.argmax(var_too_big)), shift))
    else:
        y = _np_ibert_layernorm(x2, b, shift, what)
    return y.reshape(np.shape(x))


# --- Deeploy iNoNorm and MobileBERT NoNorm -------------------------------------------------------


@njit(cache=True, parallel=True)
def _i_nonorm_kernel(x, w, b, mul, log2_d, out):
    for i in prange(x.size):
        out[i] = ((np.int64(x[i]) * w[i] + b[i]) * mul) >> log2_d


def _broadcast_flat(a, shape):
    return np.ascontiguousarray(np.broadcast_to(np.asarray(a).astype(np.int64), shape)).reshape(-1)


def _infer_broadcast_params(ins):
    x = ins[0]
    for t in ins[1:]:
        if broadcast_shapes(t.shape, x.shape) != tuple(x.shape):
            raise GraphError(f"parameters of shape {list(t.shape)} do not broadcast to the input {list(x.shape)}")


def _infer_i_nonorm(ins, attrs):
    _infer_broadcast_params(ins)
    try:
        _log2_exact(attrs["D"], "iNoNorm")
        return [(levels_type(attrs["n_levels"], signed=True), ins[0].shape)]
    except OpError as e:
        raise GraphError(str(e)) from None


@op(
    "iNoNorm",
    inputs=["x", "weights", "bias"],
    attrs=dict(D=Int(min=1), mul=Int(), n_levels=Int(min=2, max=1 << 32), overflow=OneOf(OVERFLOW_POLICIES)),
    infer=_infer_i_nonorm,
)
def iNoNorm(x, weights, bias, *, D, mul, n_levels=256, overflow="saturate"):
    """Deeploy iNoNorm: y = ((x * weights + bias) * mul) >> log2(D), weights and bias broadcast to x."""
    what = "iNoNorm"
    log2_d = _log2_exact(D, what)
    t = levels_type(n_levels, signed=True)
    x = np.asarray(x)
    try:
        w, b = _broadcast_flat(weights, x.shape), _broadcast_flat(bias, x.shape)
    except ValueError:
        raise OpError(f"{what}: weights {list(np.shape(weights))} or bias {list(np.shape(bias))} do not broadcast to {list(x.shape)}") from None
    if ((_value_bound(x) * _value_bound(w) + _value_bound(b)) * abs(mul)) > INT64_MAX:
        raise OpError(f"{what}: (x*weights + bias)*mul can leave int64")
    flat = np.ascontiguousarray(x).reshape(-1)
    if backend.use_numba():
        y = np.empty(flat.size, np.int64)
        _i_nonorm_kernel(flat, w, b, mul, log2_d, y)
    else:
        y = ((flat.astype(np.int64) * w + b) * mul) >> log2_d
    lo, hi = -(n_levels // 2), n_levels // 2 - 1
    y = fit_range(y, lo, hi, t.bits, overflow, f"{what}: output")
    return y.reshape(x.shape).astype(t.storage)


@njit(cache=True, parallel=True)
def _nonorm_kernel(x, gamma, beta, out):
    rows, n = x.shape
    for r in prange(rows):
        for j in range(n):
            out[r, j] = np.int64(x[r, j]) * gamma[j] + beta[j]


def _infer_nonorm(ins, attrs):
    _infer_channels(ins, 2)
    return [(int_type(attrs["dtype"]), ins[0].shape)]


@op(
    "NoNorm",
    inputs=["x", "gamma", "beta"],
    attrs=dict(dtype=TypeName(), overflow=OneOf(OVERFLOW_POLICIES)),
    infer=_infer_nonorm,
)
def NoNorm(x, gamma, beta, *, dtype="int32", overflow="error"):
    """MobileBERT NoNorm: y = x * gamma + beta per channel of the last axis, fitted into dtype."""
    what = "NoNorm"
    t = int_type(dtype)
    x2 = _rows(x, what)
    n = x2.shape[1]
    g, b = _per_channel(gamma, n, "gamma", what), _per_channel(beta, n, "beta", what)
    if _value_bound(x2) * _value_bound(g) + _value_bound(b) > INT64_MAX:
        raise OpError(f"{what}: x*gamma + beta can leave int64")
    if backend.use_numba():
        y = np.empty(x2.shape, np.int64)
        _nonorm_kernel(x2, g, b, y)
    else:
        y = x2.astype(np.int64) * g + b
    y = fit_range(y, t.lo, t.hi, t.bits, overflow, f"{what}: output")
    return y.reshape(np.shape(x)).astype(t.storage)
