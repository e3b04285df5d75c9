"""Mixed precision: weight bit widths per layer from measured sensitivities, under a size budget.

    refsim export MODEL.onnx -o OUT.intq --calib DATA --bits-from sensitivity.json \\
        --allocation kmeans --bit-choices 2,4,8,16 --compression 6

Both allocations order the layers by sensitivity per weight (`refsim sensitivity`'s value
at the width just below the middle of the choices, 4 of 2/4/8/16, over the layer's weight
count: a bit taken from a big embedding table saves as much as bits taken from many small
layers) and never give a more sensitive layer fewer bits than a less sensitive one:

- `kmeans` (the BERT-IMDB recipe): one-dimensional k-means (scikit-learn) of these log
  sensitivities into as many clusters as there are bit choices; every layer of a cluster
  gets the same width, the most sensitive cluster the most bits.
- `percentile`: cut points in the sensitivity order, i.e. percentiles of the sensitivity
  distribution; without a budget, equal shares (quartiles for four choices).

With a budget (`--compression X`: the float32 size of the ONNX model's weights / X;
`--size MB`), the widths of the clusters (kmeans) or the cut points (percentile) are the
ones that fit and have the smallest total sensitivity (sum over layers of the sensitivity
at the chosen width; every monotone choice is tried). Sizes are what the `.intq` stores:
every constant tensor packed (weights, biases, requantization constants, tables) plus the
scales stored with them; the tokenizer and other metadata do not count. The fixed part
(everything but the allocated weights) is measured on the built graph, and the allocation
is redone until the built model fits.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import os

import numpy as np
import onnx
from refsim.dtypes import TYPES
from refsim.intq import atomic_write

from . import sensitivity as sens
from .calibrate import weight_range
from .config import LayerConfig, parse_wbits
from .dyadic import ExportError

ALLOCATIONS = ("kmeans", "percentile")
DEFAULT_CHOICES = ("2", "4", "8", "16")
MAX_ROUNDS = 4


def bit_count(bits: str) -> int:
    """Bits one weight takes in the `.intq`: its IR type's (3-bit weights are stored as
    int4, 5 to 7 bits as int8, ternary as 2 bits)."""
    return TYPES[weight_range(bits)[2]].bits


def _scale_bytes(t) -> int:
    if t.scale is None:
        return 0
    return 8 * int(np.size(t.scale))


def model_bytes(graph) -> int:
    """Bytes of an integer graph's parameters as an `.intq` stores them: every constant
    packed to its type (sub-byte types several to a byte), plus the float64 scales stored
    with the constants."""
    total = 0
    for t in graph.tensors.values():
        if t.is_const:
            total += t.dtype.nbytes(int(np.size(t.data))) + _scale_bytes(t)
    return total


def float32_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the ONNX model's floating-point weights held as float32."""
    count = 0
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            count += math.prod(t.dims)
    return 4 * count


def measure_intq(path) -> dict:
    """Size, float32 reference aside, measured from a written `.intq` file."""
    import refsim

    m = refsim.load(path)
    return {"model_bytes": model_bytes(m.graph), "file_bytes": os.path.getsize(path)}


# --- allocation -----------------------------------------------------------------------------


def reference_width(choices: list[str]) -> str:
    """The width layers are ranked at: the one just below the middle of the choices (4 of
    2, 4, 8, 16). The extremes do not tell layers apart: at the top every layer is nearly
    lossless, at the bottom nearly every one is ruined."""
    ordered = sorted(choices, key=lambda b: (bit_count(b), b))
    return ordered[(len(ordered) - 1) // 2]


def _scores(layers: list[dict], choices: list[str], params: np.ndarray) -> np.ndarray:
    """log10 of each layer's sensitivity per weight at the reference width. Per weight,
    because a bit taken from a big layer (an embedding table) saves as much as bits taken
    from many small ones."""
    width = reference_width(choices)
    return np.array([math.log10(max(float(e["sensitivity"][width]), 1e-30)) - math.log10(max(p, 1))
                     for e, p in zip(layers, params)])


def _monotone(groups: int, choices: int):
    """Every non-increasing map from group rank (most sensitive first) to choice index
    (0 = most bits)."""
    for combo in itertools.combinations_with_replacement(range(choices), groups):
        yield combo  # sorted ascending: group 0 (most sensitive) gets the smallest index = most bits


def _groups_kmeans(scores: np.ndarray, k: int) -> list[list[int]]:
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(scores)))
    if k <= 1:
        return [list(range(len(scores)))]
    labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit(scores.reshape(-1, 1)).labels_
    groups = [list(np.flatnonzero(labels == c)) for c in range(k)]
    groups.sort(key=lambda g: -float(np.mean(scores[g])))  # most sensitive first
    return groups


