"""`refsim report MODEL.onnx MODEL.intq DATA -o report/`: one self-contained HTML page.

`report/index.html` holds, with every plot an inline PNG (no network, no script):

- the metrics of float, fake-quant and integer models (`refsim compare`'s: per output and
  pair MSE, MAE, cosine, top-1 agreement; with labels the task metrics);
- the SQNR of every quantization point against float, as a bar chart and a table;
- the sensitivity chart and the bit allocation, when the `.intq`'s widths were chosen by
  `export --bits-from` or a sensitivity file is given;
- for every quantized tensor (16 bits or fewer), two histograms over the evaluation data:
  the float values with the clipping bounds (scale times the integer range), and the
  integer values over their type's range with the saturated end bins marked;
- the calibration and export settings, and the model's measured size.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import os

import numpy as np
from refsim.intq import atomic_write

from ..allocation import float32_bytes, model_bytes
from ..comparison import compare
from ..dyadic import ExportError
from ..frontend.graph import load
from . import plots

KEEP_VALUES = 200_000  # float values kept per tensor for its histogram (evenly strided)
INTEGER_BINS = 256

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
td.name, th.name { text-align: left; font-family: monospace; }
.warning { color: #a00; }
.grid { display: flex; flex-wrap: wrap; gap: 0.6em; }
.pair { border: 1px solid #ddd; padding: 0.3em; }
img { display: block; }
"""


