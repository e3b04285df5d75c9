"""What each export mode computes for accumulators, GELU, softmax and LayerNorm.

- `ibert`: 32-bit accumulators (64 for kept-float layers), int32 requantization multipliers,
  I-BERT's integer softmax, GELU and LayerNorm.
- `ita`: what the ITA accelerator computes: 26-bit accumulators, 24-bit biases, every
  matrix product followed by ITA's requantizer (8-bit unsigned multiplier, shift, int8
  add, half-up rounding, int8 result), ITAMax softmax, PyITA's i-GELU.
- `ita-partial`: as `ita` with the streaming ITAPartialMax softmax.

Elementwise functions of one 8-bit (or 16-bit) input, such as tanh, are lookup tables,
exact by construction.
"""

from __future__ import annotations

import math

import numpy as np

from .dyadic import ExportError
from .onnx_graph import Node

ITA_ACC_BITS = 26
ITA_BIAS_BITS = 24

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu_float(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    x = np.asarray(x, np.float64)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


class Modes:
    def __init__(self, options):
        self.options = options
        self.mode = options.mode

    # --- accumulators --------------------------------------------------------------------------

    def accumulator_bits(self, walker, layer: str, worst: int, settings) -> int:
        """Accumulator width of a matrix product whose |sum| can reach `worst`."""
        if self.options.ita and not (settings is not None and settings.keep_float):
            return ITA_ACC_BITS
        return 32 if worst < (1 << 31) else 64

    def bias_bits(self, acc_bits: int) -> int:
        return ITA_BIAS_BITS if acc_bits == ITA_ACC_BITS else acc_bits

    # --- elementwise functions ---------------------------------------------------------------------

    def activation_input_bits(self, walker, node: Node) -> int:
        return self.options.activation_bits(walker.layer_name(node), 8)

    def gelu(self, walker, node: Node) -> None:
        approximate = node.attrs.get("approximate", "none")
        walker.lookup_table(node, lambda x: gelu_float(x, approximate))

    def softmax(self, walker, node: Node, scores: str, mask: str | None) -> None:
        raise ExportError(f"{walker.layer_name(node)}: the integer softmax ops are not available in this build")

    def layernorm(self, walker, node: Node) -> None:
        raise ExportError(f"{walker.layer_name(node)}: the integer LayerNorm ops are not available in this build")
