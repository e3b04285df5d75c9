"""The fake-quantized model: the float graph with quantize/dequantize where the integer graph
quantizes, at the same scales.

`fq(x) = clip(round(x / s), lo, hi) * s` is inserted on each edge where the integer graph
requantizes a tensor for a consumer and after each tensor the integer graph stores in fewer
bits (a softmax's input before its key-padding mask, which the integer softmax takes as an
input of its own: `_key_masked`); constants (weights, biases, embedding tables, constants
added or concatenated, NoNorm's gamma and beta) are replaced by their quantized values
times their scales. The model runs in float64 (`_in_float64`), where its products of
quantized values are the integer model's to about 1e-16, and `round` breaks an exact tie
as the integer graph's requantizers do (the record's `rounding`: half up for ITA, to even
for I-BERT; `_rounded`). Records from before (no `rounding`) keep float32 and ONNX's `Round`.

Each nonlinearity the integer graph computes with an integer op (softmax, GELU,
LayerNorm, lookup tables: `FakeQuantRecord.nonlinear`) is computed as that op computes it,
QAT-style (as I-BERT's own quantization-aware modules do): its float node is replaced by
Cast to DOUBLE, round(x / input_scale) (the op's exact integer input), the op's mirror
(`exporters.mirror`: float64 ops exact on integers), times its output scale, Cast to
FLOAT (DOUBLE in the float64 model). The difference between the fake-quant and the integer
model is then what the integer graph computes differently from its record: a defect of
refsim's, or a part the record does not describe. Records without `nonlinear` (older .intq files), ops without a
mirror, and `nonlinear="float"` (`refsim compare --float-nonlinear`) keep the float
nonlinearity: the fake-quant model then also measures what the integer approximations
cost.

The record of where to quantize is JSON (kept in the `.intq` metadata under
`fake_quant`), so `refsim compare` rebuilds this model from the ONNX file and the `.intq`.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx

from .dyadic import ExportError
from .frontend.graph import Graph, Node
from .quantize import FakeQuantRecord


def record_to_json(record: FakeQuantRecord, tensors: dict | None = None) -> dict:
    """The record as JSON. A constant's scale is written as null when the integer tensor
    carries it as its own `scale` metadata (which this sets where it is missing): the
    .intq then holds each per-channel scale vector once, in binary."""

    def scale_json(s):
        return float(s) if np.ndim(s) == 0 else [float(v) for v in np.asarray(s).reshape(-1)]

    def const_scale(spec, s):
        t = tensors.get(spec) if tensors is not None and isinstance(spec, str) else None
        if t is None:
            return scale_json(s)
        if t.scale is None:
            t.scale = scale_json(s)
            if np.ndim(s) == 1 and np.size(s) > 1:
                t.quant_axis = len(t.shape) - 1
        same = np.shape(t.scale) == np.shape(s) and np.array_equal(np.asarray(t.scale, np.float64), np.asarray(s, np.float64))
        return None if same else scale_json(s)

    def edge_json(n, i, s, b, sg, *out):
        row = [n, i, scale_json(s), int(b), bool(sg)]
        return row + [scale_json(out[0])] if out and out[0] is not None else row

    return {
        # [node, index, scale, bits, signed(, output scale)]
        "edges": [edge_json(n, i, *spec) for (n, i), spec in record.edges.items()],
        # [tensor, scale, bits, signed(, rounding scale)]
        "tensors": [[t, scale_json(s), int(b), bool(sg), *(scale_json(r) for r in rounding)]
                    for t, (s, b, sg, *rounding) in record.tensors.items()],
        # q: a tensor name or {"concat": [...], "axis": a}; scale null: the tensor's own scale
        "consts": [[n, i, q, const_scale(q, s)] for (n, i), (q, s) in record.consts.items()],
        "rounding": record.rounding,
        # [float node, {node, op, attrs, consts, input_scale, input_mul, output_scale, mask}]
        "nonlinear": [[name, {"node": nl.node, "op": nl.op, "attrs": {k: _json_value(v) for k, v in nl.attrs.items()},
                              "consts": {str(i): c for i, c in nl.consts.items()},
                              "input_scale": scale_json(nl.input_scale), "input_mul": int(nl.input_mul),
                              "output_scale": scale_json(nl.output_scale),
                              "mask": None if nl.mask is None else [nl.mask[0], [int(d) for d in nl.mask[1]]]}]
                      for name, nl in record.nonlinear.items()],
        **head_sums_json(record),
    }


def _json_value(v):
    """An op attribute as JSON: NumPy scalars and arrays become numbers and lists."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_json_value(e) for e in v]
    return v


