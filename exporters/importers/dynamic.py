"""onnxruntime `quantize_dynamic` graphs (optimum's ORTQuantizer calls the same quantizer).

quantize_dynamic quantizes only the MatMul inputs, and at run time: each is a
DynamicQuantizeLinear of a float32 tensor (uint8, its scale `(max(0, max x) - min(0, min x)) /
255` and zero point computed from that tensor), a MatMulInteger with the int8/uint8 weights,
then in float32 `Cast`, `Mul` by `f32(x_scale * w_scale)` and `Add` of the float bias. Between
those, everything (embedding sum, LayerNorm, attention scores, Softmax, GELU, residual adds,
pooling) stays float32.

refsim holds every such float tensor as integers on a fixed grid 2^-F, F chosen at import so
that the largest value the tensor can take uses FINE_BITS bits: about float32's precision at
that bound. The bound is proved at import, elementwise or, much tighter, through the L2 norm
of each row (QTensor.row_norm: LayerNorm outputs, Cauchy-Schwarz through the weights). On that:

- DynamicQuantizeLinear is the exact integer replay of onnxruntime's kernel on the dequantized
  grid values (`refsim.ops.DynamicQuantizeLinear`): its scale and zero point become refsim
  tensors (`RuntimeScale`), the quantized values uint8.
- MatMulInteger subtracts the run-time zero point exactly (the accumulator is onnxruntime's
  bit for bit whenever its inputs are).
- Cast -> Mul(x_scale * w_scale) -> Add(bias) is `RescaleF32`: onnxruntime's float32 steps
  replayed exactly, then put on the consumer's fixed grid (`Rescaled` until a consumer needs it).
- The float ops after it use the importer's float replays with a fine target instead of a
  QuantizeLinear's: LayerNorm `LayerNormRound` (its input an exact sum), Softmax
  `FloatSoftmax`, elementwise chains (GELU) a table every 2^k input steps with linear
  interpolation,
  additions and constant products exact integer sums, float MatMul the exact product.

Where onnxruntime computes in float32 (everything but DynamicQuantizeLinear and MatMulInteger)
refsim's grid value differs from onnxruntime's float32 value by a few of its ulps; a
DynamicQuantizeLinear after it then sees a slightly different range and values, so its
outputs agree with onnxruntime except within that difference of a rounding boundary (one
step; measured and documented in docs/IMPORT.md).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from refsim.dtypes import TYPES
from refsim.ops import float32 as f32

from .base import FloatInput, describe, fail
from .values import Const, Dequantized, FloatOp, Moved, QTensor, Rescaled, RuntimeScale

FINE_BITS = 24  # |q| < 2^23 on a fine grid: float32's precision at the tensor's bound, exact in f32(q)
LUT_INPUT_BITS = 16  # an elementwise chain's (GELU's) table index has this many bits
NONLINEAR_HEADS = ("LayerNormalization", "Softmax")
PRODUCTS = ("MatMul", "Gemm", "DynamicQuantizeLinear")


def shape_of(target, result):
    """The length of result's rows (its last axis)."""
    return result.shape[-1] if result.shape else None


def _limit(bits: int = FINE_BITS) -> int:
    return (1 << (bits - 1)) - 1


def _shift_for(bound: float, bits: int = FINE_BITS) -> int:
    """The F for which every |v| <= bound lies within (2^(bits-1) - 1) steps of 2^-F."""
    if not np.isfinite(bound):
        raise ValueError("an unbounded tensor has no fixed grid")
    if bound <= 0:
        return 0
    return int(bits - 1 - np.frexp(bound * (1 + 2.0**-20))[1])


