"""Hypothesis strategies for the core ops: typed arrays that favour each type's extremes,
and one `Case` strategy per core op (inputs, declared types, attributes, which inputs are
graph constants). Shared by the op tests and the inference tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st
from torch_core import STORAGE, TYPES

ALL_TYPES = tuple(TYPES)
WIDE_SIGNED = ("int8", "int16", "int32", "int64")
POLICIES = ("error", "wrap", "saturate")
ROUNDINGS = ("floor", "half_up", "half_away", "half_even", "trunc")
# Shift amounts: small ones, and the edges where hardware shifts stop being defined.
SHIFT_EDGES = (0, 1, 2, 30, 31, 32, 33, 61, 62, 63, 64, 65, 66, 100, 127, 128, 1000, (1 << 31) - 1)


@dataclass
class Case:
    op: str
    inputs: list  # NumPy arrays in storage dtypes, None for an omitted optional input
    types: list  # declared IR type name per input (None where omitted)
    attrs: dict = field(default_factory=dict)
    const: list = field(default_factory=list)  # per input: a graph constant (True) or a graph input

    def __repr__(self):
        shown = [None if a is None else (t, a.shape, a.tolist() if a.size <= 24 else "...") for a, t in zip(self.inputs, self.types)]
        return f"Case({self.op}, {shown}, {self.attrs}, const={self.const})"


def extremes(name: str) -> list[int]:
    lo, hi, _ = TYPES[name]
    return sorted({v for v in (lo, lo + 1, -1, 0, 1, hi - 1, hi) if lo <= v <= hi})


def values(name: str):
    lo, hi, _ = TYPES[name]
    return st.one_of(st.sampled_from(extremes(name)), st.integers(lo, hi), st.integers(max(lo, -4), min(hi, 4)))


@st.composite
def typed_array(draw, name: str, shape):
    count = math.prod(shape)
    flat = draw(st.lists(values(name), min_size=count, max_size=count))
    return np.array(flat, dtype=object).astype(STORAGE[name]).reshape(shape)


def shapes(min_dims=0, max_dims=3, min_side=0, max_side=4):
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def broadcastable(draw, base: tuple):
    """A shape that broadcasts to `base`: leading axes dropped, some axes set to 1."""
    keep = draw(st.integers(0, len(base)))
    tail = base[len(base) - keep :]
    return tuple(1 if draw(st.booleans()) and draw(st.booleans()) else d for d in tail)


# --- Requant / RequantShift ---------------------------------------------------------------


@st.composite
def requant_case(draw):
    x_type = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes())
    x = draw(typed_array(x_type, shape))
    rank = len(shape)
    per_channel = rank > 0 and draw(st.booleans())
    axis = draw(st.integers(-rank, rank - 1)) if per_channel else draw(st.sampled_from([-1, 0])) if rank else 0
    pshape = (shape[axis],) if per_channel else draw(st.sampled_from([(), (1,)]))
    rounding = draw(st.sampled_from(ROUNDINGS + ("double",)))

    mul_type = draw(st.sampled_from(("int8", "uint8", "int16", "int32", "int64")))
    mul = draw(typed_array(mul_type, pshape))
    shift_values = st.one_of(st.sampled_from(SHIFT_EDGES), st.integers(0, 70))
    shift = np.array(draw(st.lists(shift_values, min_size=math.prod(pshape), max_size=math.prod(pshape))), np.int32).reshape(pshape)
    bias = offset = None
    bias_type = offset_type = None
    if rounding != "double" and draw(st.booleans()):
        bias_type = draw(st.sampled_from(("int8", "int32", "int64")))
        bias = draw(typed_array(bias_type, pshape))
    if draw(st.booleans()):
        offset_type = draw(st.sampled_from(("int8", "int16", "int32", "int64")))
        offset = draw(typed_array(offset_type, pshape))
    dtype = draw(st.sampled_from(ALL_TYPES))
    lo = hi = None
    if draw(st.integers(0, 3)) == 0:
        tlo, thi, _ = TYPES[dtype]
        lo = draw(st.integers(tlo - 1, thi))
        hi = draw(st.integers(lo, thi + 1))
    inputs = [x, mul, shift, bias, offset]
    types = [x_type, mul_type, "int32", bias_type, offset_type]
    if offset is None:
        inputs, types = inputs[:4], types[:4]
        if bias is None:
            inputs, types = inputs[:3], types[:3]
    const = [False] + [draw(st.booleans()) for _ in inputs[1:]]
    return Case("Requant", inputs, types, dict(axis=axis, rounding=rounding, dtype=dtype, lo=lo, hi=hi), const)


@st.composite
def tflite_requant_case(draw):
    """Requant with rounding 'double' as TFLite uses it: int32 accumulators, Q31 multipliers."""
    shape = draw(shapes(1, 3, 1, 4))
    x = draw(typed_array("int32", shape))
    if draw(st.booleans()):
        x = (x >> draw(st.integers(0, 31))).astype(np.int32)  # typical accumulator sizes too
    per_channel = draw(st.booleans())
    pshape = (shape[-1],) if per_channel else ()
    count = math.prod(pshape)
    mul = np.array(draw(st.lists(st.one_of(st.integers(1 << 30, (1 << 31) - 1), values("int32")), min_size=count, max_size=count)), np.int64).reshape(pshape).astype(np.int32)
    shift = np.array(draw(st.lists(st.one_of(st.integers(20, 62), st.sampled_from(SHIFT_EDGES)), min_size=count, max_size=count)), np.int32).reshape(pshape)
    inputs, types = [x, mul, shift], ["int32", "int32", "int32"]
    if draw(st.booleans()):
        inputs += [None, draw(typed_array("int8", pshape))]
        types += [None, "int8"]
    dtype = draw(st.sampled_from(("int8", "uint8", "int16", "int32", "int4")))
    const = [False] + [True] * (len(inputs) - 1)
    return Case("Requant", inputs, types, dict(axis=-1, rounding="double", dtype=dtype, lo=None, hi=None), const)


@st.composite
def tie_case(draw):
    """x*mul + bias exactly halfway between two integers after the shift, either sign."""
    s = draw(st.integers(1, 62))
    limit = (1 << (63 - s)) - 1
    m = draw(st.integers(-limit, limit - 1).map(lambda k: 2 * k + 1).filter(lambda m: -(1 << 63) <= m << (s - 1) < 1 << 63))
    v = m << (s - 1)
    x = np.array([v, -v if -v < 1 << 63 else v], np.int64)
    rounding = draw(st.sampled_from(ROUNDINGS))
    return Case("Requant", [x, np.int64(1), np.int32(s)], ["int64", "int64", "int32"],
                dict(axis=-1, rounding=rounding, dtype="int64", lo=None, hi=None), [False, True, True])


@st.composite
def requant_shift_case(draw):
    x_type = draw(st.sampled_from(("int8", "uint8", "int16", "int32", "int64", "int4")))
    shape = draw(shapes(0, 3))
    x = draw(typed_array(x_type, shape))
    mul_type = draw(st.sampled_from(("int8", "uint8", "int32", "int64")))
    add_type = draw(st.sampled_from(("int8", "int32", "int64")))
    mul = draw(typed_array(mul_type, draw(broadcastable(shape))))
    add = draw(typed_array(add_type, draw(broadcastable(shape))))
    div = 1 << draw(st.one_of(st.integers(0, 40), st.sampled_from((62, 63, 64, 65, 100))))
    if draw(st.integers(0, 9)) == 0:
        div = draw(st.integers(1, 1000))  # mostly not a power of two: must be refused
    n_levels = draw(st.one_of(st.sampled_from((2, 3, 4, 15, 16, 255, 256, 65536, 1 << 32)), st.integers(2, 1 << 20)))
    signed = draw(st.booleans())
    return Case("RequantShift", [x, mul, add], [x_type, mul_type, add_type],
                dict(div=div, n_levels=n_levels, signed=signed), [False, draw(st.booleans()), draw(st.booleans())])


# --- MatMul -----------------------------------------------------------------------------------

A_TYPES = ("int8", "uint8", "int4", "int16", "int32", "int64")
B_TYPES = ("int8", "uint8", "int4", "uint4", "int2", "uint2", "ternary", "int16", "int32")


@st.composite
def matmul_case(draw):
    m, k, n = draw(st.integers(0, 4)), draw(st.one_of(st.integers(0, 5), st.integers(6, 40))), draw(st.integers(0, 4))
    batch = draw(shapes(0, 2, 1, 3))
    a_batch, b_batch = draw(broadcastable(batch)), draw(broadcastable(batch))
    transA, transB = draw(st.booleans()), draw(st.booleans())
    a_type, b_type = draw(st.sampled_from(A_TYPES)), draw(st.sampled_from(B_TYPES))
    a = draw(typed_array(a_type, a_batch + ((k, m) if transA else (m, k))))
    b = draw(typed_array(b_type, b_batch + ((n, k) if transB else (k, n))))
    inputs, types = [a, b], [a_type, b_type]
    za = zb = bias = None
    if draw(st.booleans()):
        za = draw(typed_array(a_type, draw(st.sampled_from([(), (1,)]))))
    if draw(st.booleans()):
        zb = draw(typed_array(b_type, draw(st.sampled_from([(), (n,)]))))
    if draw(st.booleans()):
        bias = draw(typed_array(draw(st.sampled_from(("int32", "int64"))), draw(st.sampled_from([(), (n,)]))))
    extra = [(za, a_type), (zb, b_type), (bias, None if bias is None else bias.dtype.name)]
    while extra and extra[-1][0] is None:
        extra.pop()
    for value, t in extra:
        inputs.append(value)
        types.append(t if value is not None else None)
    acc_bits = draw(st.one_of(st.sampled_from((32, 64, 16, 8, 24, 63)), st.integers(2, 64)))
    overflow = draw(st.sampled_from(POLICIES))
    const = [False] + [draw(st.booleans()) for _ in inputs[1:]]
    return Case("MatMul", inputs, types, dict(transA=transA, transB=transB, acc_bits=acc_bits, overflow=overflow), const)


# --- elementwise --------------------------------------------------------------------------------


@st.composite
def arith_case(draw, op):
    base = draw(shapes(0, 3))
    a_type, b_type = draw(st.sampled_from(ALL_TYPES)), draw(st.sampled_from(ALL_TYPES))
    a = draw(typed_array(a_type, draw(broadcastable(base))))
    b = draw(typed_array(b_type, draw(broadcastable(base))))
    dtype = draw(st.one_of(st.none(), st.sampled_from(ALL_TYPES)))
    overflow = draw(st.sampled_from(POLICIES))
    return Case(op, [a, b], [a_type, b_type], dict(dtype=dtype, overflow=overflow), [False, draw(st.booleans())])


@st.composite
def relu_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    return Case("Relu", [draw(typed_array(t, draw(shapes())))], [t], {}, [False])


@st.composite
def clip_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    lo_t, hi_t, _ = TYPES[t]
    bound = st.one_of(st.none(), st.integers(lo_t, hi_t), st.integers(lo_t - 3, hi_t + 3), st.sampled_from((-(1 << 70), 1 << 70)))
    return Case("Clip", [draw(typed_array(t, draw(shapes())))], [t], dict(lo=draw(bound), hi=draw(bound)), [False])


@st.composite
def cast_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    return Case("Cast", [draw(typed_array(t, draw(shapes())))], [t],
                dict(dtype=draw(st.sampled_from(ALL_TYPES)), overflow=draw(st.sampled_from(POLICIES))), [False])


LUT_TYPES = ("int2", "uint2", "int4", "uint4", "int8", "uint8", "ternary")


@st.composite
def lut_case(draw):
    x_type = draw(st.sampled_from(LUT_TYPES))
    lo, hi, _ = TYPES[x_type]
    table_type = draw(st.sampled_from(ALL_TYPES))
    table = draw(typed_array(table_type, (hi - lo + 1,)))
    x = draw(typed_array(x_type, draw(shapes())))
    return Case("Lut", [x, table], [x_type, table_type], {}, [False, draw(st.booleans())])


# Inputs where LutInterp16's segments start, end and round (the position 64 is the tie).
SEGMENT_EDGES = sorted({-32768 + 128 * k + p for k in (0, 1, 255, 256, 257, 510, 511) for p in (0, 1, 63, 64, 65, 127)})


@st.composite
def lut_interp16_table(draw):
    """513 int16 entries: a walk with steps up to `step` (clipped to int16), pinned to the
    type's ends, or arbitrary values (slopes beyond int16, which the op must refuse)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["walk", "walk", "walk", "ends", "arbitrary"]))
    if kind == "arbitrary":
        return rng.integers(-32768, 32768, 513).astype(np.int16)
    if kind == "ends":
        return rng.choice(np.array([-32768, 32767]), 513).astype(np.int16) if draw(st.booleans()) else \
            np.where(np.arange(513) % 2, 32767, -32768).astype(np.int16) if draw(st.booleans()) else \
            np.full(513, draw(st.sampled_from([-32768, 32767])), np.int16)
    step = draw(st.sampled_from([0, 1, 127, 4096, 32767]))
    start = draw(values("int16"))
    walk = start + np.cumsum(rng.integers(-step, step + 1, 513))
    return np.clip(walk, -32768, 32767).astype(np.int16)


