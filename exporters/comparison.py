"""`refsim compare`: what quantization costs, float vs fake-quant vs integer.

    report = refsim.exporters.compare("model.onnx", "model.intq", "eval.txt", labels="labels.txt")

Runs the float model (the canonical graph, checked equal to the ONNX file at export), the
fake-quant model rebuilt from the `.intq`'s record, and the integer model on DATA, and
reports:

- per output and per pair (fake-quant vs float, integer vs float, integer vs fake-quant):
  MSE, MAE, mean and smallest cosine similarity (per sample, flattened), top-1 agreement
  (outputs with more than one class);
- with labels (one per line: a class name or index, or a number for regression): accuracy,
  macro precision, recall and F1, Matthews correlation (multi-class form), or Pearson and
  Spearman correlation, for each of the three models;
- per quantization point of the integer graph: SQNR = 10 log10(sum f^2 / sum (f - s*q)^2)
  of the integer tensor (dequantized by its scale) against the float tensor it stands for,
  over all samples (for text models, over the tokens the attention mask keeps), in graph
  order; the lowest SQNR and the largest drop from one point to the next name the layers
  that lose accuracy;
- a warning when evaluation samples were also calibration samples.

The fake-quant model computes the export mode's integer softmax, GELU, LayerNorm and
lookup tables exactly (`exporters.mirror`), as QAT would: integer vs fake-quant then
measures what integer arithmetic costs elsewhere. `nonlinear="float"` (`refsim compare
--float-nonlinear`) keeps them float, to see what the integer approximations cost.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import refsim
from refsim.boundary import quantize_feeds
from refsim.text import encoder_for

from .data import load_dataset, read_labels
from .dyadic import ExportError
from .fakequant import fake_quant_model
from .frontend.graph import load
from .frontend.passes import canonicalize
from .mirror import builder
from .pipeline import _file_sha256, batch_size_for, onnx_feed_dtypes
from .progress import Progress
from .runtime import FloatRunner

PAIRS = (("fake-quant", "float"), ("integer", "float"), ("integer", "fake-quant"))


@dataclass
class CompareReport:
    samples: int
    outputs: dict[str, dict[str, dict[str, float]]]
    task: dict[str, dict[str, float]] | None
    sqnr: list[dict]
    warnings: list[str] = field(default_factory=list)
    # how the fake-quant model computes the nonlinearities: "integer" (their mirrors) or
    # "float", and how many of the recorded ones it mirrors
    fake_quant: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"samples": self.samples, "outputs": self.outputs, "task": self.task, "sqnr": self.sqnr, "warnings": self.warnings,
                "fake_quant": self.fake_quant}

    def text(self) -> str:
        lines = [f"{self.samples} samples"]
        if self.fake_quant.get("recorded"):
            fq = self.fake_quant
            lines.append(f"fake-quant model: {fq['mirrored']} of {fq['recorded']} nonlinearities computed as the integer model does"
                         if fq["nonlinear"] == "integer" else "fake-quant model: float nonlinearities")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for name, pairs in self.outputs.items():
            lines.append(f"output {name}:")
            lines.append(f"  {'pair':<26}{'MSE':>12}{'MAE':>12}{'cosine':>10}{'worst':>10}{'top-1':>8}")
            for pair, m in pairs.items():
                top1 = f"{m['top1_agreement']:.4f}" if m.get("top1_agreement") is not None else "-"
                lines.append(f"  {pair:<26}{m['mse']:>12.4g}{m['mae']:>12.4g}{m['cosine']:>10.5f}{m['cosine_min']:>10.5f}{top1:>8}")
        if self.task:
            keys = list(next(iter(self.task.values())).keys())
            lines.append("task metrics:")
            lines.append("  " + f"{'model':<12}" + "".join(f"{k:>11}" for k in keys))
            for model, metrics in self.task.items():
                lines.append("  " + f"{model:<12}" + "".join(f"{metrics[k]:>11.4f}" for k in keys))
        if self.sqnr:
            lines.append("per-layer SQNR of the integer model against float (dB, graph order):")
            worst = min(self.sqnr, key=lambda r: r["sqnr_db"])
            drop = max(self.sqnr, key=lambda r: r.get("drop_db") or -math.inf)
            for r in self.sqnr:
                mark = ""
                if r is worst:
                    mark += "  <- lowest"
                if r is drop and (r.get("drop_db") or 0) > 0:
                    mark += "  <- largest drop"
                lines.append(f"  {r['sqnr_db']:>7.2f}  int{r['bits']:<3} {r['layer']:<48} {r['tensor']}{mark}")
        return "\n".join(lines)


def _pair_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    diff = a - b
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.where((na > 0) & (nb > 0), np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-300), (na == nb).astype(np.float64))
    out = {"mse": float(np.mean(diff ** 2)), "mae": float(np.mean(np.abs(diff))), "cosine": float(np.mean(cos)),
           "cosine_min": float(np.min(cos, initial=1.0))}
    out["top1_agreement"] = float(np.mean(np.argmax(a, 1) == np.argmax(b, 1))) if a.shape[1] > 1 else None
    return out


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, classes: int) -> dict[str, float]:
    """Accuracy, precision/recall/F1 averaged over the classes present in `truth` (a class
    never predicted has precision 0), and the multi-class Matthews correlation (scikit-learn)."""
    from sklearn.metrics import accuracy_score, matthews_corrcoef, precision_recall_fscore_support

    present = np.unique(truth)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, labels=present, average="macro",
                                                               zero_division=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one class only: the MCC is 0, as defined
        mcc = matthews_corrcoef(truth, predicted)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "mcc": float(mcc),
    }


def regression_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy; NaN when either side is constant) and MSE."""
    from scipy.stats import pearsonr, spearmanr

    truth, predicted = np.asarray(truth, np.float64), np.asarray(predicted, np.float64)
    # Constant means all values equal: a float std of equal values can come out 1e-17, not 0.
    constant = np.ptp(truth) == 0 or np.ptp(predicted) == 0
    return {"pearson": float("nan") if constant else float(pearsonr(truth, predicted).statistic),
            "spearman": float("nan") if constant else float(spearmanr(truth, predicted).statistic),
            "mse": float(np.mean((truth - predicted) ** 2))}


