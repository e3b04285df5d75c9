"""The graph form of one ITA attention block, and the record that finds it again.

docs/ITA.md is the contract; in short, per head h, with q [S, E] and kv [S, E] int8:

    Q_acc = MatMul(q,  Wq, bias=Bq; acc_bits=26, overflow=saturate)    int32 [S, P]
    Q     = Requant(Q_acc, mul, shift, -, add; rounding=half_up, dtype=int8)
    K, V  likewise from kv
    QK_acc = MatMul(Q, K; transB) -> QK = Requant(...)                int8  [S, S]
    A      = ITAPartialMax(QK) (or ITAMax)                              uint8 [S, S]
    AV_acc = MatMul(A, V) -> AV = Requant(...)                          int8  [S, P]
    OW_acc = MatMul(AV, Wo, bias=Bo) -> OW = Requant(...)               int8  [S, E]

then the heads are combined as ITA does: the per-head int8 outputs are stacked
(`heads` [H, S, E]), summed over heads exactly (`sum`), and requantized once more with
one shared (mul, shift, add) into the block output `out` [S, E] int8.

ITA's feed-forward layer, on x [S, E] int8:

    F1_acc = MatMul(x, Wff, bias=Bff; acc_bits=26, saturate)    -> F1 = Requant(...)   int8 [S, F]
    act    = F1 (identity) | Requant(Relu(F1)) | ITAGelu(F1; ..., eps_*)               int8 [S, F]
    F2_acc = MatMul(act, Wff2, bias=Bff2; ...)                   -> F2 = Requant(...)   int8 [S, E]

`add_attention_block` and `add_feedforward_block` build these from integers and append a
record to `metadata["attention_blocks"]` / `metadata["feedforward_blocks"]`; `read_block`
and `read_feedforward_block` check a graph against a record and return every tensor and
parameter the `ita` target needs. Only integers here: the float work (scales -> mul/shift)
belongs to the exporters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from refsim.errors import GraphError

FORM = "ita-attention"
FORM_VERSION = 1
ACC_BITS = 26  # ITA's accumulator width (WO); PyITA saturates to it
PROJECTIONS = ("Q", "K", "V")
# PyITA's requantization steps, in the order of its RQS_* files.
STEPS = ("Q", "K", "V", "QK", "AV", "OW", "SUM")
SOFTMAX_OPS = ("ITAPartialMax", "ITAMax")


@dataclass(frozen=True)
class ItaRequant:
    """ITA's requantizer: clip(round_half_up(x * mul / 2^shift) + add, -128, 127)."""

    mul: int  # unsigned 8-bit eps_mult
    shift: int  # 8-bit right_shift
    add: int = 0  # signed 8-bit add


@dataclass
class ItaHead:
    """One head's integer parameters. Weights are [in, out]; biases None for no bias."""

    wq: Any
    wk: Any
    wv: Any
    wo: Any
    q: ItaRequant
    k: ItaRequant
    v: ItaRequant
    qk: ItaRequant
    av: ItaRequant
    ow: ItaRequant
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None


def _ita_rtl_softmax() -> dict[str, Any]:
    # The switches of today's ITA RTL, which PyITA's golden files reproduce (docs/OPS.md).
    from refsim.ops.softmax import ITA_PRESETS

    return dict(ITA_PRESETS["ita_rtl"])


@dataclass
class ItaSoftmax:
    """The softmax op and its attributes, passed through unchanged (default: ITA RTL's)."""

    op: str = "ITAPartialMax"
    attrs: dict[str, Any] = field(default_factory=_ita_rtl_softmax)


@dataclass
class ItaAttention:
    heads: list[ItaHead]
    sum: ItaRequant
    softmax: ItaSoftmax = field(default_factory=ItaSoftmax)


def _dims(b, q: str, kv: str, head: ItaHead) -> tuple[Any, int, int]:
    tq, tkv = b.tensors[q], b.tensors[kv]
    if len(tq.shape) != 2 or len(tkv.shape) != 2:
        raise GraphError(f"ITA attention inputs must be 2-D [S, E]; got {list(tq.shape)} and {list(tkv.shape)}")
    if tq.shape != tkv.shape:
        raise GraphError(f"ITA attention: q {list(tq.shape)} and kv {list(tkv.shape)} must have one shape [S, E]")
    wq = np.asarray(head.wq)
    if wq.ndim != 2:
        raise GraphError(f"ITA attention: Wq must be [E, P], got shape {list(wq.shape)}")
    return tq.shape[0], int(wq.shape[0]), int(wq.shape[1])