@st.composite
def lut_interp16_case(draw):
    x = draw(st.one_of(typed_array("int16", draw(shapes())),
                       st.lists(st.sampled_from(SEGMENT_EDGES), min_size=1, max_size=12).map(lambda v: np.array(v, np.int16))))
    return Case("LutInterp16", [x, draw(lut_interp16_table())], ["int16", "int16"], {}, [False, draw(st.booleans())])


# --- data movement ------------------------------------------------------------------------------


@st.composite
def reshape_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(0, 4))
    x = draw(typed_array(t, shape))
    dims = list(draw(st.permutations(list(shape))))
    if len(dims) >= 2 and draw(st.booleans()):  # merge two axes
        dims = [dims[0] * dims[1]] + dims[2:]
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    for i in range(min(len(dims), len(shape))):
        if dims[i] == shape[i] and draw(st.booleans()):
            dims[i] = 0  # ONNX: copy the input's dimension
    if draw(st.integers(0, 9)) == 0:
        dims = draw(st.lists(st.integers(-2, 6), max_size=4))  # usually invalid
    return Case("Reshape", [x], [t], dict(shape=dims), [False])


@st.composite
def transpose_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(0, 4))
    perm = draw(st.one_of(st.none(), st.permutations(list(range(len(shape))))))
    return Case("Transpose", [draw(typed_array(t, shape))], [t], dict(perm=perm), [False])