class Histograms:
    """Accumulates, per quantized tensor, float values (strided sample) and exact counts of
    clipped floats, integer values and saturated integers."""

    def __init__(self, model, pattern: str | None):
        self.info = {}
        producers = {o: n for n in model.graph.nodes for o in n.outputs}
        float_tensors = model.metadata.get("float_tensors", {})
        for name, float_name in float_tensors.items():
            t = model.graph.tensors[name]
            if t.dtype.bits > 16 or t.scale is None or np.ndim(t.scale) != 0:
                continue  # accumulators and per-channel values are not quantization points
            if pattern and not (fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(float_name, pattern)):
                continue
            lo, hi = t.dtype.lo, t.dtype.hi
            node = producers.get(name)
            if node is not None and node.op == "Requant" and "lo" in node.attrs:
                lo, hi = int(node.attrs["lo"]), int(node.attrs["hi"])  # 5..7-bit values held in int8
            self.info[name] = {"float": float_name, "lo": lo, "hi": hi, "scale": float(t.scale), "dtype": t.dtype.name,
                               "values": [], "kept": 0, "count": 0, "clipped": 0, "saturated": 0,
                               "counts": np.zeros(min(INTEGER_BINS, hi - lo + 1), np.int64)}

    def __call__(self, name: str, float_values: np.ndarray, integer_values: np.ndarray) -> None:
        h = self.info.get(name)
        if h is None:
            return
        f = np.asarray(float_values, np.float64).reshape(-1)
        q = np.asarray(integer_values).reshape(-1).astype(np.int64)
        lo, hi, s = h["lo"], h["hi"], h["scale"]
        h["count"] += f.size
        h["clipped"] += int(np.sum((f < (lo - 0.5) * s) | (f > (hi + 0.5) * s)))
        h["saturated"] += int(np.sum((q >= hi) | ((q <= lo) if lo < 0 else False)))  # an unsigned 0 is no clipping
        bins = len(h["counts"])
        h["counts"] += np.bincount(((q - lo) * bins // (hi - lo + 1)).clip(0, bins - 1), minlength=bins)
        stride = max(1, f.size // max(1, KEEP_VALUES // 8))
        h["values"].append(f[::stride])

    def items(self):
        for name, h in self.info.items():
            if h["count"] == 0:
                continue
            values = np.concatenate(h["values"])
            if values.size > KEEP_VALUES:
                values = values[:: values.size // KEEP_VALUES + 1]
            yield name, h, values


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list], name_columns: int = 1) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"name" if i < name_columns else ""}">{html.escape(h)}</th>'
                                    for i, h in enumerate(header)) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            if isinstance(v, float):
                v = f"{v:.5g}"
            cells.append(f'<td class="{"name" if i < name_columns else ""}">{html.escape("-" if v is None else str(v))}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _load_sensitivity(path, meta: dict) -> tuple[dict | None, dict | None]:
    from .. import sensitivity as sens

    allocation = meta.get("bit_allocation")
    doc = sens.load(path) if path else (allocation or {}).get("sensitivity")
    chosen = (allocation or {}).get("chosen")
    return doc, chosen


def write_report(model, intq, data, out_dir, *, labels=None, sensitivity=None, tensors: str | None = None,
                 max_samples: int | None = None, batch_size: int = 16, force: bool = False, progress: bool = False) -> str:
    """Write `out_dir/index.html` (see the module docstring); returns its path."""
    import refsim

    out_dir = os.fspath(out_dir)
    target = os.path.join(out_dir, "index.html")
    if os.path.exists(target) and not force:
        raise ExportError(f"{target} exists (give --force to replace it)")
    plots._pyplot()  # fail before the long part if matplotlib is missing
    m = refsim.load(intq)
    meta = m.metadata
    histograms = Histograms(m, tensors)
    result = compare(model, intq, data, labels=labels, batch_size=batch_size, progress=progress,
                     max_samples=max_samples, observe=histograms)
    doc, chosen = _load_sensitivity(sensitivity, meta)
    parts = [f"<h1>refsim report: {html.escape(os.path.basename(os.fspath(intq)))}</h1>",
             f"<p>float model {html.escape(os.path.basename(os.fspath(model)))}, evaluation data "
             f"{html.escape(os.path.basename(os.fspath(data)))} ({result.samples} samples)</p>"]
    parts += [f'<p class="warning">warning: {html.escape(w)}</p>' for w in result.warnings]

    parts.append("<h2>Metrics: float, fake-quant and integer</h2>")
    for output, pairs in result.outputs.items():
        rows = [[pair, v["mse"], v["mae"], v["cosine"], v.get("top1_agreement")] for pair, v in pairs.items()]
        parts.append(f"<p>output <code>{html.escape(output)}</code></p>")
        parts.append(_table(["pair", "MSE", "MAE", "cosine", "top-1 agreement"], rows))
    if result.task:
        keys = list(next(iter(result.task.values())).keys())
        parts.append("<p>task metrics (labels)</p>")
        parts.append(_table(["model"] + keys, [[k] + [v[key] for key in keys] for k, v in result.task.items()]))

    float_bytes = float32_bytes(load(model))
    size = model_bytes(m.graph)
    parts.append("<h2>Size</h2>")
    parts.append(_table(["", "bytes", "MB"], [["float32 weights (ONNX)", float_bytes, float_bytes / 1e6],
                                              ["integer parameters (.intq constants and scales)", size, size / 1e6],
                                              [".intq file", os.path.getsize(intq), os.path.getsize(intq) / 1e6]]))
    parts.append(f"<p>compression against float32: {float_bytes / size:.2f}x</p>")

    parts.append("<h2>Per-layer SQNR of the integer model against float</h2>")
    if result.sqnr:
        parts.append(_img(plots.sqnr_bars(result.sqnr), "per-tensor SQNR bar chart"))
        parts.append(_table(["tensor", "layer", "bits", "SQNR (dB)", "drop (dB)"],
                            [[r["tensor"], r["layer"], r["bits"], r["sqnr_db"], r["drop_db"]] for r in result.sqnr], 2))

    if doc is not None:
        parts.append("<h2>Sensitivity and bit allocation</h2>")
        cal = doc.get("calibration", {})
        parts.append(f"<p>method {html.escape(str(doc.get('method')))}"
                     f"{', top-k ' + str(doc['topk']) if doc.get('topk') else ''}; measured on {html.escape(str(cal.get('data')))} "
                     f"data {html.escape(str(cal.get('source')))} ({cal.get('samples')} samples)</p>")
        parts.append(_img(plots.sensitivity_chart(doc, chosen), "sensitivity per layer"))
        bits = doc["bits"]
        rows = [[e["name"], e["params"], (chosen or {}).get(e["name"])] + [e["sensitivity"].get(b) for b in bits]
                for e in doc["layers"]]
        parts.append(_table(["layer", "weights", "chosen bits"] + [f"sensitivity at {b}" for b in bits], rows))
        allocation = meta.get("bit_allocation")
        if allocation:
            budget = allocation.get("budget", {})
            parts.append(f"<p>allocation {html.escape(str(allocation.get('method')))} over "
                         f"{html.escape(', '.join(allocation.get('bit_choices', [])))} bits; budget: "
                         f"{html.escape(_budget_text(budget))}</p>")

    parts.append("<h2>Calibration and export settings</h2>")
    calibration = meta.get("calibration", {})
    export = meta.get("export", {})
    rows = [["calibration method", calibration.get("method")], ["percentile", calibration.get("percentile")],
            ["calibration data", calibration.get("source")], ["calibration samples", calibration.get("samples")]]
    rows += [[f"export {k}", v if not isinstance(v, list) else "; ".join(map(str, v)) or "-"] for k, v in export.items()]
    parts.append(_table(["setting", "value"], [[k, "-" if v is None else str(v)] for k, v in rows], 1))

    parts.append('<h2 id="histograms">Histograms of the quantized tensors</h2>')
    parts.append("<p>Left: float values over the evaluation data, the clipping bounds (scale x integer range) dashed. "
                 "Right: the integer values over the type's range; red end bins: saturated.</p>")
    parts.append('<div class="grid">')
    for name, h, values in histograms.items():
        s, lo, hi = h["scale"], h["lo"], h["hi"]
        parts.append('<div class="pair">')
        parts.append(f"<code>{html.escape(name)}</code> ({html.escape(h['dtype'])}{'' if (lo, hi) == (m.graph.tensors[name].dtype.lo, m.graph.tensors[name].dtype.hi) else f' [{lo}, {hi}]'}, scale {s:.4g})")
        parts.append(_img(plots.tensor_histograms(values, lo * s, hi * s, h["clipped"] / h["count"], h["counts"], lo, hi,
                                                  h["saturated"] / h["count"], h["float"], name),
                          f"histograms of {h['float']} (float) and {name} (integer)"))
        parts.append("</div>")
    parts.append("</div>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>refsim report</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(target, page.encode("utf-8"))
    return target


def _budget_text(budget: dict) -> str:
    if budget.get("compression"):
        return f"{budget['compression']}x smaller than float32 ({budget['bytes'] / 1e6:.3f} MB)"
    if budget.get("size_mb"):
        return f"{budget['size_mb']} MB"
    return "none (the allocation's own proportions)"