def _requant_node(b, acc: str, rq: ItaRequant, out: str) -> str:
    mul = b.const(rq.mul, "uint8", name=f"{out}.mul")
    shift = b.const(rq.shift, "uint8", name=f"{out}.shift")
    add = b.const(rq.add, "int8", name=f"{out}.add")
    return b.node("Requant", [acc, mul, shift, None, add], outputs=out, name=out, rounding="half_up", dtype="int8")


def _matmul(b, a: str, w: str, bias: str | None, out: str, **attrs) -> str:
    return b.node("MatMul", [a, w, None, None, bias], outputs=out, name=out, acc_bits=ACC_BITS, overflow="saturate", **attrs)


def _projection(b, prefix: str, x: str, step: str, letter: str, weight, bias, rq: ItaRequant) -> dict[str, Any]:
    w = b.const(weight, "int8", name=f"{prefix}.W{letter}")
    bias_name = None if bias is None else b.const(bias, "int32", name=f"{prefix}.B{letter}")
    acc = _matmul(b, x, w, bias_name, f"{prefix}.{step}_acc")
    out = _requant_node(b, acc, rq, f"{prefix}.{step}")
    return {"weight": w, "bias": bias_name, "acc": acc, "out": out, "requant": out}


@dataclass(frozen=True)
class AttentionBlockNames:
    """What `add_attention_block` created: its output tensor and, per projection step
    ("Q", "K", "V", "OW"), the weight and bias constants of every head (None: no bias)."""

    out: str
    weights: dict[str, list[str]]
    biases: dict[str, list[str | None]]


def add_attention_block(b, name: str, q: str, kv: str, params: ItaAttention) -> AttentionBlockNames:
    """Append one ITA attention block to GraphBuilder `b`.

    `q` and `kv` are existing int8 [S, E] tensors (the same name for self-attention). Every
    tensor and node the block adds is named `<name>.<...>`; the block is recorded in
    `b.metadata["attention_blocks"]` (see docs/ITA.md).
    """
    if not params.heads:
        raise GraphError(f"ITA attention block {name!r}: needs at least one head")
    if params.softmax.op not in SOFTMAX_OPS:
        raise GraphError(f"ITA attention block {name!r}: softmax must be one of {SOFTMAX_OPS}, got {params.softmax.op!r}")
    S, E, P = _dims(b, q, kv, params.heads[0])
    heads = []
    reshaped = []
    for h, head in enumerate(params.heads):
        prefix = f"{name}.h{h}"
        rec: dict[str, Any] = {
            "Q": _projection(b, prefix, q, "Q", "q", head.wq, head.bq, head.q),
            "K": _projection(b, prefix, kv, "K", "k", head.wk, head.bk, head.k),
            "V": _projection(b, prefix, kv, "V", "v", head.wv, head.bv, head.v),
        }
        acc = _matmul(b, rec["Q"]["out"], rec["K"]["out"], None, f"{prefix}.QK_acc", transB=True)
        rec["QK"] = {"acc": acc, "out": _requant_node(b, acc, head.qk, f"{prefix}.QK"), "requant": f"{prefix}.QK"}
        a = b.node(params.softmax.op, [rec["QK"]["out"]], outputs=f"{prefix}.A", name=f"{prefix}.A", **params.softmax.attrs)
        rec["A"] = {"out": a, "node": a}
        acc = _matmul(b, a, rec["V"]["out"], None, f"{prefix}.AV_acc")
        rec["AV"] = {"acc": acc, "out": _requant_node(b, acc, head.av, f"{prefix}.AV"), "requant": f"{prefix}.AV"}
        rec["OW"] = _projection(b, prefix, rec["AV"]["out"], "OW", "o", head.wo, head.bo, head.ow)
        heads.append(rec)
        reshaped.append(b.node("Reshape", [rec["OW"]["out"]], outputs=f"{prefix}.OW_1SE", name=f"{prefix}.OW_1SE", shape=[1, -1, E]))
    stack = b.node("Concat", reshaped, outputs=f"{name}.heads", name=f"{name}.heads", axis=0)
    total = b.node("ReduceSum", [stack], outputs=f"{name}.sum", name=f"{name}.sum", axes=[0], keepdims=False)
    out = _requant_node(b, total, params.sum, f"{name}.out")
    record = {
        "name": name,
        "form": FORM,
        "version": FORM_VERSION,
        "S": S if isinstance(S, int) else None,
        "E": E,
        "P": P,
        "H": len(params.heads),
        "q": q,
        "kv": kv,
        "softmax": {"op": params.softmax.op, "attrs": dict(params.softmax.attrs)},
        "heads": heads,
        "heads_out": stack,
        "sum": {"acc": total, "out": out, "requant": out},
    }
    b.metadata.setdefault("attention_blocks", []).append(record)
    steps = ("Q", "K", "V", "OW")
    return AttentionBlockNames(
        out=out,
        weights={step: [rec[step]["weight"] for rec in heads] for step in steps},
        biases={step: [rec[step]["bias"] for rec in heads] for step in steps},
    )