def head_sums_json(record: FakeQuantRecord) -> dict:
    """The ITA attention blocks' per-head output roundings (`ita_head_sums`), when any."""
    return {"head_sums": [{"tensor": t, **spec} for t, spec in record.head_sums.items()]} if record.head_sums else {}


def _levels(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


NONLINEAR_MODES = ("integer", "float")


def fake_quant_graph(g: Graph, record: dict, integer_consts: dict[str, np.ndarray],
                     integer_scales: dict | None = None, nonlinear: str = "integer") -> Graph:
    """A copy of `g` with the recorded quantization applied (see the module docstring).
    `integer_scales` gives the `scale` metadata of the integer constants, for records
    that refer to it (a null scale). `nonlinear="float"` keeps every nonlinearity float
    (the fake-quant model before the mirrors)."""
    if nonlinear not in NONLINEAR_MODES:
        raise ExportError(f"nonlinear must be one of {', '.join(NONLINEAR_MODES)}, got {nonlinear!r}")
    fg = copy.deepcopy(g)
    by_name = {n.name: n for n in fg.nodes}
    mirrored = _mirrored(record, by_name, integer_consts) if nonlinear == "integer" else {}
    # a mirror computes its op's integers exactly: its output is not rounded again
    mirrored_outputs = {by_name[name].outputs[0] for name in mirrored}
    added: list[tuple[int, Node]] = []  # (position to insert before, node)
    cache: dict[tuple, str] = {}

    ties = record.get("rounding")  # how the requantizers break ties; None: a record from before the float64 model
    real = np.float64 if ties else np.float32

    def fq_chain(x: str, scale, bits: int, signed: bool, out: str | None = None, out_scale=None) -> tuple[list[Node], str]:
        lo, hi = _levels(bits, signed)
        s = fg.add_const(np.array(scale, real), "fq.scale")
        s_out = s if out_scale is None else fg.add_const(np.array(out_scale, real), "fq.scale")
        lo_c = fg.add_const(np.array(lo, real), "fq.lo")
        hi_c = fg.add_const(np.array(hi, real), "fq.hi")
        d = fg.make_node("Div", [x, s], f"{x}.fq")
        steps = [d, *(_rounded(fg, d.outputs[0], ties, f"{x}.fq") if ties else [fg.make_node("Round", d.outputs, f"{x}.fq")])]
        c = fg.make_node("Clip", [steps[-1].outputs[0], lo_c, hi_c], f"{x}.fq")
        m = fg.make_node("Mul", [c.outputs[0], s_out], f"{x}.fq")
        if out is not None:
            m.outputs = [out]
        return [*steps, c, m], m.outputs[0]

    def position_after(tensor: str) -> int:
        for i, n in enumerate(fg.nodes):
            if tensor in n.outputs:
                return i + 1
        return 0

    for node_name, index, int_spec, scale in record.get("consts", []):
        node = by_name.get(node_name)
        # A constant is one integer tensor, or several joined (an ITA block's per-head weights).
        parts = int_spec["concat"] if isinstance(int_spec, dict) else [int_spec]
        if node is None or any(part not in integer_consts for part in parts):
            raise ExportError(f"the .intq's fake-quant record names node {node_name!r} or constant {int_spec!r}, "
                              f"which this ONNX model does not have: is it the model the .intq was exported from?")
        original = fg.consts[node.inputs[index]]
        arrays = [np.asarray(integer_consts[part], np.float64) for part in parts]
        q = np.concatenate(arrays, axis=int_spec.get("axis", 0)) if isinstance(int_spec, dict) else arrays[0]
        if scale is None:
            scale = (integer_scales or {}).get(parts[0])
            if scale is None:
                raise ExportError(f"the .intq's fake-quant record takes the scale of constant {parts[0]!r}, which has none")
        value = q * np.asarray(scale, np.float64)
        replaced = fg.add_const(value.reshape(original.shape).astype(real), "fq.const")
        if node.inputs[index] in fg.batch_rows:
            fg.batch_rows.add(replaced)
        node.inputs[index] = replaced

    ita_head_sums(fg, record.get("head_sums", []), fq_chain)

    for tensor, scale, bits, signed, *rounding in record.get("tensors", []):
        if tensor in mirrored_outputs:
            continue
        # rounded at the scale the integer graph's requantizer realizes, dequantized by `scale`
        rounding_scale, out_scale = (rounding[0], scale) if rounding else (scale, None)
        if tensor in fg.inputs:
            chain, out = fq_chain(tensor, rounding_scale, bits, signed, out_scale=out_scale)
            for n in fg.nodes:
                n.inputs = [out if i == tensor else i for i in n.inputs]
            added.extend((0, n) for n in chain)
            continue
        producer = next((n for n in fg.nodes if tensor in n.outputs), None)
        if producer is None:
            raise ExportError(f"the .intq's fake-quant record names tensor {tensor!r}, which this ONNX model does not compute")
        raw = fg.fresh(f"{tensor}.float")
        producer.outputs = [raw if o == tensor else o for o in producer.outputs]
        chain, _ = fq_chain(raw, rounding_scale, bits, signed, out=tensor, out_scale=out_scale)
        added.extend((position_after(raw), n) for n in chain)

    for node_name, index, scale, bits, signed, *out_scale in record.get("edges", []):
        node = by_name.get(node_name)
        if node is None:
            raise ExportError(f"the .intq's fake-quant record names node {node_name!r}, which this ONNX model does not have")
        masked = _key_masked(fg, node.inputs[index]) if node.op == "Softmax" and index == 0 else None
        if masked is not None:
            # The integer graph quantizes the scores and masks keys in the softmax: quantized
            # after the mask, a masked score would be clipped to the grid's finite minimum and
            # its key keep a share of the float softmax. Quantized before it, the masked
            # scores stay at the mask's lowest float and exp gives exactly 0, as in the float model.
            node, index = masked, next(i for i, t in enumerate(masked.inputs) if t not in fg.key_padding_masks)
        x = node.inputs[index]
        out_scale = out_scale[0] if out_scale else None
        key = (x, np.asarray(scale).tobytes(), bits, signed, None if out_scale is None else np.asarray(out_scale).tobytes())
        if key not in cache:
            chain, out = fq_chain(x, scale, bits, signed, out_scale=out_scale)
            cache[key] = out
            added.extend((position_after(x), n) for n in chain)
        node.inputs[index] = cache[key]

    fg.nodes.extend(n for _, n in added)
    for name, (build, spec) in mirrored.items():
        _mirror_node(fg, by_name[name], build, spec, integer_consts)
    if ties:
        _in_float64(fg)
    fg.toposort()
    return fg


# An exact tie of the integer requantizer (its value is a multiple of 2^-shift, and ITA's 8-bit
# multipliers make half-way values common: 0.8% of CamemBERT's first output projection) reaches
# the fake-quant model as k + 1/2 within float64's error of the float products, about 1e-11 at
# |x / s| < 2^16. Values within TIE of k + 1/2 are taken for the tie: above any float64 error
# and below the spacing 2^-shift of real values for shift <= 30 (ITA's requantizers); for the
# 31-bit dyadic multipliers it takes 2^-29 of all values, near-ties, for ties.
TIE = 2.0 ** -30


def _rounded(fg: Graph, v: str, rounding: str, stem: str) -> list[Node]:
    """Nodes rounding v to an integer as the integer graph's requantizers do, an exact tie
    (within TIE) half up (ITA) or to even (I-BERT)."""
    tie = fg.add_const(np.array(TIE, np.float64), "fq.tie")
    half = fg.add_const(np.array(0.5, np.float64), "fq.half")
    shifted = fg.make_node("Add", [v, half], stem)
    nudged = fg.make_node("Add", [shifted.outputs[0], tie], stem)
    up = fg.make_node("Floor", nudged.outputs, stem)  # k + 1/2 (within TIE) -> k + 1
    if rounding == "half_up":
        return [shifted, nudged, up]
    # to even: a tie whose upper neighbour is odd goes down
    gap = fg.make_node("Sub", [shifted.outputs[0], up.outputs[0]], stem)
    size = fg.make_node("Abs", gap.outputs, stem)
    at_tie = fg.make_node("Less", [size.outputs[0], tie], stem)
    parity = fg.make_node("Mod", [up.outputs[0], fg.add_const(np.array(2.0, np.float64), "fq.two")], stem, fmod=1)
    even = fg.make_node("Equal", [parity.outputs[0], fg.add_const(np.array(0.0, np.float64), "fq.zero")], stem)
    odd = fg.make_node("Not", even.outputs, stem)
    down = fg.make_node("And", [at_tie.outputs[0], odd.outputs[0]], stem)
    lower = fg.make_node("Sub", [up.outputs[0], fg.add_const(np.array(1.0, np.float64), "fq.one")], stem)
    result = fg.make_node("Where", [down.outputs[0], lower.outputs[0], up.outputs[0]], stem)
    return [shifted, nudged, up, gap, size, at_tie, parity, even, odd, down, lower, result]


# onnxruntime has no float64 kernel for these: they run in float32 between two Casts.
FLOAT32_ONLY_OPS = ("Gelu", "Erf")


def _in_float64(fg: Graph) -> None:
    """The whole fake-quant model in float64: its float products of quantized values are then
    the integer model's exact ones to about 1e-16, so it rounds where the integer model rounds,
    ties included (`_rounded`). Float inputs are cast on entry and outputs back to float32."""
    for name, value in list(fg.consts.items()):
        if np.asarray(value).dtype == np.float32:
            fg.consts[name] = np.asarray(value, np.float64)
            if fg.const_types.get(name) == onnx.TensorProto.FLOAT:
                fg.const_types[name] = onnx.TensorProto.DOUBLE
    for node in list(fg.nodes):
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.DOUBLE
        elif node.op in FLOAT32_ONLY_OPS:
            narrowed = fg.make_node("Cast", [node.inputs[0]], f"{node.name}.f32", node.scope, to=onnx.TensorProto.FLOAT)
            widened = fg.make_node("Cast", [fg.fresh(f"{node.outputs[0]}.f32")], f"{node.name}.f64", node.scope,
                                   to=onnx.TensorProto.DOUBLE)
            widened.outputs, node.outputs = [node.outputs[0]], list(widened.inputs)
            node.inputs = [narrowed.outputs[0], *node.inputs[1:]]
            position = fg.nodes.index(node)
            fg.nodes[position:position + 1] = [narrowed, node, widened]
    for name in fg.inputs:
        if fg.input_types[name][0] != onnx.TensorProto.FLOAT:
            continue
        wide = fg.make_node("Cast", [name], f"{name}.f64", to=onnx.TensorProto.DOUBLE)
        for node in fg.nodes:
            node.inputs = [wide.outputs[0] if i == name else i for i in node.inputs]
        fg.nodes.insert(0, wide)
    for k, name in enumerate(fg.outputs):
        if fg.output_types.get(name, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            continue
        producer = next(n for n in fg.nodes if name in n.outputs)
        inner = fg.fresh(f"{name}.f64")
        producer.outputs = [inner if o == name else o for o in producer.outputs]
        for node in fg.nodes:
            node.inputs = [inner if i == name else i for i in node.inputs]
        back = fg.make_node("Cast", [inner], f"{name}.f32", to=onnx.TensorProto.FLOAT)
        back.outputs = [name]
        fg.nodes.append(back)
        fg.output_types[name] = onnx.TensorProto.FLOAT


def ita_head_sums(fg: Graph, entries: list[dict], fq_chain) -> None:
    """Mirror how an ITA attention block computes its output projection (recorded by
    `Walker._record_head_sums`): the block rounds each head's share AV_h @ Wo_h (+ Bo in head
    0) to int8 at its requantizer's scale, then sums the heads' integers and clips the sum to
    int8; the float graph computes the whole product x @ Wo + Bo and would round it once. Here
    the product becomes H products of the head's columns of x (its context, heads concatenated
    along the last axis) with the head's rows of the (already fake-quantized) Wo, each rounded,
    summed, and the sum fake-quantized by the head sum's requantizer. Runs after the constants
    are replaced (it slices the quantized Wo)."""
    by_name = {n.name: n for n in fg.nodes}
    for e in entries:
        matmul = by_name.get(e["matmul"])
        add = by_name.get(e["bias_add"]) if e.get("bias_add") else None
        if matmul is None or (e.get("bias_add") and add is None) or matmul.inputs[1] not in fg.consts:
            raise ExportError(f"the .intq's fake-quant record names the output projection {e['matmul']!r}, which this ONNX "
                              f"model does not compute: is it the model the .intq was exported from?")
        x, w = matmul.inputs[0], np.asarray(fg.consts[matmul.inputs[1]])
        bias = None if add is None else next(i for i in add.inputs if i != matmul.outputs[0])
        heads, p, bits = int(e["heads"]), int(e["head_dim"]), int(e["bits"])
        fg.nodes = [n for n in fg.nodes if n is not matmul and n is not add]
        shares = []
        for h in range(heads):
            start, stop = fg.add_const(np.array([h * p], np.int64), "fq.head"), fg.add_const(np.array([(h + 1) * p], np.int64), "fq.head")
            xs = fg.make_node("Slice", [x, start, stop, fg.add_const(np.array([-1], np.int64), "fq.head")], f"{x}.head{h}")
            y = fg.make_node("MatMul", [xs.outputs[0], fg.add_const(w[h * p:(h + 1) * p], "fq.head_weight")], f"{x}.head{h}")
            nodes = [xs, y]
            if h == 0 and bias is not None:  # the block adds Bo in head 0 only
                y = fg.make_node("Add", [y.outputs[0], bias], f"{x}.head{h}")
                nodes.append(y)
            chain, share = fq_chain(y.outputs[0], e["rounding"], bits, True, out_scale=e["scale"])
            fg.nodes.extend(nodes + chain)
            shares.append(share)
        total = fg.make_node("Sum", shares, f"{e['tensor']}.heads") if heads > 1 else None
        fg.nodes.extend([total] if total else [])
        chain, _ = fq_chain(total.outputs[0] if total else shares[0], e["sum_rounding"], bits, True,
                            out=e["tensor"], out_scale=e["scale"])
        fg.nodes.extend(chain)


def _mirrored(record: dict, by_name: dict[str, Node], integer_consts: dict[str, np.ndarray]) -> dict:
    """float node -> (builder, record entry) for the recorded nonlinear nodes that have a
    mirror (`exporters.mirror`); a node whose integer op has none stays float."""
    from .mirror import builder

    out = {}
    for name, spec in record.get("nonlinear", []):
        if name not in by_name:
            raise ExportError(f"the .intq's fake-quant record names node {name!r}, which this ONNX model does not have")
        missing = [c for c in spec.get("consts", {}).values() if c not in integer_consts]
        if missing:
            raise ExportError(f"the .intq's fake-quant record takes constant {missing[0]!r} for node {name!r}, "
                              f"which the .intq does not have")
        build = builder(spec["op"])
        if build is not None:
            out[name] = (build, spec)
    return out


def _key_masked(fg: Graph, tensor: str) -> Node | None:
    """The Add that puts a key-padding mask (`Graph.key_padding_masks`, the canonical
    additive mask) on the scores `tensor` is made of, if it is one."""
    producer = next((n for n in fg.nodes if tensor in n.outputs), None)
    if producer is None or producer.op != "Add" or not any(i in fg.key_padding_masks for i in producer.inputs):
        return None
    return producer


def _scale_const(fg: Graph, scale) -> str:
    return fg.add_const(np.asarray(scale, np.float64), "fq.nl_scale")


def _mirror_node(fg: Graph, node: Node, build, spec: dict, integer_consts: dict[str, np.ndarray]) -> None:
    """Replace float `node` by Cast to DOUBLE, round(x / input_scale) * input_mul (the
    integer op's exact input), the mirror, times output_scale, Cast back to FLOAT."""
    from .mirror import emit

    stem = f"{node.name}.mirror"
    x = node.inputs[0]
    masked = _key_masked(fg, x) if spec.get("mask") else None
    if masked is not None:
        # The integer op takes the scores before the mask, and the mask as its own input (below).
        x = next(i for i in masked.inputs if i not in fg.key_padding_masks)
        if all(masked.outputs[0] not in n.inputs for n in fg.nodes if n is not node):
            fg.nodes.remove(masked)
    x = emit(fg, "Cast", [x], stem, to=onnx.TensorProto.DOUBLE)
    x = emit(fg, "Round", [emit(fg, "Div", [x, _scale_const(fg, spec["input_scale"])], stem)], stem)
    if spec.get("input_mul", 1) != 1:
        x = emit(fg, "Mul", [x, _scale_const(fg, float(spec["input_mul"]))], stem)
    inputs = [x]
    if spec.get("mask"):
        mask_input, shape = spec["mask"]
        # 0/1: a nonzero mask value keeps a position (refsim.ops.softmax)
        mask = emit(fg, "Cast", [mask_input], stem, to=onnx.TensorProto.DOUBLE)
        masked = emit(fg, "Equal", [mask, fg.add_const(np.asarray(0.0), "fq.nl_zero")], stem)
        keep = emit(fg, "Cast", [emit(fg, "Not", [masked], stem)], stem, to=onnx.TensorProto.DOUBLE)
        inputs.append(emit(fg, "Reshape", [keep, fg.add_const(np.asarray(shape, np.int64), "fq.nl_shape")], stem))
    consts = {int(i): np.asarray(integer_consts[c]) for i, c in spec.get("consts", {}).items()}
    try:
        y = build(fg, inputs, spec.get("attrs", {}), consts)
    except ExportError as e:
        raise ExportError(f"{node.describe()}: {e}") from None
    y = emit(fg, "Mul", [y, _scale_const(fg, spec["output_scale"])], stem)
    out = fg.make_node("Cast", [y], stem, to=onnx.TensorProto.FLOAT)
    out.outputs = [node.outputs[0]]
    fg.nodes.remove(node)
    fg.nodes.append(out)


def fake_quant_model(g: Graph, record: dict, integer_consts: dict[str, np.ndarray],
                     integer_scales: dict | None = None, nonlinear: str = "integer") -> onnx.ModelProto:
    return fake_quant_graph(g, record, integer_consts, integer_scales, nonlinear).to_model()
