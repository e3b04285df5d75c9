"""quantlib/Deeploy integer graphs: integer values stored in float tensors.

quantlib exports its integerized networks as ONNX whose tensors are float but hold
integers, with custom ops (default domain or `PACTOps`) that refsim implements under the
same names and attribute names: RequantShift, ITAMax, ITAPartialMax, iSoftmax, iGELU,
RequantizediGELU, iLayerNorm, iNoNorm, IntegerDiv, IntegerMean (Deeploy's ReduceMean). The
standard ops between them (MatMul, Gemm, Conv, Add, Mul, Transpose, Reshape, Gather,
MaxPool, Pad, ...) compute on those integers exactly. Attribute spellings that differ
between quantlib versions and Deeploy's parsers are mapped (`n_levels_out` -> `n_levels`;
tensor-valued attributes -> numbers).

Float graph inputs hold integers too; their integer type is int8 unless `input_types` says
otherwise (quantlib's activations are signed 8-bit by default).
"""

from __future__ import annotations

import math

import numpy as np
from refsim.dtypes import TYPES

from ..frontend.checks import OpSpec
from ..frontend.emitter import narrowest_type
from .base import FloatInput, Importer, fail
from .values import Const, QTensor

DOMAINS = ("", "PACTOps", "pact", "ai.onnx.contrib")  # ai.onnx.contrib: onnxruntime-extensions' custom-op domain, which Deeploy's test networks use


def _spec(inputs, *names, required=()):
    return OpSpec(inputs=inputs, attrs={n: "integer" for n in names}, required=required)


LEVELS = ("n_levels", "n_levels_out")
SPECS = {(domain, op): spec for domain in DOMAINS for op, spec in {
    "RequantShift": _spec((3,), "div", "signed", *LEVELS, required=(("div",), LEVELS)),
    "ITAMax": _spec((1, 2), "n_levels", "k", "numerator", "output_offset"),
    "ITAPartialMax": _spec((1, 2), "group_width", "groups", "n_levels", "k", "numerator", "max_init", "output_offset", "acc_bits"),
    "iSoftmax": _spec((1, 2), "coeffA", "coeffB", "coeffC", "log2", *LEVELS, required=(("coeffA",), ("coeffB",), ("coeffC",), ("log2",))),
    "iGELU": _spec((1,), "b", "one", required=(("b",), ("one",))),
    "RequantizediGELU": _spec((4,), "b", "one", "div", "signed", *LEVELS, required=(("b",), ("one",))),
    "iLayerNorm": _spec((3,), "D", *LEVELS, required=(("D",),)),
    "iNoNorm": _spec((3,), "D", "mul", *LEVELS, required=(("D",), ("mul",))),
    "IntegerDiv": _spec((2,), "Delta", "eps", "eta", required=(("Delta",), ("eps",))),
    "IntegerMean": _spec((1, 2), "keepdims"),
}.items()}