# --- reading a block back -----------------------------------------------------------------

ITA_TILE = 64
ITA_MAX_DIM = 512
BIAS_BITS = 24


@dataclass
class RequantParams:
    node: str
    mul: int
    shift: int
    add: int


@dataclass
class ItaBlock:
    """A recorded block, checked against its graph: names, constants and parameters."""

    name: str
    H: int
    E: int
    P: int
    q: str
    kv: str
    softmax: dict[str, Any]
    heads: list[dict[str, dict[str, Any]]]  # step -> {"out", "acc", "weight", "bias", "requant": RequantParams}
    heads_out: str
    sum: dict[str, Any]

    def requant_table(self, field_name: str) -> list[list[int]]:
        """[H][7] values of one requant field in PyITA's step order; SUM is shared by all heads."""
        rows = []
        for head in self.heads:
            row = [getattr(head[step]["requant"], field_name) for step in STEPS[:-1]]
            rows.append(row + [getattr(self.sum["requant"], field_name)])
        return rows


class _Problems:
    def __init__(self, where: str):
        self.where = where
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, what: str) -> None:
        if self.items:
            raise GraphError(f"{self.where}: {what}: " + "; ".join(self.items))


def _const_scalar(graph, name: str, what: str, problems: _Problems) -> int | None:
    t = graph.tensors.get(name) if name else None
    if t is None or not t.is_const:
        problems.add(f"{what} is not a constant")
        return None
    if t.data.size != 1:
        problems.add(f"{what} must be one value per tensor, got shape {list(t.data.shape)}")
        return None
    return int(t.data.reshape(-1)[0])


def _producer(graph, producers, name: str, op: str | tuple, problems: _Problems):
    if not name or name not in graph.tensors:
        problems.add(f"tensor {name!r} is not in the graph")
        return None
    node = producers.get(name)
    ops = (op,) if isinstance(op, str) else op
    if node is None or node.op not in ops:
        problems.add(f"{name!r} must be produced by {' or '.join(ops)}, found {node.op if node else 'no node'}")
        return None
    return node


def _check_matmul(graph, producers, acc: str, a: str, b: str, bias: str | None, trans_b: bool, problems: _Problems):
    node = _producer(graph, producers, acc, "MatMul", problems)
    if node is None:
        return
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    if ins[0] != a or ins[1] != b:
        problems.add(f"{node.describe()} must multiply {a!r} by {b!r}, not {ins[0]!r} by {ins[1]!r}")
    if ins[2] or ins[3]:
        problems.add(f"{node.describe()} must have no zero points")
    if (ins[4] or None) != (bias or None):
        problems.add(f"{node.describe()} must add bias {bias!r}, found {ins[4] or None!r}")
    attrs = node.attrs
    if bool(attrs.get("transA", False)) or bool(attrs.get("transB", False)) != trans_b:
        problems.add(f"{node.describe()} must have transA=false, transB={str(trans_b).lower()}")
    if attrs.get("acc_bits", 32) != ACC_BITS or attrs.get("overflow", "error") != "saturate":
        problems.add(f"{node.describe()} must accumulate in {ACC_BITS} bits with overflow=saturate, as ITA does")