@st.composite
def slice_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(1, 3, 0, 5))
    rank = len(shape)
    axes = draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank))
    count = len(axes)
    index = st.one_of(st.integers(-7, 7), st.sampled_from((-(1 << 63), (1 << 63) - 1, -(1 << 31), 1 << 31)))
    starts = draw(st.lists(index, min_size=count, max_size=count))
    ends = draw(st.lists(index, min_size=count, max_size=count))
    steps = draw(st.lists(st.one_of(st.integers(-3, 3).filter(bool), st.sampled_from((-(1 << 40), 1 << 40))), min_size=count, max_size=count))
    give_axes = draw(st.booleans()) or axes != list(range(count))
    give_steps = draw(st.booleans()) or steps != [1] * count
    return Case("Slice", [draw(typed_array(t, shape))], [t],
                dict(starts=starts, ends=ends, axes=axes if give_axes else None, steps=steps if give_steps else None), [False])


@st.composite
def concat_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(1, 3))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        s = list(shape)
        s[axis] = draw(st.integers(0, 3))
        parts.append(draw(typed_array(t, tuple(s))))
    return Case("Concat", parts, [t] * len(parts), dict(axis=axis), [draw(st.booleans()) and i > 0 for i in range(len(parts))])


@st.composite
def gather_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(1, 3, 1, 4))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    n = shape[axis]
    i_type = draw(st.sampled_from(("int8", "int16", "int32", "int64", "uint8")))
    ilo, ihi, _ = TYPES[i_type]
    index_values = st.one_of(st.integers(max(-n, ilo), min(n - 1, ihi)), st.sampled_from(extremes(i_type)))
    ishape = draw(shapes(0, 2, 0, 3))
    count = math.prod(ishape)
    indices = np.array(draw(st.lists(index_values, min_size=count, max_size=count)), dtype=object).astype(STORAGE[i_type]).reshape(ishape)
    return Case("Gather", [draw(typed_array(t, shape)), indices], [t, i_type], dict(axis=axis), [draw(st.booleans()), False])


