"""QONNX graphs (Brevitas export): Quant/IntQuant, BipolarQuant, Trunc around float ops.

QONNX's quantizers work on float tensors (qonnx `int_quant`):

    Quant(x, scale, zeropt, bitwidth; signed, narrow, rounding_mode)
        q = round_mode(clip(x / scale + zeropt, min_int, max_int));   y = (q - zeropt) * scale
    BipolarQuant(x, scale):   y = (x >= 0 ? 1 : -1) * scale
    Trunc(x, scale, zeropt, in_bits, out_scale, out_zeropt, out_bits; rounding_mode, signed, narrow)
        with t = log2(out_scale / scale):  q = round_mode(clip(round(x/scale + zeropt) / 2^t))

with min_int/max_int from the bit width, signedness and narrow range (narrow signed 2-bit
is ternary, {-1, 0, 1}). A Quant of a constant (weights) is computed here, at import, into
integer weights of the narrowest type (int2/int4/int8, ternary, ...), packed in .intq. A
Quant of a computed tensor is the same requantization a QDQ QuantizeLinear is, with the
clip range and rounding mode of the Quant; everything between the quantizers (MatMul,
Conv, Gemm, bias adds, BatchNormalization, Relu, pooling, ...) is imported as for QDQ.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from refsim.dtypes import TYPES

from ..frontend.checks import OpSpec
from .base import FloatInput, fail
from .qdq import QdqImporter
from .values import Const, Dequantized, FloatOp, QTensor, ratio_of

DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general", "onnx.brevitas", "")
ROUNDINGS = {"ROUND": "half_even", "FLOOR": "floor", "ROUND_TO_ZERO": "trunc"}


def _bit_width(node, value, what: str) -> int:
    """One integer bit width from 1 to 32, read from a constant (QONNX stores them as floats)."""
    bits = np.asarray(value)
    if bits.size != 1 or bits.dtype.kind not in "iuf":
        raise fail(node, f"{what} must be one integer from 1 to 32")
    v = float(bits.reshape(-1)[0])
    if not (np.isfinite(v) and v == round(v) and 1 <= v <= 32):
        raise fail(node, f"{what} must be one integer from 1 to 32, got {v:g}")
    return int(v)


def int_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if not 1 <= bits <= 64:
        raise ValueError(f"bit width {bits} is not between 1 and 64")
    if signed:
        return -(1 << (bits - 1)) + (1 if narrow else 0), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - (2 if narrow else 1)


def type_for(lo: int, hi: int):
    if lo >= -1 and hi <= 1 and lo < 0:
        return TYPES["ternary"]
    names = ("uint2", "uint4", "uint8", "uint16", "uint32") if lo >= 0 else ("int2", "int4", "int8", "int16", "int32")
    for name in names:
        if TYPES[name].contains(lo, hi):
            return TYPES[name]
    raise ValueError(f"no type holds [{lo}, {hi}]")


_QUANT = OpSpec(inputs=(4,), attrs={"signed": "int", "narrow": "int", "rounding_mode": "string"})
_TRUNC = OpSpec(inputs=(5, 7), attrs={"signed": "int", "narrow": "int", "rounding_mode": "string"})  # old and new forms
SPECS = {(domain, op): spec for domain in DOMAINS if domain
         for op, spec in (("Quant", _QUANT), ("IntQuant", _QUANT), ("BipolarQuant", OpSpec(inputs=(2,))), ("Trunc", _TRUNC))}


class QonnxImporter(QdqImporter):
    format_name = "qonnx"
    KEEP = ("DequantizeLinear", "Quant", "IntQuant", "BipolarQuant", "Trunc")
    specs = {**QdqImporter.specs, **SPECS}

    def __init__(self, graph, emitter, mode: str = "ibert", requant: str = "dyadic", float_ops: str = "integer"):
        super().__init__(graph, emitter, mode, requant, float_ops)
        for domain in DOMAINS:
            for op in ("Quant", "IntQuant"):
                self.handlers[(domain, op)] = self.op_Quant
            self.handlers[(domain, "BipolarQuant")] = self.op_BipolarQuant
            self.handlers[(domain, "Trunc")] = self.op_Trunc

    def foldable(self, domain: str, op_type: str) -> bool:
        return domain == "" and op_type not in ("DequantizeLinear", "Quant", "IntQuant", "BipolarQuant", "Trunc")

    # --- the grid a Quant defines ------------------------------------------------------------

    def grid(self, node, ins, attrs, shape) -> QTensor:
        scale = np.asarray(self.const_value(node, ins[1], "the scale"), np.float32)
        zeropt = np.asarray(self.const_value(node, ins[2], "the zero point"), np.float32)
        bits = _bit_width(node, self.const_value(node, ins[3], "the bit width"), "the bit width")
        signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
        mode = str(attrs.get("rounding_mode", "ROUND")).upper()
        if mode not in ROUNDINGS and mode != "CEIL":
            raise fail(node, f"rounding mode {mode!r} is not supported (ROUND, FLOOR, CEIL, ROUND_TO_ZERO)")
        if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
            raise fail(node, "scales must be positive and finite")
        if not np.all(np.isfinite(zeropt)) or np.any(zeropt != np.round(zeropt)):
            raise fail(node, "a zero point that is not an integer has no integer grid")
        lo, hi = (-1, 1) if bits == 1 and signed else int_range(bits, signed, narrow)
        dtype = type_for(lo, hi)
        rank = len(shape)
        axis, flat_scale, flat_zp = None, scale.reshape(()) if scale.size == 1 else None, zeropt.reshape(()) if zeropt.size == 1 else None
        if scale.size > 1 or zeropt.size > 1:
            full = np.broadcast_to(scale, np.broadcast_shapes(scale.shape, zeropt.shape))
            padded = (1,) * (rank - full.ndim) + full.shape
            varying = [i for i, d in enumerate(padded) if d != 1]
            if len(varying) != 1:
                raise fail(node, "scales must be per tensor or vary along one axis")
            axis = varying[0]
            flat_scale = np.broadcast_to(scale.reshape((1,) * (rank - scale.ndim) + scale.shape), padded).reshape(-1) \
                if scale.size > 1 else np.full(padded[axis], float(scale.reshape(-1)[0]), np.float32)
            flat_zp = np.broadcast_to(zeropt.reshape((1,) * (rank - zeropt.ndim) + zeropt.shape), padded).reshape(-1) \
                if zeropt.size > 1 else np.full(padded[axis], float(zeropt.reshape(-1)[0]), np.float32)
        clip = None if (lo, hi) == (dtype.lo, dtype.hi) else (lo, hi)
        return QTensor(None, dtype, tuple(shape), scale=np.asarray(flat_scale, np.float64),
                       zero_point=np.asarray(flat_zp).astype(np.int64), axis=axis, clip=clip,
                       rounding=mode if mode == "CEIL" else ROUNDINGS[mode],
                       factors=None) , (scale, zeropt, lo, hi, mode, bits == 1 and signed)

    @staticmethod
    def qonnx_levels(x, scale, zeropt, lo, hi, mode, bipolar) -> np.ndarray:
        """qonnx's int_quant on constants, in float32 as qonnx computes it."""
        y = np.asarray(x, np.float32) / scale + zeropt
        if bipolar:
            return np.where(y >= 0, 1, -1).astype(np.int64)
        y = np.clip(y, lo, hi)
        rounder = {"ROUND": np.round, "FLOOR": np.floor, "CEIL": np.ceil, "ROUND_TO_ZERO": np.trunc}[mode]
        return rounder(y).astype(np.int64)

    def quantize_values(self, x, target: QTensor) -> np.ndarray:
        """Float values onto target's grid (lookup tables), with the Quant's rounding and clip."""
        lo, hi = target.clip or (target.dtype.lo, target.dtype.hi)
        mode = {v: k for k, v in ROUNDINGS.items()}.get(target.rounding or "half_even", target.rounding)
        scale = np.asarray(target.scale, np.float32)
        zp = np.asarray(target.zero_point, np.float32)
        return self.qonnx_levels(x, scale, zp, lo, hi, mode, False).astype(target.dtype.storage)

    # --- ops -------------------------------------------------------------------------------------

    def op_Quant(self, node, ins, attrs):
        x = ins[0]
        shape = self._value_shape(node, x)
        target, (scale, zeropt, lo, hi, mode, bipolar) = self.grid(node, ins, attrs, shape)
        out = node.outputs[0]
        if isinstance(x, Const):
            levels = self.qonnx_levels(x.value, scale, zeropt, lo, hi, mode, bipolar)
            return Dequantized(replace(target, data=levels.astype(target.dtype.storage), shape=levels.shape))
        if isinstance(x, FloatInput):
            if mode == "CEIL":
                raise fail(node, "CEIL rounding of a graph input is not supported")
            q = self.quantized_input(node, x, target)
            self.input_quantization[x.info.name]["rounding"] = q.rounding or "half_even"
            if q.clip:
                self.input_quantization[x.info.name]["clip"] = list(q.clip)
            return Dequantized(q)
        if bipolar:
            return Dequantized(self.sign(node, x, target, out))
        if target.rounding == "CEIL":
            raise fail(node, "CEIL rounding of a computed tensor is not supported (floor, round and round-to-zero are)")
        if not target.per_tensor:
            raise fail(node, "per-channel quantization of a computed tensor is not supported")
        if isinstance(x, Dequantized):
            q = x.q
            if q.is_const:
                values = self.onnx_dequantize(q.data, q)
                levels = self.qonnx_levels(values, scale, zeropt, lo, hi, mode, False)
                return Dequantized(replace(target, data=levels.astype(target.dtype.storage), shape=levels.shape))
            if _same_grid(q, target):
                return x
            exact, ort = ratio_of(q, target)
            return Dequantized(self.requantize(q, exact, target, out, node, ort_ratio=ort, axis=self._axis(q)))
        if isinstance(x, FloatOp):
            return Dequantized(self.resolve(x, target, out, node))
        raise fail(node, "quantizes a value refsim cannot represent")

    def sign(self, node, x, target: QTensor, out: str) -> QTensor:
        """Bipolar quantization of a computed tensor: 1 where it is >= 0, else -1."""
        if isinstance(x, FloatOp):
            analysed = self.affine_terms(x)
            if analysed is None or len(analysed[0]) != 1 or np.any(analysed[1] != 0):
                raise fail(node, "bipolar quantization needs a quantized tensor (or its positive multiple)")
            (q, coef), = analysed[0].values()
            if np.any(np.asarray(coef) <= 0):
                raise fail(node, "bipolar quantization of a negatively scaled tensor is not supported")
        elif isinstance(x, Dequantized) and not x.q.is_const:
            q = x.q
        else:
            raise fail(node, "bipolar quantization of this value is not supported")
        if not q.per_tensor and q.zero_point is not None and np.unique(np.asarray(q.zero_point)).size > 1:
            raise fail(node, "per-channel zero points are not supported here")
        # 2 * (q - zp) + 1 is >= 1 exactly when q >= zp, and <= -1 otherwise: clip it to [-1, 1].
        zp = q.zp_scalar() if q.zero_point is not None else 0
        inputs = [self.place(q), self.em.const(np.asarray(2)), self.em.const(np.asarray(0)),
                  self.em.const(np.asarray(1 - 2 * zp), stem=f"{out}.bias"), None]
        result = self.qnode("Requant", inputs, out, dtype="ternary", lo=-1, hi=1)
        return replace(target, name=result.name, shape=result.shape, clip=None)

    def op_BipolarQuant(self, node, ins, attrs):
        x = ins[0]
        scale = np.asarray(self.const_value(node, ins[1], "the scale"), np.float32)
        if scale.size != 1:
            raise fail(node, "per-channel bipolar scales are not supported")
        shape = self._value_shape(node, x)
        target = QTensor(None, TYPES["ternary"], tuple(shape), scale=np.asarray(scale.reshape(()), np.float64),
                         zero_point=np.asarray(0, np.int64))
        if isinstance(x, Const):
            levels = np.where(np.asarray(x.value, np.float32) >= 0, 1, -1).astype(np.int8)
            return Dequantized(replace(target, data=levels, shape=levels.shape))
        if isinstance(x, FloatInput):
            raise fail(node, "bipolar quantization of a graph input is not supported")
        return Dequantized(self.sign(node, x, target, node.outputs[0]))

    def op_Trunc(self, node, ins, attrs):
        x = ins[0]
        if not isinstance(x, Dequantized) or x.q.is_const:
            raise fail(node, "truncates a value that is not a quantized tensor")
        q = x.q
        scale = np.asarray(self.const_value(node, ins[1], "the scale"), np.float32)
        zeropt = np.asarray(self.const_value(node, ins[2], "the zero point"), np.float32)
        if len(ins) >= 7:
            out_scale = np.asarray(self.const_value(node, ins[4], "the output scale"), np.float32)
            out_bits = _bit_width(node, self.const_value(node, ins[6], "the output bit width"), "the output bit width")
        else:  # the older 5-input form: x, scale, zeropt, input_bit_width, output_bit_width
            in_bits = _bit_width(node, self.const_value(node, ins[3], "the input bit width"), "the input bit width")
            out_bits = _bit_width(node, self.const_value(node, ins[4], "the output bit width"), "the output bit width")
            out_scale = scale * np.float32(2.0 ** (in_bits - out_bits))
        if scale.size != 1 or out_scale.size != 1 or zeropt.size != 1:
            raise fail(node, "per-channel Trunc is not supported")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(out_scale)) and np.all(out_scale > 0)
                and np.all(np.isfinite(zeropt))):
            raise fail(node, "scales must be positive and finite, zero points finite")
        if not q.per_tensor or not np.isclose(float(np.asarray(q.scale).reshape(-1)[0]), float(scale.reshape(-1)[0]), rtol=1e-6) \
                or q.zp_scalar() != int(zeropt.reshape(-1)[0]):
            raise fail(node, "the input is not quantized at the Trunc's input scale and zero point")
        ratio = float(out_scale.reshape(-1)[0]) / float(scale.reshape(-1)[0])
        t = int(np.round(np.log2(ratio)))
        if t < 0:
            raise fail(node, "Trunc with an output scale below the input scale is not supported")
        lo, hi = int_range(out_bits, bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0)))
        mode = str(attrs.get("rounding_mode", "FLOOR")).upper()
        if mode not in ROUNDINGS:
            raise fail(node, f"rounding mode {mode!r} is not supported for Trunc")
        out_zp = float(zeropt.reshape(-1)[0]) / 2**t
        if out_zp != round(out_zp):
            raise fail(node, "the truncated zero point is not an integer")
        dtype = type_for(lo, hi)
        out = node.outputs[0]
        inputs = [self.place(q), self.em.const(np.asarray(1)), self.em.const(np.asarray(t), stem=f"{out}.shift"), None, None]
        result = self.qnode("Requant", inputs, out, rounding=ROUNDINGS[mode], dtype=dtype.name, lo=lo, hi=hi)
        # The grid keeps Trunc's own zero point: the output value is (y - zeropt / 2^t) * out_scale.
        return Dequantized(QTensor(result.name, dtype, result.shape,
                                   scale=np.asarray(2.0**t * float(scale.reshape(-1)[0]), np.float64),
                                   zero_point=np.asarray(int(out_zp), np.int64), clip=(lo, hi)))

    def unhandled(self, node, ins, attrs):
        if node.op in ("GlobalAveragePool", "AveragePool"):
            raise fail(node, f"{node.op} is not supported yet; quantize its output with a Trunc after a sum")
        return super().unhandled(node, ins, attrs)


def _same_grid(a: QTensor, b: QTensor) -> bool:
    return (a.dtype is b.dtype and a.clip == b.clip
            and np.array_equal(np.asarray(a.scale, np.float32), np.asarray(b.scale, np.float32))
            and np.array_equal(np.asarray(a.zero_point), np.asarray(b.zero_point)))


__all__ = ["QonnxImporter", "int_range", "type_for"]