def _check_requant(graph, producers, out: str, acc: str, problems: _Problems) -> RequantParams | None:
    node = _producer(graph, producers, out, "Requant", problems)
    if node is None:
        return None
    ins = list(node.inputs) + [""] * (5 - len(node.inputs))
    if ins[0] != acc:
        problems.add(f"{node.describe()} must requantize {acc!r}, not {ins[0]!r}")
    if ins[3]:
        problems.add(f"{node.describe()} must have no bias input (ITA adds biases in the MatMul)")
    attrs = node.attrs
    if attrs.get("rounding", "half_up") != "half_up" or attrs.get("dtype", "int8") != "int8":
        problems.add(f"{node.describe()} must round half_up into int8")
    if attrs.get("lo") not in (None, -128) or attrs.get("hi") not in (None, 127):
        problems.add(f"{node.describe()} must clip to the full int8 range")
    what = node.describe()
    mul = _const_scalar(graph, ins[1], f"{what} mul", problems)
    shift = _const_scalar(graph, ins[2], f"{what} shift", problems)
    add = _const_scalar(graph, ins[4], f"{what} offset", problems) if ins[4] else 0
    if None in (mul, shift, add):
        return None
    return RequantParams(node.name, mul, shift, add)


def attention_records(graph) -> list[dict[str, Any]]:
    records = graph.metadata.get("attention_blocks", [])
    if not isinstance(records, list):
        raise GraphError("metadata attention_blocks must be a list of block records")
    return [r for r in records if isinstance(r, dict) and r.get("form") == FORM]


def read_block(graph, record: dict[str, Any]) -> ItaBlock:
    """Check that the graph computes the recorded block in the ITA form; resolve it."""
    name = str(record.get("name", "?"))
    problems = _Problems(f"attention block {name!r}")
    if record.get("version") != FORM_VERSION:
        raise GraphError(f"attention block {name!r}: form version {record.get('version')!r}, this refsim reads {FORM_VERSION}")
    producers = graph.producers()
    try:
        q, kv, heads_rec = record["q"], record["kv"], record["heads"]
        E, P, H = int(record["E"]), int(record["P"]), int(record["H"])
        sum_rec, heads_out, softmax = record["sum"], record["heads_out"], record["softmax"]
    except (KeyError, TypeError, ValueError) as e:
        raise GraphError(f"attention block {name!r}: malformed record ({e})") from None
    if len(heads_rec) != H:
        problems.add(f"H = {H} but {len(heads_rec)} heads are recorded")
    heads = []
    try:
        for h, rec in enumerate(heads_rec):
            head = {}
            inputs = {"Q": q, "K": kv, "V": kv}
            for step in PROJECTIONS + ("OW",):
                r = rec[step]
                x = inputs.get(step, rec["AV"]["out"])
                _check_matmul(graph, producers, r["acc"], x, r["weight"], r.get("bias"), False, problems)
                head[step] = {**r, "requant": _check_requant(graph, producers, r["out"], r["acc"], problems)}
            r = rec["QK"]
            _check_matmul(graph, producers, r["acc"], rec["Q"]["out"], rec["K"]["out"], None, True, problems)
            head["QK"] = {**r, "requant": _check_requant(graph, producers, r["out"], r["acc"], problems)}
            node = _producer(graph, producers, rec["A"]["out"], SOFTMAX_OPS, problems)
            if node is not None and list(node.inputs) != [r["out"]]:
                problems.add(f"{node.describe()} must take {r['out']!r} alone")
            head["A"] = dict(rec["A"])
            r = rec["AV"]
            _check_matmul(graph, producers, r["acc"], rec["A"]["out"], rec["V"]["out"], None, False, problems)
            head["AV"] = {**r, "requant": _check_requant(graph, producers, r["out"], r["acc"], problems)}
            heads.append(head)
        total = _producer(graph, producers, sum_rec["acc"], "ReduceSum", problems)
        if total is not None and (list(total.inputs) != [heads_out] or total.attrs.get("axes") != [0]):
            problems.add(f"{total.describe()} must sum {heads_out!r} over axis 0")
        stack = _producer(graph, producers, heads_out, "Concat", problems)
        if stack is not None:
            sources = [producers.get(i) for i in stack.inputs]
            outs = [s.inputs[0] if s is not None and s.op == "Reshape" else None for s in sources]
            if outs != [head["OW"]["out"] for head in heads] or stack.attrs.get("axis") != 0:
                problems.add(f"{stack.describe()} must stack the heads' OW outputs, in head order, along axis 0")
        sum_requant = _check_requant(graph, producers, sum_rec["out"], sum_rec["acc"], problems)
    except (KeyError, TypeError) as e:
        raise GraphError(f"attention block {name!r}: malformed record (missing {e})") from None
    problems.raise_if_any("not in the ITA attention form of docs/ITA.md")
    return ItaBlock(name, H, E, P, q, kv, dict(softmax), heads, heads_out, {**sum_rec, "requant": sum_requant})