# --- reductions ---------------------------------------------------------------------------------


@st.composite
def reduce_axes(draw, rank):
    if rank == 0 or draw(st.integers(0, 3)) == 0:
        return None
    return draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank, unique_by=lambda a: a % rank))


@st.composite
def reduce_sum_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(0, 3))
    return Case("ReduceSum", [draw(typed_array(t, shape))], [t],
                dict(axes=draw(reduce_axes(len(shape))), keepdims=draw(st.booleans())), [False])


@st.composite
def reduce_mean_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(0, 3))
    return Case("ReduceMean", [draw(typed_array(t, shape))], [t],
                dict(axes=draw(reduce_axes(len(shape))), keepdims=draw(st.booleans()), rounding=draw(st.sampled_from(ROUNDINGS))), [False])


@st.composite
def argmax_case(draw):
    t = draw(st.sampled_from(ALL_TYPES))
    shape = draw(shapes(1, 3, 0, 4))
    few = draw(st.booleans())  # few distinct values: many ties
    count = math.prod(shape)
    if few:
        pool = extremes(t)[:2]
        x = np.array(draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count)), dtype=object).astype(STORAGE[t]).reshape(shape)
    else:
        x = draw(typed_array(t, shape))
    return Case("ArgMax", [x], [t], dict(axis=draw(st.integers(-len(shape), len(shape) - 1)),
                keepdims=draw(st.booleans()), select_last_index=draw(st.booleans())), [False])


