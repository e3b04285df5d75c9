"""What an ONNX value becomes while a quantized graph is imported.

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
- `FloatOp`: a float op waiting for the QuantizeLinear that fixes its output scale;
  `Moved`, a float result moved by Reshape/Transpose/... before that QuantizeLinear.
- `Const`: a constant (float or integer) that folds at import time.
- `RuntimeScale`, `Rescaled`: onnxruntime quantize_dynamic's values, a DynamicQuantizeLinear
  scale known only at run time (refsim tensors holding its float32 (m, e) pair) and an
  integer accumulator rescaled by it in float32 (`dynamic.py`).
- `KeyMask(keep)`, `MaskedScores(q, keep)`: an additive key-padding mask (0 for kept keys,
  -inf for masked ones) and attention scores with it added, which quantize_static quantizes
  at an infinite scale; a Softmax reads them as scores with masked keys left out.

Integer nodes are emitted with the front end's emitter and requantization planner
(`exporters.frontend.emitter`, `exporters.frontend.requant`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from refsim.dtypes import IntType

from ..frontend.graph import Node

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
    bound: int | None = None  # |q - zero_point| <= bound when that is below what dtype allows
    # the real values' L2 norm over the last axis is at most this (quantize_dynamic's fine grids)
    row_norm: float | None = None

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
    node: Node
    inputs: list[Any]  # values (Dequantized, FloatOp, Const, QTensor) or None
    attrs: dict[str, Any]


@dataclass
class Moved(FloatOp):
    """A float result moved by Reshape/Transpose/Slice/Gather (`node`, on `inputs[0]`) before
    any quantizer: QuantizeLinear at one scale commutes with moving values, so the movement
    is applied to the integers (`apply`) once the quantizer after it fixes their grid.
    `const_fn` moves a concrete array; `shape` is the moved shape."""

    apply: Any = None
    const_fn: Any = None
    shape: tuple = ()


@dataclass
class Const:
    value: np.ndarray


@dataclass
class KeyMask:
    """Where(keep, 0, -inf): `keep` (0/1 integers) is nonzero for the keys a softmax keeps."""

    keep: QTensor
    node: Node


@dataclass
class MaskedScores:
    """Scores `q` (dequantized) plus a KeyMask: only a Softmax over the keys takes them."""

    q: QTensor
    keep: QTensor
    node: Node


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


@dataclass
class RuntimeScale:
    """A float32 scale computed at run time (DynamicQuantizeLinear's): refsim tensors `m`, `e`
    with value m * 2^e, at most `largest`; `factor`, a float32 constant it was multiplied by
    (onnxruntime's f32(scale * factor), replayed by RescaleF32)."""

    m: str
    e: str
    largest: float
    node: Node
    factor: np.ndarray | None = None
    row_norm: float | None = None  # the quantized tensor's rows (last axis): L2 norm of the real values at most this
    terms: int = 0  # their length


@dataclass
class Rescaled:
    """f32(f32(acc) * scale) (+ a float32 bias): a MatMulInteger accumulator as quantize_dynamic
    rescales it (Cast, Mul, Add), waiting for its consumer to put it on a fixed grid."""

    acc: QTensor
    scale: RuntimeScale
    column_bound: np.ndarray  # max |acc| per output column
    node: Node
    bias: np.ndarray | None = None