def _parse_labels(raw: list[str], names: list[str] | None, count: int, width: int):
    """(kind, values): class indices or regression targets."""
    if len(raw) != count:
        raise ExportError(f"labels: {len(raw)} labels for {count} samples")
    if width == 1:
        try:
            return "regression", np.array([float(v) for v in raw])
        except ValueError:
            raise ExportError("labels: a one-value output needs numeric (regression) labels") from None
    lookup = {n: i for i, n in enumerate(names or [])}
    values = []
    for v in raw:
        if v in lookup:
            values.append(lookup[v])
        else:
            try:
                values.append(int(v))
            except ValueError:
                raise ExportError(f"labels: {v!r} is neither a label name of the model nor a class index") from None
    values = np.array(values)
    if values.min() < 0 or values.max() >= width:
        raise ExportError(f"labels: class indices must lie in [0, {width})")
    return "classification", values


def compare(model, intq, data, *, labels=None, batch_size: int = 16, progress: bool = False, max_samples: int | None = None,
            observe=None, nonlinear: str = "integer") -> CompareReport:
    """Compare float, fake-quant and integer models on DATA (see the module docstring).
    `observe(tensor, float_values, integer_values)` sees every compared quantization point
    of every batch (kept tokens only), e.g. for histograms. `nonlinear="float"`: the
    fake-quant model keeps float softmax, GELU and LayerNorm (`exporters.fakequant`)."""
    m = refsim.load(intq)
    meta = m.metadata
    warnings = []
    for key in ("fake_quant", "source_model"):
        if key not in meta:
            raise ExportError(f"{os.fspath(intq)}: not made by `refsim export` (no {key!r} metadata)")
    proto = load(model)
    source = meta["source_model"]
    if source.get("sha256") and _file_sha256(model) != source["sha256"]:
        warnings.append(f"{os.fspath(model)} differs from the model the .intq was exported from ({source.get('file')})")
    # arrays (.npy/.npz) need no tokenizer: a model with inputs no tokenizer gives (LayoutLM's bbox) takes them so
    arrays = os.fspath(data).endswith((".npy", ".npz"))
    encoder, mapping = (encoder_for(m) if "tokenizer" in meta and not arrays else (None, None))
    names = list(m.graph.inputs)
    dataset = load_dataset(os.fspath(data), names, encoder, mapping)
    if max_samples is not None:
        dataset = dataset.head(max_samples)
    calib = set(meta.get("calibration", {}).get("digests", []))
    # the data the bit widths were chosen on (`export --bits-from`) is calibration data too
    calib |= set(meta.get("bit_allocation", {}).get("sensitivity", {}).get("calibration", {}).get("digests", []))
    leaked = sum(1 for d in dataset.digests if d in calib)
    if leaked:
        warnings.append(f"{leaked} of {len(dataset)} evaluation samples were also used for calibration: "
                        f"the comparison flatters the quantized model")
    g = canonicalize(proto, {k: list(v) for k, v in source["input_shapes"].items()})
    consts = {n: t.data for n, t in m.graph.tensors.items() if t.is_const}
    float_tensors: dict[str, str] = meta.get("float_tensors", {})
    order = [n for node in m.order for n in node.outputs if n in float_tensors]
    order = [n for n in m.graph.inputs if n in float_tensors] + order
    wanted_float = sorted({float_tensors[n] for n in order} | set(g.outputs))
    float_runner = FloatRunner(g.to_model(), expose=wanted_float)
    scales = {n: t.scale for n, t in m.graph.tensors.items() if t.is_const}
    fq_runner = FloatRunner(fake_quant_model(g, meta["fake_quant"], consts, scales, nonlinear))
    dtypes = onnx_feed_dtypes(g)
    outputs = list(g.outputs)
    collected = {kind: {o: [] for o in outputs} for kind in ("float", "fake-quant", "integer")}
    sums = {n: [0.0, 0.0] for n in order}
    bar = Progress(progress)
    if meta.get("attention_blocks") or meta.get("feedforward_blocks"):
        batch_size = 1  # ITA attention and feed-forward blocks are 2-D [S, E]: one sample at a time
    batch_size, exact = batch_size_for(g, batch_size)
    batches = dataset.batches(batch_size, exact=exact)
    given = len(dataset)
    if exact and len(dataset) % batch_size:
        warnings.append(f"the model takes batches of {batch_size}: the last {len(dataset) % batch_size} samples are left out")
        dataset = dataset.head(len(dataset) - len(dataset) % batch_size)
    for done, batch in enumerate(batches, 1):
        float_feeds = {k: v.astype(dtypes[k]) for k, v in batch.items()}
        f = float_runner.run(float_feeds)
        q = fq_runner.run(float_feeds)
        int_feeds = {}
        for name, value in batch.items():
            storage = m.graph.tensors[name].dtype.storage
            int_feeds[name] = value if value.dtype.kind == "f" else value.astype(storage)
        int_feeds = quantize_feeds(m, int_feeds)

        keep = _kept_tokens(batch, g.mask_inputs)

        def trace(node, name, array, f=f, keep=keep):
            if name in sums:
                ref = np.asarray(f[float_tensors[name]], np.float64)
                array = np.asarray(array)
                if ref.shape == (1, *array.shape):  # an ITA block's 2-D [S, E] tensor for a sample's [1, S, E]
                    array = array[None]
                deq = _dequantize(m.graph.tensors[name], array)
                if deq.shape == ref.shape:
                    ref, deq = _at_kept_tokens(ref, keep), _at_kept_tokens(deq, keep)
                    sums[name][0] += float(np.sum(ref ** 2))
                    sums[name][1] += float(np.sum((ref - deq) ** 2))
                    if observe is not None:
                        observe(name, ref, _at_kept_tokens(array, keep))

        for name in m.graph.inputs:
            if name in sums:
                trace(None, name, int_feeds[name])
        result = m.run(int_feeds, trace=trace)
        for o in outputs:
            collected["float"][o].append(np.asarray(f[o], np.float64))
            collected["fake-quant"][o].append(np.asarray(q[o], np.float64))
            int_name = m.graph.outputs[outputs.index(o)]
            collected["integer"][o].append(_dequantize(m.graph.tensors[int_name], result[int_name]))
        bar(done, len(batches), "comparing")
    merged = {kind: {o: np.concatenate(v) for o, v in per.items()} for kind, per in collected.items()}
    out_metrics = {}
    for o in outputs:
        out_metrics[o] = {f"{a} vs {b}": _pair_metrics(merged[a][o], merged[b][o]) for a, b in PAIRS}
    task = None
    if labels is not None:
        raw = labels if isinstance(labels, list) else read_labels(os.fspath(labels))
        if max_samples is not None:
            raw = raw[:max_samples]  # the labels of the samples used
        o = outputs[0]
        width = int(np.prod(merged["float"][o].shape[1:]))
        kind, truth = _parse_labels(raw, meta.get("labels"), given, width)
        truth = truth[:len(dataset)]
        task = {}
        for model_kind in ("float", "fake-quant", "integer"):
            values = merged[model_kind][o].reshape(len(dataset), -1)
            if kind == "classification":
                task[model_kind] = classification_metrics(truth, np.argmax(values, 1), width)
            else:
                task[model_kind] = regression_metrics(truth, values[:, 0])
    sqnr = []
    layers = meta.get("layers", {})
    previous = None
    for n in order:
        signal, noise = sums[n]
        if signal == 0:
            continue
        db = 10 * math.log10(signal / noise) if noise > 0 else float("inf")
        row = {"tensor": n, "float_tensor": float_tensors[n], "layer": layers.get(n, ""), "bits": m.graph.tensors[n].dtype.bits,
               "sqnr_db": round(db, 3) if math.isfinite(db) else 999.0}
        row["drop_db"] = round(previous - row["sqnr_db"], 3) if previous is not None else None
        previous = row["sqnr_db"]
        sqnr.append(row)
    recorded = meta["fake_quant"].get("nonlinear", [])
    mirrored = sum(builder(spec["op"]) is not None for _, spec in recorded) if nonlinear == "integer" else 0
    return CompareReport(len(dataset), out_metrics, task, sqnr, warnings,
                         dict(nonlinear=nonlinear, mirrored=mirrored, recorded=len(recorded)))


