"""From a canonical float graph and its calibration to an integer graph.

One walk over the canonical graph (`exporters.frontend`) in execution order builds the
integer graph with `refsim.GraphBuilder` and, at the same time, records every point where
it quantizes (a tensor requantized for a consumer, a result stored in fewer bits, a weight
replaced by its quantized value). The fake-quant model (`exporters.fakequant`) replays those
records on the float graph, so float, fake-quant and integer agree on where quantization
happens and at which scales.

Each float tensor has a *native* integer form, the one its producer makes:

| producer | native form | scale |
|---|---|---|
| linear layer (MatMul + bias) | accumulator (int32, int64 when kept float) | s_x * s_w (per channel with `--per-channel`) |
| MatMul of two activations | accumulator | s_a * s_b |
| Add (residual, embedding sums), Concat | int16 (`residual_bits`) | calibrated |
| Gather from an embedding table | the table's integers | the table's scale |
| Reshape, Transpose, Gather/Slice of activations, Relu, Pad | the input's form moved | unchanged |
| Mul by a positive constant | the input's integers | scale * c |
| softmax, GELU, LayerNorm, tanh | what the integer op returns | set by the op |

A consumer that needs b bits (a matrix product's activation input: `abits`; a table lookup:
8) asks for the tensor at b bits and gets a `Requant` from the native form to the
calibrated b-bit scale, made once and shared. Adds take their operands' native forms and
rescale them exactly: `y = round((a*Ma + b*Mb) / 2^k)` with `Ma = round(s_a/s_y * 2^k)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
from refsim import GraphBuilder
from refsim.dtypes import TYPES, IntType, type_for_range

from . import nonlinear
from .calibrate import Calibration, quantize_weight, weight_range
from .config import ExportOptions, signed_type
from .dyadic import ExportError
from .frontend import patterns
from .frontend import requant as rq
from .frontend.emitter import Emitter
from .frontend.graph import Graph, Node
from .frontend.integer_ops import INTEGER_OPS, lower
from .frontend.patterns import AttentionMatch, FeedForwardMatch, match_attention, match_feedforward
from .frontend.shapes import parse_dim
from .ptq.plan import Ptq

# What the walker recognises, for the one-line error on anything else.
SUPPORTED = (
    "MatMul/Gemm with constant weights (+ bias Add), MatMul of two activations, Add (residual, bias, "
    "embeddings, key-padding mask), Mul by a constant (scalar, per channel: NoNorm, or a table: rotary cos/sin), "
    "by a token mask or of two activations (a gated feed-forward), Neg, "
    "Div by a token count (mean pooling), LayerNormalization, Gelu, Relu, Tanh, Sigmoid, Softmax, Reshape, "
    "Transpose, Squeeze/Unsqueeze/Flatten, Gather (embedding or index), Slice, Concat, Pad (zeros), "
    "ReduceSum, ReduceMean, Conv (patch embedding)"
)

MOVEMENT = ("Reshape", "Transpose", "Gather", "Slice")


def activation_type(bits: int) -> tuple[str, int | None, int | None]:
    """The narrowest IR type holding a signed `bits`-bit activation, and the clip range
    when the type is wider (3 bits live in int4, 5 to 7 in int8, clipped to their range)."""
    dtype, lo, hi = signed_type(bits)
    if TYPES[dtype].bits == bits:
        return dtype, None, None
    return dtype, lo, hi


def unsupported(node: Node, why: str = "") -> ExportError:
    reason = f" ({why})" if why else ""
    return ExportError(f"{node.describe()}: op {node.op} is not supported here{reason} (no --config setting gives it an "
                       f"integer form: export the model without it, or please report it); supported: {SUPPORTED}")


@dataclass
class Value:
    """A float tensor in integer form: integer tensor `name`, real = scale * q."""

    name: str
    scale: Any  # float, or a 1-D array of per-channel scales along the last axis (may be negative)
    kind: str = "int"  # "int": a quantized activation; "acc": an accumulator; "prob": softmax output
    bound: int | None = None  # a known bound on |q| tighter than the declared type's

    @property
    def per_channel(self) -> bool:
        return np.ndim(self.scale) > 0


@dataclass
class FakeQuantRecord:
    """Where the fake-quant model quantizes, replayed by `exporters.fakequant`."""

    # (node, input index) -> (scale, bits, signed[, output scale]): the input becomes
    # clip(round(x / scale)) * (output scale, default: scale); a per-channel scale (smoothing)
    # is a vector along the last axis
    edges: dict[tuple[str, int], tuple] = field(default_factory=dict)
    # tensor -> (scale, bits, signed[, rounding scale]): the tensor becomes
    # clip(round(x / rounding scale)) * scale, where the integer graph's requantizer realizes
    # a factor other than the exact one (`frontend.requant.rounding_gain`; default: scale)
    tensors: dict[str, tuple] = field(default_factory=dict)
    # (node, input index) -> (integer constant, scale): the input becomes q * scale
    consts: dict[tuple[str, int], tuple[str, Any]] = field(default_factory=dict)
    # integer constant -> the range its quantizer clips to, where narrower than its type's
    # (3-bit weights in int4, 24-bit ITA biases in int32): what training must keep it within
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # float nonlinear node (softmax, GELU, LayerNorm, table) -> the integer op computing it
    # (`Nonlinear`): the fake-quant model computes that op exactly in its place
    # (`exporters.mirror`), on round(input / input_scale) * input_mul
    nonlinear: dict[str, Nonlinear] = field(default_factory=dict)
    # output projection's output tensor -> how an ITA attention block computes it
    # (`Walker._record_head_sums`): each head's share rounded to int8 on its own, then summed
    head_sums: dict[str, dict] = field(default_factory=dict)
    # how the integer graph's requantizers round ("half_up": ITA's; "half_even": I-BERT's
    # dyadic ones): the fake-quant model breaks exact ties the same way
    rounding: str = "half_even"


@dataclass
class Nonlinear:
    """An integer nonlinear op as the fake-quant model mirrors it (`Walker.record_nonlinear`)."""

    node: str  # the integer op's output tensor
    op: str
    attrs: dict
    consts: dict[int, str]  # input position -> integer constant
    input_scale: Any  # the scale of the integer tensor the float node's input 0 is quantized at
    output_scale: Any  # real value = integer output * output_scale (per channel: a vector)
    input_mul: int = 1  # the op's input is that integer times input_mul (a LayerNorm's upshift)
    mask: tuple[str, list[int]] | None = None  # the mask input and the shape its keep tensor takes


def _ita_steps(block: str, gains: dict):
    """requant(ratio, step): ITA's requantizer constants for one step of `block`
    (`frontend.requant.ita_dyadic`, errors naming block and step), its rounding gain kept in
    gains[step] for the fake-quant record."""

    from refsim.blocks.ita import ItaRequant

    def requant(ratio: float, step: str) -> ItaRequant:
        d = rq.ita_dyadic(ratio, f"{block}: {step}")
        gains[step] = rq.rounding_gain(ratio, d.mul, d.shift)
        return ItaRequant(int(d.mul), int(d.shift), 0)

    return requant


class Walker:
    """Builds the integer graph for one canonical graph (see the module docstring)."""

    def __init__(self, g: Graph, options: ExportOptions, calibration: Calibration, modes, ptq=None):
        self.g = g
        self.options = options
        self.calibration = calibration
        self.modes = modes
        self.ptq = ptq if ptq is not None else Ptq(options, calibration)  # weights and inputs of linear layers
        self.em = Emitter(g.name or "model")
        self.native: dict[str, Value] = {}
        self.at_bits: dict[tuple[str, int], Value] = {}
        self.masked_scores: dict[str, tuple[Value, str]] = {}
        self.record = FakeQuantRecord()
        self.record.rounding = self.rounding
        # integer tensor -> the gain of the Requant that made it (frontend.requant.rounding_gain):
        # the fake-quant model rounds at its scale times that gain, as the integer graph does
        self.rounding_gains: dict[str, Any] = {}
        self.float_tensors: dict[str, str] = {}  # integer tensor -> float tensor it represents
        self.layers: dict[str, str] = {}  # integer tensor -> layer name
        self.mask_tensors: dict[tuple[str, str], str] = {}
        self.done: set[str] = set()  # nodes handled as part of an earlier node
        self.users = g.consumer_map()
        self.producers = g.producers()
        self.skipped = self._mask_only()
        self.unpaired_attention: list[str] = []  # ITA attention blocks no feed-forward block follows yet
        # The GELUs ITA's activation unit computes (Modes.on_ita_gelu): feed-forward layers'
        # activations whose first linear layer runs on ITA, in block form or layer by layer
        # (`patterns.match_feedforward`, apart from `run`'s block-form choice, which tests turn off).
        self.ita_activations = {ff.activation.name for ff in patterns.match_feedforward(g)
                                if self.modes.on_ita(self.options.layer(self.layer_name(ff.fc1.nodes[0])))} if options.ita else set()

    # --- integer tensors ------------------------------------------------------------------------

    def dtype(self, name: str) -> IntType:
        return self.em.builder.tensors[name].dtype

    def label(self, name: str, float_tensor: str | None, scale, layer: str = "") -> None:
        """Record what an integer tensor stands for (scale metadata, float counterpart)."""
        self.em.label(name, scale)
        if float_tensor is not None:
            self.float_tensors[name] = float_tensor
        if layer:
            self.layers[name] = layer

    def layer_name(self, node: Node) -> str:
        return node.scope or node.name

    # --- scales and requantization ------------------------------------------------------------

    def scale_of(self, tensor: str, bits: int) -> float:
        return self.calibration.scale(tensor, bits)

    def value_of(self, name: str, scale, kind: str = "int", bound: int | None = None) -> Value:
        return Value(name, scale, kind, bound)

    def bound_of(self, v: Value) -> int:
        t = self.dtype(v.name)
        return v.bound if v.bound is not None else max(abs(t.lo), t.hi)

    def requant(self, v: Value, to_scale: float, bits: int, stem: str, layer: str, hardware: bool = False) -> str:
        """Requant v's integers to `bits`-bit signed integers at `to_scale` (per-tensor result),
        with the planner's policy: ITA's requantizer for a matrix product on ITA, dyadic
        otherwise (a negative scale ratio, as after I-BERT's GELU and LayerNorm, gives a
        negative multiplier)."""
        ratio = np.asarray(v.scale, np.float64) / to_scale
        dtype, lo, hi = activation_type(bits)
        policy = "ita" if hardware and self.options.ita else "dyadic"
        y = rq.requantize(self.em, v.name, ratio, bound=self.bound_of(v), dtype=dtype, policy=policy, lo=lo, hi=hi,
                          rounding=self.rounding, stem=stem, what=layer)
        gain = rq.requant_gain(self.em.builder, y, ratio)
        if gain is not None:
            self.rounding_gains[y] = gain
        return y

    def edge_spec(self, v: Value, bits: int, rounding_scale=None) -> tuple:
        """The fake-quant record's (scale, bits, signed[, output scale]) for an edge reading
        v, `bits`-bit: rounded at v's scale times its Requant's gain, dequantized by v's scale."""
        gain = self.rounding_gains.get(v.name)
        scale = float(v.scale) if rounding_scale is None else rounding_scale
        if gain is None:
            return (scale, bits, True) if rounding_scale is None else (scale, bits, True, float(v.scale))
        return (scale * gain, bits, True, float(v.scale))

    @property
    def rounding(self) -> str:
        # I-BERT rounds half to even (torch.round); ITA's requantizer adds half and shifts.
        return "half_up" if self.options.ita else "half_even"

    def get(self, tensor: str, bits: int, consumer: Node | None = None, index: int = 0) -> Value:
        """`tensor` quantized to a `bits`-bit signed integer at its calibrated scale."""
        v = self.value(tensor)
        key = (tensor, bits)
        if key not in self.at_bits:
            t = self.dtype(v.name)
            scale = self.scale_of(tensor, bits)
            if v.kind == "int" and not v.per_channel and t.signed and t.bits == bits and math.isclose(float(v.scale), scale, rel_tol=1e-9):
                self.at_bits[key] = v
            else:
                layer = self.layers.get(v.name, "") or tensor
                name = self.requant(v, scale, bits, f"{v.name}.q{bits}", layer)
                self.label(name, tensor, scale, layer)
                self.at_bits[key] = Value(name, scale, bound=1 << (bits - 1))
        out = self.at_bits[key]
        if consumer is not None and out.name != v.name:
            self.record.edges[(consumer.name, index)] = self.edge_spec(out, bits)
        return out

    def needs_requant(self, tensor: str, bits: int) -> bool:
        """Whether `get(tensor, bits)` makes a Requant (the native form is not already it)."""
        v = self.value(tensor)
        t = self.dtype(v.name)
        return not (v.kind == "int" and not v.per_channel and t.signed and t.bits == bits)

    def get_smoothed(self, tensor: str, bits: int, factors: np.ndarray, scale: float, consumer: Node, index: int) -> Value:
        """`tensor` divided channel by channel (last axis) by `factors` and quantized to
        `bits` bits at `scale` (`exporters.ptq.smoothing`): one Requant with a multiplier
        per channel. The consumer's weight rows carry the factors."""
        v = self.value(tensor)
        key = (tensor, bits, "smoothed")
        if key not in self.at_bits:
            layer = self.layers.get(v.name, "") or tensor
            name = self.requant(v, scale * factors, bits, f"{v.name}.smooth_q{bits}", layer)
            self.label(name, tensor, scale * factors, layer)  # q * scale * factors is the float tensor
            self.at_bits[key] = Value(name, scale, bound=1 << (bits - 1))
        out = self.at_bits[key]
        self.record.edges[(consumer.name, index)] = self.edge_spec(out, bits, rounding_scale=scale * factors)
        return out

    def at_scale(self, tensor: str, scale: float, bits: int, consumer: Node | None = None, index: int = 0) -> Value:
        """`tensor` as a `bits`-bit integer at a given scale (an op that fixes its input scale)."""
        v = self.value(tensor)
        t = self.dtype(v.name)
        if v.kind == "int" and not v.per_channel and t.signed and t.bits == bits and math.isclose(float(v.scale), scale, rel_tol=1e-9):
            return v
        key = (tensor, bits, scale)
        if key not in self.at_bits:
            layer = self.layers.get(v.name, "") or tensor
            name = self.requant(v, scale, bits, f"{v.name}.q{bits}", layer)
            self.label(name, tensor, scale, layer)
            self.at_bits[key] = Value(name, scale, bound=1 << (bits - 1))
        out = self.at_bits[key]
        if consumer is not None:
            self.record.edges[(consumer.name, index)] = self.edge_spec(out, bits)
        return out

    def value(self, tensor: str) -> Value:
        if tensor not in self.native:
            raise self._no_integer_form(tensor)
        return self.native[tensor]

    def _no_integer_form(self, tensor: str) -> ExportError:
        """Why `tensor` has no integer form: a tensor the model computes from no input data
        (folded to a constant; MRA traced without its kernels fills its attention output
        with zeros) is the model's to fix; anything else is ours."""
        if self.g.is_const(tensor):
            readers = ", ".join(n.describe() for n in self.users.get(tensor, [])) or "its reader"
            return ExportError(f"{readers}: reads {tensor!r}, which the model computes from no input data (it folds "
                               "to a constant, e.g. an attention traced as zeros); refsim expects a computed tensor "
                               "here: check how the model was traced")
        return ExportError(f"internal: tensor {tensor!r} has no integer form yet")

    def set_native(self, tensor: str, v: Value, layer: str = "", quantized_bits: int | None = None, gain=None) -> None:
        """Make `v` the native form of `tensor`; `quantized_bits` marks a stored result,
        rounded at its scale times `gain` (default: that of the Requant that made it)."""
        self.native[tensor] = v
        if layer:
            self.layers.setdefault(v.name, layer)
        if quantized_bits is not None:
            self.record_tensor(tensor, v.scale, quantized_bits, self.dtype(v.name).signed,
                               self.rounding_gains.get(v.name) if gain is None else gain)
            self.label(v.name, tensor, v.scale, layer)

    def record_nonlinear(self, node: Node, integer: str, op: str, attrs: dict, consts: dict[int, str], input_scale,
                         output_scale, input_mul: int = 1, mask: str | None = None) -> None:
        """Record that the integer op `op` (output `integer`) computes float node `node`, on
        its input 0 at `input_scale` (times `input_mul`), with key mask `mask` (a
        `mask_tensor` result), for the fake-quant model's mirror of it."""
        mask_spec = None
        if mask is not None:
            (mask_input, kind), = [k for k, v in self.mask_tensors.items() if v == mask]
            seq = self.g.concrete_shape(mask_input)[-1]
            mask_spec = (mask_input, {"keys": [0, 1, 1, seq], "tokens": [0, seq, 1]}[kind])
        scale = (lambda s: np.asarray(s, np.float64) if np.ndim(s) > 0 else float(s))
        self.record.nonlinear[node.name] = Nonlinear(integer, op, dict(attrs), dict(consts), scale(input_scale),
                                                     scale(output_scale), int(input_mul), mask_spec)

    def record_tensor(self, tensor: str, scale, bits: int, signed: bool, gain=None) -> None:
        """Record a stored result for the fake-quant model, rounded at scale * gain."""
        scale = np.asarray(scale, np.float64) if np.ndim(scale) > 0 else float(scale)
        if gain is None:
            self.record.tensors[tensor] = (scale, bits, signed)
        else:
            self.record.tensors[tensor] = (scale, bits, signed, scale * gain)

    # --- graph analysis ----------------------------------------------------------------------------

    def _mask_only(self) -> set[str]:
        """The nodes of the canonical mask expressions (their users take the mask input
        directly); other integer computations on a mask stay, as integer ops."""
        producers = self.g.producers()
        skipped, stack = set(), [*self.g.key_padding_masks, *self.g.token_masks, *self.g.token_counts]
        while stack:
            node = producers.get(stack.pop())
            if node is None or node.name in skipped:
                continue
            skipped.add(node.name)
            stack.extend(i for i in node.inputs if i and not self.g.is_const(i) and i not in self.g.mask_inputs)
        return skipped

    def _integer_op(self, node: Node) -> None:
        """An op on plain integers (position ids, masks): exact integer ops (`frontend.integer_ops`)."""
        layer = self.layer_name(node)

        def operand(k: int) -> str:
            name = node.inputs[k]
            if self.g.is_const(name):
                return self.em.const(self.g.const(name), None, f"{layer}.const")
            return self.value(name).name

        def const(k: int):
            name = node.inputs[k] if k < len(node.inputs) else ""
            return self.g.const(name) if name and self.g.is_const(name) else None

        y = lower(self.em, node, operand, const, self.g.dtypes.get(node.outputs[0]), f"{layer}.{node.op.lower()}")
        self.set_native(node.outputs[0], Value(y, 1.0, "index"), layer)

    def _integers_only(self, node: Node) -> bool:
        """Whether every input is a plain integer (a model input, a value computed from
        those, or an integer constant), at least one of them computed at run time."""
        data = False
        for i in node.inputs:
            if not i:
                continue
            if self.g.is_const(i):
                if self.g.const(i).dtype.kind not in "iub":
                    return False
                continue
            v = self.native.get(i)
            if v is None or v.kind not in ("index", "mask"):
                return False
            data = True
        return data

    def wanted_bits(self, tensor: str, seen=None) -> int:
        """The largest bit width consumers ask of `tensor` (through data movement)."""
        seen = set() if seen is None else seen
        if tensor in seen:
            return self.options.abits
        seen.add(tensor)
        bits = []
        for user in self.users.get(tensor, []):
            if user.op in MOVEMENT or (user.op == "Mul" and self._scalar_const(user) is not None) or user.op == "Relu":
                bits.append(self.wanted_bits(user.outputs[0], seen))
            elif user.op == "MatMul":
                if self.g.is_const(user.inputs[1]):
                    bits.append(self.options.layer(self.layer_name(user)).abits)
                else:
                    bits.append(self.options.abits)
            elif user.op in ("Gelu", "Tanh", "Sigmoid"):
                bits.append(self.modes.activation_input_bits(self, user))
            else:
                bits.append(self.options.residual_bits)
        if tensor in self.g.outputs:
            bits.append(self.options.output_bits)
        return max(bits, default=self.options.abits)

    def softmax_factor(self, tensor: str) -> float | None:
        """If `tensor` reaches a Softmax only through positive scalar factors and a mask,
        the product of those factors; else None."""
        factor = 1.0
        while True:
            users = self.users.get(tensor, [])
            if len(users) != 1 or tensor in self.g.outputs:
                return None
            user = users[0]
            if user.op == "Softmax":
                return factor
            c = self._scalar_const(user) if user.op == "Mul" else None
            if c is not None and c > 0:
                factor *= c
            elif not (user.op == "Add" and any(i in self.g.key_padding_masks for i in user.inputs)):
                return None
            tensor = user.outputs[0]

    def _scalar_const(self, node: Node) -> float | None:
        for a, c in (node.inputs, node.inputs[::-1]):
            if self.g.is_const(c) and not self.g.is_const(a) and self.g.const(c).size == 1:
                return float(self.g.const(c).reshape(()))
        return None

    # --- the walk ------------------------------------------------------------------------------

    def run(self) -> GraphBuilder:
        """Walk the graph; the builder holding the integer graph."""
        for name in self.g.inputs:
            self._graph_input(name)
        blocks = {}
        if self.options.ita:
            # Unmasked self-attention goes through ITA's attention-block graph form (docs/ITA.md).
            # Attention over several sequences at once (Swin's windows) keeps the plain form, and so
            # does attention whose keys and values come from a sequence of another length (PVT's spatial
            # reduction): the block reads one [seq, width] input for Q and for K/V.
            for match in match_attention(self.g):
                same_sequence = self.g.concrete_shape(match.k.x) == self.g.concrete_shape(match.q.x) \
                    and self.g.concrete_shape(match.v.x) == self.g.concrete_shape(match.q.x)
                if match.mask is None and self.g.concrete_shape(match.q.x)[0] == 1 and same_sequence:
                    for n in match.nodes:
                        blocks[n.name] = match
            # Feed-forward layers on ITA go through ITA's feed-forward-block form (docs/ITA.md).
            for ff in match_feedforward(self.g):
                if self._ita_feedforward_fits(ff) and not any(n.name in blocks for n in ff.nodes):
                    for n in ff.nodes:
                        blocks[n.name] = ff
        for node in self.g.nodes:
            if node.name in blocks and node.name not in self.done:
                match = blocks[node.name]
                if isinstance(match, FeedForwardMatch):
                    self._ita_feedforward(match)
                else:
                    self._ita_attention(match)
            if node.name in self.done or node.name in self.skipped:
                continue
            if node.op in INTEGER_OPS and self._integers_only(node):
                self._integer_op(node)
                continue
            handler = getattr(self, f"_visit_{node.op}", None)
            if handler is None:
                raise unsupported(node)
            handler(node)
        for name in self.g.outputs:
            self._graph_output(name)
        return self.em.builder

    def _graph_input(self, name: str) -> None:
        elem_dtype = self.g.dtypes.get(name, np.dtype(np.float32))
        shape = self.g.shapes[name]
        if name in self.g.mask_inputs:
            self.em.input(name, "uint8", shape)
            self.native[name] = Value(name, 1.0, "mask")
        elif elem_dtype.kind in "iub":
            self.em.input(name, "int32", shape)
            self.native[name] = Value(name, 1.0, "index")
        else:
            bits = 16 if self.wanted_bits(name) > 8 else 8
            scale = self.scale_of(name, bits)
            self.em.input(name, f"int{bits}", shape, scale=scale, zero_point=0)
            self.native[name] = Value(name, scale)
            self.record.tensors[name] = (scale, bits, True)
            self.float_tensors[name] = name

    def _graph_output(self, name: str) -> None:
        v = self.value(name)
        bits = self.options.output_bits
        scale = self.scale_of(name, bits)
        if v.kind in ("prob",):
            out = self.em.node("Cast", [v.name], name, dtype=self.dtype(v.name).name)
            self.label(out, name, v.scale)
        else:
            out = self.requant(v, scale, bits, name, name)
            self.label(out, name, scale)
            earlier = self.record.tensors.get(name)
            # A result already stored in fewer bits (an ITA layer's int8 output) keeps that
            # point in the fake-quant model: it, not the 16-bit output grid, is what loses accuracy.
            if earlier is None or earlier[1] >= bits:
                self.record_tensor(name, scale, bits, True, self.rounding_gains.get(out))
        self.em.builder.output(out)

    # --- linear algebra ------------------------------------------------------------------------------

    def _visit_MatMul(self, node: Node) -> None:
        a, b = node.inputs[:2]
        if self.g.is_const(b):
            self._linear(node)
        elif self.g.is_const(a):
            raise unsupported(node, "a constant first operand")
        else:
            self._matmul(node)

    def _bias_of(self, node: Node) -> tuple[Node, str] | None:
        users = self.users.get(node.outputs[0], [])
        if len(users) != 1 or users[0].op != "Add" or node.outputs[0] in self.g.outputs:
            return None
        add = users[0]
        other = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
        width = self.g.const(node.inputs[1]).shape[-1]
        if self.g.is_const(other) and self.g.const(other).size in (1, width) and self.g.const(other).shape[-1:] in ((width,), (1,), ()):
            return add, other
        return None

    def _linear(self, node: Node) -> None:
        layer = self.layer_name(node)
        settings = self.options.layer(layer)
        w = self.g.const(node.inputs[1]).astype(np.float64)
        if w.ndim != 2:
            raise unsupported(node, f"weights of rank {w.ndim}")
        hardware = self.modes.on_ita(settings)
        if hardware and settings.per_channel:
            raise ExportError(f"{layer}: ITA takes one requantization multiplier per layer; export without --per-channel")
        bias = self._bias_of(node)
        out_tensor = bias[0].outputs[0] if bias is not None else node.outputs[0]
        columns = scaled_out = None
        if hardware:
            # columns scaled to about one range, folded into w and b (Modes.ita_output_channels)
            b_float = None if bias is None else np.broadcast_to(self.g.const(bias[1]).astype(np.float64).reshape(-1), (w.shape[1],))
            columns, scaled_out = self.modes.ita_output_channels(self, node.inputs[0], out_tensor, w, b_float)
            if columns is not None:
                w = w / columns
        x, wq, bias_shift = self.ptq.linear(self, node, w, settings)
        acc_scale = float(x.scale) * (wq.scale if settings.per_channel else float(wq.scale))
        factor = 1.0 if columns is None else columns  # real weights and biases: integers * scale * factor
        out_tensor = node.outputs[0]
        inputs = [x.name, self.em.const(wq.q, wq.dtype, f"{layer}.weight"), None, None]
        k = w.shape[0]
        worst = k * self.bound_of(x) * int(np.abs(wq.q).max(initial=0))
        bias_q = None
        if bias is not None:
            add, bias_name = bias
            self.done.add(add.name)
            out_tensor = add.outputs[0]
            b = np.broadcast_to(self.g.const(bias_name).astype(np.float64).reshape(-1), (w.shape[1],)) / factor
            if bias_shift is not None:
                b = b + bias_shift
            bias_q = np.rint(b / acc_scale).astype(np.int64)
            worst += int(np.abs(bias_q).max(initial=0))
            bias_index = add.inputs.index(bias_name)
        acc_bits = self.modes.accumulator_bits(self, layer, worst, settings)
        if bias_q is not None:
            bias_bits = self.modes.bias_bits(acc_bits)
            lim = 1 << (bias_bits - 1)
            if int(np.abs(bias_q).max(initial=0)) >= lim:
                raise ExportError(f"{layer}: the quantized bias needs more than {bias_bits} bits (largest {int(np.abs(bias_q).max())})")
            inputs.append(self.em.const(bias_q, f"int{bias_bits}" if bias_bits in (8, 16, 32, 64) else "int32", f"{layer}.bias"))
            self.record.consts[(add.name, bias_index)] = (inputs[-1], acc_scale * factor)
            self.record.ranges[inputs[-1]] = (1 - lim, lim - 1)
        acc = self.em.node("MatMul", inputs, f"{layer}.acc", acc_bits=acc_bits, overflow=self.modes.overflow(acc_bits))
        w_scale = (wq.scale if settings.per_channel else float(wq.scale)) * factor
        self.record.consts[(node.name, 1)] = (inputs[1], w_scale)
        self.record.ranges[inputs[1]] = weight_range(settings.wbits)[:2]
        self.label(inputs[1], None, w_scale, layer)
        self.layers[acc] = layer
        self.finish_matmul(out_tensor, Value(acc, acc_scale, "acc", bound=worst), layer, hardware, columns, scaled_out)

    def finish_matmul(self, tensor: str, acc: Value, layer: str, on_ita: bool, columns=None, scaled_scale=None) -> None:
        """An accumulator becomes the tensor's native form; on ITA, the hardware requantizer
        turns it into int8 at once, as ITA never hands out accumulators (with `columns`, at
        `scaled_scale`: the int8 result's real scale is scaled_scale * columns)."""
        if not on_ita:
            self.set_native(tensor, acc, layer)
            return
        scale = self.modes.ita_output_scale(self, tensor) if columns is None else scaled_scale
        y = self.requant(acc, scale, 8, f"{layer}.out", layer, hardware=True)
        self.set_native(tensor, Value(y, scale if columns is None else scale * columns), layer, quantized_bits=8)

    def _matmul(self, node: Node) -> None:
        layer = self.layer_name(node)
        operands = []
        for k, t in enumerate(node.inputs[:2]):
            v = self.value(t)
            if v.kind == "prob":
                operands.append(v)
            else:
                operands.append(self.get(t, self.options.abits, node, k))
        a, b = operands
        bound = 1
        for v in operands:
            bound *= self.bound_of(v)
        k = self.g.concrete_shape(node.inputs[0])[-1]
        acc_bits = self.modes.accumulator_bits(self, layer, k * bound, None)
        acc = self.em.node("MatMul", [a.name, b.name], f"{layer}.matmul", acc_bits=acc_bits, overflow=self.modes.overflow(acc_bits))
        self.layers[acc] = layer
        self.finish_matmul(node.outputs[0], Value(acc, float(a.scale) * float(b.scale), "acc", bound=k * bound), layer,
                           self.modes.on_ita(None))

    # --- elementwise ----------------------------------------------------------------------------------

    def _visit_Add(self, node: Node) -> None:
        layer = self.layer_name(node)
        a, b = node.inputs
        for x, m in ((a, b), (b, a)):
            if m in self.g.key_padding_masks:
                users = self.users.get(node.outputs[0], [])
                if not users or any(u.op != "Softmax" for u in users):
                    raise unsupported(node, "an attention mask added to something other than softmax scores")
                self.masked_scores[node.outputs[0]] = (x, self.g.key_padding_masks[m])
                return
        self._add(node, [a, b], layer)

    def _add(self, node: Node, terms: list[str], layer: str) -> None:
        """y = sum of terms (activations or constants), exactly rescaled to y's scale
        (`frontend.requant.exact_sum`)."""
        bits = self.options.residual_bits
        out_scale = self.scale_of(node.outputs[0], bits)
        operands, constants, const_index = [], [], []
        for index, t in enumerate(terms):
            if self.g.is_const(t):
                constants.append((self.g.const(t).astype(np.float64) / out_scale, f"{layer}.term{index}"))
                const_index.append(index)
                continue
            v = self.value(t)
            if v.kind in ("mask", "index"):
                raise unsupported(node, "adding an integer input")
            operands.append(rq.Term(v.name, np.asarray(v.scale, np.float64) / out_scale, self.bound_of(v)))
        y, names, k = rq.exact_sum(self.em, operands, constants, dtype=f"int{bits}", rounding=self.rounding,
                                   stem=f"{layer}.out", what=layer)
        for index, name in zip(const_index, names):
            self.record.consts[(node.name, index)] = (name, out_scale / float(1 << k))
        self.set_native(node.outputs[0], Value(y, out_scale), layer, quantized_bits=bits)

    def _visit_Mul(self, node: Node) -> None:
        layer = self.layer_name(node)
        a, b = node.inputs
        for x, m in ((a, b), (b, a)):
            if m in self.g.token_masks:
                # Pooling keeps the residual stream's precision (16 bits), per-tensor.
                v = self.get(x, self.options.residual_bits, node, node.inputs.index(x))
                mask = self.mask_tensor(self.g.token_masks[m], "tokens", layer)
                y = self.em.node("Mul", [v.name, mask], f"{layer}.masked")
                self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer)
                return
        c = self._scalar_const(node)
        if c is not None:
            if c == 0:
                raise unsupported(node, "multiplying by zero")
            x = a if self.g.is_const(b) else b
            v = self.value(x) if c > 0 else self._negated(self.value(x), node, layer)
            c = abs(c)
            self.set_native(node.outputs[0], replace(v, scale=np.asarray(v.scale) * c if v.per_channel else float(v.scale) * c), layer)
            return
        for x, cname in ((a, b), (b, a)):
            if self.g.is_const(cname) and not self.g.is_const(x):
                width = self.g.concrete_shape(x)[-1]
                gamma = self.g.const(cname).astype(np.float64)
                if gamma.size != width or gamma.shape[-1] != width:
                    self._times_table(node, x, cname, layer)
                    return
                gamma = gamma.reshape(-1)
                beta, out, beta_at = np.zeros(width), node.outputs[0], None
                users = self.users.get(out, [])
                if len(users) == 1 and users[0].op == "Add" and out not in self.g.outputs:
                    add = users[0]
                    other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
                    if self.g.is_const(other) and self.g.const(other).size == width:
                        beta, out = self.g.const(other).astype(np.float64).reshape(-1), add.outputs[0]
                        beta_at = (add.name, add.inputs.index(other))
                        self.done.add(add.name)
                self.modes.nonorm(self, node, x, gamma, beta, out, (node.name, node.inputs.index(cname)), beta_at)
                return
        # Two activations (a gated feed-forward's GELU(x1) * x2): their 8-bit integers
        # multiplied exactly, at the product of their scales.
        bits = self.options.activation_bits(layer, 8)
        x1, x2 = self.get(a, bits, node, 0), self.get(b, bits, node, 1)
        y = self.em.node("Mul", [x1.name, x2.name], f"{layer}.product", dtype="int32")
        self.set_native(node.outputs[0], Value(y, float(x1.scale) * float(x2.scale), "acc",
                                               bound=self.bound_of(x1) * self.bound_of(x2)), layer)

    def _times_table(self, node: Node, x: str, cname: str, layer: str) -> None:
        """x times a constant that broadcasts along more than the channels (a rotary
        embedding's cos and sin tables): the constant in 16 bits, one scale, times x's 8-bit
        integers, exactly."""
        table = self.g.const(cname).astype(np.float64)
        if not np.any(table):
            raise unsupported(node, "multiplying by zeros")
        bits = self.options.activation_bits(layer, 8)
        v = self.get(x, bits, node, node.inputs.index(x))
        wq = quantize_weight(table, 16, per_channel=False)
        q = self.em.const(wq.q, wq.dtype, f"{layer}.factor")
        self.label(q, None, float(wq.scale), layer)
        self.record.consts[(node.name, node.inputs.index(cname))] = (q, float(wq.scale))
        y = self.em.node("Mul", [v.name, q], f"{layer}.product", dtype="int32")
        bound = self.bound_of(v) * int(np.abs(wq.q).max(initial=0))
        self.set_native(node.outputs[0], Value(y, float(v.scale) * float(wq.scale), "acc", bound=bound), layer)

    def _negated(self, v: Value, node: Node, layer: str) -> Value:
        """-v: its integers negated, in a type that holds the negated range, same scale."""
        if v.kind in ("mask", "index"):
            raise unsupported(node, "negating an integer input")
        t = self.dtype(v.name)
        bound = self.bound_of(v)
        lo, hi = max(t.lo, -bound), min(t.hi, bound)
        out = type_for_range(-hi, -lo)
        y = self.em.node("Mul", [v.name, self.em.const(-1, "int8", f"{layer}.minus_one")], f"{layer}.negated", dtype=out.name)
        return Value(y, v.scale, "acc" if v.kind == "prob" else v.kind, bound=bound)

    def _visit_Neg(self, node: Node) -> None:
        layer = self.layer_name(node)
        self.set_native(node.outputs[0], self._negated(self.value(node.inputs[0]), node, layer), layer)

    def _visit_Div(self, node: Node) -> None:
        layer = self.layer_name(node)
        x, d = node.inputs
        if d not in self.g.token_counts:
            raise unsupported(node, "division by something other than a token count (mean pooling)")
        v = self.value(x)
        mask = self.mask_tensor(self.g.token_counts[d], "count", layer)
        seq = self.g.concrete_shape(self.g.token_counts[d])[-1]
        # 1/count by table lookup: recip[c] = round(2^K / max(c, 1)), then y = x*recip >> K.
        k_bits = 24
        count_type = "uint8" if seq < 256 else "uint16"
        count = self.em.node("Cast", [mask], f"{layer}.count", dtype=count_type)
        size = 1 << TYPES[count_type].bits
        table = np.array([round((1 << k_bits) / max(c, 1)) for c in range(size)], np.int64)
        recip = self.em.node("Lut", [count, self.em.const(table, "int32", f"{layer}.reciprocal")], f"{layer}.reciprocal")
        rank = len(self.g.concrete_shape(x))
        if rank != 2:
            raise unsupported(node, f"mean pooling over a rank-{rank} sum")
        product = self.em.node("Mul", [v.name, recip], f"{layer}.times_reciprocal", dtype="int64")
        one = self.em.const(1, "int32", f"{layer}.one")
        shift = self.em.const(k_bits, "int8", f"{layer}.shift")
        y = self.em.node("Requant", [product, one, shift], f"{layer}.mean", rounding=self.rounding, dtype="int32")
        self.set_native(node.outputs[0], Value(y, v.scale, "acc" if v.kind == "acc" else "int"), layer)

    def _visit_Relu(self, node: Node) -> None:
        v = self.value(node.inputs[0])
        y = self.em.node("Relu", [v.name], f"{self.layer_name(node)}.relu")
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), self.layer_name(node))

    def _visit_Tanh(self, node: Node) -> None:
        self.lookup_table(node, np.tanh)

    def _visit_Sigmoid(self, node: Node) -> None:
        # SiLU / SwiGLU (x * sigmoid(x): NomicBERT's gated feed-forward) is this table and a product of two activations
        self.lookup_table(node, lambda x: 1 / (1 + np.exp(-x)))

    def _visit_Gelu(self, node: Node) -> None:
        self.modes.gelu(self, node)

    def lookup_table(self, node: Node, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """An elementwise function as a Lut on its 8-bit (16-bit when kept float) input:
        exact, table[q] = round(f(q * s_in) / s_out)."""
        layer = self.layer_name(node)
        in_bits = self.modes.activation_input_bits(self, node)
        x = self.get(node.inputs[0], in_bits, node, 0)
        out_bits = min(max(self.wanted_bits(node.outputs[0]), in_bits), 16)
        out_scale = self.scale_of(node.outputs[0], out_bits)
        t = self.dtype(x.name)  # the table covers the input's whole type
        grid = np.arange(t.lo, t.hi + 1, dtype=np.float64) * float(x.scale)
        out_type, lo, hi = signed_type(out_bits)
        table = np.clip(np.rint(fn(grid) / out_scale), lo, hi).astype(np.int64)
        table_name = self.em.const(table, out_type, f"{layer}.table")
        y = self.em.node("Lut", [x.name, table_name], f"{layer}.lut")
        self.record_nonlinear(node, y, "Lut", {}, {1: table_name}, x.scale, out_scale)
        self.set_native(node.outputs[0], Value(y, out_scale), layer, quantized_bits=out_bits)

    def _visit_Softmax(self, node: Node) -> None:
        axis = node.attrs.get("axis", -1)
        rank = len(self.g.concrete_shape(node.inputs[0]))
        if axis % rank != rank - 1:
            raise unsupported(node, "softmax over an axis other than the last")
        scores, mask_input = self.masked_scores.get(node.inputs[0], (node.inputs[0], None))
        mask = self.mask_tensor(mask_input, "keys", self.layer_name(node)) if mask_input else None
        self.modes.softmax(self, node, scores, mask)

    def _visit_LayerNormalization(self, node: Node) -> None:
        axis = node.attrs.get("axis", -1)
        rank = len(self.g.concrete_shape(node.inputs[0]))
        if axis % rank != rank - 1:
            raise unsupported(node, "LayerNorm over axes other than the last")
        self.modes.layernorm(self, node)

    # --- data movement -----------------------------------------------------------------------------

    def _moved_input(self, node: Node) -> Value:
        """The input's native form, requantized first when per-channel scales would not follow."""
        v = self.value(node.inputs[0])
        if v.per_channel:
            return self.get(node.inputs[0], self.wanted_bits(node.outputs[0]), node, 0)
        return v

    def _visit_Reshape(self, node: Node) -> None:
        v = self._moved_input(node)
        target = [int(d) for d in self.g.const(node.inputs[1]).reshape(-1)]
        y = self.em.node("Reshape", [v.name], f"{self.layer_name(node)}.reshape", shape=target)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), self.layer_name(node))

    def _visit_Transpose(self, node: Node) -> None:
        v = self._moved_input(node)
        perm = node.attrs.get("perm")
        attrs = {"perm": [int(p) for p in perm]} if perm is not None else {}
        y = self.em.node("Transpose", [v.name], f"{self.layer_name(node)}.transpose", **attrs)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), self.layer_name(node))

    def _visit_Gather(self, node: Node) -> None:
        data, indices = node.inputs
        layer = self.layer_name(node)
        axis = int(node.attrs.get("axis", 0))
        if self.g.is_const(data):
            self._embedding(node, layer, axis)
            return
        if not self.g.is_const(indices):
            raise unsupported(node, "indices computed at run time from activations")
        v = self._moved_input(node)
        idx = self.g.const(indices).astype(np.int64)
        if idx.ndim == 0:
            # One index (a CLS token): a one-wide Slice, then drop the axis. (A 0-d constant
            # is stored with shape [1] by refsim.ir.const_tensor, which would keep the axis.)
            i = int(idx)
            part = self.em.node("Slice", [v.name], f"{layer}.select", starts=[i], ends=[i + 1 if i != -1 else (1 << 62)], axes=[axis])
            target = [0] * len(self.g.concrete_shape(data))
            del target[axis % len(target)]
            target = [d if k < axis % (len(target) + 1) else self.g.concrete_shape(node.outputs[0])[k] for k, d in enumerate(target)]
            y = self.em.node("Reshape", [part], f"{layer}.select", shape=target)
        else:
            y = self.em.node("Gather", [v.name, self.em.const(idx, "int32", f"{layer}.indices")], f"{layer}.gather", axis=axis)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer)

    def _embedding(self, node: Node, layer: str, axis: int) -> None:
        table_name, indices = node.inputs
        if axis != 0:
            raise unsupported(node, "a lookup along an axis other than 0")
        idx = self.value(indices)
        if idx.kind not in ("index", "mask"):
            raise unsupported(node, "embedding indices that are not integers (a model input or integers computed from one)")
        settings = self.options.embedding(layer)
        table = self.g.const(table_name).astype(np.float64)
        wq = quantize_weight(table, settings.wbits, per_channel=False)
        q = self.em.const(wq.q, wq.dtype, f"{layer}.table")
        self.label(q, None, float(wq.scale), layer)
        y = self.em.node("Gather", [q, idx.name], f"{layer}.lookup", axis=0)
        self.record.consts[(node.name, 0)] = (q, float(wq.scale))
        self.record.ranges[q] = weight_range(settings.wbits)[:2]
        self.set_native(node.outputs[0], Value(y, float(wq.scale)), layer)

    def _visit_Slice(self, node: Node) -> None:
        layer = self.layer_name(node)
        v = self._moved_input(node)
        consts = []
        for name in node.inputs[1:]:
            if name and not self.g.is_const(name):
                raise unsupported(node, "slice bounds computed at run time")
            consts.append([int(x) for x in self.g.const(name).reshape(-1)] if name else None)
        while len(consts) < 4:
            consts.append(None)
        starts, ends, axes, steps = consts
        big = (1 << 62)
        ends = [min(max(e, -big), big) for e in ends]
        starts = [min(max(s, -big), big) for s in starts]
        attrs = {"starts": starts, "ends": ends}
        if axes is not None:
            attrs["axes"] = axes
        if steps is not None:
            attrs["steps"] = steps
        y = self.em.node("Slice", [v.name], f"{layer}.slice", **attrs)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer)

    def _visit_Pad(self, node: Node) -> None:
        layer = self.layer_name(node)
        mode = node.attrs.get("mode", "constant")
        value = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
        if mode != "constant" or (value is not None and float(self.g.const(value).reshape(())) != 0.0) or (len(node.inputs) > 3 and node.inputs[3]):
            raise unsupported(node, "padding other than zeros on every axis")
        v = self._moved_input(node)
        pads = [int(p) for p in self.g.const(node.inputs[1]).reshape(-1)]
        rank = len(pads) // 2
        y = v.name
        for axis in range(rank):
            before, after = pads[axis], pads[axis + rank]
            if before < 0 or after < 0:
                raise unsupported(node, "negative padding")
            if before:
                y = self.em.node("Concat", [self._zeros_like(y, axis, before, layer), y], f"{layer}.pad", axis=axis)
            if after:
                y = self.em.node("Concat", [y, self._zeros_like(y, axis, after, layer)], f"{layer}.pad", axis=axis)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer)

    def _zeros_like(self, ref: str, axis: int, count: int, layer: str) -> str:
        """Zeros shaped like `ref` but `count` long on `axis`, from ref itself (so the batch
        dimension follows whatever the run feeds)."""
        size = self.em.builder.tensors[ref].shape[axis]
        if not isinstance(size, int) or count > size:
            raise ExportError(f"{layer}: cannot pad {count} entries on an axis of {size}")
        part = self.em.node("Slice", [ref], f"{layer}.zeros", starts=[0], ends=[count], axes=[axis])
        zero = self.em.const(0, "int8", f"{layer}.zero")
        return self.em.node("Mul", [part, zero], f"{layer}.zeros", dtype=self.dtype(ref).name)

    def _visit_Concat(self, node: Node) -> None:
        layer = self.layer_name(node)
        axis = int(node.attrs["axis"])
        bits = self.options.residual_bits
        dtype = f"int{bits}"
        scale = self.scale_of(node.outputs[0], bits)
        reference = next((i for i in node.inputs if not self.g.is_const(i)), None)
        if reference is None:
            raise unsupported(node, "a concatenation of constants only")
        values = [self.value(t) for t in node.inputs if not self.g.is_const(t)]
        if len(values) == len(node.inputs) and all(not v.per_channel and v.kind in ("int", "acc") for v in values) \
                and len({float(v.scale) for v in values}) == 1:
            # Parts on one grid (a rotary embedding's halves, one of them negated): joined
            # exactly, in the widest of their types, without a requantization.
            wide = type_for_range(min(self.dtype(v.name).lo for v in values), max(self.dtype(v.name).hi for v in values))
            parts = [v.name if self.dtype(v.name).name == wide.name else
                     self.em.node("Cast", [v.name], f"{layer}.widened", dtype=wide.name) for v in values]
            y = self.em.node("Concat", parts, f"{layer}.concat", axis=axis)
            kind = "int" if all(v.kind == "int" for v in values) else "acc"
            self.set_native(node.outputs[0], Value(y, values[0].scale, kind, bound=max(self.bound_of(v) for v in values)), layer)
            return
        parts = []
        for index, t in enumerate(node.inputs):
            if self.g.is_const(t):
                c = self.g.const(t).astype(np.float64)
                q = np.clip(np.rint(c / scale), TYPES[dtype].lo, TYPES[dtype].hi).astype(np.int64)
                name = self.em.const(q, dtype, f"{layer}.const{index}")
                self.record.consts[(node.name, index)] = (name, scale)
                if t in self.g.batch_rows:
                    name = self._per_sample(name, self.value(reference).name, layer, dtype)
                parts.append(name)
            else:
                v = self.value(t)
                if v.kind == "int" and not v.per_channel and self.dtype(v.name).name == dtype and math.isclose(float(v.scale), scale):
                    parts.append(v.name)
                else:
                    r = self.requant(v, scale, bits, f"{layer}.input{index}", layer)
                    self.record.edges[(node.name, index)] = self.edge_spec(Value(r, scale), bits)
                    parts.append(r)
        y = self.em.node("Concat", parts, f"{layer}.concat", axis=axis)
        self.set_native(node.outputs[0], Value(y, scale), layer, quantized_bits=bits)

    def _per_sample(self, const_name: str, reference: str, layer: str, dtype: str) -> str:
        """A one-row constant repeated for every sample of `reference`'s batch: 0 * (a
        one-element slice of the reference per sample) + constant, in the constant's type."""
        rank = len(self.em.builder.tensors[const_name].shape)
        ref_rank = len(self.em.builder.tensors[reference].shape)
        if rank != ref_rank:
            raise ExportError(f"{layer}: cannot repeat a rank-{rank} constant per sample of a rank-{ref_rank} tensor")
        axes = list(range(1, rank))
        part = self.em.node("Slice", [reference], f"{layer}.per_sample", starts=[0] * len(axes), ends=[1] * len(axes), axes=axes)
        zeros = self.em.node("Mul", [part, self.em.const(0, "int8", f"{layer}.zero")], f"{layer}.per_sample", dtype=dtype)
        return self.em.node("Add", [zeros, const_name], f"{layer}.per_sample", dtype=dtype)

    def _visit_ReduceSum(self, node: Node) -> None:
        self._reduce(node, "ReduceSum")

    def _visit_ReduceMean(self, node: Node) -> None:
        self._reduce(node, "ReduceMean")

    def _reduce(self, node: Node, op: str) -> None:
        layer = self.layer_name(node)
        v = self._moved_input(node)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1]:
            axes = [int(a) for a in self.g.const(node.inputs[1]).reshape(-1)]
        attrs = {"keepdims": bool(node.attrs.get("keepdims", 1))}
        if axes is not None:
            attrs["axes"] = [int(a) for a in axes]
        if op == "ReduceMean":
            count = self._reduced_count(node.inputs[0], axes)
            if count is not None and v.kind == "int" and not v.per_channel:
                # The mean of n values at scale s is their exact sum at scale s / n: no rounding
                # here, one where a consumer requantizes it, as the fake-quant model rounds once
                # (a mean rounded to s first put half of I-JEPA's pooled features a step off).
                y = self.em.node("ReduceSum", [v.name], f"{layer}.reducesum", **attrs)
                self.set_native(node.outputs[0], Value(y, float(v.scale) / count, "acc", bound=count * self.bound_of(v)), layer)
                return
            attrs["rounding"] = "half_even"
            y = self.em.node(op, [v.name], f"{layer}.{op.lower()}", **attrs)
            # rounded to the input's grid: the fake-quant model rounds there too
            self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer, quantized_bits=self.dtype(y).bits)
            return
        y = self.em.node(op, [v.name], f"{layer}.{op.lower()}", **attrs)
        self.set_native(node.outputs[0], Value(y, v.scale, v.kind), layer)

    def _reduced_count(self, tensor: str, axes) -> int | None:
        """How many values a reduction over `axes` of `tensor` sums, when the graph fixes it."""
        shape = list(self.g.shape(tensor))
        dims = [parse_dim(d) for d in (shape if axes is None else [shape[a] for a in axes])]
        return math.prod(dims) if all(isinstance(d, int) for d in dims) else None

    # --- masks ---------------------------------------------------------------------------------------

    def mask_tensor(self, mask_input: str, kind: str, layer: str) -> str:
        """The integer form of a mask input: keys (batch, 1, 1, seq) for softmax, tokens
        (batch, seq, 1) for pooling, or the count of kept tokens (batch, 1)."""
        key = (mask_input, kind)
        if key not in self.mask_tensors:
            seq = self.g.concrete_shape(mask_input)[-1]
            if kind == "keys":
                name = self.em.node("Reshape", [mask_input], f"{mask_input}.keys", shape=[0, 1, 1, seq])
            elif kind == "tokens":
                name = self.em.node("Reshape", [mask_input], f"{mask_input}.tokens", shape=[0, seq, 1])
            else:
                name = self.em.node("ReduceSum", [mask_input], f"{mask_input}.count", axes=[1], keepdims=True)
            self.mask_tensors[key] = name
        return self.mask_tensors[key]

    # --- ITA attention blocks ------------------------------------------------------------------

    def _ita_attention(self, m: AttentionMatch) -> None:
        """Emit one attention layer in ITA's graph form (refsim.blocks.ita), per head:
        projections, QK, softmax, AV and output projection, each a 26-bit MatMul and ITA's
        requantizer; the heads summed and requantized once more."""
        from refsim.blocks.ita import ItaAttention, ItaHead, ItaSoftmax, add_attention_block

        name = self.em.name(m.name)
        self.done.update(n.name for n in m.nodes)
        batch, seq, width = self.g.concrete_shape(m.q.x)
        if batch != 1:
            raise ExportError(f"{name}: ITA's attention-block form takes one sample at a time, but the model "
                              f"declares a batch of {batch}; export it at batch 1 or with a free batch")
        heads, p = m.heads, m.head_dim

        gains = {}  # step -> its requantizer's rounding gain (frontend.requant.rounding_gain)
        requant = _ita_steps(name, gains)

        sources = {}

        def as_2d(tensor: str, consumer: Node) -> Value:
            v = sources[tensor] = self.get(tensor, 8, consumer, 0)
            return Value(self.em.node("Reshape", [v.name], f"{name}.{'q' if tensor == m.q.x else 'kv'}_2d", shape=[seq, width]), v.scale)

        x_q = as_2d(m.q.x, m.q.nodes[0])
        x_kv = x_q if m.k.x == m.q.x else as_2d(m.k.x, m.k.nodes[0])
        self.record.edges[(m.k.nodes[0].name, 0)] = self.edge_spec(sources[m.k.x], 8)
        self.record.edges[(m.v.nodes[0].name, 0)] = self.edge_spec(sources[m.k.x], 8)
        settings = self.options.layer(m.q.nodes[0].scope or name)
        softmax = self.modes.softmax_params()
        scales = {}
        quantized = {}
        for key, lin, x in (("q", m.q, x_q), ("k", m.k, x_kv), ("v", m.v, x_kv), ("o", m.o, None)):
            w = self.ptq.weight(lin.x, self.g.const(lin.weight).astype(np.float64), settings, False, lin.nodes[0].scope or name)
            if w.dtype not in ("int8", "int4", "int2", "ternary"):
                raise ExportError(f"{name}: ITA takes 8-bit weights at most, not {w.dtype}")
            quantized[key] = w
            scales[key] = float(w.scale)
        s_q, s_k, s_v = (self.scale_of(lin.out, 8) for lin in (m.q, m.k, m.v))
        s_in, s_a = softmax.input_scale, float(softmax.output_scale)
        s_av, s_out = self.scale_of(m.context, 8), self.scale_of(m.o.out, 8)
        acc_scale = {"q": float(x_q.scale) * scales["q"], "k": float(x_kv.scale) * scales["k"],
                     "v": float(x_kv.scale) * scales["v"], "o": s_av * scales["o"]}

        def bias(lin, key) -> np.ndarray | None:
            if lin.bias is None:
                return None
            b = np.rint(self.g.const(lin.bias).astype(np.float64).reshape(-1) / acc_scale[key]).astype(np.int64)
            if int(np.abs(b).max(initial=0)) >= 1 << 23:
                raise ExportError(f"{name}: the {key.upper()} bias does not fit ITA's 24-bit biases")
            return b

        biases = {key: bias(lin, key) for key, lin in (("q", m.q), ("k", m.k), ("v", m.v), ("o", m.o))}
        head_list = []
        for h in range(heads):
            cols = slice(h * p, (h + 1) * p)
            head_list.append(ItaHead(
                wq=quantized["q"].q[:, cols], wk=quantized["k"].q[:, cols], wv=quantized["v"].q[:, cols],
                wo=quantized["o"].q[cols, :],
                q=requant(acc_scale["q"] / s_q, "Q"), k=requant(acc_scale["k"] / s_k, "K"),
                v=requant(acc_scale["v"] / s_v, "V"), qk=requant(s_q * s_k * m.factor / s_in, "QK"),
                av=requant(s_a * s_v / s_av, "AV"), ow=requant(acc_scale["o"] / s_out, "OW"),
                bq=None if biases["q"] is None else biases["q"][cols],
                bk=None if biases["k"] is None else biases["k"][cols],
                bv=None if biases["v"] is None else biases["v"][cols],
                # the float model adds the output bias once; ITA adds Bo in every head: head 0 carries it
                bo=None if biases["o"] is None else (biases["o"] if h == 0 else np.zeros_like(biases["o"])),
            ))
        params = ItaAttention(head_list, requant(1.0, "the head sum"), ItaSoftmax(softmax.op, dict(softmax.attrs)))
        block = add_attention_block(self.em.builder, name, x_q.name, x_kv.name, params)
        self.unpaired_attention.append(name)
        y = self.em.node("Reshape", [block.out], f"{name}.out_3d", shape=[1, seq, width])
        # Each head's output projection is rounded at s_out * gain; their sum (factor 1) is exact.
        self.set_native(m.o.out, Value(y, s_out), name, quantized_bits=8, gain=gains["OW"])
        self._record_head_sums(m, heads, p, s_out, gains)
        # What the fake-quant model mirrors: weights, biases and every int8 point of the block.
        step_of = {"q": "Q", "k": "K", "v": "V", "o": "OW"}
        for key, lin in (("q", m.q), ("k", m.k), ("v", m.v), ("o", m.o)):
            step = step_of[key]
            axis = 0 if key == "o" else 1
            self.record.consts[(lin.nodes[0].name, 1)] = ({"concat": block.weights[step], "axis": axis}, scales[key])
            self.record.ranges.update((part, weight_range(settings.wbits)[:2]) for part in block.weights[step])
            self.record.ranges.update((part, (1 - (1 << 23), (1 << 23) - 1)) for part in block.biases.get(step, []) if part)
            if lin.bias is not None:
                add = lin.nodes[-1]
                index = add.inputs.index(lin.bias)
                if key == "o":  # head 0 carries the output bias (see above)
                    self.record.consts[(add.name, index)] = (block.biases[step][0], acc_scale[key])
                else:
                    self.record.consts[(add.name, index)] = ({"concat": block.biases[step], "axis": 0}, acc_scale[key])
        for tensor, scale, signed, step in ((m.q.out, s_q, True, "Q"), (m.k.out, s_k, True, "K"), (m.v.out, s_v, True, "V"),
                                            (m.scores, s_in, True, "QK"), (m.probs, s_a, False, None),
                                            (m.context, s_av, True, "AV")):
            self.record_tensor(tensor, float(scale), 8, signed, gains.get(step))
        # the block's softmax, on its int8 scores (m.scores, rounded as the QK step rounds them)
        softmax_node = self.producers.get(m.probs)
        if softmax_node is not None and softmax_node.op == "Softmax" and softmax_node.inputs[0] == m.scores:
            self.record_nonlinear(softmax_node, block.out, softmax.op, softmax.attrs, {}, s_in, s_a)

    def _record_head_sums(self, m: AttentionMatch, heads: int, head_dim: int, s_out: float, gains: dict) -> None:
        """The block rounds each head's output projection (AV_h @ Wo_h, plus Bo in head 0) to
        int8 at s_out * gain and sums the heads' integers (then clips the sum to int8 with the
        head sum's requantizer); the float graph computes one product over all heads. The
        fake-quant model mirrors the block (`fakequant.ita_head_sums`): it slices the product
        per head, rounds each share, sums. This replaces the one rounding of the sum that
        set_native recorded, which is where the two models would part."""
        lin = m.o
        if [n.op for n in lin.nodes] not in (["MatMul"], ["MatMul", "Add"]) or (lin.bias is None) != (len(lin.nodes) == 1):
            return  # another form of the projection: the fake-quant model rounds the sum once, as before
        sum_gain = gains.get("the head sum")
        self.record.tensors.pop(lin.out)
        self.record.head_sums[lin.out] = dict(
            matmul=lin.nodes[0].name, bias_add=lin.nodes[1].name if lin.bias is not None else None,
            heads=int(heads), head_dim=int(head_dim), scale=float(s_out),
            rounding=float(s_out * (gains.get("OW") or 1.0)), sum_rounding=float(s_out * (sum_gain or 1.0)), bits=8,
        )

    # --- ITA feed-forward blocks ---------------------------------------------------------------

    def _ita_feedforward_fits(self, m: FeedForwardMatch) -> bool:
        """Whether ITA computes this feed-forward layer whole: both layers 8-bit per tensor on
        ITA, an integer GELU (not kept float), and one sample [S, E] (or [1, S, E]) in."""
        for lin in (m.fc1, m.fc2):
            settings = self.options.layer(self.layer_name(lin.nodes[0]))
            if not self.modes.on_ita(settings) or settings.per_channel:
                return False
        if self.options.layer(self.layer_name(m.fc2.nodes[0])).abits != 8:
            return False  # ITA's activation unit hands FF2 int8 (a narrower FF2 input needs a requantization between)
        if m.activation.op == "Gelu" and self.options.layers.matching(self.layer_name(m.activation)).get("keep_float"):
            return False
        shape = self.g.concrete_shape(m.fc1.x)
        return len(shape) == 2 or (len(shape) == 3 and shape[0] == 1)

    def _ita_feedforward(self, m: FeedForwardMatch) -> None:
        """Emit one feed-forward layer in ITA's graph form (refsim.blocks.ita): FF1 with its
        bias and requantizer, ITA's GELU (or ReLU and the activation requantizer), FF2. The
        scales are those of the layer-by-layer ITA path: FF1's output at the GELU's input
        scale, the GELU's output and FF2's at their calibrated 8-bit scales."""
        from refsim.blocks.ita import ItaFeedForward, ItaGeluConstants, ItaRequant, add_feedforward_block

        name = self.em.name(m.name)
        self.done.update(n.name for n in m.nodes)
        shape = self.g.concrete_shape(m.fc1.x)
        seq, width = shape[-2:]

        gains = {}  # step -> its requantizer's rounding gain (frontend.requant.rounding_gain)
        requant = _ita_steps(name, gains)

        x = self.get(m.fc1.x, self.options.layer(self.layer_name(m.fc1.nodes[0])).abits, m.fc1.nodes[0], 0)
        x_2d = x.name if len(shape) == 2 else self.em.node("Reshape", [x.name], f"{name}.x_2d", shape=[seq, width])
        weights, acc_scales, biases = [], [], []
        # FF2's columns scaled to about one range (Modes.ita_output_channels): c folds into
        # Wff2 and Bff2, the int8 result's scale is s_f2 * c per channel
        w2 = self.g.const(m.fc2.weight).astype(np.float64)
        b2 = None if m.fc2.bias is None else np.broadcast_to(self.g.const(m.fc2.bias).astype(np.float64).reshape(-1), (w2.shape[1],))
        columns, s_f2_scaled = self.modes.ita_output_channels(self, m.fc2.x, m.fc2.out, w2, b2)
        unit = np.ones(w2.shape[1]) if columns is None else columns
        for lin in (m.fc1, m.fc2):
            settings = self.options.layer(self.layer_name(lin.nodes[0]))
            w_float = self.g.const(lin.weight).astype(np.float64)
            if lin is m.fc2:
                w_float = w_float / unit
            w = quantize_weight(w_float, settings.wbits, per_channel=False)
            if w.dtype not in ("int8", "int4", "int2", "ternary"):
                raise ExportError(f"{name}: ITA takes 8-bit weights at most, not {w.dtype}")
            weights.append(w)
        act = m.activation
        s_f1 = self.modes.ita_output_scale(self, m.fc1.out)  # the GELU's input scale for a GELU
        acc_scales.append(float(x.scale) * float(weights[0].scale))
        gelu = act_rq = None
        if act.op == "Gelu":
            p = nonlinear.pyita_gelu_params(s_f1, self.scale_of(act.outputs[0], 8))
            a = p.attrs
            gelu = ItaGeluConstants(int(a["q_1"]), int(a["q_b"]), int(a["q_c"]))
            act_rq = ItaRequant(int(a["eps_mul"]), int(a["eps_shift"]), int(a["eps_add"]))
            s_act = float(p.output_scale)
            gains["activation"] = nonlinear.pyita_gelu_gain(p)
        else:
            s_act = self.scale_of(act.outputs[0], 8)
            act_rq = requant(s_f1 / s_act, "activation")
        acc_scales.append(s_act * float(weights[1].scale))
        s_f2 = self.modes.ita_output_scale(self, m.fc2.out) if columns is None else s_f2_scaled
        for lin, w, acc_scale in zip((m.fc1, m.fc2), weights, acc_scales):
            if lin.bias is None:
                biases.append(None)
                continue
            b_float = self.g.const(lin.bias).astype(np.float64).reshape(-1)
            b = np.rint((b_float / unit if lin is m.fc2 else b_float) / acc_scale).astype(np.int64)
            if int(np.abs(b).max(initial=0)) >= 1 << 23:
                raise ExportError(f"{name}: the bias of {self.layer_name(lin.nodes[0])} does not fit ITA's 24-bit biases")
            biases.append(np.broadcast_to(b, (w.q.shape[1],)).copy())
        params = ItaFeedForward(
            w1=weights[0].q, w2=weights[1].q, f1=requant(acc_scales[0] / s_f1, "FF1"), f2=requant(acc_scales[1] / s_f2, "FF2"),
            activation=act.op.lower(), act=act_rq, gelu=gelu, b1=biases[0], b2=biases[1],
            # ITA's testbench runs an attention block's phases, then a feed-forward block's, from one folder.
            attention=self.unpaired_attention.pop() if self.unpaired_attention else None,
        )
        self.unpaired_attention.clear()
        block = add_feedforward_block(self.em.builder, name, x_2d, params)
        y = block.out if len(shape) == 2 else self.em.node("Reshape", [block.out], f"{name}.out_3d", shape=[1, seq, width])
        out_scale = s_f2 if columns is None else s_f2 * columns
        self.set_native(m.fc2.out, Value(y, out_scale), name, quantized_bits=8, gain=gains["FF2"])
        # What the fake-quant model mirrors: weights, biases and the block's int8 points
        # (FF2's real weights and biases are the integers times their scale times c).
        for k, (lin, w, acc_scale) in enumerate(zip((m.fc1, m.fc2), weights, acc_scales)):
            factor = 1.0 if k == 0 or columns is None else columns
            self.record.consts[(lin.nodes[0].name, 1)] = (block.weights[k], float(w.scale) * factor)
            self.record.ranges[block.weights[k]] = weight_range(self.options.layer(self.layer_name(lin.nodes[0])).wbits)[:2]
            if lin.bias is not None:
                add = lin.nodes[-1]
                self.record.consts[(add.name, add.inputs.index(lin.bias))] = (block.biases[k], acc_scale * factor)
                self.record.ranges[block.biases[k]] = (1 - (1 << 23), (1 << 23) - 1)  # ITA's 24-bit biases
        self.record_tensor(m.fc1.out, float(s_f1), 8, True, gains["FF1"])
        self.record_tensor(act.outputs[0], float(s_act), 8, True, gains["activation"])
        # Scales on the block's integer points and weights (`refsim compare` reports their SQNR).
        ff = self.em.builder.metadata["feedforward_blocks"][-1]
        if act.op == "Gelu" and act.inputs[0] == m.fc1.out:  # ITA's GELU on FF1's int8 output
            self.record_nonlinear(act, ff["activation"]["out"], p.op, p.attrs, {}, s_f1, s_act)
        self.label(ff["F1"]["out"], m.fc1.out, s_f1, name)
        self.label(ff["activation"]["out"], act.outputs[0], s_act, name)
        self.em.label(x_2d, x.scale)
        self.em.label(block.out, out_scale)
        for k, w in enumerate(weights):
            self.label(block.weights[k], None, float(w.scale) if k == 0 or columns is None else float(w.scale) * columns, name)
