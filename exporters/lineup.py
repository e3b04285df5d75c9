"""`refsim compare MODEL.onnx MODEL.intq DATA` for an imported model: refsim's integer
tensors beside onnxruntime's, by ONNX name.

    report = refsim.exporters.lineup.lineup("model_qdq.onnx", "model.intq", "inputs.npy")

`refsim import` records, for every computed integer tensor that stands for an ONNX tensor,
the ONNX name (metadata["onnx_names"], {refsim tensor: ONNX tensor}; refsim renames a tensor
when the name is taken or its type changes). onnxruntime runs the quantized model with those
tensors added as graph outputs, refsim runs the `.intq` on the same float inputs (quantized
at its boundary as the model's QuantizeLinear does), and each pair whose integer types agree
(an ONNX bool that refsim holds as uint8 0/1 counts) is compared element by element: exact elements / total and the largest |difference| in
quantization steps (integer units of the shared grid), in refsim's graph order, with the
first divergent tensor named. A `.intq` written before the record existed lines up tensors
whose refsim and ONNX names are identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import refsim
from refsim.boundary import quantize_feeds
from refsim.inputs import read_samples

from .dyadic import ExportError
from .frontend.graph import load


@dataclass
class LineupReport:
    samples: int
    tensors: list[dict]  # graph order: onnx, tensor, dtype, exact, total, max_diff
    unmatched: list[str] = field(default_factory=list)  # recorded tensors whose types differ
    recorded: bool = True  # the .intq carries the ONNX names (else: identical names only)

    @property
    def first_divergent(self) -> dict | None:
        return next((r for r in self.tensors if r["exact"] < r["total"]), None)

    def to_json(self) -> dict:
        first = self.first_divergent
        return {"samples": self.samples, "tensors": self.tensors, "exact_tensors": sum(r["exact"] == r["total"] for r in self.tensors),
                "first_divergent": None if first is None else first["onnx"], "unmatched": self.unmatched,
                "names_recorded": self.recorded}

    def text(self) -> str:
        exact = sum(r["exact"] == r["total"] for r in self.tensors)
        lines = [f"{self.samples} samples; {exact} of {len(self.tensors)} integer tensors exact against onnxruntime "
                 "(graph order; max |diff| in quantization steps)"]
        if not self.recorded:
            lines.append("note: the .intq records no ONNX names (imported by an older refsim); "
                         "only identically named tensors are lined up")
        width = max([len(r["onnx"]) for r in self.tensors] + [11])
        lines.append(f"  {'ONNX tensor':<{width}}  {'dtype':<7}{'exact':>10}{'total':>10}{'max|diff|':>11}  refsim tensor")
        first = self.first_divergent
        for r in self.tensors:
            mark = "  <- first divergent" if r is first else ""
            renamed = r["tensor"] if r["tensor"] != r["onnx"] else "="
            diff = "shape" if r.get("shape_differs") else r["max_diff"]
            lines.append(f"  {r['onnx']:<{width}}  {r['dtype']:<7}{r['exact']:>10}{r['total']:>10}{diff:>11}  {renamed}{mark}")
        if not self.tensors:
            lines.append("no tensor lined up: is MODEL the file the .intq was imported from?")
        elif first is None:
            lines.append("every lined-up tensor is exact")
        else:
            lines.append(f"first divergent tensor: {first['onnx']} ({first['total'] - first['exact']} of {first['total']} "
                         f"elements differ, up to {first['max_diff']} steps)")
        if self.unmatched:
            lines.append(f"not compared (onnxruntime's type vs refsim's): {', '.join(self.unmatched)}")
        return "\n".join(lines)


def lineup(model, intq, data, *, max_samples: int | None = None) -> LineupReport:
    """Run the quantized ONNX `model` in onnxruntime and the imported `intq` (path or
    refsim.Model) on DATA (any input file `refsim run` reads) and line their integer tensors up."""
    import onnxruntime as ort

    m = intq if isinstance(intq, refsim.Model) else refsim.load(intq)
    where = os.fspath(model) if not isinstance(model, onnx.ModelProto) else "model"
    proto = onnx.ModelProto()
    proto.CopyFrom(load(model))  # graph outputs are added to the copy
    recorded = "onnx_names" in m.metadata
    produced = {o for n in proto.graph.node for o in n.output if o} | {i.name for i in proto.graph.input}
    produced -= {t.name for t in proto.graph.initializer}
    names = dict(m.metadata["onnx_names"]) if recorded else {n: n for n in m.graph.tensors if n in produced}
    computed = list(m.graph.inputs) + [tensor for node in m.order for tensor in node.outputs]
    candidates = [(t, names[t]) for t in computed if names.get(t) in produced and not m.graph.tensors[t].is_const]
    # Untyped graph outputs: onnxruntime infers their types, also through com.microsoft ops
    # that onnx's shape inference does not know (QLinearAdd, ...).
    graph_outputs = {o.name for o in proto.graph.output}
    for _, onnx_name in candidates:
        if onnx_name not in graph_outputs:
            proto.graph.output.append(onnx.ValueInfoProto(name=onnx_name))
            graph_outputs.add(onnx_name)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{where}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
    ort_types = {o.name: o.type for o in session.get_outputs()}
    pairs, unmatched = [], []
    for tensor, onnx_name in candidates:
        dtype = m.graph.tensors[tensor].dtype.name
        if ort_types.get(onnx_name) == f"tensor({dtype})" or (ort_types.get(onnx_name) == "tensor(bool)" and dtype == "uint8"):
            pairs.append((tensor, onnx_name))
        elif recorded:
            unmatched.append(f"{onnx_name} ({ort_types.get(onnx_name)} vs {dtype})")
    feed_types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in proto.graph.input}
    rows = {tensor: {"onnx": onnx_name, "tensor": tensor, "dtype": m.graph.tensors[tensor].dtype.name, "exact": 0, "total": 0,
                     "max_diff": 0} for tensor, onnx_name in pairs}
    samples = read_samples(os.fspath(data), m.inputs, limit=max_samples)
    wanted = [onnx_name for _, onnx_name in pairs]
    for sample in samples:
        missing = [n for n in feed_types if n not in sample.feeds]
        if missing:
            raise ExportError(f"{os.fspath(data)}: no values for ONNX input(s) {missing}")
        try:
            reference = dict(zip(wanted, session.run(wanted, {n: np.asarray(sample.feeds[n]).astype(feed_types[n])
                                                              for n in feed_types})))
        except Exception as e:
            raise ExportError(f"{where}: onnxruntime fails on {sample.source} ({str(e).splitlines()[0][:200]})") from None
        traced = quantize_feeds(m, sample.feeds)  # the inputs as the model's QuantizeLinear quantizes them
        m.run(dict(traced), trace=lambda node, name, a: traced.__setitem__(name, np.asarray(a)))
        for tensor, onnx_name in pairs:
            got, want, row = traced.get(tensor), reference[onnx_name], rows[tensor]
            if got is None or got.size != want.size:  # not the same tensor after all: every element diverges
                row["total"] += int(want.size)
                row["shape_differs"] = True
                continue
            diff = np.abs(got.reshape(want.shape).astype(np.int64) - want.astype(np.int64))
            row["exact"] += int(np.count_nonzero(diff == 0))
            row["total"] += int(diff.size)
            row["max_diff"] = max(row["max_diff"], int(diff.max(initial=0)))
    return LineupReport(len(samples), list(rows.values()), unmatched, recorded)
