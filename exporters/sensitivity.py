"""`refsim sensitivity`: how much each layer's weights suffer at each candidate bit width.

    doc = refsim.exporters.sensitivity.measure("model.onnx", "calib.txt", tokenizer="tokenizer.json",
                                               method="pwcca", bits=("2", "4", "8", "16"))

A *quantizable layer* is a layer (a `refsim export --list-layers` name) that owns weights:
a linear layer (MatMul with constant weights, the names `layers.json` patterns match) or
an embedding table. For each one and each candidate width b, the float model runs on the
calibration data with only that layer's weights replaced by their fake-quant values at b
bits (quantized exactly as `refsim export` quantizes them: same clip rules, same
`--per-channel`), everything else float, and is compared with the plain float model:

- `pwcca` (default; Morcos et al. 2018) and `svcca` (Raghu et al. 2017; `topk` directions),
  `exporters.cca`, on the layer's *output activations*: the first tensor downstream of
  the layer that a nonlinear op computes (softmax, GELU, LayerNorm, ReLU, tanh), or the
  model output when none comes first. (The layer's own product would not do: CCA is
  blind to invertible linear maps, so x W and x W_q look identical to it whenever W_q
  keeps W's rank.) Rows are the kept tokens (the attention mask's), columns the last
  axis; sensitivity = 1 - similarity.
- `sqnr`: the SQNR of the whole model's outputs, sensitivity = noise / signal power
  (10^(-SQNR/10)). Recorded for the other methods too (`output_sqnr_db`).

Only calibration data is used, and the JSON says so with the calibration fingerprint
(`calibration.digests`, as `.intq` files carry it): `refsim export --bits-from` copies it
into the model, and `refsim compare` warns when evaluation samples were among them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from refsim.intq import atomic_write

from . import cca
from .calibrate import quantize_weight
from .config import parse_wbits, read_json
from .dyadic import ExportError
from .frontend.graph import Graph
from .pipeline import _file_sha256, onnx_feed_dtypes, prepare
from .progress import Progress
from .runtime import FloatRunner

FORMAT = "refsim.sensitivity"
METHODS = ("pwcca", "svcca", "sqnr")
DEFAULT_BITS = ("2", "4", "8", "16")
# Ops whose output is not a linear function of their data input (the canonical graph's vocabulary).
NONLINEAR = ("Gelu", "LayerNormalization", "Relu", "Softmax", "Tanh", "Sigmoid", "Clip")
MAX_ROWS = 20000  # rows kept per compared tensor (evenly spaced), bounding the SVDs


@dataclass
class QuantLayer:
    name: str
    kind: str  # "linear" or "embedding"
    weights: list[str]  # constants of the canonical graph
    params: int
    compared: str  # the tensor PWCCA/SVCCA compare


def quantizable_layers(g: Graph) -> list[QuantLayer]:
    """Layers owning weights, in graph order, with the tensor their similarity is measured on."""
    found: dict[str, QuantLayer] = {}
    index_inputs = {n for n in g.inputs if g.dtypes.get(n, np.dtype(np.float32)).kind in "iub"}
    for node in g.nodes:
        if node.op == "MatMul" and g.is_const(node.inputs[1]) and not g.is_const(node.inputs[0]):
            kind, weight = "linear", node.inputs[1]
        elif node.op == "Gather" and g.is_const(node.inputs[0]) and node.inputs[1] in index_inputs:
            kind, weight = "embedding", node.inputs[0]
        else:
            continue
        name = node.scope or node.name
        layer = found.setdefault(name, QuantLayer(name, kind, [], 0, _compared_tensor(g, node)))
        if weight not in layer.weights:
            layer.weights.append(weight)
            layer.params += int(g.const(weight).size)
    return list(found.values())


def _compared_tensor(g: Graph, start) -> str:
    """The first tensor (in graph order) downstream of `start` made by a nonlinear op, else
    the first graph output downstream of it."""
    reached = set(start.outputs)
    for node in g.nodes:
        if node is start or not any(i in reached for i in node.inputs):
            continue
        if node.op in NONLINEAR:
            return node.outputs[0]
        reached.update(node.outputs)
    for out in g.outputs:
        if out in reached:
            return out
    return start.outputs[0]


def rows(a: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """A tensor as a (samples, neurons) matrix: the last axis is the neurons; with a token
    mask, only kept tokens (kept queries of attention maps) are samples."""
    a = np.asarray(a, np.float64)
    if a.ndim < 2:
        return a.reshape(-1, 1)
    if keep is not None and a.shape[0] == keep.shape[0]:
        if a.ndim >= 3 and a.shape[1] == keep.shape[1]:
            return a[keep].reshape(-1, a.shape[-1])
        if a.ndim == 4 and a.shape[2] == keep.shape[1]:  # (batch, heads, queries, keys)
            return np.moveaxis(a, 1, 2)[keep].reshape(-1, a.shape[-1])
    return a.reshape(-1, a.shape[-1])


def _kept(batch: dict, g: Graph) -> np.ndarray | None:
    for name in sorted(g.mask_inputs):
        if name in batch and np.ndim(batch[name]) == 2:
            return np.asarray(batch[name]) != 0
    return None


def _subsample(x: np.ndarray) -> np.ndarray:
    if len(x) <= MAX_ROWS:
        return x
    return x[np.linspace(0, len(x) - 1, MAX_ROWS).round().astype(np.int64)]


def _weights_as_inputs(g: Graph, names: set[str]) -> onnx.ModelProto:
    """The canonical model with the named constants turned into graph inputs, so one
    onnxruntime session runs every variant (the weights are fed with each batch)."""
    model = g.to_model()
    kept = [t for t in model.graph.initializer if t.name not in names]
    moved = [t for t in model.graph.initializer if t.name in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for t in moved:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def fake_quant_weight(w: np.ndarray, bits: str, kind: str, per_channel: bool) -> np.ndarray:
    """The weight as `refsim export` quantizes it, dequantized (linear layers per output
    channel with `per_channel`; embedding tables per tensor)."""
    return quantize_weight(np.asarray(w, np.float64), bits, per_channel and kind == "linear", axis=-1).dequantized()


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return 999.0
    if signal == 0:
        return -999.0
    return round(10 * math.log10(signal / noise), 4)


def measure(model, calib, *, method: str = "pwcca", topk: int | None = None, bits=DEFAULT_BITS, per_channel: bool = False,
            tokenizer=None, max_length: int | None = None, max_samples: int | None = None, batch_size: int = 16,
            layers: list[str] | None = None, progress: bool = False) -> dict:
    """Sensitivities of every quantizable layer (or of `layers`) at each of `bits`, as the
    JSON document `refsim sensitivity` writes (see the module docstring)."""
    if method not in METHODS:
        raise ExportError(f"unknown sensitivity method {method!r}; choose from {', '.join(METHODS)}")
    if topk is not None and (method != "svcca" or topk < 1):
        raise ExportError("--topk K (K >= 1) goes with --method svcca")
    bits = [parse_wbits(b) for b in bits]
    if not bits:
        raise ExportError("no candidate bit widths")
    proto, g, dataset, _, _, shapes = prepare(model, os.fspath(calib), tokenizer, max_length)
    if max_samples is not None:
        dataset = dataset.head(max_samples)
    found = quantizable_layers(g)
    if layers is not None:
        unknown = sorted(set(layers) - {q.name for q in found})
        if unknown:
            raise ExportError(f"no quantizable layer named {unknown[0]!r} (see `refsim export --list-layers`)")
        found = [q for q in found if q.name in set(layers)]
    if not found:
        raise ExportError("the model has no layer with weights to quantize")
    weight_names = {w for q in found for w in q.weights}
    float_weights = {w: np.asarray(g.const(w), np.float32) for w in weight_names}
    compared = sorted({q.compared for q in found})
    runner = FloatRunner(_weights_as_inputs(g, weight_names), expose=compared)
    dtypes = onnx_feed_dtypes(g)
    batches = dataset.batches(batch_size, dtypes)
    keeps = [_kept(b, g) for b in batches]
    bar = Progress(progress)
    total = len(batches) * (1 + len(found) * len(bits))
    done = 0

    def run_all(weights: dict, tensor: str | None):
        """Rows of `tensor` and of the outputs over the calibration data."""
        nonlocal done
        got, outs = [], []
        for batch, keep in zip(batches, keeps):
            values = runner.run({**batch, **weights})
            if tensor is not None:
                got.append(rows(values[tensor], keep))
            outs.append(np.concatenate([rows(values[o], keep).reshape(-1) for o in g.outputs]))
            done += 1
            bar(done, total, "sensitivity")
        return (_subsample(np.concatenate(got)) if got else None), np.concatenate(outs)

    reference: dict[str, np.ndarray] = {}
    float_out = None
    for batch, keep in zip(batches, keeps):
        values = runner.run({**batch, **float_weights})
        for t in compared:
            reference.setdefault(t, []).append(rows(values[t], keep))
        out = np.concatenate([rows(values[o], keep).reshape(-1) for o in g.outputs])
        float_out = out if float_out is None else np.concatenate([float_out, out])
        done += 1
        bar(done, total, "sensitivity")
    reference = {t: cca.View(_subsample(np.concatenate(v))) for t, v in reference.items()}
    signal = float(np.sum(float_out ** 2))

    entries = []
    for q in found:
        entry = {"name": q.name, "kind": q.kind, "params": q.params, "compared": q.compared,
                 "sensitivity": {}, "output_sqnr_db": {}}
        if method != "sqnr":
            entry["similarity"] = {}
        for b in bits:
            weights = dict(float_weights)
            for w in q.weights:
                weights[w] = fake_quant_weight(float_weights[w], b, q.kind, per_channel)
            act, out = run_all(weights, None if method == "sqnr" else q.compared)
            db = _sqnr_db(signal, float(np.sum((out - float_out) ** 2)))
            entry["output_sqnr_db"][b] = db
            if method == "sqnr":
                entry["sensitivity"][b] = 10 ** (-db / 10)
            else:
                ref = reference[q.compared]
                similarity = cca.pwcca(ref, act) if method == "pwcca" else cca.svcca(ref, act, topk)
                entry["similarity"][b] = float(similarity)
                entry["sensitivity"][b] = float(1.0 - similarity)
        entries.append(entry)
    source = model if isinstance(model, (str, os.PathLike)) else None
    return {
        "format": FORMAT,
        "version": 1,
        "method": method,
        "topk": topk,
        "bits": bits,
        "per_channel": bool(per_channel),
        "model": {"file": os.path.basename(os.fspath(source)) if source else None,
                  "sha256": _file_sha256(source) if source else None,
                  "input_shapes": {k: [int(d) for d in v] for k, v in shapes.items()}},
        "calibration": {"data": "calibration", "source": os.path.basename(dataset.source), "samples": len(dataset),
                        "digests": dataset.digests},
        "layers": entries,
    }


def save(doc: dict, path: str | os.PathLike) -> None:
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def load(path: str | os.PathLike) -> dict:
    """A sensitivity JSON file, checked enough that allocation can trust it."""
    path = os.fspath(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ExportError(f"{path}: not a sensitivity file (written by `refsim sensitivity`)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ExportError(f"{path}: no layers")
    for i, entry in enumerate(layers):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("params"), int)
              and isinstance(entry.get("sensitivity"), dict) and entry["sensitivity"]
              and all(isinstance(v, (int, float)) and math.isfinite(v) for v in entry["sensitivity"].values()))
        if not ok:
            raise ExportError(f"{path}: layer entry {i} needs a name, params and finite sensitivities per bit width")
    return doc
