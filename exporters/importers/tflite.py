"""Importing int8 and int16x8 TFLite models (`.tflite` flatbuffers) as refsim integer graphs.

    from refsim.exporters.importers.tflite import import_tflite
    model = import_tflite("model.tflite", "model.intq")               # TFLite Micro's kernels
    model = import_tflite("model.tflite", "model.intq", reference="litert")

Each TFLite operator becomes the refsim ops that compute what its reference kernel computes,
with the integer parameters its Prepare would derive (`tflite_prepare`): QuantizeMultiplier
pairs become `Requant(rounding="double")` (TFLite's default double rounding, shift = 31 - e),
int64 accumulators of int16x8 kernels the 16-bit reduced multiplier rounded once, functions
of one int8/int16 value a `Lut` holding the kernel's result for every input.

`reference` picks whose reference kernels: "tflm" (TFLite Micro, what MCUs run; the default)
or "litert" (LiteRT's BUILTIN_REF resolver, the Python interpreter's reference kernels). They
differ in three places: LiteRT's FULLY_CONNECTED rounds `double(acc) * scale` once
(RequantF64) where TFLite Micro multiplies by the quantized multiplier; and LiteRT tabulates
int8 LOGISTIC and TANH with float32 functions where TFLite Micro runs gemmlowp's fixed point.

Layout: TFLite tensors are NHWC; CONV_2D, DEPTHWISE_CONV_2D and the pools transpose to
refsim's NCHW around the window op and back, so every tensor the TFLite graph names keeps
its TFLite shape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from refsim.builder import GraphBuilder
from refsim.engine import Model
from refsim.errors import RefsimError
from refsim.ir import Graph

from ..nonlinear import tflite_softmax_params
from . import tflite_prepare as P
from .base import ImportFailure
from .tflite_reader import TfliteModel, TfliteOperator, TfliteTensor, read_tflite

REFERENCES = ("tflm", "litert")
INT_TYPES = {"int8", "int16", "int32", "uint8", "int64"}


@dataclass
class Value:
    """A TFLite tensor as the importer sees it: its refsim name once placed, and its meaning."""

    tensor: TfliteTensor
    name: str | None = None  # refsim tensor name (None: a constant not placed yet)

    @property
    def dtype(self) -> str:
        return self.tensor.type

    @property
    def shape(self) -> tuple:
        return self.tensor.shape

    @property
    def scale(self) -> float:
        return float(self.tensor.scale[0])

    @property
    def zp(self) -> int:
        return int(self.tensor.zero_point[0]) if self.tensor.zero_point is not None and self.tensor.zero_point.size else 0


class TfliteImporter:
    def __init__(self, model: TfliteModel, reference: str = "tflm", name: str | None = None):
        if reference not in REFERENCES:
            raise ImportFailure(f"unknown reference {reference!r}; choose from {', '.join(REFERENCES)}")
        self.m = model
        self.reference = reference
        self.b = GraphBuilder(name or "tflite")
        self.values: dict[int, Value] = {}
        self.inputs_meta: dict[str, dict] = {}
        self.outputs_meta: dict[str, dict] = {}
        self.op: TfliteOperator | None = None
        self.layers: list[dict] = []  # per-operator integer parameters (for MCU headers)

    # --- errors and names ---------------------------------------------------------------

    def fail(self, why: str) -> ImportFailure:
        where = f"{os.path.basename(self.m.path)}: " if self.m.path else ""
        if self.op is not None:
            return ImportFailure(f"{where}{self.op.describe()}: {why}")
        return ImportFailure(f"{where}{why}")

    def fresh(self, stem: str) -> str:
        stem = stem or "t"
        if stem not in self.b.tensors and stem not in self.b._node_names:
            return stem
        return self.b._fresh(stem)

    # --- tensors ------------------------------------------------------------------------

    def value(self, index: int) -> Value:
        if index < 0:
            raise self.fail("a required input is omitted")
        if index not in self.values:
            t = self.m.tensors[index]
            if t.data is None:
                raise self.fail(f"{t.describe()} is used before any operator produces it")
            self.values[index] = Value(t)
        return self.values[index]

    def place(self, v: Value, dtype: str | None = None) -> str:
        """The refsim tensor of v, adding a constant to the graph on first use."""
        if v.name is None:
            data = v.tensor.data
            t = dtype or v.dtype
            if t not in INT_TYPES and t != "int4":
                raise self.fail(f"{v.tensor.describe()} is a {v.dtype} constant; refsim takes integers only")
            v.name = self.b.const(np.asarray(data).astype(np.int64), t, name=self.fresh(v.tensor.name))
        return v.name

    def const(self, values, dtype: str, stem: str) -> str:
        return self.b.const(np.asarray(values, np.int64), dtype, name=self.fresh(stem))

    def node(self, op: str, inputs, stem: str, **attrs) -> str:
        name = self.fresh(stem)
        try:
            self.b.node(op, inputs, outputs=[name], name=self.fresh(f"{stem}.{op}"), **attrs)
        except RefsimError as e:
            raise self.fail(f"{op}: {e}") from None
        return name

    def set_output(self, index: int, name: str) -> None:
        t = self.m.tensors[index]
        if t.quantized:
            self.b.set_quant(name, scale=[float(s) for s in t.scale] if t.per_channel else float(t.scale[0]),
                             zero_point=[int(z) for z in t.zero_point] if t.per_channel else int(t.zero_point[0]),
                             axis=t.axis if t.per_channel else None)
        self.values[index] = Value(t, name)

    def quantized(self, v: Value, what: str, types=("int8", "int16")) -> None:
        if v.dtype not in types:
            raise self.fail(f"{what} is {v.dtype}; this operator is supported for {' and '.join(types)} tensors")
        if not v.tensor.quantized:
            raise self.fail(f"{what} ({v.tensor.name!r}) has no quantization parameters")

    def shape_of(self, index: int) -> tuple:
        shape = self.m.tensors[index].shape
        if any(d < 0 for d in shape):
            raise self.fail(f"{self.m.tensors[index].describe()} has a dynamic shape {list(shape)}")
        return shape

    def const_ints(self, index: int, what: str) -> list[int]:
        t = self.m.tensors[index]
        if t.data is None:
            raise self.fail(f"{what} must be a constant tensor")
        return [int(v) for v in np.asarray(t.data).reshape(-1)]

    # --- requantization ----------------------------------------------------------------

    def requant(self, x: str, multipliers, exponents, out: TfliteTensor, stem: str, lo: int, hi: int,
                axis: int = -1, wide: bool = False) -> str:
        """MultiplyByQuantizedMultiplier(x, q, e) + zero point, clamped to [lo, hi].

        int32 x (wide=False): double rounding, Requant(rounding="double", shift=31-e).
        int64 x (wide=True, int16x8 kernels): TFLite's 64-bit overload, which rounds the
        multiplier to 16 bits, (q + 2^15) >> 16 (0x7FFF from 0x7FFF0000 up), and then
        rounds once: Requant(half_up) with shift 15 - e.
        """
        q = np.asarray(multipliers, np.int64).reshape(-1)
        e = np.asarray(exponents, np.int64).reshape(-1)
        if wide:
            mul = np.where(q < 0x7FFF0000, (q + (1 << 15)) >> 16, 0x7FFF)
            shift = 15 - e
            rounding = "half_up"
        else:
            mul, shift, rounding = q, 31 - e, "double"
        if np.any(shift < 0):
            raise self.fail(f"a multiplier exponent {int(e.max())} is beyond what TFLite's kernels support")
        scalar = mul.size == 1
        inputs = [x, self.const(mul[0] if scalar else mul, "int32", f"{stem}.mul"),
                  self.const(shift[0] if scalar else shift, "int8", f"{stem}.shift"), None,
                  self.const(int(out.zero_point[0]) if out.zero_point is not None else 0, "int32", f"{stem}.zero_point")]
        if not len(self.b.tensors[x].shape):
            axis = 0  # a scalar (a reduction over every axis)
        return self.node("Requant", inputs, stem, axis=axis, rounding=rounding, dtype=out.type, lo=lo, hi=hi)

    def requant_f64(self, x: str, scales, out: TfliteTensor, stem: str, lo: int, hi: int, axis: int = -1) -> str:
        """LiteRT's reference FULLY_CONNECTED: round(double(acc) * scale) + zero point."""
        parts = [P.float64_parts(float(s)) for s in np.asarray(scales, np.float64).reshape(-1)]
        mul = np.array([p[0] for p in parts], np.int64)
        exp = np.array([p[1] for p in parts], np.int64)
        scalar = mul.size == 1
        inputs = [x, self.const(mul[0] if scalar else mul, "int64", f"{stem}.mul"),
                  self.const(exp[0] if scalar else exp, "int16", f"{stem}.exp"),
                  self.const(int(out.zero_point[0]), "int32", f"{stem}.zero_point")]
        return self.node("RequantF64", inputs, stem, axis=axis, dtype=out.type, lo=lo, hi=hi)

    def act_range(self, out: TfliteTensor) -> tuple[int, int]:
        act = int(self.op.options.get("fused_activation_function", 0) or 0)
        return P.activation_range(act, float(out.scale[0]), int(out.zero_point[0]), out.type, self.op.describe())

    def record(self, **params) -> None:
        """Remember an operator's integer parameters (written into MCU headers)."""
        self.layers.append({"operator": self.op.index, "op": self.op.name, **params})

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> Graph:
        m = self.m
        for index in m.inputs:
            t = m.tensors[index]
            if t.type in ("int8", "int16", "int32", "uint8"):
                name = self.b.input(self.fresh(t.name), t.type, list(self.shape_of(index)))
                self.set_output(index, name)
                if t.quantized:
                    self.inputs_meta[name] = self._quant_meta(t)
            elif t.type == "float32":
                self.values[index] = Value(t, None)  # waits for the QUANTIZE that reads it
            else:
                raise self.fail(f"input {t.describe()} has type {t.type}, which refsim cannot take")
        for op in m.operators:
            self.op = op
            handler = getattr(self, f"op_{op.name}", None)
            if handler is None:
                self.op = None
                raise self.fail(f"operator {op.index} ({op.name}) is not supported by the TFLite importer")
            recorded = len(self.layers)
            try:
                handler(op)
                self._describe_layers(op, self.layers[recorded:])
            except ImportFailure:
                raise
            except RefsimError as e:
                raise self.fail(str(e)) from None
        self.op = None
        outputs = []
        for index in m.outputs:
            v = self.values.get(index)
            if v is None:
                raise self.fail(f"graph output {m.tensors[index].describe()} is never produced")
            if v.name is None:
                raise self.fail(f"graph output {m.tensors[index].describe()} is float; refsim outputs integers "
                                "(a DEQUANTIZE at the end of the graph is fine)")
            outputs.append(v.name)
        self.b.output(*outputs)
        self.b.metadata["import"] = {"format": "tflite", "reference": self.reference, "source": os.path.basename(m.path),
                                     "requant": "tflite", "layers": self.layers}
        self.b.metadata["boundary"] = {"inputs": self.inputs_meta, "outputs": self.outputs_meta}  # refsim.boundary
        return self.b.build()

    def _describe_layers(self, op: TfliteOperator, layers: list[dict]) -> None:
        """Name each recorded layer's activation inputs, constants and output (refsim tensors)."""
        for layer in layers:
            layer.setdefault("inputs", [self.values[i].name for i in op.inputs
                                        if i >= 0 and self.m.tensors[i].data is None and i in self.values])
            if op.name in ("FULLY_CONNECTED",):
                layer.setdefault("weights", self.values[op.inputs[1]].name)
                if len(op.inputs) > 2 and op.inputs[2] >= 0:
                    layer.setdefault("bias", self.values[op.inputs[2]].name)
            elif op.name in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op.inputs) > 2 and op.inputs[2] >= 0:
                layer.setdefault("bias", self.values[op.inputs[2]].name)
            layer["output"] = self.values[op.outputs[0]].name
            layer["options"] = {k: v for k, v in op.options.items() if isinstance(v, (int, float, bool))}

    @staticmethod
    def _quant_meta(t: TfliteTensor) -> dict:
        return {"scale": [float(s) for s in t.scale], "zero_point": [int(z) for z in t.zero_point], "axis": t.axis,
                "dtype": t.type, "rounding": "half_away"}

    # --- boundary ops ----------------------------------------------------------------------

    def op_QUANTIZE(self, op):
        src = self.m.tensors[op.inputs[0]]
        out = self.m.tensors[op.outputs[0]]
        if out.type not in ("int8", "int16"):
            raise self.fail(f"QUANTIZE to {out.type} is not supported (int8 and int16 are)")
        if src.type == "float32":
            if op.inputs[0] not in self.m.inputs:
                raise self.fail("QUANTIZE of a computed float tensor: refsim runs integers only (quantize graph inputs)")
            name = self.b.input(self.fresh(out.name), out.type, list(self.shape_of(op.outputs[0])))
            self.inputs_meta[name] = {**self._quant_meta(out), "float_input": src.name}
            self.set_output(op.outputs[0], name)
            return
        x = self.value(op.inputs[0])
        self.quantized(x, "the input")
        # Requantize: MBQM(x - zp_in, QuantizeMultiplier(s_in / s_out)) + zp_out.
        q, e = P.quantize_multiplier(float(x.tensor.scale[0]) / float(out.scale[0]))
        centered = self.node("Sub", [self.place(x), self.const(x.zp, "int32", f"{out.name}.input_zero_point")],
                             f"{out.name}.centered", dtype="int32")
        lo, hi = P.TYPE_RANGES[out.type]
        self.record(multiplier=q, shift=e)
        self.set_output(op.outputs[0], self.requant(centered, q, e, out, out.name, lo, hi))

    def op_DEQUANTIZE(self, op):
        src = self.m.tensors[op.inputs[0]]
        if op.outputs[0] not in self.m.outputs:
            raise self.fail("DEQUANTIZE inside the graph: refsim runs integers only (dequantize graph outputs)")
        if src.type == "float16" or src.data is not None:
            raise self.fail("DEQUANTIZE of a constant (float16 or weight-only quantization) is not supported")
        x = self.value(op.inputs[0])
        name = self.place(x)
        out_name = self.m.tensors[op.outputs[0]].name
        self.outputs_meta[out_name] = {"tensor": name, "dequantize": True, **self._quant_meta(src)}
        self.values[op.outputs[0]] = Value(self.m.tensors[op.outputs[0]], name)

    # --- matrix products ------------------------------------------------------------------

    def _wide(self, x: Value) -> bool:
        return x.dtype == "int16"

    def op_FULLY_CONNECTED(self, op):
        x = self.value(op.inputs[0])
        w = self.value(op.inputs[1])
        bias = self.value(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input")
        self.quantized(w, "the weights", types=("int8", "int4"))
        if op.options.get("weights_format", 0):
            raise self.fail("shuffled weights (weights_format SHUFFLED4x16INT8) are not supported")
        K = w.shape[-1]
        M = w.shape[0]
        in_shape = self.shape_of(op.inputs[0])
        batches = int(np.prod(in_shape)) // K
        xn = self.place(x)
        if tuple(in_shape) != (batches, K):
            xn = self.node("Reshape", [xn], f"{out.name}.input2d", shape=[batches, K])
        acc = self._matmul(xn, x, w, bias, out, transB=True)
        lo, hi = self.act_range(out)
        reshape = tuple(self.shape_of(op.outputs[0])) != (batches, M)
        y = self._scale_accumulator(acc, x, w, out, lo, hi, f"{out.name}.2d" if reshape else out.name)
        if reshape:
            y = self.node("Reshape", [y], out.name, shape=list(self.shape_of(op.outputs[0])))
        self.set_output(op.outputs[0], y)

    def _matmul(self, xn: str, x: Value, w: Value, bias: Value | None, out: TfliteTensor, transB: bool) -> str:
        wide = self._wide(x)
        zx = self.const(x.zp, "int32", f"{out.name}.input_zero_point")
        zw = w.zp if not w.tensor.per_channel else 0
        inputs = [xn, self.place(w), zx, self.const(zw, "int32", f"{out.name}.weight_zero_point") if zw else None,
                  self.place(bias) if bias is not None else None]
        return self.node("MatMul", inputs, f"{out.name}.acc", transB=transB, acc_bits=64 if wide else 32)

    def _multipliers(self, x: Value, w: Value, out: TfliteTensor, per_channel_product: bool):
        """QuantizeMultiplier of input_scale * filter_scale / output_scale for every channel.

        Per-channel kernels (PopulateConvolutionQuantizationParams) take the product in
        double; per-tensor FULLY_CONNECTED/BATCH_MATMUL (GetQuantizedConvolutionMultipler)
        multiply the two float32 scales in float32 first.
        """
        sx, so = float(x.tensor.scale[0]), float(out.scale[0])
        pairs = []
        for sw in w.tensor.scale:
            if per_channel_product:
                real = sx * float(sw) / so
            else:
                real = float(np.float32(x.tensor.scale[0]) * np.float32(sw)) / so
            pairs.append(P.quantize_multiplier(real))
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _scale_accumulator(self, acc: str, x: Value, w: Value, out: TfliteTensor, lo: int, hi: int, stem: str) -> str:
        per_channel = w.tensor.per_channel
        q, e = self._multipliers(x, w, out, per_channel_product=per_channel)
        params = dict(multiplier=q, shift=e, input_offset=-x.zp, filter_offset=-(0 if per_channel else w.zp),
                      output_offset=int(out.zero_point[0]), act_min=lo, act_max=hi)
        if self.reference == "litert":
            # LiteRT's reference FC: effective = double(s_in) * double(s_w) / double(s_out).
            eff = [float(x.tensor.scale[0]) * float(sw) / float(out.scale[0]) for sw in w.tensor.scale]
            self.record(effective_scale=eff, **params)
            return self.requant_f64(acc, eff if per_channel else eff[0], out, stem, lo, hi)
        self.record(**params)
        return self.requant(acc, q, e, out, stem, lo, hi, wide=self._wide(x))

    def op_BATCH_MATMUL(self, op):
        a = self.value(op.inputs[0])
        bv = self.value(op.inputs[1])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(a, "the left input")
        self.quantized(bv, "the right input", types=("int8", "int16"))
        if bv.tensor.per_channel:
            raise self.fail("per-channel quantization of BATCH_MATMUL's right input is not supported")
        wide = self._wide(a)
        inputs = [self.place(a), self.place(bv), self.const(a.zp, "int32", f"{out.name}.lhs_zero_point"),
                  self.const(bv.zp, "int32", f"{out.name}.rhs_zero_point"), None]
        acc = self.node("MatMul", inputs, f"{out.name}.acc", transA=bool(op.options.get("adj_x")),
                        transB=bool(op.options.get("adj_y")), acc_bits=64 if wide else 32)
        q, e = self._multipliers(a, bv, out, per_channel_product=False)
        lo, hi = P.TYPE_RANGES[out.type]
        self.record(multiplier=q, shift=e, lhs_offset=-a.zp, rhs_offset=-bv.zp, output_offset=int(out.zero_point[0]))
        self.set_output(op.outputs[0], self.requant(acc, q, e, out, out.name, lo, hi, wide=wide))

    # --- convolutions and pools (NHWC around refsim's NCHW) ----------------------------------

    @staticmethod
    def _padding(padding: int, size: int, k: int, stride: int, dilation: int) -> tuple[int, int, int]:
        """TFLite ComputePaddingHeightWidth for one axis: (out, pad_before, pad_after)."""
        eff = (k - 1) * dilation + 1
        if padding == 0:  # SAME
            out = (size + stride - 1) // stride
        else:  # VALID
            out = (size - eff + stride) // stride
        total = max((out - 1) * stride + eff - size, 0)
        return out, total // 2, total - total // 2

    def _window(self, op, in_shape, kh, kw):
        o = op.options
        sh, sw = int(o.get("stride_h", 1) or 1), int(o.get("stride_w", 1) or 1)
        dh, dw = int(o.get("dilation_h_factor", 1) or 1), int(o.get("dilation_w_factor", 1) or 1)
        padding = int(o.get("padding", 0))
        _, H, W, _ = in_shape
        oh, ph0, ph1 = self._padding(padding, H, kh, sh, dh)
        ow, pw0, pw1 = self._padding(padding, W, kw, sw, dw)
        return dict(strides=[sh, sw], dilations=[dh, dw], pads=[ph0, pw0, ph1, pw1]), (oh, ow)

    def _to_nchw(self, name: str, stem: str) -> str:
        return self.node("Transpose", [name], f"{stem}.nchw", perm=[0, 3, 1, 2])

    def _to_nhwc(self, name: str, stem: str) -> str:
        return self.node("Transpose", [name], stem, perm=[0, 2, 3, 1])

    def _conv(self, op, depthwise: bool):
        x = self.value(op.inputs[0])
        w = self.value(op.inputs[1])
        bias = self.value(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input")
        self.quantized(w, "the filter", types=("int8", "int4"))
        in_shape = self.shape_of(op.inputs[0])
        if len(in_shape) != 4:
            raise self.fail(f"the input must be 4-D NHWC, got shape {list(in_shape)}")
        C = in_shape[3]
        wdata = np.asarray(w.tensor.data, np.int64)
        if depthwise:  # [1, kh, kw, C * multiplier] -> [C * multiplier, 1, kh, kw], group = C
            kh, kw = wdata.shape[1], wdata.shape[2]
            weights = wdata[0].transpose(2, 0, 1)[:, None]
            group = C
        else:  # OHWI -> OIHW
            kh, kw = wdata.shape[1], wdata.shape[2]
            weights = wdata.transpose(0, 3, 1, 2)
            group = C // wdata.shape[3]
            if group != 1:
                raise self.fail("grouped CONV_2D (filter depth below the input depth) is not supported")
        window, _ = self._window(op, in_shape, kh, kw)
        wide = self._wide(x)
        wname = self.const(weights, w.dtype, f"{out.name}.filter_oihw")
        zw = 0 if w.tensor.per_channel else w.zp
        xn = self._to_nchw(self.place(x), out.name)
        inputs = [xn, wname, self.const(x.zp, "int32", f"{out.name}.input_zero_point"),
                  self.const(zw, "int32", f"{out.name}.filter_zero_point") if zw else None,
                  self.place(bias) if bias is not None else None]
        acc = self.node("Conv", inputs, f"{out.name}.acc", group=group, acc_bits=64 if wide else 32, **window)
        acc = self._to_nhwc(acc, f"{out.name}.acc_nhwc")
        q, e = self._multipliers(x, w, out, per_channel_product=True)
        lo, hi = self.act_range(out)
        self.record(multiplier=q, shift=e, input_offset=-x.zp, output_offset=int(out.zero_point[0]), act_min=lo, act_max=hi,
                    stride=window["strides"], dilation=window["dilations"], padding=window["pads"], filter=[kh, kw],
                    weights=wname, weights_perm=[1, 2, 3, 0] if depthwise else [0, 2, 3, 1],
                    depth_multiplier=int(op.options.get("depth_multiplier", 1) or 1) if depthwise else 1)
        self.set_output(op.outputs[0], self.requant(acc, q, e, out, out.name, lo, hi, axis=-1, wide=wide))

    def op_CONV_2D(self, op):
        self._conv(op, depthwise=False)

    def op_DEPTHWISE_CONV_2D(self, op):
        self._conv(op, depthwise=True)

    def op_MAX_POOL_2D(self, op):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input")
        kh, kw = int(op.options["filter_height"]), int(op.options["filter_width"])
        window, _ = self._window(op, self.shape_of(op.inputs[0]), kh, kw)
        window.pop("dilations")
        y = self.node("MaxPool", [self._to_nchw(self.place(x), out.name)], f"{out.name}.nchw_max",
                      kernel_shape=[kh, kw], **window)
        lo, hi = self.act_range(out)
        self.record(stride=window["strides"], padding=window["pads"], filter=[kh, kw], act_min=lo, act_max=hi)
        clamp = (lo, hi) != P.TYPE_RANGES[out.type]
        y = self._to_nhwc(y, f"{out.name}.max" if clamp else out.name)
        if clamp:
            y = self.node("Clip", [y], out.name, lo=lo, hi=hi)
        self.set_output(op.outputs[0], y)

    def op_AVERAGE_POOL_2D(self, op):
        """Sum of the in-bounds values (a depthwise Conv with ones, zero padding), divided by
        their count rounding half away from zero (IntegerDiv), clamped: TFLite's AveragePool."""
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input")
        kh, kw = int(op.options["filter_height"]), int(op.options["filter_width"])
        in_shape = self.shape_of(op.inputs[0])
        window, (oh, ow) = self._window(op, in_shape, kh, kw)
        C = in_shape[3]
        ones = self.const(np.ones((C, 1, kh, kw)), "int8", f"{out.name}.window")
        total = self.node("Conv", [self._to_nchw(self.place(x), out.name), ones], f"{out.name}.sum", group=C, **window)
        # The number of in-bounds positions of each window.
        (sh, sw), (ph, pw) = window["strides"], window["pads"][:2]
        rows = np.array([min(i * sh - ph + kh, in_shape[1]) - max(i * sh - ph, 0) for i in range(oh)])
        cols = np.array([min(j * sw - pw + kw, in_shape[2]) - max(j * sw - pw, 0) for j in range(ow)])
        counts = self.const(np.outer(rows, cols)[None, None], "int32", f"{out.name}.count")
        mean = self.node("IntegerDiv", [total, counts], f"{out.name}.mean", Delta=1, eps=0)
        lo, hi = self.act_range(out)
        self.record(stride=window["strides"], padding=window["pads"], filter=[kh, kw], act_min=lo, act_max=hi)
        mean = self.node("Clip", [mean], f"{out.name}.clamped", lo=lo, hi=hi)
        mean = self.node("Cast", [mean], f"{out.name}.nchw_mean", dtype=out.type)
        self.set_output(op.outputs[0], self._to_nhwc(mean, out.name))

    # --- elementwise ------------------------------------------------------------------------

    def _add_sub(self, op, subtract: bool):
        a, bv = self.value(op.inputs[0]), self.value(op.inputs[1])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(a, "the first input")
        self.quantized(bv, "the second input")
        wide = out.type == "int16"
        left_shift = 15 if wide else 20
        s1, s2, so = float(a.tensor.scale[0]), float(bv.tensor.scale[0]), float(out.scale[0])
        twice_max = 2 * max(s1, s2)
        q1, e1 = P.quantize_multiplier(s1 / twice_max)
        q2, e2 = P.quantize_multiplier(s2 / twice_max)
        qo, eo = P.quantize_multiplier(twice_max / ((1 << left_shift) * so))
        lo, hi = self.act_range(out)
        self.record(left_shift=left_shift, input1_offset=-a.zp, input1_multiplier=q1, input1_shift=e1,
                    input2_offset=-bv.zp, input2_multiplier=q2, input2_shift=e2,
                    output_offset=int(out.zero_point[0]), output_multiplier=qo, output_shift=eo, act_min=lo, act_max=hi)
        scaled = self._rescaled_inputs(out, ((a, q1, e1), (bv, q2, e2)), left_shift)
        raw = self.node("Sub" if subtract else "Add", scaled, f"{out.name}.raw", dtype="int32")
        self.set_output(op.outputs[0], self.requant(raw, qo, eo, out, out.name, lo, hi))

    def _rescaled_inputs(self, out, inputs, left_shift: int) -> list[str]:
        """ADD/SUB/SQUARED_DIFFERENCE's input step: (x - zero_point) << left_shift, then each
        input's own multiplier, onto the common int32 grid."""
        scaled = []
        for (v, q, e), tag in zip(inputs, ("input1", "input2")):
            centered = self.node("Sub", [self.place(v), self.const(v.zp, "int32", f"{out.name}.{tag}_zero_point")],
                                 f"{out.name}.{tag}_centered", dtype="int32")
            shifted = self.node("Mul", [centered, self.const(1 << left_shift, "int32", f"{out.name}.left_shift")],
                                f"{out.name}.{tag}_shifted", dtype="int32")
            scaled.append(self._mbqm_int32(shifted, q, e, f"{out.name}.{tag}_scaled"))
        return scaled

    def _mbqm_int32(self, x: str, q: int, e: int, stem: str) -> str:
        """MultiplyByQuantizedMultiplierSmallerThanOneExp into int32 (no offset, no clamp)."""
        inputs = [x, self.const(q, "int32", f"{stem}.mul"), self.const(31 - e, "int8", f"{stem}.shift")]
        return self.node("Requant", inputs, stem, rounding="double", dtype="int32")

    def op_ADD(self, op):
        self._add_sub(op, subtract=False)

    def op_SUB(self, op):
        self._add_sub(op, subtract=True)

    def op_MUL(self, op):
        a, bv = self.value(op.inputs[0]), self.value(op.inputs[1])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(a, "the first input")
        self.quantized(bv, "the second input")
        q, e = P.quantize_multiplier(float(a.tensor.scale[0]) * float(bv.tensor.scale[0]) / float(out.scale[0]))
        lo, hi = self.act_range(out)
        self.record(input1_offset=-a.zp, input2_offset=-bv.zp, output_offset=int(out.zero_point[0]),
                    multiplier=q, shift=e, act_min=lo, act_max=hi)
        centered = [self.node("Sub", [self.place(v), self.const(v.zp, "int32", f"{out.name}.{tag}_zero_point")],
                              f"{out.name}.{tag}_centered", dtype="int32") for v, tag in ((a, "input1"), (bv, "input2"))]
        product = self.node("Mul", centered, f"{out.name}.product", dtype="int32")
        self.set_output(op.outputs[0], self.requant(product, q, e, out, out.name, lo, hi))

    def op_SQUARED_DIFFERENCE(self, op):
        """int8: both inputs on 2^7 times the finer grid, difference squared, one requantization."""
        a, bv = self.value(op.inputs[0]), self.value(op.inputs[1])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(a, "the first input", types=("int8",))
        self.quantized(bv, "the second input", types=("int8",))
        left_shift = 7
        s1, s2, so = float(a.tensor.scale[0]), float(bv.tensor.scale[0]), float(out.scale[0])
        twice_max = 2 * max(s1, s2)
        q1, e1 = P.quantize_multiplier(s1 / twice_max)
        q2, e2 = P.quantize_multiplier(s2 / twice_max)
        qo, eo = P.quantize_multiplier(twice_max * twice_max / ((1 << (2 * left_shift)) * so))
        self.record(left_shift=left_shift, input1_multiplier=q1, input1_shift=e1, input2_multiplier=q2, input2_shift=e2,
                    output_multiplier=qo, output_shift=eo)
        scaled = self._rescaled_inputs(out, ((a, q1, e1), (bv, q2, e2)), left_shift)
        diff = self.node("Sub", scaled, f"{out.name}.diff", dtype="int32")
        square = self.node("Mul", [diff, diff], f"{out.name}.square", dtype="int32")
        lo, hi = P.TYPE_RANGES[out.type]
        self.set_output(op.outputs[0], self.requant(square, qo, eo, out, out.name, lo, hi))

    # --- functions of one value: tables --------------------------------------------------

    def _lut(self, op, table: np.ndarray) -> None:
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self.record(table=[int(v) for v in table])  # the header writer lists it
        name = self.node("Lut", [self.place(x), self.const(table, out.type, f"{out.name}.table")], out.name)
        self.set_output(op.outputs[0], name)

    def _unary_io(self, op, types=("int8",)):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input", types=types)
        if out.type != x.dtype:
            raise self.fail(f"input {x.dtype} and output {out.type} differ")
        return x, out

    def op_LOGISTIC(self, op):
        x, out = self._unary_io(op, types=("int8", "int16"))
        if x.dtype == "int16":
            if x.zp != 0 or int(out.zero_point[0]) != 0:
                raise self.fail("int16 LOGISTIC needs zero points 0")
            table = P.logistic_int16(x.scale)
        elif self.reference == "litert":
            table = P.float_lut("int8", x.scale, x.zp, float(out.scale[0]), int(out.zero_point[0]), P.sigmoid_f32)
        else:
            if int(out.zero_point[0]) != -128:
                raise self.fail("int8 LOGISTIC needs output zero point -128")
            table = P.logistic_int8_tflm(x.scale, x.zp)
        self._lut(op, table)

    def op_TANH(self, op):
        x, out = self._unary_io(op, types=("int8",))
        if self.reference == "litert":
            table = P.float_lut("int8", x.scale, x.zp, float(out.scale[0]), int(out.zero_point[0]), P.tanh_f32)
        else:
            table = P.tanh_int8_tflm(x.scale, x.zp)
        self._lut(op, table)

    def op_GELU(self, op):
        x, out = self._unary_io(op, types=("int8",))
        transform = P.gelu_approx_f32 if op.options.get("approximate") else P.gelu_f32
        self._lut(op, P.float_lut("int8", x.scale, x.zp, float(out.scale[0]), int(out.zero_point[0]), transform))

    def op_HARD_SWISH(self, op):
        x, out = self._unary_io(op, types=("int8",))
        self._lut(op, P.hard_swish_int8("int8", x.scale, x.zp, float(out.scale[0]), int(out.zero_point[0])))

    def op_RSQRT(self, op):
        x, out = self._unary_io(op, types=("int8",))
        self._lut(op, P.rsqrt_int8(x.scale, x.zp, float(out.scale[0]), int(out.zero_point[0])))

    def op_SOFTMAX(self, op):
        x, out = self._unary_io(op, types=("int8",))
        if int(out.zero_point[0]) != -128 or abs(float(out.scale[0]) * 256 - 1) > 1e-3:
            raise self.fail("int8 SOFTMAX needs output scale 1/256 and zero point -128")
        params = tflite_softmax_params(x.scale, beta=float(op.options.get("beta", 1.0)))
        self.record(**params.attrs)
        self.set_output(op.outputs[0], self.node("TFLiteSoftmax", [self.place(x)], out.name, **params.attrs))

    # --- reductions -------------------------------------------------------------------------

    def _reduce(self, op, mean: bool):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self.quantized(x, "the input")
        rank = len(x.shape)
        axes = sorted({a % rank for a in self.const_ints(op.inputs[1], "the axis")})
        keep = bool(op.options.get("keep_dims"))
        n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
        total = self.node("ReduceSum", [self.place(x)], f"{out.name}.sum", axes=axes, keepdims=keep)
        q, e = P.quantize_multiplier(float(x.tensor.scale[0]) / float(out.scale[0]))
        if mean:  # QuantizedMeanOrSum folds 1/n into the multiplier
            shift = min(n.bit_length() - 1, 32, 31 + e)
            q = (q << shift) // n
            e -= shift
        centered = self.node("Sub", [total, self.const(x.zp * n, "int32", f"{out.name}.zero_points")],
                             f"{out.name}.centered", dtype="int32")
        lo, hi = P.TYPE_RANGES[out.type]
        self.record(multiplier=q, shift=e, count=n, input_offset=-x.zp, output_offset=int(out.zero_point[0]))
        y = self.requant(centered, q, e, out, out.name, lo, hi, wide=False)
        self.set_output(op.outputs[0], y)

    def op_MEAN(self, op):
        self._reduce(op, mean=True)

    def op_SUM(self, op):
        self._reduce(op, mean=False)

    # --- data movement --------------------------------------------------------------------

    def _same_quant(self, src: Value, out: TfliteTensor) -> None:
        if src.tensor.quantized and out.quantized:
            if not (np.array_equal(src.tensor.scale, out.scale) and np.array_equal(src.tensor.zero_point, out.zero_point)):
                raise self.fail("input and output quantization differ; TFLite's kernel copies values unchanged")

    def op_RESHAPE(self, op):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self._same_quant(x, out)
        self.set_output(op.outputs[0], self.node("Reshape", [self.place(x)], out.name, shape=list(self.shape_of(op.outputs[0]))))

    op_SQUEEZE = op_RESHAPE
    op_EXPAND_DIMS = op_RESHAPE

    def op_TRANSPOSE(self, op):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self._same_quant(x, out)
        perm = self.const_ints(op.inputs[1], "the permutation")
        self.set_output(op.outputs[0], self.node("Transpose", [self.place(x)], out.name, perm=perm))

    def op_GATHER(self, op):
        x = self.value(op.inputs[0])
        idx = self.value(op.inputs[1])
        out = self.m.tensors[op.outputs[0]]
        if int(op.options.get("batch_dims", 0) or 0):
            raise self.fail("GATHER with batch_dims is not supported")
        axis = int(op.options.get("axis", 0) or 0)
        self.set_output(op.outputs[0], self.node("Gather", [self.place(x), self.place(idx)], out.name, axis=axis))

    def op_CONCATENATION(self, op):
        out = self.m.tensors[op.outputs[0]]
        xs = [self.value(i) for i in op.inputs]
        for v in xs:
            self._same_quant(v, out)
        axis = int(op.options.get("axis", 0))
        if int(op.options.get("fused_activation_function", 0) or 0):
            raise self.fail("a fused activation on CONCATENATION is not supported")
        self.set_output(op.outputs[0], self.node("Concat", [self.place(v) for v in xs], out.name, axis=axis))

    def op_STRIDED_SLICE(self, op):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self._same_quant(x, out)
        o = op.options
        if int(o.get("ellipsis_mask", 0) or 0) or int(o.get("new_axis_mask", 0) or 0):
            raise self.fail("STRIDED_SLICE with ellipsis_mask or new_axis_mask is not supported")
        begin = self.const_ints(op.inputs[1], "begin")
        end = self.const_ints(op.inputs[2], "end")
        strides = self.const_ints(op.inputs[3], "strides") if len(op.inputs) > 3 else [1] * len(begin)
        big = 1 << 62  # "to the end": Slice clamps it
        starts, ends, steps = [], [], []
        for i, (s, e, step) in enumerate(zip(begin, end, strides)):
            if o.get("offset"):
                e = s + e
            if (int(o.get("begin_mask", 0)) >> i) & 1:
                s = big if step < 0 else 0
            if (int(o.get("end_mask", 0)) >> i) & 1:
                e = -big if step < 0 else big
            if (int(o.get("shrink_axis_mask", 0)) >> i) & 1:  # one element, the axis then dropped by the Reshape
                s = s % x.shape[i] if s < 0 else s
                e, step = s + 1, 1
            starts.append(s)
            ends.append(e)
            steps.append(step)
        y = self.node("Slice", [self.place(x)], f"{out.name}.slice", starts=starts, ends=ends, axes=list(range(len(begin))),
                      steps=steps)
        self.set_output(op.outputs[0], self.node("Reshape", [y], out.name, shape=list(self.shape_of(op.outputs[0]))))

    def op_PAD(self, op):
        x = self.value(op.inputs[0])
        out = self.m.tensors[op.outputs[0]]
        self._same_quant(x, out)
        pads = np.asarray(self.const_ints(op.inputs[1], "the paddings")).reshape(-1, 2)
        value = x.zp
        if len(op.inputs) > 2 and op.inputs[2] >= 0:  # PADV2: a constant pad value, quantized like the input
            value = self.const_ints(op.inputs[2], "the pad value")[0]
        y = self.node("Pad", [self.place(x)], out.name, pads=[int(p) for p in pads[:, 0]] + [int(p) for p in pads[:, 1]],
                      value=int(value))
        self.set_output(op.outputs[0], y)

    op_PADV2 = op_PAD


def import_tflite(source: str | os.PathLike, output: str | os.PathLike | None = None, *, reference: str = "tflm",
                  name: str | None = None) -> Model:
    """Import a quantized .tflite model as a refsim Model (saved to `output` when given)."""
    model = read_tflite(source)
    stem = name or os.path.splitext(os.path.basename(os.fspath(source)))[0]
    graph = TfliteImporter(model, reference, stem).run()
    result = Model(graph)
    if output is not None:
        result.save(output)
    return result