def _check_range(problems: list[str], what: str, value: int, lo: int, hi: int, kind: str) -> None:
    if not lo <= value <= hi:
        problems.append(f"{what} {value} is not {kind}")


def _check_requant_fits(out: list[str], rq: RequantParams) -> None:
    _check_range(out, f"{rq.node}: multiplier", rq.mul, 0, 255, "unsigned 8-bit")
    _check_range(out, f"{rq.node}: shift", rq.shift, 0, 255, "8-bit")
    _check_range(out, f"{rq.node}: add", rq.add, -128, 127, "signed 8-bit")


def _check_dims(out: list[str], dims) -> None:
    for label, value in dims:
        if value is None:
            continue
        if value % ITA_TILE or value == 0:
            out.append(f"{label} = {value} is not a positive multiple of {ITA_TILE}")
        if value > ITA_MAX_DIM:
            out.append(f"{label} = {value} exceeds {ITA_MAX_DIM}")


def _check_weights_and_biases(out: list[str], graph, steps) -> None:
    lo, hi = -(1 << (BIAS_BITS - 1)), (1 << (BIAS_BITS - 1)) - 1
    for step in steps:
        w = graph.tensors[step["weight"]]
        if w.dtype.name != "int8":
            out.append(f"weight {w.name!r} is {w.dtype.name}, ITA takes int8")
        bias = step.get("bias")
        if bias:
            data = graph.tensors[bias].data
            if data is None:
                out.append(f"bias {bias!r} is not a constant")
            elif data.size and (int(data.min()) < lo or int(data.max()) > hi):
                out.append(f"bias {bias!r} spans [{int(data.min())}, {int(data.max())}], beyond {BIAS_BITS}-bit signed")


def ita_constraints(graph, block: ItaBlock, S: int | None) -> list[str]:
    """Every way the attention block does not fit ITA (empty if it fits)."""
    out: list[str] = []
    _check_dims(out, (("sequence length S", S), ("embedding size E", block.E), ("projection size P", block.P)))
    for name in (block.q, block.kv):
        if graph.tensors[name].dtype.name != "int8":
            out.append(f"input {name!r} is {graph.tensors[name].dtype.name}, ITA takes int8")
    _check_weights_and_biases(out, graph, [head[step] for head in block.heads for step in PROJECTIONS + ("OW",)])
    for rq in [head[s]["requant"] for head in block.heads for s in STEPS[:-1]] + [block.sum["requant"]]:
        _check_requant_fits(out, rq)
    return out


# --- the feed-forward block ---------------------------------------------------------------

FF_FORM = "ita-feedforward"
FF_FORM_VERSION = 1
ACTIVATIONS = ("identity", "relu", "gelu")


@dataclass(frozen=True)
class ItaGeluConstants:
    """PyITA's i-GELU constants (op ITAGelu). ITA's testbench loads only GELU_B and GELU_C
    and the RTL takes one = c: PyITA's c = 1 makes q_1 = q_c, and the target requires it."""

    q_1: int
    q_b: int
    q_c: int


@dataclass
class ItaFeedForward:
    """ITA's feed-forward layer: Wff [E, F], Wff2 [F, E]; biases None for no bias.

    `act` requantizes the activation output (ITA's activation_requant_*): required for
    "relu" and "gelu", unused for "identity". `attention` names the attention block whose
    testbench folder this block shares (ITA's testbench runs one attention block, then one
    feed-forward block, from one folder); None gives the block a folder of its own."""

    w1: Any
    w2: Any
    f1: ItaRequant
    f2: ItaRequant
    activation: str = "identity"
    act: ItaRequant | None = None
    gelu: ItaGeluConstants | None = None
    b1: Any = None
    b2: Any = None
    attention: str | None = None


