"""Float64 ONNX mirrors of the ITA modes' integer nonlinearities: ITAMax, ITAPartialMax
(ITA's softmax, whole-row and streaming), ITAGelu (PyITA's i-GELU with ITA's activation
requantizer) and iLayerNorm (quantlib/Deeploy's integer LayerNorm).

Each builder adds nodes to the fake-quant graph that compute, on DOUBLE tensors holding the
integer op's exact integer inputs, exactly the integers the refsim op computes (formulas:
docs/OPS.md). float64 holds every integer below 2^53 exactly, and adds, subtracts and
multiplies them exactly while the result stays below 2^53; dividing by a power of two is
exact (a dyadic result) and `Floor` of it is the integer shift. Divisions by other integers
are not exact: the package's `floor_div` corrects the rounded quotient by one where fl(a/b)
rounds across an integer, and `isqrt` corrects floor(fl(sqrt(v))) likewise. Every builder
states the bound that keeps its intermediates below 2^53. A mask input is the 0/1 keep
tensor: masked positions are multiplied out (to a finite 0) wherever they would enter a
maximum, a sum or an output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import emit as emit_node
from . import floor_div, isqrt, mirrors, reduce_last

_STEM = "mirror.ita"


class _Emit:
    """Appends DOUBLE nodes to the fake-quant graph `fg`, with the package's exact helpers."""

    def __init__(self, fg):
        self.fg = fg

    def __call__(self, op: str, *inputs: str, **attrs) -> str:
        return emit_node(self.fg, op, list(inputs), _STEM, **attrs)

    def const(self, value, dtype=np.float64) -> str:
        return self.fg.add_const(np.array(value, dtype), f"{_STEM}.c")

    def reduce(self, op: str, x: str) -> str:
        """op over the last axis, keepdims."""
        return reduce_last(self.fg, op, x, _STEM)

    def pow2(self, s: str) -> str:
        """2^s, exact for integer s (inf beyond 2^1023, which only divides to 0 here)."""
        return self("Pow", self.const(2.0), s)

    def shr(self, v: str, s: str) -> str:
        """floor(v / 2^s) for integer v and s: a dyadic quotient, exact, floored."""
        return self("Floor", self("Div", v, self.pow2(s)))

    def shr_const(self, v: str, s: int) -> str:
        return v if s == 0 else self("Floor", self("Div", v, self.const(2.0**s)))

    def floor_div(self, a: str, b: str) -> str:
        return floor_div(self.fg, a, b, _STEM)

    def trunc_div(self, a: str, b: str) -> str:
        """C division a / b (toward zero) for b > 0: sgn(a) * floor(|a| / b)."""
        return self("Mul", self("Sign", a), self.floor_div(self("Abs", a), b))

    def isqrt(self, v: str) -> str:
        return isqrt(self.fg, v, _STEM)

    def keep_like(self, x: str, keep: str | None) -> str | None:
        """The 0/1 keep mask broadcast to x's shape (None: no mask)."""
        if keep is None:
            return None
        return self("Add", keep, self("Mul", x, self.const(0.0)))


def _rs_const(emit: _Emit, d: str, k: int) -> str:
    """ITA's rs(d) = (d + 2^(k-1)) >> k (the identity for k = 0), d >= 0 an integer below 2^52."""
    if k == 0:
        return d
    return emit.shr_const(emit("Add", d, emit.const(2.0 ** (k - 1))), k)


# --- ITAMax -----------------------------------------------------------------------------------


