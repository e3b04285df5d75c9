"""QDQ and QOperator graphs (onnxruntime's quantizer, torch.onnx.export of fake-quant models).

QuantizeLinear/DequantizeLinear pairs say which tensors are integers and at what scale;
the ops between them are computed in integers:

- MatMul, Gemm, Conv on dequantized operands: the exact integer product (zero points
  subtracted) whose scale is a_scale * w_scale; the QuantizeLinear after it becomes a
  requantization (`dyadic`: Requant; `ort`: RequantF32, onnxruntime's float32 arithmetic).
  QLinearMatMul, QLinearConv, MatMulInteger and ConvInteger are the same products written
  as single nodes.
- Elementwise float ops whose only non-constant input is one quantized tensor of at most
  16 bits (Erf, Sigmoid, Div by a constant, Relu, ...; chains of them too) become a lookup
  table, computed with onnx's reference implementation of the same ops: exact with
  respect to ONNX's float32 semantics.
- Add/Sub of quantized tensors (and constants): an integer sum of the operands scaled by a
  common dyadic multiplier, then one rounding shift. Mul: the integer product, requantized.
- Data movement (Reshape, Transpose, Gather, Slice, Concat, MaxPool, Pad, ...) acts on the
  integers and keeps the scale.

onnxruntime quantize_dynamic's DynamicQuantizeLinear / MatMulInteger graphs, whose float
regions refsim holds on fine fixed grids: `dynamic.py` (a mixin of QdqImporter).

Float graph inputs must go through a QuantizeLinear: the refsim model takes the quantized
integers (`quantize_inputs` applies ONNX's QuantizeLinear on the host). Dequantized graph
outputs stay integers with their scale recorded (`dequantize_outputs` on the host).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import helper
from refsim.dtypes import TYPES

from ..frontend import integer_ops
from ..frontend import requant as rq
from ..frontend.checks import SizeBudget
from ..frontend.emitter import narrowest_type
from ..frontend.fold import evaluate
from ..frontend.graph import FLOAT_TYPES, INTEGER_TYPES, Node, type_name
from ..frontend.integer_ops import INTEGER_OPS, lower
from ..frontend.masks import MASK_VERY_NEGATIVE
from .base import FloatInput, Importer, describe, fail
from .dynamic import DynamicMixin
from .values import Const, Dequantized, FloatOp, KeyMask, MaskedScores, Moved, QTensor, ratio_of

# Elementwise float ops a lookup table can stand for (one quantized input, scalar constants).
ELEMENTWISE = {
    "Abs", "Acos", "Acosh", "Add", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Clip",
    "Cos", "Cosh", "Div", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow", "PRelu", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Tan", "Tanh",
    "ThresholdedRelu",
}
LUT_MAX_BITS = 16
# What one evaluation of a threshold search may allocate (thresholds.CHUNK values, float64, a
# few ops' results at once).
THRESHOLD_BUDGET = 1 << 30
# A float bias (no bias quantizer) is kept to 2^-16 of an accumulator step, not rounded to whole steps.
FLOAT_BIAS_FRACTION_BITS = 16
MICROSOFT = "com.microsoft"
# Integer variants standing for float Softmax / LayerNormalization between DQ and Q.
MODES = ("ibert", "deeploy")


class QdqImporter(DynamicMixin, Importer):
    format_name = "qdq"
    KEEP = ("DequantizeLinear",)

    def __init__(self, graph, emitter, mode: str = "ibert", requant: str = "dyadic", float_ops: str = "integer"):
        super().__init__(graph, emitter, requant, float_ops)
        if mode not in MODES:
            raise fail(None, f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        self.mode = mode
        self.acc_bounds: dict[str, np.ndarray] = {}  # MatMul accumulators: max |acc| per output column
        self.unquantized: dict[tuple, QTensor | None] = {}  # LayerNorm outputs used with no quantizer (`unquantized_layernorm`)
        self.init_dynamic()
        h = self.handlers
        for domain in ("", MICROSOFT):
            h[(domain, "QuantizeLinear")] = self.op_QuantizeLinear
            h[(domain, "DequantizeLinear")] = self.op_DequantizeLinear
        for op in ("MatMul", "Gemm", "Conv", "QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger"):
            h[("", op)] = getattr(self, f"op_{op}")
        for op in ("QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax", "QGemm"):
            h[(MICROSOFT, op)] = getattr(self, f"op_{op}")
        h[("", "DynamicQuantizeLinear")] = self.op_DynamicQuantizeLinear

    def foldable(self, domain: str, op_type: str) -> bool:
        # A dequantized constant stays integers with a scale: weights must reach MatMul/Conv as such.
        return domain == "" and op_type != "DequantizeLinear"

    # --- quantization parameters ----------------------------------------------------------

    def quant_params(self, node, scale, zero_point, attrs, shape, default_dtype: str | None = None,
                     zp_index: int | None = None) -> QTensor:
        s = self.const_value(node, scale, "the scale")
        if s is None or np.asarray(s).dtype.kind != "f":
            raise fail(node, "the scale must be a float constant")
        s = np.asarray(s).astype(np.float32)
        if np.any(~np.isfinite(s)) or np.any(s <= 0):
            raise fail(node, "scales must be positive and finite")
        if zero_point is not None:
            zp_array = self.const_value(node, zero_point, "the zero point")
            elem = self.elem_type(node, zp_index) if zp_index is not None else None
            if elem is None:
                elem = helper.np_dtype_to_tensor_dtype(np.asarray(zp_array).dtype)
        else:
            zp_array, elem = None, None
        out_type = attrs.get("output_dtype", 0)
        if elem is None:
            elem = out_type or (onnx.TensorProto.UINT8 if default_dtype is None else None)
        if elem is None:
            dtype = default_dtype
        else:
            if elem not in INTEGER_TYPES or elem == onnx.TensorProto.BOOL:
                raise fail(node, f"quantizes to {type_name(elem)}, which is not an integer type refsim runs")
            dtype = INTEGER_TYPES[elem]
        t = TYPES[dtype]
        zp = np.zeros(s.shape, np.int64) if zp_array is None else np.asarray(zp_array).astype(np.int64)
        if zp.shape != s.shape and not (zp.size == 1 and s.size == 1):
            raise fail(node, f"scale {list(s.shape)} and zero point {list(zp.shape)} shapes differ")
        block = int(attrs.get("block_size", 0) or 0)
        axis = None
        if s.size > 1 or s.ndim == 1 and block:
            rank = len(shape)
            axis = attrs.get("axis", 1) % max(rank, 1)
        if s.size == 1 and not block:
            s, zp = s.reshape(()), zp.reshape(())
        elif zp.size == 1 and s.size == 1:
            zp = zp.reshape(s.shape)
        if zp.size and (int(zp.min()) < t.lo or int(zp.max()) > t.hi):
            raise fail(node, f"zero point outside {dtype}")
        return QTensor(None, t, tuple(shape), scale=s.astype(np.float64), zero_point=zp, axis=axis, block_size=block)

    def elem_type(self, node, index: int) -> int | None:
        """The ONNX element type of input `index`: initializers keep theirs (int4 included)."""
        name = node.inputs[index] if index < len(node.inputs) else ""
        if not name:
            return None
        if name in self.const_types:
            return self.const_types[name]
        value = self.values.get(name)
        if isinstance(value, QTensor):
            return next(k for k, v in INTEGER_TYPES.items() if v == value.dtype.name and k != onnx.TensorProto.BOOL)
        if isinstance(value, Const):
            return helper.np_dtype_to_tensor_dtype(np.asarray(value.value).dtype)
        return None

    # --- QuantizeLinear / DequantizeLinear --------------------------------------------------

    def op_QuantizeLinear(self, node, ins, attrs):
        x = ins[0]
        if _infinite(ins[1]):
            return self.infinitely_scaled(node, x)
        shape = self._value_shape(node, x)
        target = self.quant_params(node, ins[1], ins[2] if len(ins) > 2 else None, attrs, shape, zp_index=2)
        out = node.outputs[0]
        if isinstance(x, FloatInput):
            return self.quantized_input(node, x, target)
        if isinstance(x, Const):
            return replace(target, data=self.onnx_quantize(np.asarray(x.value, np.float32), target), shape=np.shape(x.value))
        if isinstance(x, Dequantized):
            q = x.q
            if _same(q, target):
                return q
            if q.is_const:
                return replace(target, data=self.onnx_quantize(self.onnx_dequantize(q.data, q), target), shape=q.shape)
            self._per_tensor(node, target)
            exact, ort = ratio_of(q, target)
            return self.requantize(q, exact, target, out, node, ort_ratio=ort, axis=self._axis(q))
        if isinstance(x, FloatOp):
            self._per_tensor(node, target)
            return self.resolve(x, target, out, node)
        if isinstance(x, QTensor) and x.scale is None:
            self._per_tensor(node, target)
            one = replace(x, scale=np.float64(1.0), zero_point=np.int64(0))
            exact, ort = ratio_of(one, target)
            return self.requantize(one, exact, target, out, node, ort_ratio=ort)
        raise fail(node, "quantizes a value refsim cannot represent")

    def _value_shape(self, node, x):
        if isinstance(x, FloatInput):
            return x.info.shape
        if isinstance(x, Const):
            return np.shape(x.value)
        if isinstance(x, Dequantized):
            return x.q.shape
        if isinstance(x, QTensor):
            return x.shape
        if isinstance(x, FloatOp):
            return self.float_shape(x)
        return ()

    def _shape_of(self, node, value) -> tuple:
        if isinstance(value, FloatOp):  # Shape of a float result: known without computing it
            return tuple(self.float_shape(value))
        return super()._shape_of(node, value)

    def float_shape(self, expr: FloatOp) -> tuple:
        if isinstance(expr, Moved):
            return tuple(expr.shape)
        shapes = []
        for v in expr.inputs:
            if v is None:
                continue
            shapes.append(tuple(self._value_shape(expr.node, v)))
        if expr.node.op in ELEMENTWISE | {"Softmax", "LayerNormalization"}:
            from refsim.ops.registry import broadcast_shapes
            return broadcast_shapes(*shapes) if shapes else ()
        return shapes[0] if shapes else ()

    @staticmethod
    def _per_tensor(node, target: QTensor):
        if not target.per_tensor:
            raise fail(node, "per-axis or blocked quantization of a computed tensor is not supported")

    @staticmethod
    def _axis(q: QTensor):
        return None if q.per_tensor else q.axis

    def quantized_input(self, node, x: FloatInput, target: QTensor) -> QTensor:
        info = x.info
        if x.quantized is not None:
            if not _same(x.quantized, target):
                raise fail(node, f"quantizes float input {info.name!r} differently from another QuantizeLinear")
            return x.quantized
        name = self.em.builder.input(info.name, target.dtype.name, info.shape)
        q = replace(target, name=name, shape=tuple(info.shape))
        t = self.em.builder.tensors[name]
        from .base import _display_quant, quantization_entry

        t.scale, t.zero_point, t.quant_axis = _display_quant(q)
        self.input_quantization[info.name] = {"dtype": q.dtype.name, "onnx_dtype": type_name(info.elem_type).lower(),
                                              **quantization_entry(q)}
        x.quantized = q
        return q

    def op_DequantizeLinear(self, node, ins, attrs):
        x = ins[0]
        if isinstance(x, (KeyMask, MaskedScores)):
            return x  # quantized at an infinite scale: the value itself (`infinitely_scaled`)
        if isinstance(x, Const):
            elem = self.elem_type(node, 0)
            array = np.asarray(x.value)
            if array.dtype.kind not in "iu":
                raise fail(node, f"dequantizes a {array.dtype} constant; integers expected")
            dtype = INTEGER_TYPES.get(elem) if elem else narrowest_type(array).name
            if array.dtype.kind == "u" and elem is None:
                dtype = "uint8" if array.dtype.itemsize == 1 else "uint16"
            q = QTensor(None, TYPES[dtype], array.shape, data=array)
        elif isinstance(x, QTensor):
            q = x
        else:
            raise fail(node, "dequantizes a value that is not an integer tensor")
        params = self.quant_params(node, ins[1], ins[2] if len(ins) > 2 else None, attrs, q.shape,
                                   default_dtype=q.dtype.name, zp_index=2)
        narrowed = isinstance(x, QTensor) and params.dtype.contains(q.dtype.lo, q.dtype.hi)  # by a Clip (`narrow`)
        if params.dtype is not q.dtype and not narrowed:
            raise fail(node, f"zero point type {params.dtype} differs from the input type {q.dtype}")
        return Dequantized(replace(q, scale=params.scale, zero_point=params.zero_point, axis=params.axis,
                                   block_size=params.block_size, factors=None))

    def infinitely_scaled(self, node, x):
        """A QuantizeLinear at an infinite scale. quantize_static writes one for an additive
        attention mask of 0 and -inf (transformers 5.x's `Where(keep, 0, -inf)`), and for the
        scores with that mask added: the range it calibrates is infinite. onnxruntime then
        computes NaN or 0 for every score (0 * inf); what the graph means is a key-padding
        mask: the scores keep their own grid and the Softmax leaves masked keys out. refsim
        reads exactly that pair so (`KeyMask`, `MaskedScores`) and refuses any other."""
        if isinstance(x, FloatOp) and x.node.op == "Where" and isinstance(x.inputs[0], QTensor):
            fills = [self._scalar(v) for v in x.inputs[1:]]
            keep = x.inputs[0]
            if fills[0] == 0.0 and fills[1] is not None and fills[1] <= MASK_VERY_NEGATIVE:
                return KeyMask(keep, x.node)
            if fills[1] == 0.0 and fills[0] is not None and fills[0] <= MASK_VERY_NEGATIVE:
                return KeyMask(self.qnode("Sub", [self.em.const(1, "uint8"), self.place(keep)],
                                          f"{node.outputs[0]}.keep", dtype="uint8"), x.node)
        if isinstance(x, FloatOp) and x.node.op == "Add" and len(x.inputs) == 2:
            for scores, mask in (x.inputs, x.inputs[::-1]):
                if isinstance(mask, KeyMask) and isinstance(scores, Dequantized) and not scores.q.is_const:
                    return MaskedScores(scores.q, mask.keep, x.node)
        raise fail(node, "quantizes at an infinite scale; refsim reads that only for an attention mask of 0 and "
                         "-inf (Where(mask, 0, -inf)) and the scores it is added to, before a Softmax")

    def _scalar(self, v) -> float | None:
        if isinstance(v, Const) and np.size(v.value) == 1:
            return float(np.asarray(v.value).reshape(()))
        return None

    def op_Gather(self, node, ins, attrs):
        data, indices = ins
        if not (isinstance(data, Dequantized) and data.q.is_const and not data.q.per_tensor and not data.q.block_size):
            return super().op_Gather(node, ins, attrs)
        # A table quantized per row (NNCF's embeddings): its float32 rows f32(s_r * (q - z)), as
        # DequantizeLinear computes them, all lie on one grid 2^-E (every float32 is a dyadic
        # rational), so the gathered rows are exact integers there at one per-tensor scale.
        values = np.asarray(self.onnx_dequantize(data.q.data, data.q), np.float64)
        if isinstance(indices, Const):
            idx = np.asarray(indices.value).astype(np.int64)
            return Const(np.take(values.astype(np.float32), idx, axis=attrs.get("axis", 0)))
        finest = _dyadic_exponent(values)
        if finest + int(np.frexp(np.abs(values).max(initial=0))[1]) > 62:
            raise fail(node, "gathers from a table quantized per row whose rows share no int64 grid")
        ints = values * 2.0**finest
        largest = int(np.abs(ints).max(initial=0))
        dtype = TYPES["int32" if largest < 1 << 31 else "int64"]
        grid = QTensor(None, dtype, tuple(values.shape), data=ints.astype(dtype.storage), scale=np.asarray(2.0**-finest),
                       zero_point=np.asarray(0, np.int64), bound=largest)
        return super().op_Gather(node, [Dequantized(grid), indices], attrs)

    # --- ONNX's own Q/DQ arithmetic, for constants and tables ------------------------------

    def onnx_dequantize(self, levels: np.ndarray, q: QTensor) -> np.ndarray:
        storage = np.asarray(levels).astype(q.dtype.storage)
        zp = np.asarray(q.zero_point if q.zero_point is not None else 0).astype(q.dtype.storage)
        attrs = {}
        if q.axis is not None:
            attrs["axis"] = q.axis
        if q.block_size:
            attrs["block_size"] = q.block_size
        node = Node("DequantizeLinear", ["x", "s", "z"], ["y"], attrs, "dequantize")
        return evaluate(node, [storage, np.asarray(q.scale, np.float32), zp], {"": 21})[0]

    def quantize_values(self, x: np.ndarray, target: QTensor) -> np.ndarray:
        """Float values (constants, table entries) onto target's grid, as the format quantizes."""
        return self.onnx_quantize(x, target)

    def onnx_quantize(self, x: np.ndarray, target: QTensor) -> np.ndarray:
        t = target.dtype
        wide = np.uint8 if not t.signed and t.bits <= 8 else (np.int8 if t.bits <= 8 else t.storage)
        zp = np.asarray(target.zero_point if target.zero_point is not None else 0).astype(wide)
        attrs = {}
        if target.axis is not None:
            attrs["axis"] = target.axis
        if target.block_size:
            attrs["block_size"] = target.block_size
        node = Node("QuantizeLinear", ["x", "s", "z"], ["y"], attrs, "quantize")
        y = evaluate(node, [np.asarray(x, np.float32), np.asarray(target.scale, np.float32), zp], {"": 21})[0]
        # A sub-byte type saturates to its own, narrower range.
        return np.clip(y.astype(np.int64), t.lo, t.hi).astype(t.storage)

    # --- products ------------------------------------------------------------------------------

    def _operand(self, node, value, what: str) -> QTensor:
        if isinstance(value, Dequantized):
            q = value.q
            if q.block_size:
                raise fail(node, f"{what} uses blocked quantization, which refsim does not support here")
            return q
        if isinstance(value, Const) and np.asarray(value.value).dtype.kind == "f":
            raise fail(node, f"{what} is a float constant; quantize it (QuantizeLinear/DequantizeLinear) first")
        if isinstance(value, FloatOp) and self.float_ops == "ort":
            unquantized = self.unquantized_softmax(value)
            if unquantized is None:
                unquantized = self.unquantized_affine(value)
            if unquantized is not None:
                return unquantized
        if isinstance(value, FloatOp):
            raise fail(node, f"{what} is the float result of {describe(value.node)}; it needs a QuantizeLinear first")
        if isinstance(value, FloatInput):
            raise fail(node, f"{what} is float input {value.info.name!r}; it needs a QuantizeLinear first")
        return self.integer(node, value, what)

    def unquantized_affine(self, expr: FloatOp) -> QTensor | None:
        """A float sum of quantized tensors and constants (an accumulator plus its float bias),
        moved by Reshape/Transpose, used unquantized as a MatMul operand (NNCF's transformer
        preset: the value projection, attention unmasked): the sum on one grid (`exact_sum`, rounded
        to SUM_BITS where onnxruntime keeps float32), then moved. None when expr is not such a sum."""
        key = ("affine", expr.node.outputs[0])
        if key not in self.unquantized:
            unmoved, moves = self.sink_moves(expr)
            q = self.exact_sum(unmoved, f"{expr.node.outputs[0]}.unquantized") if isinstance(unmoved, FloatOp) else None
            for move in moves if q is not None else []:
                q = move.apply(q)
            self.unquantized[key] = q
        return self.unquantized[key]

    # Attention probabilities used with no quantizer, on a 2^-15 grid in uint16 (1.0 fits)
    UNQUANTIZED_SOFTMAX_BITS = 15

    def unquantized_softmax(self, expr: FloatOp) -> QTensor | None:
        """A Softmax whose float probabilities go unquantized into the next MatMul (NNCF's
        transformer preset, attention unmasked): onnxruntime's float32 Softmax replayed
        (`FloatSoftmax`) and rounded once to 2^-UNQUANTIZED_SOFTMAX_BITS, where onnxruntime keeps
        float32 (docs/IMPORT.md, residue). None when expr is not such a Softmax."""
        expr = _nan_guarded_softmax(expr) or expr
        if expr.node.op != "Softmax":
            return None
        key = expr.node.outputs[0]
        if key not in self.unquantized:
            target = QTensor(None, TYPES["uint16"], tuple(self.float_shape(expr)),
                             scale=np.asarray(2.0**-self.UNQUANTIZED_SOFTMAX_BITS), zero_point=np.asarray(0, np.int64))
            x = expr.inputs[0]
            out = f"{key}.unquantized"
            q = None
            if isinstance(x, FloatOp) and x.node.op == "Add" and any(
                    isinstance(v, KeyMask) or self._float_key_mask(v) is not None for v in x.inputs):
                q = self._key_masked_float_softmax(expr, target, out)
            elif isinstance(x, Dequantized) and not x.q.is_const and x.q.per_tensor and x.q.dtype.bits <= 32:
                q = self._float_softmax(expr, target, out)
            self.unquantized[key] = None if q is None else replace(q, bound=1 << self.UNQUANTIZED_SOFTMAX_BITS)
        return self.unquantized[key]

    def _zero_point_input(self, q: QTensor, dtype=None, per_channel_ok=False, node=None, what=""):
        if q.zero_point is None or not np.any(q.zero_point):
            return None
        zp = np.asarray(q.zero_point)
        if zp.size > 1 and not per_channel_ok:
            raise fail(node, f"{what} has per-channel zero points, which refsim supports only for weights")
        return self.em.const(zp.reshape(-1) if zp.size > 1 else zp.reshape(()), q.dtype)

    def matmul(self, node, a: QTensor, b: QTensor, out: str, transA=False, transB=False, bias: str | None = None) -> QTensor:
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise fail(node, "1-D MatMul operands are not supported; reshape them to 2-D")
        if a.scale is not None and not a.per_tensor:
            raise fail(node, "the first operand must be quantized per tensor")
        col_axis = len(b.shape) - (2 if transB else 1)
        if b.scale is not None and not b.per_tensor and (b.axis != col_axis or len(b.shape) != 2):
            raise fail(node, f"per-channel weights must be 2-D and quantized along the output axis {col_axis}")
        inputs = [self.place(a), self.place(b),
                  self._zero_point_input(a, node=node, what="the first operand"),
                  self._zero_point_input(b, per_channel_ok=True, node=node), bias]
        terms = a.shape[-2] if transA else a.shape[-1]
        wide = {}
        if isinstance(terms, int) and terms * self.levels(a) * self.levels(b) >= 1 << 31:
            wide = {"acc_bits": 64}  # wide operands (unquantized values on a fine grid): an int64 accumulator
        acc = self.qnode("MatMul", inputs, out, node.name, transA=bool(transA), transB=bool(transB), **wide)
        if b.is_const and not transA and not transB and a.scale is not None:
            self.acc_bounds[acc.name] = self._column_bounds(a, b)
        elif a.scale is not None and b.scale is not None and b.per_tensor and isinstance(a.shape[-1 - bool(transA)], int):
            terms = a.shape[-2] if transA else a.shape[-1]
            self.acc_bounds[acc.name] = np.asarray(terms * _largest(a) * _largest(b), np.int64)
        row_norm = None
        if self.dynamic and a.name in self.probabilities and not transA and isinstance(terms, int):
            # rows of probabilities sum to at most 1 (+ rounding): |P @ V| is at most max |V|
            self.acc_bounds[acc.name] = np.asarray((_largest(a) + terms) * _largest(b), np.int64)
            if b.row_norm is not None and not transB:  # a row of P @ V: a convex combination of V's rows
                row_norm = b.row_norm * (1 + terms * 2.0**-22)
        acc = self._accumulator(acc, a, b, axis=len(acc.shape) - 1)
        if wide:  # its requantization takes its multiplier bits from this bound, not from int64's range
            acc = replace(acc, bound=terms * self.levels(a) * self.levels(b))
        if self.dynamic and acc.name in self.acc_bounds:  # fine grids: the bound sizes the grids after it
            acc = replace(acc, bound=int(np.max(self.acc_bounds[acc.name])), row_norm=row_norm)
        return acc

    @staticmethod
    def _column_bounds(a: QTensor, w: QTensor) -> np.ndarray:
        """max |acc[..., c]| over every input: max |a - za| * sum_k |w[k, c] - zw[c]|."""
        a_max = _largest(a)
        w_zp = np.asarray(w.zero_point if w.zero_point is not None else 0, np.int64).reshape(-1)
        centred = np.asarray(w.data, np.int64).reshape(-1, w.shape[-1]) - w_zp
        return a_max * np.abs(centred).sum(axis=0)

    @staticmethod
    def _accumulator(acc: QTensor, a: QTensor, b: QTensor, axis: int) -> QTensor:
        if a.scale is None or b.scale is None:
            if a.scale is not None or b.scale is not None:
                return acc  # an integer operand without a scale: plain integers
            return acc
        scale = np.asarray(a.scale, np.float64) * np.asarray(b.scale, np.float64)  # exact: 24 + 24 bits
        return replace(acc, scale=scale, zero_point=np.zeros(scale.shape, np.int64),
                       axis=None if scale.size == 1 else axis,
                       factors=(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32)))

    def _bias(self, node, value, a: QTensor, w: QTensor, channels: int) -> str | None:
        """An int32 bias at scale a_scale * w_scale, as ONNX QDQ and QLinearConv write it."""
        if value is None:
            return None
        if isinstance(value, Dequantized):
            q = value.q
            if not q.is_const:
                raise fail(node, "the bias must be a constant")
            expected = np.asarray(a.scale, np.float64) * np.asarray(w.scale, np.float64)
            if np.any(np.asarray(q.zero_point)) or not np.allclose(np.broadcast_to(q.scale, expected.shape), expected, rtol=1e-6, atol=0):
                raise fail(node, "the bias is not quantized at input scale x weight scale with zero point 0")
            data = np.asarray(q.data, np.int64)
        elif isinstance(value, Const) and np.asarray(value.value).dtype.kind == "f":
            raise fail(node, "a float bias is supported only with both operands quantized (a DequantizeLinear each)")
        else:
            data = np.asarray(self.integer(node, value, "the bias").data, np.int64)
        data = data.reshape(-1)
        if data.size not in (1, channels):
            raise fail(node, f"the bias has {data.size} entries for {channels} output channels")
        return self.em.const(data, "int32" if np.abs(data).max(initial=0) < 2**31 else "int64", stem=f"{node.outputs[0]}.bias")

    @staticmethod
    def _is_float_bias(value) -> bool:
        return isinstance(value, Const) and np.asarray(value.value).dtype.kind == "f"

    def _float_bias(self, node, acc: QTensor, value: Const, channels: int, axis: int, a: QTensor, w: QTensor) -> QTensor:
        """acc + a float bias (Brevitas without a bias quantizer), carried with fractional bits
        instead of rounded to accumulator steps: the sum is acc * 2^k + rint(bias / step * 2^k)
        at scale step / 2^k. k = 0 when the bias is a whole number of steps; otherwise
        FLOAT_BIAS_FRACTION_BITS, which leaves a residue below 2^-(k+1) of a step (the
        requantization after it rounds once, on the exact sum but for that residue)."""
        bias = np.asarray(value.value, np.float64).reshape(-1)
        if bias.size not in (1, channels):
            raise fail(node, f"the bias has {bias.size} entries for {channels} output channels")
        if not np.all(np.isfinite(bias)):
            raise fail(node, "the float bias holds values that are not finite")
        step = np.asarray(acc.scale, np.float64).reshape(-1)
        units = bias / step
        k = 0 if np.array_equal(units, np.rint(units)) else FLOAT_BIAS_FRACTION_BITS
        shape = [1] * len(acc.shape)
        shape[axis] = -1
        data = np.rint(units * 2.0**k).astype(np.int64).reshape(shape if bias.size > 1 else ())
        # |acc| <= (terms per output) * max|x - zx| * max|w - zw|: the requantization after the
        # int64 sum takes its multiplier bits from this bound, not from int64's range
        lo, hi = a.clip or (a.dtype.lo, a.dtype.hi)
        a_max = max(hi - a.zp_scalar(), a.zp_scalar() - lo)
        w_zp = 0 if w.zero_point is None else int(np.abs(w.zero_point).max(initial=0))
        w_max = (int(np.abs(np.asarray(w.data, np.int64)).max(initial=0)) if w.is_const else max(-w.dtype.lo, w.dtype.hi)) + w_zp
        product_bound = (w.data.size // channels) * a_max * w_max
        stem = node.outputs[0]
        x = acc.name
        if k:
            x = self.qnode("Mul", [x, self.em.const(np.asarray(2**k), stem=f"{stem}.fraction")], f"{stem}.fine", dtype="int64").name
        total = self.qnode("Add", [x, self.em.const(data, "int32" if np.abs(data).max(initial=0) < 2**31 else "int64",
                                                    stem=f"{stem}.bias")], stem, node.name + ".bias", dtype="int64")
        factors = acc.factors and (acc.factors[0], np.asarray(acc.factors[1], np.float32) * np.float32(2.0**-k))
        return replace(total, scale=acc.scale * 2.0**-k, zero_point=acc.zero_point, axis=acc.axis, factors=factors,
                       bound=(product_bound << k) + int(np.abs(data).max(initial=0)))

    def op_MatMul(self, node, ins, attrs):
        if all(isinstance(v, QTensor) and v.scale is None for v in ins):
            return self.matmul(node, ins[0], ins[1], node.outputs[0])
        a = self._operand(node, ins[0], "the first operand")
        b = self._operand(node, ins[1], "the second operand")
        return Dequantized(self.matmul(node, a, b, node.outputs[0]))

    def op_Gemm(self, node, ins, attrs):
        if attrs.get("alpha", 1.0) != 1.0 or (len(ins) > 2 and ins[2] is not None and attrs.get("beta", 1.0) != 1.0):
            raise fail(node, "alpha and beta other than 1 are not supported")
        a = self._operand(node, ins[0], "A")
        b = self._operand(node, ins[1], "B")
        transB = attrs.get("transB", 0)
        channels = b.shape[0] if transB else b.shape[1]
        c = ins[2] if len(ins) > 2 else None
        if a.scale is not None and b.scale is not None and self._is_float_bias(c):
            acc = self.matmul(node, a, b, node.outputs[0] + ".product", attrs.get("transA", 0), transB)
            return Dequantized(self._float_bias(node, acc, c, channels, len(acc.shape) - 1, a, b))
        bias = self._bias(node, c, a, b, channels) if a.scale is not None else (
            self.place(self.integer(node, c, "C")) if c is not None else None)
        acc = self.matmul(node, a, b, node.outputs[0], attrs.get("transA", 0), transB, bias)
        return Dequantized(acc) if acc.scale is not None else acc

    def conv(self, node, x: QTensor, w: QTensor, attrs, out: str, bias=None) -> QTensor:
        if x.scale is not None and not x.per_tensor:
            raise fail(node, "the input must be quantized per tensor")
        if w.scale is not None and not w.per_tensor and w.axis != 0:
            raise fail(node, "per-channel weights must be quantized along the output-channel axis 0")
        kernel = list(attrs.get("kernel_shape", w.shape[2:]))
        params = self.window_params(node, attrs, x.shape, kernel)
        inputs = [self.place(x), self.place(w), self._zero_point_input(x, node=node, what="the input"),
                  self._zero_point_input(w, per_channel_ok=True, node=node), bias]
        acc = self.qnode("Conv", inputs, out, node.name, **params)
        return self._accumulator(acc, x, w, axis=1)

    def op_Conv(self, node, ins, attrs):
        x = self._operand(node, ins[0], "the input")
        w = self._operand(node, ins[1], "the weights")
        if not w.is_const:
            raise fail(node, "the weights must be constant")
        c = ins[2] if len(ins) > 2 else None
        if x.scale is not None and w.scale is not None and self._is_float_bias(c):
            acc = self.conv(node, x, w, attrs, node.outputs[0] + ".product")
            return Dequantized(self._float_bias(node, acc, c, w.shape[0], 1, x, w))
        bias = self._bias(node, c, x, w, w.shape[0]) if c is not None else None
        acc = self.conv(node, x, w, attrs, node.outputs[0], bias)
        return Dequantized(acc) if acc.scale is not None else acc

    def _qlinear_operand(self, node, index, what, axis=None):
        """Input `index` of a QLinear op with its scale and zero point (inputs index+1, index+2)."""
        ins = [self.values[n] if n else None for n in node.inputs]
        q = self.integer(node, ins[index], what)
        zp = ins[index + 2] if index + 2 < len(ins) else None
        params = self.quant_params(node, ins[index + 1], zp, {"axis": axis} if axis is not None else {}, q.shape,
                                   default_dtype=q.dtype.name, zp_index=index + 2)
        return replace(q, scale=params.scale, zero_point=params.zero_point, axis=params.axis, factors=None)

    def _target(self, node, index, shape, default_dtype):
        """The output quantization of a QLinear op: scale at input `index`, zero point after it."""
        ins = [self.values[n] if n else None for n in node.inputs]
        zp = ins[index + 1] if index + 1 < len(ins) else None
        return self.quant_params(node, ins[index], zp, {}, shape, default_dtype=default_dtype, zp_index=index + 1)

    def op_QLinearMatMul(self, node, ins, attrs):
        a = self._qlinear_operand(node, 0, "a")
        b = self._qlinear_operand(node, 3, "b", axis=len(self.integer(node, ins[3], "b").shape) - 1)
        acc = self.matmul(node, a, b, node.outputs[0] + ".acc")
        target = self._target(node, 6, acc.shape, a.dtype.name)
        exact, ort = ratio_of(acc, target)
        return self.requantize(acc, exact, target, node.outputs[0], node, ort_ratio=ort, axis=acc.axis)

    def op_QGemm(self, node, ins, attrs):
        """com.microsoft QGemm (quantize_static's QOperator form of a linear layer): A and B
        quantized, C an int32 bias at scale a_scale * b_scale, the result requantized to
        y_scale, or left on the accumulator's grid (a float output) without it."""
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0):
            raise fail(node, "QGemm with alpha other than 1 or a transposed A is not supported")
        trans_b = bool(attrs.get("transB", 0))
        a = self._qlinear_operand(node, 0, "A")
        b = self._qlinear_operand(node, 3, "B", axis=0 if trans_b else len(self.integer(node, ins[3], "B").shape) - 1)
        bias = None
        if len(ins) > 6 and ins[6] is not None:
            data = np.asarray(self.integer(node, ins[6], "C").data, np.int64).reshape(-1)
            bias = self.em.const(data, "int32", stem=f"{node.outputs[0]}.bias")
        requantized = len(node.inputs) > 7 and bool(node.inputs[7])
        acc = self.matmul(node, a, b, node.outputs[0] + (".acc" if requantized else ""), False, trans_b, bias)
        if not requantized:
            return Dequantized(acc)
        target = self._target(node, 7, acc.shape, a.dtype.name)
        exact, ort = ratio_of(acc, target)
        return self.requantize(acc, exact, target, node.outputs[0], node, ort_ratio=ort, axis=acc.axis)

    def op_MatMulInteger(self, node, ins, attrs):
        if self.runtime_zero_point(ins):
            return self.dynamic_matmul_integer(node, ins, attrs)
        a = self.integer(node, ins[0], "A")
        b = self.integer(node, ins[1], "B")
        za = self.integer(node, ins[2], "a_zero_point") if len(ins) > 2 and ins[2] is not None else None
        zb = self.integer(node, ins[3], "b_zero_point") if len(ins) > 3 and ins[3] is not None else None
        if za is not None and np.asarray(za.data).size > 1:
            raise fail(node, "a per-row a_zero_point is not supported")
        a = replace(a, zero_point=None if za is None else np.asarray(za.data).reshape(()))
        b = replace(b, zero_point=None if zb is None else np.asarray(zb.data).reshape(-1) if np.asarray(zb.data).size > 1 else np.asarray(zb.data).reshape(()))
        return self.matmul(node, a, b, node.outputs[0])

    def op_QLinearConv(self, node, ins, attrs):
        x = self._qlinear_operand(node, 0, "x")
        w = self._qlinear_operand(node, 3, "w", axis=0)
        bias = None
        if len(ins) > 8 and ins[8] is not None:
            data = np.asarray(self.integer(node, ins[8], "B").data, np.int64).reshape(-1)
            bias = self.em.const(data, "int32", stem=f"{node.outputs[0]}.bias")
        acc = self.conv(node, x, w, attrs, node.outputs[0] + ".acc", bias)
        target = self._target(node, 6, acc.shape, x.dtype.name)
        exact, ort = ratio_of(acc, target)
        return self.requantize(acc, exact, target, node.outputs[0], node, ort_ratio=ort, axis=acc.axis)

    def op_ConvInteger(self, node, ins, attrs):
        x = self.integer(node, ins[0], "x")
        w = self.integer(node, ins[1], "w")
        if len(ins) > 2 and ins[2] is not None:
            x = replace(x, zero_point=np.asarray(self.integer(node, ins[2], "x_zero_point").data).reshape(()))
        if len(ins) > 3 and ins[3] is not None:
            zp = np.asarray(self.integer(node, ins[3], "w_zero_point").data)
            w = replace(w, zero_point=zp.reshape(-1) if zp.size > 1 else zp.reshape(()))
        return self.conv(node, x, w, attrs, node.outputs[0])

    # --- com.microsoft QOperator ops -----------------------------------------------------------

    def _float_op(self, op_type, name, inputs, **attrs):
        node = Node(op_type, [f"in{i}" for i in range(len(inputs))], [name], dict(attrs), name)
        return FloatOp(node, inputs, attrs)

    def op_QLinearAdd(self, node, ins, attrs):
        for scores, mask in ((0, 3), (3, 0)):
            if isinstance(ins[mask], KeyMask):  # scores + a -inf mask at an infinite scale (`infinitely_scaled`)
                if not _infinite(ins[6]):
                    raise fail(node, "adds a -inf attention mask and quantizes the sum at a finite scale")
                return MaskedScores(self._qlinear_operand(node, scores, "the scores"), ins[mask].keep, node)
        a = Dequantized(self._qlinear_operand(node, 0, "A"))
        b = Dequantized(self._qlinear_operand(node, 3, "B"))
        target = self._target(node, 6, (), a.q.dtype.name)
        return self.resolve(self._float_op("Add", node.outputs[0], [a, b]), target, node.outputs[0], node)

    def op_QLinearMul(self, node, ins, attrs):
        a = Dequantized(self._qlinear_operand(node, 0, "A"))
        b = Dequantized(self._qlinear_operand(node, 3, "B"))
        target = self._target(node, 6, (), a.q.dtype.name)
        return self.resolve(self._float_op("Mul", node.outputs[0], [a, b]), target, node.outputs[0], node)

    def op_QLinearSigmoid(self, node, ins, attrs):
        x = Dequantized(self._qlinear_operand(node, 0, "X"))
        target = self._target(node, 3, (), x.q.dtype.name)
        return self.resolve(self._float_op("Sigmoid", node.outputs[0], [x]), target, node.outputs[0], node)

    def op_QLinearLeakyRelu(self, node, ins, attrs):
        x = Dequantized(self._qlinear_operand(node, 0, "X"))
        target = self._target(node, 3, (), x.q.dtype.name)
        op = self._float_op("LeakyRelu", node.outputs[0], [x], alpha=float(attrs.get("alpha", 0.01)))
        return self.resolve(op, target, node.outputs[0], node)

    def op_QLinearSoftmax(self, node, ins, attrs):
        if isinstance(ins[0], MaskedScores):
            x = ins[0]
            target = self._target(node, 3, x.q.shape, x.q.dtype.name)
            op = self._float_op("Softmax", node.outputs[0], [x], axis=int(attrs.get("axis", -1)))
            return self.resolve(op, target, node.outputs[0], node)
        x = Dequantized(self._qlinear_operand(node, 0, "X"))
        target = self._target(node, 3, x.q.shape, x.q.dtype.name)
        op = self._float_op("Softmax", node.outputs[0], [x], axis=int(attrs.get("axis", -1)))
        return self.resolve(op, target, node.outputs[0], node)

    def op_QLinearConcat(self, node, ins, attrs):
        if (len(ins) - 2) % 3:
            raise fail(node, "expects Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) triples")
        parts = [Dequantized(self._qlinear_operand(node, i, f"input {i // 3}")) for i in range(2, len(ins), 3)]
        target = self._target(node, 0, (), parts[0].q.dtype.name)
        op = self._float_op("Concat", node.outputs[0], parts, axis=attrs["axis"])
        return self.resolve(op, target, node.outputs[0], node)

    def concat_mixed(self, node, ins, attrs):
        return FloatOp(node, ins, attrs)

    # --- float ops between DequantizeLinear and QuantizeLinear ----------------------------------

    def unhandled(self, node, ins, attrs):
        if node.op == "IsNaN" and isinstance(ins[0], Dequantized) and all(isinstance(d, int) for d in ins[0].q.shape):
            # A dequantized tensor (finite scale) is never NaN: the softmax guard Where(IsNaN(p), 0, p).
            return Const(np.zeros(ins[0].q.shape, bool))
        if node.op == "Where" and isinstance(ins[0], Const) and np.asarray(ins[0].value).size:
            cond = np.asarray(ins[0].value).astype(bool)
            if np.all(cond == cond.reshape(-1)[0]):
                chosen = ins[1] if cond.reshape(-1)[0] else ins[2]
                if not isinstance(chosen, Const):
                    return chosen
        if node.op == "Relu" and isinstance(ins[0], Dequantized) and not ins[0].q.is_const:
            q = ins[0].q
            if q.zero_point is None or not np.any(q.zero_point):
                # max(s*q, 0) = s*max(q, 0) for positive scales: the integer Relu, scale kept.
                return Dequantized(replace(q, name=self.qnode("Relu", [self.place(q)], node.outputs[0], node.name).name))
        if any(isinstance(v, (Dequantized, FloatOp, KeyMask, MaskedScores)) for v in ins):
            if len(node.outputs) != 1:
                raise fail(node, "a float op with several outputs between DequantizeLinear and QuantizeLinear is not supported")
            return FloatOp(node, ins, attrs)
        if all(isinstance(v, (QTensor, Const)) or v is None for v in ins):
            return self.integer_op(node, ins, attrs)
        if any(isinstance(v, FloatInput) for v in ins):
            raise fail(node, "takes a float graph input directly; refsim runs integers, so the input needs a QuantizeLinear")
        return super().unhandled(node, ins, attrs)

    def integer_op(self, node, ins, attrs):
        """An op on plain integers (masks, position ids): the front end's exact integer
        lowering (`frontend.integer_ops`), plus what is particular to QDQ graphs."""
        op = node.op
        if op == "Cast" and attrs["to"] in FLOAT_TYPES:
            # An integer as a float (a mask about to be quantized): the value q itself, scale 1.
            x = self.integer(node, ins[0], "the input")
            if x.scale is not None:
                raise fail(node, "casts a quantized integer tensor to float; dequantize it with DequantizeLinear")
            if x.dtype.bits > 32 and not x.is_const:  # masks arrive as int64; float32 is exact only below 2^24
                x = self.qnode("Cast", [self.place(x)], f"{node.outputs[0]}.int32", dtype="int32")
            return Dequantized(replace(x, scale=np.float64(1.0), zero_point=np.int64(0)))
        if op == "Where" and any(isinstance(v, Const) and np.asarray(v.value).dtype.kind == "f" for v in ins[1:]):
            return FloatOp(node, ins, attrs)  # float branches: chosen once quantized
        if op == "Relu":
            x = self.integer(node, ins[0], "the input")
            return self.qnode("Relu", [self.place(x)], node.outputs[0], node.name)
        if op == "Clip" and isinstance(ins[0], QTensor) and ins[0].scale is not None:
            return self.narrow(node, ins[0], ins[1:])
        if op not in INTEGER_OPS:
            raise fail(node, f"op {op!r} on integer tensors is not supported by the qdq importer")

        def operand(k: int) -> str:
            return self.place(self.integer(node, ins[k], f"input {k}"))

        def const(k: int):
            v = ins[k] if k < len(ins) else None
            if isinstance(v, Const):
                return np.asarray(v.value)
            return v.data if isinstance(v, QTensor) and v.is_const else None

        name = lower(self.em, node, operand, const, self.g.dtypes.get(node.outputs[0]), node.outputs[0], node.name)
        t = self.em.builder.tensors[name]
        return QTensor(name, t.dtype, tuple(t.shape))

    def narrow(self, node, q: QTensor, bounds) -> QTensor:
        """QuantizeLinear -> Clip -> DequantizeLinear, as Brevitas' QCDQ export writes integers
        below 8 bits: the same grid in the narrowest type holding [lo, hi] (int4 for
        [-8, 7], uint4 for [0, 15]), with that range as the tensor's clip range."""
        lo, hi = (int(np.asarray(self.const_value(node, v, what)).reshape(-1)[0]) if v is not None else default
                  for v, what, default in zip(list(bounds) + [None] * (2 - len(bounds)), ("min", "max"), (q.dtype.lo, q.dtype.hi)))
        lo, hi = max(lo, q.dtype.lo), min(hi, q.dtype.hi)
        if lo > hi:
            raise fail(node, f"the range [{lo}, {hi}] is empty")
        zp = q.zp_scalar()
        dtype = next(t for t in TYPES.values() if t.name != "ternary" and t.contains(lo, hi) and t.contains(zp, zp)
                     and t.bits <= q.dtype.bits)
        if q.is_const:
            return replace(q, data=np.clip(np.asarray(q.data, np.int64), lo, hi).astype(dtype.storage), dtype=dtype,
                           clip=None if (dtype.lo, dtype.hi) == (lo, hi) else (lo, hi))
        clipped = self.qnode("Clip", [self.place(q)], node.outputs[0] + (".clipped" if dtype is not q.dtype else ""), node.name, lo=lo, hi=hi)
        if dtype is not q.dtype:
            clipped = self.qnode("Cast", [clipped.name], node.outputs[0], node.name + ".narrow", dtype=dtype.name)
        return replace(q, name=clipped.name, dtype=dtype, data=None,
                       clip=None if (dtype.lo, dtype.hi) == (lo, hi) else (lo, hi))

    def nonzero(self, node, x: QTensor, out: str | None = None) -> QTensor:
        """x != 0 as 0/1 (uint8) (`frontend.integer_ops.nonzero`)."""
        name = integer_ops.nonzero(self.em, self.place(x), out or node.outputs[0])
        t = self.em.builder.tensors[name]
        return QTensor(name, t.dtype, tuple(t.shape))

    def select(self, node, cond: QTensor, x: QTensor, y: QTensor, out: str) -> QTensor:
        """Where(cond, x, y) for a 0/1 condition (`frontend.integer_ops.select`)."""
        name = integer_ops.select(self.em, self.place(cond), self.place(x), self.place(y), out, node.name)
        t = self.em.builder.tensors[name]
        return QTensor(name, t.dtype, tuple(t.shape))

    def resolve(self, expr: FloatOp, target: QTensor, out: str, qnode) -> QTensor:
        """The integer ops that compute QuantizeLinear(expr) at `target`'s scale."""
        unmoved, moves = self.sink_moves(expr)
        if moves:
            if not target.per_tensor:
                raise fail(moves[-1].node, "moves a float result that is then quantized per channel; refsim moves it only before a per-tensor quantizer")
            q = self.resolve(unmoved, target, f"{out}.unmoved", qnode)
            for move in moves:
                q = move.apply(q)
            return q
        safe = _nan_guarded_softmax(expr)
        if safe is not None:
            return self.resolve(safe, target, out, qnode)
        if expr.node.op == "Softmax" and isinstance(expr.inputs[0], FloatOp) and expr.inputs[0].node.op == "Add" \
                and any(isinstance(v, KeyMask) or self._float_key_mask(v) is not None for v in expr.inputs[0].inputs):
            return self._key_masked_float_softmax(expr, target, out)
        # Where(mask computed from integers, constants, constants): selected below, no float leaves
        computed_condition = expr.node.op == "Where" and isinstance(expr.inputs[0], QTensor) and not expr.inputs[0].is_const
        leaves = {} if computed_condition else self._runtime_leaves(expr)
        if not leaves and not computed_condition:
            value = self.evaluate(expr, None, None)
            return replace(target, data=self.quantize_values(value, target), shape=np.shape(value))
        if expr.node.op == "Where" and not isinstance(expr.inputs[0], (Dequantized, FloatOp)):
            cond = self.integer(expr.node, expr.inputs[0], "the condition")
            branches = []
            for v in expr.inputs[1:]:
                if isinstance(v, (Dequantized, FloatOp)) and self._runtime_leaves_of(v):
                    raise fail(expr.node, "selects between computed float tensors; refsim selects between constants here")
                value = np.asarray(self.evaluate(v, None, None), np.float32)
                branches.append(replace(target, name=None, data=self.quantize_values(value, target), shape=value.shape))
            result = self.select(expr.node, cond, branches[0], branches[1], f"{out}.selected")
            return replace(target, name=self.qnode("Cast", [result.name], out, dtype=target.dtype.name).name, shape=result.shape)
        if self.float_ops == "ort":
            replayed = self.ort_replay(expr, target, out)
            if replayed is not None:
                return replayed
        if len(leaves) == 1 and self._lut_eligible(expr):
            return self.lut(expr, next(iter(leaves.values())), target, out)
        op = expr.node.op
        affine = self.affine(expr, target, out)
        if affine is not None:
            return affine
        if op == "Mul" and len(leaves) == 2:
            return self.product(expr, target, out)
        if op == "Softmax" and len(leaves) == 1:
            return self.softmax(expr, target, out)
        if op == "LayerNormalization" and len(leaves) == 1:
            return self.layernorm(expr, target, out)
        if op == "Mul" and isinstance(expr.inputs[0], FloatOp) and expr.inputs[0].node.op == "LayerNormalization":
            self._row_input(expr.inputs[0], "LayerNormalization")  # SmoothQuant after a LayerNorm: say why the LayerNorm fails
        if op == "Concat":
            parts = []
            for i, v in enumerate(expr.inputs):
                q = self._operand(expr.node, v, f"input {i}")
                exact, ort = ratio_of(q, target)
                same = _same(q, replace(target, dtype=q.dtype))
                parts.append(q if same and q.dtype is target.dtype else
                             self.requantize(q, exact, target, f"{out}.{i}", expr.node, ort_ratio=ort))
            result = self.qnode("Concat", [self.place(p) for p in parts], out, axis=expr.attrs["axis"])
            return replace(target, name=result.name, shape=result.shape)
        if op == "ReduceSum" and _summable(expr):
            return self.reduce_sum(expr, target, out)
        inner = _inner_sum(expr)
        if inner is not None:  # elementwise ops on a sum (NNCF's Clip of the mask count): on the exact sum
            total = self.reduce_sum(inner, None, f"{out}.inner")
            return self.resolve(_substituted(expr, inner, Dequantized(total)), target, out, qnode)
        if len(leaves) == 1 and self._threshold_eligible(expr, next(iter(leaves.values())), target):
            return self.threshold(expr, next(iter(leaves.values())), target, out)
        if len(leaves) == 1:
            q = next(iter(leaves.values()))
            why = (f"its input has {q.dtype.bits} bits (a lookup table covers at most {LUT_MAX_BITS}); "
                   "no QuantizeLinear stands between the integer op that made it and this float op"
                   if q.dtype.bits > LUT_MAX_BITS else "it is not elementwise with scalar constants")
        else:
            why = f"it combines {len(leaves)} quantized tensors in a way refsim has no integer form for"
        raise fail(expr.node, f"float op between DequantizeLinear and QuantizeLinear cannot be computed in integers: {why}")

    def _runtime_leaves(self, expr) -> dict[str, QTensor]:
        found: dict[str, QTensor] = {}

        def walk(v):
            if isinstance(v, FloatOp):
                for i in v.inputs:
                    walk(i)
            elif isinstance(v, Dequantized) and not v.q.is_const:
                found[v.q.name] = v.q
            elif isinstance(v, MaskedScores) and expr.node.op == "Softmax":
                found[v.q.name] = v.q
            elif isinstance(v, (KeyMask, MaskedScores)):
                raise fail(expr.node, "takes an attention mask quantized at an infinite scale; refsim takes that only "
                                      "into a Softmax over the keys")
            elif isinstance(v, (QTensor, FloatInput)) and expr.node.op == "Softmax":
                raise fail(expr.node, "takes float scores plus an attention mask that no QuantizeLinear quantizes (NNCF's "
                                      "transformer preset keeps attention in float); refsim needs the scores, or their sum "
                                      "with the mask, quantized")
            elif isinstance(v, (QTensor, FloatInput)):
                raise fail(expr.node, "mixes float values with plain integers or float inputs")

        walk(expr)
        return found

    def _lut_eligible(self, expr) -> bool:
        ok = True

        def walk(v):
            nonlocal ok
            if isinstance(v, FloatOp):
                if v.node.op not in ELEMENTWISE:
                    ok = False
                if v.node.op == "Cast" and v.attrs.get("to") not in FLOAT_TYPES:
                    ok = False
                for i in v.inputs:
                    walk(i)
            elif isinstance(v, Const) and np.size(v.value) != 1:
                ok = False
            elif isinstance(v, Dequantized):
                q = v.q
                if q.is_const and q.data.size != 1:
                    ok = False
                if not q.is_const and (not q.per_tensor or q.dtype.bits > LUT_MAX_BITS):
                    ok = False

        walk(expr)
        return ok

    def evaluate(self, v, leaf: QTensor | None, levels: np.ndarray | None, budget=None):
        """The float value of an expression, with `leaf` standing for all of its `levels`
        (`budget`: the sizes it may take, the model's folding budget unless given)."""
        if v is None:
            return None
        if isinstance(v, Const):
            return np.asarray(v.value)
        if isinstance(v, Dequantized):
            q = v.q
            if q.is_const:
                return self.onnx_dequantize(q.data, q)
            if leaf is not None and q.name == leaf.name:
                return self.onnx_dequantize(levels, leaf)  # leaf: q laid out as `levels` are
            raise fail(None, f"tensor {q.name!r} is not known at import time")
        if isinstance(v, Moved):
            return v.const_fn(self.evaluate(v.inputs[0], leaf, levels, budget))
        if isinstance(v, FloatOp):
            return evaluate(v.node, [self.evaluate(i, leaf, levels, budget) for i in v.inputs], self.g.opsets,
                            budget or self.g.budget)[0]
        raise fail(None, "an expression holds a value refsim cannot evaluate")

    def sink_moves(self, expr: FloatOp) -> tuple[FloatOp, list[Moved]]:
        """expr with its data movement taken out: (the expression on unmoved values, the
        movements to apply after quantizing it). Elementwise ops with scalar constants
        commute with movement; anything else keeps its movements inside."""
        if isinstance(expr, Moved):
            inner, moves = (self.sink_moves(expr.inputs[0]) if isinstance(expr.inputs[0], FloatOp)
                            else (expr.inputs[0], []))
            return inner, moves + [expr]
        if expr.node.op in ELEMENTWISE or expr.node.op in ("Add", "Sub", "Mul", "Div"):
            moved = [i for i, v in enumerate(expr.inputs) if isinstance(v, FloatOp)]
            scalars = all(isinstance(v, Const) and np.size(v.value) == 1 for i, v in enumerate(expr.inputs)
                          if v is not None and i not in moved)
            if len(moved) == 1 and scalars:
                inner, moves = self.sink_moves(expr.inputs[moved[0]])
                if moves:
                    inputs = list(expr.inputs)
                    inputs[moved[0]] = inner
                    return FloatOp(expr.node, inputs, expr.attrs), moves
        return expr, []

    def lut(self, expr: FloatOp, leaf: QTensor, target: QTensor, out: str) -> QTensor:
        levels = np.arange(leaf.dtype.lo, leaf.dtype.hi + 1, dtype=np.int64)
        values = np.asarray(self.evaluate(expr, leaf, levels), np.float32)
        if values.shape != levels.shape:
            values = np.broadcast_to(values, levels.shape) if values.size == 1 else values.reshape(-1)
        table = self.quantize_values(values, target)
        result = self.qnode("Lut", [self.place(leaf), self.em.const(table, target.dtype, f"{out}.table")], out)
        return replace(target, name=result.name, shape=result.shape)

    def reduce_sum(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        """ReduceSum of a per-tensor quantized tensor (NNCF's mean pooling): the exact sum of
        q - z at q's scale, then one requantization."""
        q = expr.inputs[0].q
        axes = self.ints(expr.node, expr.inputs[1], "axes") if len(expr.inputs) > 1 and expr.inputs[1] is not None else expr.attrs.get("axes")
        if not axes and expr.attrs.get("noop_with_empty_axes", 0):
            raise fail(expr.node, "ReduceSum with no axes and noop_with_empty_axes is not supported")
        x = self.place(q)
        if q.zp_scalar():
            x = self.qnode("Sub", [x, self.em.const(np.asarray(q.zp_scalar()), q.dtype)], f"{out}.centred").name
        total = self.qnode("ReduceSum", [x], f"{out}.sum", axes=[int(a) for a in axes] if axes else None,
                           keepdims=bool(expr.attrs.get("keepdims", 1)))
        lo, hi = q.clip or (q.dtype.lo, q.dtype.hi)
        count = int(np.prod(q.shape, dtype=np.int64) // max(1, int(np.prod(total.shape, dtype=np.int64))))
        acc = replace(total, scale=q.scale, zero_point=np.zeros(np.shape(q.scale), np.int64),
                      bound=count * max(hi - q.zp_scalar(), q.zp_scalar() - lo))
        if target is None:  # the sum itself, for what follows it
            return acc
        exact, ort = ratio_of(acc, target)
        return self.requantize(acc, exact, target, out, expr.node, ort_ratio=ort)

    # --- elementwise functions of a wide accumulator (NNCF's GELU): thresholds ---------------------

    def _threshold_eligible(self, expr: FloatOp, leaf: QTensor, target: QTensor) -> bool:
        """expr elementwise in one accumulator of at most 32 bits (per tensor, or per channel of
        the last axis) with constants that are scalars or one value per channel."""
        if leaf.is_const or leaf.dtype.bits > 32 or not leaf.shape or not isinstance(leaf.shape[-1], int):
            return False
        if not leaf.per_tensor and (leaf.block_size or leaf.axis != len(leaf.shape) - 1):
            return False
        if not target.per_tensor or target.block_size:
            return False
        channels = leaf.shape[-1]

        def per_channel(value) -> bool:
            shape = np.shape(value)
            return np.size(value) == 1 or (shape[-1] == channels and np.size(value) == channels)

        def ok(v) -> bool:
            if isinstance(v, FloatOp) and not isinstance(v, Moved):
                if v.node.op not in ELEMENTWISE or (v.node.op == "Cast" and v.attrs.get("to") not in FLOAT_TYPES):
                    return False
                return all(i is None or ok(i) for i in v.inputs)
            if isinstance(v, Const):
                return per_channel(v.value)
            if isinstance(v, Dequantized):
                return v.q.name == leaf.name if not v.q.is_const else per_channel(v.q.data)
            return False

        return ok(expr)

    def threshold(self, expr: FloatOp, leaf: QTensor, target: QTensor, out: str) -> QTensor:
        """QuantizeLinear(expr(acc)) as a Threshold op, its thresholds found at import
        (`thresholds.py`) on the float32 function onnx's reference ops compute."""
        from .thresholds import step_thresholds

        channels = leaf.shape[-1]
        columns = replace(leaf, axis=None if leaf.per_tensor else 1)  # the samples are (M, channels)

        def q_of(levels: np.ndarray) -> np.ndarray:
            # The search's own sizes (thresholds.CHUNK values at a time), not the model's: each
            # call gets its own budget, freed when it returns.
            with np.errstate(all="ignore"):
                values = np.asarray(self.evaluate(expr, columns, levels, SizeBudget(THRESHOLD_BUDGET)), np.float32)
            values = np.broadcast_to(values, np.broadcast_shapes(values.shape, levels.shape)).reshape(levels.shape)
            return self.quantize_values(values, target).astype(np.int64)

        bound = self.acc_bounds.get(leaf.name)
        if bound is None:
            bound = leaf.bound if leaf.bound is not None else max(-leaf.dtype.lo, leaf.dtype.hi)
        bound = np.broadcast_to(np.asarray(bound, np.int64).reshape(-1), (channels,))
        unit = np.broadcast_to(leaf.real_scale().reshape(-1), (channels,))
        y0, up, down = step_thresholds(q_of, bound, unit)
        result = self.qnode("Threshold", [self.place(leaf), self.em.const(y0, stem=f"{out}.y0"),
                                          self.em.const(up, stem=f"{out}.up"), self.em.const(down, stem=f"{out}.down")],
                            out, expr.node.name, axis=-1, dtype=target.dtype.name)
        return replace(target, name=result.name, shape=result.shape)

    # --- a float tail after the last QuantizeLinear: masked mean pooling ------------------------------

    POOL_FRACTION_BITS = 16

    def float_output(self, name: str, value: FloatOp) -> Dequantized:
        """sum(x, axes) / clip(sum(m, axes), min) with x = p or x = h * m, all quantized per tensor
        (sentence-transformers' mean pooling over a mask m): with the exact integer sums
        N = sum(p - z_p) (or sum((h - z_h)(m - z_m))) and D = sum(m - z_m), the output is
        (s_x / s_m) * N / max(D, 1), computed as round(N * 2^16 / D) (half away from zero) at
        scale s_x / s_m / 2^16. The float tail onnxruntime computes differs by its float32
        rounding (docs/IMPORT.md)."""
        pooled = self._mean_pool(value)
        if pooled is None:
            return super().float_output(name, value)
        factors, m, axes = pooled
        centred = []
        for q in factors:
            t = self.place(q)
            if q.zp_scalar():
                t = self.qnode("Sub", [t, self.em.const(np.asarray(q.zp_scalar()), q.dtype)], f"{name}.centred").name
            centred.append(t)
        levels = [q.bound if q.bound is not None else rq.type_bound(q.dtype.name, q.zp_scalar()) for q in factors]
        pooled_by_matmul = self.dynamic and len(factors) == 2 and axes == [1] and self._pooled_by_matmul(factors)
        # the product's bound, not its operands' types, decides its type (so that the sum after it can be taken)
        product_type = {"dtype": "int32"} if len(factors) > 1 and int(np.prod([float(v) for v in levels])) < 1 << 31 else {}
        if not pooled_by_matmul:
            x = centred[0] if len(centred) == 1 else self.qnode("Mul", centred, f"{name}.product", **product_type).name
        mask = self.place(m)
        if m.zp_scalar():
            mask = self.qnode("Sub", [mask, self.em.const(np.asarray(m.zp_scalar()), m.dtype)], f"{name}.mask").name
        if axes is None:  # NNCF: the sums were quantized already; Div of the two
            total, count = self.em.builder.tensors[x], self.em.builder.tensors[mask]
        elif pooled_by_matmul:
            # quantize_dynamic: h on a 24-bit grid times an integer mask; sum_t h[b,t,:] * m[b,t]
            # as one MatMul into int64 (exact; a product's declared int64 type cannot be summed)
            h, w = (0, 1) if factors[1].shape[-1] == 1 else (1, 0)
            weights = self.qnode("Transpose", [centred[w]], f"{name}.weights", perm=[0, 2, 1])
            summed = self.qnode("MatMul", [weights.name, centred[h]], f"{name}.weighted", acc_bits=64)
            total = self.qnode("Reshape", [summed.name], f"{name}.sum", shape=[0, -1])
            count = self.qnode("ReduceSum", [mask], f"{name}.count", axes=axes, keepdims=False)
        else:
            total = self.qnode("ReduceSum", [x], f"{name}.sum", axes=axes, keepdims=False)
            count = self.qnode("ReduceSum", [mask], f"{name}.count", axes=axes, keepdims=False)
        count = self.qnode("Clip", [count.name], f"{name}.count_at_least_one", lo=1)
        # A mean over a 0/1 (or any non-negative) mask is at most the hidden states' largest value:
        # fraction bits where that leaves room in IntegerDiv's int32 (all 16 for 8-bit states)
        hidden = [lv for q, lv in zip(factors, levels) if q.name != m.name] or levels
        fraction = max(0, min(self.POOL_FRACTION_BITS, 30 - int(max(hidden)).bit_length()))
        mean = self.qnode("IntegerDiv", [total.name, count.name], f"{name}.mean", Delta=1 << fraction, eps=0)
        s_x = float(np.prod([np.float64(np.asarray(q.scale).reshape(())) for q in factors]))
        scale = np.float64(np.float32(s_x / float(np.asarray(m.scale).reshape(())) / 2.0**fraction))
        return Dequantized(replace(mean, scale=np.asarray(scale), zero_point=np.asarray(0, np.int64)))

    @staticmethod
    def _pooled_by_matmul(factors) -> bool:
        shapes = [tuple(q.shape) for q in factors]
        return all(len(s) == 3 for s in shapes) and sorted(s[-1] == 1 for s in shapes) == [False, True] \
            and shapes[0][:2] == shapes[1][:2]

    def _mean_pool(self, value: FloatOp):
        if value.node.op != "Div" or not all(isinstance(v, (FloatOp, Dequantized)) for v in value.inputs):
            return None
        num, den = value.inputs
        if all(isinstance(v, Dequantized) and not v.q.is_const and v.q.per_tensor for v in (num, den)):
            return [num.q], den.q, None  # NNCF: Div(DQ(sum), DQ(count)), each sum quantized
        if not all(isinstance(v, FloatOp) for v in (num, den)):
            return None
        if den.node.op == "Clip":
            den = den.inputs[0]
        if not isinstance(den, FloatOp) or num.node.op != "ReduceSum" or den.node.op != "ReduceSum":
            return None
        if num.attrs.get("keepdims", 1) or den.attrs.get("keepdims", 1):
            return None
        axes = self.ints(num.node, num.inputs[1], "axes") if len(num.inputs) > 1 else num.attrs.get("axes")
        den_axes = self.ints(den.node, den.inputs[1], "axes") if len(den.inputs) > 1 else den.attrs.get("axes")
        mask = den.inputs[0]
        if axes is None or list(axes) != list(den_axes or []) or not isinstance(mask, Dequantized) or not mask.q.per_tensor:
            return None
        x = num.inputs[0]
        if isinstance(x, FloatOp) and x.node.op == "Mul" and self.float_ops == "ort":
            # the hidden states straight from a LayerNorm, unquantized (NNCF's transformer preset)
            # (on a grid coarse enough that its product with the other factor stays in int32). A
            # mask that is a plain integer input (scale 1) is taken as int8, checked at run time.
            inputs = []
            for v in x.inputs:
                if isinstance(v, Dequantized) and v.q.dtype.bits > 8 and not v.q.zp_scalar() \
                        and np.array_equal(np.asarray(v.q.scale, np.float64).reshape(-1), [1.0]):
                    narrow = self.qnode("Cast", [self.place(v.q)], f"{v.q.name}.int8", dtype="int8", overflow="error")
                    v = Dequantized(replace(v.q, name=narrow.name, dtype=narrow.dtype))
                inputs.append(v)
            x = replace(x, inputs=inputs)
            others = [v.q for v in x.inputs if isinstance(v, Dequantized)]
            spare = 30 - max((rq.type_bound(q.dtype.name, q.zp_scalar()) for q in others), default=1).bit_length()
            bits = min(self.UNQUANTIZED_LN_BITS, spare)
            unquantized = [self.unquantized_layernorm(v, bits) if isinstance(v, FloatOp) and v.node.op == "LayerNormalization"
                           else None for v in x.inputs]
            x = replace(x, inputs=[Dequantized(u) if u is not None else v for u, v in zip(unquantized, x.inputs)])
        if isinstance(x, FloatOp) and x.node.op == "Mul" and all(isinstance(v, Dequantized) for v in x.inputs):
            factors = [v.q for v in x.inputs]
        elif isinstance(x, Dequantized):
            factors = [x.q]
        else:
            return None
        if any(q.is_const or not q.per_tensor for q in factors + [mask.q]):
            return None
        return factors, mask.q, [int(a) for a in axes]

    # --- --float-ops ort: onnxruntime's float32 kernels replayed ------------------------------------

    def ort_replay(self, expr: FloatOp, target: QTensor, out: str) -> QTensor | None:
        """The op onnxruntime runs for expr quantized at target, when refsim has its replay."""
        from . import ort_float

        op, ins = expr.node.op, expr.inputs
        if not target.per_tensor or target.dtype.bits != 8:
            return None
        if op in ("Add", "Mul") and len(ins) == 2 and all(_eight_bit(v) for v in ins):
            a, b = ins[0].q, ins[1].q
            if op == "Add":
                scalar = "b" if np.prod(b.shape, dtype=np.int64) == 1 else "a" if np.prod(a.shape, dtype=np.int64) == 1 else None
                table = ort_float.qlinear_add_table(a, b, target, scalar)
            else:
                table = ort_float.qlinear_mul_table(a, b, target)
            result = self.qnode("Lut2", [self.place(a), self.place(b), self.em.const(table, target.dtype, f"{out}.table")],
                                  out, expr.node.name)
            return replace(target, name=result.name, shape=result.shape)
        if op == "Softmax" and len(ins) == 1 and isinstance(ins[0], Dequantized) and not ins[0].q.is_const \
                and ins[0].q.per_tensor and ins[0].q.dtype.bits > LUT_MAX_BITS and ins[0].q.dtype.bits <= 32:
            return self._float_softmax(expr, target, out)
        if op == "Softmax" and len(ins) == 1 and (isinstance(ins[0], MaskedScores) or _eight_bit(ins[0]) and not ins[0].q.is_const):
            q = self._row_input(expr, "Softmax")
            if not _eight_bit(Dequantized(q)):
                return None
            if q.dtype is not target.dtype:
                return None
            length = q.shape[-1]
            if not isinstance(length, int):
                raise fail(expr.node, "needs a static softmax axis; give --shape")
            from refsim.ops import float32 as f32

            mant, expo = f32.from_float32(ort_float.softmax_table(q.scale, length))
            x = self.place(q)
            if isinstance(ins[0], MaskedScores):
                # onnxruntime with the mask's sum on the scores' grid: masked keys saturate to the lowest level.
                lowest = self.em.const(np.asarray(q.dtype.lo), q.dtype, f"{out}.lowest")
                x = integer_ops.select(self.em, self.place(ins[0].keep), x, lowest, f"{out}.masked")
            result = self.qnode("OrtSoftmax", [x, self.em.const(mant, "int32", f"{out}.exp_m"),
                                                 self.em.const(expo, "int16", f"{out}.exp_e")], out, expr.node.name,
                                  y_factor=ort_float.softmax_y_factor(target.scale), zero_point=target.zp_scalar())
            return replace(target, name=result.name, shape=result.shape)
        if op == "Mul" and len(ins) == 2 and isinstance(ins[0], FloatOp) and ins[0].node.op == "LayerNormalization" \
                and not self._runtime_leaves_of(ins[1]):
            # NNCF's SmoothQuant Mul after a LayerNorm: a per-channel constant c folds into
            # gamma and beta (c * (gamma * x_hat + beta) = (c * gamma) * x_hat + c * beta).
            return self._ort_layernorm(ins[0], target, out, np.asarray(self.evaluate(ins[1], None, None), np.float64))
        if op == "LayerNormalization":
            return self._ort_layernorm(expr, target, out)
        return None

    def _float_softmax(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        """Softmax of a score accumulator (NNCF quantizes only its output): onnxruntime's
        MatMulIntegerToFloat scale f32(s_a * s_b), float32 Softmax and QuantizeLinear (FloatSoftmax)."""
        from refsim.ops import float32 as f32

        from . import ort_float

        q = self._row_input(expr, "Softmax")
        scale = (np.float32(np.asarray(q.factors[0]).reshape(-1)[0]) * np.float32(np.asarray(q.factors[1]).reshape(-1)[0])
                 if q.factors is not None else np.float32(np.asarray(q.scale).reshape(-1)[0]))
        k, hi, lo = ort_float.float_softmax_tables(scale)
        (hm, he), (lm, le) = f32.from_float32(hi), f32.from_float32(lo)
        (ym,), (ye,) = (np.atleast_1d(v) for v in f32.from_float32(np.float32(np.asarray(target.scale).reshape(-1)[0])))
        x = self.place(q)
        if q.zp_scalar():
            x = self.qnode("Sub", [x, self.em.const(np.asarray(q.zp_scalar()), q.dtype)], f"{out}.centred").name
        result = self.qnode("FloatSoftmax", [x, self.em.const(hm, "int32", f"{out}.hi_m"), self.em.const(he, "int16", f"{out}.hi_e"),
                                             self.em.const(lm, "int32", f"{out}.lo_m"), self.em.const(le, "int16", f"{out}.lo_e")],
                            out, expr.node.name, k=k, y_scale_m=int(ym), y_scale_e=int(ye), zero_point=target.zp_scalar(),
                            dtype=target.dtype.name)
        return replace(target, name=result.name, shape=result.shape)

    def _key_masked_float_softmax(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        """Softmax(DequantizeLinear(scores) + mask) with the mask quantized at an infinite scale
        and no quantizer on the sum (NNCF's default preset). onnxruntime dequantizes such a mask
        to NaN (0 * inf) and the IsNaN guard zeroes every probability; the graph means a
        key-padding mask, as quantize_static's infinitely scaled mask does (`infinitely_scaled`).
        In float32 a masked score plus the mask is far below -104 / s, so its exp is 0 and the
        row is the float32 Softmax of the kept scores: FloatSoftmax of q - z with masked keys
        set to a sentinel past the exp table's end, whose exp is 0 there too."""
        from refsim.ops import float32 as f32

        from . import ort_float

        add = expr.inputs[0]
        mask = next((v for v in add.inputs if isinstance(v, KeyMask)), None)
        if mask is None:  # a float Where(keep, 0, -inf), unquantized (NNCF's transformer preset)
            mask = next(self._float_key_mask(v) for v in add.inputs if self._float_key_mask(v) is not None)
            masks = [v for v in add.inputs if self._float_key_mask(v) is not None]
        else:
            masks = [mask]
            self.notes.append(f"node {mask.node.name!r} ({mask.node.op}): the attention mask is quantized at an infinite "
                              "scale, which onnxruntime dequantizes to NaN (0 * inf): there every attention probability "
                              "is 0. refsim reads it as the key-padding mask the model means; to run the model as "
                              "meant in onnxruntime too, leave the mask out of quantization (NNCF: ignored_scope)")
        scores = next((v for v in add.inputs if v is not masks[0]), None)
        if not (isinstance(scores, Dequantized) and not scores.q.is_const and scores.q.per_tensor
                and scores.q.dtype.bits <= 32 and len(add.inputs) == 2):
            raise fail(expr.node, "takes float scores plus a key mask (0 or -inf), with no quantizer on the sum: refsim "
                                  "reads that only when the scores are quantized per tensor or an integer accumulator "
                                  "of quantized tensors (NNCF), or through a quantized sum (quantize_static) or QLinearAdd")
        q = self._row_input(FloatOp(expr.node, [scores], expr.attrs), "Softmax")
        scale = (np.float32(np.asarray(q.factors[0]).reshape(-1)[0]) * np.float32(np.asarray(q.factors[1]).reshape(-1)[0])
                 if q.factors is not None else np.float32(np.asarray(q.scale).reshape(-1)[0]))
        k, hi, lo = ort_float.float_softmax_tables(scale)
        sentinel = -(1 << 31)
        bound = q.bound if q.bound is not None else self.acc_bounds.get(q.name)  # an accumulator's, from its operands
        lowest_kept = -int(np.max(bound)) if bound is not None else q.dtype.lo - (q.zp_scalar() or 0)
        if (lowest_kept - sentinel) >> k < hi.size:  # only for scales below about 5e-8
            raise fail(expr.node, f"takes scores at scale {float(scale):g}, too fine for refsim's masked-key sentinel")
        (hm, he), (lm, le) = f32.from_float32(hi), f32.from_float32(lo)
        (ym,), (ye,) = (np.atleast_1d(v) for v in f32.from_float32(np.float32(np.asarray(target.scale).reshape(-1)[0])))
        x = self.qnode("Sub", [self.place(q), self.em.const(np.asarray(q.zp_scalar() or 0), q.dtype)],
                       f"{out}.centred", dtype="int32").name
        x = integer_ops.select(self.em, self.place(mask.keep), x, self.em.const(np.asarray(sentinel), "int32", f"{out}.masked_key"),
                               f"{out}.masked")
        result = self.qnode("FloatSoftmax", [x, self.em.const(hm, "int32", f"{out}.hi_m"), self.em.const(he, "int16", f"{out}.hi_e"),
                                             self.em.const(lm, "int32", f"{out}.lo_m"), self.em.const(le, "int16", f"{out}.lo_e")],
                            out, expr.node.name, k=k, y_scale_m=int(ym), y_scale_e=int(ye), zero_point=target.zp_scalar(),
                            dtype=target.dtype.name)
        return replace(target, name=result.name, shape=result.shape)

    def _float_key_mask(self, v) -> KeyMask | None:
        """Where(keep, 0, very negative) computed in float from an integer condition, quantized
        nowhere: a key-padding mask (read as `KeyMask`)."""
        if not (isinstance(v, FloatOp) and v.node.op == "Where" and isinstance(v.inputs[0], QTensor)
                and not v.inputs[0].is_const):
            return None
        fills = [self._scalar(x) for x in v.inputs[1:]]
        if fills[0] == 0.0 and fills[1] is not None and fills[1] <= MASK_VERY_NEGATIVE:
            return KeyMask(v.inputs[0], v.node)
        return None

    def _ort_layernorm(self, expr: FloatOp, target: QTensor, out: str, post: np.ndarray | None = None) -> QTensor | None:
        """LayerNormRound for expr quantized at target; `post`, a constant multiplying its result."""
        from . import ort_float

        ins = expr.inputs
        if _eight_bit(ins[0]) and not ins[0].q.is_const:
            q = self._row_input(expr, "LayerNormalization")
        elif isinstance(ins[0], FloatOp) and self._runtime_leaves(ins[0]):
            q = self.exact_sum(ins[0], f"{out}.input")
            if q is None:
                return None
            if expr.attrs.get("axis", -1) % len(q.shape) != len(q.shape) - 1:
                raise fail(expr.node, "LayerNormalization over an axis other than the last is not supported")
        else:
            return None
        n = q.shape[-1]
        if not isinstance(n, int):
            raise fail(expr.node, "needs a static normalised axis")
        gamma = np.broadcast_to(np.asarray(self.evaluate(ins[1], None, None), np.float64).reshape(-1), (n,))
        beta = (np.broadcast_to(np.asarray(self.evaluate(ins[2], None, None), np.float64).reshape(-1), (n,))
                if len(ins) > 2 and ins[2] is not None else np.zeros(n))
        if post is not None:
            if post.size not in (1, n) or (post.ndim and post.shape[:-1] != (1,) * (post.ndim - 1)):
                raise fail(expr.node, "is multiplied by a constant that is not one value per channel of the last axis")
            c = np.broadcast_to(post.reshape(-1), (n,))
            gamma, beta = gamma * c, beta * c
        p = ort_float.layernorm_params(q, gamma, beta, float(expr.attrs.get("epsilon", 1e-5)), target, n)
        x = self.place(q)
        bounds = {"lo": target.clip[0], "hi": target.clip[1]} if target.clip else {}
        result = self.qnode("LayerNormRound", [x, self.em.const(p["gamma"], stem=f"{out}.gamma"),
                                                 self.em.const(p["beta"], stem=f"{out}.beta"),
                                                 self.em.const(np.asarray(target.zp_scalar()), stem=f"{out}.zero_point")],
                              out, expr.node.name, eps=p["eps"], k=p["k"], shift=p["shift"], dtype=target.dtype.name, **bounds)
        return replace(target, name=result.name, shape=result.shape)

    # The float32 precision a LayerNorm output keeps when it is used unquantized (24 bits at the
    # largest value the output can take, as float32's mantissa at that value)
    UNQUANTIZED_LN_BITS = 24

    def unquantized_layernorm(self, expr: FloatOp, bits: int | None = None) -> QTensor | None:
        """A LayerNormalization whose float output is used with no quantizer (NNCF's transformer
        preset adds it to the next block's float result: the residual stream stays float) as
        integers on a power-of-two grid 2^-UNQUANTIZED_LN_BITS of its largest possible value
        (|y| <= max|gamma| * sqrt(N - 1) + max|beta|): `LayerNormRound`, the exact LayerNorm
        rounded once. onnxruntime keeps float32, 24 bits relative to each value; the grid keeps
        24 bits relative to the largest, so smaller values keep fewer (docs/IMPORT.md, residue).
        None when expr is not such a LayerNorm. `bits` narrows the grid (a product must fit int32)."""
        bits = self.UNQUANTIZED_LN_BITS if bits is None else bits
        key = (expr.node.outputs[0], bits)
        if key in self.unquantized:
            return self.unquantized[key]
        ins = expr.inputs
        n = self.float_shape(expr)[-1] if isinstance(expr, FloatOp) else None
        if not isinstance(n, int):
            return None
        gamma = np.asarray(self.evaluate(ins[1], None, None), np.float64).reshape(-1)
        beta = (np.asarray(self.evaluate(ins[2], None, None), np.float64).reshape(-1)
                if len(ins) > 2 and ins[2] is not None else np.zeros(1))
        largest = float(np.abs(gamma).max(initial=0)) * np.sqrt(max(n - 1, 1)) + float(np.abs(beta).max(initial=0))
        scale = 2.0 ** (int(np.ceil(np.log2(max(largest, 2.0**-60)))) - bits)
        target = QTensor(None, TYPES["int32"], tuple(self.float_shape(expr)), scale=np.asarray(scale, np.float64),
                         zero_point=np.asarray(0, np.int64))
        q = self._ort_layernorm(expr, target, f"{key[0]}.unquantized{bits}")
        if q is not None:
            q = replace(q, bound=1 << (bits + 1))
        self.unquantized[key] = q
        return q

    def levels(self, q: QTensor) -> int:
        """The bound on |q - zero_point|: its own, a MatMul accumulator's from its operands, or its type's."""
        if q.bound is not None:
            return int(q.bound)
        if q.name in self.acc_bounds:
            return int(np.max(self.acc_bounds[q.name]))
        return rq.type_bound(q.dtype.name, q.zp_scalar())

    # float sums of quantized tensors (NNCF's residual Add before LayerNorm): integers on one grid
    SUM_BITS = 24  # the precision onnxruntime's float32 sum keeps at the sum's largest value
    TERM_EXTRA_BITS = 8  # how much finer than that each term is rounded when the exact sum needs over 62 bits

    def exact_sum(self, v, out: str) -> QTensor | None:
        """The float value v = sum_i c_i * (q_i - z_i) + constant as integers on one power-of-two
        grid. Every float32 scale and constant is a dyadic rational, so the exact sum is an
        integer multiple of 2^-E (E: the finest bit any coefficient or constant uses), summed
        exactly in int64. When that grid needs more than SUM_BITS bits for the sum's range it is
        rounded once (half to even) to the coarsest grid keeping SUM_BITS: the sum onnxruntime
        computes in float32 is itself rounded to 24 bits of the largest value. None when v is not
        such a sum (then the caller refuses)."""
        analysed = self.affine_terms(v)
        if analysed is None or not analysed[0]:
            return None
        terms, constant = analysed
        shape = tuple(self.float_shape(v)) if isinstance(v, FloatOp) else None
        rank = len(shape) if shape is not None else max(len(q.shape) for q, _ in terms.values())
        coefs = {}
        for name, (q, coef) in terms.items():
            coef = np.asarray(coef, np.float64)
            if coef.ndim > rank or coef.size > 1 and coef.reshape(-1).size != coef.shape[-1]:
                return None  # only a scalar or last-axis coefficient keeps LayerNorm's rows on one grid
            coefs[name] = coef
        constant = np.asarray(constant, np.float64)
        finest = max(_dyadic_exponent(c) for c in [*coefs.values(), constant])
        if finest > 1000:
            return None
        levels = {name: self.levels(q) for name, (q, _) in terms.items()}
        bound = int(np.abs(constant).max(initial=0) * 2.0**finest)
        for name in terms:
            bound += int(np.abs(coefs[name]).max(initial=0) * 2.0**finest) * levels[name]
        rounded_terms = bound >= 1 << 62
        if rounded_terms:
            # The exact sum does not fit int64 (an accumulator at the product of two float32
            # scales beside a grid of its own): each term is rounded first, to a grid
            # TERM_EXTRA_BITS finer than the SUM_BITS the sum keeps; then summed exactly.
            largest = float(np.abs(constant).max(initial=0)) + sum(
                float(np.abs(coefs[name]).max(initial=0)) * levels[name] for name in terms)
            finest = self.SUM_BITS + self.TERM_EXTRA_BITS - int(np.ceil(np.log2(largest)))
            bound = 1 << (self.SUM_BITS + self.TERM_EXTRA_BITS + 1)
        total, offset = None, constant * 2.0**finest
        for i, (name, (q, _)) in enumerate(terms.items()):
            m = coefs[name] * 2.0**finest
            if rounded_terms and not np.array_equal(m, np.rint(m)):
                zp = np.unique(np.asarray(q.zero_point if q.zero_point is not None else 0, np.int64))
                if zp.size > 1:
                    return None  # per-channel zero points: not a term refsim rounds
                ratio = m.reshape(-1) if m.size > 1 else m.reshape(())
                term_name = rq.requantize(self.em, self.place(q), ratio, bound=levels[name], dtype="int64", policy="dyadic",
                                          input_zero_point=int(zp[0]), rounding="half_even", axis=-1,
                                          stem=f"{out}.term{i}", what=out)
                term = QTensor(term_name, TYPES["int64"], tuple(self.em.builder.tensors[term_name].shape))
            else:
                m = m.astype(np.int64)
                zp = np.asarray(q.zero_point if q.zero_point is not None else 0, np.int64).reshape(-1)
                offset = offset - (m * zp if zp.size == 1 else m * zp.reshape(m.shape))
                if m.ndim:
                    m = m.reshape(-1) if m.size > 1 else m.reshape(())
                term = self.qnode("Mul", [self.place(q), self.em.const(m, stem=f"{out}.mul{i}")], f"{out}.term{i}", dtype="int64")
            total = term if total is None else self.qnode("Add", [total.name, term.name], f"{out}.sum", dtype="int64")
        offset = np.asarray(np.rint(offset) if rounded_terms else offset, np.int64)
        drop = max(0, bound.bit_length() - (self.SUM_BITS - 1))
        if drop:
            inputs = [total.name, self.em.const(np.asarray(1)), self.em.const(np.asarray(drop)),
                      self.em.const(offset.reshape(()), stem=f"{out}.constant") if offset.size == 1 and offset.any() else None, None]
            if offset.size > 1:
                total = self.qnode("Add", [total.name, self.em.const(offset, stem=f"{out}.constant")], f"{out}.sum", dtype="int64")
                inputs[0] = total.name
            total = self.qnode("Requant", inputs, out, rounding="half_even", dtype="int32")
        elif offset.any():
            total = self.qnode("Add", [total.name, self.em.const(offset, stem=f"{out}.constant")], out, dtype="int64")
        return replace(total, scale=np.asarray(2.0 ** (drop - finest), np.float64), zero_point=np.asarray(0, np.int64),
                       bound=(bound >> drop) + 1)

    # --- Softmax and LayerNormalization: refsim's integer variants (mode) ---------------------------

    def _keys(self, expr: FloatOp) -> str | None:
        """The keep-mask input of a Softmax over masked scores (`MaskedScores`), else None."""
        x = expr.inputs[0]
        return self.place(x.keep) if isinstance(x, MaskedScores) else None

    def _row_input(self, expr: FloatOp, what: str) -> QTensor:
        x = expr.inputs[0]
        if isinstance(x, MaskedScores) and what == "Softmax":
            x = Dequantized(x.q)
        if not isinstance(x, Dequantized) or x.q.is_const or not x.q.per_tensor:
            summed = (what == "LayerNormalization" and isinstance(x, FloatOp) and self.float_ops == "integer"
                      and self.affine_terms(x) is not None)
            raise fail(expr.node, f"{what} needs a per-tensor quantized input directly (a DequantizeLinear)"
                       + ("; it takes a float sum of quantized tensors, which --float-ops ort sums exactly on one grid"
                          if summed else ""))
        rank = len(x.q.shape)
        axis = expr.attrs.get("axis", -1)
        if axis % rank != rank - 1:
            raise fail(expr.node, f"{what} over axis {axis} is not supported; refsim normalises along the last axis")
        return x.q

    def softmax(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        from ..nonlinear import ibert_softmax_params, ita_softmax_params

        q = self._row_input(expr, "Softmax")
        scale = float(np.asarray(q.scale).reshape(-1)[0])
        if self.mode == "ibert":
            source = self.softmax_grid(q, f"{out}.softmax_input")
            p = ibert_softmax_params(float(source.scale))
        else:
            p = ita_softmax_params(scale, preset="deeploy")
            grid = QTensor(None, TYPES["int8"], q.shape, scale=np.asarray(p.input_scale, np.float64),
                           zero_point=np.asarray(0, np.int64))
            exact = np.asarray(scale / p.input_scale)
            source = self.requantize(q, exact, grid, f"{out}.softmax_input", expr.node)
        y = self.qnode(p.op, [self.place(source), self._keys(expr)], f"{out}.softmax", **p.attrs)
        y = replace(y, scale=np.asarray(p.output_scale, np.float64), zero_point=np.asarray(p.output_zero_point, np.int64))
        exact, ort = ratio_of(y, target)
        return self.requantize(y, exact, target, out, expr.node, ort_ratio=ort, value_bits=17)

    def softmax_grid(self, q: QTensor, out: str) -> QTensor:
        """The scores on the grid I-BERT's softmax needs: (q - z) * 2^k as int16, scale s / 2^k,
        exactly (a power-of-two step). I-BERT's range constant floor(-ln2 / S) is exact to
        within S: on an 8-bit grid (S ~ 0.2) that is a 19% error in every exponential, on
        the finer grid under 0.2%. k is the largest with every value inside int16 and S at
        least IBERT_SOFTMAX_MIN_SCALE (where I-BERT's int64 bound holds), as export chooses."""
        from ..modes import IBERT_SOFTMAX_INPUT_BITS, IBERT_SOFTMAX_MIN_SCALE

        scale = float(np.asarray(q.scale).reshape(-1)[0])
        bound = rq.type_bound(q.dtype.name, q.zp_scalar())
        if q.dtype.bits > IBERT_SOFTMAX_INPUT_BITS:  # a score accumulator (NNCF): requantized to int16
            wide = self.acc_bounds.get(q.name, q.bound if q.bound is not None else bound)
            step = max(IBERT_SOFTMAX_MIN_SCALE, scale * float(np.max(wide)) / (2 ** (IBERT_SOFTMAX_INPUT_BITS - 1) - 1))
            grid = QTensor(None, TYPES["int16"], q.shape, scale=np.asarray(step), zero_point=np.asarray(0, np.int64))
            return self.requantize(q, np.asarray(scale / step), grid, out)
        k = 0
        while (bound << (k + 1)) < (1 << (IBERT_SOFTMAX_INPUT_BITS - 1)) and scale / 2.0 ** (k + 1) >= IBERT_SOFTMAX_MIN_SCALE:
            k += 1
        x = self.place(q)
        if q.zp_scalar():
            x = self.qnode("Sub", [x, self.em.const(np.asarray(q.zp_scalar()), stem=f"{out}.zero_point")], f"{out}.centred",
                           dtype="int16").name
        if k:
            x = self.qnode("Mul", [x, self.em.const(np.asarray(1 << k), stem=f"{out}.step")], out, dtype="int16").name
        t = self.em.builder.tensors[x]
        return QTensor(x, t.dtype, tuple(t.shape), scale=np.asarray(scale / 2.0**k), zero_point=np.asarray(0, np.int64))

    def layernorm(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        from ..nonlinear import ibert_layernorm_params, ilayernorm_params

        q = self._row_input(expr, "LayerNormalization")
        scale = float(np.asarray(q.scale).reshape(-1)[0])
        n = q.shape[-1]
        if not isinstance(n, int):
            raise fail(expr.node, "needs a static normalised axis")
        gamma = np.broadcast_to(np.asarray(self.evaluate(expr.inputs[1], None, None), np.float64).reshape(-1), (n,))
        beta = (np.broadcast_to(np.asarray(self.evaluate(expr.inputs[2], None, None), np.float64).reshape(-1), (n,))
                if len(expr.inputs) > 2 and expr.inputs[2] is not None else np.zeros(n))
        if self.mode == "ibert":
            # I-BERT divides the bias by the weight: a weight quantized to 0 becomes a tiny one,
            # which leaves that channel's output at beta (its real value) as the float op does.
            gamma = np.where(gamma == 0, np.max(np.abs(gamma)) * 2.0**-20 or 2.0**-20, gamma)
            p = ibert_layernorm_params(scale, gamma, beta, input_bits=q.dtype.bits + (1 if q.zp_scalar() else 0))
            bias = self.em.const(p.consts["bias"], stem=f"{out}.bias")
            y = self.qnode("IBertLayerNorm", [self.place(q), bias], f"{out}.layernorm", **p.attrs)
            channel_scale = np.asarray(p.output_scale, np.float64)
            y = replace(y, scale=channel_scale, zero_point=np.zeros(n, np.int64), axis=len(q.shape) - 1)
            sy = float(np.asarray(target.scale).reshape(-1)[0])
            bound = int(2**30 * np.sqrt(n)) + int(np.abs(p.consts["bias"]).max(initial=0)) + 1
            return self.requantize(y, channel_scale / sy, target, out, expr.node,
                                      ort_ratio=np.asarray(channel_scale / sy, np.float32), axis=len(q.shape) - 1,
                                      value_bits=bound.bit_length() + 1)
        sy = float(np.asarray(target.scale).reshape(-1)[0])
        p = ilayernorm_params(scale, gamma, beta, sy, n_levels=256)
        inputs = [self.place(q), self.em.const(p.consts["weight"], "int32", f"{out}.weight"),
                  self.em.const(p.consts["bias"], "int32", f"{out}.bias")]
        y = self.qnode("iLayerNorm", inputs, f"{out}.layernorm", **p.attrs)
        if target.dtype.name == "int8" and target.zp_scalar() == 0 and y.dtype.name == "int8":
            return replace(target, name=y.name, shape=y.shape)
        y = replace(y, scale=np.asarray(sy, np.float64), zero_point=np.asarray(0, np.int64))
        return self.requantize(y, np.asarray(1.0), target, out, expr.node)

    # --- affine combinations: sum_i c_i * (q_i - z_i) + constant ----------------------------------

    def affine_terms(self, v):
        """({tensor: (q, coefficient)}, constant) with v = sum coefficient * (q - zero_point) + constant,
        coefficients and the constant being float64 arrays that broadcast against v; None when v
        is not affine in its quantized tensors."""
        if isinstance(v, Dequantized) and not v.q.is_const:
            q = v.q
            coef = np.asarray(q.scale, np.float64)
            if q.block_size:
                return None
            if coef.size > 1:
                shape = [1] * len(q.shape)
                shape[q.axis] = coef.size
                coef = coef.reshape(shape)
            return {q.name: (q, coef)}, np.float64(0.0)
        if isinstance(v, (Const, Dequantized)):
            return {}, np.asarray(self.evaluate(v, None, None), np.float64)
        if not isinstance(v, FloatOp):
            return None
        op, ins = v.node.op, v.inputs
        if op in ("Identity",):
            return self.affine_terms(ins[0])
        if op == "LayerNormalization" and self.float_ops == "ort":
            q = self.unquantized_layernorm(v)
            return None if q is None else ({q.name: (q, np.asarray(q.scale, np.float64))}, np.float64(0.0))
        if op in ("Add", "Sub", "Neg"):
            parts = [self.affine_terms(i) for i in ins]
            if any(p is None for p in parts):
                return None
            signs = {"Add": (1, 1), "Sub": (1, -1), "Neg": (-1,)}[op]
            terms, constant = {}, np.float64(0.0)
            for sign, (t, c) in zip(signs, parts):
                for name, (q, coef) in t.items():
                    old = terms.get(name, (q, 0.0))[1]
                    terms[name] = (q, old + sign * coef)
                constant = constant + sign * c
            return terms, constant
        if op in ("Mul", "Div"):
            parts = [self.affine_terms(i) for i in ins]
            if any(p is None for p in parts):
                return None
            (ta, ca), (tb, cb) = parts
            if op == "Div":
                if tb:
                    return None
                cb = 1.0 / cb
            if ta and tb:
                return None
            (t, c), k = ((ta, ca), cb) if not tb else ((tb, cb), ca)
            return {n: (q, coef * k) for n, (q, coef) in t.items()}, c * k
        if op == "BatchNormalization":
            inner = self.affine_terms(ins[0])
            if inner is None or any(self._runtime_leaves_of(i) for i in ins[1:]):
                return None
            gamma, beta, mean, var = (np.asarray(self.evaluate(i, None, None), np.float64) for i in ins[1:5])
            eps = float(v.attrs.get("epsilon", 1e-5))
            t, c = inner
            rank = len(self.float_shape(v))
            shape = [1] * rank
            shape[1] = gamma.size
            k = (gamma / np.sqrt(var + eps)).reshape(shape)
            shift = (beta - mean * gamma / np.sqrt(var + eps)).reshape(shape)
            return {n: (q, coef * k) for n, (q, coef) in t.items()}, c * k + shift
        return None

    def _runtime_leaves_of(self, v) -> bool:
        return bool(self._runtime_leaves(v)) if isinstance(v, FloatOp) else (isinstance(v, Dequantized) and not v.q.is_const)

    def affine(self, expr: FloatOp, target: QTensor, out: str) -> QTensor | None:
        """y = round(sum_i c_i/s_y * (q_i - z_i) + k/s_y) + z_y: integer multiples on a common
        dyadic grid, summed exactly, then one rounding shift (Requant)."""
        analysed = self.affine_terms(expr)
        if analysed is None or not analysed[0]:
            return None
        terms, constant = analysed
        sy = float(np.asarray(target.scale).reshape(-1)[0])
        ratios = {name: np.asarray(coef, np.float64) / sy for name, (q, coef) in terms.items()}
        largest = max(float(np.max(np.abs(r))) for r in ratios.values())
        if largest == 0.0:
            return None
        # an int64 operand (a wide accumulator) counts by its bound, else no multiplier bits are left
        widest = max(q.dtype.bits if q.dtype.bits <= 32 else min(64, self.levels(q).bit_length() + 1)
                     for q, _ in terms.values()) + 1
        mul_bits = min(30, 60 - widest - len(terms).bit_length())
        shift = int(mul_bits - np.frexp(largest)[1])
        if shift < 0:
            raise fail(expr.node, "the output scale is too small for the operands' scales")
        total, bias = None, np.asarray(np.rint(np.asarray(constant) / sy * 2.0**shift), np.int64)
        for i, (name, (q, _)) in enumerate(terms.items()):
            m = np.rint(ratios[name] * 2.0**shift).astype(np.int64)
            m = m.reshape(m.shape[-len(q.shape):] if m.ndim > len(q.shape) else m.shape)
            zp = np.asarray(q.zero_point if q.zero_point is not None else 0, np.int64)
            if zp.size > 1:
                zp = zp.reshape(m.shape)
            bias = bias - m * zp
            term = self.qnode("Mul", [self.place(q), self.em.const(m, stem=f"{out}.mul{i}")], f"{out}.term{i}", dtype="int64")
            total = term if total is None else self.qnode("Add", [total.name, term.name], f"{out}.sum", dtype="int64")
        scalar_bias = None
        if bias.size == 1:
            scalar_bias = int(bias.reshape(-1)[0])
        else:
            total = self.qnode("Add", [total.name, self.em.const(bias, stem=f"{out}.constant")], f"{out}.sum", dtype="int64")
        bounds = {"lo": target.clip[0], "hi": target.clip[1]} if target.clip else {}
        inputs = [total.name, self.em.const(np.asarray(1)), self.em.const(np.asarray(shift)),
                  self.em.const(np.asarray(scalar_bias), stem=f"{out}.bias") if scalar_bias else None,
                  self.em.const(np.asarray(target.zp_scalar()), stem=f"{out}.zero_point")]
        result = self.qnode("Requant", inputs, out, rounding=target.rounding or self.rounding,
                              dtype=target.dtype.name, **bounds)
        return replace(target, name=result.name, shape=result.shape)

    def product(self, expr: FloatOp, target: QTensor, out: str) -> QTensor:
        """Two quantized tensors multiplied: the exact integer product, requantized."""
        a, b = expr.inputs[0], expr.inputs[1]
        if not all(isinstance(v, Dequantized) and not v.q.is_const for v in (a, b)) or expr.node.op != "Mul":
            raise fail(expr.node, "float op between DequantizeLinear and QuantizeLinear cannot be computed in integers")
        qa, qb = a.q, b.q
        for q in (qa, qb):
            if not q.per_tensor:
                raise fail(expr.node, "multiplies a per-channel quantized tensor")
        centered = []
        for q in (qa, qb):
            t = self.place(q)
            if q.zp_scalar():
                t = self.qnode("Sub", [t, self.em.const(np.asarray(q.zp_scalar()), q.dtype)], f"{out}.centered").name
            centered.append(t)
        p = self._accumulator(self.qnode("Mul", centered, f"{out}.product"), qa, qb, axis=0)
        exact, ort = ratio_of(p, target)
        return self.requantize(p, exact, target, out, expr.node, ort_ratio=ort)


def _largest(q: QTensor) -> int:
    """max |q - z| over q's range (per-tensor q)."""
    lo, hi = q.clip or (q.dtype.lo, q.dtype.hi)
    return max(hi - q.zp_scalar(), q.zp_scalar() - lo)


def _summable(expr) -> bool:
    """A ReduceSum of one per-tensor quantized tensor."""
    x = expr.inputs[0]
    return expr.node.op == "ReduceSum" and isinstance(x, Dequantized) and not x.q.is_const and x.q.per_tensor


def _inner_sum(expr) -> FloatOp | None:
    """The summable ReduceSum under a chain of elementwise ops with constants, if any."""
    v = expr
    while isinstance(v, FloatOp) and not isinstance(v, Moved) and v.node.op in ELEMENTWISE:
        computed = [i for i in v.inputs if isinstance(i, FloatOp)]
        if len(computed) != 1 or any(isinstance(i, Dequantized) and not i.q.is_const for i in v.inputs):
            return None
        v = computed[0]
        if v.node.op == "ReduceSum":
            return v if _summable(v) else None
    return None


def _substituted(expr, old, new):
    if expr is old:
        return new
    if isinstance(expr, FloatOp) and not isinstance(expr, Moved):
        return FloatOp(expr.node, [_substituted(i, old, new) for i in expr.inputs], expr.attrs)
    return expr


def _infinite(scale) -> bool:
    """A constant scale with an infinite entry (quantize_static's scale for a -inf mask)."""
    return isinstance(scale, Const) and np.asarray(scale.value).dtype.kind == "f" and bool(np.any(np.isinf(scale.value)))


def _nan_guarded_softmax(expr: FloatOp) -> FloatOp | None:
    """s for Where(IsNaN(s), 0, s) over a Softmax s (transformers' guard for rows with every key
    masked). refsim's softmaxes never produce NaN: a row keeps at least its lowest-level keys."""
    if expr.node.op != "Where" or len(expr.inputs) != 3:
        return None
    cond, zero, s = expr.inputs
    if not (isinstance(cond, FloatOp) and cond.node.op == "IsNaN" and cond.inputs[0] is s
            and isinstance(s, FloatOp) and s.node.op == "Softmax"):
        return None
    if not isinstance(zero, Const) or np.any(np.asarray(zero.value) != 0):
        return None
    return s


def _dyadic_exponent(values: np.ndarray) -> int:
    """The least E with every value an integer multiple of 2^-E (values float64, finite)."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[v != 0]
    if not v.size:
        return -1074
    if not np.all(np.isfinite(v)):
        return 10**6
    mantissa, exponent = np.frexp(np.abs(v))
    m = (mantissa * 2.0**53).astype(np.int64)  # v = m * 2^(exponent - 53), m odd after its trailing zeros
    trailing = np.rint(np.log2((m & -m).astype(np.float64))).astype(np.int64)  # m & -m: m's lowest set bit
    return int((53 - exponent - trailing).max())


def _eight_bit(v) -> bool:
    """A dequantized per-tensor 8-bit tensor (or constant): what onnxruntime's QLinear kernels take."""
    return isinstance(v, Dequantized) and v.q.per_tensor and v.q.scale is not None and v.q.dtype.name in ("int8", "uint8")


def _same(a: QTensor, b: QTensor) -> bool:
    if a.dtype is not b.dtype:
        return False
    return (np.array_equal(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point))
            and a.axis == b.axis and a.block_size == b.block_size)