@dataclass(frozen=True)
class FeedForwardBlockNames:
    """What `add_feedforward_block` created: the output tensor and the two layers' constants."""

    out: str
    weights: tuple[str, str]
    biases: tuple[str | None, str | None]


def add_feedforward_block(b, name: str, x: str, params: ItaFeedForward) -> FeedForwardBlockNames:
    """Append one ITA feed-forward block to GraphBuilder `b` on the int8 [S, E] tensor `x`.

    Every tensor and node is named `<name>.<...>`; the block is recorded in
    `b.metadata["feedforward_blocks"]` (docs/ITA.md)."""
    where = f"ITA feed-forward block {name!r}"
    if params.activation not in ACTIVATIONS:
        raise GraphError(f"{where}: activation must be one of {ACTIVATIONS}, got {params.activation!r}")
    if params.activation != "identity" and params.act is None:
        raise GraphError(f"{where}: activation {params.activation!r} needs its requantization (act)")
    if params.activation == "gelu" and params.gelu is None:
        raise GraphError(f"{where}: activation 'gelu' needs the i-GELU constants (gelu)")
    tx = b.tensors[x]
    w1, w2 = np.asarray(params.w1), np.asarray(params.w2)
    if len(tx.shape) != 2 or w1.ndim != 2 or w2.ndim != 2 or w1.shape[0] != tx.shape[1] or w2.shape != w1.shape[::-1]:
        raise GraphError(
            f"{where}: needs x [S, E], Wff [E, F] and Wff2 [F, E]; got {list(tx.shape)}, {list(w1.shape)}, {list(w2.shape)}"
        )
    f1 = _projection(b, name, x, "F1", "ff", w1, params.b1, params.f1)
    act: dict[str, Any] = {"op": "identity", "out": f1["out"], "node": None, "requant": None}
    if params.activation == "relu":
        relu = b.node("Relu", [f1["out"]], outputs=f"{name}.relu", name=f"{name}.relu")
        out = _requant_node(b, relu, params.act, f"{name}.act")
        act = {"op": "relu", "relu": relu, "out": out, "node": out, "requant": out}
    elif params.activation == "gelu":
        g, rq = params.gelu, params.act
        out = b.node("ITAGelu", [f1["out"]], outputs=f"{name}.act", name=f"{name}.act",
                     q_1=g.q_1, q_b=g.q_b, q_c=g.q_c, eps_mul=rq.mul, eps_shift=rq.shift, eps_add=rq.add)
        act = {"op": "gelu", "out": out, "node": out, "requant": None}
    f2 = _projection(b, name, act["out"], "F2", "ff2", w2, params.b2, params.f2)
    record = {
        "name": name,
        "form": FF_FORM,
        "version": FF_FORM_VERSION,
        "S": tx.shape[0] if isinstance(tx.shape[0], int) else None,
        "E": int(w1.shape[0]),
        "F": int(w1.shape[1]),
        "x": x,
        "attention": params.attention,
        "activation": act,
        "F1": f1,
        "F2": f2,
    }
    b.metadata.setdefault("feedforward_blocks", []).append(record)
    return FeedForwardBlockNames(f2["out"], (f1["weight"], f2["weight"]), (f1["bias"], f2["bias"]))


@dataclass
class ItaFeedForwardBlock:
    """A recorded feed-forward block, checked against its graph."""

    name: str
    E: int
    F: int
    x: str
    attention: str | None
    activation: str
    steps: dict[str, dict[str, Any]]  # "F1", "F2" -> {"weight", "bias", "acc", "out", "requant": RequantParams}
    act_out: str
    act_requant: RequantParams | None  # relu's Requant, or gelu's (eps_mul, eps_shift, eps_add)
    gelu: ItaGeluConstants | None


def feedforward_records(graph) -> list[dict[str, Any]]:
    records = graph.metadata.get("feedforward_blocks", [])
    if not isinstance(records, list):
        raise GraphError("metadata feedforward_blocks must be a list of block records")
    return [r for r in records if isinstance(r, dict) and r.get("form") == FF_FORM]