def allocate(doc: dict, method: str, choices: list[str], budget: float | None = None, fixed: int = 0,
             params: dict[str, int] | None = None) -> dict[str, str]:
    """Bits per layer (see the module docstring). `budget`: bytes the whole model may take,
    `fixed`: bytes of everything but the allocated weights; `params`: weight count per
    layer (default: the sensitivity file's)."""
    if method not in ALLOCATIONS:
        raise ExportError(f"unknown allocation {method!r}; choose from {', '.join(ALLOCATIONS)}")
    layers = doc["layers"]
    missing = [b for b in choices for e in layers if b not in e["sensitivity"]]
    if missing:
        raise ExportError(f"the sensitivity file has no values at {missing[0]} bits (it has {', '.join(doc['bits'])}); "
                          f"measure them with `refsim sensitivity --bits`")
    choices = sorted(choices, key=lambda b: (bit_count(b), b != "ternary", int(b) if b != "ternary" else 2), reverse=True)
    sizes = np.array([(params or {}).get(e["name"], e["params"]) for e in layers], np.float64)
    scores = _scores(layers, choices, sizes)
    order = list(np.argsort(-scores, kind="stable"))  # most sensitive first
    cost = np.array([[sizes[i] * bit_count(b) / 8 for b in choices] for i in range(len(layers))])
    damage = np.array([[float(e["sensitivity"][b]) for b in choices] for e in layers])
    if method == "kmeans":
        groups = _groups_kmeans(scores, len(choices))
    else:
        groups = [[i] for i in order]
    if budget is None:
        if method == "kmeans":
            picks = [min(r, len(choices) - 1) for r in range(len(groups))]
        else:  # equal shares of the sensitivity order
            picks = [min(len(choices) - 1, r * len(choices) // len(groups)) for r in range(len(groups))]
    else:
        gcost = np.array([cost[g].sum(axis=0) for g in groups])
        gdamage = np.array([damage[g].sum(axis=0) for g in groups])
        best, best_damage = None, math.inf
        rows = np.arange(len(groups))
        for combo in _monotone(len(groups), len(choices)):
            c = np.asarray(combo)
            if fixed + gcost[rows, c].sum() > budget:
                continue
            d = gdamage[rows, c].sum()
            if d < best_damage:
                best, best_damage = combo, d
        if best is None:
            smallest = fixed + cost[:, -1].sum()
            raise ExportError(f"the budget of {budget / 1e6:.3f} MB is below the smallest allocation "
                              f"(every layer at {choices[-1]} bits: {smallest / 1e6:.3f} MB)")
        picks = list(best)
    chosen = {}
    for group, pick in zip(groups, picks):
        for i in group:
            chosen[layers[i]["name"]] = choices[pick]
    return chosen


def layers_json(chosen: dict[str, str]) -> dict:
    """The allocation as a layers.json document (names escaped: they are glob patterns)."""
    return {"layers": {glob.escape(name): {"wbits": bits if bits == "ternary" else int(bits)} for name, bits in chosen.items()}}


def parse_choices(text) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    choices = [parse_wbits(b.strip() if isinstance(b, str) else b) for b in items if str(b).strip()]
    if not choices:
        raise ExportError("--bit-choices needs at least one bit width")
    return list(dict.fromkeys(choices))


class Planner:
    """What `pipeline.export` calls (its `plan` hook) between calibration and writing: the
    layer settings for the budget, with the graph measured as it will be written."""

    def __init__(self, bits_from, method: str = "kmeans", choices=DEFAULT_CHOICES, compression: float | None = None,
                 size_mb: float | None = None, base: LayerConfig | None = None, model_path=None):
        if compression is not None and size_mb is not None:
            raise ExportError("give one budget: --compression X or --size MB")
        if compression is not None and not compression > 0:
            raise ExportError(f"--compression must be positive, got {compression}")
        if size_mb is not None and not size_mb > 0:
            raise ExportError(f"--size must be positive, got {size_mb}")
        self.source = os.fspath(bits_from)
        self.doc = sens.load(bits_from)
        self.method = method
        self.choices = parse_choices(choices)
        self.compression, self.size_mb = compression, size_mb
        self.base = base or LayerConfig()
        self.model_path = model_path
        self.warnings: list[str] = []
        self.chosen: dict[str, str] = {}

    def __call__(self, g, proto: onnx.ModelProto, build) -> tuple[LayerConfig, dict]:
        present = {q.name: q.params for q in sens.quantizable_layers(g)}
        unknown = [e["name"] for e in self.doc["layers"] if e["name"] not in present]
        if unknown:
            raise ExportError(f"{self.source}: layer {unknown[0]!r} is not a quantizable layer of this model "
                              f"(was the file measured on another model?)")
        absent = sorted(set(present) - {e["name"] for e in self.doc["layers"]})
        if absent:
            self.warnings.append(f"{self.source}: no sensitivity for {len(absent)} layer(s) ({absent[0]}, ...): "
                                 f"they keep the export's bit widths")
        sha = (self.doc.get("model") or {}).get("sha256")
        if sha and self.model_path is not None:
            from .pipeline import _file_sha256

            if _file_sha256(self.model_path) != sha:
                self.warnings.append(f"{self.source} was measured on a different ONNX file ({self.doc['model'].get('file')})")
        float_bytes = float32_bytes(proto)
        budget = None
        if self.compression is not None:
            budget = float_bytes / self.compression
        elif self.size_mb is not None:
            budget = self.size_mb * 1e6

        def config_for(chosen):
            doc = layers_json(chosen)
            return LayerConfig(self.base.entries + LayerConfig.from_dict(doc, self.source).entries, self.base.source), doc

        if budget is None:
            chosen = allocate(self.doc, self.method, self.choices, None, 0, present)
        else:
            # First as if only the allocated weights took space, then with the rest of the
            # graph measured, until the built graph fits.
            chosen = allocate(self.doc, self.method, self.choices, budget, 0, present)
            for _ in range(MAX_ROUNDS):
                measured = model_bytes(build(config_for(chosen)[0]))
                if measured <= budget:
                    break
                fixed = measured - sum(present[n] * bit_count(b) / 8 for n, b in chosen.items())
                chosen = allocate(self.doc, self.method, self.choices, budget, fixed, present)
            else:
                raise ExportError(f"no allocation of {', '.join(self.choices)} bits fits {budget / 1e6:.3f} MB "
                                  f"(the last one tried takes {measured / 1e6:.3f} MB)")
        self.chosen = chosen
        config, doc = config_for(chosen)
        self.layers_doc = doc
        meta = {
            "method": self.method,
            "bit_choices": self.choices,
            "budget": {"compression": self.compression, "size_mb": self.size_mb,
                       "bytes": None if budget is None else int(budget), "float32_bytes": float_bytes},
            "layers_json": doc,
            "chosen": chosen,
            "sensitivity": {k: v for k, v in self.doc.items()},
        }
        return config, meta


def write_layers_json(doc: dict, output) -> str:
    """`OUT.layers.json` beside `OUT.intq`."""
    path = os.path.splitext(os.fspath(output))[0] + ".layers.json"
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def export_mixed(model, output, calib, bits_from, *, allocation: str = "kmeans", bit_choices=DEFAULT_CHOICES,
                 compression: float | None = None, size_mb: float | None = None, config=None, **options) -> dict:
    """`refsim export ... --bits-from sensitivity.json`: export with the allocated widths,
    write `OUT.layers.json`, and measure the written model. Returns the export report and
    the measured sizes."""
    from .pipeline import export

    base = config if isinstance(config, LayerConfig) else (
        LayerConfig.from_dict(config) if isinstance(config, dict) else LayerConfig.load(config))
    planner = Planner(bits_from, allocation, bit_choices, compression, size_mb, base,
                      model if isinstance(model, (str, os.PathLike)) else None)
    report = export(model, output, calib, config=base, plan=planner, **options)
    report.warnings.extend(planner.warnings)
    layers_path = write_layers_json(planner.layers_doc, output)
    measured = measure_intq(output)
    float_bytes = float32_bytes(onnx.load(os.fspath(model), load_external_data=True)) if isinstance(model, (str, os.PathLike)) \
        else float32_bytes(model)
    counts: dict[str, int] = {}
    for bits in planner.chosen.values():
        counts[bits] = counts.get(bits, 0) + 1
    return {"report": report, "layers_json": layers_path, "chosen": planner.chosen, "counts": counts,
            "model_bytes": measured["model_bytes"], "file_bytes": measured["file_bytes"], "float32_bytes": float_bytes,
            "compression": float_bytes / measured["model_bytes"]}


def summary(result: dict) -> str:
    counts = ", ".join(f"{n} at {b} bits" for b, n in sorted(result["counts"].items(), key=lambda kv: -bit_count(kv[0])))
    return (f"{result['report'].summary()}\n"
            f"bits per layer: {counts}; written to {result['layers_json']} and embedded in the .intq\n"
            f"measured: {result['model_bytes'] / 1e6:.3f} MB of packed weights, biases, tables and scales "
            f"(file {result['file_bytes'] / 1e6:.3f} MB); float32 weights {result['float32_bytes'] / 1e6:.3f} MB; "
            f"compression {result['compression']:.2f}x")
