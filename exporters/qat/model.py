"""Quantization-aware training of a `refsim export` integer model (see the package docstring)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from refsim.boundary import quantize_feeds
from refsim.intq import save
from refsim.ir import Graph

from ..data import load_dataset
from ..pipeline import Built, ExportReport, build, onnx_feed_dtypes
from ..progress import Progress
from ..runtime import FloatRunner
from .errors import QatError
from .graph import IntegerGraph, Recipe
from .ops import F64, Q


@dataclass
class TrainReport:
    epochs: int
    steps: int
    samples: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per epoch

    def summary(self) -> str:
        losses = ", ".join(f"{v:.4g}" for v in self.losses)
        return f"trained {self.epochs} epochs ({self.steps} steps, {self.samples} samples) in {self.seconds:.0f} s; loss per epoch: {losses}"


def _recipes(built: Built) -> tuple[list[Recipe], dict[str, np.ndarray]]:
    """A trainable parameter for every constant in the fake-quant record, initialised so
    that it rounds to exactly the exported integers."""
    graph, g, record = built.graph, built.canonical, built.walker.record
    by_name = {n.name: n for n in g.nodes}
    recipes, initial = [], {}
    for (node_name, index), (spec, scale) in record.consts.items():
        parts = list(spec["concat"]) if isinstance(spec, dict) else [spec]
        axis = int(spec.get("axis", 0)) if isinstance(spec, dict) else 0
        arrays = [graph.tensors[p].data.astype(np.int64) for p in parts]
        joined = np.concatenate(arrays, axis=axis) if len(arrays) > 1 else arrays[0]
        t = graph.tensors[parts[0]].dtype
        lo, hi = record.ranges.get(parts[0], (t.lo, t.hi))
        s = np.asarray(scale, np.float64)
        w = g.const(by_name[node_name].inputs[index]).astype(np.float64).reshape(joined.shape)
        ratio = w / s
        # keep the float weight where it rounds to the exported integer (plain rounding);
        # elsewhere (GPTQ, bias correction, smoothing, clipped values) start on the grid point
        start = np.where((np.rint(ratio) == joined) & (ratio >= lo) & (ratio <= hi), w, joined * s)
        if not np.array_equal(np.clip(np.rint(start / s), lo, hi), joined):
            raise QatError(f"internal: the weights of {node_name!r} do not round back to the exported integers")
        key = f"{node_name}[{index}]"
        recipes.append(Recipe(key, parts, axis, s, int(lo), int(hi)))
        initial[key] = start
    return recipes, initial


class QatModel(torch.nn.Module):
    """An exported integer model whose weights train (see the package docstring).

        qat = QatModel.from_onnx("model.onnx", "calib.txt", tokenizer="tokenizer.json", mode="ita")
        qat.fit("train.txt", epochs=3)          # distillation to the float model's outputs
        qat.export("model.intq")                 # refsim run gives exactly qat's outputs
    """

    def __init__(self, built: Built, train_embeddings: bool = False):
        super().__init__()
        self.built = built
        recipes, initial = _recipes(built)
        self.integer = IntegerGraph(built.graph, recipes, initial, train_embeddings)
        meta = built.graph.metadata
        self.one_sample = bool(meta.get("attention_blocks") or meta.get("feedforward_blocks"))  # ITA blocks are 2-D
        self._teacher = None

    @classmethod
    def from_onnx(cls, model, calib, train_embeddings: bool = False, **options) -> "QatModel":
        """Calibrate and quantize `model` as `refsim export` does (same options), ready to
        train (embedding tables too with `train_embeddings`)."""
        return cls(build(model, calib, **options), train_embeddings)

    @property
    def graph(self) -> Graph:
        return self.built.graph

    # --- running -------------------------------------------------------------------------

    def integer_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raw inputs (token ids and masks, float images) as the integer graph takes them."""
        out = {}
        for name in self.graph.inputs:
            if name not in feeds:
                raise QatError(f"missing input {name!r}")
            value = np.asarray(feeds[name])
            out[name] = value if value.dtype.kind == "f" else value.astype(self.graph.tensors[name].dtype.storage)
        return quantize_feeds(self.graph, out)

    def forward(self, feeds: dict[str, np.ndarray]) -> dict[str, Q]:
        """The integer outputs (exact), with gradients, for raw or integer feeds."""
        feeds = self.integer_feeds(feeds)
        if not self.one_sample:
            return self.integer(feeds)
        count = len(next(iter(feeds.values())))
        runs = [self.integer({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(count)]
        return {name: Q(torch.cat([r[name].e for r in runs]), torch.cat([r[name].f for r in runs])) for name in self.graph.outputs}

    def real(self, outputs: dict[str, Q]) -> dict[str, torch.Tensor]:
        """Integer outputs as the real values they stand for (their scale)."""
        result = {}
        for name, q in outputs.items():
            t = self.graph.tensors[name]
            scale = torch.as_tensor(np.asarray(t.scale if t.scale is not None else 1.0, np.float64))
            result[name] = q.f * scale
        return result

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The integer outputs as NumPy arrays, as `refsim run` returns them."""
        with torch.no_grad():
            out = self.forward(feeds)
        return {name: q.e.numpy().astype(self.graph.tensors[name].dtype.storage) for name, q in out.items()}

    # --- training ------------------------------------------------------------------------

    def teacher(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The float model's outputs (the canonical graph, as `refsim compare` runs it)."""
        if self._teacher is None:
            self._teacher = FloatRunner(self.built.canonical.to_model())
        dtypes = onnx_feed_dtypes(self.built.canonical)
        return self._teacher.run({k: np.asarray(v).astype(dtypes[k]) for k, v in feeds.items() if k in dtypes})

    def fit(self, data, *, epochs: int = 3, lr: float = 1e-5, batch_size: int = 16, labels=None,
            loss: str = "auto", seed: int = 0, progress: bool = False, threads: int | None = 1) -> TrainReport:
        """Train the weights for `epochs` passes over `data` (a path as `refsim export
        --calib` reads it, or a dict of arrays): the loss compares the integer model's
        real-valued output with the float model's on the same input (distillation:
        mean squared error plus 1 - cosine), and with `labels` (class indices) adds cross
        entropy. Adam with learning rate `lr`. `threads`: torch's intra-op threads while
        training (None: leave torch's setting); one is fastest for these small tensors,
        and far faster on a busy machine, where waiting threads spin."""
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            return self._fit(data, epochs, lr, batch_size, labels, loss, seed, progress)
        finally:
            torch.set_num_threads(previous)

    def _fit(self, data, epochs, lr, batch_size, labels, loss, seed, progress) -> TrainReport:
        arrays = self._arrays(data)
        count = len(next(iter(arrays.values())))
        truth = None if labels is None else torch.as_tensor(np.asarray(labels, np.int64))
        if truth is not None and len(truth) != count:
            raise QatError(f"{len(truth)} labels for {count} training samples")
        out_name = self.graph.outputs[0]
        teacher = np.concatenate([self.teacher({k: v[i:i + 64] for k, v in arrays.items()})[self.built.canonical.outputs[0]]
                                  for i in range(0, count, 64)])
        target = torch.as_tensor(teacher.astype(np.float64))
        optimizer = torch.optim.Adam(self.integer.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        bar = Progress(progress)
        report = TrainReport(epochs, 0, count, 0.0)
        start = time.time()
        batches = (count + batch_size - 1) // batch_size
        for epoch in range(epochs):
            order = rng.permutation(count)
            total = 0.0
            for b in range(batches):
                idx = order[b * batch_size:(b + 1) * batch_size]
                out = self.real(self.forward({k: v[idx] for k, v in arrays.items()}))[out_name]
                value = _loss(out, target[idx], None if truth is None else truth[idx], loss)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                total += float(value.detach()) * len(idx)
                report.steps += 1
                bar(epoch * batches + b + 1, epochs * batches, "training")
            report.losses.append(total / count)
        report.seconds = time.time() - start
        self.report = report
        return report

    def _arrays(self, data) -> dict[str, np.ndarray]:
        """Training inputs: a dict of arrays, a path (as --calib reads it) or a list of paths."""
        if isinstance(data, dict):
            return {k: np.asarray(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            parts = [self._arrays(d) for d in data]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        names = [n for n in self.built.canonical.inputs]
        dataset = load_dataset(os.fspath(data), names, self.built.encoder)
        return dataset.arrays

    # --- export --------------------------------------------------------------------------

    def export(self, output: str | os.PathLike) -> ExportReport:
        """Write the integer model with the trained constants: `refsim run` on it gives
        exactly `self.run`'s outputs."""
        graph = self.integer.exported_graph()
        rep = getattr(self, "report", None)
        if rep is not None:
            graph.metadata["qat"] = {"epochs": rep.epochs, "steps": rep.steps, "samples": rep.samples,
                                     "seconds": round(rep.seconds, 1), "losses": rep.losses}
        save(graph, output)
        return ExportReport(os.fspath(output), len(graph.nodes), os.path.getsize(output), self.built.layer_names,
                            len(self.built.dataset), self.built.warnings)


def read_class_labels(path, names: list[str] | None = None) -> np.ndarray:
    """Class indices from a labels file: one per line, an index or one of `names`."""
    from ..data import read_labels

    raw = read_labels(os.fspath(path))
    lookup = {n: i for i, n in enumerate(names or [])}
    out = []
    for number, text in enumerate(raw, 1):
        if text in lookup:
            out.append(lookup[text])
        elif text.lstrip("-").isdigit():
            out.append(int(text))
        else:
            raise QatError(f"{os.fspath(path)}: line {number}: {text!r} is neither a class index nor a label")
    return np.asarray(out, np.int64)


def _loss(out: torch.Tensor, target: torch.Tensor, truth, kind: str) -> torch.Tensor:
    out = out.reshape(len(out), -1)
    target = target.reshape(len(target), -1)
    mse = torch.mean((out - target) ** 2) / torch.mean(target ** 2).clamp(min=1e-12)
    cos = torch.nn.functional.cosine_similarity(out, target, dim=1).mean()
    value = mse + (1 - cos)
    if truth is not None:
        value = value + torch.nn.functional.cross_entropy(out.to(F64), truth)
    return value
