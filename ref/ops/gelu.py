"""Integer GELU, every variant the field uses: quantlib/Deeploy iGELU and RequantizediGELU,
I-BERT's i-GELU (IBertGelu) and PyITA's i-GELU (ITAGelu).

All of them evaluate the second-order erf approximation

    L(q) = sgn(q) * (A * (min(|q|, -b) + b)^2 + c),      b <= 0

and multiply the input by (a shifted) L plus a constant; they differ in A, in the constants
and in what follows (docs/OPS.md gives each exactly). Each op is elementwise: a Numba kernel
(`prange` over the flattened tensor) and a NumPy twin on int64 arrays give identical results.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..dtypes import TYPES, IntType, type_for_range
from ..errors import GraphError, OpError
from ..jit import njit, prange
from .intmath import INT64_MAX
from .registry import Bool, Int, op
from .requant import levels_type
from .rounding import HALF_UP, _np_requant, requant_scalar


def _flat(x, what: str, max_bits: int = 32) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "iu" or x.dtype.itemsize * 8 > max_bits:
        raise OpError(f"{what}: input must be an integer array of at most {max_bits} bits, got {x.dtype}")
    return np.ascontiguousarray(x).reshape(-1)


def _abs_bound(dtype) -> int:
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


def _scalar(value, name: str, what: str) -> int:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iu":
        raise OpError(f"{what}: {name} must be a single integer (the C kernel reads one value), got shape {list(array.shape)}")
    return int(array.reshape(()))


@njit(cache=True, inline="always")
def _sign(v):
    return 1 if v > 0 else (-1 if v < 0 else 0)


# --- quantlib / Deeploy iGELU ------------------------------------------------------------------


@njit(cache=True, inline="always")
def _igelu(x, b, one):
    sign = _sign(x)
    d = min(abs(x), -b) + b
    erf = sign * (one - d * d)
    return x * ((one + erf) >> 1)


def _np_igelu(x, b, one):
    d = np.minimum(np.abs(x), -b) + b
    erf = np.sign(x) * (one - d * d)
    return x * ((one + erf) >> 1)


@njit(cache=True, parallel=True)
def _igelu_kernel(x, b, one, out):
    for i in prange(x.size):
        out[i] = _igelu(np.int64(x[i]), b, one)


def _igelu_values(x, b, one, what):
    """iGELU of every element as exact int64 (shared by iGELU and RequantizediGELU)."""
    flat = _flat(x, what)
    if _abs_bound(flat.dtype) * (abs(one) + b * b + 1) > INT64_MAX:
        raise OpError(f"{what}: b={b}, one={one} can overflow int64")
    if backend.use_numba():
        out = np.empty(flat.size, np.int64)
        _igelu_kernel(flat, b, one, out)
        return out
    return _np_igelu(flat.astype(np.int64), b, one)


def _infer_igelu(ins, attrs):
    return [(TYPES["int32"], ins[0].shape)]


@op("iGELU", inputs=["x"], attrs=dict(b=Int(max=0), one=Int()), infer=_infer_igelu)
def iGELU(x, *, b, one):
    """quantlib/Deeploy integer GELU: y = x * ((one + L) >> 1), int32 (PACTIntegerGELU, GELU_s8_s32)."""
    what = "iGELU"
    y = _igelu_values(x, b, one, what)
    if y.size and (int(y.min()) < -(1 << 31) or int(y.max()) > (1 << 31) - 1):
        raise OpError(f"{what}: a result leaves the int32 output (b={b}, one={one} are too large)")
    return y.astype(np.int32).reshape(np.shape(x))


def _infer_rq_igelu(ins, attrs):
    for name, t in zip(("mul", "add", "shift"), ins[1:]):
        if t.size not in (1, None):
            raise GraphError(f"{name} must hold a single value (the C kernel reads one), got shape {list(t.shape)}")
    try:
        return [(levels_type(attrs["n_levels"], attrs["signed"]), ins[0].shape)]
    except OpError as e:
        raise GraphError(str(e)) from None


@op(
    "RequantizediGELU",
    inputs=["x", "mul", "add", "shift"],
    attrs=dict(b=Int(max=0), one=Int(), div=Int(min=1, optional=True), n_levels=Int(min=2, max=1 << 32), signed=Bool()),
    infer=_infer_rq_igelu,
)
def RequantizediGELU(x, mul, add, shift, *, b, one, div=None, n_levels=256, signed=True):
    """Deeploy's iGELU fused with RequantShift: clip(round_half_up((iGELU(x)*mul + add) / 2^shift)) (RQGELU_s8_s8)."""
    what = "RequantizediGELU"
    mul, add, shift = (_scalar(v, name, what) for v, name in ((mul, "mul"), (add, "add"), (shift, "shift")))
    if shift < 0:
        raise OpError(f"{what}: shift must be >= 0, got {shift}")
    if div is not None and div != 1 << shift:
        raise OpError(f"{what}: attribute div={div} disagrees with the shift input {shift} (div must be 2^shift)")
    t = levels_type(n_levels, signed)
    lo, hi = (-(n_levels // 2), n_levels // 2 - 1) if signed else (0, n_levels - 1)
    y = _igelu_values(x, b, one, what)
    if y.size and max(abs(int(y.min())), abs(int(y.max()))) * abs(mul) + abs(add) > INT64_MAX:
        raise OpError(f"{what}: iGELU(x)*mul + add leaves int64")
    out = _requant(y, mul, add, shift, 0, lo, hi)
    return out.astype(t.storage).reshape(np.shape(x))


@njit(cache=True, parallel=True)
def _requant_kernel(y, mul, bias, shift, offset, lo, hi, out):
    for i in prange(y.size):
        out[i] = requant_scalar(y[i], mul, bias, shift, offset, lo, hi, HALF_UP)


def _requant(y, mul, bias, shift, offset, lo, hi):
    """clip(round_shift(y*mul + bias, shift, half_up) + offset, lo, hi) on int64 y."""
    if backend.use_numba():
        out = np.empty(y.size, np.int64)
        _requant_kernel(y, mul, bias, shift, offset, lo, hi, out)
        return out
    return _np_requant(y, mul, bias, shift, offset, lo, hi, HALF_UP)


# --- I-BERT i-GELU ------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _ibert_gelu(x, b_int, c_int, n, shift_int):
    sign = _sign(x)
    d = min(abs(x), -b_int) + b_int
    erf = (sign * (d * d + c_int)) >> n
    return x * (erf + shift_int)


def _np_ibert_gelu(x, b_int, c_int, n, shift_int):
    d = np.minimum(np.abs(x), -b_int) + b_int
    erf = (np.sign(x) * (d * d + c_int)) >> n
    return x * (erf + shift_int)


@njit(cache=True, parallel=True)
def _ibert_gelu_kernel(x, b_int, c_int, n, shift_int, out):
    for i in prange(x.size):
        out[i] = _ibert_gelu(np.int64(x[i]), b_int, c_int, n, shift_int)


def _ibert_gelu_bound(x_bound: int, b_int, c_int, n, shift_int) -> int:
    """Largest |y| for |x| <= x_bound: |erf| <= ((b^2 + |c|) >> n) + 1."""
    erf_bound = ((b_int * b_int + abs(c_int)) >> n) + 1
    return x_bound * (erf_bound + abs(shift_int))


def _ibert_gelu_type(x_lo: int, x_hi: int, attrs) -> IntType:
    bound = _ibert_gelu_bound(max(-x_lo, x_hi), attrs["b_int"], attrs["c_int"], attrs["n"], attrs["shift_int"])
    if bound > INT64_MAX or attrs["b_int"] ** 2 + abs(attrs["c_int"]) > INT64_MAX:
        raise OpError(f"IBertGelu: results can reach {bound}, beyond int64")
    return type_for_range(-bound, bound)


def _ibert_gelu_compute(x, t: IntType, b_int, c_int, n, shift_int):
    flat = _flat(x, "IBertGelu")
    if backend.use_numba():
        out = np.empty(flat.size, np.int64)
        _ibert_gelu_kernel(flat, b_int, c_int, n, shift_int, out)
    else:
        out = _np_ibert_gelu(flat.astype(np.int64), b_int, c_int, n, shift_int)
    return out.astype(t.storage).reshape(np.shape(x))


def _infer_ibert_gelu(ins, attrs):
    try:
        return [(_ibert_gelu_type(ins[0].dtype.lo, ins[0].dtype.hi, attrs), ins[0].shape)]
    except OpError as e:
        raise GraphError(str(e)) from None


def _prepare_ibert_gelu(attrs, consts, declared):
    """In a graph the output type follows the declared input type, not its storage."""
    t = _ibert_gelu_type(declared[0].dtype.lo, declared[0].dtype.hi, attrs)
    params = (attrs["b_int"], attrs["c_int"], attrs["n"], attrs["shift_int"])
    return lambda x: _ibert_gelu_compute(x, t, *params)


_IBERT_GELU_ATTRS = dict(b_int=Int(max=0), c_int=Int(), n=Int(min=0, max=62), shift_int=Int())


@op("IBertGelu", inputs=["x"], attrs=_IBERT_GELU_ATTRS, infer=_infer_ibert_gelu, prepare=_prepare_ibert_gelu)
def IBertGelu(x, *, b_int, c_int, n=14, shift_int):
    """I-BERT's integer GELU (IntGELU): y = x * ((sgn(x)*((min(|x|,-b)+b)^2 + c)) >> n) + shift_int)."""
    info = np.iinfo(np.asarray(x).dtype)
    t = _ibert_gelu_type(int(info.min), int(info.max), dict(b_int=b_int, c_int=c_int, n=n, shift_int=shift_int))
    return _ibert_gelu_compute(x, t, b_int, c_int, n, shift_int)


# --- PyITA i-GELU --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _ita_gelu(q, q_1, q_b, q_c):
    q = max(q, -127)
    sign = _sign(q)
    d = min(abs(q), -q_b) + q_b
    return q * (sign * (d * d + q_c) + q_1)


def _np_ita_gelu(q, q_1, q_b, q_c):
    q = np.maximum(q, -127)
    d = np.minimum(np.abs(q), -q_b) + q_b
    return q * (np.sign(q) * (d * d + q_c) + q_1)


@njit(cache=True, parallel=True)
def _ita_gelu_kernel(x, q_1, q_b, q_c, requantize, eps_mul, eps_shift, eps_add, out):
    for i in prange(x.size):
        y = _ita_gelu(np.int64(x[i]), q_1, q_b, q_c)
        out[i] = requant_scalar(y, eps_mul, 0, eps_shift, eps_add, -128, 127, HALF_UP) if requantize else y


def _ita_gelu_type(eps_mul) -> IntType:
    return TYPES["int32"] if eps_mul is None else TYPES["int8"]


def _infer_ita_gelu(ins, attrs):
    if ins[0].dtype.bits > 8 or not ins[0].dtype.signed:
        raise GraphError(f"PyITA's i-GELU takes int8 input, got {ins[0].dtype}")
    return [(_ita_gelu_type(attrs["eps_mul"]), ins[0].shape)]


_INT16 = dict(min=-(1 << 15), max=(1 << 15) - 1)


@op(
    "ITAGelu",
    inputs=["x"],
    attrs=dict(
        q_1=Int(**_INT16),
        q_b=Int(min=-(1 << 15), max=0),
        q_c=Int(**_INT16),
        eps_mul=Int(**_INT16, optional=True),
        eps_shift=Int(min=0, max=62),
        eps_add=Int(min=-128, max=127),
    ),
    infer=_infer_ita_gelu,
)
def ITAGelu(x, *, q_1, q_b, q_c, eps_mul=None, eps_shift=0, eps_add=0):
    """PyITA's i-GELU: q = max(x, -127); y = q * (L(q) + q_1), then (with eps_mul) ITA's half-up requant to int8."""
    what = "ITAGelu"
    if np.asarray(x).dtype != np.int8:
        raise OpError(f"{what}: PyITA's i-GELU takes int8 input, got {np.asarray(x).dtype}")
    flat = _flat(x, what, max_bits=8)
    t = _ita_gelu_type(eps_mul)
    requantize = eps_mul is not None
    if backend.use_numba():
        out = np.empty(flat.size, np.int64)
        _ita_gelu_kernel(flat, q_1, q_b, q_c, requantize, eps_mul or 0, eps_shift, eps_add, out)
    else:
        out = _np_ita_gelu(flat.astype(np.int64), q_1, q_b, q_c)
        if requantize:
            out = _np_requant(out, eps_mul, 0, eps_shift, eps_add, -128, 127, HALF_UP)
    if not requantize and out.size and (int(out.min()) < -(1 << 31) or int(out.max()) > (1 << 31) - 1):
        raise OpError(f"{what}: a result leaves int32")
    return out.astype(t.storage).reshape(np.shape(x))