def _kept_tokens(batch: dict, mask_inputs) -> np.ndarray | None:
    """(batch, seq) bool of the tokens a mask input keeps, if the model has one."""
    for name in sorted(mask_inputs):
        if name in batch and np.ndim(batch[name]) == 2:
            return np.asarray(batch[name]) != 0
    return None


def _at_kept_tokens(a: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The values of kept tokens only: padding's values are computed but never used, and
    would otherwise dominate a layer's SQNR. (batch, seq, ...) and (batch, heads, seq, ...)
    tensors are selected along their sequence axis; others are taken whole."""
    if keep is None or a.ndim < 2 or a.shape[0] != keep.shape[0]:
        return a
    seq = keep.shape[1]
    if a.ndim == 4 and a.shape[2] == seq and a.shape[3] == seq:  # attention scores: kept queries x kept keys
        both = keep[:, None, :, None] & keep[:, None, None, :]
        return a[np.broadcast_to(both, a.shape)]
    if a.ndim >= 2 and a.shape[1] == keep.shape[1]:
        return a[keep]
    if a.ndim >= 3 and a.shape[2] == keep.shape[1]:
        return np.moveaxis(a, 1, 2)[keep]
    return a


def _dequantize(tensor, array: np.ndarray) -> np.ndarray:
    scale = tensor.scale if tensor.scale is not None else 1.0
    zero = tensor.zero_point if tensor.zero_point is not None else 0
    return (np.asarray(array, np.float64) - np.asarray(zero, np.float64)) * np.asarray(scale, np.float64)
