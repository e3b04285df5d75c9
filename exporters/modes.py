"""What each export mode computes for accumulators, softmax, GELU, LayerNorm and NoNorm.

The integer ops and the functions deriving their constants from a float input scale live
in `refsim.ops` and `refsim.exporters.nonlinear`; this module only decides which variant a
mode uses and wires it into the graph.

| | `ibert` | `ita`, `ita-partial` |
|---|---|---|
| matrix products | 32-bit accumulators (64 where the operands' worst sum needs it: 16-bit weights or inputs; overflow is an error), int32 multipliers | 26-bit accumulators saturating as PyITA's, 24-bit biases, then ITA's requantizer at once (8-bit unsigned multiplier, shift, int8 add, half up, int8); a layer with 16-bit weights or inputs runs beside ITA as in `ibert` |
| softmax | IBertSoftmax on the scores requantized to int16, output 2^-15 steps (uint16) | ITAMax / ITAPartialMax (ITA RTL preset: k=0, 255*256, -128) on int8 scores at the op's input scale, folded into the QK requantization |
| GELU | LutInterp16 (LiteRT's interpolated int16 table of the float GELU) on the input requantized to int16, int16 out; `gelu="ibert"`: IBertGelu | a feed-forward layer's (first linear layer on ITA): ITAGelu (PyITA i-GELU) on int8 with ITA's activation requantizer to int8; any other GELU (a pooler's) runs beside ITA: LutInterp16 as in `ibert` |
| LayerNorm | IBertLayerNorm (shift from the calibrated row variance) on the input times 2^p (p fraction bits for its rounded row mean, `nonlinear.ibert_layernorm_upshift`), then per-channel requantization applying gamma | iLayerNorm (quantlib/Deeploy) with a 16-bit output |
| NoNorm | NoNorm (gamma at 16 bits, exact int64) | the same |
| tanh, kept-float GELU | lookup table on the 8-bit (16-bit) input, exact | the same |

Residual sums, LayerNorm inputs and concatenations are 16-bit in every mode (see
`ExportOptions.residual_bits`); they are not ITA's to compute.
"""

from __future__ import annotations

import math

import numpy as np

from . import nonlinear
from .calibrate import TensorStats, qmax
from .frontend.graph import Node

ITA_ACC_BITS = 26
ITA_BIAS_BITS = 24
ITA_SOFTMAX_PRESET = "ita_rtl"
# PyITA's i-GELU squares q + q_b in int16 and holds q_c in int16: exact only from 0.0147 up
# (exporters.nonlinear.pyita_gelu_params refuses finer scales). From 1.769*sqrt(2)/127.5 up,
# q_b >= -127, and PyITA (which clips the input to -127 first) and ITA's ita_gelu.sv (which
# does not) agree on every int8 input (docs/ITA.md): the exporter uses no finer scale.
ITA_GELU_MIN_SCALE = 0.01963
# The narrowest range a column of an ITA layer's output is scaled to, relative to its widest
# (Modes.ita_output_channels): a column 2^7 times narrower keeps about one bit.
ITA_CHANNEL_FLOOR = 2.0 ** -7
IBERT_SOFTMAX_INPUT_BITS = 16
IBERT_GELU_INPUT_BITS = 16
# I-BERT's output_bit. Its outputs are floored: at 8 bits a row's probabilities summed to
# about 0.98 on MiniLM (sequence 32); 15 keeps them in uint16 for the attention product.
IBERT_SOFTMAX_OUTPUT_BITS = 15
# z = (r + b)(r) + c is about 5.1 / S^2 at most and exp_mul below 2^31: S >= sqrt(8 / 2^32)
# keeps z * exp_mul inside int64.
IBERT_SOFTMAX_MIN_SCALE = math.sqrt(8 / 2**32)