def _ita_numerator(attrs, partial: bool) -> int:
    numerator = attrs.get("numerator")
    n_levels = int(attrs.get("n_levels", 256))
    if numerator is not None:
        return int(numerator)
    return (n_levels // 2 - 1) * 256 if partial else (n_levels - 1) * 256


def _masked_max(emit: _Emit, x: str, keep: str | None) -> str:
    """Row maximum over the kept positions (-inf for a row with none)."""
    if keep is None:
        return emit.reduce("ReduceMax", x)
    kept = emit("Greater", keep, emit.const(0.0))
    return emit.reduce("ReduceMax", emit("Where", kept, x, emit.const(-np.inf)))


def _ita_outputs(emit: _Emit, x: str, keep: str | None, gmax: str, total: str, attrs, partial: bool) -> str:
    """y_i = (numerator // total >> rs(gmax - x_i)) + output_offset, output_offset where masked.
    numerator <= 2^40 (the op's bound) and total <= n * 256, so numerator + total < 2^53."""
    k = int(attrs.get("k", 5))
    numerator = emit.const(float(_ita_numerator(attrs, partial)))
    inv = emit.floor_div(numerator, emit("Max", total, emit.const(1.0)))  # a row with no kept position divides by nothing
    diff = emit("Sub", gmax, x)
    if keep is not None:
        diff = emit("Mul", diff, keep)  # masked positions: a finite 0, multiplied out below
    y = emit.shr(inv, _rs_const(emit, diff, k))
    if keep is not None:
        y = emit("Mul", y, keep)
    return emit("Add", y, emit.const(float(attrs.get("output_offset", 0))))


@mirrors("ITAMax")
def ita_max(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """ITAMax: m = max(x); S = sum(256 >> rs(m - x)); y = (numerator // S) >> rs(m - x) + offset.

    Exact: for int8..int32 x, m - x < 2^33; 256 >> s is 256 / 2^s floored (exact); S <= 256 n."""
    emit = _Emit(fg)
    x = inputs[0]
    keep = emit.keep_like(x, inputs[1] if len(inputs) > 1 and inputs[1] else None)
    k = int(attrs.get("k", 5))
    m = _masked_max(emit, x, keep)
    if keep is not None:
        m = emit("Max", m, emit.const(-2.0**62))  # a fully masked row: any finite maximum (its outputs are the offset)
    diff = emit("Sub", m, x)
    if keep is not None:
        diff = emit("Mul", diff, keep)
    terms = emit.shr(emit.const(256.0), _rs_const(emit, diff, k))
    if keep is not None:
        terms = emit("Mul", terms, keep)
    total = emit.reduce("ReduceSum", terms)
    return _ita_outputs(emit, x, keep, m, total, attrs, partial=False)


# --- ITAPartialMax ------------------------------------------------------------------------------


def _partial_loop_body(opset: int, group_width: int, k: int, acc_bits: int, overflow: str) -> onnx.GraphProto:
    """One group of ITAPartialMax as an ONNX Loop body, carrying (x, keep, gmax, acc):

        c = max(kept x_i in group);  if c > gmax: s = rs(c - gmax), gmax = c  else s = 0
        acc = fit((acc >> s) + sum_{i in g, kept} (256 >> rs(gmax - x_i)))

    x and keep are carried unchanged (the body reads them as loop state, not from the outer
    scope, so the graph's own dependencies name them). Exact: each group adds at most
    group_width * 256 to an accumulator that shifts only shrink (and wrap or saturate only
    lower), so acc <= 256 n < 2^53 for rows under 2^45 columns; gmax - x < 2^33 for x of up
    to 32 bits, and 2^s past 2^1023 is inf, whose quotients floor to 0 as the shifts do."""
    nodes, inits = [], []
    counter = [0]

    def name(stem="t"):
        counter[0] += 1
        return f"pm.{stem}{counter[0]}"

    def const(value, dtype=np.float64):
        n = name("c")
        inits.append(onnx.numpy_helper.from_array(np.array(value, dtype), n))
        return n

    def op(kind, *ins, **attrs):
        out = name()
        nodes.append(helper.make_node(kind, list(ins), [out], **attrs))
        return out

    def reduce(kind, v):
        if opset >= (18 if kind == "ReduceMax" else 13):
            return op(kind, v, const([-1], np.int64), keepdims=1)
        return op(kind, v, axes=[-1], keepdims=1)

    def shr(v, s):
        return op("Floor", op("Div", v, op("Pow", const(2.0), s)))

    def rs(d):
        return d if k == 0 else op("Floor", op("Div", op("Add", d, const(2.0 ** (k - 1))), const(2.0**k)))

    start = op("Mul", op("Unsqueeze", "pm.iter", const([0], np.int64)), const([group_width], np.int64))
    stop = op("Add", start, const([group_width], np.int64))
    axes = const([-1], np.int64)
    xs = op("Slice", "pm.x_in", start, stop, axes)
    ks = op("Slice", "pm.keep_in", start, stop, axes)
    kept = op("Greater", ks, const(0.0))
    c = reduce("ReduceMax", op("Where", kept, xs, const(-np.inf)))  # -inf: no kept position in the group
    grows = op("Greater", c, "pm.gmax_in")
    s = op("Where", grows, rs(op("Max", op("Sub", c, "pm.gmax_in"), const(0.0))), const(0.0))
    gmax = op("Max", "pm.gmax_in", c)
    weights = op("Mul", shr(const(256.0), rs(op("Mul", op("Sub", gmax, xs), ks))), ks)
    acc = op("Add", shr("pm.acc_in", s), reduce("ReduceSum", weights))
    limit = float((1 << acc_bits) - 1)
    if overflow == "wrap":  # acc mod 2^acc_bits: a dyadic quotient, floored, times 2^acc_bits
        acc = op("Sub", acc, op("Mul", op("Floor", op("Div", acc, const(2.0**acc_bits))), const(2.0**acc_bits)))
    else:  # saturate; "error" stops the integer op, and its rows never reach a comparison
        acc = op("Min", acc, const(limit))
    for carried, value in (("cond", "pm.cond_in"), ("x", "pm.x_in"), ("keep", "pm.keep_in"), ("gmax", gmax), ("acc", acc)):
        nodes.append(helper.make_node("Identity", [value], [f"pm.{carried}_out"]))
    d = TensorProto.DOUBLE
    inputs = [helper.make_tensor_value_info("pm.iter", TensorProto.INT64, []),
              helper.make_tensor_value_info("pm.cond_in", TensorProto.BOOL, []),
              *(helper.make_tensor_value_info(f"pm.{v}_in", d, None) for v in ("x", "keep", "gmax", "acc"))]
    outputs = [helper.make_tensor_value_info("pm.cond_out", TensorProto.BOOL, []),
               *(helper.make_tensor_value_info(f"pm.{v}_out", d, None) for v in ("x", "keep", "gmax", "acc"))]
    return helper.make_graph(nodes, "ita_partial_max_group", inputs, outputs, inits)


@mirrors("ITAPartialMax")
def ita_partial_max(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """ITAPartialMax: the streaming softmax, one ONNX Loop iteration per group of group_width
    columns (the row length need not be known when the graph is built), then the outputs as
    ITAMax's from the final gmax and accumulator."""
    emit = _Emit(fg)
    x = inputs[0]
    keep_in = inputs[1] if len(inputs) > 1 and inputs[1] else None
    keep = emit.keep_like(x, keep_in if keep_in is not None else emit.const(1.0))
    group_width = int(attrs.get("group_width", 16))
    k = int(attrs.get("k", 5))
    max_init = float(attrs.get("max_init", -128))
    acc_bits = int(attrs.get("acc_bits", 32))
    overflow = str(attrs.get("overflow", "error"))
    n = emit("Slice", emit("Shape", x), emit.const([-1], np.int64), emit.const([np.iinfo(np.int64).max], np.int64))
    groups = emit("Div", emit("Add", n, emit.const([group_width - 1], np.int64)), emit.const([group_width], np.int64))
    trips = emit("Squeeze", groups, emit.const([0], np.int64))
    row_zero = emit.reduce("ReduceMax", emit("Mul", x, emit.const(0.0)))  # [..., 1] zeros
    gmax0 = emit("Add", row_zero, emit.const(max_init))
    body = _partial_loop_body(fg.opset, group_width, k, acc_bits, overflow)
    loop = fg.make_node("Loop", [trips, emit.const(True, np.bool_), x, keep, gmax0, row_zero], _STEM, body=body)
    outs = [fg.fresh(f"{_STEM}.loop") for _ in range(4)]
    loop.outputs = outs
    fg.nodes.append(loop)
    gmax, total = outs[2], outs[3]
    return _ita_outputs(emit, x, keep if keep_in is not None else None, gmax, total, attrs, partial=True)


# --- ITAGelu --------------------------------------------------------------------------------------


def _half_up_shift(emit: _Emit, v: str, shift: int) -> str:
    """round_shift(v, shift, half_up) = (v + 2^(shift-1)) >> shift for |v| < 2^52. A shift past
    53 gives what 53 gives (|v| / 2^53 < 1/2 rounds to 0 either way), so v + 2^(shift-1) stays
    an integer of at most 2^53, exact."""
    if shift == 0:
        return v
    s = min(shift, 53)
    return emit.shr_const(emit("Add", v, emit.const(2.0 ** (s - 1))), s)


@mirrors("ITAGelu")
def ita_gelu(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """PyITA's i-GELU: q = max(x, -127); d = min(|q|, -q_b) + q_b; y = q * (sgn(q)(d^2 + q_c) + q_1),
    then with eps_mul ITA's requantizer clip(round_half_up(y * eps_mul / 2^eps_shift) + eps_add).

    Exact: x is int8 (the op refuses wider), |d| <= 2^15, |sgn(q)(d^2 + q_c) + q_1| <= 2^30 + 2^16,
    |y| < 127 * 2^31 < 2^38, |y * eps_mul| < 2^38 * 2^15 = 2^53."""
    emit = _Emit(fg)
    q_1, q_b, q_c = (float(attrs[a]) for a in ("q_1", "q_b", "q_c"))
    q = emit("Max", inputs[0], emit.const(-127.0))
    d = emit("Add", emit("Min", emit("Abs", q), emit.const(-q_b)), emit.const(q_b))
    erf = emit("Mul", emit("Sign", q), emit("Add", emit("Mul", d, d), emit.const(q_c)))
    y = emit("Mul", q, emit("Add", erf, emit.const(q_1)))
    eps_mul = attrs.get("eps_mul")
    if eps_mul is None:
        return y
    v = emit("Mul", y, emit.const(float(eps_mul)))
    v = _half_up_shift(emit, v, int(attrs.get("eps_shift", 0)))
    v = emit("Add", v, emit.const(float(attrs.get("eps_add", 0))))
    return emit("Min", emit("Max", v, emit.const(-128.0)), emit.const(127.0))


# --- iLayerNorm -------------------------------------------------------------------------------------


@mirrors("iLayerNorm")
def i_layernorm(fg, inputs: list[str], attrs: dict, consts: dict) -> str:
    """quantlib/Deeploy iLayerNorm over the last axis:

        mean = trunc_div(sum x, n);  d = x - mean;  std = isqrt(sum(d^2) // n + 1)
        y = fit((trunc_div(d * weight, std) + bias) >> log2(D), [-(n_levels/2), n_levels/2 - 1])

    weight and bias are constants (consts[1], consts[2]) or graph inputs. Exact while
    n * (2 max|x|)^2 and 2 max|x| * max|weight| + max|bias| stay below 2^52 (the op's own
    bound is 2^63): 16-bit x with int32 weights (ITA mode) gives 2^17 * 2^31 = 2^48, and rows of
    up to 2^18 channels keep the sum of squares below 2^52."""
    emit = _Emit(fg)
    x = inputs[0]

    def param(index):
        if index in consts and consts[index] is not None:
            return emit.const(np.asarray(consts[index], np.float64).reshape(-1))
        return inputs[index]

    weight, bias = param(1), param(2)
    n_levels = int(attrs.get("n_levels", 256))
    log2_d = min(int(attrs["D"]).bit_length() - 1, 63)
    n = emit("Cast", emit("Slice", emit("Shape", x), emit.const([-1], np.int64),
                          emit.const([np.iinfo(np.int64).max], np.int64)), to=TensorProto.DOUBLE)
    mean = emit.trunc_div(emit.reduce("ReduceSum", x), n)
    d = emit("Sub", x, mean)
    var = emit.floor_div(emit.reduce("ReduceSum", emit("Mul", d, d)), n)
    std = emit.isqrt(emit("Add", var, emit.const(1.0)))
    y = emit.shr_const(emit("Add", emit.trunc_div(emit("Mul", d, weight), std), bias), log2_d)
    lo, hi = -(n_levels // 2), n_levels // 2 - 1
    if attrs.get("overflow", "saturate") == "wrap":  # ((y - lo) mod n_levels) + lo (the op wraps full ranges only)
        shifted = emit("Sub", y, emit.const(float(lo)))
        modulus = emit.const(float(n_levels))
        wrapped = emit("Sub", shifted, emit("Mul", emit("Floor", emit("Div", shifted, modulus)), modulus))
        return emit("Add", wrapped, emit.const(float(lo)))
    return emit("Min", emit("Max", y, emit.const(float(lo))), emit.const(float(hi)))