def read_feedforward_block(graph, record: dict[str, Any]) -> ItaFeedForwardBlock:
    """Check that the graph computes the recorded feed-forward block in the ITA form; resolve it."""
    name = str(record.get("name", "?"))
    problems = _Problems(f"feed-forward block {name!r}")
    if record.get("version") != FF_FORM_VERSION:
        raise GraphError(f"feed-forward block {name!r}: form version {record.get('version')!r}, this refsim reads {FF_FORM_VERSION}")
    producers = graph.producers()
    try:
        x, E, F, act = record["x"], int(record["E"]), int(record["F"]), record["activation"]
        steps = {}
        for step, source in (("F1", x), ("F2", act["out"])):
            r = record[step]
            _check_matmul(graph, producers, r["acc"], source, r["weight"], r.get("bias"), False, problems)
            steps[step] = {**r, "requant": _check_requant(graph, producers, r["out"], r["acc"], problems)}
        op, act_requant, gelu = act["op"], None, None
        f1_out = record["F1"]["out"]
        if op == "identity":
            if act["out"] != f1_out:
                problems.add(f"identity activation must pass {f1_out!r} on, not {act['out']!r}")
        elif op == "relu":
            node = _producer(graph, producers, act["relu"], "Relu", problems)
            if node is not None and list(node.inputs) != [f1_out]:
                problems.add(f"{node.describe()} must take {f1_out!r}")
            act_requant = _check_requant(graph, producers, act["out"], act["relu"], problems)
        elif op == "gelu":
            node = _producer(graph, producers, act["out"], "ITAGelu", problems)
            if node is not None:
                if list(node.inputs) != [f1_out]:
                    problems.add(f"{node.describe()} must take {f1_out!r}")
                a = node.attrs
                if a.get("eps_mul") is None:
                    problems.add(f"{node.describe()} must requantize its output (eps_mul), as ITA's activation unit does")
                else:
                    act_requant = RequantParams(node.name, int(a["eps_mul"]), int(a.get("eps_shift", 0)), int(a.get("eps_add", 0)))
                gelu = ItaGeluConstants(int(a["q_1"]), int(a["q_b"]), int(a["q_c"]))
        else:
            problems.add(f"activation {op!r} is not one of {ACTIVATIONS}")
    except (KeyError, TypeError, ValueError) as e:
        raise GraphError(f"feed-forward block {name!r}: malformed record (missing {e})") from None
    problems.raise_if_any("not in the ITA feed-forward form of docs/ITA.md")
    return ItaFeedForwardBlock(name, E, F, x, record.get("attention"), op, steps, act["out"], act_requant, gelu)


def feedforward_constraints(graph, block: ItaFeedForwardBlock, S: int | None) -> list[str]:
    """Every way the feed-forward block does not fit ITA (empty if it fits)."""
    out: list[str] = []
    _check_dims(out, (("sequence length S", S), ("embedding size E", block.E), ("feed-forward size F", block.F)))
    if graph.tensors[block.x].dtype.name != "int8":
        out.append(f"input {block.x!r} is {graph.tensors[block.x].dtype.name}, ITA takes int8")
    _check_weights_and_biases(out, graph, [block.steps["F1"], block.steps["F2"]])
    for step in ("F1", "F2"):
        _check_requant_fits(out, block.steps[step]["requant"])
    rq = block.act_requant
    if block.activation == "relu":
        _check_requant_fits(out, rq)
    elif block.activation == "gelu":
        # ita_gelu.sv takes eps_mult and right_shift as signed 8-bit, the constants as 16-bit.
        _check_range(out, f"{rq.node}: eps_mul", rq.mul, -128, 127, "signed 8-bit")
        _check_range(out, f"{rq.node}: eps_shift", rq.shift, 0, 127, "a signed 8-bit shift")
        _check_range(out, f"{rq.node}: eps_add", rq.add, -128, 127, "signed 8-bit")
        if block.gelu.q_1 != block.gelu.q_c:
            out.append(f"{rq.node}: q_1 = {block.gelu.q_1} differs from q_c = {block.gelu.q_c}; ITA's RTL uses GELU_C for both")
    return out