class DeeployImporter(Importer):
    format_name = "deeploy"
    specs = SPECS

    def __init__(self, graph, emitter, input_types: dict[str, str] | None = None, requant: str = "dyadic"):
        super().__init__(graph, emitter, requant)
        self.input_types = dict(input_types or {})
        for domain in DOMAINS:
            for op in ("RequantShift", "ITAMax", "ITAPartialMax", "iSoftmax", "iGELU", "RequantizediGELU",
                       "iLayerNorm", "iNoNorm", "IntegerDiv", "IntegerMean"):
                self.handlers[(domain, op)] = getattr(self, f"op_{op}")
        for op in ("MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Relu", "ReduceMean", "ReduceSum"):
            self.handlers[("", op)] = getattr(self, f"op_{op}")

    def foldable(self, domain: str, op_type: str) -> bool:
        return domain == ""

    # --- values ----------------------------------------------------------------------------

    def tensor(self, node, value, what: str) -> str:
        """The refsim tensor for an integer operand (float inputs and constants hold integers)."""
        if isinstance(value, FloatInput) and value.quantized is not None:
            return value.quantized.name
        if isinstance(value, FloatInput):
            info = value.info
            dtype = self.input_types.get(info.name, "int8")
            if dtype not in TYPES:
                raise fail(node, f"unknown input type {dtype!r} for {info.name!r}")
            q = QTensor(self.em.builder.input(info.name, dtype, info.shape), TYPES[dtype], tuple(info.shape))
            self.values[info.name] = q
            self.input_quantization[info.name] = {"dtype": dtype, "onnx_dtype": "float32", "integers": True}
            value.quantized = q
            return q.name
        if isinstance(value, QTensor):
            return self.place(value)
        if isinstance(value, Const):
            array = np.asarray(value.value)
            if array.dtype.kind == "f":
                if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                    raise fail(node, f"{what} holds values that are not integers")
                array = array.astype(np.int64)
            return self.em.const(array, narrowest_type(array), stem=f"{node.outputs[0]}.{what}")
        raise fail(node, f"{what} is not an integer tensor")

    def ints_of(self, node, value, what: str) -> np.ndarray:
        array = np.asarray(self.const_value(node, value, what))
        if array.dtype.kind == "f" and np.any(array != np.round(array)):
            raise fail(node, f"{what} holds values that are not integers")
        return array.astype(np.int64)

    def op(self, node, op: str, inputs: list, **attrs):
        names = [self.tensor(node, v, f"input{i}") if v is not None else None for i, v in enumerate(inputs)]
        return self.qnode(op, names, node.outputs[0], node.name, **attrs)

    @staticmethod
    def number(value):
        """Attributes may be tensors (onnx-graphsurgeon writes them so): one number each."""
        array = np.asarray(value)
        if array.size != 1:
            return value
        v = array.reshape(-1)[0].item()
        return int(v) if float(v) == int(v) else v

    def attr(self, node, attrs, *names, default=None, required=True):
        for name in names:
            if name in attrs:
                value = self.number(attrs[name])
                if isinstance(value, float):
                    raise fail(node, f"attribute {name!r} = {value} is not an integer")
                return value
        if required and default is None:
            raise fail(node, f"attribute {names[0]!r} is missing")
        return default

    # --- quantlib/Deeploy ops -----------------------------------------------------------------

    def op_RequantShift(self, node, ins, attrs):
        div = self.attr(node, attrs, "div")
        n_levels = self.attr(node, attrs, "n_levels", "n_levels_out")
        signed = bool(self.attr(node, attrs, "signed", default=1))
        return self.op(node, "RequantShift", ins[:3], div=div, n_levels=n_levels, signed=signed)

    def _softmax_attrs(self, node, attrs, names):
        out = {}
        for name in names:
            if name in attrs:
                out[name] = self.number(attrs[name])
        return out

    def op_ITAMax(self, node, ins, attrs):
        extra = self._softmax_attrs(node, attrs, ("n_levels", "k", "numerator", "output_offset"))
        return self.op(node, "ITAMax", ins[:2], **extra)

    def op_ITAPartialMax(self, node, ins, attrs):
        extra = self._softmax_attrs(node, attrs, ("group_width", "groups", "n_levels", "k", "numerator", "max_init",
                                                  "output_offset", "acc_bits"))
        return self.op(node, "ITAPartialMax", ins[:2], **extra)

    def op_iSoftmax(self, node, ins, attrs):
        extra = {n: self.attr(node, attrs, n) for n in ("coeffA", "coeffB", "coeffC", "log2")}
        extra["n_levels"] = self.attr(node, attrs, "n_levels", "n_levels_out", default=256)
        return self.op(node, "iSoftmax", ins[:2], **extra)

    def op_iGELU(self, node, ins, attrs):
        return self.op(node, "iGELU", ins[:1], b=self.attr(node, attrs, "b"), one=self.attr(node, attrs, "one"))

    def op_RequantizediGELU(self, node, ins, attrs):
        extra = {"b": self.attr(node, attrs, "b"), "one": self.attr(node, attrs, "one"),
                 "n_levels": self.attr(node, attrs, "n_levels", "n_levels_out", default=256),
                 "signed": bool(self.attr(node, attrs, "signed", default=1))}
        if "div" in attrs:
            extra["div"] = self.attr(node, attrs, "div")
        return self.op(node, "RequantizediGELU", ins[:4], **extra)

    def op_iLayerNorm(self, node, ins, attrs):
        return self.op(node, "iLayerNorm", ins[:3], D=self.attr(node, attrs, "D"),
                       n_levels=self.attr(node, attrs, "n_levels", "n_levels_out", default=256))

    def op_iNoNorm(self, node, ins, attrs):
        return self.op(node, "iNoNorm", ins[:3], D=self.attr(node, attrs, "D"), mul=self.attr(node, attrs, "mul"),
                       n_levels=self.attr(node, attrs, "n_levels", "n_levels_out", default=256))

    def op_IntegerDiv(self, node, ins, attrs):
        return self.op(node, "IntegerDiv", ins[:2], Delta=self.attr(node, attrs, "Delta"),
                       eps=self.attr(node, attrs, "eps"), eta=self.attr(node, attrs, "eta", default=1))

    def _mean(self, node, ins, attrs):
        x = ins[0]
        shape = self._shape_of(node, x) if not isinstance(x, (Const, FloatInput)) else (
            x.info.shape if isinstance(x, FloatInput) else np.shape(x.value))
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in self.ints_of(node, ins[1], "axes").reshape(-1)]
        axes = list(range(len(shape))) if axes is None else [int(a) % len(shape) for a in np.atleast_1d(axes)]
        keepdims = bool(attrs.get("keepdims", 1))
        count = math.prod(shape[a] for a in axes)
        # Deeploy's kernel: (sum + sgn*(n >> 1)) / n in C, except a power-of-two n without
        # keepdims, which it shifts: (sum + 2^(s-1)) >> s.
        power_of_two = isinstance(count, int) and count > 0 and count & (count - 1) == 0
        rounding = "half_up" if (power_of_two and not keepdims) else "half_away"
        return self.op(node, "ReduceMean", [x], axes=axes, keepdims=keepdims, rounding=rounding)

    op_IntegerMean = _mean
    op_ReduceMean = _mean

    def op_ReduceSum(self, node, ins, attrs):
        axes = attrs.get("axes")
        if axes is None and len(ins) > 1 and ins[1] is not None:
            axes = [int(a) for a in self.ints_of(node, ins[1], "axes").reshape(-1)]
        return self.op(node, "ReduceSum", [ins[0]], axes=None if axes is None else list(axes),
                       keepdims=bool(attrs.get("keepdims", 1)))

    # --- standard ops on integers ------------------------------------------------------------

    def op_MatMul(self, node, ins, attrs):
        return self.op(node, "MatMul", ins[:2])

    def op_Gemm(self, node, ins, attrs):
        """alpha * A @ B + beta * C. Deeploy's Gemm kernels take integer alpha and beta (its
        templates assert that a float alpha/beta is integer-valued) and compute in int32."""
        c = ins[2] if len(ins) > 2 else None
        alpha, beta = (self._integer_attr(node, attrs, name) for name in ("alpha", "beta"))
        trans = {"transA": bool(attrs.get("transA", 0)), "transB": bool(attrs.get("transB", 0))}
        if alpha == 1 and c is not None and beta == 1 and isinstance(c, Const) and np.asarray(c.value).ndim <= 1:
            return self.op(node, "MatMul", [ins[0], ins[1], None, None, c], **trans)
        product = [self.tensor(node, v, f"input{i}") for i, v in enumerate(ins[:2])]
        # the graph output keeps the ONNX name: the product gets its own when more follows
        acc = self.qnode("MatMul", product, node.outputs[0] + (".product" if alpha != 1 or c is not None else ""), node.name, **trans)
        if alpha != 1:
            acc = self.qnode("Mul", [acc.name, self.em.const(np.asarray(alpha), stem=f"{node.outputs[0]}.alpha")],
                             node.outputs[0] + ".scaled", node.name + ".alpha", dtype="int32")
        if c is None or beta == 0:
            return acc
        c_name = self.tensor(node, c, "C")
        if beta != 1:
            c_name = self.qnode("Mul", [c_name, self.em.const(np.asarray(beta), stem=f"{node.outputs[0]}.beta")],
                                node.outputs[0] + ".C_scaled", node.name + ".beta", dtype="int32").name
        return self.qnode("Add", [acc.name, c_name], node.outputs[0] + ".biased", node.name + ".bias", dtype="int32")

    def _integer_attr(self, node, attrs, name: str) -> int:
        value = float(np.asarray(attrs.get(name, 1.0)).reshape(-1)[0])
        if not value.is_integer():
            raise fail(node, f"{name} = {value:g} is not an integer; Deeploy's integer Gemm takes integer alpha and beta")
        return int(value)

    def op_Conv(self, node, ins, attrs):
        w = ins[1]
        if not isinstance(w, Const):
            raise fail(node, "the weights must be constant")
        kernel = list(attrs.get("kernel_shape", np.shape(w.value)[2:]))
        shape = self._shape_of(node, ins[0]) if isinstance(ins[0], QTensor) else ins[0].info.shape
        params = self.window_params(node, attrs, shape, kernel)
        bias = ins[2] if len(ins) > 2 else None
        return self.op(node, "Conv", [ins[0], w, None, None, bias], **params)

    def _arith(self, node, ins, op):
        """Exact; a result whose type would pass 32 bits is declared int32, as Deeploy's kernels
        compute, and any value that does not fit stops the run (overflow policy `error`)."""
        names = [self.tensor(node, v, f"input{i}") for i, v in enumerate(ins[:2])]
        bits = [self.em.builder.tensors[n].dtype.bits for n in names]
        wide = sum(bits) > 32 if op == "Mul" else max(bits) + 1 > 32
        return self.qnode(op, names, node.outputs[0], node.name, **({"dtype": "int32"} if wide else {}))

    def op_Add(self, node, ins, attrs):
        return self._arith(node, ins, "Add")

    def op_Sub(self, node, ins, attrs):
        return self._arith(node, ins, "Sub")

    def op_Mul(self, node, ins, attrs):
        return self._arith(node, ins, "Mul")

    def op_Relu(self, node, ins, attrs):
        return self.op(node, "Relu", ins[:1])

    def _unwrap(self, node, value):
        if isinstance(value, FloatInput):
            self.tensor(node, value, "input")
            return value.quantized, False
        return super()._unwrap(node, value)