class Modes:
    def __init__(self, options):
        self.options = options
        self.mode = options.mode

    # --- accumulators --------------------------------------------------------------------------

    def on_ita(self, settings) -> bool:
        """Whether a matrix product runs on ITA (`settings`: a linear layer's, None for a
        product of two activations). ITA multiplies 8-bit operands at most; a layer with
        wider weights or inputs (16 bits, keep_float) runs beside it, with an accumulator
        sized for its operands and an ordinary requantization."""
        if not self.options.ita:
            return False
        abits = self.options.abits if settings is None else settings.abits
        wbits = "8" if settings is None else settings.wbits
        return abits <= 8 and (wbits == "ternary" or int(wbits) <= 8)

    def accumulator_bits(self, walker, layer: str, worst: int, settings) -> int:
        """Accumulator width of a matrix product whose |sum| can reach `worst`."""
        if self.on_ita(settings):
            return ITA_ACC_BITS
        return 32 if worst < (1 << 31) else 64

    def overflow(self, acc_bits: int) -> str:
        """ITA's 26-bit accumulators saturate, as PyITA (the golden model) does; elsewhere an
        accumulator that overflows is an error."""
        return "saturate" if acc_bits == ITA_ACC_BITS else "error"

    def bias_bits(self, acc_bits: int) -> int:
        return ITA_BIAS_BITS if acc_bits == ITA_ACC_BITS else acc_bits

    # --- softmax -----------------------------------------------------------------------------------

    def softmax_params(self):
        """The ITA softmax's parameters (its input scale is fixed by its shifts)."""
        return nonlinear.ita_softmax_params(streaming=self.mode == "ita-partial", preset=ITA_SOFTMAX_PRESET)

    def softmax_input_scale(self) -> float | None:
        """The scale an ITA softmax needs on its int8 input (None: calibrated)."""
        return self.softmax_params().input_scale if self.options.ita else None

    def on_ita_gelu(self, walker, node: Node) -> bool:
        """Whether ITA's activation unit computes this GELU. ITA has a GELU only between the
        two layers of its feed-forward layer (docs/ITA.md: F1, act, F2), so a GELU is ITA's
        when it is a feed-forward layer's activation whose first linear layer runs on ITA
        (`Walker.ita_activations`), in block form or layer by layer. Any other GELU, such as
        DeBERTa's pooler GELU on the class token right before the classifier, is no step of
        ITA's: it runs beside ITA with the table GELU of `ibert` mode (LutInterp16, about two
        int16 steps from the exact GELU). ITAGelu there (I-BERT's erf polynomial, 23-24 dB
        from the exact GELU) cost DeBERTa-v2 its integer vs fake-quant cosine (0.993), at a
        point no ITA datapath constrains."""
        return (self.options.ita and node.op == "Gelu" and node.name in walker.ita_activations
                and not walker.options.layers.matching(walker.layer_name(node)).get("keep_float"))

    def ita_gelu_input_scale(self, walker, tensor: str) -> float:
        """The calibrated 8-bit scale, coarsened to what PyITA's i-GELU can take."""
        return max(walker.scale_of(tensor, 8), ITA_GELU_MIN_SCALE)

    def ita_output_channels(self, walker, x_tensor: str, out_tensor: str, w: np.ndarray, b: np.ndarray | None):
        """Per-column factors c (or None) for an ITA linear layer whose int8 result only
        feeds residual Adds, and the per-tensor scale of the scaled result.

        ITA's requantizer has one multiplier per layer, so its int8 output has one scale,
        and a transformer's feed-forward output has a few columns (the residual stream's
        outlier dimensions) hundreds of times wider than the rest: at one 8-bit scale the
        others round to zero. Dividing weight column j and bias j by c_j (folded into the
        constants, ITA's formats unchanged) gives every column about the same range; the
        residual Add, computed beside ITA at 16 bits with a multiplier per term, multiplies
        column j back by c_j (the int8 tensor's scale is s * c, per channel). c_j is the
        column's largest |y| over the calibration sample relative to the widest column,
        floored at ITA_CHANNEL_FLOOR; s is the calibration method's clip of y / c."""
        if not self.options.ita_channel_scales:
            return None, None
        users = walker.users.get(out_tensor, [])
        stats = walker.calibration.inputs.get(x_tensor)
        if (not users or out_tensor in walker.g.outputs or any(u.op != "Add" for u in users)
                or stats is None or not stats.rows):
            return None, None
        y = stats.rows_sample @ w + (0.0 if b is None else b)
        absmax = np.abs(y).max(axis=0)
        if absmax.max(initial=0.0) == 0.0:
            return None, None
        c = np.maximum(absmax / absmax.max(), ITA_CHANNEL_FLOOR)
        t = TensorStats()
        scaled = y / c
        t.observe_range(scaled)
        t.observe_histogram(scaled)
        method = self.options.calib_method
        clip = t.clip(8, "mse" if method == "auto" else method, self.options.percentile)
        return c, clip / qmax(8)

    def ita_output_scale(self, walker, tensor: str) -> float:
        """The int8 scale ITA's requantizer gives a matrix product's result: the one its
        consumer needs (softmax, GELU) or the calibrated one."""
        factor = walker.softmax_factor(tensor)
        if factor is not None:
            return self.softmax_input_scale() / factor
        users = walker.users.get(tensor, [])
        if len(users) == 1 and self.on_ita_gelu(walker, users[0]):
            return self.ita_gelu_input_scale(walker, tensor)
        return walker.scale_of(tensor, 8)

    def softmax(self, walker, node: Node, scores: str, mask: str | None) -> None:
        layer = walker.layer_name(node)
        if self.options.ita:
            p = self.softmax_params()
            x = walker.at_scale(scores, p.input_scale, 8, node, 0)
        else:
            # I-BERT's exp polynomial grows as 1/S^2: below IBERT_SOFTMAX_MIN_SCALE its
            # intermediate z * exp_mul could leave int64, so a finer calibrated scale is coarsened.
            scale = max(walker.scale_of(scores, IBERT_SOFTMAX_INPUT_BITS), IBERT_SOFTMAX_MIN_SCALE)
            x = walker.at_scale(scores, scale, IBERT_SOFTMAX_INPUT_BITS, node, 0)
            p = nonlinear.ibert_softmax_params(float(x.scale), output_bit=IBERT_SOFTMAX_OUTPUT_BITS)
        y = walker.em.node(p.op, [x.name, mask], f"{layer}.softmax", **p.attrs)
        walker.record_nonlinear(node, y, p.op, p.attrs, {}, x.scale, p.output_scale, mask=mask)
        t = walker.dtype(y)
        walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "prob"), layer, quantized_bits=t.bits)

    # --- GELU and elementwise functions ----------------------------------------------------------

    def activation_input_bits(self, walker, node: Node) -> int:
        layer = walker.layer_name(node)
        if node.op == "Gelu" and not walker.options.layers.matching(layer).get("keep_float"):
            return 8 if self.on_ita_gelu(walker, node) else IBERT_GELU_INPUT_BITS
        return self.options.activation_bits(layer, 8)

    def gelu(self, walker, node: Node) -> None:
        layer = walker.layer_name(node)
        approximate = node.attrs.get("approximate", "none")
        if walker.options.layers.matching(layer).get("keep_float"):
            walker.lookup_table(node, lambda x: nonlinear.gelu(x, approximate))
            return
        if self.on_ita_gelu(walker, node):
            x = walker.at_scale(node.inputs[0], self.ita_gelu_input_scale(walker, node.inputs[0]), 8, node, 0)
            out_scale = walker.scale_of(node.outputs[0], 8)
            p = nonlinear.pyita_gelu_params(float(x.scale), out_scale)
            y = walker.em.node(p.op, [x.name], f"{layer}.gelu", **p.attrs)
            walker.record_nonlinear(node, y, p.op, p.attrs, {}, x.scale, p.output_scale)
            walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "int"), layer, quantized_bits=8,
                              gain=nonlinear.pyita_gelu_gain(p))
            return
        x = walker.get(node.inputs[0], IBERT_GELU_INPUT_BITS, node, 0)
        if self.options.gelu == "table" or self.options.ita:  # beside ITA: the table (on_ita_gelu)
            # The float GELU at the input's scale in a 513-entry table, interpolated (about
            # two output steps from the exact GELU); its int16 output scale is calibrated.
            p = nonlinear.gelu_table_params(float(x.scale), walker.scale_of(node.outputs[0], 16), approximate)
            table = walker.em.const(p.consts["table"], "int16", f"{layer}.table")
            y = walker.em.node(p.op, [x.name, table], f"{layer}.gelu")
            walker.record_nonlinear(node, y, p.op, {}, {1: table}, x.scale, p.output_scale)
            walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "int"), layer, quantized_bits=16)
            return
        # I-BERT's i-GELU (an erf polynomial of second order, about 25 dB from the exact GELU).
        p = nonlinear.ibert_gelu_params(float(x.scale))
        y = walker.em.node(p.op, [x.name], f"{layer}.gelu", **p.attrs)
        walker.record_nonlinear(node, y, p.op, p.attrs, {}, x.scale, p.output_scale)
        a = p.attrs
        # |y| <= |x| * (|L| + |shift_int|) with |L| <= ((b^2 + |c|) >> n) + 1 (docs/OPS.md).
        bound = walker.bound_of(x) * ((((a["b_int"] ** 2) + abs(a["c_int"])) >> a["n"]) + 1 + abs(a["shift_int"]))
        walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "acc", bound=bound), layer)

    # --- LayerNorm and NoNorm ----------------------------------------------------------------------

    def layernorm(self, walker, node: Node) -> None:
        layer = walker.layer_name(node)
        x_name, weight_name = node.inputs[0], node.inputs[1]
        bias_name = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
        width = walker.g.concrete_shape(x_name)[-1]
        weight = np.broadcast_to(walker.g.const(weight_name).astype(np.float64).reshape(-1), (width,))
        bias = np.zeros(width) if bias_name is None else np.broadcast_to(walker.g.const(bias_name).astype(np.float64).reshape(-1), (width,))
        bits = walker.options.residual_bits
        x = walker.get(x_name, bits, node, 0)
        if self.options.ita:
            out_scale = walker.scale_of(node.outputs[0], bits)
            p = nonlinear.ilayernorm_params(float(x.scale), weight, bias, out_scale, n_levels=1 << bits)
            consts = [walker.em.const(p.consts["weight"], "int32", f"{layer}.weight"),
                      walker.em.const(p.consts["bias"], "int32", f"{layer}.bias")]
            y = walker.em.node(p.op, [x.name, *consts], f"{layer}.layernorm", **p.attrs)
            walker.record_nonlinear(node, y, p.op, p.attrs, {1: consts[0], 2: consts[1]}, x.scale, p.output_scale)
            walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "int"), layer, quantized_bits=bits)
            return
        stats = walker.calibration.stats.get(x_name)
        sumsq = None if stats is None or not stats.row_sumsq else stats.row_sumsq / float(x.scale) ** 2
        # x * 2^up (exact, int32): fraction bits for the op's rounded row mean
        # (nonlinear.LAYERNORM_FACTOR_BITS says why and how many).
        up = nonlinear.ibert_layernorm_upshift(sumsq, bits)
        x_in, in_scale = x.name, float(x.scale)
        if up:
            x_in = walker.em.node("Mul", [x.name, walker.em.const(np.asarray(1 << up), "int32", f"{layer}.upshift")],
                                  f"{layer}.upshift", dtype="int32")
            in_scale, sumsq = in_scale / (1 << up), sumsq * 4.0**up
        p = nonlinear.ibert_layernorm_params(in_scale, weight, bias, input_bits=bits + up, max_sumsq=sumsq)
        bias_q = walker.em.const(p.consts["bias"], "int64", f"{layer}.bias")
        y = walker.em.node(p.op, [x_in, bias_q], f"{layer}.layernorm", **p.attrs)
        # the mirror reads the LayerNorm's input at x's scale and applies the upshift itself
        walker.record_nonlinear(node, y, p.op, p.attrs, {1: bias_q}, x.scale, p.output_scale, input_mul=1 << up)
        # |y| <= 2^30 * sqrt(N) + |bias|: the bound that lets the following requant keep a wide multiplier.
        bound = int(2**30 * math.sqrt(width)) + int(np.abs(p.consts["bias"]).max(initial=0)) + 1
        walker.set_native(node.outputs[0], walker.value_of(y, p.output_scale, "acc", bound=bound), layer)

    def nonorm(self, walker, node: Node, x_name: str, gamma: np.ndarray, beta: np.ndarray, out_tensor: str,
               gamma_at: tuple[str, int] | None = None, beta_at: tuple[str, int] | None = None) -> None:
        """MobileBERT's NoNorm x*gamma + beta, exact in int64 with gamma at 16 bits. The
        fake-quant model multiplies and adds the quantized gamma and beta in their place
        (`gamma_at`, `beta_at`: the float nodes' inputs holding them): an affine map needs
        no mirror."""
        layer = walker.layer_name(node)
        x = walker.value(x_name)
        if x.per_channel or x.kind not in ("int", "acc"):
            x = walker.get(x_name, walker.options.residual_bits, node, 0)
        p = nonlinear.nonorm_params(float(x.scale), gamma, beta, weight_bits=16)
        g = walker.em.const(p.consts["gamma"], "int32", f"{layer}.gamma")
        b = walker.em.const(p.consts["beta"], "int32", f"{layer}.beta")
        if gamma_at is not None:
            walker.record.consts[gamma_at] = (g, p.output_scale / p.input_scale)
            walker.record.ranges[g] = (-32767, 32767)  # 16-bit symmetric (nonlinear.nonorm_params)
        if beta_at is not None:
            walker.record.consts[beta_at] = (b, p.output_scale)
        y = walker.em.node(p.op, [x.name, g, b], f"{layer}.nonorm", dtype="int64")
        bound = walker.bound_of(x) * int(np.abs(p.consts["gamma"]).max(initial=0)) + int(np.abs(p.consts["beta"]).max(initial=0))
        walker.set_native(out_tensor, walker.value_of(y, p.output_scale, "acc", bound=bound), layer)