@st.composite
def ibert_layernorm_case(draw):
    """Rows of int8, int16 or int32 (the types' extremes among them), a bias per tensor,
    per channel, or none, and shifts up to I-BERT's 30: sums of squares past 2^32 too."""
    t = draw(st.sampled_from(["int8", "int16", "int32"]))
    shape = draw(shapes(1, 3, 1, 6))
    x = draw(typed_array(t, shape))
    kind = draw(st.sampled_from(["none", "scalar", "row"]))
    if kind == "none":
        inputs, types, const = [x], [t], [False]
    else:
        bias = draw(typed_array("int32", (1,) if kind == "scalar" else (shape[-1],))).astype(np.int64) << 8
        inputs, types, const = [x, bias], [t, "int64"], [False, draw(st.booleans())]
    return Case("IBertLayerNorm", inputs, types, dict(shift=draw(st.integers(0, 30))), const)


# --- IBertSoftmax -------------------------------------------------------------------------------

# Attribute sets the exporter makes: MiniLM's scores (int16 at S ~ 2^-10.5: the exponential
# rounds to 0 from the difference 5520 on, and n*x0_int clamps at 10350) and I-BERT's for
# S = 0.1 (clamp at 210, inside int8's span).
IBERT_SOFTMAX_PRESETS = (
    dict(x0_int=-345, b_int=1346, c_int=690914, n=30, exp_mul=1629530190, exp_shift=65, exp_bit=16, output_bit=15),
    dict(x0_int=-7, b_int=27, c_int=279, n=30, exp_mul=1968898441, exp_shift=54, exp_bit=16, output_bit=8),
    # Every exponential 0: any row with a kept position divides by 0 (refused).
    dict(x0_int=-7, b_int=27, c_int=279, n=30, exp_mul=0, exp_shift=54, exp_bit=16, output_bit=8),
    # z = r^2 - 5 <= 0 at r = 0: a row of equal values sums to 0, others do not.
    dict(x0_int=-9, b_int=0, c_int=-5, n=4, exp_mul=3, exp_shift=2, exp_bit=8, output_bit=7),
)


@st.composite
def ibert_softmax_attrs(draw):
    """A preset, or arbitrary attributes (some too large for int64: both refuse those)."""
    if draw(st.booleans()):
        return dict(draw(st.sampled_from(IBERT_SOFTMAX_PRESETS)))
    n = draw(st.integers(0, 40))
    return dict(
        x0_int=draw(st.one_of(st.integers(-400, -1), st.sampled_from((-1, -2000, -(1 << 20))))),
        b_int=draw(st.integers(-50, 2000)),
        c_int=draw(st.one_of(st.integers(-10, 1 << 20), st.sampled_from((0, -1, 1)))),
        n=n,
        exp_mul=draw(st.one_of(st.integers(0, (1 << 31) - 1), st.integers(0, 4))),
        exp_shift=draw(st.integers(max(0, n - 8), n + 60)),
        exp_bit=draw(st.sampled_from((2, 8, 9, 16, 17, 32))),
        output_bit=draw(st.sampled_from((1, 7, 8, 15, 16, 31))),
    )


