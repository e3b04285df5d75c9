"""What an ONNX value becomes while a quantized graph is imported, and the emitter.

Every ONNX value name maps to one of:

- `QTensor`: an integer tensor of the refsim graph (or a constant not yet placed in it),
  with the real-valued meaning the ONNX graph gives it, `scale * (q - zero_point)`, when
  it has one. Accumulators of MatMul/Conv are QTensors too: zero point 0 and scale
  a_scale * w_scale, remembered as its float32 factors so onnxruntime's float32 scale
  arithmetic can be replayed exactly.
- `Dequantized(q)`: the float tensor `scale * (q - zero_point)` a DequantizeLinear made.
  It costs nothing: ops that only move values apply to q, and the float ops between a
  DequantizeLinear and a QuantizeLinear are turned into integer ops when the
  QuantizeLinear tells the output's scale.
- `FloatOp`: a float op waiting for the QuantizeLinear that fixes its output scale.
- `Const`: a constant (float or integer) that folds at import time.

The emitter wraps `GraphBuilder` and holds the two requantization choices:
`dyadic` (Requant with an integer multiplier and shift, integer-only hardware arithmetic)
and `ort` (RequantF32, onnxruntime's float32 multiply replayed exactly with integers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from refsim.builder import GraphBuilder
from refsim.dtypes import TYPES, IntType
from refsim.errors import RefsimError

from ..dyadic import ExportError, dyadic
from .onnx_reader import ImportFailure, fail

REQUANT_CHOICES = ("dyadic", "ort")
# What stands for the float ops onnxruntime computes in float32 (Softmax, LayerNormalization,
# QLinearAdd/QLinearMul): refsim's integer variants, or replays of onnxruntime's kernels.
FLOAT_OPS_CHOICES = ("integer", "ort")


@dataclass
class QTensor:
    name: str | None  # refsim tensor name; None for a constant not yet placed
    dtype: IntType
    shape: tuple
    data: np.ndarray | None = None
    scale: np.ndarray | None = None  # float32, scalar or 1-D along `axis`; None: plain integers
    zero_point: np.ndarray | None = None  # int64, the shape of scale
    axis: int | None = None
    factors: tuple[np.ndarray, ...] | None = None  # float32 factors whose product is `scale`
    block_size: int = 0
    clip: tuple[int, int] | None = None  # a range narrower than dtype's (narrow int8, 3-bit in int4)
    rounding: str | None = None  # how values are rounded onto this grid (None: round half to even)

    @property
    def is_const(self) -> bool:
        return self.data is not None

    @property
    def per_tensor(self) -> bool:
        return self.scale is None or (self.scale.size == 1 and self.block_size == 0)

    def zp_scalar(self) -> int:
        return 0 if self.zero_point is None else int(self.zero_point.reshape(-1)[0])

    def real_scale(self) -> np.ndarray:
        """The scale as float64, exactly the float32 values the graph holds."""
        return np.asarray(self.scale, np.float64)


@dataclass
class Dequantized:
    q: QTensor


@dataclass
class FloatOp:
    node: onnx.NodeProto
    inputs: list[Any]  # values (Dequantized, FloatOp, Const, QTensor) or None
    attrs: dict[str, Any]


@dataclass
class Const:
    value: np.ndarray


def narrowest_type(values: np.ndarray) -> IntType:
    values = np.asarray(values)
    if values.size == 0:
        return TYPES["int8"]
    lo, hi = int(values.min()), int(values.max())
    for name in ("int8", "int16", "int32", "int64"):
        if TYPES[name].contains(lo, hi):
            return TYPES[name]
    raise ExportError(f"constant values span [{lo}, {hi}], beyond int64")


def float32_parts(scale) -> tuple[np.ndarray, np.ndarray]:
    """Each float32 value as the exact integer pair (mul, exp): value = mul * 2^exp, mul < 2^24."""
    s = np.asarray(scale, np.float32).astype(np.float64)
    fraction, exponent = np.frexp(s)
    mul = np.round(fraction * (1 << 24)).astype(np.int64)
    exp = exponent.astype(np.int64) - 24
    if not np.array_equal(mul * np.exp2(exp.astype(np.float64)), s):  # pragma: no cover - frexp is exact
        raise ExportError("a float32 scale has no exact (mul, exp) form")
    # Drop trailing zero bits: smaller numbers, same value.
    while mul.size and np.all((mul % 2 == 0) & (mul != 0)):
        mul //= 2
        exp += 1
    return mul, exp


@dataclass
class Emitter:
    name: str
    requant: str = "dyadic"
    rounding: str = "half_even"
    float_ops: str = "integer"
    builder: GraphBuilder = field(init=False)
    # What the tensors emitted nodes declare may add up to (bytes, fully known shapes): a
    # small model's attributes (Pad's pads, Reshape's shape) must not ask a run for gigabytes.
    max_tensor_bytes: int | None = None
    declared_bytes: int = 0

    def __post_init__(self):
        if self.requant not in REQUANT_CHOICES:
            raise ExportError(f"unknown requantization {self.requant!r}; choose from {', '.join(REQUANT_CHOICES)}")
        if self.float_ops not in FLOAT_OPS_CHOICES:
            raise ExportError(f"unknown float ops {self.float_ops!r}; choose from {', '.join(FLOAT_OPS_CHOICES)}")
        self.builder = GraphBuilder(self.name)

    # --- tensors ------------------------------------------------------------------------

    def fresh(self, stem: str) -> str:
        stem = stem or "t"
        if stem not in self.builder.tensors and all(n.name != stem for n in self.builder.nodes):
            return stem
        return self.builder._fresh(stem)

    def tensor(self, q: QTensor) -> str:
        """The refsim tensor name of q, placing a constant in the graph on first use."""
        if q.name is None:
            q.name = self.builder.const(q.data, q.dtype.name, name=self.fresh("const"))
        elif q.name not in self.builder.tensors and q.data is not None:
            self.builder.const(q.data, q.dtype.name, name=q.name)
        return q.name

    def const(self, values, dtype: str | IntType | None = None, stem: str = "const") -> str:
        values = np.asarray(values)
        t = narrowest_type(values) if dtype is None else (dtype if isinstance(dtype, IntType) else TYPES[dtype])
        return self.builder.const(values.astype(t.storage), t.name, name=self.fresh(stem))

    def node(self, op: str, inputs, out: str, node_name: str | None = None, **attrs) -> QTensor:
        """Append a refsim node with one output named (close to) `out`; returns it as a QTensor."""
        name = self.fresh(out)
        try:
            self.builder.node(op, [i if i else None for i in inputs], outputs=[name],
                              name=self.fresh(node_name or name), **attrs)
        except RefsimError as e:
            raise ExportError(f"{op} for {out!r}: {e}") from None
        t = self.builder.tensors[name]
        if self.max_tensor_bytes is not None and all(isinstance(d, int) for d in t.shape):
            self.declared_bytes += math.prod(t.shape) * t.dtype.storage.itemsize
            if self.declared_bytes > self.max_tensor_bytes:
                raise ExportError(f"{op} for {out!r}: its result {t.dtype}{list(t.shape)} takes the tensors a run "
                                  f"computes to {self.declared_bytes} bytes, beyond what this model may allocate "
                                  f"({self.max_tensor_bytes})")
        return QTensor(name, t.dtype, tuple(t.shape))

    # --- requantization -----------------------------------------------------------------

    def requantize(self, src: QTensor, ratio: np.ndarray, target: QTensor, out: str, onnx_node=None,
                   ort_ratio: np.ndarray | None = None, axis: int | None = None, value_bits: int | None = None) -> QTensor:
        """y = clip(round(ratio * (src - src.zero_point)) + target.zero_point) in target's type.

        `ratio` is the exact real multiplier (float64, scalar or per channel along `axis`).
        With requant='ort', `ort_ratio` is the float32 multiplier onnxruntime computes (its
        operation order); without one, float32(ratio) is used. `value_bits` bounds |src|
        when it is known to be narrower than its type (a wider multiplier then fits).
        """
        ratio = np.asarray(ratio, np.float64)
        zp_out = int(target.zp_scalar())
        x = self.tensor(src)
        src_zp = src.zero_point
        per_channel = ratio.size > 1
        if per_channel and axis is None:
            raise fail(onnx_node, "a per-channel requantization needs an axis")
        if src_zp is not None and np.asarray(src_zp).size > 1 and np.unique(np.asarray(src_zp)).size == 1:
            src_zp = np.asarray(src_zp).reshape(-1)[:1]
        if src_zp is not None and np.asarray(src_zp).size > 1:
            raise fail(onnx_node, "per-channel zero points on a tensor that is requantized are not supported")
        zp_in = 0 if src_zp is None else int(np.asarray(src_zp).reshape(-1)[0])
        offset = self.const(np.asarray(zp_out), stem=f"{out}.zero_point")
        kind_axis = -1 if axis is None else axis
        bounds = {"lo": target.clip[0], "hi": target.clip[1]} if target.clip else {}
        rounding = target.rounding or self.rounding
        if self.requant == "ort" and rounding == "half_even":
            f32 = np.asarray(ort_ratio if ort_ratio is not None else ratio, np.float32)
            if np.any(f32 < 0) or not np.all(np.isfinite(f32)):
                raise fail(onnx_node, "scales must be positive and finite")
            mul, exp = float32_parts(f32)
            if zp_in:
                x = self.node("Sub", [x, self.const(np.asarray(zp_in), stem=f"{out}.input_zero_point")], f"{out}.centered").name
            return self._finish(self.node("RequantF32", [x, self.const(mul, "int32", f"{out}.mul"),
                                                         self.const(exp, "int16", f"{out}.exp"), offset],
                                          out, axis=kind_axis, dtype=target.dtype.name, **bounds), target)
        sign = np.where(ratio < 0, -1, 1)
        src_bits = (value_bits or src.dtype.bits) + (1 if zp_in else 0)
        mul_bits = max(8, min(31, 61 - src_bits))
        try:
            d = dyadic(np.abs(ratio), mul_bits=mul_bits, what=f"{onnx_node.name if onnx_node is not None else out}: scale ratio")
        except ExportError as e:
            raise ImportFailure(str(e)) from None
        mul = d.mul * sign
        bias = -mul * zp_in if zp_in else None
        inputs = [x, self.const(mul, stem=f"{out}.mul"), self.const(d.shift, stem=f"{out}.shift"),
                  self.const(bias, stem=f"{out}.bias") if bias is not None else None, offset]
        return self._finish(self.node("Requant", inputs, out, axis=kind_axis, rounding=rounding,
                                      dtype=target.dtype.name, **bounds), target)

    @staticmethod
    def _finish(q: QTensor, target: QTensor) -> QTensor:
        return replace(q, scale=target.scale, zero_point=target.zero_point, axis=target.axis, factors=None,
                       clip=target.clip, rounding=target.rounding)


def ratio_of(src: QTensor, target: QTensor) -> tuple[np.ndarray, np.ndarray]:
    """(exact ratio, onnxruntime's float32 ratio) of src's scale to target's."""
    t = np.float32(target.scale.reshape(-1)[0])
    exact = src.real_scale() / float(t)
    if src.factors is not None:
        a, b = (np.asarray(f, np.float32) for f in src.factors)
        with np.errstate(all="ignore"):
            ort = (a * b) / t  # float32 throughout, in onnxruntime's order
    else:
        with np.errstate(all="ignore"):
            ort = np.asarray(src.scale, np.float32) / t
    return exact, np.asarray(ort, np.float32)