class DynamicMixin:
    """The quantize_dynamic part of QdqImporter (exporters/importers/qdq.py)."""

    def init_dynamic(self) -> None:
        self.dynamic = any(n.op == "DynamicQuantizeLinear" for n in self.g.nodes)
        self.probabilities: set[str] = set()  # fine-grid Softmax outputs (2^-23 steps, rows summing to about 2^23)
        self.rescaled_weights: dict[str, np.ndarray] = {}  # MatMulInteger accumulator -> w - zw (row-norm bounds)

    def _visit(self, node) -> None:
        ins = [self.values.get(n) for n in node.inputs]
        if any(isinstance(v, (RuntimeScale, Rescaled)) for v in ins):
            result = self.dynamic_op(node, ins)
            if result is not None:
                self.values[node.outputs[0]] = result
                return
        if self.dynamic:
            for name, v in zip(node.inputs, ins):
                if isinstance(v, Rescaled) or (isinstance(v, FloatOp) and self._needs_grid(v, node)):
                    self.values[name] = self.materialize(v, name)
        super()._visit(node)

    @staticmethod
    def _needs_grid(v: FloatOp, consumer) -> bool:
        """A float result put on a fine grid now: before a product or DynamicQuantizeLinear, and
        a LayerNorm or Softmax before anything (its replay needs its own target); elementwise
        chains and sums wait for the op that ends them (a Lut, an exact sum into LayerNorm)."""
        if consumer.op in PRODUCTS:
            return True
        head = v
        while isinstance(head, Moved):
            head = head.inputs[0]
        return isinstance(head, FloatOp) and head.node.op in NONLINEAR_HEADS

    def finish(self):
        # A graph output straight from a rescaled MatMulInteger (a classifier's logits) has no
        # consumer to give it a grid: it gets the fine grid a consumer would put it on.
        for name in self.g.outputs:
            if isinstance(self.values.get(name), Rescaled):
                self.values[name] = self.materialize(self.values[name], name)
        return super().finish()

    # --- the quantize_dynamic pattern ---------------------------------------------------------

    def op_DynamicQuantizeLinear(self, node, ins, attrs):
        x = ins[0]
        if isinstance(x, (FloatOp, Rescaled)):
            x = self.materialize(x, node.inputs[0])
            self.values[node.inputs[0]] = x
        if not isinstance(x, Dequantized) or x.q.is_const or not x.q.per_tensor:
            what = f"the float graph input {x.info.name!r}" if isinstance(x, FloatInput) else "a value refsim holds no grid for"
            raise fail(node, f"computes its scale at run time from {what}; refsim replays DynamicQuantizeLinear on "
                             "integers at a known scale (quantize_dynamic's float tensors after a quantized embedding)")
        q = x.q
        scale = np.asarray(q.scale, np.float64).reshape(-1)[0]
        if float(np.float32(scale)) != float(scale):
            raise fail(node, f"its input grid {scale!r} is not a float32 value")
        (m,), (e,) = (np.atleast_1d(v) for v in f32.from_float32(np.float32(scale)))
        stem = node.outputs[0]
        names = [self.em.name(stem), self.em.name(f"{node.outputs[1]}.m"), self.em.name(f"{node.outputs[1]}.e"),
                 self.em.name(node.outputs[2] if len(node.outputs) > 2 and node.outputs[2] else f"{stem}.zero_point")]
        inputs = [self.place(q), self.em.const(np.asarray(m), "int32", f"{stem}.in_scale_m"),
                  self.em.const(np.asarray(e), "int16", f"{stem}.in_scale_e"),
                  self.em.const(np.asarray(q.zp_scalar()), "int32", f"{stem}.in_zero_point")]
        self.em.builder.node("DynamicQuantizeLinear", inputs, outputs=names, name=self.em.name(node.name or stem))
        lo, hi = q.clip or (q.dtype.lo, q.dtype.hi)
        if q.bound is not None:
            lo, hi = max(lo, q.zp_scalar() - q.bound), min(hi, q.zp_scalar() + q.bound)
        # the span max(0, max v) - min(0, min v) is at most the grid's whole range
        largest = (max(hi, q.zp_scalar()) - min(lo, q.zp_scalar())) * float(scale) / 255 * (1 + 2.0**-20)
        y = QTensor(names[0], TYPES["uint8"], tuple(q.shape))
        terms = q.shape[-1] if q.shape and isinstance(q.shape[-1], int) else 0
        row_norm = q.row_norm
        if terms:  # each row's L2 norm is at most sqrt(terms) times its largest value
            largest_value = (max(hi - q.zp_scalar(), q.zp_scalar() - lo)) * float(scale)
            row_norm = min(row_norm if row_norm is not None else np.inf, np.sqrt(terms) * largest_value)
        scale_value = RuntimeScale(names[1], names[2], largest, node, row_norm=row_norm, terms=terms)
        return [y, scale_value, QTensor(names[3], TYPES["uint8"], ())]

    @staticmethod
    def runtime_zero_point(ins) -> bool:
        za = ins[2] if len(ins) > 2 else None
        return isinstance(za, QTensor) and not za.is_const

    def dynamic_matmul_integer(self, node, ins, attrs):
        """MatMulInteger with DynamicQuantizeLinear's zero point: subtracted exactly at run time."""
        za = ins[2]
        a = self.integer(node, ins[0], "A")
        b = self.integer(node, ins[1], "B")
        if not b.is_const or len(b.shape) != 2:
            raise fail(node, "a run-time a_zero_point (DynamicQuantizeLinear's) needs constant 2-D weights B")
        zb = self.integer(node, ins[3], "b_zero_point") if len(ins) > 3 and ins[3] is not None else None
        zb_data = None if zb is None else np.asarray(zb.data).reshape(-1)
        b = replace(b, zero_point=None if zb_data is None else zb_data if zb_data.size > 1 else zb_data.reshape(()))
        inputs = [self.place(a), self.place(b), za.name, self._zero_point_input(b, per_channel_ok=True, node=node)]
        acc = self.qnode("MatMul", inputs, node.outputs[0], node.name)
        centred = np.asarray(b.data, np.int64) - (0 if zb_data is None else zb_data.astype(np.int64))
        a_max = max(a.dtype.hi - a.dtype.lo, 0)  # |a - za| for any zero point of a's type
        self.acc_bounds[acc.name] = a_max * np.abs(centred).sum(axis=0)
        self.rescaled_weights[acc.name] = centred.astype(np.float64)
        return acc

    def dynamic_op(self, node, ins):
        """Mul(x_scale, w_scale), Mul(Cast(acc), scale), Add(bias, ...): quantize_dynamic's
        rescaling, collected for RescaleF32. None: an op that takes a Rescaled as a plain float."""
        op = node.op
        if op == "Mul" and len(ins) == 2:
            for s, c in (ins, ins[::-1]):
                if isinstance(s, RuntimeScale) and s.factor is None and self._float_const(c, allow_vector=True):
                    return replace(s, factor=np.asarray(c.value, np.float32).reshape(-1), node=node)
                if isinstance(s, RuntimeScale) and isinstance(c, Dequantized) and c.q.name in self.acc_bounds \
                        and not c.q.is_const and np.all(np.asarray(c.q.scale) == 1) and not np.any(c.q.zero_point):
                    return Rescaled(replace(c.q, scale=None, zero_point=None), s, self.acc_bounds[c.q.name], node)
        if op == "Add" and len(ins) == 2:
            for r, c in (ins, ins[::-1]):
                if isinstance(r, Rescaled) and r.bias is None and self._float_const(c, allow_vector=True):
                    bias = np.asarray(c.value, np.float32)
                    if bias.size not in (1, r.acc.shape[-1]) or bias.ndim > 1 and bias.shape[:-1] != (1,) * (bias.ndim - 1):
                        return None
                    return replace(r, bias=bias.reshape(-1), node=node)
        if any(isinstance(v, RuntimeScale) for v in ins):
            raise fail(node, "uses DynamicQuantizeLinear's run-time scale other than as quantize_dynamic does (times "
                             "the weight scale, then times MatMulInteger's accumulator cast to float)")
        return None

    @staticmethod
    def _float_const(v, allow_vector=False) -> bool:
        return isinstance(v, Const) and np.asarray(v.value).dtype.kind == "f" and (
            np.size(v.value) == 1 or allow_vector and np.asarray(v.value).ndim >= 1)

    # --- fine grids -----------------------------------------------------------------------------

    def materialize(self, v, name: str) -> Dequantized:
        """v (a Rescaled or a float result) on a fine grid: integers at 2^-F, F fixed at import."""
        if isinstance(v, Rescaled):
            q = self.rescale(v, name)
        else:
            unmoved, moves = self.sink_moves(v)
            q = self.fine_resolve(unmoved, f"{name}.grid")
            for move in moves:
                q = move.apply(q)
        self.em.label(q.name, float(np.asarray(q.scale).reshape(-1)[0]), q.zp_scalar())
        return Dequantized(q)

    def rescale(self, r: Rescaled, out: str) -> QTensor:
        factor = np.float32(1.0) if r.scale.factor is None else r.scale.factor
        bias = np.zeros(1, np.float32) if r.bias is None else r.bias
        columns = np.asarray(r.column_bound, np.float64) * r.scale.largest * np.asarray(factor, np.float64)
        row_norm = None
        weights = self._rescaled_weights(r)
        if weights is not None and r.scale.row_norm is not None and r.scale.terms == weights.shape[0]:
            # ys * (y - zp) is the quantized tensor x within 0.51 ys (rounding, and float32's
            # own errors), so by Cauchy-Schwarz |v_c| <= (|x| + 0.51 ys sqrt(K)) * |W_c| + |b_c|
            # per row: far below 255 * sum|w - zw| * ys when x is a LayerNorm output
            x2 = r.scale.row_norm + 0.51 * r.scale.largest * np.sqrt(r.scale.terms)
            columns = np.minimum(columns, x2 * np.linalg.norm(weights, axis=0))
            row_norm = (x2 * float(np.linalg.norm(weights, 2)) + float(np.linalg.norm(np.asarray(bias, np.float64)))) * (1 + 2.0**-18)
        bound = float(np.max(columns + np.abs(np.asarray(bias, np.float64))))
        shift = _shift_for(bound)
        (fm, fe), (cm, ce) = f32.from_float32(np.atleast_1d(factor)), f32.from_float32(np.abs(np.atleast_1d(bias)))
        cm = np.where(np.atleast_1d(bias) < 0, -cm, cm)
        inputs = [self.place(r.acc), r.scale.m, r.scale.e, self.em.const(fm, "int32", f"{out}.w_scale_m"),
                  self.em.const(fe, "int16", f"{out}.w_scale_e")]
        if r.bias is not None:
            inputs += [self.em.const(cm, "int32", f"{out}.bias_m"), self.em.const(ce, "int16", f"{out}.bias_e")]
        y = self.qnode("RescaleF32", inputs, out, r.node.name, shift=shift, dtype="int32", lo=-_limit(), hi=_limit())
        return replace(y, scale=np.asarray(2.0**-shift), zero_point=np.asarray(0, np.int64), bound=_limit(),
                       clip=(-_limit(), _limit()), row_norm=row_norm)

    def _rescaled_weights(self, r: Rescaled) -> np.ndarray | None:
        """(w - zw) * w_scale per column of the MatMulInteger behind r, float64, or None."""
        weights = self.rescaled_weights.get(r.acc.name)
        if weights is None:
            return None
        factor = np.float32(1.0) if r.scale.factor is None else r.scale.factor
        return weights * np.asarray(factor, np.float64).reshape(1, -1)

    def fine_target(self, shape, bound: float, bits: int = FINE_BITS, signed: bool = True) -> QTensor:
        shift = _shift_for(bound, bits)
        limit = _limit(bits)
        return QTensor(None, TYPES["int32" if bits > 16 else "int16"], tuple(shape), scale=np.asarray(2.0**-shift),
                       zero_point=np.asarray(0, np.int64), clip=(-limit if signed else 0, limit), bound=limit)

    def real_bound(self, v) -> float:
        """max |v| over every input: a static bound of a float expression refsim holds on a grid."""
        if isinstance(v, Dequantized):
            q = v.q
            if q.is_const:
                return float(np.abs(self.evaluate(v, None, None)).max(initial=0))
            levels = q.bound if q.bound is not None else max(q.dtype.hi - q.zp_scalar(), q.zp_scalar() - q.dtype.lo)
            return float(levels * np.max(np.asarray(q.scale, np.float64)))
        if isinstance(v, Const):
            return float(np.abs(np.asarray(v.value, np.float64)).max(initial=0))
        if isinstance(v, Moved):
            return self.real_bound(v.inputs[0])
        if not isinstance(v, FloatOp):
            raise fail(None, "a value with no static bound")
        op, ins = v.node.op, v.inputs
        if op == "LayerNormalization":
            n = self.float_shape(v)[-1]
            gamma = np.abs(np.asarray(self.evaluate(ins[1], None, None), np.float64)).max(initial=0)
            beta = np.abs(np.asarray(self.evaluate(ins[2], None, None), np.float64)).max(initial=0) if len(ins) > 2 and ins[2] is not None else 0.0
            return float(gamma * np.sqrt(max(n - 1, 1)) + beta)
        if op == "Softmax":
            return 1.0
        analysed = self.affine_terms(v)
        if analysed is not None:
            terms, constant = analysed
            total = float(np.abs(np.asarray(constant, np.float64)).max(initial=0))
            for q, coef in terms.values():
                total += self.real_bound(Dequantized(q)) / float(np.max(np.asarray(q.scale, np.float64))) * float(np.abs(coef).max())
            return total
        leaves = self._runtime_leaves(v)
        if len(leaves) == 1:  # an elementwise chain (GELU): its largest value on a dense sample of the input
            leaf = next(iter(leaves.values()))
            b = leaf.bound if leaf.bound is not None else max(-leaf.dtype.lo, leaf.dtype.hi)
            levels = np.unique(np.rint(np.linspace(-b, b, 1 << 14)).astype(np.int64)) + leaf.zp_scalar()
            with np.errstate(all="ignore"):
                values = np.asarray(self.evaluate(v, leaf, levels), np.float64)
            if not np.all(np.isfinite(values)):
                raise fail(v.node, "its float result is not finite over its input's range; refsim holds no grid for it")
            return float(np.abs(values).max(initial=0)) * 1.01
        raise fail(v.node, f"its float result (between quantize_dynamic's quantizers) has no static bound refsim knows "
                           f"({describe(v.node)} of {len(leaves)} tensors)")

    def fine_resolve(self, expr: FloatOp, out: str) -> QTensor:
        """QuantizeLinear(expr) at a fine grid, with the importer's float replays."""
        from .qdq import _nan_guarded_softmax

        safe = _nan_guarded_softmax(expr)
        if safe is not None:
            return self.fine_resolve(safe, out)
        shape = self.float_shape(expr)
        op = expr.node.op
        if op == "Softmax":
            scores, keep, infinite = self._masked_scores(expr.inputs[0])
            q = self._row_input(FloatOp(expr.node, [scores], expr.attrs), "Softmax")
            if q.dtype.bits > 32:  # FloatSoftmax takes 32 bits: the exact scores rounded once
                q = self.narrow_grid(q, f"{out}.scores", 32)
            if keep is not None:
                # masked keys below every score: their exponential is 0 as onnxruntime's is
                # (f32(s + mask) is the mask, exp of it minus the row maximum underflows)
                lowest = self.em.const(np.asarray(-(1 << 31)), "int32", f"{out}.lowest")
                from ..frontend import integer_ops

                x = integer_ops.select(self.em, self.place(keep), self.place(q), lowest, f"{out}.masked")
                q = replace(q, name=x, dtype=self.em.dtype(x), bound=None, clip=None)
            target = self.fine_target(shape, 1.0, signed=False)
            p = self._float_softmax(FloatOp(expr.node, [Dequantized(q)], expr.attrs), target, f"{out}.all" if infinite else out)
            if infinite:
                # every key masked by -inf: onnxruntime computes NaN there, which the graph's IsNaN
                # guard makes 0; refsim's row would be uniform, so rows with no kept key are zeroed
                kept = self.qnode("ReduceSum", [self.place(keep)], f"{out}.kept", axes=[-1], keepdims=True)
                alive = self.qnode("Clip", [kept.name], f"{out}.alive", lo=0, hi=1)
                p = replace(p, name=self.qnode("Mul", [p.name, alive.name], out, dtype=p.dtype.name).name)
            self.probabilities.add(p.name)
            return p
        target = self.fine_target(shape, self.real_bound(expr))
        if op == "LayerNormalization":
            result = self._ort_layernorm(expr, target, out)
            if result is None:
                raise fail(expr.node, "takes a float value refsim does not hold as an exact sum on one grid")
            # sum(x_hat^2) = n var / (var + eps) <= n: |gamma * x_hat + beta| <= max|gamma| sqrt(n) + |beta|,
            # plus half a step per value for the rounding
            n = shape[-1]
            gamma = np.abs(np.asarray(self.evaluate(expr.inputs[1], None, None), np.float64)).max(initial=0)
            beta = (np.broadcast_to(np.asarray(self.evaluate(expr.inputs[2], None, None), np.float64).reshape(-1), (n,))
                    if len(expr.inputs) > 2 and expr.inputs[2] is not None else np.zeros(n))
            norm = gamma * np.sqrt(n) + float(np.linalg.norm(beta)) + np.sqrt(n) * float(target.scale)
            return replace(result, row_norm=float(norm) * (1 + 2.0**-18))
        affine = self.affine(expr, target, out)
        if affine is not None:
            return affine
        leaves = self._runtime_leaves(expr)
        if len(leaves) == 1 and self._elementwise(expr):
            return self.interpolated(expr, next(iter(leaves.values())), target, out)
        raise fail(expr.node, "float op between quantize_dynamic's quantizers has no integer form in refsim "
                              f"({len(leaves)} quantized inputs, not a sum, LayerNorm, Softmax or elementwise chain)")

    def interpolated(self, expr: FloatOp, leaf: QTensor, target: QTensor, out: str) -> QTensor:
        """An elementwise chain (GELU) of a fine-grid x, as a table of its float32 values every
        2^k steps (index i = floor(x / 2^k), of at most LUT_INPUT_BITS bits) and linear
        interpolation between neighbours: y = T[i] + rs((T[i+1] - T[i]) * r, k) with r = x - i*2^k
        (rs: rounding shift, half to even). T[j] is the float32 function at j*2^k steps on
        target's grid. Its error is below f''*h^2/8 for the step h = 2^k * s (a few 1e-9 on
        quantize_dynamic's tiny BERT) plus one rounding."""
        from .qdq import _substituted

        if not leaf.per_tensor:
            raise fail(expr.node, "an elementwise chain of a per-channel grid is not supported")
        bound = leaf.bound if leaf.bound is not None else max(-leaf.dtype.lo, leaf.dtype.hi)
        k = max(0, (bound + abs(leaf.zp_scalar())).bit_length() - (LUT_INPUT_BITS - 1))
        x = self.place(leaf)
        if leaf.zp_scalar():
            x = self.qnode("Sub", [x, self.em.const(np.asarray(leaf.zp_scalar()), stem=f"{out}.zero_point")],
                           f"{out}.centred", dtype="int32").name
        t = TYPES["int16" if LUT_INPUT_BITS <= 16 else "int32"]
        index = self.qnode("Requant", [x, self.em.const(np.asarray(1)), self.em.const(np.asarray(k))], f"{out}.index",
                           rounding="floor", dtype=t.name)
        step = self.em.const(np.asarray(1 << k), "int32", f"{out}.step")
        start = self.qnode("Mul", [index.name, step], f"{out}.start", dtype="int32")
        rest = self.qnode("Sub", [x, start.name], f"{out}.rest", dtype="int32")
        scale = float(np.asarray(leaf.scale, np.float64).reshape(-1)[0])
        grid = QTensor(None, TYPES["int64"], (), scale=np.asarray(scale * 2.0**k), zero_point=np.asarray(0, np.int64))
        chain = _substituted(expr, self._leaf_value(expr, leaf.name), Dequantized(replace(grid, name="index")))
        levels = np.arange(t.lo, t.hi + 2, dtype=np.int64)  # one past the end: the last entry's neighbour
        with np.errstate(all="ignore"):
            values = np.broadcast_to(np.asarray(self.evaluate(chain, replace(grid, name="index"), levels), np.float64),
                                     levels.shape)
        if not np.all(np.isfinite(values)):
            raise fail(expr.node, "its float result is not finite over its input's range")
        lo, hi = target.clip
        table = np.clip(np.rint(values / float(target.scale)), lo, hi).astype(np.int64)  # one rounding, half to even
        slope = table[1:] - table[:-1]
        base = self.qnode("Lut", [index.name, self.em.const(table[:-1].astype(np.int32), "int32", f"{out}.table")],
                          f"{out}.base")
        rise = self.qnode("Lut", [index.name, self.em.const(slope.astype(np.int32), "int32", f"{out}.slope_table")],
                          f"{out}.slope")
        product = self.qnode("Mul", [rise.name, rest.name], f"{out}.rise", dtype="int64")
        between = self.qnode("Requant", [product.name, self.em.const(np.asarray(1)), self.em.const(np.asarray(k)),
                                         None, None], f"{out}.between", rounding="half_even", dtype="int32")
        total = self.qnode("Add", [base.name, between.name], f"{out}.sum", dtype="int32")
        result = self.qnode("Clip", [total.name], out, expr.node.name, lo=lo, hi=hi)
        row_norm = None
        if leaf.row_norm is not None and isinstance(shape_of(target, result), int):
            # |f(x)| <= L |x| + c on the table (L: the largest |T_j| / |x_j| away from 0, c: |T| near 0);
            # between table points the interpolation stays within its two ends
            xs = (levels.astype(np.float64)) * scale * 2.0**k
            ys = table.astype(np.float64) * float(target.scale)
            far = np.abs(xs) >= 2 * scale * 2.0**k
            slope = float(np.max(np.abs(ys[far]) / np.abs(xs[far]), initial=0)) * (1 + 2.0**-10)
            near = float(np.abs(ys[~far]).max(initial=0)) + 2 * float(target.scale)
            n = shape_of(target, result)
            row_norm = slope * (leaf.row_norm + np.sqrt(n) * scale * 2.0**k) + np.sqrt(n) * near
        return replace(target, name=result.name, shape=result.shape, row_norm=row_norm)

    def _masked_scores(self, x):
        """(scores, keep, infinite) for Add(scores, Where(cond, 0, very negative)) (transformers'
        additive key mask computed from the integer attention mask), else (x, None, False)."""
        from ..frontend.masks import MASK_VERY_NEGATIVE

        if not (isinstance(x, FloatOp) and x.node.op == "Add" and len(x.inputs) == 2):
            return x, None, False
        for scores, mask in (x.inputs, x.inputs[::-1]):
            if isinstance(mask, FloatOp) and mask.node.op == "Where" and isinstance(mask.inputs[0], QTensor) \
                    and isinstance(scores, Dequantized):
                fills = [float(np.asarray(v.value).reshape(-1)[0]) if isinstance(v, Const) and np.size(v.value) == 1
                         else None for v in mask.inputs[1:]]
                cond = mask.inputs[0]
                if fills[0] == 0.0 and fills[1] is not None and fills[1] <= MASK_VERY_NEGATIVE:
                    return scores, cond, np.isinf(fills[1])
                if fills[1] == 0.0 and fills[0] is not None and fills[0] <= MASK_VERY_NEGATIVE:
                    keep = self.qnode("Sub", [self.em.const(1, "uint8"), self.place(cond)], f"{mask.node.outputs[0]}.keep",
                                      dtype="uint8")
                    return scores, keep, np.isinf(fills[0])
        return x, None, False

    def _elementwise(self, expr) -> bool:
        from .qdq import ELEMENTWISE

        if isinstance(expr, FloatOp):
            return not isinstance(expr, Moved) and expr.node.op in ELEMENTWISE and all(
                i is None or self._elementwise(i) for i in expr.inputs)
        return isinstance(expr, Dequantized) or isinstance(expr, Const) and np.size(expr.value) == 1

    @staticmethod
    def _leaf_value(expr, name: str):
        stack = [expr]
        while stack:
            v = stack.pop()
            if isinstance(v, Dequantized) and v.q.name == name:
                return v
            if isinstance(v, FloatOp):
                stack.extend(i for i in v.inputs if i is not None)
        raise AssertionError(f"{name} is not a leaf")

    def narrow_grid(self, q: QTensor, out: str, bits: int = FINE_BITS) -> QTensor:
        """q (per tensor, zero point 0 or not) on a coarser power-of-two grid of `bits` bits:
        one rounding shift (half to even)."""
        bound = self.acc_bounds.get(q.name, q.bound if q.bound is not None else max(-q.dtype.lo, q.dtype.hi))
        bound = int(np.max(bound))
        drop = max(0, bound.bit_length() - (bits - 1))
        scale = float(np.asarray(q.scale, np.float64).reshape(-1)[0]) * 2.0**drop
        target = QTensor(None, TYPES["int32" if bits > 16 else "int16"], tuple(q.shape), scale=np.asarray(scale),
                         zero_point=np.asarray(0, np.int64), bound=(bound >> drop) + 1, clip=(-_limit(bits), _limit(bits)))
        x = self.place(q)
        if q.zp_scalar():
            x = self.qnode("Sub", [x, self.em.const(np.asarray(q.zp_scalar()), stem=f"{out}.zero_point")], f"{out}.centred",
                           dtype="int64").name
        # a plain rounding shift whatever --requant says (RequantF32 would round x to 24 bits first)
        result = self.qnode("Requant", [x, self.em.const(np.asarray(1)), self.em.const(np.asarray(drop))], out,
                            rounding="half_even", dtype=target.dtype.name, lo=target.clip[0], hi=target.clip[1])
        return replace(target, name=result.name, shape=result.shape)