def _ibert_edges(attrs) -> list[int]:
    """Differences where the exponential's table changes: around the clamp at n*x0_int,
    around the last nonzero exponential (from the spec: it only picks inputs), and 0."""
    from refsim.ops.softmax import _np_ibert_exp

    clamp = -attrs["n"] * attrs["x0_int"]
    edges = {0, 1, clamp - 1, clamp, clamp + 1}
    exp_max = (1 << (attrs["exp_bit"] - 1)) - 1
    params = [attrs[k] for k in ("x0_int", "b_int", "c_int", "n", "exp_mul", "exp_shift")] + [exp_max]
    try:
        e = _np_ibert_exp(-np.arange(min(clamp, 1 << 16) + 1, dtype=np.int64), *params)
    except (OverflowError, ValueError):
        e = np.zeros(0)
    nonzero = np.flatnonzero(e)
    if nonzero.size:
        last = int(nonzero[-1])
        edges |= {last - 1, last, last + 1, last + 2}
    return sorted(d for d in edges if d >= 0)


@st.composite
def ibert_softmax_case(draw):
    """Rows of a narrow or an int32 input, its extremes or values at chosen differences
    below the row's top (table edges: past the last nonzero exponential, the clamp), and
    a mask: none, a key-padding one (1, .., 1, cols) or (cols,), one per matrix
    (batch, heads, 1, cols), one per row, x's full shape, or any broadcastable one;
    all-masked rows among them."""
    attrs = draw(ibert_softmax_attrs())
    t = draw(st.sampled_from(("int8", "int16", "uint8", "uint16", "int4", "int32")))
    lo, hi, _ = TYPES[t]
    shape = draw(st.one_of(shapes(1, 4, 1, 5), st.tuples(st.integers(1, 3), st.integers(1, 40))))
    if draw(st.booleans()):
        x = draw(typed_array(t, shape))
    else:  # top - d for differences d at the table's edges (clipped into the type)
        top = draw(values(t))
        count = math.prod(shape)
        edge = st.sampled_from(_ibert_edges(attrs))
        ds = draw(st.lists(st.one_of(edge, st.integers(0, hi - lo)), min_size=count, max_size=count))
        x = np.clip(top - np.array(ds, dtype=object), lo, hi).astype(STORAGE[t]).reshape(shape)
    kind = draw(st.sampled_from(("none", "padding", "padding", "matrix", "row", "full", "broadcast")))
    if kind == "none":
        return Case("IBertSoftmax", [x], [t], attrs, [False])
    rank, cols = len(shape), shape[-1]
    mshape = {
        "padding": (1,) * draw(st.integers(0, rank - 1)) + (cols,),
        "matrix": shape[:-2] + (1, cols) if rank > 1 else (cols,),  # per sentence (and head)
        "row": shape[:-1] + (1,),
        "full": shape,
        "broadcast": draw(broadcastable(shape)),
    }[kind]
    m_type = draw(st.sampled_from(("uint8", "uint8", "int64", "int8")))
    keep = draw(st.sampled_from(("some", "some", "none", "all")))
    count = math.prod(mshape)
    pool = {"some": (0, 1, 1, 1, -1 if m_type != "uint8" else 255), "none": (0,), "all": (1,)}[keep]
    mask = np.array(draw(st.lists(st.sampled_from(pool), min_size=count, max_size=count)), dtype=object)
    mask = mask.astype(STORAGE[m_type]).reshape(mshape)
    return Case("IBertSoftmax", [x, mask], [t, m_type], attrs, [False, draw(st.booleans())])


CASES = {
    "Requant": st.one_of(requant_case(), tflite_requant_case(), tie_case()),
    "RequantShift": requant_shift_case(),
    "MatMul": matmul_case(),
    "Add": arith_case("Add"),
    "Sub": arith_case("Sub"),
    "Mul": arith_case("Mul"),
    "Relu": relu_case(),
    "Clip": clip_case(),
    "Cast": cast_case(),
    "Lut": lut_case(),
    "LutInterp16": lut_interp16_case(),
    "IBertLayerNorm": ibert_layernorm_case(),
    "IBertSoftmax": ibert_softmax_case(),
    "Reshape": reshape_case(),
    "Transpose": transpose_case(),
    "Slice": slice_case(),
    "Concat": concat_case(),
    "Gather": gather_case(),
    "ReduceSum": reduce_sum_case(),
    "ReduceMean": reduce_mean_case(),
    "ArgMax": argmax_case(),
}
